"""The gated delta rule in Triton: a chunked forward (fla's WY form) and a deterministic per-token backward.

Semantics and layouts are reference.py's: q, k (batch, length, heads, key_dim); v (batch, length, value_heads,
value_dim), value head h reading key head h // (value_heads / heads); g, beta (batch, length, value_heads); states
(sequences, value_heads, key_dim, value_dim) fp32. The launchers make the inputs contiguous, so a token is one index
into the flattened (batch * length) axis and a sequence is a range of tokens: a batch row, or a packed sequence of
cu_seqlens. Every kernel runs one program per (sequence, value head, value tile): the recurrence mixes the key dim
(whole in a program, padded to a power of two) but keeps every value column apart, so value tiles are independent.

Forward, per chunk of CHUNK tokens with state S entering it and G the cumulative sum of g inside the chunk:
    A    = strictly_lower(beta_i exp(G_i - G_j) k_i . k_j)          T = (I + A)^-1 (forward substitution)
    dv   = T (beta v) - T (beta exp(G) k) S                          the chunk's deltas, beta (v - decayed S^T k)
    o    = scale (exp(G) q S + causal(exp(G_i - G_j) q_i . k_j) dv)
    S   <- exp(G_last) S + (exp(G_last - G) k)^T dv
The backward's rerun of the forward stores S at every chunk's start, fp32 (chunk slots, value_heads, key_dim,
value_dim); the forward itself keeps nothing.

Backward, per program, chunks last to first: the states entering each of the chunk's tokens are recomputed from the
chunk's start (token by token, into a per-program fp32 scratch of CHUNK x key tile x value tile), then the exact
reverse of one step runs token by token, carrying dS, the gradient of the state. For one step
    S' = a S,  p = S'^T k,  delta = beta (v - p),  S_t = S' + k delta^T,  o = S_t^T (scale q):
    dS_t += scale q do^T;  dq = scale S_t do;  ddelta = dS_t^T k;  dk = dS_t delta + S' dp  (dp = -beta ddelta);
    dv = beta ddelta;  dbeta = ddelta . (v - p);  dS' = dS_t + k dp^T;  dg = <dS', S'>;  dS = a dS'.
dq, dk, dg and dbeta sum over value columns, and dq, dk also over a group's value heads: each program writes its
own partial (value tile, token, value head), summed in torch in a fixed order. No atomics: deterministic.

All arithmetic is fp32 (tiles are upcast after loading, which also dodges the interpreter's wrong bf16 tl.dot);
tl.dot runs in true fp32 for fp32 inputs and in the interpreter, in tf32 for half inputs on a GPU (finer than
their own rounding). Offsets are int64 and grids flat (kernels/common/launch.py). Without a GPU, fixed small
value tiles replace the GPU's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from einops import reduce
from torch import Tensor

from archlab.kernels.backend import triton_interpreting
from archlab.kernels.common.autotune import autotune
from archlab.kernels.common.launch import flat_grid
from archlab.kernels.common.tiles import device_function as _device
from archlab.kernels.common.tiles import state_or_zeros
from archlab.kernels.gated_delta import TRITON_MAX_HEAD_DIM

__all__ = ["gated_delta_fwd", "gated_delta_bwd"]

AUTOTUNE = True
FIXED_BLOCK_V = 16  # interpreter: the smallest tl.dot tile, so tests cross value tiles
# value tiles on a GPU (ptxas -v, key_dim 128, 32-position chunks): the forward holds (chunk x key_dim) and
# (chunk x chunk) tiles besides the state and spills a little even at 16 (at most 424 bytes with 4 warps, 96 with
# 8, sm_80..120; 1.6 KB at 32; key_dim 256: 1.5-3.6 KB); the backward ~6 (key_dim x value tile) fp32 tiles, so
# its tile shrinks as key_dim grows (key_dim * tile elements; no spills at 4096)
GPU_BLOCK_V = 16
GPU_GRAD_TILE_ELEMENTS = 4096
_sum, _cumsum = ((f.fn if triton_interpreting() else f) for f in (tl.sum, tl.cumsum))


# -- shared pieces ----------------------------------------------------------------------------------------
@_device
def _program(pid, n_heads, value_heads, key_dim, value_dim, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """A program's sequence, value head, key head and value tile (tile fastest); its key and value columns with
    their masks; and its tile's offsets (int64) and mask in one (key_dim, value_dim) state."""
    n_v_tiles = (value_dim + BLOCK_V - 1) // BLOCK_V
    seq, hv, v_tile = pid // n_v_tiles // value_heads, pid // n_v_tiles % value_heads, pid % n_v_tiles
    cols_k, cols_v = tl.arange(0, BLOCK_K), v_tile * BLOCK_V + tl.arange(0, BLOCK_V)
    k_mask, v_mask = cols_k < key_dim, cols_v < value_dim
    state_offsets = cols_k[:, None].to(tl.int64) * value_dim + cols_v[None, :]
    return (seq, hv, hv // (value_heads // n_heads), v_tile, cols_k, cols_v, k_mask, v_mask, state_offsets,
            k_mask[:, None] & v_mask[None, :])


@_device
def _rows(Ptr, tokens, live, head, n_heads, dim, cols, col_mask):
    """The (tokens, cols) tile of a (token, head, dim) contiguous tensor in its own dtype, zero outside the masks."""
    offsets = (tokens[:, None] * n_heads + head) * dim + cols[None, :]
    return tl.load(Ptr + offsets, mask=live[:, None] & col_mask[None, :], other=0.0)


@_device
def _vector(Ptr, token, head, n_heads, dim, cols, col_mask):
    """The fp32 (cols,) vector of one token and head."""
    return tl.load(Ptr + (token * n_heads + head) * dim + cols, mask=col_mask, other=0.0).to(tl.float32)


@_device
def _dot(a, b, PRECISION: tl.constexpr):
    return tl.dot(a, b, input_precision=PRECISION)


@_device
def _input_dot(a, b, PRECISION: tl.constexpr):
    """a @ b of two input tiles as loaded: in their half type on a GPU (exact products, fp32 sums, half the
    registers), else in true fp32."""
    if PRECISION == "tf32":
        out = tl.dot(a, b)
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return out


@_device
def _unit_lower_inverse(A, steps, CHUNK: tl.constexpr):
    """(I + A)^-1 for a strictly lower triangular A, row by row: T_i = e_i - A_i T (A_i zero from column i on, so
    only the finished rows of T are read)."""
    rows = steps[:, None]
    inverse = tl.where(rows == steps[None, :], 1.0, 0.0)
    for i in range(1, CHUNK):
        a_i = _sum(tl.where(rows == i, A, 0.0), 0)
        row = tl.where(steps == i, 1.0, 0.0) - _sum(a_i[:, None] * inverse, 0)
        inverse = tl.where(rows == i, row[None, :], inverse)
    return inverse


# -- forward ----------------------------------------------------------------------------------------------
@triton.jit
def _forward_kernel(Q, K, V, G, Beta, Init, Out, Final, States, Bounds, FirstChunk, scale,
                    n_heads, value_heads, key_dim, value_dim,
                    HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr, STORE_STATES: tl.constexpr,
                    PRECISION: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    seq, hv, h, v_tile, cols_k, cols_v, k_mask, v_mask, state_offsets, state_mask = _program(
        tl.program_id(0).to(tl.int64), n_heads, value_heads, key_dim, value_dim, BLOCK_K, BLOCK_V)
    size = key_dim * value_dim
    state = state_or_zeros(Init + (seq * value_heads + hv) * size, state_offsets, state_mask, HAS_INIT, BLOCK_K,
                            BLOCK_V)
    bos, eos = tl.load(Bounds + seq), tl.load(Bounds + seq + 1)
    first_chunk = tl.load(FirstChunk + seq)
    steps = tl.arange(0, CHUNK)
    causal = steps[:, None] >= steps[None, :]
    for c in range(0, (eos - bos + CHUNK - 1) // CHUNK):
        if STORE_STATES:
            tl.store(States + ((first_chunk + c) * value_heads + hv) * size + state_offsets, state, mask=state_mask)
        tokens = bos + c * CHUNK + steps
        live = tokens < eos
        k_in = _rows(K, tokens, live, h, n_heads, key_dim, cols_k, k_mask)
        k = k_in.to(tl.float32)
        v = _rows(V, tokens, live, hv, value_heads, value_dim, cols_v, v_mask).to(tl.float32)
        g = tl.load(G + tokens * value_heads + hv, mask=live, other=0.0).to(tl.float32)
        beta = tl.load(Beta + tokens * value_heads + hv, mask=live, other=0.0).to(tl.float32)
        decay_sum = _cumsum(g, 0)  # padding has g = 0: the last entry is the chunk's total
        total = _sum(tl.where(steps == CHUNK - 1, decay_sum, 0.0), 0)
        # exp(G_i - G_j) for j <= i, else exp(-inf) = 0 (no exp of the growing differences above the diagonal)
        decay = tl.exp(tl.where(causal, decay_sum[:, None] - decay_sum[None, :], -float("inf")))
        gram = _input_dot(k_in, tl.trans(k_in), PRECISION)
        A = tl.where(steps[:, None] > steps[None, :], beta[:, None] * decay * gram, 0.0)
        inverse = _unit_lower_inverse(A, steps, CHUNK)
        # T beta (v - exp(G) k S): fla's u - w S, with w S = T (beta exp(G) k) S taken as T (beta exp(G) (k S))
        decayed_reads = tl.exp(decay_sum)[:, None] * _dot(k, state, PRECISION)
        deltas = _dot(inverse, beta[:, None] * (v - decayed_reads), PRECISION)
        if STORE_OUT:
            q_in = _rows(Q, tokens, live, h, n_heads, key_dim, cols_k, k_mask)
            o = tl.exp(decay_sum)[:, None] * _dot(q_in.to(tl.float32), state, PRECISION) \
                + _dot(_input_dot(q_in, tl.trans(k_in), PRECISION) * decay, deltas, PRECISION)
            o *= scale
            out_offsets = (tokens[:, None] * value_heads + hv) * value_dim + cols_v[None, :]
            tl.store(Out + out_offsets, o.to(Out.dtype.element_ty), mask=live[:, None] & v_mask[None, :])
        to_end = tl.exp(total - decay_sum)
        state = tl.exp(total) * state + _dot(tl.trans(k * to_end[:, None]), deltas, PRECISION)
    tl.store(Final + (seq * value_heads + hv) * size + state_offsets, state, mask=state_mask)


# -- backward ---------------------------------------------------------------------------------------------
@triton.jit
def _backward_kernel(Q, K, V, G, Beta, dOut, dFinal, States, Scratch, Bounds, FirstChunk,
                     dQ_part, dK_part, dV, dG_part, dBeta_part, dInit, scale,
                     n_tokens, n_heads, value_heads, key_dim, value_dim,
                     HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    seq, hv, h, v_tile, cols_k, cols_v, k_mask, v_mask, state_offsets, state_mask = _program(
        pid, n_heads, value_heads, key_dim, value_dim, BLOCK_K, BLOCK_V)
    size = key_dim * value_dim
    scratch = Scratch + pid * CHUNK * BLOCK_K * BLOCK_V + cols_k[:, None] * BLOCK_V + tl.arange(0, BLOCK_V)[None, :]
    grad = state_or_zeros(dFinal + (seq * value_heads + hv) * size, state_offsets, state_mask, HAS_DFINAL, BLOCK_K,
                           BLOCK_V)
    bos, eos = tl.load(Bounds + seq), tl.load(Bounds + seq + 1)
    first_chunk = tl.load(FirstChunk + seq)
    n_chunks = (eos - bos + CHUNK - 1) // CHUNK
    for index in range(0, n_chunks):
        c = n_chunks - 1 - index
        start = bos + c * CHUNK
        length = tl.minimum(eos - start, CHUNK)
        state = tl.load(States + ((first_chunk + c) * value_heads + hv) * size + state_offsets, mask=state_mask,
                        other=0.0)
        for t in range(0, length):  # the state entering each token of the chunk
            tl.store(scratch + t * BLOCK_K * BLOCK_V, state)
            k = _vector(K, start + t, h, n_heads, key_dim, cols_k, k_mask)
            v = _vector(V, start + t, hv, value_heads, value_dim, cols_v, v_mask)
            state *= tl.exp(tl.load(G + (start + t) * value_heads + hv).to(tl.float32))
            beta = tl.load(Beta + (start + t) * value_heads + hv).to(tl.float32)
            state += k[:, None] * (beta * (v - _sum(state * k[:, None], 0)))[None, :]
        for index_t in range(0, length):
            t = length - 1 - index_t
            token = start + t
            k = _vector(K, token, h, n_heads, key_dim, cols_k, k_mask)
            q = _vector(Q, token, h, n_heads, key_dim, cols_k, k_mask) * scale
            v = _vector(V, token, hv, value_heads, value_dim, cols_v, v_mask)
            do = _vector(dOut, token, hv, value_heads, value_dim, cols_v, v_mask)
            a = tl.exp(tl.load(G + token * value_heads + hv).to(tl.float32))
            beta = tl.load(Beta + token * value_heads + hv).to(tl.float32)
            decayed = a * tl.load(scratch + t * BLOCK_K * BLOCK_V)
            residual = v - _sum(decayed * k[:, None], 0)
            delta = beta * residual
            grad += q[:, None] * do[None, :]
            dq = scale * (_sum(decayed * do[None, :], 1) + k * _sum(delta * do, 0))  # scale S_t do
            ddelta = _sum(grad * k[:, None], 0)
            dp = -beta * ddelta
            dk = _sum(grad * delta[None, :] + decayed * dp[None, :], 1)
            grad += k[:, None] * dp[None, :]
            part = v_tile * n_tokens + token
            tl.store(dQ_part + (part * value_heads + hv) * key_dim + cols_k, dq, mask=k_mask)
            tl.store(dK_part + (part * value_heads + hv) * key_dim + cols_k, dk, mask=k_mask)
            tl.store(dV + (token * value_heads + hv) * value_dim + cols_v, (beta * ddelta).to(dV.dtype.element_ty),
                     mask=v_mask)
            tl.store(dG_part + part * value_heads + hv, _sum(_sum(grad * decayed, 1), 0))
            tl.store(dBeta_part + part * value_heads + hv, _sum(ddelta * residual, 0))
            grad *= a
    if HAS_INIT:
        tl.store(dInit + (seq * value_heads + hv) * size + state_offsets, grad, mask=state_mask)


# -- launching --------------------------------------------------------------------------------------------
# Blocks are fixed by the shape; the autotuner picks (num_warps, num_stages). The compile matrix compiles every
# config for every GPU target in CI.
_TUNE_KEY = ["n_heads", "value_heads", "key_dim", "value_dim"]
_forward_tuned = autotune([triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)], _TUNE_KEY)(_forward_kernel)
_backward_tuned = autotune([triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)], _TUNE_KEY)(
    _backward_kernel)


def _on_gpu(t: Tensor) -> bool:
    return AUTOTUNE and t.is_cuda and not triton_interpreting()


def _launch(kernel, tuned, x: Tensor, grid: tuple, *args, **constexprs) -> None:
    (tuned if _on_gpu(x) else kernel)[grid](*args, **constexprs)


class _Problem:
    """What both launches share: sizes, the sequences' token ranges, chunk slots, blocks."""

    def __init__(self, q: Tensor, v: Tensor, cu_seqlens: Tensor | None, chunk_len: int):
        if chunk_len < 16 or chunk_len & (chunk_len - 1):
            raise ValueError(f"triton gated_delta: chunk_len must be a power of two >= 16 (tl.dot's tile), got "
                             f"{chunk_len}")
        batch, length, self.n_heads, self.key_dim = q.shape
        self.value_heads, self.value_dim = v.shape[2:]
        if max(self.key_dim, self.value_dim) > TRITON_MAX_HEAD_DIM:  # a program holds key_dim whole
            raise ValueError(f"triton gated_delta: key_dim {self.key_dim} and value_dim {self.value_dim} must be at "
                             f"most {TRITON_MAX_HEAD_DIM}; use kernels.gated_delta=torch")
        self.n_tokens, self.chunk_len = batch * length, chunk_len
        device = q.device
        if cu_seqlens is None:  # a batch row is a sequence; its chunk slots follow the previous row's
            self.bounds = torch.arange(batch + 1, device=device, dtype=torch.int64) * length
            self.n_slots = batch * triton.cdiv(length, chunk_len)
        else:  # the slots' count is bounded without reading cu_seqlens back to the host
            self.bounds = cu_seqlens.to(torch.int64).contiguous()
            self.n_slots = triton.cdiv(length, chunk_len) + cu_seqlens.numel() - 2
        counts = (self.bounds[1:] - self.bounds[:-1] + chunk_len - 1) // chunk_len
        self.first_chunk = (counts.cumsum(0) - counts).contiguous()
        self.n_sequences = self.bounds.numel() - 1
        self.block_k = max(16, triton.next_power_of_2(self.key_dim))
        gpu = _on_gpu(q)
        self.block_v = min(GPU_BLOCK_V, max(16, triton.next_power_of_2(self.value_dim))) if gpu else FIXED_BLOCK_V
        self.grad_block_v = min(max(16, triton.next_power_of_2(self.value_dim)),
                                max(1, GPU_GRAD_TILE_ELEMENTS // self.block_k)) if gpu else FIXED_BLOCK_V
        self.sizes = (self.n_heads, self.value_heads, self.key_dim, self.value_dim)

    def grid(self, block_v: int) -> tuple[int]:
        return flat_grid("gated_delta", triton.cdiv(self.value_dim, block_v), self.value_heads, self.n_sequences)

    def states(self, rows: int, device) -> Tensor:
        return torch.empty(rows, self.value_heads, self.key_dim, self.value_dim, dtype=torch.float32, device=device)


def _precision(q: Tensor, k: Tensor, v: Tensor) -> str:
    """tl.dot in true fp32 for fp32 inputs (and in the interpreter), tf32 when the inputs are half already."""
    half = q.dtype == k.dtype == v.dtype and q.dtype in (torch.float16, torch.bfloat16)
    return "tf32" if half and not triton_interpreting() else "ieee"


def _forward(problem: _Problem, q, k, v, g, beta, scale, initial_state, store_out: bool, store_states: bool):
    """(o or None, final states, chunk-start states or None); inputs contiguous."""
    device = q.device
    final = problem.states(problem.n_sequences, device)
    out = torch.empty(v.shape, dtype=v.dtype, device=device) if store_out else final
    states = problem.states(problem.n_slots, device) if store_states else final
    _launch(_forward_kernel, _forward_tuned, q, problem.grid(problem.block_v),
            q, k, v, g, beta, initial_state if initial_state is not None else final, out, final, states,
            problem.bounds, problem.first_chunk, scale, *problem.sizes,
            HAS_INIT=initial_state is not None, STORE_OUT=store_out, STORE_STATES=store_states,
            PRECISION=_precision(q, k, v), CHUNK=problem.chunk_len, BLOCK_K=problem.block_k,
            BLOCK_V=problem.block_v)
    return out if store_out else None, final, states if store_states else None


def _contiguous(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.contiguous() for t in tensors)


def gated_delta_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float,
                    initial_state: Tensor | None, cu_seqlens: Tensor | None, chunk_len: int) -> tuple[Tensor, Tensor]:
    """(o in v's dtype, final states (sequences, value_heads, key_dim, value_dim) fp32); inputs validated."""
    q, k, v, g, beta, initial_state = _contiguous(q, k, v, g, beta, initial_state)
    problem = _Problem(q, v, cu_seqlens, chunk_len)
    out, final, _ = _forward(problem, q, k, v, g, beta, scale, initial_state, store_out=True, store_states=False)
    return out, final


def gated_delta_bwd(grad_out: Tensor, grad_final: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                    beta: Tensor, scale: float, initial_state: Tensor | None, cu_seqlens: Tensor | None,
                    chunk_len: int) -> tuple[Tensor | None, ...]:
    """(dq, dk, dv, dg, dbeta, dinitial_state) in the inputs' shapes and dtypes (None without an initial state);
    grad_final (None: zero) is the gradient of the final states. Deterministic."""
    dtypes = [t.dtype for t in (q, k, g, beta, initial_state) if t is not None]
    q, k, v, g, beta, initial_state, grad_out, grad_final = _contiguous(q, k, v, g, beta, initial_state, grad_out,
                                                                        grad_final)
    problem = _Problem(q, v, cu_seqlens, chunk_len)
    _, final, states = _forward(problem, q, k, v, g, beta, scale, initial_state, store_out=False, store_states=True)
    device, block_v = q.device, problem.grad_block_v
    n_v_tiles = triton.cdiv(problem.value_dim, block_v)
    programs = n_v_tiles * problem.value_heads * problem.n_sequences
    f32 = dict(dtype=torch.float32, device=device)
    scratch = torch.empty(programs, problem.chunk_len, problem.block_k, block_v, **f32)
    dq_part = torch.empty(n_v_tiles, problem.n_tokens, problem.value_heads, problem.key_dim, **f32)
    dk_part = torch.empty_like(dq_part)
    dg_part = torch.empty(n_v_tiles, problem.n_tokens, problem.value_heads, **f32)
    dbeta_part = torch.empty_like(dg_part)
    dv = torch.empty(v.shape, dtype=v.dtype, device=device)
    dinit = problem.states(problem.n_sequences, device) if initial_state is not None else None
    _launch(_backward_kernel, _backward_tuned, q, problem.grid(block_v),
            q, k, v, g, beta, grad_out, grad_final if grad_final is not None else final, states, scratch,
            problem.bounds, problem.first_chunk, dq_part, dk_part, dv, dg_part, dbeta_part,
            dinit if dinit is not None else final, scale, problem.n_tokens, *problem.sizes,
            HAS_DFINAL=grad_final is not None, HAS_INIT=initial_state is not None, CHUNK=problem.chunk_len,
            BLOCK_K=problem.block_k, BLOCK_V=block_v)
    # partials summed in a fixed order: value tiles, then the value heads of each key head's group
    per_key_head = dict(pattern="n t (h r) d -> t h d", reduction="sum", h=problem.n_heads)
    dq = reduce(dq_part, **per_key_head).reshape(q.shape).to(dtypes[0])
    dk = reduce(dk_part, **per_key_head).reshape(k.shape).to(dtypes[1])
    dg = dg_part.sum(0).reshape(g.shape).to(dtypes[2])
    dbeta = dbeta_part.sum(0).reshape(beta.shape).to(dtypes[3])
    return dq, dk, dv, dg, dbeta, dinit.to(dtypes[4]) if dinit is not None else None
