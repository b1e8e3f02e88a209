"""The `torch` backend of SSD, what CPU training uses: the Mamba-2 paper's chunked algorithm as one autograd.Function
with a hand-derived backward in batched matmuls (chunk_scan.py, whose docstring has the algorithm).

Here: dt' (bias, softplus, clamp), padding the positions to a multiple of chunk_size (dt' = 0 and x = 0 there: decay
1 and no input, so the states pass through unchanged), the z gate, and with cu_seqlens the sequence index of every
position (a reset is -inf on the exponents of chunk_scan.py's decays: exact zeros, zero gradients) and each
sequence's final state, read from its chunk's entering state and its own positions. The arithmetic is float32
(float64 for float64 inputs), also inside a caller's autocast region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.ssd.chunk_scan import ChunkScan, carried_in
from archlab.kernels.ssd.reference import effective_dt, skip_and_gate


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                dt_limit: tuple[float, float] = (0.0, float("inf")), initial_states: Tensor | None = None,
                cu_seqlens: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same arguments and results as reference.ssd_reference, plus chunk_size (a power of two; the caller checks)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    # the matmuls run in `compute` like the reference, also inside a caller's autocast region
    with torch.autocast(x.device.type, enabled=False):
        length = x.shape[1]
        pad = -length % chunk_size
        x_c = x.to(compute)
        dt_c = effective_dt(dt.to(compute), dt_bias, dt_softplus, dt_limit)
        x_p, dt_p, B_p, C_p = (_pad_positions(t, pad) for t in (x_c, dt_c, B.to(compute), C.to(compute)))
        A_c, D_c, initial = (None if t is None else t.to(compute) for t in (A, D, initial_states))
        sequence = None if cu_seqlens is None else _sequence_index(cu_seqlens, length + pad, chunk_size)
        y, final, *entering = ChunkScan.apply(x_p, dt_p, A_c, B_p.contiguous(), C_p.contiguous(), D_c, initial,
                                              sequence, chunk_size)
        out = skip_and_gate(y[:, :length] if pad else y, x_c, None, z).to(x.dtype)
        if cu_seqlens is not None:
            final = _states_at(cu_seqlens[1:].long() - 1, entering[0][0], sequence, A_c,
                               *(rearrange(t[0], "(c q) h ... -> c h q ...", q=chunk_size) for t in (x_p, dt_p, B_p)))
    return out, final


def _pad_positions(t: Tensor, pad: int) -> Tensor:
    """Pads dim 1 (positions) of a (batch, length, ...) tensor with `pad` zeros at the end."""
    return F.pad(t, (0,) * (2 * (t.ndim - 2)) + (0, pad)) if pad else t


def _sequence_index(cu_seqlens: Tensor, padded_length: int, chunk_size: int) -> Tensor:
    """(chunks, chunk_size): the index of the sequence each position of the packed row belongs to (the padding
    belongs to the last one)."""
    starts = torch.zeros(padded_length, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = 1
    return rearrange(starts.cumsum(0), "(c q) -> c q", q=chunk_size)


def _states_at(positions: Tensor, entering: Tensor, sequence: Tensor, A: Tensor, x: Tensor, dt: Tensor,
               B: Tensor) -> Tensor:
    """The states after `positions` (k,) of the one packed row: (k, heads, head_dim, state), from the chunked
    tensors of that row (entering (c h p n), sequence (c q), x (c h q p), dt (c h q), B (c g q n)); autograd
    differentiates it.

    h_i = exp(a_0 + ... + a_i) (state entering i's chunk) + sum_j exp(a_{j+1} + ... + a_i) dt'_j x_j B_j^T over the
    positions j <= i of i's chunk and sequence (a = dt' A): one row of chunk_scan.py's decays and its end-state sum."""
    chunk_size = dt.shape[-1]
    chunk, offset = positions // chunk_size, positions % chunk_size
    a_sum = (dt[chunk] * A[:, None]).to(torch.float64).cumsum(-1)                             # (k h q)
    a_sum_at = a_sum.gather(-1, offset[:, None, None].expand(-1, a_sum.shape[1], 1))         # (k h 1)
    own = sequence[chunk]                                                                    # (k q)
    reached = (torch.arange(chunk_size, device=dt.device) <= offset[:, None]) & (own == own.gather(1, offset[:, None]))
    weights = _exp_where(a_sum_at - a_sum, reached[:, None], dt.dtype) * dt[chunk]           # (k h q)
    carried = _exp_where(a_sum_at[..., 0], carried_in(sequence)[chunk, offset][:, None], dt.dtype)  # (k h)
    groups = B.shape[1]
    within = torch.einsum("kgrq,kgrqp,kgqn->kgrpn", *(rearrange(t, "k (g r) ... -> k g r ...", g=groups)
                                                      for t in (weights, x[chunk])), B[chunk])
    return carried[..., None, None] * entering[chunk] + rearrange(within, "k g r p n -> k (g r) p n")


def _exp_where(logits: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    return logits.to(dtype).masked_fill(~keep, -torch.inf).exp()
