"""Pre-norm Transformer: RMSNorm, GQA self-attention with RoPE, SwiGLU MLP (the LLaMA recipe)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from archlab.archs.config import ModelConfig
from archlab.archs.layers.attention import KVCache, SelfAttention
from archlab.archs.layers.mlp import SwiGLU
from archlab.archs.layers.norm import rms_norm
from archlab.archs.model import Backbone


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_backend: str):
        super().__init__()
        self.attn_norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, rope_theta=cfg.rope_theta,
                                  attention_backend=attention_backend)
        self.mlp_norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_width)

    def forward(self, x: Tensor, *, causal: bool, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), causal=causal, cache=cache)
        return x + self.mlp(self.mlp_norm(x))


class TransformerBackbone(Backbone):
    def __init__(self, cfg: ModelConfig, attention_backend: str = "auto"):
        super().__init__()
        self.d_model, self.n_layers = cfg.d_model, cfg.n_layers
        self.n_kv_heads, self.head_dim, self.mlp_width = cfg.kv_heads, cfg.head_dim, cfg.mlp_width
        self.blocks = nn.ModuleList(Block(cfg, attention_backend) for _ in range(cfg.n_layers))
        self.norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self._init_weights(cfg.init_std)

    def _init_weights(self, std: float) -> None:
        # GPT-2: projections that write into the residual stream are scaled down by 1/sqrt(2 n_layers),
        # so the residual's variance does not grow with depth (two such writes per block).
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.n_layers) if name.endswith(("o_proj", "w_down")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)

    def forward(self, x: Tensor, *, causal: bool, cache: list[KVCache] | None = None) -> Tensor:
        """x: (B, L, d) -> (B, L, d). `cache` (from new_cache) is filled with these L positions' keys/values."""
        layer_caches = cache if cache is not None else [None] * self.n_layers
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, causal=causal, cache=layer_cache)
        return self.norm(x)

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> list[KVCache]:
        """An empty per-layer KV cache for decoding up to max_len positions.

        dtype defaults to what the keys will be: the autocast dtype when autocast is on, else the weights'.
        """
        weight = self.blocks[0].attn.k_proj.weight
        device = weight.device if device is None else torch.device(device)
        if dtype is None:
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else weight.dtype
        return [KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype=dtype, device=device)
                for _ in range(self.n_layers)]

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the matmuls and attention; norms, RoPE, softmax
        and residual adds are left out (O(d) per token, negligible next to O(d^2)).

        Per layer: q/k/v/o projections 2d(d + 2 d_kv) + 2d^2, SwiGLU 3 * 2dh, and attention scores plus
        weighted values 2 * 2 * ctx * d. ctx is seq_len when bidirectional; when causal it is the average
        attended length (seq_len + 1) / 2 — the work a kernel that skips fully masked blocks actually does.
        """
        d, d_kv = self.d_model, self.n_kv_heads * self.head_dim
        projections = 2 * d * (d + 2 * d_kv) + 2 * d * d
        mlp = 3 * 2 * d * self.mlp_width
        # 4 * d * ctx, written so the causal count stays an integer
        scores_and_values = 2 * d * (seq_len + 1) if causal else 4 * d * seq_len
        return self.n_layers * (projections + mlp + scores_and_values)
