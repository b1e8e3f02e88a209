"""Mamba-2's SSD in Triton: a chunked forward and a backward that recomputes the states, deterministic.

Semantics and layouts are reference.py's: x, z (batch, length, heads, head_dim); dt (batch, length, heads); A
(heads,); B, C (batch, length, groups, state); D (heads,) or (heads, head_dim); states (.., heads, head_dim, state).
Inputs of any of fp32/fp16/bf16 are upcast after loading; states, decays and sums are fp32.

Chunks. Work is cut into chunks of at most CHUNK positions that never straddle two sequences: a batch row is one
sequence, and with cu_seqlens every packed sequence is chunked from its own start (fla's layout for varlen). So no
kernel masks across a reset, and a packed sequence is computed exactly as it would be alone. A chunk table
(row, first position, length) and a sequence table (first chunk, number of chunks) drive every kernel.

Inside a chunk, with dt' the effective dt (bias, softplus, clamp) and s_i = dt'_0 A + ... + dt'_i A:
    y_i   = sum_{j<=i} exp(s_i - s_j) (C_i . B_j) dt'_j x_j  +  exp(s_i) S C_i       (S: the state entering)
    S_end = exp(s_last) S + sum_j exp(s_last - s_j) dt'_j x_j B_j^T
With A < 0 and dt' >= 0 every exp is of a sum <= 0, so strong decay underflows to 0 and never overflows.

Kernels (mamba_ssm's decomposition, with its chunk-state and state-passing steps fused as fla does):
  _chunk_states_kernel      per (sequence, head, state tile): walks the sequence's chunks in order, storing the
                            state entering each chunk (fp32) and the final state; the chunk's own contribution is
                            one tl.dot (head_dim x CHUNK) @ (CHUNK x state).
  _chunk_output_kernel      per (chunk, head, head_dim tile): y from C B^T (masked by the decays) and C S^T, then
                            D x and the silu(z) gate.
  _state_grads_kernel       per (sequence, head, state tile), chunks in reverse: dS_end, the gradient reaching the
                            state at each chunk's end (the final-state gradient for the last), and the gradient of
                            the initial state.
  _chunk_grads_kernel       per (chunk, head): dx, dz, ddt (through the cumulative decays, the clamp, the softplus
                            and the bias), and per-chunk partials of dA and dD.
  _chunk_bc_grads_kernel    per (chunk, group, state tile): dB and dC, summed over the group's heads in a loop.
The forward keeps nothing but its inputs for the backward: the backward runs _chunk_states_kernel again (the
states are (chunks, heads, head_dim, state) fp32, 4x the size of a bf16 x at head_dim 64 and state 128).
Nothing is written by two programs (no atomics): dA and dD are per-chunk partials summed in torch in a fixed
order, so the backward is deterministic.

The gradient of the cumulative decays uses the forms that have no cancellation (mamba_ssm's "stable" ones):
d s-terms are summed over the pairs (i >= k > j) that span position k rather than as differences of large sums.

Matmuls run on tl.dot in the inputs' half dtype (fp32 inputs: true fp32, input_precision="ieee"), operands
rounded to it as mamba_ssm does, except the fp32 states, which go in as two halves (_mm_fine); in Triton's
interpreter (UPCAST) the operands are rounded the same way (by hand for bf16: the interpreter truncates) and
multiplied in fp32, as its bf16 tl.dot is wrong. Grids are flat
(kernels/common/launch.py) and offsets int64. Without a GPU, fixed small blocks replace the autotuner.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.common.launch import flat_grid
from archlab.kernels.common.tiles import device_function as _device
from archlab.kernels.common.tiles import state_or_zeros

__all__ = ["ssd_fwd", "ssd_bwd"]

AUTOTUNE = True
FIXED_BLOCK = 16  # interpreter: the smallest tl.dot tile, so tests cross head_dim and state tiles
# head_dim and state tiles on a GPU, at most (ptxas -v, sm_90, head_dim 64, state 128, 64-position chunks): the
# forward kernels take head_dim whole up to 64 (so the output kernel forms C B^T once a chunk and head); the two
# per-chunk gradient kernels, which hold ~10 chunk x chunk and chunk x tile fp32 tiles, 16 (at 32 they spill on
# sm_80/86/89/120, whose mma keeps its accumulators in registers)
GPU_BLOCK_P, GPU_GRAD_BLOCK_P, GPU_BLOCK_N = 64, 16, 32
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch's F.softplus: above it softplus(x) == x
# ... and the standard library's sum, cumsum and sigmoid, @triton.jit functions too, are called by their bodies
_sum, _cumsum, _sigmoid = ((f.fn if triton_interpreting() else f) for f in (tl.sum, tl.cumsum, tl.sigmoid))


# -- shared pieces ----------------------------------------------------------------------------------------
@_device
def _softplus(x):
    # log1p is unavailable in the interpreter; the minimum keeps exp finite in the branch where() discards
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.log(1.0 + tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))


@_device
def _operand(t, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """t as a tl.dot operand: rounded to DOT_DTYPE; under UPCAST kept in fp32 after the rounding (round to
    nearest even by hand for bf16, which the interpreter's cast truncates)."""
    if UPCAST:
        t = t.to(tl.float32)
        if DOT_DTYPE == tl.bfloat16:
            bits = t.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            t = bits.to(tl.float32, bitcast=True)
        elif DOT_DTYPE == tl.float16:
            t = t.to(tl.float16).to(tl.float32)
    else:
        t = t.to(DOT_DTYPE)
    return t


@_device
def _dot(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot of two operands; fp32 ones (fp32 inputs, or any under UPCAST) multiply in true fp32, not tf32."""
    if UPCAST or DOT_DTYPE == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@_device
def _mm(a, b, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    return _dot(_operand(a, DOT_DTYPE, UPCAST), _operand(b, DOT_DTYPE, UPCAST), DOT_DTYPE, UPCAST)


@_device
def _mm_fine(a, b, FINE_A: tl.constexpr, DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b where the fp32 operand (a if FINE_A, else b) keeps about twice the half type's precision: it is split
    into hi + lo, both half, and multiplied twice. For the states, whose rounding would otherwise reach dA through
    sums that cancel (errors ~ half precision x the terms, not the result)."""
    if DOT_DTYPE == tl.float32:
        out = _mm(a, b, DOT_DTYPE, UPCAST)
    elif FINE_A:
        hi = _operand(a, DOT_DTYPE, UPCAST)
        lo = _operand(a - hi.to(tl.float32), DOT_DTYPE, UPCAST)
        other = _operand(b, DOT_DTYPE, UPCAST)
        out = _dot(hi, other, DOT_DTYPE, UPCAST) + _dot(lo, other, DOT_DTYPE, UPCAST)
    else:
        hi = _operand(b, DOT_DTYPE, UPCAST)
        lo = _operand(b - hi.to(tl.float32), DOT_DTYPE, UPCAST)
        other = _operand(a, DOT_DTYPE, UPCAST)
        out = _dot(other, hi, DOT_DTYPE, UPCAST) + _dot(other, lo, DOT_DTYPE, UPCAST)
    return out


@_device
def _tile(base, rows, stride_row, cols, stride_col, mask):
    """The fp32 (rows, cols) tile at base, zero outside mask; int64 offsets."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@_device
def _chunk(Chunks, chunk):
    """(batch row, first position, length) of a chunk; row and position int64."""
    row = tl.load(Chunks + chunk * 3).to(tl.int64)
    return row, tl.load(Chunks + chunk * 3 + 1).to(tl.int64), tl.load(Chunks + chunk * 3 + 2)


@_device
def _state_rows(length, head_dim):
    """head_dim, or 0 for a chunk slot past the packed sequences (length 0), whose state was never written: the
    bound on the rows of state tiles a per-chunk kernel may read."""
    return tl.where(length > 0, head_dim, 0)


@_device
def _dt_parts(Dt, DtBias, dt_base, stride_dtl, steps, live, h, dt_min, dt_max,
              HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt' (0 outside the chunk), its pre-activation dt + bias, and the activation before the clamp."""
    pre = tl.load(Dt + dt_base + steps.to(tl.int64) * stride_dtl, mask=live, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(DtBias + h).to(tl.float32)
    act = _softplus(pre) if SOFTPLUS else pre
    return tl.where(live, tl.minimum(tl.maximum(act, dt_min), dt_max), 0.0), pre, act


@_device
def _decays(Dt, A, DtBias, dt_base, stride_dtl, steps, live, h, dt_min, dt_max,
            HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt' and s = cumsum(dt' A) over the chunk."""
    dt, pre, act = _dt_parts(Dt, DtBias, dt_base, stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    return dt, _cumsum(dt * tl.load(A + h).to(tl.float32), 0)


@_device
def _gated_grad(dOut, dout_offsets, Z, z_offsets, mask, HAS_Z: tl.constexpr):
    """dY = dout * silu(z) (fp32): the gradient reaching y + D x."""
    dy = tl.load(dOut + dout_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + z_offsets, mask=mask, other=0.0).to(tl.float32)
        dy = dy * z * _sigmoid(z)
    return dy


@_device
def _last(s, steps, CHUNK: tl.constexpr):
    """s at the chunk's last position, the chunk's total decay exponent (dt' = 0 past its end keeps s there)."""
    return _sum(tl.where(steps == CHUNK - 1, s, 0.0), 0)


@_device
def _within_chunk(s, steps):
    """L[i, j] = exp(s_i - s_j) for j <= i, else 0 (as exp(-inf): no exp of the growing s_i - s_j, j > i)."""
    return tl.exp(tl.where(steps[:, None] >= steps[None, :], s[:, None] - s[None, :], -float("inf")))


@_device
def _offsets4(row, positions, second, third, s0, s1, s2, s3):
    """Offsets of a (positions, third) tile of a 4-D (row, position, second, third) tensor; int64."""
    return row * s0 + positions.to(tl.int64)[:, None] * s1 + second * s2 + third.to(tl.int64)[None, :] * s3


@_device
def _state_tile(pid, n_heads, head_dim, d_state, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (sequence, head, head_dim tile, state tile) of a per-sequence state program: (seq, h, p, n, the tile's
    mask and offsets within one sequence's (heads, head_dim, state) block, that block's size)."""
    n_p_tiles = (head_dim + BLOCK_P - 1) // BLOCK_P
    tiles = n_p_tiles * ((d_state + BLOCK_N - 1) // BLOCK_N)
    seq, h = pid // tiles // n_heads, pid // tiles % n_heads
    p = pid % tiles % n_p_tiles * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid % tiles // n_p_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (p[:, None] < head_dim) & (n[None, :] < d_state)
    offsets = h * head_dim * d_state + p[:, None] * d_state + n[None, :]  # (.., heads, head_dim, state)
    return seq, h, p, n, mask, offsets, n_heads * head_dim * d_state


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _chunk_states_kernel(X, Dt, A, Bm, DtBias, Init, States, Final, Chunks, Seqs,
                         stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                         stride_bb, stride_bl, stride_bg, stride_bn,
                         n_heads, heads_per_group, head_dim, d_state, dt_min, dt_max,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_INIT: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    seq, h, p, n, state_mask, state_offsets, size = _state_tile(tl.program_id(0).to(tl.int64), n_heads, head_dim,
                                                                 d_state, BLOCK_P, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    state = state_or_zeros(Init + seq * size, state_offsets, state_mask, HAS_INIT, BLOCK_P, BLOCK_N)
    first, count = tl.load(Seqs + seq * 2).to(tl.int64), tl.load(Seqs + seq * 2 + 1)
    for index in range(count):
        chunk = first + index
        tl.store(States + chunk * size + state_offsets, state, mask=state_mask)
        row, start, length = _chunk(Chunks, chunk)
        live = steps < length
        dt, s = _decays(Dt, A, DtBias, row * stride_dtb + start * stride_dtl + h * stride_dth,
                        stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        total = _last(s, steps, CHUNK)
        x = _tile(X + row * stride_xb + start * stride_xl + h * stride_xh, steps, stride_xl, p, stride_xp,
                  live[:, None] & (p[None, :] < head_dim))
        b = _tile(Bm + row * stride_bb + start * stride_bl + (h // heads_per_group) * stride_bg, steps, stride_bl,
                  n, stride_bn, live[:, None] & (n[None, :] < d_state))
        weighted = x * (dt * tl.exp(total - s))[:, None]
        state = state * tl.exp(total) + _mm_fine(tl.trans(weighted), b, True, DOT_DTYPE, UPCAST)
    tl.store(Final + seq * size + state_offsets, state, mask=state_mask)


@triton.jit
def _chunk_output_kernel(X, Dt, A, Bm, Cm, Dskip, Z, DtBias, States, Out, Chunks,
                         stride_xb, stride_xl, stride_xh, stride_xp, stride_dtb, stride_dtl, stride_dth,
                         stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                         stride_zb, stride_zl, stride_zh, stride_zp, stride_ob, stride_ol, stride_oh, stride_op,
                         stride_dh, stride_dp, n_heads, heads_per_group, head_dim, d_state, dt_min, dt_max,
                         HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n_p_tiles = (head_dim + BLOCK_P - 1) // BLOCK_P
    chunk, h = pid // n_p_tiles // n_heads, pid // n_p_tiles % n_heads
    g = h // heads_per_group
    p = pid % n_p_tiles * BLOCK_P + tl.arange(0, BLOCK_P)
    steps = tl.arange(0, CHUNK)
    row, start, length = _chunk(Chunks, chunk)
    live, p_mask, state_rows = steps < length, p < head_dim, _state_rows(length, head_dim)
    dt, s = _decays(Dt, A, DtBias, row * stride_dtb + start * stride_dtl + h * stride_dth,
                    stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    b_base = Bm + row * stride_bb + start * stride_bl + g * stride_bg
    c_base = Cm + row * stride_cb + start * stride_cl + g * stride_cg
    state_base = States + (chunk * n_heads + h) * head_dim * d_state
    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # C_i . B_j
    carried = tl.zeros([CHUNK, BLOCK_P], dtype=tl.float32)  # S C_i
    for n0 in range(0, d_state, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        bc_mask = live[:, None] & (n[None, :] < d_state)
        c = _tile(c_base, steps, stride_cl, n, stride_cn, bc_mask)
        scores += _mm(c, tl.trans(_tile(b_base, steps, stride_bl, n, stride_bn, bc_mask)), DOT_DTYPE, UPCAST)
        entering = _tile(state_base, p, d_state, n, 1, (p[:, None] < state_rows) & (n[None, :] < d_state))
        carried += _mm_fine(c, tl.trans(entering), False, DOT_DTYPE, UPCAST)
    tile_mask = live[:, None] & p_mask[None, :]
    x_offsets = _offsets4(row, start + steps, h, p, stride_xb, stride_xl, stride_xh, stride_xp)
    x = tl.load(X + x_offsets, mask=tile_mask, other=0.0).to(tl.float32)
    y = _mm(scores * _within_chunk(s, steps) * dt[None, :], x, DOT_DTYPE, UPCAST) + tl.exp(s)[:, None] * carried
    if HAS_D:
        y += x * tl.load(Dskip + h * stride_dh + p * stride_dp, mask=p_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_Z:
        z = tl.load(Z + _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp),
                    mask=tile_mask, other=0.0).to(tl.float32)
        y *= z * _sigmoid(z)
    out_offsets = _offsets4(row, start + steps, h, p, stride_ob, stride_ol, stride_oh, stride_op)
    tl.store(Out + out_offsets, y.to(Out.dtype.element_ty), mask=tile_mask)


# -- backward ---------------------------------------------------------------------------------------------
@triton.jit
def _state_grads_kernel(dOut, Z, Dt, A, Cm, DtBias, DFinal, DStates, DInit, Chunks, Seqs,
                        stride_gb, stride_gl, stride_gh, stride_gp, stride_zb, stride_zl, stride_zh, stride_zp,
                        stride_dtb, stride_dtl, stride_dth, stride_cb, stride_cl, stride_cg, stride_cn,
                        n_heads, heads_per_group, head_dim, d_state, dt_min, dt_max,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                        HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, DOT_DTYPE: tl.constexpr,
                        UPCAST: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dS_end of every chunk, last chunk first: dS_end(c - 1) = exp(s_last) dS_end(c) + sum_i exp(s_i) dy_i C_i^T."""
    seq, h, p, n, state_mask, state_offsets, size = _state_tile(tl.program_id(0).to(tl.int64), n_heads, head_dim,
                                                                 d_state, BLOCK_P, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    grad = state_or_zeros(DFinal + seq * size, state_offsets, state_mask, HAS_DFINAL, BLOCK_P, BLOCK_N)
    first, count = tl.load(Seqs + seq * 2).to(tl.int64), tl.load(Seqs + seq * 2 + 1)
    for index in range(count):
        chunk = first + count - 1 - index
        tl.store(DStates + chunk * size + state_offsets, grad, mask=state_mask)
        row, start, length = _chunk(Chunks, chunk)
        live = steps < length
        dt, s = _decays(Dt, A, DtBias, row * stride_dtb + start * stride_dtl + h * stride_dth,
                        stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        tile_mask = live[:, None] & (p[None, :] < head_dim)
        dy = _gated_grad(dOut, _offsets4(row, start + steps, h, p, stride_gb, stride_gl, stride_gh, stride_gp),
                         Z, _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp),
                         tile_mask, HAS_Z)
        c = _tile(Cm + row * stride_cb + start * stride_cl + (h // heads_per_group) * stride_cg, steps, stride_cl,
                  n, stride_cn, live[:, None] & (n[None, :] < d_state))
        own = _mm_fine(tl.trans(dy * tl.exp(s)[:, None]), c, True, DOT_DTYPE, UPCAST)  # sum_i exp(s_i) dy_i C_i^T
        grad = grad * tl.exp(_last(s, steps, CHUNK)) + own
    if HAS_INIT:
        tl.store(DInit + seq * size + state_offsets, grad, mask=state_mask)


@triton.jit
def _chunk_grads_kernel(X, dOut, Z, Dt, A, Bm, Cm, Dskip, DtBias, States, DStates, Chunks,
                        dX, dZ, dDt, dA_part, dD_part,
                        stride_xb, stride_xl, stride_xh, stride_xp, stride_gb, stride_gl, stride_gh, stride_gp,
                        stride_zb, stride_zl, stride_zh, stride_zp, stride_dtb, stride_dtl, stride_dth,
                        stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                        stride_dh, stride_dp, n_heads, heads_per_group, head_dim, d_state, dt_min, dt_max,
                        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx, dz and ddt of one chunk and head. The launcher makes dout and dt contiguous: dx and dz are stored with
    dout's strides, the fp32 ddt with dt's."""
    pid = tl.program_id(0).to(tl.int64)
    chunk, h = pid // n_heads, pid % n_heads
    steps = tl.arange(0, CHUNK)
    row, start, length = _chunk(Chunks, chunk)
    live, state_rows = steps < length, _state_rows(length, head_dim)
    dt_base = row * stride_dtb + start * stride_dtl + h * stride_dth
    dt, pre, act = _dt_parts(Dt, DtBias, dt_base, stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
    a_h = tl.load(A + h).to(tl.float32)
    s = _cumsum(dt * a_h, 0)
    total = _last(s, steps, CHUNK)
    to_end, from_start = tl.exp(total - s), tl.exp(s)
    b_base = Bm + row * stride_bb + start * stride_bl + (h // heads_per_group) * stride_bg
    c_base = Cm + row * stride_cb + start * stride_cl + (h // heads_per_group) * stride_cg
    state_base = (chunk * n_heads + h) * head_dim * d_state

    scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # C_i . B_j
    for n0 in range(0, d_state, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        bc_mask = live[:, None] & (n[None, :] < d_state)
        scores += _mm(_tile(c_base, steps, stride_cl, n, stride_cn, bc_mask),
                      tl.trans(_tile(b_base, steps, stride_bl, n, stride_bn, bc_mask)), DOT_DTYPE, UPCAST)
    mixing = scores * _within_chunk(s, steps)  # y_i = sum_j mixing_ij dt'_j x_j + ...
    dy_x = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)  # dy_i . x_j
    for p0 in range(0, head_dim, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        tile_mask = live[:, None] & (p[None, :] < head_dim)
        x = tl.load(X + _offsets4(row, start + steps, h, p, stride_xb, stride_xl, stride_xh, stride_xp),
                    mask=tile_mask, other=0.0)
        dy = _gated_grad(dOut, _offsets4(row, start + steps, h, p, stride_gb, stride_gl, stride_gh, stride_gp),
                         Z, _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp),
                         tile_mask, HAS_Z)
        dy_x += _mm(dy, tl.trans(x), DOT_DTYPE, UPCAST)
    pairs = dy_x * mixing
    ddt = _sum(pairs, 0)  # through dt'_j scaling x_j, within the chunk
    pairs = pairs * dt[None, :]
    # d/ds_k summed over k' >= k: the pairs (i >= k > j) whose decay exp(s_i - s_j) spans position k
    da = _sum(tl.where(steps[:, None] >= steps[None, :], _cumsum(pairs, 1) - pairs, 0.0), 0)

    from_state = tl.zeros([CHUNK], dtype=tl.float32)  # x_j . (dS_end B_j)
    into_carried = tl.zeros([CHUNK], dtype=tl.float32)  # dy_i . (S C_i)
    overlap = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)  # <dS_end, S>, summed at the end
    for p0 in range(0, head_dim, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < head_dim
        tile_mask = live[:, None] & p_mask[None, :]
        x_offsets = _offsets4(row, start + steps, h, p, stride_xb, stride_xl, stride_xh, stride_xp)
        x = tl.load(X + x_offsets, mask=tile_mask, other=0.0).to(tl.float32)
        grad_offsets = _offsets4(row, start + steps, h, p, stride_gb, stride_gl, stride_gh, stride_gp)
        z_offsets = _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp)
        dy = _gated_grad(dOut, grad_offsets, Z, z_offsets, tile_mask, HAS_Z)
        to_x = tl.zeros([CHUNK, BLOCK_P], dtype=tl.float32)  # dS_end B_j
        carried = tl.zeros([CHUNK, BLOCK_P], dtype=tl.float32)  # S C_i
        for n0 in range(0, d_state, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            bc_mask = live[:, None] & (n[None, :] < d_state)
            state_mask = (p[:, None] < state_rows) & (n[None, :] < d_state)
            end_grad = _tile(DStates + state_base, p, d_state, n, 1, state_mask)
            entering = _tile(States + state_base, p, d_state, n, 1, state_mask)
            to_x += _mm_fine(_tile(b_base, steps, stride_bl, n, stride_bn, bc_mask), tl.trans(end_grad), False,
                             DOT_DTYPE, UPCAST)
            carried += _mm_fine(_tile(c_base, steps, stride_cl, n, stride_cn, bc_mask), tl.trans(entering), False,
                                DOT_DTYPE, UPCAST)
            overlap += end_grad * entering
        dx = dt[:, None] * (_mm(tl.trans(mixing), dy, DOT_DTYPE, UPCAST) + to_end[:, None] * to_x)
        if HAS_D:
            skip = tl.load(Dskip + h * stride_dh + p * stride_dp, mask=p_mask, other=0.0).to(tl.float32)
            dx += dy * skip[None, :]
            tl.store(dD_part + (chunk * n_heads + h) * head_dim + p, _sum(dy * x, 0), mask=p_mask)
        tl.store(dX + grad_offsets, dx.to(dX.dtype.element_ty), mask=tile_mask)
        from_state += _sum(x * to_x, 1)
        into_carried += _sum(dy * carried, 1)
        if HAS_Z:
            y = _mm(mixing * dt[None, :], x, DOT_DTYPE, UPCAST) + from_start[:, None] * carried
            if HAS_D:
                y += x * skip[None, :]
            dout = tl.load(dOut + grad_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            z = tl.load(Z + z_offsets, mask=tile_mask, other=0.0).to(tl.float32)
            sig = _sigmoid(z)
            tl.store(dZ + grad_offsets, (dout * y * sig * (1.0 + z * (1.0 - sig))).to(dZ.dtype.element_ty),
                     mask=tile_mask)
    from_state *= to_end
    ddt += from_state
    to_end_terms = from_state * dt  # d/ds: + at the chunk's end, - at j; summed over k' >= k: those before k
    da += _cumsum(into_carried * from_start, 0, reverse=True) + _cumsum(to_end_terms, 0) - to_end_terms
    da += tl.exp(total) * _sum(_sum(overlap, 1), 0)
    tl.store(dA_part + chunk * n_heads + h, _sum(dt * da, 0))
    ddt += a_h * da
    ddt = tl.where((act >= dt_min) & (act <= dt_max), ddt, 0.0)  # torch's clamp passes its bounds' gradient
    if SOFTPLUS:
        ddt = tl.where(pre > SOFTPLUS_THRESHOLD, ddt, ddt * _sigmoid(pre))
    tl.store(dDt + dt_base + steps.to(tl.int64) * stride_dtl, ddt, mask=live)


@triton.jit
def _chunk_bc_grads_kernel(X, dOut, Z, Dt, A, Bm, Cm, DtBias, States, DStates, Chunks, dB, dC,
                           stride_xb, stride_xl, stride_xh, stride_xp, stride_gb, stride_gl, stride_gh, stride_gp,
                           stride_zb, stride_zl, stride_zh, stride_zp, stride_dtb, stride_dtl, stride_dth,
                           stride_bb, stride_bl, stride_bg, stride_bn, stride_cb, stride_cl, stride_cg, stride_cn,
                           stride_db, stride_dl, stride_dg, stride_dn,
                           n_heads, n_groups, heads_per_group, head_dim, d_state, dt_min, dt_max,
                           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
                           DOT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, CHUNK: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """dB and dC of one chunk, group and state tile, summed over the group's heads in order; dB and dC share
    B's contiguous layout."""
    pid = tl.program_id(0).to(tl.int64)
    n_n_tiles = (d_state + BLOCK_N - 1) // BLOCK_N
    chunk, g = pid // n_n_tiles // n_groups, pid // n_n_tiles % n_groups
    n = pid % n_n_tiles * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, CHUNK)
    row, start, length = _chunk(Chunks, chunk)
    live, n_mask, state_rows = steps < length, n < d_state, _state_rows(length, head_dim)
    bc_mask = live[:, None] & n_mask[None, :]
    b = _tile(Bm + row * stride_bb + start * stride_bl + g * stride_bg, steps, stride_bl, n, stride_bn, bc_mask)
    c = _tile(Cm + row * stride_cb + start * stride_cl + g * stride_cg, steps, stride_cl, n, stride_cn, bc_mask)
    db = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
    dc = tl.zeros([CHUNK, BLOCK_N], dtype=tl.float32)
    for k in range(heads_per_group):
        h = g * heads_per_group + k
        dt, s = _decays(Dt, A, DtBias, row * stride_dtb + start * stride_dtl + h * stride_dth,
                        stride_dtl, steps, live, h, dt_min, dt_max, HAS_BIAS, SOFTPLUS)
        to_end, from_start = tl.exp(_last(s, steps, CHUNK) - s), tl.exp(s)
        dy_x = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
        for p0 in range(0, head_dim, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            tile_mask = live[:, None] & (p[None, :] < head_dim)
            x = tl.load(X + _offsets4(row, start + steps, h, p, stride_xb, stride_xl, stride_xh, stride_xp),
                        mask=tile_mask, other=0.0)
            dy = _gated_grad(
                dOut, _offsets4(row, start + steps, h, p, stride_gb, stride_gl, stride_gh, stride_gp),
                Z, _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp), tile_mask, HAS_Z)
            dy_x += _mm(dy, tl.trans(x), DOT_DTYPE, UPCAST)
        weights = dy_x * _within_chunk(s, steps)
        db += dt[:, None] * _mm(tl.trans(weights), c, DOT_DTYPE, UPCAST)
        dc += _mm(weights * dt[None, :], b, DOT_DTYPE, UPCAST)
        state_base = (chunk * n_heads + h) * head_dim * d_state
        for p0 in range(0, head_dim, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            tile_mask = live[:, None] & (p[None, :] < head_dim)
            x = tl.load(X + _offsets4(row, start + steps, h, p, stride_xb, stride_xl, stride_xh, stride_xp),
                        mask=tile_mask, other=0.0)
            dy = _gated_grad(
                dOut, _offsets4(row, start + steps, h, p, stride_gb, stride_gl, stride_gh, stride_gp),
                Z, _offsets4(row, start + steps, h, p, stride_zb, stride_zl, stride_zh, stride_zp), tile_mask, HAS_Z)
            state_mask = (p[:, None] < state_rows) & n_mask[None, :]
            db += (dt * to_end)[:, None] * _mm_fine(x, _tile(DStates + state_base, p, d_state, n, 1, state_mask),
                                                    False, DOT_DTYPE, UPCAST)
            dc += from_start[:, None] * _mm_fine(dy, _tile(States + state_base, p, d_state, n, 1, state_mask),
                                                 False, DOT_DTYPE, UPCAST)
    offsets = _offsets4(row, start + steps, g, n, stride_db, stride_dl, stride_dg, stride_dn)
    tl.store(dB + offsets, db.to(dB.dtype.element_ty), mask=bc_mask)
    tl.store(dC + offsets, dc.to(dC.dtype.element_ty), mask=bc_mask)


# -- launching --------------------------------------------------------------------------------------------
# Blocks are fixed by the shape (see GPU_BLOCK_P); the autotuner picks among two (num_warps, num_stages) a kernel: the
# compile matrix compiles every config for every GPU target in CI. The kernels that walk a sequence's chunks may
# pipeline their loads (2 stages); the per-chunk ones would spend shared memory they need (3 stages: 150 KB).
_TUNE_KEY = ["head_dim", "d_state", "heads_per_group"]


def _tuned(kernel, warps_and_stages):
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in warps_and_stages]
    return autotune(configs, key=_TUNE_KEY)(kernel)


_states_tuned = _tuned(_chunk_states_kernel, [(4, 2), (8, 2)])
_output_tuned = _tuned(_chunk_output_kernel, [(4, 1), (8, 1)])
_state_grads_tuned = _tuned(_state_grads_kernel, [(4, 2), (8, 2)])
_grads_tuned = _tuned(_chunk_grads_kernel, [(4, 1), (8, 1)])
_bc_grads_tuned = _tuned(_chunk_bc_grads_kernel, [(8, 1), (8, 2)])


def _on_gpu(t: Tensor) -> bool:
    return AUTOTUNE and t.is_cuda and not triton_interpreting()


def _launch(kernel, tuned, x: Tensor, grid: tuple, *args, **constexprs) -> None:
    (tuned if _on_gpu(x) else kernel)[grid](*args, **constexprs)


def chunk_tables(batch: int, length: int, cu_seqlens: Tensor | None, chunk_len: int,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """(chunks (n_chunks, 3): batch row, first position, length; sequences (n_sequences, 2): first chunk, number of
    chunks), int32. Without cu_seqlens a batch row is a sequence; with it (batch 1) each packed sequence is chunked
    from its own start. Built on the device without reading cu_seqlens back: n_chunks is its bound
    ceil(length / chunk_len) + n_sequences - 1, and the slots past the last chunk have length 0."""
    per_row = triton.cdiv(length, chunk_len)
    if cu_seqlens is None:
        ids = torch.arange(batch * per_row, device=device)
        starts = ids % per_row * chunk_len
        chunks = torch.stack([ids // per_row, starts, (length - starts).clamp(max=chunk_len)], dim=1)
        firsts = torch.arange(batch, device=device) * per_row
        sequences = torch.stack([firsts, torch.full_like(firsts, per_row)], dim=1)
        return chunks.int().contiguous(), sequences.int().contiguous()
    bounds = cu_seqlens.long()
    n_sequences = bounds.numel() - 1
    counts = (bounds[1:] - bounds[:-1] + chunk_len - 1) // chunk_len
    ends = counts.cumsum(0)
    ids = torch.arange(per_row + n_sequences - 1, device=device)
    owner = torch.searchsorted(ends, ids, right=True)
    real = owner < n_sequences
    owner = owner.clamp(max=n_sequences - 1)
    starts = bounds[owner] + (ids - (ends - counts)[owner]) * chunk_len
    lengths = torch.where(real, (bounds[owner + 1] - starts).clamp(max=chunk_len), 0)
    chunks = torch.stack([torch.zeros_like(ids), torch.where(real, starts, 0), lengths], dim=1)
    return chunks.int().contiguous(), torch.stack([ends - counts, counts], dim=1).int().contiguous()


def _blocks(x: Tensor, head_dim: int, d_state: int, max_block_p: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_N): head_dim and state tiles."""
    return _gpu_blocks(head_dim, d_state, max_block_p) if _on_gpu(x) else (FIXED_BLOCK, FIXED_BLOCK)


def _gpu_blocks(head_dim: int, d_state: int, max_block_p: int) -> tuple[int, int]:
    """Powers of two from 16 (tl.dot's least) up to the GPU's bounds."""
    return tuple(min(bound, max(16, triton.next_power_of_2(size)))
                 for size, bound in ((head_dim, max_block_p), (d_state, GPU_BLOCK_N)))


def _dot_dtype(x: Tensor, B: Tensor, C: Tensor):
    """The tl.dot operand type: x's half type when B and C share it (mamba_ssm's choice), else fp32."""
    if x.dtype == B.dtype == C.dtype and x.dtype in (torch.float16, torch.bfloat16):
        return tl.float16 if x.dtype == torch.float16 else tl.bfloat16
    return tl.float32


def _skip_strides(D: Tensor | None) -> tuple[int, int]:
    """D read as (heads, head_dim): a per-head D repeats along head_dim with stride 0."""
    if D is None:
        return 0, 0
    return (D.stride(0), 0) if D.ndim == 1 else D.stride()


class _Problem:
    """What every launch shares: sizes, tables, blocks, strides and constexprs."""

    def __init__(self, x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit, chunk_len):
        if chunk_len < 16 or chunk_len & (chunk_len - 1):
            raise ValueError(f"triton ssd: chunk_len must be a power of two >= 16 (tl.dot's tile), got {chunk_len}")
        if initial_states is not None and cu_seqlens is not None:  # the kernels would read one state per sequence
            raise ValueError("triton ssd: initial_states with cu_seqlens is not supported (ssd() refuses it too)")
        self.batch, self.length, self.n_heads, self.head_dim = x.shape
        self.n_groups, self.d_state = B.shape[2:]
        self.chunks, self.sequences = chunk_tables(self.batch, self.length, cu_seqlens, chunk_len, x.device)
        self.block_p, self.block_n = _blocks(x, self.head_dim, self.d_state, GPU_BLOCK_P)
        self.sizes = (self.n_heads, self.n_heads // self.n_groups, self.head_dim, self.d_state,
                      float(dt_limit[0]), float(dt_limit[1]))
        self.constexprs = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, DOT_DTYPE=_dot_dtype(x, B, C),
                               UPCAST=triton_interpreting(), CHUNK=chunk_len,
                               BLOCK_P=self.block_p, BLOCK_N=self.block_n)
        # the per-chunk gradient kernels' (a narrower head_dim tile on a GPU)
        self.grad_constexprs = {**self.constexprs, "BLOCK_P": _blocks(x, self.head_dim, self.d_state,
                                                                      GPU_GRAD_BLOCK_P)[0]}

    def state_like(self, rows: int, device) -> Tensor:
        return torch.empty(rows, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32, device=device)

    def grid(self, *counts: int) -> tuple[int]:
        return flat_grid("ssd", *counts)

    def state_tiles(self) -> int:
        return triton.cdiv(self.head_dim, self.block_p) * triton.cdiv(self.d_state, self.block_n)


def _states(problem: _Problem, x, dt, A, B, dt_bias, initial_states) -> tuple[Tensor, Tensor]:
    """(the state entering every chunk, the final state of every sequence), both fp32."""
    states = problem.state_like(problem.chunks.shape[0], x.device)
    final = problem.state_like(problem.sequences.shape[0], x.device)
    _launch(_chunk_states_kernel, _states_tuned, x,
            problem.grid(problem.state_tiles(), problem.n_heads, problem.sequences.shape[0]),
            x, dt, A, B, dt_bias if dt_bias is not None else A,
            initial_states if initial_states is not None else states, states, final, problem.chunks,
            problem.sequences, *x.stride(), *dt.stride(), *B.stride(), *problem.sizes,
            HAS_INIT=initial_states is not None, **problem.constexprs)
    return states, final


def _params(A, D, dt_bias, initial_states):
    """The (heads,)-sized parameters and the initial states, which the kernels index as contiguous."""
    return tuple(None if t is None else t.contiguous() for t in (A, D, dt_bias, initial_states))


def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            dt_bias: Tensor | None, initial_states: Tensor | None, cu_seqlens: Tensor | None, dt_softplus: bool,
            dt_limit: tuple[float, float], chunk_len: int) -> tuple[Tensor, Tensor]:
    """(out like x in x's dtype, final states (n_sequences, heads, head_dim, state) fp32); inputs validated."""
    A, D, dt_bias, initial_states = _params(A, D, dt_bias, initial_states)
    problem = _Problem(x, dt, A, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit, chunk_len)
    states, final = _states(problem, x, dt, A, B, dt_bias, initial_states)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    _launch(_chunk_output_kernel, _output_tuned, x,
            problem.grid(triton.cdiv(problem.head_dim, problem.block_p), problem.n_heads, problem.chunks.shape[0]),
            x, dt, A, B, C, D if D is not None else A, z if z is not None else x, dt_bias if dt_bias is not None else A,
            states, out, problem.chunks, *x.stride(), *dt.stride(), *B.stride(), *C.stride(), *z_strides,
            *out.stride(), *_skip_strides(D), *problem.sizes, HAS_D=D is not None, HAS_Z=z is not None,
            **problem.constexprs)
    return out, final


def ssd_bwd(grad_out: Tensor, grad_final: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, initial_states: Tensor | None,
            cu_seqlens: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float],
            chunk_len: int) -> tuple[Tensor | None, ...]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states) in the inputs' shapes and dtypes, None for an
    absent optional input; grad_final (None: zero) is the gradient of the final states. Deterministic."""
    D_in, dt_bias_in, initial_in = D, dt_bias, initial_states
    A_c, D, dt_bias, initial_states = _params(A, D, dt_bias, initial_states)
    grad_out, dt = grad_out.contiguous(), dt.contiguous()  # dx, dz take dout's strides, ddt dt's
    problem = _Problem(x, dt, A_c, B, C, dt_bias, initial_states, cu_seqlens, dt_softplus, dt_limit, chunk_len)
    n_chunks, n_sequences = problem.chunks.shape[0], problem.sequences.shape[0]
    states, _ = _states(problem, x, dt, A_c, B, dt_bias, initial_states)
    z_strides = z.stride() if z is not None else (0, 0, 0, 0)
    z_or_x = z if z is not None else x
    bias_or_A = dt_bias if dt_bias is not None else A_c

    end_grads = problem.state_like(n_chunks, x.device)
    initial_grads = problem.state_like(n_sequences, x.device) if initial_states is not None else end_grads
    _launch(_state_grads_kernel, _state_grads_tuned, x, problem.grid(problem.state_tiles(), problem.n_heads,
                                                                     n_sequences),
            grad_out, z_or_x, dt, A_c, C, bias_or_A, grad_final.contiguous() if grad_final is not None else states,
            end_grads, initial_grads, problem.chunks, problem.sequences, *grad_out.stride(), *z_strides,
            *dt.stride(), *C.stride(), *problem.sizes, HAS_Z=z is not None, HAS_DFINAL=grad_final is not None,
            HAS_INIT=initial_states is not None, **problem.constexprs)

    f32 = dict(dtype=torch.float32, device=x.device)
    dx = torch.empty(grad_out.shape, dtype=x.dtype, device=x.device)
    dz = torch.empty(grad_out.shape, dtype=z.dtype, device=x.device) if z is not None else dx
    ddt = torch.empty(dt.shape, **f32)
    dA_part = torch.empty(n_chunks, problem.n_heads, **f32)
    dD_part = torch.empty(n_chunks, problem.n_heads, problem.head_dim, **f32) if D is not None else dA_part
    _launch(_chunk_grads_kernel, _grads_tuned, x, problem.grid(problem.n_heads, n_chunks),
            x, grad_out, z_or_x, dt, A_c, B, C, D if D is not None else A_c, bias_or_A, states, end_grads,
            problem.chunks, dx, dz, ddt, dA_part, dD_part, *x.stride(), *grad_out.stride(), *z_strides,
            *dt.stride(), *B.stride(), *C.stride(), *_skip_strides(D), *problem.sizes,
            HAS_D=D is not None, HAS_Z=z is not None, **problem.grad_constexprs)

    dB = torch.empty(B.shape, dtype=B.dtype, device=x.device)
    dC = torch.empty(B.shape, dtype=C.dtype, device=x.device)
    n_heads, heads_per_group, head_dim, d_state, dt_min, dt_max = problem.sizes
    _launch(_chunk_bc_grads_kernel, _bc_grads_tuned, x,
            problem.grid(triton.cdiv(d_state, problem.block_n), problem.n_groups, n_chunks),
            x, grad_out, z_or_x, dt, A_c, B, C, bias_or_A, states, end_grads, problem.chunks, dB, dC,
            *x.stride(), *grad_out.stride(), *z_strides, *dt.stride(), *B.stride(), *C.stride(), *dB.stride(),
            n_heads, problem.n_groups, heads_per_group, head_dim, d_state, dt_min, dt_max,
            HAS_Z=z is not None, **problem.grad_constexprs)

    dD = None
    if D_in is not None:
        dD = dD_part.sum(0)
        dD = (dD.sum(-1) if D_in.ndim == 1 else dD).to(D_in.dtype)
    return (dx, ddt.to(dt.dtype), dA_part.sum(0).to(A.dtype), dB, dC, dD, dz if z is not None else None,
            ddt.sum((0, 1)).to(dt_bias_in.dtype) if dt_bias_in is not None else None,
            initial_grads.to(initial_in.dtype) if initial_in is not None else None)
