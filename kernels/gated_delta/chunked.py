"""The `torch` backend of the gated delta rule, what CPU training uses: the chunked WY (UT transform) form of fla's
chunk_gated_delta_rule in batched PyTorch matmuls.

Within a chunk, with S the state entering it and G the cumulative sum of g from the chunk's start, the recurrence of
reference.py unrolls to
    S_i = exp(G_i) S + sum_{j <= i} exp(G_i - G_j) k_j d_j^T,    d_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i),
so the corrections d solve the unit lower triangular system (I + A) d = beta v - (beta k exp(G)) S, with
A_ij = beta_i k_i.k_j exp(G_i - G_j) for j < i. Hence d = u - w S with u = (I + A)^-1 beta v and
w = (I + A)^-1 beta k exp(G), neither depending on S, and
    o = (q exp(G)) S + [q_i.k_j exp(G_i - G_j)]_{j <= i} d,    S_next = exp(G_last) S + (k exp(G_last - G))^T d.
All of it runs batched over chunks except the short loop that carries S from one chunk to the next (StatePass,
with a hand-derived backward) and the solve (UnitLowerSolve); autograd differentiates the rest.

Padding: positions past a sequence's end get g = 0 (decay 1) and beta = 0 (no correction), so the state passes
through them unchanged. Packed sequences (cu_seqlens) become a batch of one padded row each: every sequence starts
from its own initial state, and its final state is its row's. The arithmetic is float32 (float64 for float64
inputs), also inside a caller's autocast region.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.gated_delta.reference import value_heads_of


def gated_delta_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
                        initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
                        chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Same arguments and results as reference.gated_delta_reference with q and k already normalised if wanted,
    plus chunk_size (a power of two), capped at the longest sequence's next power of two: longer chunks would only
    pad it."""
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        value_heads, key_dim = v.shape[2], k.shape[3]
        q_c = value_heads_of(q.to(compute), value_heads) * (key_dim ** -0.5 if scale is None else scale)
        k_c = value_heads_of(k.to(compute), value_heads)
        streams = (q_c, k_c, v.to(compute), g.to(compute), beta.to(compute))
        bounds = None if cu_seqlens is None else cu_seqlens.tolist()
        length = q.shape[1]
        longest = length if bounds is None else max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
        chunk = min(chunk_size, 1 << (longest - 1).bit_length())
        padded = -(-longest // chunk) * chunk
        if bounds is None:
            rows = tuple(_pad_positions(t, padded - length) for t in streams)
        else:
            positions, real = _sequence_rows(bounds, padded, q.device)
            rows = tuple(_gather_rows(t[0], positions, real) for t in streams)
        state = None if initial_state is None else initial_state.to(compute)
        o, final_state = chunk_scan(*rows, state, chunk)
        o = o[:, :length] if cu_seqlens is None else o[real][None]
    return o.to(v.dtype), final_state


def chunk_scan(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
               chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked recurrence on (rows, length, value_heads, ...) streams whose length is a multiple of `chunk`,
    q already scaled and q, k repeated to the value heads: (o like v, final states (rows, value_heads, K, V))."""
    q, k, v = (rearrange(t, "n (c l) h d -> n h c l d", l=chunk).contiguous() for t in (q, k, v))
    g, beta = (rearrange(t, "n (c l) h -> n h c l", l=chunk) for t in (g, beta))
    G = g.cumsum(-1)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # exp only where j <= i: the other differences are positive for decays (g < 0) and could overflow
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, -torch.inf).exp()     # (n h c l l)
    k_beta = k * beta[..., None]
    A = k_beta @ k.transpose(-1, -2) * decay  # UnitLowerSolve reads its strict lower part only
    key_dim = k.shape[-1]
    w, u = UnitLowerSolve.apply(A, k_beta * G.exp()[..., None], v * beta[..., None])
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    state = q.new_zeros(q.shape[0], q.shape[1], key_dim, v.shape[-1]) if initial_state is None else initial_state
    heads = q.shape[1]
    # (rows, heads) merged into one batch dim: the loop's fused baddbmm/addcmul take 3-D operands
    d, entering, final_state = (t.unflatten(0, (-1, heads)) for t in StatePass.apply(
        *(t.flatten(0, 1) for t in (u, w, k_to_end.transpose(-1, -2), G[..., -1].exp(), state))))
    o = (q * G.exp()[..., None]) @ entering + (q @ k.transpose(-1, -2) * decay) @ d
    return rearrange(o, "n h c l d -> n (c l) h d"), final_state


class UnitLowerSolve(torch.autograd.Function):
    """(I + L)^-1 B_w and (I + L)^-1 B_u for L the strict lower part of A (..., l, l). The inverse is formed once (a
    triangular solve on the identity) and kept: the backward is then batched matmuls, where autograd's backward of
    a solve would solve again, the slowest op of the chunked path on CPU. Two right-hand sides rather than one
    concatenated: no copies into and out of a joint buffer."""

    @staticmethod
    def forward(ctx, A, B_w, B_u):
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
        inverse = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)  # reads A's strict lower part
        w, u = inverse @ B_w, inverse @ B_u
        ctx.save_for_backward(inverse, w, u)
        return w, u

    @staticmethod
    def backward(ctx, grad_w, grad_u):
        inverse, w, u = ctx.saved_tensors
        grad_B_w, grad_B_u = inverse.transpose(-1, -2) @ grad_w, inverse.transpose(-1, -2) @ grad_u
        grad_A = -(grad_B_w @ w.transpose(-1, -2) + grad_B_u @ u.transpose(-1, -2)).tril(-1)  # only L is read
        return grad_A, grad_B_w, grad_B_u


class StatePass(torch.autograd.Function):
    """The one sequential part, chunk after chunk: d_c = u_c - w_c S_c, S_{c+1} = gamma_c S_c + K_c d_c, with
    u, w (b c l ·), K = (k exp(G_last - G))^T (b c key l), gamma = exp(G_last) (b c), S_0 the initial state
    (b key value), b = rows * heads. Returns (d, the states entering each chunk (b c key value), the final state).
    Its backward runs the same loop in reverse, and forms every other gradient in batched matmuls: through autograd
    each chunk's few ops would cost a graph node each, what dominated the backward's time. Each step is two fused
    ops each way (baddbmm, addcmul), as the loop's many small calls cost more than their arithmetic."""

    @staticmethod
    def forward(ctx, u, w, K, gamma, initial_state):
        state, entering, corrections = initial_state, [], []
        for u_c, w_c, K_c, gamma_c in zip(u.unbind(1), w.unbind(1), K.unbind(1), gamma.unbind(1), strict=True):
            entering.append(state)
            d_c = torch.baddbmm(u_c, w_c, state, alpha=-1)
            corrections.append(d_c)
            state = torch.baddbmm(state * gamma_c[:, None, None], K_c, d_c)
        d, entering = torch.stack(corrections, dim=1), torch.stack(entering, dim=1)
        ctx.save_for_backward(w, K, gamma, d, entering)
        return d, entering, state

    @staticmethod
    def backward(ctx, grad_d, grad_entering, grad_final):
        w, K, gamma, d, entering = ctx.saved_tensors
        grad_state = torch.zeros_like(entering[:, 0]) if grad_final is None else grad_final
        grad_d = torch.zeros_like(d) if grad_d is None else grad_d
        grad_entering = torch.zeros_like(entering) if grad_entering is None else grad_entering
        grads_d, grads_after = [], []  # the gradients of each chunk's d and of the state after it, last chunk first
        for grad_d_c, grad_entering_c, w_c, K_c, gamma_c in zip(
                *(t.unbind(1)[::-1] for t in (grad_d, grad_entering, w, K, gamma)), strict=True):
            grads_after.append(grad_state)
            grad_d_c = torch.baddbmm(grad_d_c, K_c.transpose(-1, -2), grad_state)
            grads_d.append(grad_d_c)
            grad_state = torch.baddbmm(torch.addcmul(grad_entering_c, gamma_c[:, None, None], grad_state),
                                       w_c.transpose(-1, -2), grad_d_c, alpha=-1)
        grad_d, grad_after = torch.stack(grads_d[::-1], dim=1), torch.stack(grads_after[::-1], dim=1)
        grad_w = -grad_d @ entering.transpose(-1, -2)
        grad_K = grad_after @ d.transpose(-1, -2)
        grad_gamma = torch.linalg.vecdot(grad_after.flatten(-2), entering.flatten(-2))  # no product buffer
        return grad_d, grad_w, grad_K, grad_gamma, grad_state


def _pad_positions(t: Tensor, pad: int) -> Tensor:
    """Pads dim 1 (positions) of a (batch, length, ...) tensor with `pad` zeros at the end."""
    return F.pad(t, (0,) * (2 * (t.ndim - 2)) + (0, pad)) if pad else t


def _sequence_rows(bounds: list[int], padded: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(positions, real), both (n_sequences, padded): the packed position each row slot reads (0 in the padding)
    and whether it is a real one."""
    starts = torch.tensor(bounds[:-1], device=device)
    lengths = torch.tensor(bounds[1:], device=device) - starts
    slots = torch.arange(padded, device=device)
    real = slots < lengths[:, None]
    return torch.where(real, starts[:, None] + slots, 0), real


def _gather_rows(t: Tensor, positions: Tensor, real: Tensor) -> Tensor:
    """(length, ...) packed -> (n_sequences, padded length, ...), zeros in the padding."""
    rows = t[positions]
    return rows * real.view(*real.shape, *(1,) * (rows.ndim - 2)).to(rows.dtype)
