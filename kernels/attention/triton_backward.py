"""The backward kernels of the Triton FlashAttention (kernels/attention/triton.py launches them; its docstring has
the scheme): delta = rowsum(dO * O), then dK and dV per key block, then dQ per query block."""
from __future__ import annotations

import triton
import triton.language as tl

from archlab.kernels.attention.triton_blocks import (LOG2E, _documents, _key_block_scores, _key_range, _load,
                                                     _program_block, _query_range, _tile_ptrs, _visible)


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
def _dkdv_inner(dk, dv, k, v, Q, dO, Lse, Delta, stride_qm, stride_dom, cols, col_docs, DocStart, lo, hi, Lq, Lk,
                window, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                DOCUMENTS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                HEAD_DIM: tl.constexpr):
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
            row_docs = _documents(DocStart, rows, Lq, DOCUMENTS)
            visible = _visible(rows[None, :], cols[:, None], Lq, Lk, window, row_docs[None, :], col_docs[:, None],
                               CAUSAL, WINDOWED, DOCUMENTS)
            s_t = tl.where(visible, s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # softmax backward: dS = P * (dP - rowsum(dO * O))
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, DocStart, DocEnd,
                     stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                     stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                     n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n, bkv = _program_block(Lk, BLOCK_N)
    n_kv_heads = n_heads // n_groups
    b, kvh = bkv // n_kv_heads, bkv % n_kv_heads
    cols = start_n + tl.arange(0, BLOCK_N)
    kv_mask = cols[:, None] < Lk
    k = _load(_tile_ptrs(K + b * stride_kb + kvh * stride_kh, cols, stride_kn, HEAD_DIM), kv_mask, UPCAST)
    v = _load(_tile_ptrs(V + b * stride_vb + kvh * stride_vh, cols, stride_vn, HEAD_DIM), kv_mask, UPCAST)
    qk_scale = scale * LOG2E
    if DOCUMENTS:  # (B, L) each, L == Lq == Lk
        DocStart += b * Lk
        DocEnd += b * Lk
    col_docs = _documents(DocStart, cols, Lk, DOCUMENTS)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    lo, mid, full_end, end = _query_range(start_n, Lq, Lk, window, DocStart, DocEnd, CAUSAL, WINDOWED, DOCUMENTS,
                                          BLOCK_M, BLOCK_N)
    for g in range(n_groups):  # the query heads that read this kv head, summed in a fixed order
        h = kvh * n_groups + g
        Q_h = Q + b * stride_qb + h * stride_qh
        dO_h = dOut + b * stride_dob + h * stride_doh
        Lse_h = Lse + (b * n_heads + h) * Lq
        Delta_h = Delta + (b * n_heads + h) * Lq
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, col_docs, DocStart,
                             lo, mid, Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS, UPCAST,
                             DOT_PRECISION, BLOCK_M, HEAD_DIM)
        dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, col_docs, DocStart,
                             mid, full_end, Lq, Lk, window, qk_scale, False, CAUSAL, WINDOWED, DOCUMENTS, UPCAST,
                             DOT_PRECISION, BLOCK_M, HEAD_DIM)
        if WINDOWED or DOCUMENTS:
            dk, dv = _dkdv_inner(dk, dv, k, v, Q_h, dO_h, Lse_h, Delta_h, stride_qm, stride_dom, cols, col_docs,
                                 DocStart, full_end, end, Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS,
                                 UPCAST, DOT_PRECISION, BLOCK_M, HEAD_DIM)

    dk *= scale  # S = scale * Q K^T
    tl.store(_tile_ptrs(dK + b * stride_dkb + kvh * stride_dkh, cols, stride_dkn, HEAD_DIM),
             dk.to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(_tile_ptrs(dV + b * stride_dvb + kvh * stride_dvh, cols, stride_dvn, HEAD_DIM),
             dv.to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, lo, hi, Lq, Lk, window,
              qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        k, v, s = _key_block_scores(q, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, start_n, Lq, Lk, window,
                                    qk_scale, MASKED, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION, BLOCK_N,
                                    HEAD_DIM)  # s in log2 units
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, DocStart, DocEnd,
                   stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_dom,
                   stride_dqb, stride_dqh, stride_dqm,
                   n_heads, n_groups, Lq, Lk, window, scale, Lq_key, Lk_key,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr, DOCUMENTS: tl.constexpr,
                   UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
    if DOCUMENTS:  # (B, L) each, L == Lq == Lk
        DocStart += b * Lk
        DocEnd += b * Lk
    row_docs = _documents(DocStart, rows, Lq, DOCUMENTS)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    start, window_end, full_end, end = _key_range(start_m, Lq, Lk, window, DocStart, DocEnd, CAUSAL, WINDOWED,
                                                  DOCUMENTS, BLOCK_M, BLOCK_N)
    if WINDOWED or DOCUMENTS:
        dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, start,
                       window_end, Lq, Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION,
                       BLOCK_N, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, window_end, full_end,
                   Lq, Lk, window, qk_scale, False, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION, BLOCK_N,
                   HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_kn, stride_vn, rows, row_docs, DocStart, full_end, end, Lq,
                   Lk, window, qk_scale, True, CAUSAL, WINDOWED, DOCUMENTS, UPCAST, DOT_PRECISION, BLOCK_N, HEAD_DIM)
    dq *= scale
    tl.store(_tile_ptrs(dQ + b * stride_dqb + h * stride_dqh, rows, stride_dqm, HEAD_DIM),
             dq.to(dQ.dtype.element_ty), mask=row_mask)
