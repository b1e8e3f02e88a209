"""The gated delta rule as a sequential float32 recurrence: the definition of correct for every backend.

Layouts follow fla's `chunk_gated_delta_rule`: q, k (batch, length, heads, key_dim); v (batch, length, value_heads,
value_dim) with heads dividing value_heads (fla's grouped value attention: value head h reads query/key head
h // (value_heads / heads)); g (log decay, <= 0 in a model) and beta (batch, length, value_heads); states
(batch or n_sequences, value_heads, key_dim, value_dim), as fla keeps them (key first).

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T      (S_0 = initial_state, or 0)
    o_t = S_t^T (scale q_t)

which is the paper's S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T, o_t = S_t q_t, with S transposed to
fla's (key, value) order, a = exp(g) and b = beta. With cu_seqlens (batch 1, sequences packed end to end) every
sequence starts from its own row of initial_state (or 0) and the final states are one per sequence.
"""
from __future__ import annotations

import torch
from einops import repeat
from torch import Tensor

L2NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum(x^2) + eps)


def l2norm(x: Tensor) -> Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last dim, as fla's use_qk_l2norm_in_kernel normalises q and k."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2NORM_EPS)


def value_heads_of(qk: Tensor, value_heads: int) -> Tensor:
    """(..., heads, dim) -> (..., value_heads, dim): the query or key each value head reads."""
    return repeat(qk, "... h d -> ... (h r) d", r=value_heads // qk.shape[-2])


def gated_delta_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One position: state (batch, value_heads, key_dim, value_dim); q, k (batch, value_heads, key_dim) already
    scaled and repeated to the value heads; v (batch, value_heads, value_dim); g, beta (batch, value_heads).
    Returns (o (batch, value_heads, value_dim), the new state)."""
    state = torch.exp(g)[..., None, None] * state
    delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., :, None] * delta[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", state, q), state


def _scan(q, k, v, g, beta, state):
    """The recurrence over dim 1 from `state`: (o, the last state)."""
    outs = []
    # unbind once: indexing position t inside the loop would give every step a full-size gradient buffer
    for q_t, k_t, v_t, g_t, beta_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), g.unbind(1), beta.unbind(1),
                                          strict=True):
        o_t, state = gated_delta_step(state, q_t, k_t, v_t, g_t, beta_t)
        outs.append(o_t)
    return torch.stack(outs, dim=1), state


def gated_delta_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
                          initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                          use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """(o (batch, length, value_heads, value_dim) in v's dtype, final states float32 (batch or n_sequences,
    value_heads, key_dim, value_dim)). Inputs are checked by the caller (kernels/gated_delta/__init__.py).

    One Python step per position, float32 throughout (float64 inputs stay float64, for gradcheck); autograd
    differentiates it. With cu_seqlens each sequence is scanned on its own slice: the definition of the reset.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    q_c, k_c, v_c, g_c, beta_c = (t.to(compute) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q_c, k_c = l2norm(q_c), l2norm(k_c)
    value_heads, key_dim, value_dim = v.shape[2], k.shape[3], v.shape[3]
    q_c = value_heads_of(q_c, value_heads) * (key_dim ** -0.5 if scale is None else scale)
    k_c = value_heads_of(k_c, value_heads)
    bounds = [0, q.shape[1]] if cu_seqlens is None else cu_seqlens.tolist()
    n_states = q.shape[0] if cu_seqlens is None else len(bounds) - 1
    states = q_c.new_zeros(n_states, value_heads, key_dim, value_dim) if initial_state is None \
        else initial_state.to(compute)
    if cu_seqlens is None:
        o, finals = _scan(q_c, k_c, v_c, g_c, beta_c, states)
    else:
        pieces = [_scan(q_c[:, s:e], k_c[:, s:e], v_c[:, s:e], g_c[:, s:e], beta_c[:, s:e], states[n:n + 1])
                  for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        o = torch.cat([piece[0] for piece in pieces], dim=1)
        finals = torch.cat([piece[1] for piece in pieces], dim=0)
    return o.to(v.dtype), finals
