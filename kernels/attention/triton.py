"""FlashAttention-2 in Triton: a fused forward and a backward that recomputes the probabilities.

Layout as in `archlab.kernels.attention`: q (B, H, Lq, D); k, v (B, H_kv, Lk, D); query head h reads kv
head h // (H // H_kv); causal masking is bottom-right aligned (query i sits at key position Lk - Lq + i). A
sliding window (causal only) lets query position p see keys p - window < j <= p; `window` is a runtime argument (one
compile serves every window) and WINDOWED a constexpr, so full attention compiles exactly as before.

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
window and mask only the blocks that straddle its lower edge, so their work grows with window, not length.

Under TRITON_INTERPRET=1 (the CPU tests) the kernels upcast tiles to fp32 before tl.dot, because the
interpreter's bf16 dot is wrong, and fixed small blocks replace the autotuner, which needs a GPU driver.
Kernels assume a contiguous head dim and a power-of-two head_dim in HEAD_DIMS (BLOCK_D == D). Grids are flat
(kernels/common/launch.py) and offsets int64, so a big batch, head count or length neither fails to launch nor
overflows an index.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from archlab.kernels.attention import TRITON_HEAD_DIMS
from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.common.launch import flat_grid

__all__ = ["flash_attn_fwd", "flash_attn_bwd"]

HEAD_DIMS = TRITON_HEAD_DIMS  # BLOCK_D == D: powers of two only
# On a GPU the block sizes are autotuned. Without one (the interpreter), or with AUTOTUNE off (tests that
# would otherwise tune every new shape), FIXED_BLOCKS are used: small, so tests cross several blocks, and
# unequal, so the block bookkeeping never silently relies on BLOCK_M == BLOCK_N.
AUTOTUNE = True
FIXED_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32}
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) == exp2(x * log2(e)), and exp2 is the native instruction


# -- shared pieces ----------------------------------------------------------------------------------------
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
def _visible(rows, cols, Lq, Lk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr):
    """Which (query row, key col) scores exist: the key is real and, if causal, not after the query; if
    windowed, also fewer than `window` positions before it."""
    mask = cols < Lk
    if CAUSAL:
        mask = mask & (cols <= rows + (Lk - Lq))
    if WINDOWED:
        mask = mask & (cols > rows + (Lk - Lq) - window)
    return mask


@triton.jit
def _key_range(start_m, Lq, Lk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For query rows [start_m, start_m + BLOCK_M), key blocks from `start` to `end` in three runs: keys in
    [start, window_end) need the window's mask, every row sees all keys in [window_end, full_end), keys in
    [full_end, end) need the causal mask; keys outside [start, end) are seen by no row. All but `end` are
    block boundaries; without a window start == window_end == 0."""
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
    return start, window_end, full_end, end


@triton.jit
def _query_range(start_n, Lq, Lk, window, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For keys [start_n, start_n + BLOCK_N), query rows from `lo` to `end` in three runs (block boundaries):
    rows in [lo, mid) need the causal mask, rows in [mid, full_end) see all of the keys, rows in [full_end, end)
    need the window's mask; rows outside [lo, end) see none of them. Without a window full_end == end."""
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
    return lo, mid, full_end, end


@triton.jit
def _key_block_scores(q, K, V, stride_kn, stride_vn, rows, start_n, Lq, Lk, window, qk_scale, MASKED: tl.constexpr,
                      CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The key block at start_n: its K and V tiles and the (masked) scores q K^T * qk_scale."""
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load(_tile_ptrs(K, cols, stride_kn, HEAD_DIM), cols[:, None] < Lk, UPCAST)
    v = _load(_tile_ptrs(V, cols, stride_vn, HEAD_DIM), cols[:, None] < Lk, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(_visible(rows[:, None], cols[None, :], Lq, Lk, window, CAUSAL, WINDOWED), s, float("-inf"))
    return k, v, s


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, lo, hi, Lq, Lk, window, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kn, stride_vn, rows, start_n, Lq, Lk, window, qk_scale, MASKED,
                                    CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)  # s in log2 units
        # Without a window every row sees key 0 in the first block, so m_new is finite from then on. With one,
        # a row may see no key of its first masked blocks: subtract 0 instead of -inf there (-inf - -inf is NaN),
        # while the running max stays the true one (a stand-in of 0 would underflow rows of very negative scores).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = m_new
        if WINDOWED and MASKED:
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = _program_block(Lq, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    kvh = h // n_groups
    rows = start_m + tl.arange(0, BLOCK_M)
    q = _load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, stride_qm, HEAD_DIM), rows[:, None] < Lq, UPCAST)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start, window_end, full_end, end = _key_range(start_m, Lq, Lk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, start, window_end, Lq, Lk,
                                   window, qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, window_end, full_end, Lq, Lk,
                               window, qk_scale, False, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, K, V, stride_kn, stride_vn, rows, full_end, end, Lq, Lk,
                               window, qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)

    out = acc / l_i[:, None]
    tl.store(_tile_ptrs(Out + b * stride_ob + h * stride_oh, rows, stride_om, HEAD_DIM),
             out.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)
    tl.store(Lse + bh * Lq + rows, (m_i + tl.log2(l_i)) / LOG2E, mask=rows < Lq)


# -- backward ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_delta_kernel(Out, dOut, Delta, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                      n_heads, Lq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m, bh = _program_block(Lq, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    rows = start_m + tl.arange(0, BLOCK_M)
    mask = rows[:, None] < Lq
    o = tl.load(_tile_ptrs(Out + b * stride_ob + h * stride_oh, rows, stride_om, HEAD_DIM), mask=mask)
    do = tl.load(_tile_ptrs(dOut + b * stride_dob + h * stride_doh, rows, stride_dom, HEAD_DIM), mask=mask)
    tl.store(Delta + bh * Lq + rows, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rows < Lq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, dO, Lse, Delta, stride_qm, stride_dom, cols, lo, hi, Lq, Lk, window, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load(_tile_ptrs(Q, rows, stride_qm, HEAD_DIM), rows[:, None] < Lq, UPCAST)
        do = _load(_tile_ptrs(dO, rows, stride_dom, HEAD_DIM), rows[:, None] < Lq, UPCAST)
        # Padded query rows get lse = +inf: their probabilities are exactly 0, so they need no mask.
        lse = tl.load(Lse + rows, mask=rows < Lq, other=float("inf")) * LOG2E
        delta = tl.load(Delta + rows, mask=rows < Lq, other=0.0)
        # Work on S^T (keys x queries): dK and dV then come out of plain dots with this block's rows.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s_t = tl.where(_visible(rows[None, :], cols[:, None], Lq, Lk, window, CAUSAL, WINDOWED), s_t,
                           float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bkv = _program_block(Lk, BLOCK_N)
    n_kv_heads = n_heads // n_groups
    b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    kv_mask = cols[:, None] < Lk
    k = _load(_tile_ptrs(K + b * stride_kb + kvh * stride_kh, cols, stride_kn, HEAD_DIM), kv_mask, UPCAST)
    v = _load(_tile_ptrs(V + b * stride_vb + kvh * stride_vh, cols, stride_vn, HEAD_DIM), kv_mask, UPCAST)
    qk_scale = scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, mid, full_end, end = _query_range(start_n, Lq, Lk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    for g in range(n_groups):  # the query heads that read this kv head, summed in a fixed order
        h = kvh * n_groups + g
        Q_h = Q + b * stride_qb + h * stride_qh
        dO_h = dOut + b * stride_dob + h * stride_doh
        Lse_h = Lse + (b * n_heads + h) * Lq
        Delta_h = Delta + (b * n_heads + h) * Lq
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, lo, mid, Lq,
                             Lk, window, qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, mid, full_end,
                             Lq, Lk, window, qk_scale, False, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_M,
                             HEAD_DIM)
        if WINDOWED:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, full_end,
                                 end, Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION,
                                 BLOCK_M, HEAD_DIM)

    dk *= scale  # S = scale * Q K^T
    tl.store(_tile_ptrs(dK + b * stride_dkb + kvh * stride_dkh, cols, stride_dkn, HEAD_DIM),
             dk.to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(dV + b * stride_dvb + kvh * stride_dvh, cols, stride_dvn, HEAD_DIM),
             dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, lo, hi, Lq, Lk, window, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kn, stride_vn, rows, start_n, Lq, Lk, window, qk_scale, MASKED,
                                    CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)  # s in log2 units
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, dQ,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, UPCAST: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, bh = _program_block(Lq, BLOCK_M)
    b, h = bh // n_heads, bh % n_heads
    kvh = h // n_groups
    rows = start_m + tl.arange(0, BLOCK_M)
    row_mask = rows[:, None] < Lq
    q = _load(_tile_ptrs(Q + b * stride_qb + h * stride_qh, rows, stride_qm, HEAD_DIM), row_mask, UPCAST)
    do = _load(_tile_ptrs(dOut + b * stride_dob + h * stride_doh, rows, stride_dom, HEAD_DIM), row_mask, UPCAST)
    lse = tl.load(Lse + bh * Lq + rows, mask=rows < Lq, other=0.0) * LOG2E
    delta = tl.load(Delta + bh * Lq + rows, mask=rows < Lq, other=0.0)
    K += b * stride_kb + kvh * stride_kh
    V += b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start, window_end, full_end, end = _key_range(start_m, Lq, Lk, window, CAUSAL, WINDOWED, BLOCK_M, BLOCK_N)
    if WINDOWED:
        dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, start, window_end, Lq, Lk, window,
                       qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, window_end, full_end, Lq, Lk, window,
                   qk_scale, False, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, full_end, end, Lq, Lk, window,
                   qk_scale, True, CAUSAL, WINDOWED, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    dq *= scale
    tl.store(_tile_ptrs(dQ + b * stride_dqb + h * stride_dqh, rows, stride_dqm, HEAD_DIM),
             dq.to(dQ.dtype.element_ty), mask=row_mask)


# -- launching --------------------------------------------------------------------------------------------
def _configs(block_ms, block_ns):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in block_ms for n in block_ns for w, s in ((4, 3), (8, 3))]


# Lengths rounded up to a power of two: one tuning per bucket, not per length (decoding grows Lk by one
# every step). The kernels take these as arguments only so the autotuner can key on them.
_TUNE_KEY = ["Lq_key", "Lk_key", "HEAD_DIM", "CAUSAL", "WINDOWED"]
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


def _constexprs(q: Tensor, causal: bool, window: int) -> dict:
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"triton attention: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    # fp32 inputs get true fp32 dots (tf32 would cost them their point); half types use tensor cores anyway.
    return dict(HEAD_DIM=head_dim, CAUSAL=causal, WINDOWED=window > 0, UPCAST=triton_interpreting(),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _check_lengths(len_q: int, len_k: int, causal: bool, window: int) -> None:
    if causal and len_q > len_k:  # the first queries would see no key at all
        raise ValueError(f"triton attention: causal needs len_q <= len_k, got {len_q} > {len_k}")
    if window < 0 or (window and not causal):
        raise ValueError(f"triton attention: window must be 0 (none) or >= 1 with causal=True, got {window}")


def flash_attn_fwd(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float,
                   window: int = 0) -> tuple[Tensor, Tensor]:
    """Returns out (B, H, Lq, D) in q.dtype and lse (B, H, Lq) float32, the natural-log logsumexp of the
    scaled (and masked) scores; window 0 = none. See the module docstring for layout and causal alignment."""
    q, k, v = (_unit_stride(t) for t in (q, k, v))
    (batch, n_heads, len_q, _), (n_kv_heads, len_k) = q.shape, k.shape[1:3]
    _check_lengths(len_q, len_k, causal, window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, n_heads, len_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_q, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _launch(_fwd_kernel, _fwd_tuned, grid, q, k, v, out, lse,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            n_heads, n_heads // n_kv_heads, len_q, len_k, window, scale, *_tune_keys(len_q, len_k),
            **_constexprs(q, causal, window))
    return out, lse


def flash_attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *, causal: bool,
                   scale: float, window: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Returns dq, dk, dv with the shapes and dtypes of q, k, v; deterministic (no atomics)."""
    do, q, k, v, out = (_unit_stride(t) for t in (do, q, k, v, out))
    (batch, n_heads, len_q, head_dim), (n_kv_heads, len_k) = q.shape, k.shape[1:3]
    _check_lengths(len_q, len_k, causal, window)
    constexprs = _constexprs(q, causal, window)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[flat_grid("attention", triton.cdiv(len_q, delta_block), batch * n_heads)](
        out, do, delta, *_strides(out), *_strides(do), n_heads, len_q, HEAD_DIM=head_dim, BLOCK_M=delta_block)

    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    common = (n_heads, n_heads // n_kv_heads, len_q, len_k, window, scale, *_tune_keys(len_q, len_k))
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_k, meta["BLOCK_N"]), batch * n_kv_heads)  # noqa: E731
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, grid, q, k, v, do, lse, delta, dk, dv,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
            *common, **constexprs)
    grid = lambda meta: flat_grid("attention", triton.cdiv(len_q, meta["BLOCK_M"]), batch * n_heads)  # noqa: E731
    _launch(_bwd_dq_kernel, _dq_tuned, grid, q, k, v, do, lse, delta, dq,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            *common, **constexprs)
    return dq, dk, dv
