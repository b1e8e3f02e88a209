"""The one backbone: pre-norm residual blocks, one per entry of model.layers, then a final RMSNorm.

A block is x + mixer(norm(x)), then x + SwiGLU(mlp_norm(x)) where the mixer's settings ask for an MLP
(attention: yes, the Transformer block; Mamba: no, mamba_ssm's block). Transformer, Mamba and hybrid stacks
differ only in their pattern; each mixer brings its decoding state, FLOP count and state size.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from archlab.archs.block_layout import BlockLayout
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import MIXERS, Mixer, MixerSettings
from archlab.archs.layers.mlp import SwiGLU
from archlab.archs.layers.norm import rms_norm
from archlab.archs.model import Backbone

# Blocks were attention-specific before the mixer registry (archlab <= 02f8241): their keys are renamed on load.
LEGACY_BLOCK_KEYS = {"attn_norm.": "norm.", "attn.": "mixer."}


def activation_dtype(weight: Tensor, device: torch.device) -> torch.dtype:
    """What layer activations will be: the autocast dtype when autocast is on, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


class Block(nn.Module):
    """x + mixer(norm(x)) [+ SwiGLU(mlp_norm(x))]."""

    def __init__(self, mixer: type[Mixer], d_model: int, settings: MixerSettings, *, causal: bool,
                 kernels: Mapping[str, str] | None, norm_eps: float, mlp_width: int):
        super().__init__()
        self.norm = rms_norm(d_model, norm_eps)
        self.mixer = mixer(d_model, settings, causal=causal, kernels=kernels)
        if settings.mlp:
            self.mlp_norm = rms_norm(d_model, norm_eps)
            self.mlp = SwiGLU(d_model, mlp_width)
        else:
            self.mlp_norm = self.mlp = None
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)

    def forward(self, x: Tensor, *, causal: bool, cache=None, documents: Documents | None = None,
                layout: BlockLayout | None = None) -> Tensor:
        # only block-causal mixers take a layout (the objective that passes one has checked the stack)
        extra = {} if layout is None else {"layout": layout}
        x = x + self.mixer(self.norm(x), causal=causal, state=cache, documents=documents, **extra)
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device):
        return self.mixer.new_state(batch_size, max_len, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """The mixer's count plus SwiGLU's 3 * 2 d h; norms and residual adds are O(d) and left out."""
        mlp = 0 if self.mlp is None else 3 * 2 * self.mlp.w_up.in_features * self.mlp.w_up.out_features
        return self.mixer.flops_per_token(seq_len, causal=causal) + mlp

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.mixer.state_bytes(batch_size, seq_len, dtype=dtype)


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    for old, new in LEGACY_BLOCK_KEYS.items():
        for key in [k for k in state_dict if k.startswith(prefix + old)]:
            state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class ResidualStack(Backbone):
    """x -> blocks (each adds its outputs to x) -> RMSNorm; causal or not as each call says, with the weights
    of mixers whose bidirectional form differs (Mamba) built for `causal`."""

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, kernels: Mapping[str, str] | None = None):
        super().__init__()
        names = cfg.layer_mixers
        self.d_model, self.n_layers = cfg.d_model, len(names)
        self.blocks = nn.ModuleList(
            Block(MIXERS[name], cfg.d_model, cfg.mixer_settings(name), causal=causal, kernels=kernels,
                  norm_eps=cfg.norm_eps, mlp_width=cfg.mlp_width) for name in names)
        self.norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.kernel_ops = tuple(dict.fromkeys(op for name in names for op in MIXERS[name].kernel_ops))
        self._init_weights(cfg.init_std)

    def _init_weights(self, std: float) -> None:
        # GPT-2 / mamba_ssm: projections that write into the residual stream (marked by their mixer or MLP with
        # layers.mixer.writes_residual) are scaled down by 1/sqrt(number of such writes in the stack), so the
        # residual's variance does not grow with depth. Weights marked _no_reinit (Mamba's dt_proj) keep the
        # initialisation their layer gave them.
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        residual_scale = 1 / math.sqrt(sum(getattr(m, "writes_residual", False) for m in linears))
        for module in linears:
            if not getattr(module.weight, "_no_reinit", False):
                scale = residual_scale if getattr(module, "writes_residual", False) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def forward(self, x: Tensor, *, causal: bool, cache: list | None = None,
                documents: Documents | None = None, layout: BlockLayout | None = None) -> Tensor:
        """x: (B, L, d) -> (B, L, d). `cache` (from new_cache) is advanced past these L positions (unless a
        `layout` says not to store them); `documents` keeps packed documents apart in every layer; a block `layout`
        (block-causal mixers only) sets what each position reads."""
        layer_caches = cache if cache is not None else [None] * self.n_layers
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, causal=causal, cache=layer_cache, documents=documents, layout=layout)
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
        """Forward FLOPs per token: the sum of the blocks' counts (see each mixer's flops_per_token)."""
        return sum(block.flops_per_token(seq_len, causal=causal) for block in self.blocks)

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """Decoding state of every block after seq_len positions."""
        return sum(block.state_bytes(batch_size, seq_len, dtype=dtype) for block in self.blocks)
