"""The selective scan's own kernels as torch.library custom ops: differentiable and opaque to torch.compile.

One pair of ops per kernel, the same schema for both:
  archlab::selective_scan_fwd / _bwd              Triton (triton.py): backend="triton", CUDA or the interpreter
  archlab::selective_scan_numba_fwd / _bwd        numba (numba.py): backend="numba", CPU
The forward op also returns the fp32 state at the start of every chunk of `chunk_len` positions, (batch, dim,
n_chunks, N): the backward op restarts the recurrence from those instead of storing every state. Neither states
output is differentiable; the backward ops have no derivative of their own (double backward is an error).
seq_idx (batch, L) int32/int64 or None: document ids of packed documents; the kernels reset the state where they
change (None compiles and runs the kernels without that check). It has no gradient.
The numba ops return out, du, ddelta and dz channel-last ((batch, L, dim) memory seen as (batch, dim, L)): the
Mamba block's out_proj and the projections that made delta and z take them in that layout without a copy.

The kernel modules are imported inside the op bodies, so this file imports on machines without triton or numba.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from archlab.kernels.backend import refuse_double_backward, triton_interpreting

__all__ = ["selective_scan_triton", "selective_scan_fwd", "selective_scan_bwd", "chunk_len_for",
           "selective_scan_numba", "selective_scan_numba_fwd", "selective_scan_numba_bwd", "NUMBA_CHUNK_LEN"]

# Positions per chunk: the scan tile along L and the spacing of the states saved for the backward.
# GPU: 32, because the backward's tiles must fit in registers: ptxas reports 175 registers and no spills for
# 16 channels x 32 positions at 8 warps, but spills at 64 positions (see triton.py). The saved states then take
# N / 32 of an fp32 activation (half of one for N = 16). Interpreter: 16, so short tests cross chunk boundaries.
GPU_CHUNK_LEN = 32
INTERPRETER_CHUNK_LEN = 16
# numba: the backward recomputes a chunk into (chunk_len + 1) x N x 64 channels of states and decays, 266 KB at
# 32 positions and N = 16, so they stay in a core's L2 cache; 16, 32 and 64 ran equally fast (B32 D256 L128 N16)
NUMBA_CHUNK_LEN = 32


def chunk_len_for(device: torch.device) -> int:
    return GPU_CHUNK_LEN if device.type == "cuda" and not triton_interpreting() else INTERPRETER_CHUNK_LEN


def _scan_ops(name: str, kernels: str, alternative: str, *, channel_last: bool):
    """The (forward, backward) custom op pair `archlab::<name>_fwd/_bwd` running the module `kernels`'
    selective_scan_fwd / selective_scan_bwd; double backward points to `alternative`. `channel_last`: the kernels
    return out, du, ddelta and dz channel-last (what the fake implementations must reproduce)."""

    def like(t: Tensor) -> Tensor:
        """An uninitialised (batch, dim, L) result in the kernels' layout."""
        if channel_last:
            return t.new_empty(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)
        return t.new_empty(t.shape)

    @torch.library.custom_op(f"archlab::{name}_fwd", mutates_args=())
    def forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
                delta_bias: Tensor | None, seq_idx: Tensor | None = None, *, delta_softplus: bool,
                chunk_len: int) -> tuple[Tensor, Tensor, Tensor]:
        """(out, last state (batch, dim, N) fp32, chunk start states (batch, dim, n_chunks, N) fp32)."""
        return importlib.import_module(kernels).selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                                   delta_softplus, chunk_len, seq_idx)

    @forward.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, seq_idx=None, *, delta_softplus, chunk_len):
        batch, dim, length = u.shape
        n_state, n_chunks = A.shape[1], -(-length // chunk_len)
        return (like(u), u.new_empty((batch, dim, n_state), dtype=torch.float32),
                u.new_empty((batch, dim, n_chunks, n_state), dtype=torch.float32))

    @torch.library.custom_op(f"archlab::{name}_bwd", mutates_args=())
    def backward(grad_out: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                 z: Tensor | None, delta_bias: Tensor | None, chunk_states: Tensor, seq_idx: Tensor | None = None, *,
                 delta_softplus: bool,
                 chunk_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Deterministic: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias). An op cannot return None, so the gradient
        of an absent optional input is an empty tensor, mapped back to None by the autograd rule."""
        grads = importlib.import_module(kernels).selective_scan_bwd(
            grad_out, u, delta, A, B, C, D, z, delta_bias, chunk_states, delta_softplus, chunk_len, seq_idx)
        return tuple(u.new_empty(0) if g is None else g for g in grads)

    @backward.register_fake
    def _(grad_out, u, delta, A, B, C, D, z, delta_bias, chunk_states, seq_idx=None, *, delta_softplus, chunk_len):
        grads = (like(u), like(delta), A.new_empty(A.shape), B.new_empty(B.shape), C.new_empty(C.shape),
                 None if D is None else D.new_empty(D.shape), None if z is None else like(z),
                 None if delta_bias is None else delta_bias.new_empty(delta_bias.shape))
        return tuple(u.new_empty(0) if g is None else g for g in grads)

    refuse_double_backward(backward, f"archlab::{name}_fwd", alternative)

    def save_for_backward(ctx, inputs, keyword_only_inputs, output):
        _, last_state, chunk_states = output
        ctx.save_for_backward(*inputs, chunk_states)  # inputs end with seq_idx
        ctx.present = [t is not None for t in inputs]
        ctx.delta_softplus = keyword_only_inputs["delta_softplus"]
        ctx.chunk_len = keyword_only_inputs["chunk_len"]
        ctx.mark_non_differentiable(last_state, chunk_states)

    def gradients(ctx, grad_out, _grad_last_state, _grad_chunk_states):
        *inputs, seq_idx, chunk_states = ctx.saved_tensors
        grads = backward(grad_out, *inputs, chunk_states, seq_idx, delta_softplus=ctx.delta_softplus,
                         chunk_len=ctx.chunk_len)
        # the last input, seq_idx, has no gradient
        return tuple(g if present else None for g, present in zip(grads, ctx.present[:-1], strict=True)) + (None,)

    forward.register_autograd(gradients, setup_context=save_for_backward)
    return forward, backward


selective_scan_fwd, selective_scan_bwd = _scan_ops("selective_scan", "archlab.kernels.selective_scan.triton",
                                                   "kernels.selective_scan=torch", channel_last=False)
selective_scan_numba_fwd, selective_scan_numba_bwd = _scan_ops(
    "selective_scan_numba", "archlab.kernels.selective_scan.numba", "kernels.selective_scan=torch", channel_last=True)


def selective_scan_triton(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                          z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                          seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(out (batch, dim, L) in u's dtype, last state (batch, dim, N) fp32, not differentiable); inputs as in
    `selective_scan` and already validated."""
    out, last_state, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx,
                                            delta_softplus=delta_softplus, chunk_len=chunk_len_for(u.device))
    return out, last_state


def selective_scan_numba(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
                         seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As selective_scan_triton, on CPU tensors through the numba kernels."""
    out, last_state, _ = selective_scan_numba_fwd(u, delta, A, B, C, D, z, delta_bias, seq_idx,
                                                  delta_softplus=delta_softplus, chunk_len=NUMBA_CHUNK_LEN)
    return out, last_state
