"""What survives a restart: the models loaded at run time through the API (config models need no
record — the config has them). One JSON file in the state directory, replaced atomically, so a crash
mid-write leaves the old record or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import structlog

log = structlog.get_logger("llm_supervisor.state")

VERSION = 1


@dataclass(frozen=True)
class LoadedModel:
    """A LoadModel request as it was made, to be made again after a restart."""

    name: str
    path: str
    options: dict[str, str] = field(default_factory=dict)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself is durable only once the directory is
    finally:
        os.close(directory)


def save(path: Path, models: list[LoadedModel]) -> None:
    write_atomically(path, json.dumps({"version": VERSION, "models": [asdict(m) for m in models]}, indent=2) + "\n")


def load(path: Path) -> list[LoadedModel]:
    """The recorded models; none when there is no record. A damaged record is set aside (renamed
    `.damaged`) and reported, not fatal: the daemon must still start."""
    try:
        data = json.loads(path.read_text())
        return [LoadedModel(str(m["name"]), str(m["path"]), {str(k): str(v) for k, v in m.get("options", {}).items()})
                for m in data["models"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        aside = path.with_name(path.name + ".damaged")
        os.replace(path, aside)
        log.error("state_damaged", path=str(path), moved_to=str(aside), error=str(e))
        return []
