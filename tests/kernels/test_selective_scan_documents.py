"""Packed documents in the selective scan (seq_idx): the state restarts where a document starts, so each document
gives what it gives alone; every backend against the reference with seq_idx, forward and gradients."""
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import archlab.kernels.selective_scan as scan_module
from archlab.kernels.checking import compare_with_reference, leaf_on, map_tensors, outputs_and_grads
from archlab.kernels.registry import kernel_ops
from archlab.kernels.selective_scan import chunked, selective_scan
from archlab.kernels.selective_scan.conformance import CONFORMANCE, draw_seq_idx, scan_case, seq_idx_of
from tests.kernels.test_conformance import DEVICE, why_not_here

OP = kernel_ops()["selective_scan"]


def runnable(*backends):
    return [pytest.param(b, marks=[pytest.mark.skip(reason=why_not_here(b))] if why_not_here(b) else [])
            for b in backends]


BACKENDS = runnable("torch", "numba", "triton")
# batch * dim * N * L of a drawn Triton case: the interpreter takes ~1 s of CPU for its forward and backward
INTERPRETED = 1000
# documents starting at 1 (a length-1 one), 16 and 32 (the interpreter's and numba's chunk boundaries), 33
BOUNDARY_LENGTHS = [1, 15, 16, 1, 7]


@st.composite
def packed_cases(draw, max_elements=None):
    """A selective_scan call on packed documents: ragged per row, ids rising or falling, grouped or shared B/C."""
    groups, batch, n_state = draw(st.sampled_from([0, 1, 2])), draw(st.integers(1, 2)), draw(st.sampled_from([1, 4]))
    dim = max(groups, 1) * draw(st.integers(1, 2))
    most = 40 if max_elements is None else max_elements // (batch * dim * n_state)
    length = draw(st.integers(1, most))
    options = [draw(st.booleans()) for _ in range(4)]  # softplus, D, z, delta_bias
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return scan_case(batch, dim, length, n_state, groups, *options, torch.float32, generator,
                     draw_seq_idx(draw, batch, length))


def run(case, backend, **changes):
    """(out, last state, gradients of every differentiable input) of `case` on `backend` on DEVICE with `changes`
    to its keyword arguments; the gradient fed to out is a seeded draw."""
    changed = map_tensors(type(case)(case.args, {**case.kwargs, **changes}), lambda t: leaf_on(t, DEVICE, upcast=False))
    outputs, grads, _ = outputs_and_grads(lambda *a, **k: selective_scan(*a, **k, backend=backend), changed, None)
    return [*outputs, *grads]


def check_matches_reference(case, backend, dtype=torch.float32):
    problems = compare_with_reference(OP, backend, case, CONFORMANCE.tolerance(backend, dtype), DEVICE)
    assert not problems, f"{backend}: " + "; ".join(problems)


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_reference_with_seq_idx_is_each_document_scanned_alone(data):
    """The definition: packed output = each document's output alone, concatenated; the last state is the row's last
    document's final state."""
    case = data.draw(packed_cases())
    u, delta, A, B, C, D, z, delta_bias = (None if t is None else t.detach() for t in case.args)
    seq_idx = case.kwargs["seq_idx"]
    out, last_state = selective_scan(*case.args, **case.kwargs, backend="reference")
    for row in range(u.shape[0]):
        ids = seq_idx[row]
        starts = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist()]
        for start, end in zip(starts, [*starts[1:], u.shape[-1]], strict=True):
            u_, delta_, B_, C_, z_ = (None if t is None else t[row:row + 1, ..., start:end]
                                      for t in (u, delta, B, C, z))
            alone, alone_state = selective_scan(u_, delta_, A, B_, C_, D, z_, delta_bias,
                                                delta_softplus=case.kwargs["delta_softplus"], return_last_state=True,
                                                backend="reference")
            torch.testing.assert_close(out[row:row + 1, :, start:end], alone)
        torch.testing.assert_close(last_state[row:row + 1], alone_state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_with_seq_idx(backend):
    """Forward and the gradient of every differentiable input; the torch path also in one-chunk and two-chunk
    segments (its other code path and segment boundaries). The conformance test draws more, half of them packed."""

    @settings(max_examples=2 if backend == "triton" else 8, deadline=None)
    @given(data=st.data())
    def matches(data):
        case = data.draw(packed_cases(INTERPRETED if backend == "triton" else None))
        u, A = case.args[0], case.args[2]
        per_chunk = chunked.CHUNK * u.shape[0] * u.shape[1] * A.shape[1]
        segment = data.draw(st.sampled_from([chunked.SEGMENT_ELEMENTS, 1, 2 * per_chunk]))
        with mock.patch.object(chunked, "SEGMENT_ELEMENTS", segment):
            check_matches_reference(case, backend)

    matches()


def boundary_case(dtype, groups=0):
    """One row of BOUNDARY_LENGTHS documents, every optional input present; small for the interpreter."""
    seq_idx = seq_idx_of(BOUNDARY_LENGTHS)[None]
    return scan_case(1, 2, seq_idx.shape[1], 2, groups, True, True, True, True, dtype,
                     torch.Generator().manual_seed(1), seq_idx)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_documents_starting_at_chunk_boundaries(backend, dtype):
    check_matches_reference(boundary_case(dtype, groups=2), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_neighbouring_ids_matter(backend):
    """Falling ids (a reversed layer's flipped seq_idx), any values, int32 or int64: the same result for the same
    document boundaries."""
    case = boundary_case(torch.float32)
    seq_idx = case.kwargs["seq_idx"]
    want = run(case, backend)
    for same_boundaries in (seq_idx.max() - seq_idx, seq_idx.long() * 7 - 3):
        for got, expected in zip(run(case, backend, seq_idx=same_boundaries), want, strict=True):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", [*BACKENDS, "reference"])
def test_one_document_is_the_same_bits_as_no_seq_idx(backend):
    case = boundary_case(torch.float32)
    one_document = torch.zeros_like(case.kwargs["seq_idx"])
    for got, want in zip(run(case, backend, seq_idx=one_document), run(case, backend, seq_idx=None), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("changes,error,message", [
    (dict(seq_idx=torch.zeros(1, 40)), TypeError, "seq_idx has dtype torch.float32; use int32"),
    (dict(seq_idx=[0] * 40), TypeError, "seq_idx must be a torch.Tensor of document ids or None, got list"),
    (dict(seq_idx=torch.zeros(40, dtype=torch.int32)), ValueError, r"seq_idx must have shape \(batch, L\) = \(1, 40\), "
                                                                  r"got \(40,\)"),
    (dict(seq_idx=torch.zeros(1, 41, dtype=torch.int32)), ValueError, r"got \(1, 41\)"),
    (dict(seq_idx=torch.zeros(1, 40, dtype=torch.int32, device="meta")), ValueError, "seq_idx is on meta"),
    (dict(backend="peer"), ValueError, "the 'peer' backend .* has no seq_idx for packed documents; use auto"),
])
def test_bad_seq_idx_is_a_one_line_error(changes, error, message):
    case = boundary_case(torch.float32)
    with pytest.raises(error, match=message) as info:
        selective_scan(*case.args, **{**case.kwargs, "backend": "torch", **changes})
    assert "\n" not in str(info.value)


def test_auto_never_picks_peer_for_packed_documents(monkeypatch):
    """Where auto would take mamba_ssm (CUDA, installed), packed documents go to our Triton kernel, or torch where it
    is not usable."""
    resolved = []

    def resolve(op, requested, device, dtype=None):
        resolved.append(requested)
        if requested == "triton":
            raise ValueError("not usable here")
        return "peer"

    monkeypatch.setattr(scan_module, "resolve_backend", resolve)
    monkeypatch.setattr(scan_module, "_peer_selective_scan", lambda *a: pytest.fail("peer ran with seq_idx"))
    case = boundary_case(torch.float32)
    for got, want in zip(run(case, "auto"), run(case, "torch"), strict=True):
        assert torch.equal(got, want)
    assert resolved[:2] == ["auto", "triton"]


@pytest.mark.parametrize("backend", runnable("numba", "triton"))
def test_custom_op_with_seq_idx_passes_opcheck(backend):
    """Schema, fake kernel and autograd registration agree with the kernels when seq_idx is given."""
    from archlab.kernels.selective_scan.op import selective_scan_fwd, selective_scan_numba_fwd

    case = scan_case(1, 2, 6, 2, 0, True, True, True, True, torch.float32, torch.Generator().manual_seed(0),
                     seq_idx_of([2, 1, 3])[None])
    op = selective_scan_numba_fwd if backend == "numba" else selective_scan_fwd
    args = map_tensors(case, lambda t: leaf_on(t, DEVICE, upcast=False)).args
    torch.library.opcheck(op, (*args, case.kwargs["seq_idx"].to(DEVICE)), {"delta_softplus": True, "chunk_len": 4},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))

