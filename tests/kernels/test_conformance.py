"""Every registered kernel op, on every backend it implements that can run here, against its reference.

For each (op, backend, dtype the op's conformance spec has a tolerance for) hypothesis draws inputs with the spec's
`draw_case`; the backend's forward outputs and the gradient of every differentiable input (flowing back from the
first output) must match the reference run on float32 copies of the same inputs. An op gets this test by
registering (kernels/registry.py). On CPU the Triton backend runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so it gets few examples; the peer backend runs third-party CUDA kernels and only on CUDA.
"""
import importlib.util
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.backend import triton_interpreting
from archlab.kernels.registry import ConformanceCase, KernelOp, kernel_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LOW_PRECISION = (torch.float16, torch.bfloat16)
EXAMPLES = 20
INTERPRETED_EXAMPLES = 8  # a Triton interpreter call takes 0.1-2 s


def why_not_here(backend: str) -> str | None:
    """Why `backend` cannot run on this machine, or None when it can."""
    if backend == "peer" and DEVICE.type != "cuda":
        return "the peer backend runs third-party CUDA kernels; no CUDA here"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if backend == "triton" and DEVICE.type != "cuda" and not triton_interpreting():
        return "no CUDA and TRITON_INTERPRET is not 1"
    return None


def examples_for(backend: str) -> int:
    return INTERPRETED_EXAMPLES if backend == "triton" and DEVICE.type != "cuda" else EXAMPLES


def _map_tensors(case: ConformanceCase, fn) -> ConformanceCase:
    def apply(value):
        return fn(value) if isinstance(value, torch.Tensor) else value
    return ConformanceCase(tuple(apply(a) for a in case.args), {k: apply(v) for k, v in case.kwargs.items()})


def _leaf(tensor: torch.Tensor, upcast: bool) -> torch.Tensor:
    """A fresh leaf on DEVICE (float32 for the reference if half precision) that keeps requires_grad. Not clone():
    it would make the drawn non-contiguous layouts contiguous and hide them."""
    leaf = tensor.detach().to(DEVICE)
    if upcast and leaf.dtype in LOW_PRECISION:
        leaf = leaf.float()
    return leaf.requires_grad_(tensor.requires_grad)


def _outputs_and_grads(fn, case: ConformanceCase, grad_out: torch.Tensor | None):
    """(outputs, grads of the inputs that require grad, the gradient fed to the first output). `grad_out` None:
    draw it (seeded) in the first output's dtype."""
    result = fn(*case.args, **case.kwargs)
    outputs = result if isinstance(result, tuple) else (result,)
    leaves = [t for t in (*case.args, *case.kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if grad_out is None:
        generator = torch.Generator().manual_seed(0)
        grad_out = torch.randn(outputs[0].shape, generator=generator).to(outputs[0].dtype).to(DEVICE)
    grads = torch.autograd.grad(outputs[0], leaves, grad_out.to(outputs[0].dtype), materialize_grads=True) \
        if leaves else ()
    return [o.detach() for o in outputs], list(grads), grad_out


def _names_of_differentiable_inputs(op: KernelOp, case: ConformanceCase) -> list[str]:
    bound = inspect.signature(op.dispatch).bind(*case.args, **case.kwargs).arguments
    return [f"d{name}" for name, value in bound.items() if isinstance(value, torch.Tensor) and value.requires_grad]


def check_conformance(op: KernelOp, backend: str, dtype: torch.dtype, max_examples: int) -> None:
    """Hypothesis-drawn cases of `op` on `backend` in `dtype` must match op.reference within the spec's tolerance."""
    tolerance = op.conformance.tolerances[dtype]

    @settings(max_examples=max_examples, deadline=None)
    @given(data=st.data())
    def conforms(data):
        case = op.conformance.draw_case(data.draw, dtype)
        got_case = _map_tensors(case, lambda t: _leaf(t, upcast=False))
        want_case = _map_tensors(case, lambda t: _leaf(t, upcast=True))
        got, got_grads, grad_out = _outputs_and_grads(
            lambda *args, **kwargs: op.dispatch(*args, **kwargs, backend=backend), got_case, None)
        want, want_grads, _ = _outputs_and_grads(op.reference, want_case, grad_out.float())
        assert len(got) == len(want), f"{len(got)} outputs, the reference gives {len(want)}"
        names = [f"output {i}" for i in range(len(got))] + _names_of_differentiable_inputs(op, case)
        for name, g, w in zip(names, got + got_grads, want + want_grads, strict=True):
            assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)}, the reference's {tuple(w.shape)}"
            assert torch.isfinite(g).all(), f"{name} is not finite"
            scale = max(w.abs().max().item(), 1.0) if w.numel() else 1.0
            torch.testing.assert_close(g.float(), w.float(), rtol=tolerance.rtol, atol=tolerance.atol * scale,
                                       msg=lambda m, name=name: f"{op.name} {backend} {dtype}, {name}: {m}")

    conforms()


def _shipped_cases():
    for op in kernel_ops().values():
        for backend in op.backends:
            reason = why_not_here(backend)
            for dtype in op.conformance.dtypes(backend):
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(op.name, backend, dtype, marks=marks,
                                   id=f"{op.name}-{backend}-{str(dtype).removeprefix('torch.')}")


@pytest.mark.parametrize("op_name,backend,dtype", list(_shipped_cases()))
def test_backend_matches_reference(op_name, backend, dtype):
    try:
        check_conformance(kernel_ops()[op_name], backend, dtype, examples_for(backend))
    except ImportError as err:  # a CUDA machine without the peer packages (scripts/build_peers.sh builds them)
        if backend != "peer":
            raise
        pytest.skip(str(err).splitlines()[0])
