"""What every backbone here shares: pre-norm residual blocks, a final RMSNorm, per-op kernel choices.

Each block brings its own decoding state (`new_cache`), FLOP count (`flops_per_token`) and the number of
projections it writes into the residual stream (`residual_writes`), so Transformer, Mamba and hybrid
stacks differ only in which blocks they hold.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from archlab.archs.config import ModelConfig
from archlab.archs.layers.norm import rms_norm
from archlab.archs.model import Backbone
from archlab.kernels.backend import check_backend

# Linear layers whose output is added to the residual stream (attention, SwiGLU, Mamba outputs).
RESIDUAL_PROJECTIONS = ("o_proj", "w_down", "out_proj")


def backend_for(kernels: Mapping[str, str] | None, op: str) -> str:
    """The backend name chosen for `op` (missing = auto), checked so a bad name fails at construction."""
    name = (kernels or {}).get(op, "auto")
    check_backend(op, name)
    return name


def activation_dtype(weight: Tensor, device: torch.device) -> torch.dtype:
    """What layer activations will be: the autocast dtype when autocast is on, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


class ResidualStack(Backbone):
    """x -> blocks (each adds its output to x) -> RMSNorm. Blocks take (x, causal=, cache=)."""

    def __init__(self, cfg: ModelConfig, blocks: Sequence[nn.Module]):
        super().__init__()
        self.d_model, self.n_layers = cfg.d_model, len(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self._init_weights(cfg.init_std)

    def _init_weights(self, std: float) -> None:
        # GPT-2 / mamba_ssm: projections that write into the residual stream are scaled down by
        # 1/sqrt(number of such writes in the stack), so the residual's variance does not grow with depth.
        # Linear weights marked _no_reinit (Mamba's dt_proj) keep the initialisation their layer gave them.
        residual_scale = 1 / math.sqrt(sum(block.residual_writes for block in self.blocks))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not getattr(module.weight, "_no_reinit", False):
                scale = residual_scale if name.endswith(RESIDUAL_PROJECTIONS) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def forward(self, x: Tensor, *, causal: bool, cache: list | None = None) -> Tensor:
        """x: (B, L, d) -> (B, L, d). `cache` (from new_cache) is advanced past these L positions."""
        layer_caches = cache if cache is not None else [None] * self.n_layers
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, causal=causal, cache=layer_cache)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list:
        """Empty per-layer decoding state for up to max_len positions; each entry has a `.length`.

        dtype defaults to what the activations will be: the autocast dtype when autocast is on, else the weights'.
        """
        weight = self.norm.weight
        device = weight.device if device is None else torch.device(device)
        dtype = activation_dtype(weight, device) if dtype is None else dtype
        return [block.new_cache(batch_size, max_len, dtype=dtype, device=device) for block in self.blocks]

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token: the sum of the blocks' counts (see each block's flops_per_token)."""
        return sum(block.flops_per_token(seq_len, causal=causal) for block in self.blocks)
