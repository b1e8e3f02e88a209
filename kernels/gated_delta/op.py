"""The Triton gated delta rule as torch.library custom ops: differentiable (also through the final states) and
opaque to torch.compile.

`gated_delta_triton` is what the dispatcher in `__init__.py` calls for backend="triton" (q and k already
l2-normalised there when asked). The forward op saves only its inputs; the backward op reruns the forward to
store the state at every chunk's start (kernels/gated_delta/triton.py). The chunk length is the kernels' own: 32
positions on a GPU (at 64 the forward's chunk x chunk tiles spill kilobytes of registers), 16 in Triton's
interpreter so that short tests cross chunk boundaries. Results do not depend on it beyond rounding.

The kernel module is imported inside the op bodies, so this file imports on machines without triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

from archlab.kernels.backend import refuse_double_backward, triton_interpreting

__all__ = ["gated_delta_triton", "gated_delta_fwd", "gated_delta_bwd", "chunk_len_for"]

GPU_CHUNK_LEN = 32
INTERPRETER_CHUNK_LEN = 16


def chunk_len_for(device: torch.device) -> int:
    return GPU_CHUNK_LEN if device.type == "cuda" and not triton_interpreting() else INTERPRETER_CHUNK_LEN


def gated_delta_triton(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None,
                       initial_state: Tensor | None, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(o in v's dtype, final states fp32); arguments as reference.gated_delta_reference's, already validated;
    scale None: key_dim ** -0.5."""
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    return gated_delta_fwd(q, k, v, g, beta, initial_state, cu_seqlens, scale=scale,
                           chunk_len=chunk_len_for(q.device))


@torch.library.custom_op("archlab::gated_delta_fwd", mutates_args=())
def gated_delta_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None,
                    cu_seqlens: Tensor | None, *, scale: float, chunk_len: int) -> tuple[Tensor, Tensor]:
    """Triton forward: (o, final states (sequences, value_heads, key_dim, value_dim) fp32)."""
    from archlab.kernels.gated_delta import triton as kernels

    return kernels.gated_delta_fwd(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_len)


@gated_delta_fwd.register_fake
def _(q, k, v, g, beta, initial_state, cu_seqlens, *, scale, chunk_len):
    n_sequences = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (v.new_empty(v.shape),
            v.new_empty((n_sequences, v.shape[2], k.shape[3], v.shape[3]), dtype=torch.float32))


@torch.library.custom_op("archlab::gated_delta_bwd", mutates_args=())
def gated_delta_bwd(grad_out: Tensor, grad_final: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                    beta: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | None, *, scale: float,
                    chunk_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward (deterministic): (dq, dk, dv, dg, dbeta, dinitial_state). An op cannot return None, so the
    gradient of an absent initial state is an empty tensor, mapped back to None by the autograd rule."""
    from archlab.kernels.gated_delta import triton as kernels

    grads = kernels.gated_delta_bwd(grad_out, grad_final, q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                    chunk_len)
    return tuple(q.new_empty(0) if t is None else t for t in grads)


@gated_delta_bwd.register_fake
def _(grad_out, grad_final, q, k, v, g, beta, initial_state, cu_seqlens, *, scale, chunk_len):
    return tuple(q.new_empty(0) if t is None else t.new_empty(t.shape) for t in (q, k, v, g, beta, initial_state))


refuse_double_backward(gated_delta_bwd, "archlab::gated_delta_fwd", "kernels.gated_delta=torch")

_DIFFERENTIABLE = 6  # q, k, v, g, beta, initial_state; cu_seqlens is not


def _save_for_backward(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.present = [t is not None for t in inputs[:_DIFFERENTIABLE]]
    ctx.options = dict(keyword_only_inputs)


def _gated_delta_grad(ctx, grad_out, grad_final):
    inputs = ctx.saved_tensors
    grads = gated_delta_bwd(grad_out, grad_final, *inputs, **ctx.options)
    return (*(g if present else None for g, present in zip(grads, ctx.present, strict=True)), None)


gated_delta_fwd.register_autograd(_gated_delta_grad, setup_context=_save_for_backward)
