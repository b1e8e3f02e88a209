"""Input checks the kernel ops share: one-line errors that say what was wrong and what to do."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernel ops take


def check_device(op: str, name: str, t: Tensor, first_name: str, first: Tensor) -> None:
    """`t` (argument `name`) must be on the device of `first`, the op's first tensor."""
    if t.device != first.device:
        raise ValueError(f"{op}: all tensors must be on one device, got {first_name} on {first.device} and {name} on "
                         f"{t.device}")


def check_float_dtype(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")


def check_seq_idx(op: str, seq_idx, batch: int, length: int, device: torch.device) -> None:
    """seq_idx, the document id of each position of packed rows (issue 19's convention), must be an int32 or int64
    (batch, L) tensor on the input's device."""
    if not isinstance(seq_idx, Tensor):
        raise TypeError(f"{op}: seq_idx must be a torch.Tensor of document ids or None, got {type(seq_idx).__name__}")
    if seq_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: seq_idx has dtype {seq_idx.dtype}; use int32 (or int64) document ids")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"{op}: seq_idx must have shape (batch, L) = {(batch, length)}, got {tuple(seq_idx.shape)}")
    if seq_idx.device != device:
        raise ValueError(f"{op}: seq_idx is on {seq_idx.device} but the inputs are on {device}; move it there")


def check_cu_seqlens_bounds(op: str, cu_seqlens: Tensor, length: int) -> None:
    """Packed sequences' cumulative lengths must rise strictly from 0 to the packed length. Not checked under
    torch.compile: reading the values would break the graph (and sync a GPU)."""
    if torch.compiler.is_compiling():
        return
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != length or any(e <= s for s, e in zip(bounds[:-1], bounds[1:], strict=False)):
        raise ValueError(f"{op}: cu_seqlens must rise strictly from 0 to the packed length {length} (no empty "
                         f"sequences), got {bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-2:]}")


def shape_as_passed(shape: tuple, unpacked: bool) -> tuple:
    """A shape as the caller passed it: a decoding step's (batch, ...) tensors are checked as (batch, 1, ...)."""
    return tuple(shape[:1]) + tuple(shape[2:]) if unpacked else tuple(shape)
