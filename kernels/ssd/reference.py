"""Mamba-2's SSD as a sequential float32 recurrence: the definition of correct for every backend.

Layouts follow mamba_ssm's `mamba_chunk_scan_combined`: x, z (batch, length, heads, head_dim); dt (batch, length,
heads); A (heads,) negative reals; B, C (batch, length, groups, state) where head h reads group h // (heads / groups);
D (heads,) or (heads, head_dim); dt_bias (heads,); states (batch, heads, head_dim, state).

    dt'  = clamp(softplus(dt + dt_bias), *dt_limit)           (bias and softplus optional; the clamp always runs)
    h_t  = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T              (h_0 = initial_states, or 0; (head_dim, state))
    y_t  = h_t C_t + D x_t,   out = y * silu(z)                (D and z optional)

With cu_seqlens (batch 1, sequences packed end to end) every sequence starts again from h = 0 and the final
states are one per sequence (n_sequences, heads, head_dim, state): what mamba_ssm returns as its varlen_states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor


def effective_dt(dt: Tensor, dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float]) -> Tensor:
    """dt' as mamba_ssm forms it: bias, softplus, then the clamp (its default (0, inf) zeroes a negative dt)."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def heads_of_groups(BC: Tensor, heads: int) -> Tensor:
    """(..., groups, state) -> (..., heads, state): the B or C row each head reads."""
    return repeat(BC, "... g n -> ... (g r) n", r=heads // BC.shape[-2])


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One position: state (batch, heads, head_dim, state), x (batch, heads, head_dim), dt (batch, heads) already
    effective, B, C (batch, groups, state). Returns (y without D and z (batch, heads, head_dim), the new state)."""
    heads = x.shape[1]
    B, C = heads_of_groups(B, heads), heads_of_groups(C, heads)
    decay = torch.exp(dt * A)[..., None, None]
    state = decay * state + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return (state * C[:, :, None, :]).sum(-1), state


def skip_and_gate(y: Tensor, x: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """y + D x, then * silu(z); D is (heads,) or (heads, head_dim), x and y (..., heads, head_dim)."""
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D).to(y.dtype)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan(x, dt, A, B, C, state):
    """The recurrence over dim 1 from `state`: (y without D and z, the last state)."""
    ys = []
    # unbind once: indexing position t inside the loop would give every step a full-size gradient buffer
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1), strict=True):
        y_t, state = ssd_step(state, x_t, dt_t, A, B_t, C_t)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                  z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                  dt_limit: tuple[float, float] = (0.0, float("inf")), initial_states: Tensor | None = None,
                  cu_seqlens: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out (batch, length, heads, head_dim) in x's dtype, final states float32: (batch, heads, head_dim, state),
    or (n_sequences, ...) with cu_seqlens). Inputs are checked by the caller (kernels/ssd/__init__.py).

    One Python step per position, float32 throughout (float64 inputs stay float64, for gradcheck); autograd
    differentiates it. With cu_seqlens each sequence is scanned on its own slice, which is the definition of the
    reset at boundaries.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    x_c, B_c, C_c, A_c = x.to(compute), B.to(compute), C.to(compute), A.to(compute)
    dt_c = effective_dt(dt.to(compute), dt_bias, dt_softplus, dt_limit)
    batch, _, heads, head_dim = x.shape
    zeros = x_c.new_zeros(batch, heads, head_dim, B.shape[-1])
    if cu_seqlens is None:
        y, final = _scan(x_c, dt_c, A_c, B_c, C_c, zeros if initial_states is None else initial_states.to(compute))
        finals = final
    else:
        bounds = cu_seqlens.tolist()
        pieces = [_scan(x_c[:, s:e], dt_c[:, s:e], A_c, B_c[:, s:e], C_c[:, s:e], zeros)
                  for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
        y = torch.cat([piece[0] for piece in pieces], dim=1)
        finals = torch.cat([piece[1] for piece in pieces], dim=0)
    return skip_and_gate(y, x_c, D, z).to(x.dtype), finals
