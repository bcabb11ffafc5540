"""Which models are on disk: every model the config names, every GGUF directly inside the model
directories, and every model of an Ollama store (a model directory that holds `manifests/` and `blobs/`), by name. Reading only: nothing is
copied, a model's file is mmap'd where it lies. Pure apart from reading the directories given.

Ollama's store: `manifests/<registry>/<namespace>/<name>/<tag>` are JSON manifests whose layers name
content-addressed blobs (`blobs/sha256-<hex>`): the `…image.model` layer is the GGUF, the `…image.params`
layer holds defaults (stop words, sampling, num_ctx), the `…image.system` layer a system prompt. A manifest
is data from disk: one that is malformed, names a blob that is missing, or reaches outside the store
(a symlink, a digest that is not a digest) is skipped and reported, naming the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from supervisor.errors import ApiError
from supervisor.settings.gguf_file import resolve_model_path

OLLAMA_REGISTRY = "registry.ollama.ai"
MODEL_LAYER = "application/vnd.ollama.image.model"
PARAMS_LAYER = "application/vnd.ollama.image.params"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"
# A projector layer (images for a vision model) is left aside: the model serves text, and requests with
# images are refused by name. The template layer (Go templates) is Ollama's; the GGUF's own template serves.
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
MAX_SMALL_BLOB = 1 << 20  # a manifest, params or system layer larger than this is not one
MAX_NAME = 64


@dataclass(frozen=True)
class Available:
    name: str
    path: Path  # the GGUF (a store's blob), resolved
    source: str  # "config", "model_dir" or "ollama"
    params: dict[str, Any] = field(default_factory=dict)  # an Ollama params layer, as written
    system: str = ""  # an Ollama system layer


@dataclass(frozen=True)
class Scan:
    models: dict[str, Available]
    problems: tuple[str, ...] = ()  # what was skipped and why, each naming its file


def model_name(stem: str) -> str:
    """A file's stem as a model name: what names may not hold becomes '_', cut to 64 characters."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", stem)[:MAX_NAME] or "_"


def is_store(directory: Path) -> bool:
    return (directory / "manifests").is_dir() and (directory / "blobs").is_dir()


def scan(model_dirs: Sequence[Path], configured: Mapping[str, str] = {}) -> Scan:
    """Every model the config names (`configured`: name → path, as [models.NAME] gives it) and every model
    the directories hold; the first of two that map to one name wins, the other is reported — the config's
    names first: they are the operator's own."""
    models: dict[str, Available] = {}
    problems: list[str] = []

    def add(model: Available) -> None:
        taken = models.get(model.name)
        if taken is None:
            models[model.name] = model
        elif taken.path != model.path:  # [models.tiny] path = "tiny.gguf" names its own file: no clash
            problems.append(f"{model.path}: its name {model.name!r} is taken by {taken.path}; skipped")

    for name, path in configured.items():
        try:
            add(Available(name, resolve_model_path(path, model_dirs), "config"))
        except ApiError as e:  # the config's load at start said so too; here it is only not on offer
            problems.append(f"[models.{name}]: {e.message}; not available")
        except (OSError, RuntimeError) as e:  # unreadable, a symlink loop: this one costs itself alone
            problems.append(f"[models.{name}]: {path} cannot be resolved ({e}); not available")
    roots = [d.resolve() for d in model_dirs]
    for directory in model_dirs:
        try:
            entries = sorted(directory.iterdir()) if directory.is_dir() else []
            store = is_store(directory)
        except OSError as e:  # unreadable (permissions): the other directories still count
            problems.append(f"{directory}: cannot be listed ({e.strerror}); skipped")
            continue
        if store:
            found, skipped = read_store(directory)
            problems += skipped
            for model in found:
                add(model)
        for entry in entries:
            try:
                if entry.suffix.lower() != ".gguf" or not entry.is_file():
                    continue
                real = entry.resolve()
            except (OSError, RuntimeError) as e:
                problems.append(f"{entry}: cannot be resolved ({e}); skipped")
                continue
            if not any(real.is_relative_to(root) for root in roots):  # as loading refuses it
                problems.append(f"{entry}: resolves to {real}, outside the model directories; skipped")
                continue
            add(Available(model_name(entry.stem), real, "model_dir"))
    return Scan(models, tuple(problems))


def read_store(store: Path) -> tuple[list[Available], list[str]]:
    root = store.resolve()
    found, problems = [], []
    manifests = root / "manifests"
    for part in (manifests, root / "blobs"):  # os.walk would follow it, and every blob would lead outside
        if part.is_symlink():
            return [], [f"{part}: a symlink; a store's {part.name} must lie in the store (point model_dirs at "
                        f"the real store, or link the whole store instead); skipped"]
    unreadable = []  # os.walk skips a directory it cannot list: say so, not "0 models"
    for directory, dirs, files in os.walk(manifests, onerror=unreadable.append):  # symlinks below: not followed
        for file in sorted(files):
            path = Path(directory) / file
            parts = path.relative_to(manifests).parts
            if len(parts) != 4:
                problems.append(f"{path}: not at manifests/<registry>/<namespace>/<name>/<tag>; skipped")
                continue
            try:
                found.append(read_manifest(root, path, *parts))
            except Exception as e:  # a manifest is data from disk: whatever it holds costs it alone
                reason = str(e) if isinstance(e, ValueError) else f"not a manifest ({type(e).__name__}: {e})"
                problems.append(f"{path}: {reason}; skipped")
    problems += [f"{e.filename}: cannot be listed ({e.strerror}); skipped" for e in unreadable]
    return found, problems


def store_name(registry: str, namespace: str, model: str, tag: str) -> str:
    """As Ollama shows them: `llama3.2:latest` for its own library, `namespace/name:tag` for others."""
    if registry == OLLAMA_REGISTRY:
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{registry}/{namespace}/{model}:{tag}"


def read_manifest(root: Path, path: Path, registry: str, namespace: str, model: str, tag: str) -> Available:
    manifest = json.loads(small_file(root, path))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers"), list):
        raise ValueError("not a manifest: no list of layers")
    layers = {layer.get("mediaType"): layer.get("digest") for layer in manifest["layers"] if isinstance(layer, dict)}
    if MODEL_LAYER not in layers:
        raise ValueError("no model layer")
    if ADAPTER_LAYER in layers:  # served without it, it would answer as its base model: not what was asked for
        raise ValueError("it has an adapter (LoRA) layer, which this daemon does not apply")
    name = store_name(registry, namespace, model, tag)
    if len(name) > MAX_NAME or not all(c.isalnum() or c in "-_.:/" for c in name):
        raise ValueError(f"the name {name!r} is not one this daemon takes (1-64 letters, digits, -_.:/)")
    params: Any = json.loads(small_file(root, blob(root, layers[PARAMS_LAYER]))) if PARAMS_LAYER in layers else {}
    if not isinstance(params, dict):
        raise ValueError("its params layer is not a JSON object")
    system = small_file(root, blob(root, layers[SYSTEM_LAYER])).decode(errors="replace") if SYSTEM_LAYER in layers else ""
    return Available(name, blob(root, layers[MODEL_LAYER]), "ollama", params, system)


def blob(root: Path, digest: Any) -> Path:
    """The blob a digest names, which must be a file inside the store's blobs/ once symlinks are resolved."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        raise ValueError(f"a layer's digest {digest!r} is not sha256:<64 hex digits>")
    path = (root / "blobs" / digest.replace(":", "-")).resolve()  # a loop raises RuntimeError: skipped too
    if not path.is_relative_to(root / "blobs"):
        raise ValueError(f"blob {digest} resolves to {path}, outside the store")
    if not path.is_file():
        raise ValueError(f"blob {digest} is missing")
    return path


def small_file(root: Path, path: Path) -> bytes:
    """A manifest or small layer: a regular file inside the store. Opened without blocking (a FIFO would
    hold the scan's thread for good) and checked to be a regular file before it is read."""
    real = path.resolve()
    if not real.is_relative_to(root):
        raise ValueError(f"resolves to {real}, outside the store")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("is not a regular file")
        data = f.read(MAX_SMALL_BLOB + 1)
    if len(data) > MAX_SMALL_BLOB:
        raise ValueError(f"is larger than {MAX_SMALL_BLOB} bytes")
    return data


@dataclass(frozen=True)
class StoreFound:
    path: Path
    found_by: str
    models: int = 0
    size: int = 0
    served: bool = False
    problem: str = ""


def store_places(env: Mapping[str, str], home: Path | None) -> list[tuple[Path, str]]:
    """Where Ollama keeps its store, as Ollama itself looks: $OLLAMA_MODELS, its Linux service's home,
    the user's home."""
    places = [(Path(env["OLLAMA_MODELS"]), "OLLAMA_MODELS")] if env.get("OLLAMA_MODELS") else []
    places.append((Path("/usr/share/ollama/.ollama/models"), "ollama service"))
    if home is not None:
        places.append((home / ".ollama" / "models", "home directory"))
    return places


def find_stores(places: Sequence[tuple[Path, str]], model_dirs: Sequence[Path]) -> list[StoreFound]:
    """Each place that holds an Ollama store, with what it holds and whether the catalog reads it already.
    A place that does not exist is left out unless it was asked for by name ("asked")."""
    served = {d.resolve() for d in model_dirs}
    found: dict[Path, StoreFound] = {}
    for place, why in places:
        try:
            real = place.resolve()
            if real in found:
                continue
            if not place.exists():
                if why == "asked":
                    found[real] = StoreFound(place, why, problem="does not exist")
                continue
            if not is_store(place):
                found[real] = StoreFound(place, why, problem="not an Ollama store (no manifests/ and blobs/)")
                continue
            models, skipped = read_store(place)
            if not models and not os.access(place / "manifests", os.R_OK | os.X_OK):
                found[real] = StoreFound(place, why, problem=f"not readable by the daemon's user (uid {os.getuid()})")
                continue
            if not models and skipped:  # nothing it holds can be served: say why, not "0 models"
                more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
                found[real] = StoreFound(place, why, problem=f"no model it holds can be served: {skipped[0]}{more}")
                continue
            blobs = {m.path for m in models}
            if blobs and not any(os.access(path, os.R_OK) for path in blobs):
                found[real] = StoreFound(place, why, len(models), problem=f"its model blobs are not readable by the "
                                                                          f"daemon's user (uid {os.getuid()})")
                continue
            size = sum(path.stat().st_size for path in blobs)
            found[real] = StoreFound(place, why, len(models), size, real in served)
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
            found[place] = StoreFound(place, why, problem=f"cannot be read: {getattr(e, 'strerror', None) or e}")
    return list(found.values())
