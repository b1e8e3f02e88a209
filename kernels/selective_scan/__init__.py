"""Mamba-1 selective scan: `selective_scan(u, delta, A, B, C, ..., backend="auto")` (see reference.py).

PROVISIONAL: only the reference backend is wired so far; torch/triton/peer arrive with their files.
"""
from __future__ import annotations

from torch import Tensor

from archlab.kernels.backend import resolve_backend
from archlab.kernels.selective_scan.reference import selective_scan_reference, selective_state_update_reference

__all__ = ["selective_scan", "selective_state_update", "selective_scan_reference"]


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """out (batch, dim, L) in u's dtype, or (out, last state (batch, dim, N) float32) with return_last_state."""
    resolve_backend("selective_scan", backend, u.device)
    out, last_state = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decoding step: updates state (batch, dim, N) float32 in place, returns y (batch, dim) in x's dtype."""
    return selective_state_update_reference(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
