"""Mamba-1 selective scan in Triton: a chunked forward and a backward that recomputes the states.

Semantics and layouts are those of `reference.py`: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, G, N, L)
(ungrouped inputs arrive as G = 1); D, delta_bias (dim,). Every input may be fp32/fp16/bf16 and is upcast to fp32
right after loading; states and sums are fp32.

Work split, forward and backward alike: one program per (block of BLOCK_D channels, batch, group). A block never
straddles two groups, so it reads one (N, L) slice of B and C. The program walks L in chunks of CHUNK positions
and, inside a chunk, loops over the N state columns (as mamba_ssm's CUDA kernel does): for column n the chunk's
decays a_t = exp(delta_t A_n) and inputs b_t = delta_t u_t B_nt form a (BLOCK_D, CHUNK) tile, and one
tl.associative_scan along time composes the affine maps h -> a h + b, so h_t = (prod a) h_start + (scanned b).
The running state (BLOCK_D, N) stays in registers across chunks. Padded positions get delta = 0 (a = 1, b = 0),
so they carry the state through unchanged and the chunk's last column is the state after its last real position.

Packed documents (seq_idx, a pointer with the HAS_SEQ_IDX flag, so seq_idx=None compiles the kernels without it):
the decay a_t is 0 where a document starts (t > 0, id differs from position t - 1's), which the scans compose like
any other decay, so neither the state nor the adjoint crosses the cut (and there h_t - b_t = 0: no decay gradient).

The forward saves the state at the start of every chunk, (batch, dim, n_chunks, N) fp32. The backward walks the
chunks in reverse: it recomputes the chunk's states from that saved start, runs the adjoint recurrence
dh_t = C_t dy_t + a_{t+1} dh_{t+1} as a reverse scan (a_{t+1} comes from a second load of delta shifted by one
position; the last column's neighbour is the next chunk's first position), carries dh across chunk boundaries,
and forms every gradient from h, dh and a h_{t-1} = h_t - b_t. Nothing is written by two programs (no atomics,
hence deterministic): sums over channels (dB, dC) and over batch (dA, dD, ddelta_bias) land in per-program partial
buffers that the launcher adds up in torch in a fixed order.

Grids are flat (kernels/common/launch.py), so a big batch * groups passes no CUDA grid limit, and every offset is
int64. Under TRITON_INTERPRET=1 fixed small blocks replace the autotuner, which needs a GPU driver.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.common.launch import flat_grid
from archlab.kernels.selective_scan.op import GPU_CHUNK_LEN

__all__ = ["selective_scan_fwd", "selective_scan_bwd"]

# On a GPU the forward autotunes BLOCK_D and num_warps. The backward tunes only num_warps: its dB/dC partial
# buffers have one slot per channel block, so BLOCK_D must be known before launch. Without a GPU (or with
# AUTOTUNE off) the FIXED blocks are used: small, so tests cross several channel blocks.
AUTOTUNE = True
FIXED_BLOCK_D = 4
# Register budget, from ptxas -v on sm_90 (triton 3.9, N = 16, all options on), at GPU_CHUNK_LEN = 32 positions:
# each (BLOCK_D x CHUNK) tile element a thread holds costs ~30 registers in the forward and ~60 in the backward
# (the loop over n keeps many tiles live). Forward: 1-2 elements per thread (BLOCK_D * CHUNK <= 64 * warps) stays
# at 56-128 registers without spills, 4 spill. Backward: 16 channels at 4 or 8 warps uses 243 or 175 registers,
# no spills; 16 channels also keeps the dB/dC partials at dim / 16 slots (2 x 134 MB at B8 D2048 L2048 N16).
GPU_BWD_BLOCK_D = 16
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch's F.softplus: above it softplus(x) == x in fp32


# -- shared pieces ----------------------------------------------------------------------------------------
@triton.jit
def _compose(a_first, b_first, a_then, b_then):
    """The affine map h -> a_then (a_first h + b_first) + b_then: what scanning the recurrence composes."""
    return a_first * a_then, a_then * b_first + b_then


@triton.jit
def _program_block(dim_per_group, BLOCK_D: tl.constexpr):
    """This program's (block of channels in its group, batch * group index). The grid is flat, channel blocks fastest
    (kernels/common/launch.py: CUDA caps grid axis 1 at 65535, which batch * groups can pass); the index is int64."""
    n_blocks = tl.cdiv(dim_per_group, BLOCK_D)
    return tl.program_id(0) % n_blocks, (tl.program_id(0) // n_blocks).to(tl.int64)


@triton.jit
def _softplus(x):
    # log1p is unavailable in the interpreter; for x < -15 log(1 + e^x) loses relative, not absolute, precision.
    # The minimum keeps exp from overflowing in the branch that where() discards.
    return tl.where(x > SOFTPLUS_THRESHOLD, x, tl.log(1.0 + tl.exp(tl.minimum(x, SOFTPLUS_THRESHOLD))))


@triton.jit
def _load_delta(Delta, offsets, mask, bias, HAS_DELTA_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta' = softplus(delta + bias) as fp32, and 0 where masked (a = 1, b = 0: padding leaves h unchanged).
    Also returns the pre-softplus value, whose sigmoid is the softplus derivative."""
    pre = tl.load(Delta + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA_BIAS:
        pre = pre + bias[:, None]
    delta = _softplus(pre) if SOFTPLUS else pre
    return tl.where(mask, delta, 0.0), pre


@triton.jit
def _document_starts(SeqIdx, positions, L, stride_sl):
    """True where position t (of the row SeqIdx points to) starts a new document: 0 < t < L and its id differs from
    position t - 1's. Only neighbours are compared, so a flipped seq_idx works the same."""
    inside = (positions > 0) & (positions < L)
    here = tl.load(SeqIdx + positions * stride_sl, mask=inside, other=0)
    before = tl.load(SeqIdx + (positions - 1) * stride_sl, mask=inside, other=0)
    return inside & (here != before)


@triton.jit
def _decays(delta, a_n, starts, HAS_SEQ_IDX: tl.constexpr):
    """exp(delta' A_n) over a (BLOCK_D, CHUNK) tile, 0 at the positions where a document starts."""
    decay = tl.exp(delta * a_n[:, None])
    if HAS_SEQ_IDX:
        decay = tl.where(starts[None, :], 0.0, decay)
    return decay


@triton.jit
def _column(tile, cols, n):
    """Column n of a register tile whose column indices are `cols` (Triton tiles cannot be indexed): a state
    column of a (BLOCK_D, N_PAD) tile, or a time step of a (BLOCK_D, CHUNK) one."""
    return tl.sum(tl.where(cols[None, :] == n, tile, 0.0), 1)


@triton.jit
def _set_column(tile, cols, n, values):
    return tl.where(cols[None, :] == n, values[:, None], tile)


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(U, Delta, A, B, C, Dskip, Z, DeltaBias, SeqIdx, Out, LastState, ChunkStates,
                stride_ub, stride_ud, stride_ul, stride_deltab, stride_deltad, stride_deltal,
                stride_ad, stride_an, stride_bb, stride_bg, stride_bn, stride_bl,
                stride_cb, stride_cg, stride_cn, stride_cl, stride_zb, stride_zd, stride_zl, stride_sb, stride_sl,
                stride_ob, stride_od, stride_ol,
                dim, dim_per_group, n_groups, L, N, n_chunks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ_IDX: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    # int64 batch, channel and position indices, so every offset is int64: a batch offset overflows int32 in a
    # big batch, and so does position * stride_l in a channel-last view (stride 2 * dim for z in the Mamba block)
    block, bg = _program_block(dim_per_group, BLOCK_D)
    b, g = bg // n_groups, bg % n_groups
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = in_group < dim_per_group
    channels = g * dim_per_group + in_group
    cols = tl.arange(0, N_PAD)
    steps = tl.arange(0, CHUNK)
    state_mask = d_mask[:, None] & (cols[None, :] < N)
    B += b * stride_bb + g * stride_bg
    C += b * stride_cb + g * stride_cg
    SeqIdx += b * stride_sb
    bias = tl.load(DeltaBias + channels, mask=d_mask, other=0.0).to(tl.float32) if HAS_DELTA_BIAS else None
    skip = tl.load(Dskip + channels, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else None
    # (batch, dim, n_chunks, N) contiguous; rows of the state tile are channels
    chunk_state_ptrs = ChunkStates + (b * dim + channels[:, None]) * n_chunks * N + cols[None, :]

    state = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    for chunk in range(n_chunks):
        tl.store(chunk_state_ptrs + chunk * N, state, mask=state_mask)  # the backward restarts from here
        positions = (chunk * CHUNK + steps).to(tl.int64)
        mask = d_mask[:, None] & (positions[None, :] < L)
        u = tl.load(U + b * stride_ub + channels[:, None] * stride_ud + positions[None, :] * stride_ul,
                    mask=mask, other=0.0).to(tl.float32)
        delta, _ = _load_delta(Delta, b * stride_deltab + channels[:, None] * stride_deltad
                               + positions[None, :] * stride_deltal, mask, bias, HAS_DELTA_BIAS, SOFTPLUS)
        delta_u = delta * u
        y = u * skip[:, None] if HAS_D else tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        starts = _document_starts(SeqIdx, positions, L, stride_sl) if HAS_SEQ_IDX else None
        for n in range(N):
            n64 = tl.cast(n, tl.int64)  # n * stride_bn overflows int32 once B's (N, L) slice reaches 2**31
            a_n = tl.load(A + channels * stride_ad + n64 * stride_an, mask=d_mask, other=0.0).to(tl.float32)
            b_n = tl.load(B + n64 * stride_bn + positions * stride_bl, mask=positions < L, other=0.0).to(tl.float32)
            c_n = tl.load(C + n64 * stride_cn + positions * stride_cl, mask=positions < L, other=0.0).to(tl.float32)
            decay_prod, input_sum = tl.associative_scan((_decays(delta, a_n, starts, HAS_SEQ_IDX),
                                                         delta_u * b_n[None, :]), 1, _compose)
            h = decay_prod * _column(state, cols, n)[:, None] + input_sum
            y += h * c_n[None, :]
            state = _set_column(state, cols, n, _column(h, steps, CHUNK - 1))
        if HAS_Z:
            z = tl.load(Z + b * stride_zb + channels[:, None] * stride_zd + positions[None, :] * stride_zl,
                        mask=mask, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Out + b * stride_ob + channels[:, None] * stride_od + positions[None, :] * stride_ol,
                 y.to(Out.dtype.element_ty), mask=mask)
    tl.store(LastState + (b * dim + channels[:, None]) * N + cols[None, :], state, mask=state_mask)


# -- backward ---------------------------------------------------------------------------------------------
@triton.jit
def _bwd_kernel(U, Delta, A, B, C, Dskip, Z, DeltaBias, SeqIdx, dOut, ChunkStates,
                dU, dDelta, dZ, dA_part, dB_part, dC_part, dD_part, dBias_part,
                stride_ub, stride_ud, stride_ul, stride_deltab, stride_deltad, stride_deltal,
                stride_ad, stride_an, stride_bb, stride_bg, stride_bn, stride_bl,
                stride_cb, stride_cg, stride_cn, stride_cl, stride_zb, stride_zd, stride_zl, stride_sb, stride_sl,
                stride_gb, stride_gd, stride_gl,
                dim, dim_per_group, n_groups, L, N, n_chunks,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_DELTA_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_SEQ_IDX: tl.constexpr, N_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    block, bg = _program_block(dim_per_group, BLOCK_D)  # int64 offsets, as in the forward
    b, g = bg // n_groups, bg % n_groups
    in_group = block * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = in_group < dim_per_group
    channels = g * dim_per_group + in_group
    cols = tl.arange(0, N_PAD)
    steps = tl.arange(0, CHUNK)
    state_mask = d_mask[:, None] & (cols[None, :] < N)
    B += b * stride_bb + g * stride_bg
    C += b * stride_cb + g * stride_cg
    SeqIdx += b * stride_sb
    # dB/dC partials (batch, G, n_blocks, N, L) fp32: this program's slot (bg, block), the flat program index;
    # summed over blocks by the launcher
    part_offset = tl.program_id(0).to(tl.int64) * N * L
    dB_part += part_offset
    dC_part += part_offset
    bias = tl.load(DeltaBias + channels, mask=d_mask, other=0.0).to(tl.float32) if HAS_DELTA_BIAS else None
    skip = tl.load(Dskip + channels, mask=d_mask, other=0.0).to(tl.float32) if HAS_D else None
    chunk_state_ptrs = ChunkStates + (b * dim + channels[:, None]) * n_chunks * N + cols[None, :]

    dh_carry = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)  # dL/dh at the first position of the next chunk
    dA_acc = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dBias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for reverse_index in range(n_chunks):
        chunk = n_chunks - 1 - reverse_index
        positions = (chunk * CHUNK + steps).to(tl.int64)
        mask = d_mask[:, None] & (positions[None, :] < L)
        next_mask = d_mask[:, None] & (positions[None, :] + 1 < L)
        grad_offsets = b * dim * L + channels[:, None] * L + positions[None, :]  # gradients are contiguous
        u_offsets = b * stride_ub + channels[:, None] * stride_ud + positions[None, :] * stride_ul
        u = tl.load(U + u_offsets, mask=mask, other=0.0).to(tl.float32)
        delta_offsets = b * stride_deltab + channels[:, None] * stride_deltad + positions[None, :] * stride_deltal
        delta, delta_pre = _load_delta(Delta, delta_offsets, mask, bias, HAS_DELTA_BIAS, SOFTPLUS)
        delta_next, _ = _load_delta(Delta, delta_offsets + stride_deltal, next_mask, bias, HAS_DELTA_BIAS, SOFTPLUS)
        grad_out = tl.load(dOut + b * stride_gb + channels[:, None] * stride_gd + positions[None, :] * stride_gl,
                           mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            z_offsets = b * stride_zb + channels[:, None] * stride_zd + positions[None, :] * stride_zl
            z = tl.load(Z + z_offsets, mask=mask, other=0.0).to(tl.float32)
            gate = z * tl.sigmoid(z)
            dy = grad_out * gate
        else:
            dy = grad_out
        delta_u = delta * u
        y = u * skip[:, None] if HAS_D else tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        du = dy * skip[:, None] if HAS_D else tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        ddelta = tl.zeros([BLOCK_D, CHUNK], dtype=tl.float32)
        start_state = tl.load(chunk_state_ptrs + chunk * N, mask=state_mask, other=0.0)
        starts = _document_starts(SeqIdx, positions, L, stride_sl) if HAS_SEQ_IDX else None
        next_starts = _document_starts(SeqIdx, positions + 1, L, stride_sl) if HAS_SEQ_IDX else None
        for n in range(N):
            n64 = tl.cast(n, tl.int64)  # n * stride_bn overflows int32 once B's (N, L) slice reaches 2**31
            a_n = tl.load(A + channels * stride_ad + n64 * stride_an, mask=d_mask, other=0.0).to(tl.float32)
            b_n = tl.load(B + n64 * stride_bn + positions * stride_bl, mask=positions < L, other=0.0).to(tl.float32)
            c_n = tl.load(C + n64 * stride_cn + positions * stride_cl, mask=positions < L, other=0.0).to(tl.float32)
            inputs = delta_u * b_n[None, :]
            decay_prod, input_sum = tl.associative_scan((_decays(delta, a_n, starts, HAS_SEQ_IDX), inputs), 1,
                                                        _compose)
            h = decay_prod * _column(start_state, cols, n)[:, None] + input_sum
            y += h * c_n[None, :]
            # adjoint, run backwards in time: dh_t = C_t dy_t + a_{t+1} dh_{t+1}
            carry_prod, carry_sum = tl.associative_scan((_decays(delta_next, a_n, next_starts, HAS_SEQ_IDX),
                                                         dy * c_n[None, :]), 1, _compose, reverse=True)
            dh = carry_prod * _column(dh_carry, cols, n)[:, None] + carry_sum
            dh_carry = _set_column(dh_carry, cols, n, _column(dh, steps, 0))
            # a_t h_{t-1} = h_t - b_t: the decay's gradient term without a division or a shifted tile
            decay_term = dh * (h - inputs)
            du += dh * delta * b_n[None, :]
            ddelta += dh * u * b_n[None, :] + decay_term * a_n[:, None]
            dA_acc += tl.where(cols[None, :] == n, tl.sum(decay_term * delta, 1)[:, None], 0.0)
            tl.store(dB_part + n64 * L + positions, tl.sum(dh * delta_u, 0), mask=positions < L)
            tl.store(dC_part + n64 * L + positions, tl.sum(dy * h, 0), mask=positions < L)
        if HAS_Z:
            sig = tl.sigmoid(z)
            dz = grad_out * y * sig * (1.0 + z * (1.0 - sig))
            tl.store(dZ + grad_offsets, dz.to(dZ.dtype.element_ty), mask=mask)
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(delta_pre)
        ddelta = tl.where(mask, ddelta, 0.0)
        dD_acc += tl.sum(dy * u, 1)
        dBias_acc += tl.sum(ddelta, 1)
        tl.store(dU + grad_offsets, du.to(dU.dtype.element_ty), mask=mask)
        tl.store(dDelta + grad_offsets, ddelta.to(dDelta.dtype.element_ty), mask=mask)
    tl.store(dA_part + (b * dim + channels[:, None]) * N + cols[None, :], dA_acc, mask=state_mask)
    tl.store(dD_part + b * dim + channels, dD_acc, mask=d_mask)
    tl.store(dBias_part + b * dim + channels, dBias_acc, mask=d_mask)


# -- launching --------------------------------------------------------------------------------------------
# Keyed on the shapes that decide the best tile, not on L or batch (those only change the loop and grid).
_TUNE_KEY = ["dim_per_group", "N", "N_PAD", "CHUNK", "HAS_Z"]
_fwd_tuned = autotune([triton.Config({"BLOCK_D": d}, num_warps=w) for d in (4, 8, 16) for w in (2, 4, 8)
                       if 32 * w <= d * GPU_CHUNK_LEN <= 64 * w], key=_TUNE_KEY)(_fwd_kernel)
_bwd_tuned = autotune([triton.Config({}, num_warps=w) for w in (4, 8)], key=_TUNE_KEY)(_bwd_kernel)


def _on_gpu(t: Tensor) -> bool:
    return AUTOTUNE and t.is_cuda and not triton_interpreting()


def _bwd_block_d(t: Tensor) -> int:
    return GPU_BWD_BLOCK_D if _on_gpu(t) else FIXED_BLOCK_D


def _with_group_axis(BC: Tensor) -> Tensor:
    """(batch, N, L) -> (batch, 1, N, L): ungrouped B/C as one group (a view); grouped ones unchanged."""
    return BC if BC.ndim == 4 else BC.unsqueeze(1)


def _contiguous_params(D: Tensor | None, delta_bias: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The kernels index D and delta_bias by channel with unit stride; they are (dim,), so copies are free."""
    return tuple(None if t is None else t.contiguous() for t in (D, delta_bias))


def _present_or(placeholder: Tensor, *optional: Tensor | None) -> tuple[Tensor, ...]:
    """The optional inputs, `placeholder` for an absent one (its kernel flag keeps it unread)."""
    return tuple(placeholder if t is None else t for t in optional)


def _common_args(u, delta, A, B, C, z, seq_idx):
    zs = z.stride() if z is not None else (0, 0, 0)
    seq_strides = seq_idx.stride() if seq_idx is not None else (0, 0)
    return (*u.stride(), *delta.stride(), *A.stride(), *B.stride(), *C.stride(), *zs, *seq_strides)


def _shape_args(u: Tensor, A: Tensor, B: Tensor, chunk_len: int):
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], A.shape[1]
    return batch, dim, length, n_groups, n_state, triton.cdiv(length, chunk_len)


def _constexprs(D, z, delta_bias, seq_idx, delta_softplus: bool, n_state: int, chunk_len: int) -> dict:
    if chunk_len < 2 or chunk_len & (chunk_len - 1):
        raise ValueError(f"triton selective_scan: chunk_len must be a power of two >= 2, got {chunk_len}")
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_DELTA_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, HAS_SEQ_IDX=seq_idx is not None, N_PAD=triton.next_power_of_2(n_state),
                CHUNK=chunk_len)


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, chunk_len: int,
                       seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (batch, dim, L) in u.dtype, the last state (batch, dim, N) fp32 and the state at the start of
    every chunk of `chunk_len` positions (batch, dim, n_chunks, N) fp32, which the backward restarts from.
    seq_idx (batch, L) int32/int64: the state resets where the document id changes."""
    B, C = _with_group_axis(B), _with_group_axis(C)
    D, delta_bias = _contiguous_params(D, delta_bias)
    batch, dim, length, n_groups, n_state, n_chunks = _shape_args(u, A, B, chunk_len)
    constexprs = _constexprs(D, z, delta_bias, seq_idx, delta_softplus, n_state, chunk_len)
    out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    last_state = torch.empty(batch, dim, n_state, dtype=torch.float32, device=u.device)
    chunk_states = torch.empty(batch, dim, n_chunks, n_state, dtype=torch.float32, device=u.device)
    args = (u, delta, A, B, C, *_present_or(u, D, z, delta_bias, seq_idx), out, last_state, chunk_states,
            *_common_args(u, delta, A, B, C, z, seq_idx), *out.stride(),
            dim, dim // n_groups, n_groups, length, n_state, n_chunks)
    if _on_gpu(u):
        grid = lambda meta: flat_grid("selective_scan", triton.cdiv(dim // n_groups, meta["BLOCK_D"]),  # noqa: E731
                                      batch * n_groups)
        _fwd_tuned[grid](*args, **constexprs)
    else:
        _fwd_kernel[flat_grid("selective_scan", triton.cdiv(dim // n_groups, FIXED_BLOCK_D), batch * n_groups)](
            *args, **constexprs, BLOCK_D=FIXED_BLOCK_D)
    return out, last_state, chunk_states


def selective_scan_bwd(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, chunk_states: Tensor,
                       delta_softplus: bool, chunk_len: int,
                       seq_idx: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the dtypes and shapes of the inputs, None for an
    absent optional input; deterministic (every sum runs in a fixed order)."""
    grouped = B.ndim == 4
    B4, C4 = _with_group_axis(B), _with_group_axis(C)
    D, delta_bias = _contiguous_params(D, delta_bias)  # dD, ddelta_bias come back (dim,): the callers' shape
    batch, dim, length, n_groups, n_state, n_chunks = _shape_args(u, A, B4, chunk_len)
    constexprs = _constexprs(D, z, delta_bias, seq_idx, delta_softplus, n_state, chunk_len)
    chunk_states = chunk_states.contiguous()
    block_d = _bwd_block_d(u)
    n_blocks = triton.cdiv(dim // n_groups, block_d)
    f32 = dict(dtype=torch.float32, device=u.device)
    du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    ddelta = torch.empty(delta.shape, dtype=delta.dtype, device=u.device)
    dz = torch.empty(z.shape, dtype=z.dtype, device=u.device) if z is not None else du
    dA_part = torch.empty(batch, dim, n_state, **f32)
    dB_part = torch.empty(batch, n_groups, n_blocks, n_state, length, **f32)
    dC_part = torch.empty(batch, n_groups, n_blocks, n_state, length, **f32)
    dD_part = torch.empty(batch, dim, **f32)
    dBias_part = torch.empty(batch, dim, **f32)
    args = (u, delta, A, B4, C4, *_present_or(u, D, z, delta_bias, seq_idx), grad_out, chunk_states,
            du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dBias_part,
            *_common_args(u, delta, A, B4, C4, z, seq_idx), *grad_out.stride(),
            dim, dim // n_groups, n_groups, length, n_state, n_chunks)
    grid = flat_grid("selective_scan", n_blocks, batch * n_groups)
    if _on_gpu(u):
        _bwd_tuned[grid](*args, **constexprs, BLOCK_D=block_d)
    else:
        _bwd_kernel[grid](*args, **constexprs, BLOCK_D=block_d)

    def reduced(part: Tensor, like: Tensor) -> Tensor:  # (batch, G, n_blocks, N, L) -> B's shape
        total = part.sum(2)
        return (total if grouped else total[:, 0]).to(like.dtype)

    return (du, ddelta, dA_part.sum(0).to(A.dtype), reduced(dB_part, B), reduced(dC_part, C),
            dD_part.sum(0).to(D.dtype) if D is not None else None, dz if z is not None else None,
            dBias_part.sum(0).to(delta_bias.dtype) if delta_bias is not None else None)
