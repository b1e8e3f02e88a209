"""Selective scan: the torch (chunked) backend against the sequential reference; decoding; dispatch and input checks."""
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import archlab.kernels.selective_scan as selective_scan_module
from archlab.kernels.backend import numba_missing, peer_installed, resolve_backend
from archlab.kernels.selective_scan import chunked, selective_scan, selective_state_update
from archlab.kernels.selective_scan.chunked import selective_scan_chunked
from archlab.kernels.selective_scan.reference import selective_scan_reference, selective_state_update_reference

# 1, primes, below / at / just past the chunk, and non-multiples of it
LENGTHS = [1, 2, 3, 7, 15, chunked.CHUNK, chunked.CHUNK + 1, 31, 61, 97, 128, 211, 300]
DIFFERENTIABLE = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, length, n_state, groups, *, with_D=True, with_z=True, with_bias=True,
                dtype=torch.float32, layout="contiguous", decay_scale=1.0, seed=0):
    """Leaf tensors keyed like selective_scan's arguments; groups=0 gives ungrouped (batch, N, L) B and C.

    layout="transposed" builds every (.., L) tensor as a transposed view (non-contiguous inputs). delta and
    delta_bias are >= 0, so every decay exp(delta A) is <= 1 with or without softplus, as in a real model.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        if layout == "transposed":
            return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).to(dtype).transpose(-1, -2)
        return torch.randn(*shape, generator=gen).to(dtype)

    bc_shape = (batch, n_state, length) if groups == 0 else (batch, groups, n_state, length)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    tensors = dict(
        u=randn(batch, dim, length), delta=randn(batch, dim, length).abs() * 0.5,
        A=-(torch.rand(dim, n_state, generator=gen, dtype=params) * 2 + 0.1) * decay_scale,
        B=randn(*bc_shape), C=randn(*bc_shape),
        D=torch.randn(dim, generator=gen, dtype=params) if with_D else None,
        z=randn(batch, dim, length) if with_z else None,
        delta_bias=torch.rand(dim, generator=gen, dtype=params) * 0.5 if with_bias else None)
    return {k: None if v is None else v.requires_grad_() for k, v in tensors.items()}


def output_and_grads(fn, inputs, grad_out, delta_softplus):
    """(out, last_state, {name: grad}) with fresh leaves, so two runs never share .grad."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}
    out, last_state = fn(**leaves, delta_softplus=delta_softplus)
    out.backward(grad_out)
    return out.detach(), last_state, {k: v.grad for k, v in leaves.items() if v is not None}


def upcast(inputs):
    return {k: None if v is None else v.detach().float() for k, v in inputs.items()}


@st.composite
def scan_cases(draw):
    groups = draw(st.sampled_from([0, 1, 2]))
    return dict(batch=draw(st.integers(1, 3)), dim=max(groups, 1) * draw(st.integers(1, 3)),
                length=draw(st.sampled_from(LENGTHS)), n_state=draw(st.sampled_from([1, 4, 16])), groups=groups,
                with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "transposed"])))


def check_close(got, want, rtol, atol_scale):
    """Per tensor: |got - want| <= rtol |want| + atol_scale * max|want| (errors of sums scale with their terms)."""
    out, last_state, grads = got
    w_out, w_last, w_grads = want
    assert last_state.dtype == torch.float32 and grads.keys() == w_grads.keys()
    pairs = [("out", out, w_out), ("last_state", last_state, w_last)] + [(k, grads[k], w_grads[k]) for k in grads]
    for name, g, w in pairs:
        assert torch.isfinite(g).all(), name
        atol = atol_scale * max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g.float(), w.float(), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


# -- the torch backend against the reference -----------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(case=scan_cases(), softplus=st.booleans(), small_segments=st.booleans(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, softplus, small_segments, seed):
    inputs = make_inputs(**case, seed=seed)
    grad_out = torch.randn(case["batch"], case["dim"], case["length"], generator=torch.Generator().manual_seed(seed))
    # small segments: several segments per sequence, so the carried boundary states are exercised too
    segment = chunked.CHUNK * case["batch"] * case["dim"] * case["n_state"] if small_segments else None
    with mock.patch.object(chunked, "SEGMENT_ELEMENTS", segment or chunked.SEGMENT_ELEMENTS):
        got = output_and_grads(selective_scan_chunked, inputs, grad_out, softplus)
    want = output_and_grads(selective_scan_reference, inputs, grad_out, softplus)
    assert got[0].dtype == torch.float32
    check_close(got, want, rtol=1e-4, atol_scale=1e-5)


@settings(max_examples=50, deadline=None)
@given(case=scan_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_low_precision_matches_reference_of_the_rounded_inputs(case, dtype, seed):
    """Both compute in float32 from the same rounded inputs; the result may differ by rounding into `dtype`."""
    inputs = make_inputs(**case, dtype=dtype, seed=seed)
    grad_out = torch.randn(case["batch"], case["dim"], case["length"],
                           generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = output_and_grads(selective_scan_chunked, inputs, grad_out, True)
    want = output_and_grads(selective_scan_reference, upcast(inputs), grad_out.float(), True)
    assert got[0].dtype == dtype and all(g.dtype == inputs[k].dtype for k, g in got[2].items())
    # one rounding of the result (eps / 2 relative) plus float32-level differences, with a margin of 2
    check_close(got, want, rtol=torch.finfo(dtype).eps, atol_scale=2e-5)


@pytest.mark.parametrize("groups,length,softplus,segment_elements", [
    (0, 5, False, None), (2, 37, True, None), (1, 40, True, 2 * 2 * chunked.CHUNK)])
def test_gradcheck_float64(groups, length, softplus, segment_elements):
    inputs = make_inputs(1, 2, length, 2, groups, dtype=torch.float64)
    names = list(inputs)

    def scan(*tensors):
        return selective_scan_chunked(**dict(zip(names, tensors, strict=True)), delta_softplus=softplus)[0]

    with mock.patch.object(chunked, "SEGMENT_ELEMENTS", segment_elements or chunked.SEGMENT_ELEMENTS):
        assert torch.autograd.gradcheck(scan, tuple(inputs.values()))


def test_long_sequence_with_strong_decay_is_finite_and_exact():
    # half the state decays by exp(-20) per step, the other half barely (memory across all 4096 positions)
    inputs = make_inputs(1, 2, 4096, 4, 0, seed=3)
    with torch.no_grad():
        inputs["delta"].copy_(10 + inputs["delta"].abs())
        inputs["A"][:, :2] = -2.0
        inputs["A"][:, 2:] = -1e-4
    grad_out = torch.randn(1, 2, 4096, generator=torch.Generator().manual_seed(4))
    got = output_and_grads(selective_scan_chunked, inputs, grad_out, False)
    want = output_and_grads(selective_scan_reference, inputs, grad_out, False)
    check_close(got, want, rtol=1e-4, atol_scale=1e-5)


def test_backward_keeps_segment_boundary_states_not_every_state():
    batch, dim, length, n_state = 1, 64, 512, 32
    inputs = make_inputs(batch, dim, length, n_state, 0)
    with mock.patch.object(chunked, "SEGMENT_ELEMENTS", 64 * dim * n_state):
        out, _ = selective_scan_chunked(**inputs, delta_softplus=True)
    saved = sum(t.numel() for t in out.grad_fn.saved_tensors if t is not None)
    given_inputs = sum(t.numel() for t in inputs.values())
    boundary_states = (length // 64) * dim * n_state
    pre_gate_output = batch * dim * length
    assert saved == given_inputs + boundary_states + pre_gate_output
    assert saved < batch * dim * length * n_state / 4


# -- decoding --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("options", [dict(), dict(with_D=False, with_z=False, with_bias=False)])
def test_state_update_step_by_step_equals_the_scan(groups, options):
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(2, 4, 9, 5, groups, **options).items()}
    out, last_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    for update in (selective_state_update, selective_state_update_reference):
        state = torch.zeros(2, 4, 5)
        steps = [update(state, inputs["u"][..., t], inputs["delta"][..., t], inputs["A"], inputs["B"][..., t],
                        inputs["C"][..., t], inputs["D"], None if inputs["z"] is None else inputs["z"][..., t],
                        inputs["delta_bias"], dt_softplus=True) for t in range(9)]
        torch.testing.assert_close(torch.stack(steps, dim=-1), out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, last_state, rtol=1e-5, atol=1e-5)


def test_state_update_in_bfloat16_returns_bfloat16_and_keeps_a_float32_state():
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(2, 4, 1, 3, 0).items()}
    state = torch.randn(2, 4, 3)
    reference_state = state.clone()
    args = [inputs[k][..., 0].bfloat16() for k in ("u", "delta")] + [inputs["A"]] + \
        [inputs[k][..., 0].bfloat16() for k in ("B", "C")]
    y = selective_state_update(state, *args, D=inputs["D"], dt_softplus=True)
    want = selective_state_update_reference(reference_state, *args, D=inputs["D"], dt_softplus=True)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(state, reference_state)


# -- dispatch and input checks ----------------------------------------------------------------------------------
def test_backends_resolve_as_documented(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    on_cpu = "torch" if numba_missing() else "numba"  # tests/kernels/test_selective_scan_numba.py: without numba
    assert resolve_backend("selective_scan", "auto", cpu) == on_cpu
    assert resolve_backend("selective_scan", "auto", cuda) == ("peer" if peer_installed("selective_scan") else "triton")
    assert resolve_backend("selective_scan", "peer", cuda) == "peer"
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(1, 2, 20, 4, 0).items()}
    calls = []
    functions = {"numba": "selective_scan_numba", "torch": "selective_scan_chunked",
                 "reference": "selective_scan_reference"}
    for name in functions.values():
        original = getattr(selective_scan_module, name)
        monkeypatch.setattr(selective_scan_module, name,
                            lambda *a, _name=name, _fn=original: calls.append(_name) or _fn(*a))
    auto = selective_scan(**inputs, backend="auto")
    on_cpu_out = selective_scan(**inputs, backend=on_cpu)
    torch_out = selective_scan(**inputs, backend="torch")
    reference_out = selective_scan(**inputs, backend="reference")
    assert calls == [functions[on_cpu], functions[on_cpu], "selective_scan_chunked", "selective_scan_reference"]
    assert torch.equal(auto, on_cpu_out)
    torch.testing.assert_close(torch_out, reference_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'peer' backend for selective_scan .* use auto, torch or reference"):
        selective_scan(**inputs, backend="peer")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' backend for selective_scan runs on CUDA"):
        selective_scan(**inputs, backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        selective_scan(**inputs, backend="cuda")


def test_peer_without_mamba_ssm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes `import mamba_ssm...` fail
    inputs = make_inputs(1, 2, 4, 4, 0)
    with pytest.raises(ImportError, match=r"needs mamba_ssm .* pip install -e \.\[peers\]"):
        selective_scan_module._peer_selective_scan(*inputs.values(), False)


def _inputs(**changes):
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(2, 4, 6, 3, 2).items()}
    return {**inputs, **changes}


@pytest.mark.parametrize("changes,error,message", [
    (dict(u=[[1.0]]), TypeError, "u must be a torch.Tensor, got list"),
    (dict(u=torch.randn(2, 4)), ValueError, r"u must be 3-D \(batch, dim, L\)"),
    (dict(delta=torch.randn(2, 4, 7)), ValueError, "delta must have u's shape"),
    (dict(z=torch.randn(2, 4, 5)), ValueError, "z must have u's shape"),
    (dict(A=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "A is complex; only real A"),
    (dict(A=torch.randn(5, 3)), ValueError, r"A must be \(dim, N\) with dim=4"),
    (dict(A=torch.randn(4)), ValueError, "A must be 2-D"),
    (dict(B=torch.randn(2, 2, 4, 6)), ValueError, r"B must be \(batch, \[G,\] N, L\) with batch=2, N=3, L=6"),
    (dict(C=torch.randn(2, 2, 3, 5)), ValueError, "C must be .* L=6"),
    (dict(B=torch.randn(2, 3, 3, 6), C=torch.randn(2, 3, 3, 6)), ValueError, "B has 3 groups, which must divide dim=4"),
    (dict(C=torch.randn(2, 3, 6)), ValueError, "B and C must have the same shape"),
    (dict(D=torch.randn(5)), ValueError, "D must be 1-D of length dim=4"),
    (dict(delta_bias=torch.randn(4, 1)), ValueError, "delta_bias must be 1-D of length dim=4"),
    (dict(u=torch.randn(2, 4, 6, dtype=torch.float64)), TypeError, "u has dtype torch.float64; use float32"),
    (dict(B=torch.randint(0, 2, (2, 2, 3, 6))), TypeError, "B has dtype torch.int64"),
    (dict(D=torch.randn(4, dtype=torch.float16)), TypeError, "D has dtype torch.float16; use float32 or u's"),
    (dict(C=torch.randn(2, 2, 3, 6, device="meta")), ValueError, "all tensors must be on one device"),
    (dict(u=torch.randn(2, 4, 0), delta=torch.randn(2, 4, 0), z=torch.randn(2, 4, 0)), ValueError, "empty inputs"),
])
def test_bad_inputs_are_one_line_errors(changes, error, message):
    with pytest.raises(error, match=message) as info:
        selective_scan(**_inputs(**changes))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes,error,message", [
    (dict(state=torch.zeros(2, 4, 3, dtype=torch.float16)), ValueError, "state must be float32 of shape"),
    (dict(state=torch.zeros(2, 4, 2)), ValueError, r"state must be float32 of shape \(2, 4, 3\)"),
    (dict(x=torch.randn(2, 4, 1)), ValueError, r"x must be 2-D \(batch, dim\)"),
    (dict(B=torch.randn(2, 3, 3)), ValueError, "B has 3 groups, which must divide dim=4"),
    (dict(dt_bias=torch.randn(3)), ValueError, "dt_bias must be 1-D of length dim=4"),
])
def test_bad_state_update_inputs_are_one_line_errors(changes, error, message):
    inputs = _inputs()
    args = dict(state=torch.zeros(2, 4, 3), x=inputs["u"][..., 0], dt=inputs["delta"][..., 0], A=inputs["A"],
                B=inputs["B"][..., 0], C=inputs["C"][..., 0], D=inputs["D"], dt_bias=inputs["delta_bias"])
    with pytest.raises(error, match=message) as info:
        selective_state_update(**{**args, **changes})
    assert "\n" not in str(info.value)
