"""The Triton SSD as torch.library custom ops: differentiable (also through the final states) and opaque to
torch.compile.

`ssd_triton` is what the dispatcher in `__init__.py` calls for backend="triton". The forward op saves only its
inputs; the backward op recomputes the chunk states (kernels/ssd/triton.py). Its chunk length is its own, not
the op's chunk_size: 64 positions on a GPU (the tiles' register budget: see triton.py), 16 in Triton's interpreter
so that short tests cross chunk boundaries. Results do not depend on it beyond rounding.

The kernel module is imported inside the op bodies, so this file imports on machines without triton.
"""
from __future__ import annotations

import torch
from torch import Tensor

from archlab.kernels.backend import refuse_double_backward, triton_interpreting

__all__ = ["ssd_triton", "ssd_fwd", "ssd_bwd", "chunk_len_for"]

GPU_CHUNK_LEN = 64
INTERPRETER_CHUNK_LEN = 16


def chunk_len_for(device: torch.device) -> int:
    return GPU_CHUNK_LEN if device.type == "cuda" and not triton_interpreting() else INTERPRETER_CHUNK_LEN


def ssd_triton(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
               dt_bias: Tensor | None, dt_softplus: bool, dt_limit: tuple[float, float],
               initial_states: Tensor | None, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """(out in x's dtype, final states fp32); arguments as reference.ssd_reference's, already validated."""
    return ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus=dt_softplus,
                   dt_min=float(dt_limit[0]), dt_max=float(dt_limit[1]), chunk_len=chunk_len_for(x.device))


@torch.library.custom_op("archlab::ssd_fwd", mutates_args=())
def ssd_fwd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None, z: Tensor | None,
            dt_bias: Tensor | None, initial_states: Tensor | None, cu_seqlens: Tensor | None, *, dt_softplus: bool,
            dt_min: float, dt_max: float, chunk_len: int) -> tuple[Tensor, Tensor]:
    """Triton forward: (out, final states (n_sequences, heads, head_dim, state) fp32)."""
    from archlab.kernels.ssd import triton as kernels

    return kernels.ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens, dt_softplus,
                           (dt_min, dt_max), chunk_len)


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens, *, dt_softplus, dt_min, dt_max, chunk_len):
    n_sequences = x.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return (x.new_empty(x.shape),
            x.new_empty((n_sequences, x.shape[2], x.shape[3], B.shape[3]), dtype=torch.float32))


@torch.library.custom_op("archlab::ssd_bwd", mutates_args=())
def ssd_bwd(grad_out: Tensor, grad_final: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Tensor | None, z: Tensor | None, dt_bias: Tensor | None, initial_states: Tensor | None,
            cu_seqlens: Tensor | None, *, dt_softplus: bool, dt_min: float, dt_max: float,
            chunk_len: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton backward (deterministic): (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states). An op cannot
    return None, so the gradient of an absent optional input is an empty tensor, mapped back to None by the
    autograd rule."""
    from archlab.kernels.ssd import triton as kernels

    grads = kernels.ssd_bwd(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens,
                            dt_softplus, (dt_min, dt_max), chunk_len)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@ssd_bwd.register_fake
def _(grad_out, grad_final, x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens, *, dt_softplus, dt_min,
      dt_max, chunk_len):
    return tuple(x.new_empty(0) if t is None else t.new_empty(t.shape)
                 for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


refuse_double_backward(ssd_bwd, "archlab::ssd_fwd", "kernels.ssd=torch")

_DIFFERENTIABLE = 9  # x, dt, A, B, C, D, z, dt_bias, initial_states; cu_seqlens is not


def _save_for_backward(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.present = [t is not None for t in inputs[:_DIFFERENTIABLE]]
    ctx.options = dict(keyword_only_inputs)


def _ssd_grad(ctx, grad_out, grad_final):
    inputs = ctx.saved_tensors
    grads = ssd_bwd(grad_out, grad_final, *inputs, **ctx.options)
    return (*(g if present else None for g, present in zip(grads, ctx.present, strict=True)), None)


ssd_fwd.register_autograd(_ssd_grad, setup_context=_save_for_backward)
