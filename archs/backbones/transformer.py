"""Pre-norm Transformer: RMSNorm, GQA self-attention with RoPE, SwiGLU MLP (the LLaMA recipe)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from archlab.archs.backbones.residual import ResidualStack, backend_for
from archlab.archs.config import ModelConfig
from archlab.archs.layers.attention import KVCache, SelfAttention
from archlab.archs.layers.mlp import SwiGLU
from archlab.archs.layers.norm import rms_norm


class Block(nn.Module):
    """x + attention(norm(x)), then + SwiGLU(norm(x)): two writes into the residual stream."""

    residual_writes = 2

    def __init__(self, cfg: ModelConfig, *, attention_backend: str = "auto"):
        super().__init__()
        self.n_kv_heads, self.head_dim = cfg.kv_heads, cfg.head_dim
        self.attn_norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, rope_theta=cfg.rope_theta,
                                  attention_backend=attention_backend)
        self.mlp_norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width)

    def forward(self, x: Tensor, *, causal: bool, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), causal=causal, cache=cache)
        return x + self.mlp(self.mlp_norm(x))

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the matmuls and attention; norms, RoPE, softmax
        and residual adds are left out (O(d) per token, negligible next to O(d^2)).

        q/k/v/o projections 2d(d + 2 d_kv) + 2d^2, SwiGLU 3 * 2dh, and attention scores plus weighted
        values 2 * 2 * ctx * d. ctx is seq_len when bidirectional; when causal it is the average attended
        length (seq_len + 1) / 2 — the work a kernel that skips fully masked blocks actually does.
        """
        d, d_kv = self.attn.q_proj.in_features, self.attn.k_proj.out_features
        projections = 2 * d * (d + 2 * d_kv) + 2 * d * d
        mlp = 3 * 2 * d * self.mlp.w_up.out_features
        # 4 * d * ctx, written so the causal count stays an integer
        scores_and_values = 2 * d * (seq_len + 1) if causal else 4 * d * seq_len
        return projections + mlp + scores_and_values


class TransformerBackbone(ResidualStack):
    """n_layers attention + SwiGLU blocks; runs causally or not as each call says."""

    kernel_ops = ("attention",)

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, kernels: Mapping[str, str] | None = None):
        # `causal` is part of the common constructor; attention takes it per call, so nothing depends on it
        attention_backend = backend_for(kernels, "attention")
        super().__init__(cfg, [Block(cfg, attention_backend=attention_backend) for _ in range(cfg.n_layers)])
