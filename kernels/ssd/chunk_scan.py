"""SSD's chunked algorithm as one autograd.Function: the forward and a hand-derived backward in batched matmuls.

Per chunk (Q positions) and head, with X = dt' x (Q, P), B and C (Q, N) of the head's group, s the running sum of
a = dt' A inside the chunk (s_i = a_0 + ... + a_i) and E the state entering the chunk (P, N):
    decay[i, j]  = exp(s_i - s_j) for j <= i, else 0         (exp(a_{j+1} + ... + a_i): the mask L of the paper)
    y            = (decay * C B^T) X + exp(s) * (C E^T) + D x
    E_next       = exp(s_{Q-1}) E + (decay[Q-1] * X)^T B     (chunk by chunk, from the initial state)
C B^T is formed once per group; C E^T and the end states are one matmul per group with all its heads side by side,
in x's own (position, head, head_dim) layout; only the first term of y runs per head, on a head-major copy of X.
States known to be zero (before the first chunk without an initial state) or to get no gradient (the last chunk's
end state when the final state is unused, as in training) are left out of the matmuls.

decays(): s is summed in float64 and every exponent is a float64 difference rounded once, so a strongly decaying
head keeps its small decays (a float32 difference of two long sums would not). Only 8 x 8 blocks on the diagonal
are exponentiated entry by entry; below them exp(s_i - s_j) = exp(s_i - s_e) exp(s_e - s_j), e the end of j's
block. With A <= 0 and dt' >= 0 every exponent is <= 0 (a float64 running sum of non-positive terms never rises), so
no exp overflows. Where an input does not reach a position (j > i, or a sequence starts in between: packed
sequences) -inf is added to the exponent: exact zeros with zero gradients, and never -inf - -inf.

The backward reuses the forward's decays, masked scores and layouts and runs the transposed matmuls. The decays
reach a through s: decay[i, j] depends on a_k for j < k <= i, so d a_k is the sum of d decay * decay over that
rectangle, formed from its own terms (row prefix sums) rather than as a difference of larger sums that cancel.
Double backward is refused (once_differentiable).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable


DECAY_BLOCK = 8  # decays are exponentiated entry by entry only in diagonal blocks of this many positions


class ChunkScan(torch.autograd.Function):
    """(x (b L h p), dt (b L h) (dt' already), A (h), B, C (b L g n), D (h) or (h p) or None, initial (b h p n) or None,
    sequence (c q) int or None, chunk_size q dividing L) -> (y + D x (b L h p), final state (b h p n)), plus the states
    entering each chunk (b c h p n) when given the sequence index of every position (packed sequences: inputs reach
    only their own sequence's later positions)."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, initial, sequence, chunk_size):
        ctx.set_materialize_grads(False)  # an unused final state (training) leaves the last chunk's end state out
        heads, groups = x.shape[2], B.shape[2]
        x_c = rearrange(x, "b (c q) h p -> b c q h p", q=chunk_size)                              # a view
        dt_c = rearrange(dt, "b (c q) h -> b c h q", q=chunk_size)
        B_c, C_c = (rearrange(t, "b (c q) g n -> b c g q n", q=chunk_size).contiguous() for t in (B, C))
        s = (dt_c * A[:, None]).to(torch.float64).cumsum(-1)                                        # (b c h q)
        decay = decays(s, sequence, x.dtype)                                                        # (b c h q q)
        from_start = _exp(s, None if sequence is None else carried_in(sequence), x.dtype)           # (b c h q)

        scores = C_c @ B_c.transpose(-1, -2)                                                        # (b c g q q)
        masked = _heads(_groups(decay, groups) * scores[:, :, :, None])                             # (b c h q q)
        x_head = rearrange(x_c, "b c q h p -> b c h q p").clone(memory_format=torch.contiguous_format)
        x_head.mul_(dt_c[..., None])                                                                # dt' x by head
        y = rearrange(masked @ x_head, "b c h q p -> b c q h p").contiguous()
        x_to_end = x_c * _per_position(dt_c * decay[..., -1, :])                    # dt' x times its end-state weight
        chunk_states = _head_states(_group_columns(x_to_end, groups).transpose(-1, -2) @ B_c, heads)

        chunk_decay = from_start[..., -1, None, None]                                               # (b c h 1 1)
        entering = torch.empty_like(chunk_states)                                                   # (b c h p n)
        state = torch.zeros_like(chunk_states[:, 0]) if initial is None else initial
        for k in range(x_c.shape[1]):
            entering[:, k] = state
            state = torch.addcmul(chunk_states[:, k], chunk_decay[:, k], state)
        del chunk_states
        first = 0 if initial is not None else 1                           # chunks before it start from a zero state
        C_entering = C_c[:, first:] @ _group_states(entering[:, first:], groups).transpose(-1, -2)  # (b c g q (r p))
        y[:, first:].addcmul_(_head_columns(C_entering, heads), _per_position(from_start[:, first:]))
        if D is not None:
            y.addcmul_(x_c, _per_channel(D))

        ctx.save_for_backward(x_c, dt_c, A, D, B_c, C_c, scores, decay, masked, from_start, x_head, x_to_end,
                              entering, C_entering)
        ctx.first = first
        outputs = (rearrange(y, "b c q h p -> b (c q) h p"), state)
        return outputs if sequence is None else outputs + (entering,)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_y, d_final, d_entering=None):
        (x_c, dt_c, A, D, B_c, C_c, scores, decay, masked, from_start, x_head, x_to_end, entering,
         C_entering) = ctx.saved_tensors
        heads, groups, chunks, first = x_c.shape[3], B_c.shape[2], x_c.shape[1], ctx.first
        ending = chunks if d_final is not None else chunks - 1               # chunks whose end state gets a gradient
        d_y = torch.zeros_like(x_c) if d_y is None else rearrange(d_y, "b (c q) h p -> b c q h p", q=x_c.shape[2])
        d_y_head = rearrange(d_y, "b c q h p -> b c h q p").contiguous()
        d_masked = d_y_head @ x_head.transpose(-1, -2)                                              # (b c h q q)
        d_x_dt = rearrange(masked.transpose(-1, -2) @ d_y_head, "b c h q p -> b c q h p").contiguous()
        del d_y_head

        # the states, walked back from the final one: E_{k+1} = exp(s_{Q-1}) E_k + H_k
        d_y_carried = _group_columns(d_y[:, first:] * _per_position(from_start[:, first:]), groups)
        d_C_carried = d_y_carried @ _group_states(entering[:, first:], groups)                     # (b c g q n)
        d_entering_y = d_y_carried.transpose(-1, -2) @ C_c[:, first:]
        del d_y_carried
        if d_entering is not None:
            d_entering_y += _group_states(d_entering[:, first:], groups)
        d_entering = _head_states(d_entering_y, heads)                                              # (b c h p n)
        chunk_decay = from_start[..., -1, None, None]
        d_chunk_states = torch.empty_like(entering[:, :ending])        # d_chunk_states[:, k] = d E_{k+1}
        d_state = d_final
        for k in reversed(range(first, chunks)):
            if k < ending:
                d_chunk_states[:, k] = d_state
            inflow = d_entering[:, k - first]
            d_state = inflow if d_state is None else torch.addcmul(inflow, chunk_decay[:, k], d_state)
        if first and ending:  # chunk 0's end state, with no initial state to pass a gradient on to
            d_chunk_states[:, 0] = d_state
        del d_entering, d_entering_y

        d_decays = d_masked.mul_(decay)                                         # d scores, before the sum over heads
        d_scores = _groups(d_decays, groups).sum(3)                                                 # (b c g q q)
        d_C, d_B = d_scores @ B_c, d_scores.transpose(-1, -2) @ C_c
        d_C[:, first:] += d_C_carried
        _groups(d_decays, groups).mul_(scores[:, :, :, None])                   # now d decay * decay
        # exp(s_i) carries the entering state to i, and its last one passes it on
        carry_terms = torch.zeros_like(from_start)
        carry_terms[:, first:] = rearrange((d_y[:, first:] * _head_columns(C_entering, heads)).sum(-1),
                                           "b c q h -> b c h q")
        if ending:
            carry_terms[:, :ending, :, -1] += (d_chunk_states * entering[:, :ending]).sum((-1, -2))
            B_d_states = B_c[:, :ending] @ _group_states(d_chunk_states, groups).transpose(-1, -2)  # (b c g q (r p))
            d_B[:, :ending] += _group_columns(x_to_end[:, :ending], groups) @ _group_states(d_chunk_states, groups)
            d_x_dt[:, :ending].addcmul_(_head_columns(B_d_states, heads), _per_position(decay[:, :ending, :, -1, :]))
            # x's end-state weights are decay's last row: their share of the decays' gradient, times the weights
            end_terms = _head_columns(B_d_states, heads).mul_(x_to_end[:, :ending]).sum(-1)        # (b c q h)
            d_decays[:, :ending, :, -1, :] += rearrange(end_terms, "b c q h -> b c h q")
            del B_d_states
        d_dt = rearrange((d_x_dt * x_c).sum(-1), "b c q h -> b c h q")
        d_x = d_x_dt.mul_(_per_position(dt_c))
        d_D = None
        if D is not None:
            d_x.addcmul_(d_y, _per_channel(D))
            d_D = (d_y * x_c).sum((0, 1, 2, 4) if D.ndim == 1 else (0, 1, 2))

        # decay[i, j] depends on a_k for j < k <= i: d a_k sums d_decays over that rectangle (rows i >= k, columns
        # j < k) as row prefix sums, with no cancellation between terms outside it; exp(s_i) on a_k for k <= i
        below = torch.ones_like(decay[0, 0, 0, :, 1:]).tril(-1)                                     # (q, q - 1): i > m
        d_a = F.pad(d_decays[..., :-1].cumsum_(-1).mul_(below).sum(-2), (1, 0))                    # in place
        d_a += (carry_terms * from_start).flip(-1).cumsum(-1).flip(-1)
        d_dt += d_a * A[:, None]
        d_A = (d_a * dt_c).sum((0, 1, 3))
        d_B, d_C = (rearrange(t, "b c g q n -> b (c q) g n") for t in (d_B, d_C))
        return rearrange(d_x, "b c q h p -> b (c q) h p"), rearrange(d_dt, "b c h q -> b (c q) h"), d_A, d_B, d_C, \
            d_D, None if first else d_state, None, None


# layouts: per chunk, x and y stay (position, head, head_dim) as the caller has them; B and C are (group, position,
# state); states (head, head_dim, state); a group's heads sit side by side as the columns (r p) of one matrix
def _groups(t: Tensor, groups: int) -> Tensor:
    """(b c h ...) -> (b c g r ...): heads split into their groups (h = g r, as the reference's heads_of_groups)."""
    return rearrange(t, "b c (g r) ... -> b c g r ...", g=groups)


def _heads(t: Tensor) -> Tensor:
    return rearrange(t, "b c g r ... -> b c (g r) ...")


def _per_channel(D: Tensor) -> Tensor:
    """D (h) or (h p) -> a factor for x's (b c q h p) layout."""
    return D[:, None] if D.ndim == 1 else D


def _per_position(t: Tensor) -> Tensor:
    """(b c h q) -> (b c q h 1): a factor per position and head, in x's layout."""
    return rearrange(t, "b c h q -> b c q h 1")


def _group_columns(t: Tensor, groups: int) -> Tensor:
    """(b c q h p) -> (b c g q (r p)); a view when groups == 1."""
    return rearrange(t, "b c q (g r) p -> b c g q (r p)", g=groups)


def _head_columns(t: Tensor, heads: int) -> Tensor:
    """(b c g q (r p)) -> (b c q h p)."""
    return rearrange(t, "b c g q (r p) -> b c q (g r) p", r=heads // t.shape[2])


def _group_states(t: Tensor, groups: int) -> Tensor:
    """(b c h p n) -> (b c g (r p) n), a view."""
    return rearrange(t, "b c (g r) p n -> b c g (r p) n", g=groups)


def _head_states(t: Tensor, heads: int) -> Tensor:
    """(b c g (r p) n) -> (b c h p n), a view."""
    return rearrange(t, "b c g (r p) n -> b c (g r) p n", r=heads // t.shape[2])


def _add_matmul(add: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """add + left @ right in one baddbmm, for (b c g m k) @ (b c g k n) and add (b c g m n)."""
    flat = [t.reshape(-1, *t.shape[-2:]) for t in (add, left, right)]
    return torch.baddbmm(*flat).view(add.shape)


# decays: exp of float64 differences of running sums, -inf where an input does not reach a position
def decays(s: Tensor, sequence: Tensor | None, dtype: torch.dtype) -> Tensor:
    """(b c h q q): exp(s_i - s_j) where position j's input reaches position i, else 0, from the running sums s
    (b c h q), float64.

    Entry by entry only in the diagonal blocks of DECAY_BLOCK positions; below them exp(s_i - s_j) = exp(s_i - s_e)
    exp(s_e - s_j) with e the last position of j's block, both exponents <= 0: about q (q / 8 + 8) exps, not q^2, and
    the products come from one matmul with a block-diagonal right factor (each sum has one non-zero term: exact)."""
    q = s.shape[-1]
    size = min(q, DECAY_BLOCK)
    position = torch.arange(q, device=s.device)
    blocks = rearrange(position, "(n m) -> n m", m=size)                                            # (n m)
    ends = blocks[:, -1]
    s_blocks = rearrange(s, "... (n m) -> ... n m", m=size)
    later_block = (position // size)[:, None] > torch.arange(len(ends), device=s.device)
    into = _exp(s[..., :, None] - s_blocks[..., None, :, -1], later_block & reaches(sequence, position[:, None], ends),
                dtype)                                                                              # (b c h q n)
    out_of = _exp(s_blocks[..., -1:] - s_blocks, reaches(sequence, ends[:, None], blocks), dtype)   # (b c h n m)
    spread = out_of.new_zeros(*out_of.shape[:-1], q)                                                # (b c h n q)
    rearrange(spread, "... n (n2 m) -> ... n n2 m", m=size).diagonal(0, -3, -2).copy_(out_of.transpose(-1, -2))
    decay = into @ spread
    within = _exp(s_blocks[..., :, None] - s_blocks[..., None, :],
                  reaches(sequence, blocks[:, :, None], blocks[:, None, :]), dtype)                # (b c h n m m)
    on_diagonal = rearrange(decay, "... (n1 m1) (n2 m2) -> ... n1 m1 n2 m2", m1=size, m2=size).diagonal(0, -4, -2)
    on_diagonal.copy_(rearrange(within, "... n m1 m2 -> ... m1 m2 n"))
    return decay


def reaches(sequence: Tensor | None, rows: Tensor, columns: Tensor) -> Tensor:
    """bool (c or 1, ...): whether the input at position `columns` reaches position `rows` of each chunk (index
    tensors, broadcast): not after it, and in the same sequence (sequence (c q): each position's sequence index)."""
    rows, columns = torch.broadcast_tensors(rows, columns)
    causal = (columns <= rows)[None]
    return causal if sequence is None else causal & (sequence[:, rows] == sequence[:, columns])


def carried_in(sequence: Tensor) -> Tensor:
    """bool (c q): whether the state entering each chunk (the state after the position before it) reaches a position."""
    return sequence == F.pad(sequence[:-1, -1:], (0, 0, 1, 0))


def _exp(logits: Tensor, keep: Tensor | None, dtype: torch.dtype) -> Tensor:
    """exp(logits) in dtype, exactly 0 where `keep` (c or 1, ...) is False (-inf added to the exponent)."""
    logits = logits.to(dtype, copy=True)  # a copy even in float64: the caller's s is not changed in place
    if keep is not None:
        logits += torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, -torch.inf)[:, None]
    return logits.exp_()
