"""What survives a restart: the models loaded at run time through the API (config models need no
record — the config has them). One JSON file in the state directory, replaced atomically, so a crash
mid-write leaves the old record or the new one, never half of either. The daemon writes it on one
thread of its own (`record`): an fsync may take long on a busy disk, and the event loop must not wait
for it."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
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


# One thread, so records are written in the order they were made: with more (asyncio.to_thread's pool),
# a slow fsync of an older record could finish after a newer one's and replace it.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-writer")


async def record(path: Path, models: list[LoadedModel]) -> None:
    """save() on the writer thread, after every record asked for before this one; the event loop goes on
    meanwhile. Done once it is durable."""
    written = asyncio.get_running_loop().run_in_executor(_writer, save, path, list(models))
    # Shielded: a caller cancelled (a client gone) must not take its record out of the writer's queue,
    # or the file would keep an older one.
    await asyncio.shield(written)


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
