"""The `torch` backend of SSD: the Mamba-2 paper's chunked algorithm in plain PyTorch (what CPU training uses), with a
hand-derived backward (chunk_scan.py) in batched matmuls.

Positions are padded to a multiple of chunk_size (dt = 0 and x = 0 there: decay 1 and no input, so the states
pass through unchanged) and cut into chunks of Q positions; chunk_scan.py does the rest (its docstring has the
algorithm). With cu_seqlens the resets at sequence starts are masks on that algorithm's decays (exact zeros, zero
gradients), and each sequence's final state is read from its chunk's entering state and its own positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.ssd.chunk_scan import ChunkScan
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
        x_dt, a, B_c, C_c = (_pad_positions(t, pad) for t in (x_c * dt_c[..., None], dt_c * A.to(compute),
                                                               B.to(compute), C.to(compute)))
        cut, no_carry = _sequence_masks(cu_seqlens, length + pad, chunk_size, x.device)
        initial = None if initial_states is None else initial_states.to(compute)
        y, final, *entering = ChunkScan.apply(x_dt.contiguous(), a, B_c.contiguous(), C_c.contiguous(), initial,
                                              cut, no_carry, chunk_size, cu_seqlens is not None)
        out = skip_and_gate(y[:, :length], x_c, D, z).to(x.dtype)
        if cu_seqlens is not None:
            final = _states_at(cu_seqlens[1:].long() - 1, entering[0][0],
                               *(rearrange(t[0], "(c q) h ... -> c h q ...", q=chunk_size) for t in (a, x_dt, B_c)),
                               cut, no_carry)
    return out, final


def _pad_positions(t: Tensor, pad: int) -> Tensor:
    """Pads dim 1 (positions) of a (batch, length, ...) tensor with `pad` zeros at the end."""
    return F.pad(t, (0,) * (2 * (t.ndim - 2)) + (0, pad)) if pad else t


def _sequence_masks(cu_seqlens: Tensor | None, padded_length: int, chunk_size: int,
                    device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(cut, no_carry), added to the exponents of chunk_scan.py's decays: -inf where they are exactly 0, else 0.

    cut (chunks or 1, Q, Q): position j's input never reaches position i (j > i, or another sequence);
    no_carry (chunks, Q) or None: the state entering i's chunk never reaches i (a sequence starts in between)."""
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=device).tril()
    if cu_seqlens is None:
        return _minus_inf_where(~causal[None]), None
    starts = torch.zeros(padded_length, dtype=torch.long, device=device)
    starts[cu_seqlens[1:-1].long()] = 1
    sequence = rearrange(starts.cumsum(0), "(c q) -> c q", q=chunk_size)              # sequence index of each position
    entering = F.pad(sequence[:-1, -1], (1, 0))                                        # ... of the state entering
    cut = ~causal | (sequence[:, :, None] != sequence[:, None, :])
    return _minus_inf_where(cut), _minus_inf_where(sequence != entering[:, None])


def _minus_inf_where(mask: Tensor) -> Tensor:
    return torch.zeros(mask.shape, device=mask.device).masked_fill(mask, -torch.inf)


def _states_at(positions: Tensor, entering: Tensor, a: Tensor, x_dt: Tensor, B: Tensor, cut: Tensor,
               no_carry: Tensor) -> Tensor:
    """The states after `positions` (k,) of the one packed row: (k, heads, head_dim, state), from the chunked
    tensors of that row (entering (c h p n), a (c h q), x_dt (c h q p), B (c g q n)); autograd differentiates it.

    h_i = exp(a_0 + ... + a_i) (state entering i's chunk) + sum_j exp(a_{j+1} + ... + a_i) dt'_j x_j B_j^T over the
    positions j <= i of i's chunk and sequence: one row of chunk_scan.py's decays and its end-state sum."""
    chunk_size = a.shape[-1]
    chunk, offset = positions // chunk_size, positions % chunk_size
    a_sum = a[chunk].cumsum(-1)                                                              # (k h q)
    a_sum_at = a_sum.gather(-1, offset[:, None, None].expand(-1, a_sum.shape[1], 1))         # (k h 1)
    weights = torch.exp(a_sum_at - a_sum + cut[chunk, offset][:, None])                      # (k h q)
    carried = torch.exp(a_sum_at[..., 0] + no_carry[chunk, offset][:, None])                # (k h)
    groups = B.shape[1]
    within = torch.einsum("kgrq,kgrqp,kgqn->kgrpn", *(rearrange(t, "k (g r) ... -> k g r ...", g=groups)
                                                      for t in (weights, x_dt[chunk])), B[chunk])
    return carried[..., None, None] * entering[chunk] + rearrange(within, "k g r p n -> k (g r) p n")
