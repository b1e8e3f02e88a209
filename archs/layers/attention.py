"""Multi-head self-attention with grouped-query heads, RoPE and an optional KV cache for decoding."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from archlab.archs.layers.rope import RotaryEmbedding
from archlab.kernels.attention import attention
from archlab.kernels.backend import check_backend


class KVCache:
    """Preallocated keys and values of one attention layer; the first `length` positions are filled."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        self.keys = torch.zeros(batch_size, n_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v (B, H_kv, L, D) after the filled positions; returns the keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if k.shape[:2] != self.keys.shape[:2]:
            raise ValueError(f"KV cache was made for (batch, kv_heads)={tuple(self.keys.shape[:2])} but got "
                             f"{tuple(k.shape[:2])}; make a new cache for this batch")
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                             "make the cache with a larger max_len")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, rope_theta: float,
                 attention_backend: str = "auto"):
        super().__init__()
        check_backend("attention", attention_backend)
        self.head_dim = d_model // n_heads
        self.attention_backend = attention_backend
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, rope_theta)

    def forward(self, x: Tensor, *, causal: bool, cache: KVCache | None = None) -> Tensor:
        """x: (B, L, d). With a cache, x holds the L positions after those already cached."""
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        offset = 0 if cache is None else cache.length
        q, k = self.rope(q, k, offset)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, causal=causal, backend=self.attention_backend)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))
