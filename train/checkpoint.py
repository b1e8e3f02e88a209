"""Atomic checkpoints with exact resume.

A checkpoint is a directory `RUN_DIR/checkpoints/step_00000100/` holding
  model.safetensors   weights (safetensors: no code can hide in it)
  state.pt            optimizer, RNG states, data-sampler position, counters (loaded with weights_only=True)
  meta.json           step, format version, the model config it was written for
It is written into a hidden temporary directory, every file fsynced, then renamed into place: a crash at
any moment leaves either the complete new checkpoint or none, and older ones untouched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_file, save_model

from archlab.archs.config import complete_saved_model_config
from archlab.train.errors import CheckpointError

FORMAT_VERSION = 1
# what state.pt must hold for a resume (the trainer's _save writes these)
STATE_KEYS = {"optimizer", "sampler", "rng_torch", "step", "tokens", "flops", "train_seconds", "precision"}
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    model_config: dict[str, Any], keep_last: int, weights: dict | None = None) -> Path:
    """Writes the checkpoint of `step` atomically: the model's weights (or `weights`, a full state dict gathered
    from a sharded model). A failure to write (disk full, read-only folder) is a CheckpointError naming the last
    good checkpoint, which stays untouched."""
    try:
        return _save_checkpoint(run_dir, step, model, state, model_config, keep_last, weights)
    except OSError as err:
        last = latest_checkpoint(run_dir)
        raise CheckpointError(f"could not write the checkpoint of step {step} in {checkpoint_root(run_dir)} "
                              f"({err.strerror or err}); free disk space or make it writable, then resume from "
                              f"the last good checkpoint: {last or 'none saved yet'}") from None


def _save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                     model_config: dict[str, Any], keep_last: int, weights: dict | None) -> Path:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        root.mkdir(parents=True)
        _fsync(root.parent)
    for leftover in root.glob(".tmp-*"):  # from a save that was killed; one writer per run directory
        shutil.rmtree(leftover, ignore_errors=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir()
    try:
        if weights is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file(weights, str(tmp / "model.safetensors"))
        torch.save({**state, "format_version": FORMAT_VERSION}, tmp / "state.pt")
        meta = {"step": step, "format_version": FORMAT_VERSION, "model": model_config, "saved_at": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        replaced = root / f".tmp-old-{final.name}"
        if final.exists():  # re-saving a step: move the old copy aside first, so one always exists
            os.replace(final, replaced)
        os.replace(tmp, final)
        _fsync(root)
        shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or incomplete (meta.json: {err}); "
                              "delete it to fall back to an earlier one") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this archlab reads "
                              f"version {FORMAT_VERSION}; use the archlab version that wrote it")
    return meta


def load_weights(path: Path, model: torch.nn.Module, model_config: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` after checking it is the same architecture; returns meta.json."""
    meta = read_meta(path)
    # a key the checkpoint predates counts as the value the model was built with then (as JSON, like model_config)
    saved = complete_saved_model_config(meta.get("model", {}))
    differing = sorted((k for k in saved.keys() | model_config.keys() if saved.get(k) != model_config.get(k)),
                       key=lambda k: (k != "layers", k))  # a different stack first: it explains the rest
    if differing:
        shown = ", ".join(f"model.{k}: {saved.get(k)!r} in checkpoint vs {model_config.get(k)!r}"
                          for k in differing[:3])
        raise CheckpointError(f"checkpoint {path} is from a different architecture ({shown}); "
                              "load it with the config it was trained with")
    try:
        device = str(next(model.parameters()).device)
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=device)
    except Exception as err:  # noqa: BLE001 - whatever the damage, the user needs the same one-line answer
        raise _damaged(path, err) from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit this model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}); load it with the config it was trained with")
    return meta


def load_checkpoint(path: Path, model: torch.nn.Module, model_config: dict[str, Any]) -> dict[str, Any]:
    """Load weights into `model` and return the saved training state (to resume: optimizer, RNG, sampler...)."""
    load_weights(path, model, model_config)
    try:
        # weights_only: tensors and plain containers only; anything else (a pickle that would run code)
        # is refused with an UnpicklingError, reported like any other damage.
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise _damaged(path, err) from None
    absent = sorted(STATE_KEYS - set(state)) if isinstance(state, dict) else ["(not a mapping)"]
    if absent:
        raise CheckpointError(f"checkpoint {path} has no training state {absent[:3]} in state.pt; it is not archlab's "
                              "or is damaged: delete it to fall back to an earlier one")
    return state


def _damaged(path: Path, err: Exception) -> CheckpointError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return CheckpointError(f"checkpoint {path} is corrupted, truncated or not archlab's ({reason}); "
                           "delete it to fall back to an earlier one")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
