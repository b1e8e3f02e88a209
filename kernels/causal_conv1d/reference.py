"""Depthwise causal 1-D convolution, written out tap by tap: the definition of correct for every backend.

Layouts follow the causal-conv1d package: x (batch, dim, L), weight (dim, width), bias (dim,).
out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (width - 1) + k]), x before position 0 = 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                            activation: str | None = None) -> Tensor:
    """out (batch, dim, L) in x's dtype; float32 math (float64 stays float64), autograd differentiates it."""
    compute = torch.promote_types(x.dtype, torch.float32)
    width, length = weight.shape[1], x.shape[2]
    padded = F.pad(x.to(compute), (width - 1, 0))
    out = sum(weight[:, k, None].to(compute) * padded[:, :, k:k + length] for k in range(width))
    if bias is not None:
        out = out + bias.to(compute)[:, None]
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def causal_conv1d_update_reference(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                                   activation: str | None = None) -> Tensor:
    """One decoding step: x (batch, dim) -> out (batch, dim).

    conv_state (batch, dim, width - 1) holds the previous width - 1 inputs, oldest first; it is shifted in
    place to end with x.
    """
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)   # (batch, dim, width)
    conv_state.copy_(window[..., 1:])
    return causal_conv1d_reference(window.to(x.dtype), weight, bias, activation)[..., -1]
