"""Which code produced a result: the checkout's git commit, and installed package versions."""
from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The short hash of the checkout archlab runs from, or None outside a git checkout (an installed wheel)."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def package_version(name: str) -> str:
    """The installed version of distribution `name` (e.g. triton), or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
