"""Attention over packed rows (seq_idx, issue 19): the reference runs each document as if alone, every backend
matches the reference with seq_idx (forward and gradients), and bad seq_idx is a one-line error."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.attention import attention, attention_reference
from archlab.kernels.attention import triton as flash
from archlab.kernels.attention.conformance import draw_document_lengths, packed_seq_idx
from archlab.kernels.checking import compare_with_reference
from archlab.kernels.registry import ConformanceCase, kernel_ops
from tests.kernels.test_conformance import DEVICE, why_not_here

HEADS = [(1, 1), (2, 1), (4, 2)]  # (H, H_kv): MHA, GQA, GQA with two kv heads


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """The interpreter's small fixed blocks on a GPU too: no autotuning of every drawn shape."""
    monkeypatch.setattr(flash, "AUTOTUNE", False)


def qkv(batch, n_heads, n_kv_heads, length, head_dim=16, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, length, head_dim, generator=generator).to(dtype).requires_grad_()
            for heads in (n_heads, n_kv_heads, n_kv_heads)]


@st.composite
def packed_cases(draw, max_length=40, heads=HEADS):
    """Rows of ragged documents, causal (with or without a window) or bidirectional, GQA."""
    causal = draw(st.booleans())
    length = draw(st.integers(1, max_length))
    batch = draw(st.integers(1, 2))
    n_heads, n_kv_heads = draw(st.sampled_from(heads))
    return dict(batch=batch, n_heads=n_heads, n_kv_heads=n_kv_heads, length=length, causal=causal,
                window=draw(st.one_of(st.none(), st.integers(1, length + 2))) if causal else None,
                documents=[draw_document_lengths(draw, length) for _ in range(batch)],
                scale=draw(st.sampled_from([None, 0.3])), seed=draw(st.integers(0, 2**16)))


def packed_inputs(case, dtype=torch.float32):
    q, k, v = qkv(case["batch"], case["n_heads"], case["n_kv_heads"], case["length"], dtype=dtype, seed=case["seed"])
    return q, k, v, packed_seq_idx(case["documents"])


# -- the reference with seq_idx is each document alone ---------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(case=packed_cases())
def test_reference_on_packed_rows_is_each_document_alone_concatenated(case):
    q, k, v, seq_idx = packed_inputs(case)
    kw = dict(causal=case["causal"], scale=case["scale"], window=case["window"])
    out, lse = attention_reference(q, k, v, seq_idx=seq_idx, **kw)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    for b, lengths in enumerate(case["documents"]):
        start = 0
        for length in lengths:
            piece = slice(start, start + length)
            alone = [t[b:b + 1, :, piece].detach().requires_grad_() for t in (q, k, v)]
            alone_out, alone_lse = attention_reference(*alone, **kw)
            alone_grads = torch.autograd.grad(alone_out, alone, grad_out[b:b + 1, :, piece])
            torch.testing.assert_close(out[b:b + 1, :, piece], alone_out, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(lse[b:b + 1, :, piece], alone_lse, rtol=1e-6, atol=1e-6)
            for name, grad, alone_grad in zip("qkv", grads, alone_grads, strict=True):
                torch.testing.assert_close(grad[b:b + 1, :, piece], alone_grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name: f"d{n}: {m}")
            start += length


def test_bidirectional_packed_rows_see_their_whole_document_and_nothing_else():
    q, k, v = qkv(1, 1, 1, 6)
    v = torch.eye(6)[None, None]  # out[i] is then query i's attention weights over the keys
    seq_idx = torch.tensor([[3, 3, 5, 5, 5, 9]])
    weights = attention_reference(q, k, v, causal=False, seq_idx=seq_idx)[0][0, 0].detach()
    assert torch.equal(weights > 0, seq_idx[0, :, None] == seq_idx[0, None, :])
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))


# -- every backend equals the reference with seq_idx ---------------------------------------------------------
def check_backend(backend, case, dtype):
    reason = why_not_here(backend)
    if reason:
        pytest.skip(reason)
    op = kernel_ops()["attention"]
    q, k, v, seq_idx = packed_inputs(case, dtype)
    call = ConformanceCase((q, k, v), {"causal": case["causal"], "scale": case["scale"], "window": case["window"],
                                       "seq_idx": seq_idx})
    problems = compare_with_reference(op, backend, call, op.conformance.tolerance(backend, dtype), DEVICE)
    assert not problems, f"{backend} {dtype}: " + "; ".join(problems)


@settings(max_examples=25, deadline=None)
@given(case=packed_cases(max_length=70), dtype=st.sampled_from([torch.float32, torch.float16]))
def test_torch_backend_matches_reference_on_packed_rows(case, dtype):
    check_backend("torch", case, dtype)


@settings(max_examples=3, deadline=None)  # the interpreter: seconds an example; the block-edge cases follow
@given(case=packed_cases(max_length=48, heads=HEADS[:2]))
def test_triton_backend_matches_reference_on_packed_rows(case):
    check_backend("triton", case, torch.float32)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["m16n32", "m32n16"])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 20), (False, None)])
def test_triton_skips_and_masks_documents_around_block_edges(monkeypatch, blocks, causal, window):
    """Documents that end inside a block, on a block edge, span several blocks or are one token: the kernels' key
    and query ranges per block (skipped, masked, whole) all occur."""
    monkeypatch.setattr(flash, "FIXED_BLOCKS", {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1]})
    case = dict(batch=2, n_heads=2, n_kv_heads=1, length=64, causal=causal, window=window, scale=None, seed=3,
                documents=[[5, 11, 32, 1, 15], [32, 32]])
    check_backend("triton", case, torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_document_per_row_is_attention_without_seq_idx(backend):
    if why_not_here(backend):
        pytest.skip(why_not_here(backend))
    q, k, v = (t.detach().to(DEVICE) for t in qkv(2, 2, 1, 37, dtype=torch.float16))
    seq_idx = torch.full((2, 37), 7, dtype=torch.int64, device=DEVICE)
    for causal in (True, False):
        want = attention(q, k, v, causal=causal, backend=backend)
        torch.testing.assert_close(attention(q, k, v, causal=causal, backend=backend, seq_idx=seq_idx), want,
                                   rtol=1e-3, atol=1e-3)


# -- bad seq_idx -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_seq_idx,length_k,error,message", [
    (lambda: [[0, 0, 1, 1]], 4, TypeError, "seq_idx must be a torch.Tensor"),
    (lambda: torch.zeros(2, 4), 4, TypeError, "seq_idx has dtype torch.float32; use int32"),
    (lambda: torch.zeros(2, 5, dtype=torch.int32), 4, ValueError, r"seq_idx must have shape \(batch, L\) = \(2, 4\)"),
    (lambda: torch.zeros(4, dtype=torch.int32), 4, ValueError, r"seq_idx must have shape \(batch, L\)"),
    (lambda: torch.zeros(2, 4, dtype=torch.int32), 6, ValueError, "needs self-attention, len_q == len_k, got 4 and 6"),
    (lambda: torch.zeros(2, 4, dtype=torch.int32, device="meta"), 4, ValueError, "seq_idx is on meta"),
], ids=["list", "float", "length", "1-D", "kv-cache", "device"])
def test_bad_seq_idx_is_a_one_line_error(make_seq_idx, length_k, error, message):
    q, k = torch.randn(2, 2, 4, 16), torch.randn(2, 2, length_k, 16)
    with pytest.raises(error, match=message) as raised:
        attention(q, k, k, causal=True, seq_idx=make_seq_idx())
    assert "\n" not in str(raised.value)
