"""Depthwise causal 1-D convolution, written out tap by tap: the definition of correct for every backend.

Layouts follow the causal-conv1d package: x (batch, dim, L), weight (dim, width), bias (dim,).
out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (width - 1) + k]), x before position 0 = 0.
With seq_idx (batch, L), the document id of each position, a tap also reads 0 where seq_idx differs from position
t's: each document is convolved as if it ran alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                            activation: str | None = None, seq_idx: Tensor | None = None) -> Tensor:
    """out (batch, dim, L) in x's dtype; float32 math (float64 stays float64), autograd differentiates it."""
    compute = torch.promote_types(x.dtype, torch.float32)
    width, length = weight.shape[1], x.shape[2]
    padded = F.pad(x.to(compute), (width - 1, 0))
    taps = [padded[:, :, k:k + length] for k in range(width)]
    if seq_idx is not None:
        # where, not a product: another document's inf or NaN must not reach this one, as when it runs alone
        taps = [torch.where(same[:, None], tap, 0.0) for tap, same in zip(taps, same_document_taps(seq_idx, width),
                                                                           strict=True)]
    out = sum(weight[:, k, None].to(compute) * tap for k, tap in enumerate(taps))
    if bias is not None:
        out = out + bias.to(compute)[:, None]
    if activation == "silu":
        out = F.silu(out)
    return out.to(x.dtype)


def same_document_taps(seq_idx: Tensor, width: int) -> list[Tensor]:
    """For each tap k, a bool (batch, L): position t - (width - 1) + k is in position t's document. Taps before
    position 0 compare with the pad value; they read x's zero padding whatever the answer."""
    length = seq_idx.shape[1]
    padded = F.pad(seq_idx, (width - 1, 0))
    return [padded[:, k:k + length] == seq_idx for k in range(width)]


def causal_conv1d_update_reference(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                                   activation: str | None = None) -> Tensor:
    """One decoding step: x (batch, dim) -> out (batch, dim).

    conv_state (batch, dim, width - 1) holds the previous width - 1 inputs, oldest first; it is shifted in
    place to end with x.
    """
    window = torch.cat([conv_state, x[..., None].to(conv_state.dtype)], dim=-1)   # (batch, dim, width)
    conv_state.copy_(window[..., 1:])
    return causal_conv1d_reference(window.to(x.dtype), weight, bias, activation)[..., -1]
