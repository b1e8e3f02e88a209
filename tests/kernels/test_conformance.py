"""Every registered kernel op, on every backend it implements that can run here, against its reference.

For each (op, backend, dtype the op's conformance spec has a tolerance for) hypothesis draws inputs with the spec's
`draw_case`; the backend's forward outputs and the gradient of every differentiable input (flowing back from the
first output) must match the reference run on float32 copies of the same inputs. An op gets this test by
registering (kernels/registry.py). On CPU the Triton backend runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), so it gets few examples; the peer backend runs third-party CUDA kernels and only on CUDA; the
numba backend runs CPU kernels and only where there is no CUDA device (DEVICE is the GPU there).
"""
import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.backend import numba_missing, triton_interpreting
from archlab.kernels.checking import compare_with_reference
from archlab.kernels.registry import KernelOp, kernel_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    if backend == "numba":
        return "the numba backend runs on CPU tensors" if DEVICE.type != "cpu" else numba_missing()
    return None


def examples_for(backend: str) -> int:
    return INTERPRETED_EXAMPLES if backend == "triton" and DEVICE.type != "cuda" else EXAMPLES


def check_conformance(op: KernelOp, backend: str, dtype: torch.dtype, max_examples: int) -> None:
    """Hypothesis-drawn cases of `op` on `backend` in `dtype` must match op.reference within the spec's tolerance."""
    tolerance = op.conformance.tolerance(backend, dtype)

    @settings(max_examples=max_examples, deadline=None)
    @given(data=st.data())
    def conforms(data):
        problems = compare_with_reference(op, backend, op.conformance.draw_case(data.draw, dtype), tolerance, DEVICE)
        assert not problems, f"{op.name} {backend} {dtype}: " + "; ".join(problems)

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
