"""Softmax attention with grouped-query heads: `attention(q, k, v, causal=..., window=None, seq_idx=None,
backend="auto")`.

Layout: q (B, H, Lq, D); k, v (B, H_kv, Lk, D) with H_kv dividing H (query head h reads kv head
h // (H / H_kv)); out (B, H, Lq, D) in q's dtype. Causal masking is bottom-right aligned (query i sits
at absolute position Lk - Lq + i), which is what decoding with a KV cache needs. A sliding window (causal only)
lets the query at position p see the `window` keys p - window < j <= p, itself included; window >= Lk is full causal
attention and runs its exact path. The Triton kernels skip the key blocks outside the window; SDPA gets a band mask.

Packed rows (issue 19): seq_idx (B, L), int32 or int64, is each position's document id in self-attention over rows
holding several documents one after another (Lq == Lk == L; decoding with a KV cache never passes it). Query i sees
key j only if seq_idx[b, i] == seq_idx[b, j], on top of the causal and window rules; causal=False gives
block-diagonal bidirectional attention. Each document then attends exactly as if it ran alone. The Triton kernels
mask by document and skip the key blocks of other documents; SDPA gets a boolean (B, 1, L, L) mask (on CPU about as
fast as is_causal; on a GPU it moves SDPA from its flash kernel to cuDNN or memory-efficient attention).

Any other pattern (issue 21: block diffusion's block-causal mask over a noisy and a clean copy of the sequence):
`mask`, a bool tensor broadcastable to (B, H, Lq, Lk), True where query i may read key j, with causal=False and no
window or seq_idx (the mask says it all). The torch, peer and reference backends take it; our Triton kernels know
only the causal, window and document rules, so `auto` runs SDPA for a mask and `triton` refuses one. Every query
must see at least one key (a row of False has no softmax).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from archlab.kernels.attention.conformance import CONFORMANCE
from archlab.kernels.attention.reference import attention_reference, same_document, visible_keys
from archlab.kernels.backend import refuse_double_backward, resolve_backend
from archlab.kernels.common.inputs import check_seq_idx
from archlab.kernels.registry import KernelBench, KernelOp, register

__all__ = ["attention", "attention_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
TRITON_HEAD_DIMS = (16, 32, 64, 128)  # what kernels/attention/triton.py compiles for
AUTO_TRITON_MIN_LEN_Q = 16
# The fused SDPA kernels a peer may use; MATH is left out so a benchmark never times the slow path.
PEER_SDPA_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
_SDPA_HAS_GQA = torch.__version__ >= (2, 5)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None = None,
              window: int | None = None, backend: str = "auto", seq_idx: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
    """Scaled dot-product attention; `scale` defaults to D ** -0.5; `window` (causal only) is how many keys each
    query sees, itself included (None = all); `seq_idx` (B, L) the document ids of packed rows (None = one document
    per row); `mask` any other pattern of visible keys (bool, True = visible). See the module docstring for layout."""
    _check_inputs(q, k, v, causal, window)
    _check_seq_idx(seq_idx, q, k)
    _check_mask(mask, q, k, causal=causal, window=window, seq_idx=seq_idx)
    if window is not None and window >= k.shape[2]:
        window = None  # every query already sees all its keys: the full causal path, exactly
    name = resolve_backend("attention", backend, q.device, q.dtype)
    if name == "triton" and q.shape[-1] not in TRITON_HEAD_DIMS:
        if backend != "auto":
            raise ValueError(f"attention: the triton backend takes head_dim in {TRITON_HEAD_DIMS}, got "
                             f"{q.shape[-1]}; choose another n_heads or backend")
        name = "torch"  # auto: our kernel does not cover this head dim, SDPA does
    if name == "triton" and mask is not None:
        if backend != "auto":
            raise ValueError("attention: the triton backend takes no explicit mask (only causal, window and "
                             "documents); use kernels.attention=torch or auto")
        name = "torch"
    if name == "triton" and backend == "auto" and (q.dtype == torch.float32 or q.shape[2] < AUTO_TRITON_MIN_LEN_Q):
        # auto takes SDPA where our kernel is the wrong tool: fp32 (exact fp32 dots, no tensor cores)
        # and decoding-sized queries (a 64-row query tile would be mostly padding)
        name = "torch"
    if name == "triton":
        return flash_attention(q, k, v, seq_idx, causal=causal, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                               window=window or 0)[0]
    if name == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale, window=window, seq_idx=seq_idx,
                                   mask=mask)[0]
    if name == "peer":  # with a mask (window, documents) SDPA leaves flash for cuDNN or memory-efficient attention
        with sdpa_kernel(PEER_SDPA_KERNELS):
            return _sdpa(q, k, v, causal=causal, scale=scale, window=window, seq_idx=seq_idx, mask=mask)
    return _sdpa(q, k, v, causal=causal, scale=scale, window=window, seq_idx=seq_idx, mask=mask)


# -- our Triton kernels as a torch.library custom op: opaque to torch.compile, differentiable ------------
# The op returns (out, lse); lse is there for tests and future fused consumers and is not differentiable.
# Custom op arguments are simple types, so window 0 stands for none here; seq_idx, an optional tensor, is positional
# (custom ops take no keyword-only tensors).
# The kernel module is imported on first use, so machines without triton can still import this package.

@torch.library.custom_op("archlab::flash_attention", mutates_args=())
def flash_attention(q: Tensor, k: Tensor, v: Tensor, seq_idx: Tensor | None = None, *, causal: bool, scale: float,
                    window: int = 0) -> tuple[Tensor, Tensor]:
    """Triton FlashAttention forward: (out (B, H, Lq, D) in q.dtype, lse (B, H, Lq) float32)."""
    from archlab.kernels.attention.triton import flash_attn_fwd

    out, lse = flash_attn_fwd(q, k, v, causal=causal, scale=scale, window=window, seq_idx=seq_idx)
    return out.contiguous(), lse.contiguous()


@flash_attention.register_fake
def _(q, k, v, seq_idx=None, *, causal, scale, window=0):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("archlab::flash_attention_backward", mutates_args=())
def flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             seq_idx: Tensor | None = None, *, causal: bool, scale: float,
                             window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Triton FlashAttention backward (deterministic: no atomics): (dq, dk, dv)."""
    from archlab.kernels.attention.triton import flash_attn_bwd

    dq, dk, dv = flash_attn_bwd(grad_out, q, k, v, out, lse, causal=causal, scale=scale, window=window,
                                seq_idx=seq_idx)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flash_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, seq_idx=None, *, causal, scale, window=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


refuse_double_backward(flash_attention_backward, "archlab::flash_attention", "kernels.attention=torch")


def _save_for_backward(ctx, inputs, keyword_only_inputs, output):
    q, k, v, seq_idx = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seq_idx)
    ctx.causal, ctx.scale = keyword_only_inputs["causal"], keyword_only_inputs["scale"]
    ctx.window = keyword_only_inputs.get("window", 0)
    ctx.mark_non_differentiable(lse)


def _flash_attention_grad(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, seq_idx = ctx.saved_tensors
    return (*flash_attention_backward(grad_out, q, k, v, out, lse, seq_idx, causal=ctx.causal, scale=ctx.scale,
                                      window=ctx.window), None)


flash_attention.register_autograd(_flash_attention_grad, setup_context=_save_for_backward)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None, window: int | None,
          seq_idx: Tensor | None, mask: Tensor | None = None) -> Tensor:
    len_q, len_k = q.shape[2], k.shape[2]
    if causal and (len_q != len_k or window is not None or seq_idx is not None):
        # SDPA's is_causal is top-left aligned and knows no window or documents; a single query at the end sees
        # every key anyway unless a window hides some.
        if len_q > 1 or window is not None:
            mask = visible_keys(len_q, len_k, window=window, device=q.device)
        causal = False
    if seq_idx is not None:
        mask = same_document(seq_idx) if mask is None else mask & same_document(seq_idx)
    n_groups = q.shape[1] // k.shape[1]
    if n_groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    if _SDPA_HAS_GQA and mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    # With a mask (window, documents) enable_gqa would leave SDPA only its math kernel (none of the fused ones a peer
    # may use): repeat the kv heads instead, as older torch needs anyway.
    k, v = (repeat(t, "b h l d -> b (h g) l d", g=n_groups) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, causal: bool, window: int | None) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"attention: {name} must be 4-D (batch, heads, length, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"attention: dtype {q.dtype} is not supported; use float32, float16 or bfloat16")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"attention: empty inputs (q {tuple(q.shape)}, k {tuple(k.shape)}); every size must be >= 1")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (batch, n_heads, len_q, head_dim), (kv_batch, n_kv_heads, len_k, kv_head_dim) = q.shape, k.shape
    if batch != kv_batch or head_dim != kv_head_dim:
        raise ValueError(f"attention: q {tuple(q.shape)} and k/v {tuple(k.shape)} must match in batch and head_dim")
    if n_heads % n_kv_heads:
        raise ValueError(f"attention: k/v heads ({n_kv_heads}) must divide q heads ({n_heads})")
    if causal and len_q > len_k:
        raise ValueError(f"attention: causal needs len_q <= len_k (queries are the last positions), "
                         f"got len_q={len_q} > len_k={len_k}")
    if head_dim > MAX_HEAD_DIM or head_dim % 2:
        raise ValueError(f"attention: head_dim must be even and at most {MAX_HEAD_DIM}, got {head_dim}")
    if window is not None:
        if not isinstance(window, int) or isinstance(window, bool):
            raise TypeError(f"attention: window must be an int (keys each query sees) or None, got {window!r}")
        if window < 1:
            raise ValueError(f"attention: window must be >= 1 (keys each query sees, itself included), got {window}")
        if not causal:
            raise ValueError("attention: a window needs causal=True: it counts the keys up to each query's own "
                             "position, which a bidirectional query does not have")


def _check_mask(mask: Tensor | None, q: Tensor, k: Tensor, *, causal: bool, window: int | None,
                seq_idx: Tensor | None) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attention: mask must be a bool tensor (True = visible), got {getattr(mask, 'dtype', mask)}")
    if causal or window is not None or seq_idx is not None:
        raise ValueError("attention: an explicit mask comes alone: pass causal=False, no window and no seq_idx, and "
                         "put those rules into the mask")
    try:
        torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    except RuntimeError:
        raise ValueError(f"attention: mask of shape {tuple(mask.shape)} does not broadcast to (batch, heads, len_q, "
                         f"len_k) = {(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}") from None
    if mask.device != q.device:
        raise ValueError(f"attention: mask is on {mask.device} but q on {q.device}; move it")


def _check_seq_idx(seq_idx: Tensor | None, q: Tensor, k: Tensor) -> None:
    if seq_idx is None:
        return
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: seq_idx (packed documents) needs self-attention, len_q == len_k, got "
                         f"{q.shape[2]} and {k.shape[2]}; decoding with a KV cache passes no seq_idx")
    check_seq_idx("attention", seq_idx, q.shape[0], q.shape[2], q.device)


register(KernelOp(  # auto on CUDA: SDPA, until a committed benchmark shows our kernel as fast (kernels/measured.py)
    name="attention", backends=("triton", "torch", "reference", "peer"), auto_on_cuda="torch",
    layout="q (batch, heads, len_q, head_dim); k, v (batch, kv_heads, len_k, head_dim); out like q",
    dispatch=attention, reference=partial(attention, backend="reference"), conformance=CONFORMANCE,
    bench=KernelBench("attention", "archlab.kernels.bench.attention:bench_attention", "Triton kernel vs SDPA; CUDA")))
