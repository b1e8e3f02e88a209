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
