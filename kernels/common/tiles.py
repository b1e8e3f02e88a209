"""Triton pieces that several ops' kernels share (imported by their triton.py modules only: it needs triton)."""
from __future__ import annotations

import triton
import triton.language as tl

from archlab.kernels.backend import triton_interpreting

# A kernel's helper functions. Under the interpreter they run as plain Python, as if inlined: it re-patches
# triton.language at every call of a nested @triton.jit function (~3 ms each), which made most of the tests' time.
device_function = (lambda fn: fn) if triton_interpreting() else triton.jit


@device_function
def state_or_zeros(ptr, offsets, mask, GIVEN: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A (ROWS, COLS) float32 state tile from ptr + offsets where GIVEN (an initial state, or the gradient of a final
    one), else zeros: the optional state a scan kernel starts or ends from."""
    if GIVEN:
        state = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros([ROWS, COLS], dtype=tl.float32)
    return state
