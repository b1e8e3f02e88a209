"""Atomic writes: each file goes to a temporary name next to it, synced, then os.replace'd onto its name, so a
crash or a concurrent reader never sees half a file. And `slug`, the file-name form of a device name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file next to `path` for the block to fill by name (for writers that take a path); moved onto
    `path` once the block succeeds, removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        temporary.chmod(0o644)  # not mkstemp's private 0600: what archlab writes is meant to be readable by all
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[IO[bytes]]:
    """A binary file whose contents replace `path` once the block succeeds (atomic_path)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        yield file


def atomic_write(path: Path, data: bytes | str) -> Path:
    """`path` now holds `data` (text as UTF-8), written atomically."""
    with atomic_output(path) as file:
        file.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def atomic_write_all(files: Mapping[Path, bytes | str]) -> None:
    """Every file written to its temporary name before any is moved into place: an interruption while writing
    leaves all of them as they were, so a report's files never come from two different runs."""
    with contextlib.ExitStack() as stack:
        for path, data in files.items():
            stack.enter_context(atomic_output(path)).write(data.encode() if isinstance(data, str) else data)


def json_text(value: Any, *, indent: int | None = 1) -> str:
    """The JSON files archlab writes: `indent` spaces per level (None: one line), a final newline."""
    return json.dumps(value, indent=indent) + "\n"


def slug(text: str) -> str:
    """text as a lower-case file-name part: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()
