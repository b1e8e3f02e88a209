"""Mamba-1 selective scan as a sequential float32 recurrence: the definition of correct for every backend.

Layouts follow mamba_ssm: u, delta, z (batch, dim, L); A (dim, N) real; B, C (batch, N, L), or grouped
(batch, G, N, L) where channel d reads group d // (dim / G); D, delta_bias (dim,).

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta'_t A) * h_{t-1} + delta'_t B_t u_t      (h_0 = 0, per channel a length-N state)
    y_t    = C_t . h_t + D u_t,   out = y * silu(z)          (D and z optional)

With seq_idx (batch, L), the document id of each position (documents packed in a row), the decay is 0 where a new
document starts (t > 0 and seq_idx[t] != seq_idx[t - 1]): the state restarts from zero there, and no gradient
crosses the cut. Only neighbours are compared, so a flipped seq_idx (a reversed layer's) works the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor


def expand_groups(BC: Tensor, dim: int) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim, N, L): the B or C row each channel reads."""
    if BC.ndim == 3:
        return repeat(BC, "b n l -> b d n l", d=dim)
    return repeat(BC, "b g n l -> b (g h) n l", h=dim // BC.shape[1])


def document_continues(seq_idx: Tensor) -> Tensor:
    """(batch, L) bool: True where position t carries the state on, False where a document starts (t > 0 and
    seq_idx[t] != seq_idx[t - 1]). Position 0 counts as continuing: the state before it is h_0."""
    continues = torch.ones(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    continues[:, 1:] = seq_idx[:, 1:] == seq_idx[:, :-1]
    return continues


def selective_scan_reference(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                             z: Tensor | None = None, delta_bias: Tensor | None = None,
                             delta_softplus: bool = False, seq_idx: Tensor | None = None, *,
                             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (out (batch, dim, L) in u's dtype, last state (batch, dim, N) float32).

    `seq_idx` (batch, L) integer document ids: the state resets to 0 where a document starts (see above); the last
    state is then the row's last document's. `initial_state` (batch, dim, N) replaces h_0 = 0 (decoding continues
    from a saved state).
    One Python step per position, float32 throughout (float64 inputs stay float64, for gradcheck);
    autograd differentiates it.
    """
    dtype_in, compute = u.dtype, torch.promote_types(u.dtype, torch.float32)
    u, delta, A = u.to(compute), delta.to(compute), A.to(compute)
    dim = u.shape[1]
    B, C = expand_groups(B.to(compute), dim), expand_groups(C.to(compute), dim)
    if delta_bias is not None:
        delta = delta + delta_bias.to(compute)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], dim, A.shape[1]) if initial_state is None else initial_state.to(compute)
    ys = []
    # unbind once: indexing position t inside the loop would give every step a full-size gradient buffer
    steps = zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True)
    continues = None if seq_idx is None else document_continues(seq_idx).to(compute).unbind(-1)
    for t, (delta_t, u_t, B_t, C_t) in enumerate(steps):
        decay = torch.exp(delta_t[..., None] * A)                       # (batch, dim, N)
        if continues is not None:
            decay = decay * continues[t][:, None, None]  # 0 at a document start: the state restarts
        state = decay * state + (delta_t * u_t)[..., None] * B_t
        ys.append((state * C_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.to(compute)[:, None]
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(dtype_in), state


def selective_state_update_reference(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                     D: Tensor | None = None, z: Tensor | None = None,
                                     dt_bias: Tensor | None = None, dt_softplus: bool = False) -> Tensor:
    """One decoding step of the same recurrence; updates `state` (batch, dim, N) in place, returns y (batch, dim).

    x, dt, z are (batch, dim); B, C are (batch, N) or grouped (batch, G, N).
    """
    out, new_state = selective_scan_reference(
        x[..., None], dt[..., None], A, B[..., None], C[..., None], D, None if z is None else z[..., None],
        dt_bias, dt_softplus, initial_state=state)
    state.copy_(new_state)
    return out[..., 0]
