"""SwiGLU feed-forward: w_down(silu(w_gate x) * w_up x), no biases (Shazeer 2020, as in LLaMA)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from archlab.archs.layers.mixer import writes_residual


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, hidden, bias=False)
        self.w_up = nn.Linear(d_model, hidden, bias=False)
        self.w_down = writes_residual(nn.Linear(hidden, d_model, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
