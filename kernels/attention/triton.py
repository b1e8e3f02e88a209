"""FlashAttention-2 in Triton: a fused forward and a backward that recomputes the probabilities.

Layout as in `archlab.kernels.attention`: q (B, H, Lq, D); k, v (B, H_kv, Lk, D); query head h reads kv
head h // (H // H_kv); causal masking is bottom-right aligned (query i sits at key position Lk - Lq + i). A
sliding window (causal only) lets query position p see keys p - window < j <= p; `window` is a runtime argument (one
compile serves every window) and WINDOWED a constexpr, so full attention compiles exactly as before. Packed rows
(seq_idx, Lq == Lk) keep each query to keys of its own document: DOCUMENTS is a constexpr too, and the kernels take
each position's document start and end (computed from seq_idx by torch ops, no host sync), which say both the mask
(equal starts) and the key blocks a query block can skip (kernels/attention/triton_blocks.py).

Forward, one program per (query block, query head): stream the key blocks through an online softmax that
keeps a running row max m, row sum l and an unnormalised fp32 accumulator, so the Lq x Lk score matrix
never exists in memory. It stores out = acc / l and lse = m + log(l), all the backward needs to rebuild
the probabilities P = exp(S - lse) block by block.

Backward, split as in FlashAttention-2 so that no two programs write the same output (no atomics, hence
deterministic):
  1. delta = rowsum(dO * O), the softmax-Jacobian term shared by all keys of a query row;
  2. one program per (key block, KV head) accumulates dK, dV over every query head of its GQA group and
     every query block: the group's reduction happens in registers, in a fixed order, and K/V are never
     repeated in memory;
  3. one program per (query block, query head) accumulates dQ over the key blocks.
Causal programs skip blocks that are entirely masked and only pay for the mask on the blocks that
straddle the diagonal or the ragged end of the keys; windowed programs also skip the blocks wholly before the
window and mask only the blocks that straddle its lower edge, so their work grows with window, not length;
packed rows skip the blocks outside the documents of a block's positions and mask the blocks that straddle a
document's edge.

Under TRITON_INTERPRET=1 (the CPU tests) the kernels upcast tiles to fp32 before tl.dot, because the
interpreter's bf16 dot is wrong, and fixed small blocks replace the autotuner, which needs a GPU driver.
Kernels assume a contiguous head dim and a power-of-two head_dim in HEAD_DIMS (BLOCK_D == D). Grids are flat
(kernels/common/launch.py) and offsets int64, so a big batch, head count or length neither fails to launch nor
overflows an index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from archlab.kernels.attention import TRITON_HEAD_DIMS
from archlab.kernels.attention.triton_backward import _bwd_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel
from archlab.kernels.attention.triton_blocks import LOG2E, _documents, _key_block_scores, _key_range, _load, \
    _program_block, _tile_ptrs
from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.common.launch import flat_grid

__all__ = ["flash_attn_fwd", "flash_attn_bwd", "document_bounds"]

HEAD_DIMS = TRITON_HEAD_DIMS  # BLOCK_D == D: powers of two only
# On a GPU the block sizes are autotuned. Without one (the interpreter), or with AUTOTUNE off (tests that
# would otherwise tune every new shape), FIXED_BLOCKS are used: small, so tests cross several blocks, and
# unequal, so the block bookkeeping never silently relies on BLOCK_M == BLOCK_N.
AUTOTUNE = True
FIXED_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, lo, hi, Lq, Lk, window,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, start_n, Lq, Lk, window,
                                    qk_scale, MASKED, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION, BLOCK_N,
                                    HEAD_DIM)  # s in log2 units
        # Without a window or documents every row sees key 0 in the first block, so m_new is finite from then on.
        # With them, a row may see no key of its first masked blocks: subtract 0 instead of -inf there (-inf - -inf
        # is NaN), while the running max stays the true one (a stand-in of 0 would underflow rows of very negative
        # scores).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if (WINDOWED or DOCUMENTS) and MASKED:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, DocStart, DocEnd,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = _program_block(Lq, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    kvh = h // n_groups
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, stride_qm, HEAD_DIM), rows[:, None] < Lq, UPCAST)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E
    if DOCUMENTS:  # (B, L) each, L == Lq == Lk
        DocStart += b * Lk
        DocEnd += b * Lk
    row_docs = _documents(DocStart, rows, Lq, DOCUMENTS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start, window_end, full_end, end = _key_range(start_m, Lq, Lk, window, DocStart, DocEnd, CAUSAL, WINDOWED,
                                                  DOCUMENTS, BLOCK_M, BLOCK_N)
    if WINDOWED or DOCUMENTS:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, start,
                                   window_end, Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS, UPCAST,
                                   DOT_PRECISION, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, window_end,
                               full_end, Lq, Lk, window, qk_scale, False, CAUSAL, WINDOWED, DOCUMENTS, UPCAST,
                               DOT_PRECISION, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, full_end, end,
                               Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION,
                               BLOCK_N, HEAD_DIM)

    out = acc / l_i[:, None]
    tl.store(_tile_ptrs(Out + b * stride_ob + h * stride_oh, rows, stride_om, HEAD_DIM),
             out.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)
    tl.store(Lse + bh * Lq + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=rows < Lq)


# -- launching --------------------------------------------------------------------------------------------
def _configs(block_ms, block_ns):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in block_ms for n in block_ns for w, s in ((4, 3), (8, 3))]


# Lengths rounded up to a power of two: one tuning per bucket, not per length (decoding grows Lk by one
# every step). The kernels take these as arguments only so the autotuner can key on them.
_TUNE_KEY = ["Lq_key", "Lk_key", "HEAD_DIM", "CAUSAL", "WINDOWED", "DOCUMENTS"]
# dK/dV programs own a key block and stream queries, dQ programs the reverse: the long side is the
# block a program keeps in registers.
_fwd_tuned = autotune(_configs((64, 128), (32, 64, 128)), key=_TUNE_KEY)(_fwd_kernel)
_dkdv_tuned = autotune(_configs((32, 64), (64, 128)), key=_TUNE_KEY)(_bwd_dkdv_kernel)
_dq_tuned = autotune(_configs((64, 128), (32, 64)), key=_TUNE_KEY)(_bwd_dq_kernel)


def _launch(kernel, tuned, grid, *args, **constexprs) -> None:
    """Autotuned on a GPU; FIXED_BLOCKS elsewhere (the autotuner cannot run without a GPU driver)."""
    if AUTOTUNE and args[0].is_cuda and not triton_interpreting():
        tuned[grid](*args, **constexprs)
    else:
        kernel[grid(FIXED_BLOCKS)](*args, **constexprs, **FIXED_BLOCKS)


def _tune_keys(len_q: int, len_k: int) -> tuple[int, int]:
    return triton.next_power_of_2(len_q), triton.next_power_of_2(len_k)


def _unit_stride(t: Tensor) -> Tensor:
    """Kernels take any batch/head/length strides but assume the head dim is contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _constexprs(q: Tensor, causal: bool, window: int, documents: bool) -> dict:
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton attention: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    # fp32 inputs get true fp32 dots (tf32 would cost them their point); half types use tensor cores anyway.
    return dict(HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=window > 0, DOCUMENTS=documents,
                UPCAST=triton_interpreting(),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _check_lengths(len_q: int, len_k: int, causal: bool, window: int, seq_idx: Tensor | None) -> None:
    if causal and len_q > len_k:  # the first queries would see no key at all
        raise ValueError(f"triton attention: causal needs len_q <= len_k, got {len_q} > {len_k}")
    if window < 0 or (window and not causal):
        raise ValueError(f"triton attention: window must be 0 (none) or >= 1 with causal=True, got {window}")
    if seq_idx is not None and (len_q != len_k or seq_idx.shape[-1] != len_k):
        raise ValueError(f"triton attention: seq_idx needs len_q == len_k == its length, got {len_q}, {len_k}, "
                         f"{seq_idx.shape[-1]}")


def document_bounds(seq_idx: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(start, end) int32 (B, L) from seq_idx (B, L): the first position of each position's document and the one
    after its last (a document is a run of equal ids); (None, None) without seq_idx."""
    if seq_idx is None:
        return None, None
    length = seq_idx.shape[1]
    positions = torch.arange(length, dtype=torch.int32, device=seq_idx.device).expand_as(seq_idx)
    starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)  # position t begins a document
    ends = F.pad(starts[:, 1:], (0, 1), value=True)  # position t ends one
    start = torch.where(starts, positions, 0).cummax(dim=1).values
    end = torch.where(ends, positions + 1, length).flip(1).cummin(dim=1).values.flip(1)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, window: int = 0,
                   seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns out (B, H, Lq, D) in q.dtype and lse (B, H, Lq) float32, the natural-log logsumexp of the
    scaled (and masked) scores; window 0 = none; seq_idx (B, L) the document ids of packed rows (Lq == Lk == L).
    See the module docstring for layout and causal alignment."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    (batch, n_heads, len_q, _), (n_kv_heads, len_k) = q.shape, k.shape[1:3]
    _check_lengths(len_q, len_k, causal, window, seq_idx)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, len_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_q, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _launch(_fwd_kernel, _fwd_tuned, grid, q, k, v, out, lse, *document_bounds(seq_idx),
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            n_heads, n_heads // n_kv_heads, len_q, len_k, window, scale, *_tune_keys(len_q, len_k),
            **_constexprs(q, causal, window, seq_idx is not None))
    return out, lse


def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, causal: bool,
                   scale: float, window: int = 0, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv with the shapes and dtypes of q, k, v; deterministic (no atomics)."""
    do, q, k, v, out = (_unit_stride(t) for t in (do, q, k, v, out))
    (batch, n_heads, len_q, head_dim), (n_kv_heads, len_k) = q.shape, k.shape[1:3]
    _check_lengths(len_q, len_k, causal, window, seq_idx)
    constexprs = _constexprs(q, causal, window, seq_idx is not None)
    bounds = document_bounds(seq_idx)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[flat_grid("attention", triton.cdiv(len_q, delta_block), batch * n_heads)](
        out, do, delta, *_strides(out), *_strides(do), n_heads, len_q, HEAD_DIM=head_dim, BLOCK_M=delta_block)

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    common = (n_heads, n_heads // n_kv_heads, len_q, len_k, window, scale, *_tune_keys(len_q, len_k))
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_k, meta["BLOCK_N"]), batch * n_kv_heads)  # noqa: E731
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, grid, q, k, v, do, lse, delta, dk, dv, *bounds,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            *common, **constexprs)
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_q, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _launch(_bwd_dq_kernel, _dq_tuned, grid, q, k, v, do, lse, delta, dq, *bounds,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            *common, **constexprs)
    return dq, dk, dv
