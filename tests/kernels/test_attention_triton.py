"""The Triton FlashAttention kernels against the float32 reference (on CPU through Triton's interpreter)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.attention import triton as flash
from archlab.kernels.attention.reference import attention_reference
from archlab.kernels.attention.triton import flash_attn_bwd, flash_attn_fwd
from tests.kernels.test_attention import naive_attention, random_qkv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 1, primes, multiples of the 16 x 32 test blocks and their neighbours
LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 47, 61, 64, 67, 70]
HEADS = [(1, 1), (2, 1), (2, 2), (4, 2), (3, 1)]  # (H, H_kv): MHA, GQA and MQA


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """Small fixed blocks everywhere, so a GPU run does not autotune every drawn shape (the large GPU test
    turns autotuning back on)."""
    monkeypatch.setattr(flash, "AUTOTUNE", False)


def use_blocks(monkeypatch, block_m, block_n):
    monkeypatch.setattr(flash, "FIXED_BLOCKS", {"BLOCK_M": block_m, "BLOCK_N": block_n})


def flash_attention(q, k, v, dout, *, causal, scale, window=None):
    """out, lse, dq, dk, dv straight from the two kernels."""
    out, lse = flash_attn_fwd(q, k, v, causal=causal, scale=scale, window=window or 0)
    return (out, lse, *flash_attn_bwd(dout, q, k, v, out, lse, causal=causal, scale=scale, window=window or 0))


def reference_attention(q, k, v, dout, *, causal, scale, window=None):
    """The same five results from the float32 reference, grads by autograd."""
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    out, lse = attention_reference(q, k, v, causal=causal, scale=scale, window=window)
    out.backward(dout.float())
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def make_inputs(case, dtype, seed):
    torch.manual_seed(seed)
    shape = {k: case[k] for k in ("batch", "n_heads", "n_kv_heads", "len_q", "len_k", "head_dim")}
    q, k, v = (t.detach().to(DEVICE) for t in random_qkv(**shape, dtype=dtype, layout=case["layout"]))
    dout = torch.randn(case["batch"], case["n_heads"], case["len_q"], case["head_dim"]).to(dtype).to(DEVICE)
    return q, k, v, dout


@st.composite
def attention_cases(draw):
    causal = draw(st.booleans())
    head_dim = draw(st.sampled_from([16, 32, 64, 128]))
    lengths = [n for n in LENGTHS if head_dim < 128 or n <= 33]  # D=128 is slow in the interpreter
    len_k = draw(st.sampled_from(lengths))
    # causal needs len_q <= len_k; len_q == len_k (training) gets half of the causal draws
    if causal and draw(st.booleans()):
        len_q = len_k
    else:
        len_q = draw(st.sampled_from([n for n in lengths if n <= len_k] if causal else lengths))
    n_heads, n_kv_heads = draw(st.sampled_from(HEADS))
    return dict(batch=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=n_kv_heads, len_q=len_q, len_k=len_k,
                head_dim=head_dim, causal=causal, scale=draw(st.sampled_from([None, 0.3])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])))


def check_float32(case, seed):
    q, k, v, dout = make_inputs(case, torch.float32, seed)
    kw = dict(causal=case["causal"], scale=case["scale"] or case["head_dim"] ** -0.5, window=case.get("window"))
    got, want = flash_attention(q, k, v, dout, **kw), reference_attention(q, k, v, dout, **kw)
    for name, g, w, tol in zip(["out", "lse", "dq", "dk", "dv"], got, want, [1e-5, 1e-5, 3e-5, 3e-5, 3e-5],
                               strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")


def flash_formula_grads(q, k, v, dout, out, *, causal, scale):
    """dQ, dK, dV in float32 by FlashAttention's backward formula, D = rowsum(dO * O) taken from `out` as stored
    (in the inputs' dtype), as FlashAttention-2 and our kernel do. That D carries O's rounding, and it enters
    dS = P * (dP - D): where dP - D nearly cancels (few keys, wide heads) the gradients inherit far more than plain
    low-precision math would show. Hypothesis found len_q 1, len_k 2, head_dim 128 in bf16: dK off the float32
    reference by 0.053 where plain bf16 math errs by 0.0007; this formula accounts for it exactly."""
    groups = q.shape[1] // k.shape[1]
    qf, df = q.float(), dout.float()
    kf, vf = (t.float().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    if causal:
        len_q, len_k = q.shape[2], k.shape[2]
        positions = torch.arange(len_k, device=q.device)
        scores = scores.masked_fill(positions[None, :] > positions[len_k - len_q:, None], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    delta = (df * out.float()).sum(-1, keepdim=True)
    ds = p * (df @ vf.transpose(-1, -2) - delta)
    per_kv_head = lambda t: t.unflatten(1, (k.shape[1], groups)).sum(2)  # noqa: E731 - GQA: sum the query heads
    return scale * ds @ kf, per_kv_head(scale * ds.transpose(-1, -2) @ qf), per_kv_head(p.transpose(-1, -2) @ df)


def check_low_precision(case, dtype, seed):
    """Each result may err by at most about what the plain formula computed in `dtype` errs by: the output against
    the float32 reference, the gradients against FlashAttention's formula with D from the stored output
    (flash_formula_grads; plain float32 gradients can be further off by design)."""
    q, k, v, dout = make_inputs(case, dtype, seed)
    kw = dict(causal=case["causal"], scale=case["scale"] or case["head_dim"] ** -0.5)
    got, want = flash_attention(q, k, v, dout, **kw), reference_attention(q, k, v, dout, **kw)
    targets = [want[0], *flash_formula_grads(q, k, v, dout, got[0], **kw)]
    # lse is computed in float32 from exactly representable products: it must be float32-tight
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    plain_out = naive_attention(*leaves, **kw)
    plain_out.backward(dout)
    plain = [plain_out.detach()] + [t.grad for t in leaves]
    for name, g, p, w, target in zip(["out", "dq", "dk", "dv"], got[:1] + got[2:], plain, want[:1] + want[2:],
                                     targets, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        plain_error = (p.float() - w).abs().max().item()
        # floor: a few units of rounding of the result itself, for cases where plain math happens to be exact
        floor = 4 * torch.finfo(dtype).eps * max(w.abs().max().item(), 1.0)
        error = (g.float() - target).abs().max().item()
        assert error <= 2 * plain_error + floor, f"{name}: error {error:.3g} vs plain {dtype} math {plain_error:.3g}"


@settings(max_examples=50, deadline=None)
@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, seed):
    check_float32(case, seed)


@settings(max_examples=50, deadline=None)
@given(case=attention_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_low_precision_is_as_close_as_low_precision_math(case, dtype, seed):
    check_low_precision(case, dtype, seed)


def _case(len_q, len_k, causal, n_heads=4, n_kv_heads=2, head_dim=32, layout="contiguous"):
    return dict(batch=1, n_heads=n_heads, n_kv_heads=n_kv_heads, len_q=len_q, len_k=len_k, head_dim=head_dim,
                causal=causal, scale=None, layout=layout)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["m16n32", "m32n16"])
@pytest.mark.parametrize("len_q,len_k,causal", [
    (1, 1, True),     # a single token
    (1, 70, True),    # decoding: the one new query sees the whole cache
    (5, 67, True),    # a chunk of new queries after a cache; the diagonal crosses block edges
    (33, 33, True),   # training shape, one past a block
    (64, 64, True),   # exact blocks: no ragged tail
    (70, 3, False),   # more queries than keys
    (17, 1, False),   # a single key
])
def test_edge_shapes(monkeypatch, blocks, len_q, len_k, causal):
    use_blocks(monkeypatch, *blocks)
    check_float32(_case(len_q, len_k, causal), seed=0)
    check_low_precision(_case(len_q, len_k, causal, layout="transposed"), torch.bfloat16, seed=1)


# -- every GPU autotune config, under the interpreter -------------------------------------------------------------
# FIXED_BLOCKS set all three kernels' blocks at once, so each distinct (BLOCK_M, BLOCK_N) of any autotuner runs
# forward and backward (the interpreter ignores num_warps and num_stages)
GPU_BLOCKS = sorted({(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"])
                     for tuned in (flash._fwd_tuned, flash._dkdv_tuned, flash._dq_tuned) for config in tuned.configs})


@pytest.mark.parametrize("blocks", GPU_BLOCKS, ids=[f"m{m}n{n}" for m, n in GPU_BLOCKS])
def test_every_gpu_config(monkeypatch, blocks):
    """Causal with more keys than queries (bottom-right aligned), each length past a block edge, GQA."""
    block_m, block_n = blocks
    use_blocks(monkeypatch, block_m, block_n)
    check_float32(_case(block_m + 3, max(block_m, block_n) + block_n + 5, causal=True), seed=block_m + block_n)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=["m16n32", "m32n16"])
def test_causal_offsets_around_block_edges(monkeypatch, blocks):
    """Where the diagonal crosses block edges decides which blocks are skipped, masked or taken whole:
    sweep the offset Lk - Lq around multiples of both block sizes."""
    use_blocks(monkeypatch, *blocks)
    for len_k in (32, 33, 49, 65):
        for offset in (0, 1, 15, 16, 17, 31, 32, 33):
            if offset < len_k:
                check_float32(_case(len_k - offset, len_k, True, n_heads=2, n_kv_heads=1, head_dim=16), seed=offset)


def test_causal_never_reads_future_keys():
    """Keys after a query's position must not matter at all, even when huge: its results stay bit-equal."""
    q, k, v, dout = make_inputs(_case(20, 50, True), torch.float32, seed=0)
    # query 0 sits at position 30: keys 31.. are invisible to it, key 31 is visible to query 1
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 31:], v2[:, :, 31:] = 1e4, 1e4
    before = flash_attention(q, k, v, dout, causal=True, scale=0.2)
    after = flash_attention(q, k2, v2, dout, causal=True, scale=0.2)
    for name, b, a in zip(["out", "lse", "dq"], before[:3], after[:3], strict=True):
        assert torch.equal(b[:, :, 0], a[:, :, 0]), name
        assert not torch.equal(b[:, :, 1], a[:, :, 1]), name


def test_backward_is_deterministic():
    q, k, v, dout = make_inputs(_case(45, 61, True, n_heads=4, n_kv_heads=1), torch.float32, seed=0)
    out, lse = flash_attn_fwd(q, k, v, causal=True, scale=0.25)
    first = flash_attn_bwd(dout, q, k, v, out, lse, causal=True, scale=0.25)
    second = flash_attn_bwd(dout, q, k, v, out, lse, causal=True, scale=0.25)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("make,message", [
    (lambda: [torch.randn(1, 2, 4, 8)] * 3, r"head_dim must be one of \(16, 32, 64, 128\), got 8"),
    (lambda: [torch.randn(1, 2, 5, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)],
     "causal needs len_q <= len_k, got 5 > 4"),
])
def test_unsupported_inputs_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message):
        flash_attn_fwd(*make(), causal=True, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_heads,n_kv_heads,len_q,len_k,head_dim", [
    (8, 2, 512, 512, 64), (8, 8, 1024, 1024, 128), (16, 4, 2048, 2048, 64), (8, 1, 300, 1500, 128),
])
def test_cuda_large_bf16_matches_reference(monkeypatch, causal, n_heads, n_kv_heads, len_q, len_k, head_dim):
    monkeypatch.setattr(flash, "AUTOTUNE", True)
    case = dict(batch=2, n_heads=n_heads, n_kv_heads=n_kv_heads, len_q=len_q, len_k=len_k, head_dim=head_dim,
                causal=causal, scale=None, layout="transposed")
    check_low_precision(case, torch.bfloat16, seed=0)


@pytest.mark.parametrize("len_q,len_k,causal,head_dim", [
    (257, 257, True, 32),    # a few hundred: many blocks, ragged tail, causal skipping over a long range
    (300, 211, False, 64),   # more queries than keys, neither a block multiple
    (131, 300, True, 128),   # a long cache behind a prefill chunk, largest head dim
])
def test_a_few_hundred_positions(len_q, len_k, causal, head_dim):
    check_float32(_case(len_q, len_k, causal, n_heads=2, n_kv_heads=1, head_dim=head_dim), seed=len_q)


# -- sliding window ----------------------------------------------------------------------------------------------
@st.composite
def windowed_cases(draw):
    """Causal with a window: one key, a few, both sides of the 16 x 32 blocks, and at least the keys (full)."""
    len_k = draw(st.sampled_from([n for n in LENGTHS if n <= 67]))
    len_q = len_k if draw(st.booleans()) else draw(st.sampled_from([n for n in LENGTHS if n <= len_k]))
    window = draw(st.one_of(st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, len_k, len_k + 3]),
                            st.integers(1, len_k)))
    n_heads, n_kv_heads = draw(st.sampled_from(HEADS))
    return dict(batch=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=n_kv_heads, len_q=len_q, len_k=len_k,
                head_dim=draw(st.sampled_from([16, 32])), causal=True, scale=draw(st.sampled_from([None, 0.3])),
                layout=draw(st.sampled_from(["contiguous", "transposed"])), window=window)


@settings(max_examples=6, deadline=None)
@given(case=windowed_cases(), seed=st.integers(0, 2**16))
def test_windowed_float32_matches_reference(case, seed):
    check_float32(case, seed)


@pytest.mark.parametrize("blocks,len_q,len_k,windows", [
    ((16, 32), 21, 67, (1, 16, 17, 33)),  # a ragged chunk after a cache
    ((16, 32), 48, 48, (15, 32)),         # a training shape
    ((32, 16), 40, 53, (16, 31)),
], ids=["m16n32-chunk", "m16n32-train", "m32n16-chunk"])
def test_windows_around_block_edges(monkeypatch, blocks, len_q, len_k, windows):
    """Which blocks a window skips, masks or takes whole depends on where its lower edge falls: windows on both
    sides of both block sizes (GQA)."""
    use_blocks(monkeypatch, *blocks)
    for window in windows:
        check_float32(dict(_case(len_q, len_k, True, n_heads=2, n_kv_heads=1, head_dim=16), window=window),
                      seed=window)


def test_keys_behind_the_window_do_not_count():
    """Keys that fell out of a query's window must not matter at all, even when huge: its results stay bit-equal."""
    q, k, v, dout = make_inputs(_case(20, 50, True), torch.float32, seed=0)
    # window 8: the last query (position 49) sees keys 42..49, the one before it also key 41
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :42], v2[:, :, :42] = 1e4, 1e4
    before = flash_attention(q, k, v, dout, causal=True, scale=0.2, window=8)
    after = flash_attention(q, k2, v2, dout, causal=True, scale=0.2, window=8)
    for name, b, a in zip(["out", "lse", "dq"], before[:3], after[:3], strict=True):
        assert torch.equal(b[:, :, -1], a[:, :, -1]), name
        assert not torch.equal(b[:, :, -2], a[:, :, -2]), name


def test_windowed_rows_of_very_negative_scores_stay_finite():
    """Every score of the late rows far below 0 (exp of them underflows): the running max must stay the true one
    after the masked blocks where a row saw no key yet, or the softmax sums to 0 and the row becomes NaN."""
    axis = torch.zeros(16)
    axis[0] = 30.0
    k = axis.expand(1, 1, 64, 16).contiguous()
    q, v, dout = -k, torch.randn(1, 1, 64, 16), torch.randn(1, 1, 64, 16)
    got = flash_attention(q, k, v, dout, causal=True, scale=0.25, window=20)
    want = reference_attention(q, k, v, dout, causal=True, scale=0.25, window=20)
    assert want[1].max() < -200  # lse: the scores are -225 for every key
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3, msg=lambda m, n=name: f"{n}: {m}")


def test_window_of_one_is_each_querys_own_value():
    q, k, v, dout = make_inputs(_case(33, 33, True, n_heads=2, n_kv_heads=2, head_dim=16), torch.float32, seed=0)
    out, lse, *_ = flash_attention(q, k, v, dout, causal=True, scale=0.5, window=1)
    torch.testing.assert_close(out, v, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, 0.5 * (q * k).sum(-1), rtol=1e-6, atol=1e-6)


def test_bad_windows_are_one_line_errors():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="window must be 0 .none. or >= 1 with causal=True, got 3"):
        flash_attn_fwd(q, q, q, causal=False, scale=1.0, window=3)
