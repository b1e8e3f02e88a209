"""Hybrid backbone (as Jamba, or mamba_ssm's MixerModel with attn_layer_idx): Mamba blocks, with the
Transformer's attention (RoPE) + SwiGLU block at the indices in model.attn_layers; one final RMSNorm."""
from __future__ import annotations

from collections.abc import Mapping

from archlab.archs.backbones.mamba import MambaBlock
from archlab.archs.backbones.residual import ResidualStack, backend_for
from archlab.archs.backbones.transformer import Block
from archlab.archs.config import ModelConfig


class HybridBackbone(ResidualStack):
    """Decoding state is a per-layer list mixing KVCache (attention) and MambaState (Mamba) entries."""

    kernel_ops = ("attention", "selective_scan", "causal_conv1d")

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, kernels: Mapping[str, str] | None = None):
        attention_backend = backend_for(kernels, "attention")
        attn_layers = set(cfg.attn_layers or ())
        super().__init__(cfg, [Block(cfg, attention_backend=attention_backend) if i in attn_layers
                               else MambaBlock(cfg, causal=causal, kernels=kernels) for i in range(cfg.n_layers)])
