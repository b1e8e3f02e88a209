"""Rotary position embeddings (Su et al. 2021), half-split layout as in GPT-NeoX and LLaMA."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Rotates channel pairs (i, i + D/2) of q or k by angle position * theta^(-2i/D).

    The cos/sin tables are recomputed in float32 on every call rather than cached in buffers: that is
    O(L * head_dim) elementwise work beside the projections' O(L * d_model^2), needs no maximum length,
    stays float32 after model.to(bfloat16), and gives torch.compile no buffer that changes size between
    calls (a grown cache forces a recompile).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, q: Tensor, k: Tensor, offset: int = 0, positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """q (B, H, L, D) and k (B, H_kv, L, D) at absolute positions offset .. offset + L - 1, or at `positions`
        (B, L) given per row (packed documents, each starting from 0)."""
        exponents = torch.arange(0, self.head_dim, 2, device=q.device, dtype=torch.float32) / self.head_dim
        if positions is None:
            positions = torch.arange(offset, offset + q.shape[-2], device=q.device, dtype=torch.float32)
        else:
            positions = positions.to(torch.float32).unsqueeze(1)  # (B, 1, L): one angle table for all heads
        angles = positions.unsqueeze(-1) * self.theta ** -exponents
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)
