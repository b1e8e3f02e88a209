"""The attention mixers: multi-head self-attention with grouped-query heads, RoPE and a KV cache for decoding.
Causal or bidirectional per call (the same weights); its blocks add a SwiGLU MLP by default (the LLaMA block).

`attention` sees every earlier position unless model.attention.window is set; `swa` is the same layer with a sliding
window always on (model.swa.window, default 128), so a stack can mix both: '(attention,swa*3)*2'. A window is how
many positions each query sees, itself included; it is defined for causal attention only, so a windowed layer
refuses bidirectional objectives. Its decoding cache is a ring buffer of the last `window` positions: memory bounded
by the window, not the length. RoPE is applied before caching, so cached keys keep their absolute positions.

Attention without a window runs block-causally too (`block_causal`): given a `layout` (archs/block_layout.py) it
reads the keys the layout's mask allows at the layout's RoPE positions, which block diffusion needs."""
from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Optional

import torch
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from archlab.archs.block_layout import BlockLayout
from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import (
    Mixer,
    MixerSettings,
    backend_for,
    check_documents,
    register_mixer,
    writes_residual,
)
from archlab.archs.layers.rope import RotaryEmbedding
from archlab.kernels.attention import MAX_HEAD_DIM, TRITON_HEAD_DIMS, attention


class AttentionSettings(MixerSettings):
    """model.attention"""

    section: ClassVar[str] = "attention"  # where these settings live in a config: model.<section>

    mlp: bool = Field(True, description="a SwiGLU MLP after attention in each block (the Transformer block)")
    n_heads: int = Field(4, gt=0)
    n_kv_heads: Optional[int] = Field(None, gt=0, description="grouped-query attention; None = n_heads")
    rope_theta: float = Field(10000.0, gt=0)
    window: Optional[int] = Field(None, ge=1, description="sliding window: positions each query sees, itself "
                                  "included (causal objectives only); None = all earlier positions")

    def check(self, d_model: int) -> None:
        heads = f"model.{self.section}.n_heads"
        if d_model % self.n_heads:
            raise ValueError(f"{heads}={self.n_heads} does not divide model.d_model={d_model}")
        head_dim = d_model // self.n_heads
        if head_dim % 2:
            raise ValueError(f"head dim model.d_model/{heads}={head_dim} must be even for RoPE")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dim model.d_model/{heads}={head_dim} is above {MAX_HEAD_DIM}; raise {heads}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.{self.section}.n_kv_heads={self.n_kv_heads} must divide {heads}={self.n_heads}")

    def causal_only(self) -> str | None:
        if self.window is not None:
            return (f"model.{self.section}.window={self.window}: a sliding window is defined for causal attention "
                    "only here (the window ends at each query's own position)")
        return None

    def check_kernels(self, d_model: int, kernels: Mapping[str, str]) -> None:
        head_dim = d_model // self.n_heads
        if kernels.get("attention") == "triton" and head_dim not in TRITON_HEAD_DIMS:
            raise ValueError(f"kernels.attention=triton needs a head dim (d_model/n_heads) in {TRITON_HEAD_DIMS}, "
                             f"got {head_dim}; change model.attention.n_heads or use kernels.attention=auto")

    def d_model_multiple(self) -> int:
        return 2 * self.n_heads  # whole heads of even size (RoPE rotates channel pairs)

    def narrowed(self, heads: int | None = None) -> "AttentionSettings":
        return self.model_copy(update={"n_heads": heads or max(1, self.n_heads // 2), "n_kv_heads": None})


class SlidingWindowSettings(AttentionSettings):
    """model.swa: attention whose window is always on"""

    section: ClassVar[str] = "swa"

    window: int = Field(128, ge=1, description="positions each query sees, itself included")


class KVCache:
    """Preallocated keys and values of one attention layer for up to max_len positions; `length` have been seen.

    Without a window it holds them all, position p in slot p. With one it is a ring buffer of the last
    min(window, max_len) positions, position p in slot p % capacity, so its memory is bounded by the window."""

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str, window: int | None = None):
        capacity = max_len if window is None else min(window, max_len)
        self.keys = torch.zeros(batch_size, n_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.max_len, self.window = max_len, window
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Stores k, v (B, H_kv, L, D), the L positions after those seen; returns the keys and values the new
        positions attend to, ending with these L (attention's bottom-right alignment places each query)."""
        start, end = self.length, self.length + k.shape[2]
        if k.shape[:2] != self.keys.shape[:2]:
            raise ValueError(f"KV cache was made for (batch, kv_heads)={tuple(self.keys.shape[:2])} but got "
                             f"{tuple(k.shape[:2])}; make a new cache for this batch")
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions but {end} are needed; "
                             "make the cache with a larger max_len")
        self.length = end
        if self.window is None:
            self.keys[:, :, start:end] = k
            self.values[:, :, start:end] = v
            return self.keys[:, :, :end], self.values[:, :, :end]
        capacity = self.keys.shape[2]
        if k.shape[2] > 1:  # the first new query also sees the window - 1 positions before it: read them in order
            earlier = torch.arange(max(start - self.window + 1, 0), start, device=k.device) % capacity
            k = torch.cat([self.keys.index_select(2, earlier), k], dim=2)
            v = torch.cat([self.values.index_select(2, earlier), v], dim=2)
        stored = min(end - start, capacity)
        slots = torch.arange(end - stored, end, device=k.device) % capacity
        self.keys.index_copy_(2, slots, k[:, :, -stored:])
        self.values.index_copy_(2, slots, v[:, :, -stored:])
        if end - start == 1:  # one query sees every position in the buffer: their order does not matter
            return self.keys[:, :, :min(end, capacity)], self.values[:, :, :min(end, capacity)]
        return k, v

    def read_with(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The cached keys and values followed by k, v (B, H_kv, L, D), without storing them (a block being
        denoised reads the cache but is not part of it). Full caches only."""
        if self.window is not None:
            raise ValueError("a windowed KV cache keeps no fixed layout to read without storing; block-causal "
                             "decoding needs attention without a window")
        keys, values = self.keys[:, :, :self.length], self.values[:, :, :self.length]
        return torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)


@register_mixer
class Attention(Mixer):
    name = "attention"
    settings = AttentionSettings
    kernel_ops = ("attention",)
    bidirectional = "per_call"
    block_causal = True

    def __init__(self, d_model: int, settings: AttentionSettings, *, causal: bool = True,
                 kernels: Mapping[str, str] | None = None):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        n_kv_heads = settings.n_kv_heads or settings.n_heads
        self.head_dim = d_model // settings.n_heads
        self.n_kv_heads = n_kv_heads
        self.window = settings.window
        self.attention_backend = backend_for(kernels, "attention")
        self.q_proj = nn.Linear(d_model, settings.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = writes_residual(nn.Linear(settings.n_heads * self.head_dim, d_model, bias=False))
        self.rope = RotaryEmbedding(self.head_dim, settings.rope_theta)

    def forward(self, x: Tensor, *, causal: bool, state: KVCache | None = None,
                documents: Documents | None = None, layout: BlockLayout | None = None) -> Tensor:
        """x: (B, L, d). With a cache, x holds the L positions after those already cached. With `documents`, each
        position attends within its own document only, and RoPE counts positions from each document's start.
        A block `layout` (which carries any documents itself) sets the keys each position reads and its position."""
        if documents is not None:
            check_documents(documents, state, x, "attention")
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", d=self.head_dim)
        if layout is not None:
            return self._block_causal(q, k, v, state, layout)
        offset = 0 if state is None else state.length
        q, k = self.rope(q, k, offset, positions=None if documents is None else documents.positions)
        if state is not None:
            k, v = state.append(k, v)
        out = attention(q, k, v, causal=causal, window=self.window, backend=self.attention_backend,
                        seq_idx=None if documents is None else documents.seq_idx)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))

    def _block_causal(self, q: Tensor, k: Tensor, v: Tensor, state: KVCache | None, layout: BlockLayout) -> Tensor:
        layout.check_matches(q.shape[0], q.shape[2], 0 if state is None else state.length, "attention")
        q, k = self.rope(q, k, positions=layout.positions.expand(q.shape[0], -1))
        if state is not None:
            stored = layout.store
            if stored == k.shape[2]:
                k, v = state.append(k, v)
            else:
                if stored:
                    state.append(k[:, :, :stored], v[:, :, :stored])
                k, v = state.read_with(k[:, :, stored:], v[:, :, stored:])
        mask = layout.mask
        out = attention(q, k, v, causal=False, backend=self.attention_backend,
                        mask=None if mask is None else mask.to(q.device))
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))

    def new_state(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> KVCache:
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, dtype=dtype, device=device,
                       window=self.window)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """q/k/v/o projections 2d(d + 2 d_kv) + 2d^2, and attention scores plus weighted values 2 * 2 * ctx * d.
        ctx is seq_len when bidirectional; when causal it is the average attended length, the work a kernel that
        skips fully masked blocks actually does: position p (from 1) sees min(p, window) positions, so ctx is
        (seq_len + 1) / 2 without a window (the count stays exact) and tends to the window with one (rounded
        down). Softmax and RoPE are O(d) and left out."""
        d, d_kv = self.q_proj.in_features, self.k_proj.out_features
        projections = 2 * d * (d + 2 * d_kv) + 2 * d * d
        if not causal:
            return projections + 4 * d * seq_len
        window = min(seq_len, self.window or seq_len)
        attended = window * (window + 1) // 2 + (seq_len - window) * window  # sum over positions of min(p, window)
        return projections + 4 * d * attended // seq_len

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """Keys and values of every position, or of the last `window`: grows linearly with seq_len up to it."""
        positions = seq_len if self.window is None else min(seq_len, self.window)
        return 2 * batch_size * self.n_kv_heads * positions * self.head_dim * dtype.itemsize


@register_mixer
class SlidingWindowAttention(Attention):
    """Attention with its window always on (model.swa), beside full attention in the same stack."""

    name = "swa"
    settings = SlidingWindowSettings
    block_causal = False  # its window is always on, and a window is causal
