"""Depthwise causal conv1d: `causal_conv1d(x, weight, bias=None, activation=None, backend="auto")`.

PROVISIONAL: only the reference backend is wired so far; torch/triton/peer arrive with their files.
"""
from __future__ import annotations

from torch import Tensor

from archlab.kernels.backend import resolve_backend
from archlab.kernels.causal_conv1d.reference import causal_conv1d_reference, causal_conv1d_update_reference

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_reference"]


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  backend: str = "auto") -> Tensor:
    """x (batch, dim, L), weight (dim, width) -> out (batch, dim, L) in x's dtype."""
    resolve_backend("causal_conv1d", backend, x.device)
    return causal_conv1d_reference(x, weight, bias, activation)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None) -> Tensor:
    """One decoding step: x (batch, dim) -> (batch, dim); conv_state (batch, dim, width - 1) shifts in place."""
    return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)
