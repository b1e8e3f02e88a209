"""Depthwise causal conv1d in Triton: a single-pass forward and a deterministic backward.

Layout as in `archlab.kernels.causal_conv1d`: x (batch, dim, L), weight (dim, width), bias (dim,);
pre[d, t] = bias[d] + sum_k weight[d, k] * x[d, t - (width - 1) + k]  (x before position 0 is 0),
out = silu(pre) or pre.

Both layouts that occur in practice are read in place: channel-first (L contiguous, the conv's own layout)
and channel-last (dim contiguous: a (batch, L, dim) activation transposed, which is how the Mamba block
passes it). Each layout has its own forward kernel, and a constexpr tells the backward which axis has unit stride, so
loads vectorise along it; outputs and dx take x's layout. Any other strides are copied to channel-first first.

Forward, one program per (block of positions, block of channels, batch element), a memory-bound single
pass: DRAM sees x once and out once, all loads and stores 16-byte vectors. Channel-last: the width shifted
tiles (the width - 1 halo before the block included) are other rows, so they are loaded directly (they
overlap and hit the cache). Channel-first: a shift along the unit-stride axis would be a misaligned load
(one 2-byte load per element), so the block is read as aligned V-position vectors plus the vector before
each one, and every tap picks its input among those registers (_split_vectors).

Backward, with g = dout * act'(pre):
  dx[d, s]    = sum_k weight[d, k] * g[d, s + (width - 1) - k]   (a correlation with the flipped taps)
  dweight[d, k] = sum_{b, t} g[b, d, t] * x[b, d, t - (width - 1) + k],   dbias[d] = sum_{b, t} g[b, d, t]
The SiLU derivative needs pre, which is recomputed from x for the width positions each dx reads instead
of being stored by the forward (with plain shifted loads: misaligned, so scalar, when channel-first).
One program per (chunk of positions, block of channels, batch element) loops over the chunk's tiles, sums
its dweight/dbias contributions in registers in a fixed order and writes them to its own row of a float32
buffer that torch then sums: no atomics, so bitwise deterministic.

Packed documents (seq_idx (batch, L), contiguous): a tap reads x[s] for output t only where seq_idx[s] == seq_idx[t],
in the forward and in every backward term (dx's correlation, dweight); only equality counts, so a flipped row works.
A constexpr HAS_SEQ_IDX compiles this in, so seq_idx=None runs the kernels exactly as before.

Under TRITON_INTERPRET=1 (the CPU tests) fixed small blocks replace the autotuner, which needs a GPU.
Offsets are int64 wherever a stride multiplies an index (the batch, the channel in channel-first, the position in
channel-last, whose stride is 2 * dim for the Mamba block's in_proj view), so no size overflows int32. Grids are
flat (kernels/common/launch.py), so neither a big batch nor a wide dim passes CUDA's limits on grid axes 1 and 2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.causal_conv1d import is_channel_last, new_like_x
from archlab.kernels.common.launch import flat_grid

__all__ = ["causal_conv1d_fwd", "causal_conv1d_bwd"]

# On a GPU the block sizes are autotuned. Without one (the interpreter), or with AUTOTUNE off, FIXED_BLOCKS
# are used: small, so tests cross several blocks of channels and positions.
AUTOTUNE = True
FIXED_BLOCKS = {"BLOCK_D": 4, "BLOCK_L": 32}
# Positions per backward program: it bounds the dweight/dbias partial buffer to
# cdiv(L, BWD_CHUNK_LEN) * batch rows while leaving batch * dim / BLOCK_D * chunks programs to fill the GPU.
BWD_CHUNK_LEN = 512
MAX_WIDTH = 4  # the dweight accumulator has MAX_WIDTH columns (a power of two), the first `width` are used


# -- shared pieces ----------------------------------------------------------------------------------------
@triton.jit
def _program_tile(n_position_blocks, dim, BLOCK_D: tl.constexpr):
    """This program's (block of positions, channels d, batch index b). The grid is flat, position blocks fastest,
    then channel blocks (kernels/common/launch.py: CUDA caps grid axes 1 and 2 at 65535, which dim / BLOCK_D or the
    batch can pass). b is int64: the batch offset of a big tensor overflows int32."""
    n_channel_blocks = tl.cdiv(dim, BLOCK_D)
    position_block = tl.program_id(0) % n_position_blocks
    rest = tl.program_id(0) // n_position_blocks
    d = rest % n_channel_blocks * BLOCK_D + tl.arange(0, BLOCK_D)
    return position_block, d, (rest // n_channel_blocks).to(tl.int64)


@triton.jit
def _tile_offsets(d, t, stride_d, stride_l, CHANNEL_LAST: tl.constexpr):
    """Offsets of the (channels, positions) tile; the unit-stride axis is a literal 1 so loads vectorise. The
    strided term is int64: position * stride_l overflows int32 once L * stride_l reaches 2**31."""
    if CHANNEL_LAST:
        offs = d[:, None] + t.to(tl.int64)[None, :] * stride_l
    else:
        offs = d.to(tl.int64)[:, None] * stride_d + t[None, :]
    return offs


@triton.jit
def _load_taps(Weight, d, d_mask, WIDTH: tl.constexpr, BLOCK_D: tl.constexpr):
    """The MAX_WIDTH (= 4) weight columns of channels d as fp32 [BLOCK_D] vectors, zero past WIDTH: one
    row load per channel (vectorised at width 4) instead of one scalar load per tap."""
    taps = tl.arange(0, 4)
    w = tl.load(Weight + d[:, None] * WIDTH + taps[None, :], mask=d_mask[:, None] & (taps < WIDTH)[None, :],
                other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(w, [BLOCK_D, 2, 2]))  # tap = 2a + e
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    return (w0, w1, w2, w3)


@triton.jit
def _same_document(SeqIdx, src, t, length):
    """Whether positions src and t ([BLOCK_L] vectors) are in one document: equal ids in SeqIdx (this row's). Only
    equality counts, so a flipped row works as well. Positions outside the row compare as whatever: callers mask
    their loads there and store nothing for them."""
    return tl.load(SeqIdx + src, mask=(src >= 0) & (src < length), other=0) == tl.load(SeqIdx + t, mask=t < length,
                                                                                      other=0)


@triton.jit
def _tap_reads(SeqIdx, src, t, length, HAS_SEQ_IDX: tl.constexpr):
    """Whether output t reads input src through a tap: src is in the row and, with SeqIdx, in t's document."""
    reads = (src >= 0) & (src < length)
    if HAS_SEQ_IDX:
        reads = reads & _same_document(SeqIdx, src, t, length)
    return reads


@triton.jit
def _preactivation(X, SeqIdx, taps, bias, d, t, d_mask, stride_xd, stride_xl, length, WIDTH: tl.constexpr,
                   CHANNEL_LAST: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_L: tl.constexpr):
    """bias + sum_k w_k x[t - (WIDTH - 1) + k] in fp32 for the tile (d, t), summed in the reference's order."""
    acc = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
    for k in tl.static_range(WIDTH):
        src = t - (WIDTH - 1) + k
        mask = d_mask[:, None] & _tap_reads(SeqIdx, src, t, length, HAS_SEQ_IDX)[None, :]
        x_k = tl.load(X + _tile_offsets(d, src, stride_xd, stride_xl, CHANNEL_LAST), mask=mask, other=0.0)
        acc += taps[k][:, None] * x_k.to(tl.float32)
    return acc + bias[:, None]


@triton.jit
def _load_bias(Bias, d, d_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(Bias + d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros(d.shape, tl.float32)
    return bias


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _split_vectors(x, V: tl.constexpr):
    """[BD, R, V] -> the V tensors x[:, :, c] ([BD, R]), c = 0..V-1. Each thread owns whole V-vectors (what one
    16-byte load brings), so this is register renaming, not data movement."""
    BD: tl.constexpr = x.shape[0]
    R: tl.constexpr = x.shape[1]
    if V == 8:
        e0, e1 = tl.split(tl.reshape(x, [BD, R, 2, 2, 2]))  # c = 4a + 2b + e
        e0b0, e0b1 = tl.split(e0)
        e1b0, e1b1 = tl.split(e1)
        c0, c4 = tl.split(e0b0)
        c2, c6 = tl.split(e0b1)
        c1, c5 = tl.split(e1b0)
        c3, c7 = tl.split(e1b1)
        return (c0, c1, c2, c3, c4, c5, c6, c7)
    else:
        e0, e1 = tl.split(tl.reshape(x, [BD, R, 2, 2]))  # c = 2a + e
        c0, c2 = tl.split(e0)
        c1, c3 = tl.split(e1)
        return (c0, c1, c2, c3)


@triton.jit
def _join_vectors(cs, V: tl.constexpr):
    """The inverse of _split_vectors: V tensors [BD, R] -> [BD, R, V]."""
    BD: tl.constexpr = cs[0].shape[0]
    R: tl.constexpr = cs[0].shape[1]
    if V == 8:
        e0 = tl.join(tl.join(cs[0], cs[4]), tl.join(cs[2], cs[6]))
        e1 = tl.join(tl.join(cs[1], cs[5]), tl.join(cs[3], cs[7]))
        return tl.reshape(tl.join(e0, e1), [BD, R, 8])
    else:
        return tl.reshape(tl.join(tl.join(cs[0], cs[2]), tl.join(cs[1], cs[3])), [BD, R, 4])


@triton.jit
def _fwd_channel_first_kernel(X, Weight, Bias, SeqIdx, Out, stride_xb, stride_xd, stride_ob, stride_od, dim, length,
                              length_key, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                              HAS_SEQ_IDX: tl.constexpr, V: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_L: tl.constexpr):
    """L is the unit-stride axis. Shifted loads (x[t - 1], ...) would be misaligned and compile to one 2-byte
    load per element; instead the block is read as 16-byte vectors of V positions, plus the V positions
    before each vector (aligned too, and cached), and the taps pick their inputs among those registers."""
    R: tl.constexpr = BLOCK_L // V
    position_block, d, b = _program_tile(tl.cdiv(length, BLOCK_L), dim, BLOCK_D)
    t = (position_block * BLOCK_L + tl.arange(0, R) * V)[None, :, None] + tl.arange(0, V)[None, None, :]
    d_mask = d < dim
    x_ptrs = X + b * stride_xb + d.to(tl.int64)[:, None, None] * stride_xd + t  # int64, see _tile_offsets
    mask = d_mask[:, None, None] & (t < length)
    cur = _split_vectors(tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32), V)
    prev_mask = d_mask[:, None, None] & (t >= V) & (t - V < length)  # by the positions it reads, t - V
    prev = _split_vectors(tl.load(x_ptrs - V, mask=prev_mask, other=0.0).to(tl.float32), V)
    taps = _load_taps(Weight, d, d_mask, WIDTH, BLOCK_D)
    bias = _load_bias(Bias, d, d_mask, HAS_BIAS)[:, None]
    if HAS_SEQ_IDX:  # this row's document ids, split like x: [1, R] per position of the vector
        SeqIdx += b * length
        seq_cur = _split_vectors(tl.load(SeqIdx + t, mask=t < length, other=0), V)
        seq_prev = _split_vectors(tl.load(SeqIdx + t - V, mask=(t >= V) & (t - V < length), other=0), V)
    outs = ()
    for c in tl.static_range(V):
        acc = tl.zeros([BLOCK_D, R], tl.float32)
        for k in tl.static_range(WIDTH):  # tap k of position c reads position c - (WIDTH - 1) + k of the vector
            if c + k >= WIDTH - 1:
                x_k = cur[c - (WIDTH - 1) + k]
                if HAS_SEQ_IDX:
                    x_k = tl.where(seq_cur[c - (WIDTH - 1) + k] == seq_cur[c], x_k, 0.0)
            else:  # before the vector: the end of the previous one
                x_k = prev[V + c - (WIDTH - 1) + k]
                if HAS_SEQ_IDX:
                    x_k = tl.where(seq_prev[V + c - (WIDTH - 1) + k] == seq_cur[c], x_k, 0.0)
            acc += taps[k][:, None] * x_k
        acc += bias
        if SILU:
            acc = acc * tl.sigmoid(acc)
        outs = outs + (acc,)
    out = _join_vectors(outs, V)
    tl.store(Out + b * stride_ob + d.to(tl.int64)[:, None, None] * stride_od + t, out.to(Out.dtype.element_ty),
             mask=mask)


@triton.jit
def _fwd_channel_last_kernel(X, Weight, Bias, SeqIdx, Out, stride_xb, stride_xl, stride_ob, stride_ol, dim, length,
                             length_key, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                             HAS_SEQ_IDX: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """dim is the unit-stride axis: the shifted tiles are other rows, aligned, so they are loaded directly."""
    position_block, d, b = _program_tile(tl.cdiv(length, BLOCK_L), dim, BLOCK_D)
    t = position_block * BLOCK_L + tl.arange(0, BLOCK_L)
    d_mask = d < dim
    taps = _load_taps(Weight, d, d_mask, WIDTH, BLOCK_D)
    bias = _load_bias(Bias, d, d_mask, HAS_BIAS)
    pre = _preactivation(X + b * stride_xb, SeqIdx + b * length, taps, bias, d, t, d_mask, 1, stride_xl, length,
                         WIDTH, True, HAS_SEQ_IDX, BLOCK_D, BLOCK_L)
    out = pre * tl.sigmoid(pre) if SILU else pre
    tl.store(Out + b * stride_ob + _tile_offsets(d, t, 1, stride_ol, True), out.to(Out.dtype.element_ty),
             mask=d_mask[:, None] & (t < length)[None, :])


# -- backward ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(X, Weight, Bias, SeqIdx, dOut, dX, PartialWeight, PartialBias,
                stride_xb, stride_xd, stride_xl, stride_gb, stride_gd, stride_gl,
                stride_dxb, stride_dxd, stride_dxl,
                batch, dim, length, chunk_len, length_key,
                WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, CHANNEL_LAST: tl.constexpr,
                DOUT_CHANNEL_LAST: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, MAX_WIDTH: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    chunk, d, b = _program_tile(tl.cdiv(length, chunk_len), dim, BLOCK_D)
    d_mask = d < dim
    X += b * stride_xb
    dOut += b * stride_gb
    dX += b * stride_dxb
    SeqIdx += b * length
    taps = _load_taps(Weight, d, d_mask, WIDTH, BLOCK_D)
    bias = _load_bias(Bias, d, d_mask, HAS_BIAS)
    tap_index = tl.arange(0, MAX_WIDTH)
    chunk_start = chunk * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, length)

    dweight = tl.zeros([BLOCK_D, MAX_WIDTH], tl.float32)
    dbias = tl.zeros([BLOCK_D], tl.float32)
    for start in range(chunk_start, chunk_end, BLOCK_L):
        t = start + tl.arange(0, BLOCK_L)
        in_chunk = t < chunk_end  # later positions belong to the next program
        dx = tl.zeros([BLOCK_D, BLOCK_L], tl.float32)
        for j in tl.static_range(WIDTH):  # g at t + j meets x at t through tap WIDTH - 1 - j
            t_j = t + j
            pre = _preactivation(X, SeqIdx, taps, bias, d, t_j, d_mask, stride_xd, stride_xl, length, WIDTH,
                                 CHANNEL_LAST, HAS_SEQ_IDX, BLOCK_D, BLOCK_L)
            mask = d_mask[:, None] & (t_j < length)[None, :]
            if HAS_SEQ_IDX:  # and position t + j reads x at t only within t's document
                mask = mask & _same_document(SeqIdx, t_j, t, length)[None, :]
            g = tl.load(dOut + _tile_offsets(d, t_j, stride_gd, stride_gl, DOUT_CHANNEL_LAST), mask=mask,
                        other=0.0).to(tl.float32)  # zero where it does not reach, so g is zero there too
            if SILU:
                sig = tl.sigmoid(pre)
                g = g * sig * (1.0 + pre * (1.0 - sig))
            dx += taps[WIDTH - 1 - j][:, None] * g
            if j == 0:  # g at the tile's own positions: its dweight and dbias contributions
                g = tl.where(in_chunk[None, :], g, 0.0)
                dbias += tl.sum(g, 1)
                for k in tl.static_range(WIDTH):
                    src = t - (WIDTH - 1) + k
                    x_mask = d_mask[:, None] & _tap_reads(SeqIdx, src, t, length, HAS_SEQ_IDX)[None, :]
                    x_k = tl.load(X + _tile_offsets(d, src, stride_xd, stride_xl, CHANNEL_LAST), mask=x_mask,
                                  other=0.0).to(tl.float32)
                    dweight += tl.where(tap_index[None, :] == k, tl.sum(g * x_k, 1)[:, None], 0.0)
        tl.store(dX + _tile_offsets(d, t, stride_dxd, stride_dxl, CHANNEL_LAST), dx.to(dX.dtype.element_ty),
                 mask=d_mask[:, None] & in_chunk[None, :])

    row = chunk * batch + b  # this program's row of the (chunks * batch, dim, ...) partial buffers
    tl.store(PartialWeight + (row * dim + d[:, None]) * WIDTH + tap_index[None, :], dweight,
             mask=d_mask[:, None] & (tap_index < WIDTH)[None, :])
    tl.store(PartialBias + row * dim + d, dbias, mask=d_mask)


# -- launching --------------------------------------------------------------------------------------------
def _configs(block_ds, block_ls, min_per_thread, max_per_thread):
    """Every (BLOCK_D, BLOCK_L, warps) whose tile gives each thread min_per_thread to max_per_thread elements:
    fewer than 8 leave threads without a whole 16-byte bf16 vector, more than the maximum spill registers
    (both checked in the PTX that triton 3.9 generates for sm_90)."""
    return [triton.Config({"BLOCK_D": bd, "BLOCK_L": bl}, num_warps=w) for bd in block_ds for bl in block_ls
            for w in (4, 8) if min_per_thread * 32 * w <= bd * bl <= max_per_thread * 32 * w]


# L rounded up to a power of two: one tuning per bucket, not per length. The kernels take it only as a key.
_TUNE_KEY = ["dim", "length_key", "WIDTH", "SILU", "HAS_SEQ_IDX"]
# Tiles are long along the unit-stride axis (coalesced, vectorised loads) and short along the other.
_fwd_kernels = {False: _fwd_channel_first_kernel, True: _fwd_channel_last_kernel}
_fwd_tuned = {
    False: autotune(_configs((1, 2, 4), (512, 1024), 8, 16), key=_TUNE_KEY)(_fwd_channel_first_kernel),
    True: autotune(_configs((64, 128), (8, 16, 32), 8, 16), key=_TUNE_KEY)(_fwd_channel_last_kernel),
}
# The backward keeps several tiles live (pre, g, dx and the shifted x), so its tiles are smaller.
_BWD_KEY = _TUNE_KEY + ["DOUT_CHANNEL_LAST"]
_bwd_tuned = {
    False: autotune(_configs((2, 4, 8), (128, 256, 512), 4, 8), key=_BWD_KEY)(_bwd_kernel),
    True: autotune(_configs((32, 64, 128), (8, 16, 32), 4, 8), key=_BWD_KEY)(_bwd_kernel),
}


def _launch(kernel, tuned, grid, *args, **constexprs) -> None:
    """Autotuned on a GPU; FIXED_BLOCKS elsewhere (the autotuner cannot run without a GPU driver)."""
    if AUTOTUNE and args[0].is_cuda and not triton_interpreting():
        tuned[grid](*args, **constexprs)
    else:
        kernel[grid(FIXED_BLOCKS)](*args, **constexprs, **FIXED_BLOCKS)


def _readable(t: Tensor) -> Tensor:
    """The kernels read channel-first or channel-last tensors in place; anything else is copied."""
    return t if t.stride(2) == 1 or t.stride(1) == 1 else t.contiguous()


def _contiguous(t: Tensor | None) -> Tensor | None:
    """The kernels read bias[d] and seq_idx[b, t] at offset d and b * L + t; a (dim,) or (batch, L) copy is cheap."""
    return None if t is None else t.contiguous()


def causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                      seq_idx: Tensor | None = None) -> Tensor:
    """out (batch, dim, L) in x's dtype and layout (see new_like_x). seq_idx (batch, L): document ids, or None."""
    x, weight, bias, seq_idx = _readable(x), weight.contiguous(), _contiguous(bias), _contiguous(seq_idx)
    batch, dim, length = x.shape
    out = new_like_x(x)
    channel_last = is_channel_last(x)
    grid = lambda meta: flat_grid("causal_conv1d", triton.cdiv(length, meta["BLOCK_L"]),  # noqa: E731
                                  triton.cdiv(dim, meta["BLOCK_D"]), batch)
    strides = (x.stride(0), x.stride(2 if channel_last else 1), out.stride(0), out.stride(2 if channel_last else 1))
    # channel-first: V positions per 16-byte vector (block lengths are multiples of 8)
    vector = {} if channel_last else {"V": 16 // x.element_size()}
    _launch(_fwd_kernels[channel_last], _fwd_tuned[channel_last], grid, x, weight, weight if bias is None else bias,
            x if seq_idx is None else seq_idx, out, *strides, dim, length, triton.next_power_of_2(length),
            WIDTH=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ_IDX=seq_idx is not None, **vector)
    return out


def causal_conv1d_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                      seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype and layout, dweight (dim, width) in weight's dtype, dbias (dim,) in bias's dtype,
    float32 without a bias); deterministic."""
    x, grad_out, weight = _readable(x), _readable(grad_out), weight.contiguous()
    bias, seq_idx = _contiguous(bias), _contiguous(seq_idx)
    batch, dim, length = x.shape
    width = weight.shape[1]
    n_chunks = triton.cdiv(length, BWD_CHUNK_LEN)
    dx = new_like_x(x)
    partial_weight = torch.empty((n_chunks * batch, dim, width), dtype=torch.float32, device=x.device)
    partial_bias = torch.empty((n_chunks * batch, dim), dtype=torch.float32, device=x.device)
    grid = lambda meta: flat_grid("causal_conv1d", n_chunks, triton.cdiv(dim, meta["BLOCK_D"]), batch)  # noqa: E731
    channel_last = is_channel_last(x)
    _launch(_bwd_kernel, _bwd_tuned[channel_last], grid, x, weight, weight if bias is None else bias,
            x if seq_idx is None else seq_idx, grad_out, dx, partial_weight, partial_bias,
            *x.stride(), *grad_out.stride(), *dx.stride(),
            batch, dim, length, BWD_CHUNK_LEN, triton.next_power_of_2(length),
            WIDTH=width, HAS_BIAS=bias is not None, SILU=silu, CHANNEL_LAST=channel_last,
            DOUT_CHANNEL_LAST=is_channel_last(grad_out), HAS_SEQ_IDX=seq_idx is not None, MAX_WIDTH=MAX_WIDTH)
    dweight = partial_weight.sum(0).to(weight.dtype)
    dbias = partial_bias.sum(0).to(torch.float32 if bias is None else bias.dtype)
    return dx, dweight, dbias
