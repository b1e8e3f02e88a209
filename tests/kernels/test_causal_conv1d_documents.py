"""Causal conv1d over packed documents (seq_idx, issue 19): each document as if it ran alone, on every backend.

The reference is checked against its definition of correct (each document alone, concatenated); the torch and
Triton backends against the reference with seq_idx, forward and gradients, also with the flipped ids a reversed
layer passes. On CPU the Triton kernels run under TRITON_INTERPRET=1, so their cases stay small.
"""
import sys
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.causal_conv1d import causal_conv1d, causal_conv1d_reference, causal_conv1d_triton
from archlab.kernels.causal_conv1d.conformance import seq_idx_from_starts
from tests.kernels.test_causal_conv1d import DEVICE, make_x, output_and_grads

pytest.importorskip("triton")
from archlab.kernels.causal_conv1d import triton as conv_triton  # noqa: E402

LENGTHS = [1, 2, 3, 5, 9, 33, 70]  # 1, below the width, around the 32-position test blocks and 48-position chunks


@st.composite
def packed_cases(draw, max_dim=9):
    """Inputs with documents of ragged lengths packed in each row: a new document starts at each position with
    probability `split` (0.5 gives many documents of length 1 and below the width, 0.05 long ones)."""
    length, batch = draw(st.sampled_from(LENGTHS)), draw(st.integers(1, 2))
    split = draw(st.sampled_from([0.05, 0.5]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    starts = torch.rand(batch, length - 1) < split
    width = draw(st.integers(2, 4))
    dim = draw(st.integers(1, max_dim))
    x = make_x(batch, dim, length, torch.float32, draw(st.sampled_from(["contiguous", "channel_last", "sliced"])))
    weight = torch.randn(dim, width) / width ** 0.5
    bias = torch.randn(dim) if draw(st.booleans()) else None
    seq_idx = seq_idx_from_starts(starts).to(draw(st.sampled_from([torch.int32, torch.int64])))
    return dict(x=x.to(DEVICE), weight=weight.to(DEVICE), bias=None if bias is None else bias.to(DEVICE),
                seq_idx=seq_idx.to(DEVICE), activation=draw(st.sampled_from([None, "silu"])))


@settings(max_examples=40, deadline=None)
@given(case=packed_cases())
def test_reference_convolves_each_document_alone(case):
    x, seq_idx = case["x"], case["seq_idx"]
    packed = causal_conv1d_reference(x, case["weight"], case["bias"], case["activation"], seq_idx)
    rows = []
    for row in range(x.shape[0]):
        lengths = torch.unique_consecutive(seq_idx[row], return_counts=True)[1].tolist()
        alone = [causal_conv1d_reference(document, case["weight"], case["bias"], case["activation"])
                 for document in x[row:row + 1].split(lengths, dim=2)]
        rows.append(torch.cat(alone, dim=2))
    # not bit-equal: SiLU rounds a vectorised tensor's elements and a short tail's differently, by an ulp
    torch.testing.assert_close(packed, torch.cat(rows), rtol=1e-6, atol=1e-6)


def check_backend(backend, case, flip):
    """Forward and the gradients of x, weight and bias against the reference; `flip`: the row reversed (x and
    seq_idx), as a bidirectional layer runs it."""
    x, seq_idx = case["x"], case["seq_idx"]
    if flip:
        x, seq_idx = x.flip(2), seq_idx.flip(1)
    dout = torch.randn(x.shape, device=x.device)
    kwargs = dict(activation=case["activation"], seq_idx=seq_idx)
    got = output_and_grads(causal_conv1d, x, case["weight"], case["bias"], dout, backend=backend, **kwargs)
    want = output_and_grads(causal_conv1d, x, case["weight"], case["bias"], dout, backend="reference", **kwargs)
    terms = x.shape[0] * x.shape[2]  # dweight and dbias sum batch * L products
    for name, g, w in zip(["out", "dx", "dweight", "dbias"], got, want, strict=False):
        atol = 1e-5 if name in ("out", "dx") else 1e-6 * terms
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=40, deadline=None)
@given(case=packed_cases(), flip=st.booleans())
def test_torch_matches_reference(case, flip):
    check_backend("torch", case, flip)


@settings(max_examples=10, deadline=None)
@given(case=packed_cases(max_dim=6), flip=st.booleans(), chunk_len=st.sampled_from([48, 512]))
def test_triton_matches_reference(case, flip, chunk_len):
    with mock.patch.object(conv_triton, "AUTOTUNE", False), mock.patch.object(conv_triton, "BWD_CHUNK_LEN", chunk_len):
        check_backend("triton", case, flip)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_one_document_per_row_is_the_plain_conv(backend, layout):
    """A single document per row computes what seq_idx=None does (the Triton kernels the same bits: every tap
    reads as before, in the same order); None keeps the plain path."""
    torch.manual_seed(0)
    x = make_x(1, 5, 37, torch.float32, layout).to(DEVICE).requires_grad_()
    weight = torch.randn(5, 4, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    dout = torch.randn(x.shape, device=DEVICE)
    one_document = torch.full((1, 37), 7, dtype=torch.int32, device=DEVICE)
    plain = output_and_grads(causal_conv1d, x, weight, bias, dout, activation="silu", backend=backend)
    packed = output_and_grads(causal_conv1d, x, weight, bias, dout, activation="silu", backend=backend,
                              seq_idx=one_document)
    exact = dict(rtol=0, atol=0) if backend == "triton" else {}
    for p, q in zip(plain, packed, strict=True):
        torch.testing.assert_close(q, p, **exact)


def test_custom_op_with_seq_idx_passes_opcheck():
    """The Triton op's schema, fake kernel and autograd registration with the optional seq_idx argument (not AOT
    dispatch, which opcheck runs dynamic too: 20 s in the interpreter; the None case runs it in test_causal_conv1d)."""
    torch.manual_seed(0)
    x = make_x(2, 3, 9, torch.float32, "channel_last").to(DEVICE).requires_grad_()
    weight = torch.randn(3, 4, device=DEVICE, requires_grad=True)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 3]] * 2, dtype=torch.int32, device=DEVICE)
    with mock.patch.object(conv_triton, "AUTOTUNE", False):
        torch.library.opcheck(causal_conv1d_triton, (x, weight, None, True, seq_idx),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_seq_idx_none_runs_the_plain_torch_path(monkeypatch):
    import archlab.kernels.causal_conv1d as conv_module

    def refuse(*args):
        raise AssertionError("seq_idx=None must not take the per-document path")

    monkeypatch.setattr(conv_module, "_within_documents", refuse)
    x, weight = torch.randn(2, 3, 9), torch.randn(3, 4)
    torch.testing.assert_close(causal_conv1d(x, weight, backend="torch"), causal_conv1d_reference(x, weight))


def _inputs():
    return torch.randn(2, 3, 8), torch.randn(3, 4), torch.randn(3)


@pytest.mark.parametrize("seq_idx,error,message", [
    (torch.zeros(2, 7, dtype=torch.int32), ValueError, r"must have shape \(batch, L\) = \(2, 8\), got \(2, 7\)"),
    (torch.zeros(16, dtype=torch.int32), ValueError, r"seq_idx must have shape \(batch, L\)"),
    (torch.zeros(2, 8), TypeError, "seq_idx has dtype torch.float32; use int32"),
    (torch.zeros(2, 8, dtype=torch.int16), TypeError, "seq_idx has dtype torch.int16"),
    (torch.zeros(2, 8, dtype=torch.int32, device="meta"), ValueError, "seq_idx is on meta but the inputs are on cpu"),
    ([[0] * 8] * 2, TypeError, "seq_idx must be a torch.Tensor of document ids or None, got list"),
])
def test_bad_seq_idx_is_a_one_line_error(seq_idx, error, message):
    with pytest.raises(error, match=message) as info:
        causal_conv1d(*_inputs(), seq_idx=seq_idx)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(DEVICE == "cuda", reason="pretends CUDA's backend choice on CPU tensors")
def test_peer_takes_seq_idx_only_at_dims_of_multiples_of_8(monkeypatch):
    """An explicit peer refuses seq_idx at dim 3 in one line (before importing the package); auto runs our Triton
    kernel instead."""
    import archlab.kernels.causal_conv1d as conv_module

    monkeypatch.setattr(conv_module, "resolve_backend", lambda op, requested, device, dtype: "peer")  # as on CUDA
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # the package would fail to import
    x, weight, bias = _inputs()
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2]] * 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'peer' backend .* takes seq_idx only with a dim that is a multiple of 8, "
                                         r"got dim 3; use backend='triton'") as info:
        causal_conv1d(x, weight, bias, backend="peer", seq_idx=seq_idx)
    assert "\n" not in str(info.value)
    with mock.patch.object(conv_triton, "AUTOTUNE", False):
        torch.testing.assert_close(causal_conv1d(x, weight, bias, backend="auto", seq_idx=seq_idx),
                                   causal_conv1d_reference(x, weight, bias, seq_idx=seq_idx))
