"""The `torch` backend of the selective scan: a chunked parallel scan with a hand-written backward (CPU training).

Positions are padded to a multiple of CHUNK and processed in segments of whole chunks, sized so that one
segment's (batch, dim, positions, N) temporaries stay around SEGMENT_ELEMENTS. Inside a segment:
  1. local scans: every chunk runs the recurrence from a zero state, all chunks at once, one fused
     multiply-add over (batch, dim, chunks, N) per position in the chunk; the decay products ride along;
  2. carries: the true state entering each chunk, one step per chunk;
  3. fix-up: h_t = local_t + (decay product since the chunk's start)_t * state entering the chunk.
When batch x dim x N is large a segment holds a single chunk, which scans on from its entering state
directly (no decay products, no fix-up).
Packed documents (seq_idx): the decay is multiplied by 0 where a document starts, so every scan below (and the
reverse one of the backward) restarts there, with no gradient across the cut.
Only products of decays exp(delta A) <= 1 are ever formed, never exp of a positive sum, so long sequences with
strong decay cannot overflow (they underflow towards 0, which is the right answer).

Backward keeps only the state entering each segment (plus, with z, the pre-gate output (batch, dim, L)); it
recomputes one segment's states at a time, last segment first, and gets g_t = dL/dh_t from the reverse
recurrence g_t = C_t dy_t + a_{t+1} g_{t+1}, run with the same chunked scan backwards. Then
dL/d(delta_t A) = g_t a_t h_{t-1} = g_t (h_t - delta_t B_t u_t), and the rest is the chain rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.selective_scan.reference import document_continues

CHUNK = 16
SEGMENT_ELEMENTS = 1 << 20
# One segment's tensors are laid out (CHUNK, batch, G, chunks, H, N): position-in-chunk outermost, so each step
# of the local scans is one contiguous slice, and (H, N) innermost, so sums over N or H are batched matmuls.
TO_CHUNKS = "b g h (c t) -> t b g c h"
BC_TO_CHUNKS = "b g (c t) n -> t b g c n"


def _chunked_scan(decay: Tensor, inputs: Tensor, initial: Tensor) -> tuple[Tensor, Tensor]:
    """h = decay * h_prev + inputs along dim 0 of (CHUNK, batch, G, chunks, H, N) tensors, from h = initial.

    Returns (all states like `inputs`, the last state (batch, G, H, N)); the arguments are left unchanged.
    """
    if inputs.shape[3] == 1:  # one chunk (large batch x dim): scan on from `initial`, no carries to fix up
        states = torch.empty_like(inputs)
        torch.addcmul(inputs[0], decay[0], initial[:, :, None], out=states[0])
        for j in range(1, inputs.shape[0]):
            torch.addcmul(inputs[j], decay[j], states[j - 1], out=states[j])
        return states, states[-1, :, :, 0].clone()
    states, products = torch.empty_like(inputs), torch.empty_like(decay)
    states[0], products[0] = inputs[0], decay[0]
    for j in range(1, inputs.shape[0]):
        torch.addcmul(inputs[j], decay[j], states[j - 1], out=states[j])
        torch.mul(products[j - 1], decay[j], out=products[j])
    entering = torch.empty_like(inputs[0])
    state = initial
    for c in range(inputs.shape[3]):
        entering[:, :, c] = state
        state = torch.addcmul(states[-1, :, :, c], products[-1, :, :, c], state)
    states.addcmul_(products, entering)
    return states, state


def _chunked_reverse_scan_(decay: Tensor, grads: Tensor, future: Tensor) -> Tensor:
    """In place, grads c -> g = c + decay_next * g_next along positions, `future` being decay * g just past the end.

    Tensors as in _chunked_scan; returns decay_0 g_0: what the state before the first position receives.
    """
    if grads.shape[3] == 1:  # one chunk: run the recurrence straight through
        grads[-1].add_(future[:, :, None])
        for j in range(grads.shape[0] - 2, -1, -1):
            grads[j].addcmul_(decay[j + 1], grads[j + 1])
        return decay[0, :, :, 0] * grads[0, :, :, 0]
    tails = torch.empty_like(decay)  # tails_j = decay_{j+1} ... decay_{CHUNK-1} within the chunk
    tails[-1] = 1
    for j in range(grads.shape[0] - 2, -1, -1):
        grads[j].addcmul_(decay[j + 1], grads[j + 1])
        torch.mul(tails[j + 1], decay[j + 1], out=tails[j])
    entering = torch.empty_like(grads[0])
    carry = future
    for c in range(grads.shape[3] - 1, -1, -1):
        entering[:, :, c] = carry
        carry = decay[0, :, :, c] * torch.addcmul(grads[0, :, :, c], tails[0, :, :, c], carry)
    grads.addcmul_(tails, entering)
    return carry


def _product(a: Tensor, b: Tensor) -> Tensor:
    """a * b broadcast into a fresh contiguous tensor (the scans want contiguous per-position slices)."""
    return torch.mul(a, b, out=a.new_empty(torch.broadcast_shapes(a.shape, b.shape)))


def _segment_terms(delta: Tensor, delta_u: Tensor, A: Tensor, B: Tensor,
                   continues: Tensor | None) -> tuple[Tensor, Tensor]:
    """decay exp(delta A) (times 0 where a document starts) and input delta u B of one segment, both
    (CHUNK, batch, G, chunks, H, N).

    delta, delta_u (CHUNK, batch, G, chunks, H, 1); A (G, 1, H, N); B (CHUNK, batch, G, chunks, 1, N);
    continues None or (CHUNK, batch, 1, chunks, 1, 1).
    """
    decay = _product(delta, A).exp_()
    return decay if continues is None else decay.mul_(continues), _product(delta_u, B)


def _chunks(t: Tensor, start: int, end: int) -> Tensor:
    """View of positions start:end of a (batch, G, H, L) tensor as (CHUNK, batch, G, chunks, H, 1)."""
    return rearrange(t[..., start:end], TO_CHUNKS, t=CHUNK)[..., None]


def _bc_chunks(t: Tensor, start: int, end: int) -> Tensor:
    """View of positions start:end of a (batch, G, L, N) tensor as (CHUNK, batch, G, chunks, 1, N)."""
    return rearrange(t[:, :, start:end], BC_TO_CHUNKS, t=CHUNK)[:, :, :, :, None]


def _segments(batch: int, dim: int, n_state: int, padded_len: int) -> list[tuple[int, int]]:
    per_position = batch * dim * n_state
    seg_len = CHUNK * max(1, SEGMENT_ELEMENTS // (per_position * CHUNK))
    return [(s, min(s + seg_len, padded_len)) for s in range(0, padded_len, seg_len)]


def _pad_time(t: Tensor, pad: int) -> Tensor:
    return F.pad(t, (0, pad)) if pad else t


def _continues(seq_idx: Tensor | None, pad: int, compute: torch.dtype) -> Tensor | None:
    """None without seq_idx, else (batch, 1, 1, L + pad): 1 where the state carries on, 0 where a document starts
    (padding carries on), in _chunks' layout."""
    if seq_idx is None:
        return None
    return F.pad(document_continues(seq_idx).to(compute), (0, pad), value=1.0)[:, None, None]


def _continues_chunks(continues: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if continues is None else _chunks(continues, start, end)


class SelectiveScanFunction(torch.autograd.Function):
    """selective_scan's math (see reference.py) with inputs already checked; returns (out, last_state)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx):
        compute = torch.promote_types(u.dtype, torch.float32)
        batch, dim, length = u.shape
        groups = 1 if B.ndim == 3 else B.shape[1]
        n_state = A.shape[1]
        pad = -length % CHUNK
        dt = _delta(delta, delta_bias, delta_softplus, compute)
        grouped = rearrange(_pad_time(dt, pad), "b (g h) l -> b g h l", g=groups)
        grouped_du = rearrange(_pad_time(dt * u.to(compute), pad), "b (g h) l -> b g h l", g=groups)
        A_g = rearrange(A.to(compute), "(g h) n -> g h n", g=groups)
        B_t, C_t = (_pad_time(_grouped(t, compute), pad).transpose(-1, -2) for t in (B, C))  # (b, G, Lp, N)
        continues = _continues(seq_idx, pad, compute)

        y = torch.empty_like(grouped)
        state = u.new_zeros(batch, groups, dim // groups, n_state, dtype=compute)
        segment_states = []
        for start, end in _segments(batch, dim, n_state, length + pad):
            segment_states.append(state)
            decay, inputs = _segment_terms(_chunks(grouped, start, end), _chunks(grouped_du, start, end),
                                           A_g[:, None], _bc_chunks(B_t, start, end),
                                           _continues_chunks(continues, start, end))
            states, state = _chunked_scan(decay, inputs, state)
            _chunks(y, start, end).copy_(states @ _bc_chunks(C_t, start, end).mT)
        y = rearrange(y[..., :length], "b g h l -> b (g h) l")
        if D is not None:
            y = y + u.to(compute) * D.to(compute)[:, None]
        out = y if z is None else y * F.silu(z.to(compute))
        last_state = rearrange(state, "b g h n -> b (g h) n")

        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, seq_idx, torch.stack(segment_states),
                              y if z is not None else None)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last_state)
        return out.to(u.dtype), last_state

    @staticmethod
    def backward(ctx, grad_out, _grad_last_state):
        u, delta, A, B, C, D, z, delta_bias, seq_idx, segment_states, y_before_gate = ctx.saved_tensors
        needs = ctx.needs_input_grad
        compute = torch.promote_types(u.dtype, torch.float32)
        batch, dim, length = u.shape
        groups = 1 if B.ndim == 3 else B.shape[1]
        n_state = A.shape[1]
        pad = -length % CHUNK
        u_c, grad_out = u.to(compute), grad_out.to(compute)

        grad_z = None
        if z is not None:
            z_c = z.to(compute)
            gate = torch.sigmoid(z_c)
            grad_y = grad_out * z_c * gate
            if needs[6]:
                grad_z = grad_out * y_before_gate * gate * (1 + z_c * (1 - gate))
        else:
            grad_y = grad_out

        dt = _delta(delta, delta_bias, delta_softplus=ctx.delta_softplus, compute=compute)
        split = "b (g h) l -> b g h l"
        grouped = rearrange(_pad_time(dt, pad), split, g=groups)
        grouped_u = rearrange(_pad_time(u_c, pad), split, g=groups)
        grouped_du = grouped * grouped_u
        grouped_dy = rearrange(_pad_time(grad_y, pad), split, g=groups)
        A_g = rearrange(A.to(compute), "(g h) n -> g h n", g=groups)
        B_t, C_t = (_pad_time(_grouped(t, compute), pad).transpose(-1, -2) for t in (B, C))
        continues = _continues(seq_idx, pad, compute)

        grad_dt, grad_u = torch.empty_like(grouped), torch.empty_like(grouped)
        grad_B = torch.empty_like(B_t) if needs[3] else None
        grad_C = torch.empty_like(C_t) if needs[4] else None
        grad_A = torch.zeros_like(A_g)
        A_chunks = A_g[:, None]
        future = torch.zeros_like(segment_states[0])
        segments = _segments(batch, dim, n_state, length + pad)
        for index in range(len(segments) - 1, -1, -1):
            start, end = segments[index]
            dt_s, du_s, dy_s = (_chunks(t, start, end) for t in (grouped, grouped_du, grouped_dy))
            B_s, C_s = _bc_chunks(B_t, start, end), _bc_chunks(C_t, start, end)
            decay, inputs = _segment_terms(dt_s, du_s, A_chunks, B_s, _continues_chunks(continues, start, end))
            states, _ = _chunked_scan(decay, inputs, segment_states[index])
            grads = _product(dy_s, C_s)
            future = _chunked_reverse_scan_(decay, grads, future)
            if grad_C is not None:
                _bc_chunks(grad_C, start, end).copy_(dy_s.mT @ states)
            if grad_B is not None:
                _bc_chunks(grad_B, start, end).copy_(du_s.mT @ grads)
            grad_inputs_u = grads @ B_s.mT  # dL/d(delta u)
            grad_log_decay = states.sub_(inputs).mul_(grads)  # dL/d(delta A) = g_t a_t h_{t-1}
            grad_A += (grad_log_decay * dt_s).sum((0, 1, 3))
            _chunks(grad_u, start, end).copy_(grad_inputs_u * dt_s)
            _chunks(grad_dt, start, end).copy_(grad_inputs_u * _chunks(grouped_u, start, end)
                                               + (grad_log_decay * A_chunks).sum(-1, keepdim=True))

        merge = "b g h l -> b (g h) l"
        grad_u = rearrange(grad_u[..., :length], merge)
        grad_dt = rearrange(grad_dt[..., :length], merge)
        grad_D = None
        if D is not None:
            grad_u = grad_u + grad_y * D.to(compute)[:, None]
            grad_D = (grad_y * u_c).sum((0, 2)) if needs[5] else None
        if ctx.delta_softplus:
            pre = delta.to(compute) if delta_bias is None else delta.to(compute) + delta_bias.to(compute)[:, None]
            grad_dt = grad_dt * torch.sigmoid(pre)
        grad_bias = grad_dt.sum((0, 2)) if delta_bias is not None and needs[7] else None
        grad_B, grad_C = (None if g is None else _ungrouped(g[:, :, :length].transpose(-1, -2), like)
                          for g, like in ((grad_B, B), (grad_C, C)))
        return (_cast(grad_u, u, needs[0]), _cast(grad_dt, delta, needs[1]),
                _cast(rearrange(grad_A, "g h n -> (g h) n"), A, needs[2]), grad_B, grad_C, _cast(grad_D, D, needs[5]),
                _cast(grad_z, z, needs[6]), _cast(grad_bias, delta_bias, needs[7]), None, None)


def _delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool, compute: torch.dtype) -> Tensor:
    dt = delta.to(compute)
    if delta_bias is not None:
        dt = dt + delta_bias.to(compute)[:, None]
    return F.softplus(dt) if delta_softplus else dt


def _grouped(BC: Tensor, compute: torch.dtype) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, G, N, L) in the compute dtype."""
    BC = BC.to(compute)
    return BC[:, None] if BC.ndim == 3 else BC


def _ungrouped(grad: Tensor, like: Tensor) -> Tensor:
    return (grad[:, 0] if like.ndim == 3 else grad).to(like.dtype)


def _cast(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    return grad.to(like.dtype) if grad is not None and needed else None


def selective_scan_chunked(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                           z: Tensor | None = None, delta_bias: Tensor | None = None,
                           delta_softplus: bool = False, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out (batch, dim, L) in u's dtype, last state (batch, dim, N) float32, or float64 for float64 inputs);
    seq_idx (batch, L) resets the state where a packed document starts."""
    return SelectiveScanFunction.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx)


def selective_state_update_torch(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                 D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                                 dt_softplus: bool = False) -> Tensor:
    """One decoding step: state (batch, dim, N) updated in place; returns y (batch, dim) in x's dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)
    groups = 1 if B.ndim == 2 else B.shape[1]
    dt = dt.to(compute) if dt_bias is None else dt.to(compute) + dt_bias.to(compute)
    dt = F.softplus(dt) if dt_softplus else dt
    B_d, C_d = (rearrange(_grouped(t[..., None], compute)[..., 0], "b g n -> b g 1 n") for t in (B, C))
    x_c = x.to(compute)
    split = "b (g h) -> b g h"
    new_state = (rearrange(state.to(compute), "b (g h) n -> b g h n", g=groups)
                 * torch.exp(rearrange(dt, split, g=groups)[..., None] * rearrange(A.to(compute), "(g h) n -> g h n",
                                                                                   g=groups))
                 + rearrange(dt * x_c, split, g=groups)[..., None] * B_d)
    y = rearrange((new_state * C_d).sum(-1), "b g h -> b (g h)")
    state.copy_(rearrange(new_state, "b g h n -> b (g h) n"))
    if D is not None:
        y = y + x_c * D.to(compute)
    if z is not None:
        y = y * F.silu(z.to(compute))
    return y.to(x.dtype)
