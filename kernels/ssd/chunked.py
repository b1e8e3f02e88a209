"""The `torch` backend of SSD: the Mamba-2 paper's chunked algorithm ("minimal SSD", ssd_minimal_discrete) in plain
PyTorch ops, differentiated by autograd (what CPU training uses; memory is not optimised yet).

Positions are padded to a multiple of chunk_size (dt = 0 and x = 0 there: decay 1 and no input, so the states
pass through unchanged) and cut into chunks of Q positions. With a = dt' A per position (reference.py's dt'):
  1. inside each chunk, y_diag = (C B^T * L) (dt' x) with L[i, j] = exp(a_{j+1} + ... + a_i) for j <= i, else 0;
  2. each chunk's own end state from zero: sum_j L[Q-1, j] dt'_j x_j B_j^T;
  3. the state entering each chunk: the same segment-sum mask over the chunks' total decays (plus the initial state);
  4. y_off = exp(a_0 + ... + a_i) C_i (state entering the chunk).
Segment sums are formed as masked cumulative sums, never as differences of running sums, so no exp of a positive
number is taken. That is also what makes the cu_seqlens reset exact: a at each sequence's first position is set to
-inf, so exp(...) of every sum that crosses a boundary is exactly 0 (and its gradient 0), and -inf is never
subtracted from -inf.

Group dims stay apart from head dims ((groups, heads per group) as g, r) so that C B^T is formed once per group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.ssd.reference import effective_dt, skip_and_gate


def segsum(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T): out[..., i, j] = a[j+1] + ... + a[i] for j <= i (0 on the diagonal), -inf above.

    Summed with a cumulative sum of masked copies rather than cumsum[i] - cumsum[j]: that difference loses precision
    and gives nan where a holds -inf (the sequence resets)."""
    length = a.shape[-1]
    spread = a[..., :, None].expand(*a.shape, length)                          # spread[..., i, j] = a[i]
    strictly_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = torch.cumsum(spread.masked_fill(~strictly_below, 0), dim=-2)
    on_or_below = torch.tril(torch.ones(length, length, dtype=torch.bool, device=a.device))
    return sums.masked_fill(~on_or_below, -torch.inf)


def _pad_positions(t: Tensor, pad: int) -> Tensor:
    """Pads dim 1 (positions) of a (batch, length, ...) tensor with `pad` zeros at the end."""
    return F.pad(t, (0,) * (2 * (t.ndim - 2)) + (0, pad)) if pad else t


def _reset_at_boundaries(a: Tensor, cu_seqlens: Tensor) -> Tensor:
    """a (1, length, heads) with -inf at the first position of every sequence but the first: exp(a) = 0 there."""
    starts = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
    starts[cu_seqlens[1:-1].long()] = True
    return a.masked_fill(starts[None, :, None], -torch.inf)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                dt_limit: tuple[float, float] = (0.0, float("inf")), initial_states: Tensor | None = None,
                cu_seqlens: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same arguments and results as reference.ssd_reference, plus chunk_size (a power of two; the caller checks)."""
    compute = torch.promote_types(x.dtype, torch.float32)
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    pad = -length % chunk_size
    dt_c = effective_dt(dt.to(compute), dt_bias, dt_softplus, dt_limit)
    a = dt_c * A.to(compute)
    if cu_seqlens is not None:
        a = _reset_at_boundaries(a, cu_seqlens)
    x_c = x.to(compute)
    x_dt = x_c * dt_c[..., None]

    into_chunks = "b (c l) (g r) ... -> b c l g r ..."
    x_dt = rearrange(_pad_positions(x_dt, pad), into_chunks, l=chunk_size, g=groups)     # (b c l g r p)
    a = rearrange(_pad_positions(a, pad), "b (c l) (g r) -> b g r c l", l=chunk_size, g=groups)
    B_c, C_c = (rearrange(_pad_positions(t.to(compute), pad), "b (c l) g n -> b c l g n", l=chunk_size)
                for t in (B, C))

    a_cumsum = torch.cumsum(a, dim=-1)                                     # a_0 + ... + a_i within each chunk
    decay = torch.exp(segsum(a))                                           # (b g r c l s): the mask L
    scores = torch.einsum("bclgn,bcsgn->bgcls", C_c, B_c)                  # C_i . B_j, once per group
    y_diag = torch.einsum("bgcls,bgrcls,bcsgrp->bclgrp", scores, decay, x_dt)

    chunk_states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", B_c, decay[..., -1, :], x_dt)
    if initial_states is None:
        initial = chunk_states.new_zeros(chunk_states[:, :1].shape)
    else:
        initial = rearrange(initial_states.to(compute), "b (g r) p n -> b 1 g r p n", g=groups)
    chunk_totals = F.pad(a_cumsum[..., -1], (1, 0))                        # (b g r c+1): a zero for the initial
    passing = torch.exp(segsum(chunk_totals))                              # (b g r c+1 c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", passing, torch.cat([initial, chunk_states], dim=1))
    entering, last = states[:, :-1], states[:, -1]                         # (b c g r p n), (b g r p n)

    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", C_c, entering, torch.exp(a_cumsum))
    y = rearrange(y_diag + y_off, "b c l g r p -> b (c l) (g r) p")[:, :length]
    out = skip_and_gate(y, x_c, D, z).to(x.dtype)

    if cu_seqlens is None:
        final = rearrange(last, "b g r p n -> b (g r) p n")
    else:
        final = _states_at(cu_seqlens[1:].long() - 1, entering[0], a_cumsum[0], decay[0], B_c[0], x_dt[0])
    return out, final


def _states_at(positions: Tensor, entering: Tensor, a_cumsum: Tensor, decay: Tensor, B: Tensor,
               x_dt: Tensor) -> Tensor:
    """The states after `positions` (k,) of the one packed row: (k, heads, head_dim, state).

    h_i = exp(a_0 + ... + a_i) (state entering i's chunk) + sum_{j <= i in the chunk} L[i, j] dt'_j x_j B_j^T,
    step 4 and step 1 of the module docstring for one position each."""
    chunk_size = B.shape[1]
    chunk, offset = positions // chunk_size, positions % chunk_size
    into_chunk = torch.exp(rearrange(a_cumsum, "g r c l -> c l g r")[chunk, offset])            # (k g r)
    carried = into_chunk[..., None, None] * entering[chunk]                                     # (k g r p n)
    weights = rearrange(decay, "g r c l s -> c l g r s")[chunk, offset]                         # (k g r s)
    within = torch.einsum("kgrs,ksgn,ksgrp->kgrpn", weights, B[chunk], x_dt[chunk])
    return rearrange(carried + within, "k g r p n -> k (g r) p n")
