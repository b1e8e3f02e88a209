"""Softmax attention in plain float32 PyTorch: the definition of correct for every other backend."""
from __future__ import annotations

import torch
from einops import rearrange, repeat
from torch import Tensor


def visible_keys(len_q: int, len_k: int, *, window: int | None, device) -> Tensor:
    """(len_q, len_k) bool: which keys each query sees under the bottom-right aligned causal mask, and, with a
    window, only the last `window` of them (query i at position p = len_k - len_q + i sees p - window < j <= p)."""
    visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(diagonal=len_k - len_q)
    return visible if window is None else visible.triu(diagonal=len_k - len_q - window + 1)


def same_document(seq_idx: Tensor) -> Tensor:
    """(B, 1, L, L) bool from seq_idx (B, L): which positions of a packed row share a document (ids never repeat
    in separate runs of a row, so equal ids are one document)."""
    return rearrange(seq_idx, "b q -> b 1 q 1") == rearrange(seq_idx, "b k -> b 1 1 k")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None,
                        window: int | None = None, seq_idx: Tensor | None = None,
                        mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) float32 log-sum-exp of the scores.

    q is (B, H, Lq, D), k and v are (B, H_kv, Lk, D); query head h reads kv head h // (H / H_kv).
    Causal masking is bottom-right aligned: query i sits at absolute position Lk - Lq + i (as in
    FlashAttention), so a block of new queries attends to the whole KV cache before it. A window (causal only)
    keeps each query to the last `window` keys up to its own position. seq_idx (B, L), with Lq == Lk == L, is
    each position's document id in packed rows: a query sees only keys of its own document, on top of the rest.
    mask, bool and broadcastable to (B, H, Lq, Lk), hides the keys where it is False (any other pattern).
    Math runs in float32 (float64 inputs stay float64, for gradcheck), and so does lse; autograd
    differentiates it.
    """
    n_groups = q.shape[1] // k.shape[1]
    k, v = (repeat(t, "b h l d -> b (h g) l d", g=n_groups) for t in (k, v))
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(compute_dtype), k.to(compute_dtype)) * scale
    if causal:
        visible = visible_keys(*scores.shape[-2:], window=window, device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
    if seq_idx is not None:
        scores = scores.masked_fill(~same_document(seq_idx), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = scores.logsumexp(dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.to(compute_dtype))
    return out.to(q.dtype), lse
