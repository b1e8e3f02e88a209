"""Wall-clock timing that counts a GPU's work where it belongs: CUDA calls return before their kernels finish."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Waits until `device` has finished the work queued on it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """(run()'s result, its wall-clock seconds), the device synchronised before (earlier work is not counted) and
    after (its own queued work is)."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start
