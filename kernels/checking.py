"""One kernel op case on one backend against the op's reference, forward outputs and every gradient.

Shared by the conformance test (tests/kernels/test_conformance.py, hypothesis-drawn cases) and the self-check a
Triton kernel passes on its first use on a GPU (kernels/self_check.py), so both judge by the same rule: the
backend runs the case's inputs as given (dtype, strides), the reference runs float32 copies, the gradient fed to
the first output is the same seeded draw for both, and each result must be within the spec's Tolerance.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from archlab.kernels.registry import ConformanceCase, KernelOp, Tolerance

LOW_PRECISION = (torch.float16, torch.bfloat16)


def map_tensors(case: ConformanceCase, fn: Callable[[torch.Tensor], torch.Tensor]) -> ConformanceCase:
    def apply(value):
        return fn(value) if isinstance(value, torch.Tensor) else value
    return ConformanceCase(tuple(apply(a) for a in case.args), {k: apply(v) for k, v in case.kwargs.items()})


def leaf_on(tensor: torch.Tensor, device: torch.device, *, upcast: bool) -> torch.Tensor:
    """A fresh leaf on `device` (float32 for the reference if half precision) that keeps requires_grad. Not
    clone(): it would make a case's non-contiguous layouts contiguous and hide them."""
    leaf = tensor.detach().to(device)
    if upcast and leaf.dtype in LOW_PRECISION:
        leaf = leaf.float()
    return leaf.requires_grad_(tensor.requires_grad)


def outputs_and_grads(fn: Callable, case: ConformanceCase, grad_out: torch.Tensor | None):
    """(outputs, grads of the inputs that require grad, the gradient fed to the first output). `grad_out` None:
    draw it (seeded) in the first output's dtype."""
    result = fn(*case.args, **case.kwargs)
    outputs = result if isinstance(result, tuple) else (result,)
    leaves = [t for t in (*case.args, *case.kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if grad_out is None:
        generator = torch.Generator().manual_seed(0)
        grad_out = torch.randn(outputs[0].shape, generator=generator).to(outputs[0].dtype).to(outputs[0].device)
    grads = torch.autograd.grad(outputs[0], leaves, grad_out.to(outputs[0].dtype), materialize_grads=True) \
        if leaves else ()
    return [o.detach() for o in outputs], list(grads), grad_out


def differentiable_input_names(op: KernelOp, case: ConformanceCase) -> list[str]:
    bound = inspect.signature(op.dispatch).bind(*case.args, **case.kwargs).arguments
    return [f"d{name}" for name, value in bound.items() if isinstance(value, torch.Tensor) and value.requires_grad]


def mismatch(got: torch.Tensor, want: torch.Tensor, tolerance: Tolerance) -> str | None:
    """None when |got - want| <= rtol |want| + atol max(max |want|, 1) everywhere; else what is off, in one line."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, the reference's {tuple(want.shape)}"
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return f"{int((~torch.isfinite(got)).sum())} of {got.numel()} values are not finite"
    if not want.numel():
        return None
    scale = max(want.abs().max().item(), 1.0)
    error = (got - want).abs()
    allowed = tolerance.rtol * want.abs() + tolerance.atol * scale
    off = error > allowed
    if not off.any():
        return None
    worst = int((error - allowed).argmax())
    return (f"{int(off.sum())} of {got.numel()} values off, worst {error.flatten()[worst].item():.3g} where "
            f"{allowed.flatten()[worst].item():.3g} is allowed")


def compare_with_reference(op: KernelOp, backend: str, case: ConformanceCase, tolerance: Tolerance,
                           device: torch.device) -> list[str]:
    """What differs between `backend` and op.reference on `case` run on `device`: one line per output or gradient
    that is off (named `output i` or `d<input>`); empty when everything is within `tolerance`."""
    got_case = map_tensors(case, lambda t: leaf_on(t, device, upcast=False))
    want_case = map_tensors(case, lambda t: leaf_on(t, device, upcast=True))
    got, got_grads, grad_out = outputs_and_grads(
        lambda *args, **kwargs: op.dispatch(*args, **kwargs, backend=backend), got_case, None)
    want, want_grads, _ = outputs_and_grads(op.reference, want_case, grad_out.float())
    if len(got) != len(want):
        return [f"{len(got)} outputs, the reference gives {len(want)}"]
    names = [f"output {i}" for i in range(len(got))] + differentiable_input_names(op, case)
    problems = ((name, mismatch(g, w, tolerance)) for name, g, w in zip(names, got + got_grads, want + want_grads,
                                                                          strict=True))
    return [f"{name}: {problem}" for name, problem in problems if problem]
