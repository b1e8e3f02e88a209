"""CUDA's limits on a launch grid, for our Triton launchers.

Grid axes 1 and 2 stop at 65535 programs, far below batch * heads of a big batch, and a launch past a limit
fails with a cryptic CUDA error. So every kernel puts all its programs on axis 0, which holds 2**31 - 1, and
unflattens program_id(0) itself, fastest index first: the order a 2-D or 3-D grid would run in, so caching and
scheduling are unchanged. `flat_grid` is that grid, with the one limit left checked.
"""
from __future__ import annotations

import math

MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0


def flat_grid(op: str, *axis_sizes: int) -> tuple[int]:
    """The 1-D grid of prod(axis_sizes) programs; a one-line error where CUDA cannot launch that many."""
    programs = math.prod(axis_sizes)
    if programs > MAX_PROGRAMS:
        raise ValueError(f"triton {op}: {programs} programs exceed CUDA's grid limit of {MAX_PROGRAMS}; "
                         f"use a smaller batch or kernels.{op}=torch")
    return (programs,)
