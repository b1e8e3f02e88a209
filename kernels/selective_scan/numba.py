"""Mamba-1 selective scan on the CPU with numba: fused forward and backward, the state never leaves the cache.

Semantics and layouts are those of `reference.py`. The launchers convert at the boundary: every input to float32
(numba has no bfloat16; float32 inputs are read in place through their strides, as z, a channel slice of the
Mamba block's in_proj output), B and C to (batch, G, L, N) rows; out, du, ddelta and dz come back as (batch, dim,
L) tensors that are channel-last in memory, the layout of the Mamba block's projections on either side.

Work split, forward and backward alike (as the Triton kernel's): one task per (batch, group, block of up to
CHANNEL_BLOCK channels). A task holds its channels' states as an (N, channels) tile and walks the positions in
chunks of `chunk_len`: it copies the chunk's u, delta (and z) into (positions, channels) tiles, forms delta' =
softplus(delta + bias) for all of them, then per position and state column n runs h = exp(delta' A_n) h +
delta' u B_n and y += C_n h across the channels. Channels are the innermost loop because LLVM vectorises that
loop well (64 channels: 8 AVX2 vectors); a per-channel loop over N = 16 is too short to (the adjoint ran 2.6x
slower that way on a Zen 3). `_exp`, `_softplus` and `_sigmoid` are polynomials, not libm calls, so their loops
vectorise too. The tasks are cut into one contiguous range per torch thread (torch.get_num_threads()), run on a
small thread pool: the kernels release the GIL. (numba.prange did the same 2-3x slower to compile, and its
default OpenMP threads spin next to torch's.)

Packed documents (seq_idx): where a document starts the forward zeroes the state tile before the position, and the
backward's recomputed decays are 0 there, so neither the state nor the adjoint crosses the cut.

The forward saves the states every `chunk_len` positions, (batch, dim, n_chunks, N) as the Triton kernel does.
The backward walks the chunks last first: it recomputes the chunk's states, decays and pre-gate outputs from the
saved states, then runs the adjoint dh_t = C_t dy_t + a_{t+1} dh_{t+1} backwards through them, writing du, ddelta
and dz and adding dA, dD, ddelta_bias per (batch, channel) and dB, dC per (batch, group, block, position) into
partial buffers that only this task writes. `_sum_partials` adds those up in a fixed order, so gradients do not
depend on the thread count.

Each kernel has one explicit signature (absent inputs are flags plus empty arrays, strided ones have layout "A"),
so it compiles once, when this module is first imported (~15 s), and `cache=True` keeps the machine code for
later processes in __pycache__ next to this file (or under $NUMBA_CACHE_DIR; loading it takes ~1 s).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch
from torch import Tensor

from archlab.kernels.selective_scan.reference import document_continues

__all__ = ["selective_scan_fwd", "selective_scan_bwd"]

# Channels per task. Fixed, not derived from the thread count: dB and dC are summed over a block's channels and
# then over blocks, so a fixed block keeps every sum in one order. 64 channels make 8 AVX2 vectors per loop.
CHANNEL_BLOCK = 64
# reassoc lets LLVM vectorise the sums over channels; no nnan/ninf: a NaN must reach the loss (the trainer stops).
# Every function also takes error_model="numpy": under numba's default a float division checks for zero and can
# raise, a branch out of the loop that keeps LLVM from vectorising any loop with a division (softplus, sigmoid).
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}

# _exp: exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its Taylor series to r^7
# (truncation below 1e-8 relative, under float32's eps); ln 2 in two parts so that k ln 2 is exact
LOG2_E, LN2_HIGH, LN2_LOW = np.float32(1.4426950408889634), np.float32(0.693145751953125), np.float32(1.42860677e-6)
EXP_LOW, EXP_HIGH = np.float32(-87.0), np.float32(88.0)  # 2^k stays a normal float32 in between
EXP_TAYLOR = tuple(np.float32(1 / math.factorial(k)) for k in range(8))
# _log1p_unit: log(1 + y) = 2 atanh(s), s = y / (2 + y) <= 1/3 for 0 <= y <= 1: 2 s sum s^2k / (2k + 1), k <= 7
ATANH_SERIES = tuple(np.float32(1 / (2 * k + 1)) for k in range(8))


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _exp(x):
    """float32 exp within 2 ulp on [-87, 88]; 0 below (exp < 1.7e-38 there), inf above; NaN stays NaN (min and
    max return their first argument when it is NaN: keep x first)."""
    clamped = min(max(x, EXP_LOW), EXP_HIGH)
    k = np.floor(clamped * LOG2_E + np.float32(0.5))
    r = (clamped - k * LN2_HIGH) - k * LN2_LOW
    c = EXP_TAYLOR  # Horner, written out: a loop here would keep LLVM from vectorising the callers' loops
    p = ((((((c[7] * r + c[6]) * r + c[5]) * r + c[4]) * r + c[3]) * r + c[2]) * r + c[1]) * r + c[0]
    result = p * np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)
    if x < EXP_LOW:
        result = np.float32(0.0)
    if x > EXP_HIGH:
        result = np.float32(np.inf)
    return result


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _log1p_unit(y):
    """log(1 + y) for 0 <= y <= 1, within 2 ulp also for tiny y."""
    s = y / (np.float32(2.0) + y)
    s2 = s * s
    c = ATANH_SERIES
    p = ((((((c[7] * s2 + c[6]) * s2 + c[5]) * s2 + c[4]) * s2 + c[3]) * s2 + c[2]) * s2 + c[1]) * s2 + c[0]
    return np.float32(2.0) * s * p


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): no overflow, and exactly x above 17 as torch's (x above 20)."""
    return max(x, np.float32(0.0)) + _log1p_unit(_exp(-abs(x)))


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _sigmoid(x):
    return np.float32(1.0) / (np.float32(1.0) + _exp(-x))


@numba.njit(error_model="numpy")
def _task(task, n_groups, n_blocks, per_group):
    """(batch index, group, block, its first channel, its channel count) of a task index."""
    b, g, block = task // (n_groups * n_blocks), task // n_blocks % n_groups, task % n_blocks
    first = g * per_group + block * CHANNEL_BLOCK
    return b, g, block, first, min(CHANNEL_BLOCK, (g + 1) * per_group - first)


@numba.njit(error_model="numpy")
def _channel_params(A, D, bias, has_d, has_bias, first, width):
    """A as an (N, width) tile, D and bias as (width,): zeros where absent (adding 0 changes nothing)."""
    A_tile = np.ascontiguousarray(A[first:first + width].T)
    D_block = D[first:first + width].copy() if has_d else np.zeros(width, np.float32)
    bias_block = bias[first:first + width].copy() if has_bias else np.zeros(width, np.float32)
    return A_tile, D_block, bias_block


@numba.njit(error_model="numpy")
def _tiles(count, rows, width):
    """`count` float32 (rows, width) tiles, one allocation each."""
    return [np.empty((rows, width), np.float32) for _ in range(count)]


@numba.njit(error_model="numpy")
def _load(stream, b, first, start, into):
    """into[j, c] = stream[b, first + c, start + j]: a chunk of positions x the task's channels, read along the
    stream's faster axis (a per-position gather across channels of a (batch, dim, L) tensor hits one cache set)."""
    if stream.strides[1] < stream.strides[2]:  # channel-last
        for j in range(into.shape[0]):
            for c in range(into.shape[1]):
                into[j, c] = stream[b, first + c, start + j]
    else:
        for c in range(into.shape[1]):
            for j in range(into.shape[0]):
                into[j, c] = stream[b, first + c, start + j]


_STREAM = "f4[:, :, :]"  # u, delta, z, grad_out: any strides
_ROWS = "f4[:, :, :, ::1]"  # B, C as (batch, G, L, N)
# ..., z, bias, continues (batch, L): 1 where the state carries on, 0 where a document starts; has_d, has_z, has_bias,
# has_seq_idx, softplus, chunk_len
_INPUTS = (f"{_STREAM}, {_STREAM}, f4[:, ::1], {_ROWS}, {_ROWS}, f4[::1], {_STREAM}, f4[::1], f4[:, ::1], "
           "b1, b1, b1, b1, b1, i8")


@numba.njit(f"void({_INPUTS}, f4[:, :, ::1], f4[:, :, ::1], f4[:, :, :, ::1], i8, i8)",
            nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _forward(u, delta, A, B, C, D, z, bias, continues, has_d, has_z, has_bias, has_seq_idx, softplus, chunk_len,
             out, last_state, chunk_states, first_task, end_task):
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], A.shape[1]
    per_group = dim // n_groups
    n_blocks, n_chunks = (per_group + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK, chunk_states.shape[2]
    for task in range(first_task, end_task):
        b, g, _, first, width = _task(task, n_groups, n_blocks, per_group)
        A_tile, D_block, bias_block = _channel_params(A, D, bias, has_d, has_bias, first, width)
        h = np.zeros((n_state, width), np.float32)
        # one chunk of positions x the task's channels: u, delta', delta' u, the output, z
        inputs, steps, step_us, outputs, gates = _tiles(5, chunk_len, width)
        for chunk in range(n_chunks):
            start = chunk * chunk_len
            size = min(chunk_len, length - start)
            chunk_states[b, first:first + width, chunk] = h.T
            _load(u, b, first, start, inputs[:size])
            _load(delta, b, first, start, steps[:size])
            for j in range(size):
                for c in range(width):
                    pre = steps[j, c] + bias_block[c]
                    steps[j, c] = _softplus(pre) if softplus else pre
                    step_us[j, c] = steps[j, c] * inputs[j, c]
                    outputs[j, c] = D_block[c] * inputs[j, c]
            for j in range(size):
                t = start + j
                step, step_u, y = steps[j], step_us[j], outputs[j]
                if has_seq_idx and continues[b, t] == 0.0:  # a document starts: its state starts from zero
                    h[:] = 0.0
                for n in range(n_state):
                    B_tn, C_tn, a_n, h_n = B[b, g, t, n], C[b, g, t, n], A_tile[n], h[n]
                    for c in range(width):
                        h_new = _exp(step[c] * a_n[c]) * h_n[c] + step_u[c] * B_tn
                        h_n[c] = h_new
                        y[c] += C_tn * h_new
            if has_z:
                _load(z, b, first, start, gates[:size])
                for j in range(size):
                    for c in range(width):
                        outputs[j, c] *= gates[j, c] * _sigmoid(gates[j, c])
            out[b, start:start + size, first:first + width] = outputs[:size]
        last_state[b, first:first + width] = h.T


@numba.njit(f"void(f4[:, :, :], {_INPUTS}, f4[:, :, :, ::1], f4[:, :, ::1], f4[:, :, ::1], f4[:, :, ::1], "
            "f4[:, :, ::1], f4[:, :, :, :, ::1], f4[:, :, :, :, ::1], f4[:, ::1], f4[:, ::1], i8, i8)",
            nogil=True, fastmath=FASTMATH, error_model="numpy", cache=True)
def _backward(grad_out, u, delta, A, B, C, D, z, bias, continues, has_d, has_z, has_bias, has_seq_idx, softplus,
              chunk_len, chunk_states,
              du, ddelta, dz, dA_part, dB_part, dC_part, dD_part, dbias_part, first_task, end_task):
    batch, dim, length = u.shape
    n_groups, n_state = B.shape[1], A.shape[1]
    per_group = dim // n_groups
    n_blocks, n_chunks = dB_part.shape[2], chunk_states.shape[2]
    for task in range(first_task, end_task):
        b, g, block, first, width = _task(task, n_groups, n_blocks, per_group)
        A_tile, D_block, bias_block = _channel_params(A, D, bias, has_d, has_bias, first, width)
        # one chunk, recomputed: states[j] is the tile before position start + j, decays[j] the decays at it
        states = np.empty((chunk_len + 1, n_state, width), np.float32)
        decays = np.empty((chunk_len, n_state, width), np.float32)
        # and positions x channels: u, delta', d delta' / d(delta + bias), delta' u, y = C . h + D u before the
        # gate; the gradients of out and of y, z (then dz), and the sums over n of dh B (then du) and of
        # dh a h_{t-1} A (then ddelta)
        inputs, steps, slopes, step_us, outputs = _tiles(5, chunk_len, width)
        grads, dys, gates, dh_Bs, dlog_As = _tiles(5, chunk_len, width)
        carry = np.zeros((n_state, width), np.float32)  # a_{t+1} dh_{t+1}: what position t gets from the future
        dA, dD, dbias = np.zeros((n_state, width), np.float32), np.zeros(width, np.float32), np.zeros(width, np.float32)
        for chunk in range(n_chunks - 1, -1, -1):
            start = chunk * chunk_len
            size = min(chunk_len, length - start)
            states[0] = chunk_states[b, first:first + width, chunk].T
            _load(u, b, first, start, inputs[:size])
            _load(delta, b, first, start, steps[:size])
            for j in range(size):
                for c in range(width):
                    pre = steps[j, c] + bias_block[c]
                    steps[j, c] = _softplus(pre) if softplus else pre
                    slopes[j, c] = _sigmoid(pre) if softplus else np.float32(1.0)
                    step_us[j, c] = steps[j, c] * inputs[j, c]
                    outputs[j, c] = D_block[c] * inputs[j, c]
            for j in range(size):  # recompute the chunk, as the forward ran it
                t = start + j
                step, step_u, y = steps[j], step_us[j], outputs[j]
                keep = continues[b, t] if has_seq_idx else np.float32(1.0)  # decay 0 where a document starts
                for n in range(n_state):
                    B_tn, C_tn, a_n = B[b, g, t, n], C[b, g, t, n], A_tile[n]
                    before, after, decay = states[j, n], states[j + 1, n], decays[j, n]
                    for c in range(width):
                        decay[c] = _exp(step[c] * a_n[c]) * keep
                        after[c] = decay[c] * before[c] + step_u[c] * B_tn
                        y[c] += C_tn * after[c]
            _load(grad_out, b, first, start, grads[:size])
            if has_z:
                _load(z, b, first, start, gates[:size])
                for j in range(size):
                    for c in range(width):
                        z_jc, grad = gates[j, c], grads[j, c]
                        gate = _sigmoid(z_jc)
                        dys[j, c] = grad * z_jc * gate
                        gates[j, c] = grad * outputs[j, c] * gate * (np.float32(1.0) + z_jc * (np.float32(1.0) - gate))
                dz[b, start:start + size, first:first + width] = gates[:size]
            else:
                dys[:size] = grads[:size]
            for j in range(size - 1, -1, -1):  # the adjoint, backwards
                t = start + j
                step, step_u, dy, dh_B, dlog_A = steps[j], step_us[j], dys[j], dh_Bs[j], dlog_As[j]
                dh_B[:] = 0.0
                dlog_A[:] = 0.0
                for n in range(n_state):
                    B_tn, C_tn, a_n, dA_n, carry_n = B[b, g, t, n], C[b, g, t, n], A_tile[n], dA[n], carry[n]
                    before, after, decay = states[j, n], states[j + 1, n], decays[j, n]
                    dB_sum, dC_sum = np.float32(0.0), np.float32(0.0)
                    for c in range(width):
                        dh = C_tn * dy[c] + carry_n[c]
                        dlog = dh * decay[c] * before[c]  # dL/d(delta' A_n) = dh_t a_t h_{t-1}
                        dB_sum += dh * step_u[c]
                        dC_sum += dy[c] * after[c]
                        dh_B[c] += dh * B_tn
                        dlog_A[c] += dlog * a_n[c]
                        dA_n[c] += dlog * step[c]
                        carry_n[c] = decay[c] * dh
                    dB_part[b, g, block, t, n] = dB_sum
                    dC_part[b, g, block, t, n] = dC_sum
            for j in range(size):  # dh_Bs becomes du, dlog_As ddelta
                for c in range(width):
                    dpre = (dh_Bs[j, c] * inputs[j, c] + dlog_As[j, c]) * slopes[j, c]
                    dh_Bs[j, c] = dh_Bs[j, c] * steps[j, c] + D_block[c] * dys[j, c]
                    dlog_As[j, c] = dpre
                    dD[c] += dys[j, c] * inputs[j, c]
                    dbias[c] += dpre
            du[b, start:start + size, first:first + width] = dh_Bs[:size]
            ddelta[b, start:start + size, first:first + width] = dlog_As[:size]
        dA_part[b, first:first + width] = dA.T
        dD_part[b, first:first + width] = dD
        dbias_part[b, first:first + width] = dbias


@numba.njit("void(f4[:, :, ::1], f4[:, ::1])", nogil=True, error_model="numpy", cache=True)
def _sum_partials(parts, total):
    """total[p] = parts[p, 0] + parts[p, 1] + ..., added in that order."""
    for p in range(parts.shape[0]):
        for m in range(parts.shape[2]):
            total[p, m] = parts[p, 0, m]
        for k in range(1, parts.shape[1]):
            for m in range(parts.shape[2]):
                total[p, m] += parts[p, k, m]


# -- launching --------------------------------------------------------------------------------------------
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the process that made it, the pool): none survives a fork


def _run_tasks(kernel, n_tasks: int, *args) -> None:
    """kernel(*args, first, end) over tasks [0, n_tasks) cut into one contiguous range per torch thread, the
    ranges run at once (the kernels release the GIL). A task's results do not depend on which thread runs it."""
    global _pool
    threads = max(1, min(torch.get_num_threads(), n_tasks))
    bounds = [n_tasks * i // threads for i in range(threads + 1)]
    if threads > 1 and (_pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers < threads - 1):
        _pool = (os.getpid(), ThreadPoolExecutor(threads - 1, thread_name_prefix="archlab-scan"))
    others = [_pool[1].submit(kernel, *args, first, end) for first, end in zip(bounds[1:-1], bounds[2:])]
    kernel(*args, bounds[0], bounds[1])  # the calling thread takes the first range
    for running in others:
        running.result()


def _blocks(per_group: int) -> int:
    """Channel blocks per group: what a task covers, with batch and group."""
    return -(-per_group // CHANNEL_BLOCK)


def _stream(t: Tensor) -> np.ndarray:
    """(batch, dim, L) as float32 numpy: a view of a float32 tensor whatever its strides, else a converted copy."""
    return t.detach().to(torch.float32).numpy()


def _rows(BC: Tensor) -> np.ndarray:
    """B or C, (batch, [G,] N, L), as contiguous float32 (batch, G, L, N)."""
    BC = BC if BC.ndim == 4 else BC.unsqueeze(1)
    return BC.detach().transpose(-1, -2).to(torch.float32).contiguous().numpy()


def _streamed(array: np.ndarray, like: Tensor) -> Tensor:
    """A (batch, L, dim) float32 result as a (batch, dim, L) tensor in `like`'s dtype, channel-last in memory."""
    return torch.from_numpy(array).transpose(1, 2).to(like.dtype)


def _vector(t: Tensor | None) -> np.ndarray:
    return np.empty(0, np.float32) if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus: bool, chunk_len: int) -> tuple:
    if chunk_len < 1:
        raise ValueError(f"numba selective_scan: chunk_len must be >= 1, got {chunk_len}")
    z_ = np.empty((0, 0, 0), np.float32) if z is None else _stream(z)
    continues = np.empty((0, 0), np.float32) if seq_idx is None else \
        document_continues(seq_idx).to(torch.float32).numpy()
    return (_stream(u), _stream(delta), A.detach().to(torch.float32).contiguous().numpy(), _rows(B), _rows(C),
            _vector(D), z_, _vector(delta_bias), continues, D is not None, z is not None, delta_bias is not None,
            seq_idx is not None, delta_softplus, chunk_len)


def selective_scan_fwd(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                       z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, chunk_len: int,
                       seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (batch, dim, L) in u.dtype, the last state (batch, dim, N) float32 and the state at the start of
    every chunk of `chunk_len` positions (batch, dim, n_chunks, N) float32, which the backward restarts from.
    seq_idx (batch, L): the state resets where the document id changes."""
    batch, dim, length = u.shape
    n_state, n_chunks = A.shape[1], -(-length // chunk_len)
    out = np.empty((batch, length, dim), np.float32)
    last_state = np.empty((batch, dim, n_state), np.float32)
    chunk_states = np.empty((batch, dim, n_chunks, n_state), np.float32)
    n_groups = B.shape[1] if B.ndim == 4 else 1
    _run_tasks(_forward, batch * n_groups * _blocks(dim // n_groups),
               *_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk_len), out, last_state,
               chunk_states)
    return _streamed(out, u), torch.from_numpy(last_state), torch.from_numpy(chunk_states)


def selective_scan_bwd(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, chunk_states: Tensor,
                       delta_softplus: bool, chunk_len: int,
                       seq_idx: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the dtypes and shapes of the inputs, None for an
    absent optional input; the same bits whatever the thread count."""
    batch, dim, length = u.shape
    n_groups, n_state = (B.shape[1] if B.ndim == 4 else 1), A.shape[1]
    n_blocks = _blocks(dim // n_groups)
    du, ddelta = np.empty((batch, length, dim), np.float32), np.empty((batch, length, dim), np.float32)
    dz = np.empty((batch, length, dim) if z is not None else (0, 0, 0), np.float32)
    dA_part = np.empty((batch, dim, n_state), np.float32)
    dB_part = np.empty((batch, n_groups, n_blocks, length, n_state), np.float32)
    dC_part = np.empty_like(dB_part)
    dD_part, dbias_part = np.empty((batch, dim), np.float32), np.empty((batch, dim), np.float32)
    _run_tasks(_backward, batch * n_groups * n_blocks, _stream(grad_out),
               *_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx, delta_softplus, chunk_len),
               chunk_states.detach().contiguous().numpy(), du, ddelta, dz, dA_part, dB_part, dC_part, dD_part,
               dbias_part)

    def summed(parts: np.ndarray, like: Tensor, shape: tuple) -> Tensor:
        """parts (P, K, ...) -> (P, ...) summed over K in order, in `like`'s dtype."""
        total = np.empty((parts.shape[0], parts[0, 0].size), np.float32)
        _sum_partials(parts.reshape(parts.shape[0], parts.shape[1], -1), total)
        return torch.from_numpy(total).reshape(shape).to(like.dtype)

    def bc_grad(parts: np.ndarray, like: Tensor) -> Tensor:  # (batch, G, blocks, L, N) -> like's (batch, [G,] N, L)
        grad = summed(parts.reshape(batch * n_groups, n_blocks, -1), like, (batch, n_groups, length, n_state))
        grad = grad.transpose(-1, -2).contiguous()
        return grad if like.ndim == 4 else grad[:, 0]

    def batch_sum(parts: np.ndarray, like: Tensor | None) -> Tensor | None:  # (batch, ...) -> like's (...)
        return None if like is None else summed(parts[None], like, like.shape)

    return (_streamed(du, u), _streamed(ddelta, delta), batch_sum(dA_part, A), bc_grad(dB_part, B),
            bc_grad(dC_part, C), batch_sum(dD_part, D), _streamed(dz, z) if z is not None else None,
            batch_sum(dbias_part, delta_bias))
