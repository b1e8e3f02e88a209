"""The numba selective scan (kernels + custom ops): what the conformance test's small drawn cases do not reach.

tests/kernels/test_conformance.py already compares the numba backend with the reference (forward, last state, every
gradient; float32, float16, bfloat16; grouped and ungrouped B/C; optional D, z, delta_bias; softplus on and off;
L = 1) at its default chunk length and below one channel block. Here: chunk and channel-block edges, the same bits
whatever the thread count, strided inputs read in place, the float32 boundary of half-precision inputs, extreme
values, the custom op under torch.compile, and the backend's fallback and errors without numba.
"""
import sys

import pytest
import torch

import archlab.kernels.selective_scan as scan_module
from archlab.kernels import backend
from archlab.kernels.backend import auto_choice, forget_choices, numba_missing, resolve_backend
from archlab.kernels.selective_scan import selective_scan
from archlab.kernels.selective_scan.op import NUMBA_CHUNK_LEN, selective_scan_numba, selective_scan_numba_fwd
from archlab.kernels.selective_scan.reference import selective_scan_reference

needs_numba = pytest.mark.skipif(numba_missing() is not None, reason=f"{numba_missing()}")
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
CPU = torch.device("cpu")


def make_inputs(batch=2, dim=5, length=37, n_state=4, groups=0, *, dtype=torch.float32, seed=0):
    """[u, delta, A, B, C, D, z, delta_bias], every option present; groups 0: B and C are (batch, N, L)."""
    gen = torch.Generator().manual_seed(seed)
    bc_shape = (batch, n_state, length) if groups == 0 else (batch, groups, n_state, length)
    return [torch.randn(batch, dim, length, generator=gen).to(dtype),
            torch.randn(batch, dim, length, generator=gen).to(dtype),
            -(torch.rand(dim, n_state, generator=gen) * 2 + 0.1),
            torch.randn(bc_shape, generator=gen).to(dtype), torch.randn(bc_shape, generator=gen).to(dtype),
            torch.randn(dim, generator=gen), torch.randn(batch, dim, length, generator=gen).to(dtype),
            torch.rand(dim, generator=gen) * 0.5]


def run(fn, inputs, grad_out):
    """(out, last state, grads) of fn(*inputs, delta_softplus=True) on fresh leaves that share the inputs' memory
    (clone() would make strided inputs contiguous)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out, last_state = fn(*leaves, delta_softplus=True)
    out.backward(grad_out)
    return [out.detach(), last_state, *(t.grad for t in leaves)]


def numba_scan(*inputs, delta_softplus, chunk_len=NUMBA_CHUNK_LEN):
    out, last_state, _ = selective_scan_numba_fwd(*inputs, delta_softplus=delta_softplus, chunk_len=chunk_len)
    return out, last_state


def reference(inputs, grad_out):
    return run(selective_scan_reference, [t.detach().float() for t in inputs], grad_out.float())


def assert_close(got, want, rtol=1e-4, atol=1e-5):
    """The conformance test's float32 rule: |got - want| <= rtol |want| + atol max(max |want|, 1)."""
    for name, g, w in zip(["out", "last_state", *(f"d{n}" for n in NAMES)], got, want, strict=True):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g.float(), w, rtol=rtol, atol=atol * max(w.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_numba
@pytest.mark.parametrize("chunk_len,length,dim,groups", [
    (1, 5, 3, 0),        # a saved state at every position
    (4, 17, 66, 0),      # one past a chunk; one channel block of 64 and a partial one
    (32, 64, 130, 2),    # exact chunks; groups of 65 channels: a block edge inside each group
    (32, 33, 129, 0),    # the default chunk length, one position past it; three blocks
])
def test_chunk_and_channel_block_edges(chunk_len, length, dim, groups):
    inputs = make_inputs(batch=2, dim=dim, length=length, n_state=3, groups=groups, seed=length)
    grad_out = torch.randn(2, dim, length)
    got = run(lambda *t, delta_softplus: numba_scan(*t, delta_softplus=delta_softplus, chunk_len=chunk_len),
              inputs, grad_out)
    assert_close(got, reference(inputs, grad_out))


@needs_numba
def test_same_bits_with_one_and_two_threads():
    """Every output and gradient, bit for bit: dB and dC add the channels of several tasks and dA, dD, ddelta_bias
    the batch, in an order that must not depend on how tasks are spread over threads."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has a single thread here (NUMBA_NUM_THREADS=1)")
    inputs = make_inputs(batch=3, dim=200, length=70, n_state=5, groups=2, seed=1)
    grad_out = torch.randn(3, 200, 70)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(run(numba_scan, inputs, grad_out))
    finally:
        torch.set_num_threads(threads)
    for name, one, two in zip(["out", "last_state", *(f"d{n}" for n in NAMES)], *results, strict=True):
        assert torch.equal(one, two), f"{name} differs between 1 and 2 threads"


@needs_numba
def test_strided_inputs_are_read_in_place():
    """The Mamba block's layouts: z a channel slice of a (batch, L, 2 dim) buffer, delta a (batch, L, dim) tensor
    transposed, u every other position, B and C transposed views of (batch, L, N), D and delta_bias with stride 2."""
    batch, dim, length, n_state = 2, 6, 21, 4
    u, delta, A, B, C, D, z, delta_bias = make_inputs(batch, dim, length, n_state, seed=2)
    strided = [torch.randn(batch, dim, 2 * length)[..., ::2].copy_(u), delta.mT.contiguous().mT, A,
               B.mT.contiguous().mT, C.mT.contiguous().mT, torch.randn(dim, 2)[:, 1].copy_(D),
               torch.randn(batch, length, 2 * dim)[..., dim:].mT.copy_(z), torch.randn(dim, 2)[:, 0].copy_(delta_bias)]
    assert not any(t.is_contiguous() for i, t in enumerate(strided) if i != 2)
    grad_out = torch.randn(batch, dim, length)
    got = run(numba_scan, strided, grad_out)
    assert_close(got, reference(strided, grad_out))
    contiguous = run(numba_scan, [t.contiguous() for t in strided], grad_out)
    for name, a, b in zip(["out", "last_state", *(f"d{n}" for n in NAMES)], got, contiguous, strict=True):
        assert torch.equal(a, b), f"{name}: strided and contiguous inputs give different bits"


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_float32_math_rounded_once(dtype):
    """Half-precision inputs are widened to float32 at the boundary, computed in float32, and each result rounded
    once to the input's dtype: exactly the float32 run on the widened inputs (which matches the reference), rounded.
    A, D, delta_bias stay float32 and so do their gradients."""
    inputs = make_inputs(dtype=dtype, seed=3)
    grad_out = torch.randn(2, 5, 37).to(dtype)
    got = run(numba_scan, inputs, grad_out)
    widened = run(numba_scan, [t.float() for t in inputs], grad_out.float())
    assert_close(widened, reference(inputs, grad_out))
    for name, tensor, g, w in zip(["out", "last_state", *(f"d{n}" for n in NAMES)], [inputs[0], widened[1], *inputs],
                                  got, widened, strict=True):
        assert g.dtype == tensor.dtype, f"{name}: {g.dtype}, its input's {tensor.dtype}"
        assert torch.equal(g, w.to(g.dtype)), f"{name} is not the float32 result rounded once"


@needs_numba
def test_extreme_values_match_reference_and_nan_propagates():
    """Pre-activations from -100 to 100 (softplus's tails: about e^x, and x past 20), decays exp(delta A) that
    underflow to 0, then a NaN in A: it must reach the output (the trainer stops on a NaN loss)."""
    u, delta, A, B, C, D, z, delta_bias = make_inputs(batch=1, dim=7, length=9, n_state=3, seed=4)
    delta = torch.tensor([-100.0, -30.0, -5.0, 0.0, 5.0, 25.0, 100.0])[:, None].expand(7, 9)[None].contiguous()
    A = A * 20
    inputs = [u, delta, A, B, C, D, z, delta_bias]
    grad_out = torch.randn(1, 7, 9)
    assert_close(run(numba_scan, inputs, grad_out), reference(inputs, grad_out))
    A[3, 1] = float("nan")
    out, last_state = numba_scan(*inputs, delta_softplus=True)
    assert out[0, 3].isnan().all() and last_state[0, 3, 1].isnan() and not out[0, :3].isnan().any()


@needs_numba
def test_custom_op_passes_opcheck():
    """Schema, fake kernel and autograd registration agree with the real kernels (AOT tracing: the test below)."""
    leaves = [t.requires_grad_() for t in make_inputs(batch=1, dim=3, length=5, n_state=2)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(selective_scan_numba_fwd, tuple(leaves), {"delta_softplus": True, "chunk_len": 2},
                          test_utils=checks)
    no_optionals = (*leaves[:5], None, None, None)
    torch.library.opcheck(selective_scan_numba_fwd, no_optionals, {"delta_softplus": False, "chunk_len": 4},
                          test_utils=checks)


@needs_numba
def test_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph: a graph break is an error. aot_eager traces forward and backward through the op's fake and
    autograd rule as Inductor would, without Inductor's C++ compile (~30 s on these CPUs)."""
    leaves = [t.requires_grad_() for t in make_inputs(batch=1, dim=5, length=21, groups=1, seed=5)]

    def loss(*inputs):
        out, last_state = selective_scan(*inputs, delta_softplus=True, return_last_state=True, backend="numba")
        return out.sin().sum() + last_state.sum()

    eager_loss = loss(*leaves)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, got, want in zip(NAMES, torch.autograd.grad(compiled_loss, leaves),
                               torch.autograd.grad(eager_loss, leaves), strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


@needs_numba
def test_double_backward_is_a_clear_error():
    inputs = make_inputs(batch=1, dim=2, length=3, n_state=2)
    u = inputs[0].requires_grad_()
    out, _ = selective_scan_numba(*inputs, True)
    (grad_u,) = torch.autograd.grad(out.sum(), u, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative; use kernels.selective_scan=torch"):
        grad_u.sum().backward()


@needs_numba
def test_auto_takes_numba_on_cpu():
    forget_choices()
    assert auto_choice("selective_scan", CPU, torch.float32) == ("numba", "numba: the op's default order on CPU")
    inputs = make_inputs(batch=1, dim=3, length=6, n_state=2)
    assert torch.equal(selective_scan(*inputs, delta_softplus=True), selective_scan_numba(*inputs, True)[0])


@pytest.fixture
def without_numba(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # makes `import numba` fail, as where it is not installed
    forget_choices()
    yield
    forget_choices()


def test_auto_falls_back_to_torch_without_numba(without_numba, monkeypatch):
    name, why = auto_choice("selective_scan", CPU, torch.float32)
    assert name == "torch" and why.startswith("numba skipped: numba does not import (") and "torch: " in why
    calls = []
    for function in ("selective_scan_numba", "selective_scan_chunked"):
        original = getattr(scan_module, function)
        monkeypatch.setattr(scan_module, function, lambda *a, _f=function, _o=original: calls.append(_f) or _o(*a))
    inputs = make_inputs(batch=1, dim=3, length=6, n_state=2)
    out = selective_scan(*inputs, delta_softplus=True)
    want, _ = selective_scan_reference(*inputs, delta_softplus=True)
    assert calls == ["selective_scan_chunked"] and torch.allclose(out, want, rtol=1e-4, atol=1e-5)


def test_explicit_numba_without_numba_is_one_line(without_numba):
    with pytest.raises(ValueError) as info:
        resolve_backend("selective_scan", "numba", CPU, torch.float32)
    message = str(info.value)
    assert "\n" not in message and "pip install numba" in message
    assert message.startswith("the 'numba' backend for selective_scan needs the numba package: numba does not import (")
    with pytest.raises(ValueError, match="needs the numba package"):
        selective_scan(*make_inputs(batch=1, dim=2, length=3, n_state=2), backend="numba")


def test_explicit_numba_refuses_other_devices():
    with pytest.raises(ValueError, match="'numba' backend for selective_scan runs on CPU tensors and these are on cud"):
        resolve_backend("selective_scan", "numba", torch.device("cuda"))
    with pytest.raises(ValueError, match="attention has no 'numba' backend yet"):
        backend.check_backend("attention", "numba")
