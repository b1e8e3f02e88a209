"""Run records: RUN_DIR/metrics.jsonl (the source of truth) and wandb (offline unless asked otherwise).

Named run_log rather than logging so that it can never shadow the standard library's `logging`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from archlab.kernels.common.files import atomic_write
from archlab.train.errors import UserError


class MetricsLog:
    """Append-only JSON lines; each record has a `kind` ("train" | "eval") and a `step`. path None: writes
    nothing (the other ranks of a distributed run)."""

    def __init__(self, path: Path | None, wandb_run=None):
        self.path = Path(path) if path is not None else None
        self.wandb_run = wandb_run

    def truncate_after(self, step: int) -> None:
        """On resume, drop records newer than the checkpoint so the file tells one continuous story."""
        if self.path is None or not self.path.exists():
            return
        kept = [line for line, record in _parse_lines(self.path) if record["step"] <= step]
        atomic_write(self.path, "".join(line + "\n" for line in kept))

    def write(self, kind: str, step: int, **values: Any) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in _parse_lines(path)]


def _parse_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) pairs; a torn last line (a kill in the middle of a write) is skipped."""
    parsed = []
    for line in Path(path).read_text().splitlines():
        try:
            parsed.append((line, json.loads(line)))
        except ValueError:
            continue
    return parsed


def check_wandb_mode(mode: str) -> None:
    """Called before anything is written: wandb must be importable, and online mode needs credentials
    (WANDB_API_KEY or a `wandb login` entry in ~/.netrc); offline never needs the network."""
    if mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise UserError(f"run.wandb={mode} but wandb is not installed; `pip install wandb` or set run.wandb=disabled")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    logged_in = netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or logged_in):
        raise UserError("run.wandb=online needs WANDB_API_KEY or `wandb login`; set one or use run.wandb=offline")


def start_wandb(mode: str, project: str, run_dir: Path, config: dict[str, Any]):
    """A wandb run writing under RUN_DIR/wandb, or None when disabled."""
    if mode == "disabled":
        return None
    import wandb  # lazy: slow to import and absent on some GPU boxes

    run_dir = Path(run_dir).resolve()
    return wandb.init(project=project, name=run_dir.name, dir=str(run_dir), mode=mode, config=config,
                      id=_stable_id(run_dir), resume="allow", settings=wandb.Settings(silent=True))


def _stable_id(run_dir: Path) -> str:
    """The same run directory maps to the same wandb id, so a resumed run continues its wandb history.
    wandb keeps the steps it already has: records that metrics.jsonl drops on resume stay in wandb."""
    return hashlib.sha1(str(run_dir).encode()).hexdigest()[:16]
