"""Tiles and block bookkeeping shared by the Triton attention kernels (kernels/attention/triton.py): which key
blocks a query block needs (and which of them need a mask), which query blocks a key block needs, and the mask.

With DOCUMENTS (packed rows, Lq == Lk) the kernels get DocStart and DocEnd (B, L) int32: the first position of each
position's document and the position after its last. Positions share a document iff their starts are equal (the
same as equal seq_idx: ids never repeat in separate runs of a row), and a block of positions only needs the other
side's positions between its first position's document start and its last position's document end.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * log2(e)), and exp2 is the native instruction


@triton.jit
def _load(ptrs, mask, UPCAST: tl.constexpr):
    """Masked tile load, zero-padded; UPCAST dodges the interpreter's bf16 tl.dot."""
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _tile_ptrs(base, rows, stride_row, HEAD_DIM: tl.constexpr):
    """Pointers to the (rows, head dim) tile at base. The row offsets are int64: in a (batch, length, heads, dim)
    layout rows * stride_row overflows int32 once length * heads * head_dim reaches 2**31."""
    return base + rows.to(tl.int64)[:, None] * stride_row + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _program_block(length, BLOCK: tl.constexpr):
    """This program's (first position of its block, batch * head index). The grid is flat, blocks fastest
    (kernels/common/launch.py: CUDA caps grid axis 1 at 65535); the index is int64 as its offsets overflow int32."""
    n_blocks = tl.cdiv(length, BLOCK)
    return tl.program_id(0) % n_blocks * BLOCK, (tl.program_id(0) // n_blocks).to(tl.int64)


@triton.jit
def _documents(DocStart, positions, length, DOCUMENTS: tl.constexpr):
    """The document (its start) of each position; past the end the last position's, so that padded query rows see a
    key and stay finite. Without documents the positions (unused: the compiler drops them)."""
    if DOCUMENTS:
        return tl.load(DocStart + tl.minimum(positions, length - 1))
    return positions


@triton.jit
def _visible(rows, cols, Lq, Lk, window, row_docs, col_docs, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
             DOCUMENTS: tl.constexpr):
    """Which (query row, key col) scores exist: the key is real and, if causal, not after the query; if
    windowed, also fewer than `window` positions before it; with documents, in the query's document (row_docs and
    col_docs are _documents of rows and cols, shaped like them)."""
    mask = cols < Lk
    if CAUSAL:
        mask = mask & (cols <= rows + (Lk - Lq))
    if WINDOWED:
        mask = mask & (cols > rows + (Lk - Lq) - window)
    if DOCUMENTS:
        mask = mask & (row_docs == col_docs)
    return mask


@triton.jit
def _clip_to_documents(lo, full_lo, full_hi, hi, DocStart, DocEnd, first, last, BLOCK: tl.constexpr):
    """Narrows the runs [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked over the other side's
    positions to those the documents of positions first..last (one block) can see: every position of the unmasked run
    must share a document with all of them. Run bounds stay block boundaries (but hi) and in order."""
    first_start, last_start = tl.load(DocStart + first), tl.load(DocStart + last)
    first_end, last_end = tl.load(DocEnd + first), tl.load(DocEnd + last)
    lo = tl.maximum(lo, first_start // BLOCK * BLOCK)
    hi = tl.maximum(tl.minimum(hi, last_end), lo)
    full_lo = tl.minimum(tl.maximum(tl.maximum(full_lo, tl.cdiv(last_start, BLOCK) * BLOCK), lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, first_end // BLOCK * BLOCK), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _key_range(start_m, Lq, Lk, window, DocStart, DocEnd, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
               DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M), key blocks from `start` to `end` in three runs: keys in
    [start, window_end) need a mask (the window's, or the documents'), every row sees all keys in
    [window_end, full_end), keys in [full_end, end) need a mask (causal, or the documents'); keys outside
    [start, end) are seen by no row. All but `end` are block boundaries; without a window or documents
    start == window_end == 0."""
    if CAUSAL:
        end = tl.minimum(start_m + BLOCK_M + (Lk - Lq), Lk)
        full_end = tl.minimum(start_m + 1 + (Lk - Lq), Lk) // BLOCK_N * BLOCK_N
    else:
        end = Lk
        full_end = Lk // BLOCK_N * BLOCK_N
    start = 0
    window_end = 0
    if WINDOWED:  # the first row's window starts earliest, the last row's latest
        start = tl.maximum(start_m + (Lk - Lq) - window + 1, 0) // BLOCK_N * BLOCK_N
        last_row_start = tl.maximum(start_m + BLOCK_M - 1 + (Lk - Lq) - window + 1, 0)
        window_end = tl.minimum(tl.cdiv(last_row_start, BLOCK_N) * BLOCK_N, full_end)
    if DOCUMENTS:
        start, window_end, full_end, end = _clip_to_documents(start, window_end, full_end, end, DocStart, DocEnd,
                                                              start_m, tl.minimum(start_m + BLOCK_M, Lq) - 1, BLOCK_N)
    return start, window_end, full_end, end


@triton.jit
def _query_range(start_n, Lq, Lk, window, DocStart, DocEnd, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 DOCUMENTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For keys [start_n, start_n + BLOCK_N), query rows from `lo` to `end` in three runs (block boundaries, but
    `end` with documents): rows in [lo, mid) need a mask (causal, or the documents'), rows in [mid, full_end) see all
    of the keys, rows in [full_end, end) need a mask (the window's, or the documents'); rows outside [lo, end) see
    none of them. Without a window or documents full_end == end."""
    end = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # key j is seen by query rows i >= j - (Lk - Lq)
        lo = tl.maximum(start_n - (Lk - Lq), 0) // BLOCK_M * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - (Lk - Lq), 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, end)
    else:
        lo = 0
        mid = 0
    full_end = end
    if WINDOWED:  # and key j by rows i < j - (Lk - Lq) + window: the block's first key leaves the window first
        last_key_until = tl.maximum(start_n + BLOCK_N - 1 - (Lk - Lq) + window, 0)  # rows before it see some key
        first_key_until = tl.maximum(start_n - (Lk - Lq) + window, 0)  # rows before it see every key
        end = tl.maximum(tl.minimum(tl.cdiv(last_key_until, BLOCK_M) * BLOCK_M, end), mid)
        full_end = tl.minimum(tl.maximum(first_key_until // BLOCK_M * BLOCK_M, mid), end)
    if DOCUMENTS:
        lo, mid, full_end, end = _clip_to_documents(lo, mid, full_end, end, DocStart, DocEnd,
                                                    start_n, tl.minimum(start_n + BLOCK_N, Lk) - 1, BLOCK_M)
    return lo, mid, full_end, end


@triton.jit
def _key_block_scores(q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, start_n, Lq, Lk, window, qk_scale,
                      MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
                      UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                      HEAD_DIM: tl.constexpr):
    """The key block at start_n: its K and V tiles and the (masked) scores q K^T * qk_scale."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load(_tile_ptrs(K, cols, stride_kn, HEAD_DIM), cols[:, None] < Lk, UPCAST)
    v = _load(_tile_ptrs(V, cols, stride_vn, HEAD_DIM), cols[:, None] < Lk, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        col_docs = _documents(DocStart, cols, Lk, DOCUMENTS)
        visible = _visible(rows[:, None], cols[None, :], Lq, Lk, window, row_docs[:, None], col_docs[None, :],
                           CAUSAL, WINDOWED, DOCUMENTS)
        s = tl.where(visible, s, float("-inf"))
    return k, v, s
