"""Attention: the reference against an independent naive formula, every backend against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.attention import attention, attention_reference
from archlab.kernels.backend import BACKENDS, resolve_backend, triton_interpreting

LENGTHS = [1, 2, 3, 5, 8, 13, 16, 31, 61]  # 1, primes, and a few that fill blocks exactly


def naive_attention(q, k, v, *, causal, scale=None, window=None):
    """Softmax attention written independently of the reference, in the inputs' own dtype."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        len_q, len_k = q.shape[2], k.shape[2]
        query_position = torch.arange(len_k - len_q, len_k, device=q.device)[:, None]
        key_position = torch.arange(len_k, device=q.device)[None, :]
        scores = scores.masked_fill(key_position > query_position, float("-inf"))
        if window is not None:
            scores = scores.masked_fill(key_position <= query_position - window, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def random_qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, dtype=torch.float32, layout="contiguous"):
    """Leaf tensors (B, H, L, D); `transposed` and `sliced` layouts give non-contiguous strides."""
    def make(heads, length):
        if layout == "transposed":
            return torch.randn(batch, length, heads, head_dim).to(dtype).transpose(1, 2)
        if layout == "sliced":
            return torch.randn(batch, heads, length, 2 * head_dim).to(dtype)[..., ::2]
        return torch.randn(batch, heads, length, head_dim).to(dtype)
    tensors = make(n_heads, len_q), make(n_kv_heads, len_k), make(n_kv_heads, len_k)
    return [t.requires_grad_() for t in tensors]


def output_and_grads(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


# -- the reference is right ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_heads,n_kv_heads,len_q,len_k", [(2, 2, 5, 5), (4, 2, 3, 7), (3, 1, 1, 4)])
def test_reference_matches_naive_and_gradcheck(causal, n_heads, n_kv_heads, len_q, len_k):
    torch.manual_seed(0)
    q, k, v = random_qkv(2, n_heads, n_kv_heads, len_q, len_k, 4, dtype=torch.float64)
    dout = torch.randn(2, n_heads, len_q, 4, dtype=torch.float64)
    ref = output_and_grads(lambda *a, **kw: attention_reference(*a, **kw)[0], q, k, v, dout, causal=causal)
    naive = output_and_grads(naive_attention, q, k, v, dout, causal=causal)
    for got, want in zip(ref, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: attention_reference(*t, causal=causal, scale=0.7)[0], (q, k, v))


def test_reference_lse_is_logsumexp_of_the_masked_scores():
    torch.manual_seed(0)
    q, k, v = random_qkv(2, 4, 2, 3, 6, 8)
    _, lse = attention_reference(q, k, v, causal=True, scale=0.3)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 3)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    # query i sits at position 3 + i of 6: it sees keys 0 .. 3 + i
    expected = torch.stack([scores[:, :, i, : 4 + i].logsumexp(-1) for i in range(3)], dim=-1)
    torch.testing.assert_close(lse, expected)


def test_reference_causal_is_bottom_right_aligned():
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 2, 2, 5, 8))
    out = attention_reference(q, k, v, causal=True)[0]
    # the last query is at the last position and sees every key; the one before it sees all but the last
    torch.testing.assert_close(out[:, :, 1:], attention_reference(q[:, :, 1:], k, v, causal=False)[0])
    first_query_alone = attention_reference(q[:, :, :1], k[:, :, :4], v[:, :, :4], causal=False)[0]
    torch.testing.assert_close(out[:, :, :1], first_query_alone)
    v_changed = v.clone()
    v_changed[:, :, 4] += 1
    changed = attention_reference(q, k, v_changed, causal=True)[0]
    assert torch.equal(changed[:, :, 0], out[:, :, 0]) and not torch.equal(changed[:, :, 1], out[:, :, 1])


@pytest.mark.parametrize("len_q,len_k,window", [(5, 5, 1), (5, 5, 2), (3, 7, 3), (1, 6, 4), (4, 4, 9)])
def test_windowed_reference_matches_naive(len_q, len_k, window):
    torch.manual_seed(0)
    q, k, v = random_qkv(2, 4, 2, len_q, len_k, 4, dtype=torch.float64)
    dout = torch.randn(2, 4, len_q, 4, dtype=torch.float64)
    kw = dict(causal=True, window=window)
    ref = output_and_grads(lambda *a, **kw: attention_reference(*a, **kw)[0], q, k, v, dout, **kw)
    naive = output_and_grads(naive_attention, q, k, v, dout, **kw)
    for got, want in zip(ref, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_a_window_at_least_the_keys_is_full_causal_attention(backend):
    if backend == "triton" and not (torch.cuda.is_available() or triton_interpreting()):
        pytest.skip("the triton backend needs CUDA or Triton's interpreter")
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in random_qkv(1, 2, 1, 6, 9, 16))
    full = attention(q, k, v, causal=True, backend=backend)
    for window in (9, 10, 1000):
        assert torch.equal(attention(q, k, v, causal=True, window=window, backend=backend), full)
    assert not torch.equal(attention(q, k, v, causal=True, window=8, backend=backend), full)


@pytest.mark.parametrize("len_q", [1, 3])
def test_windowed_decoding_queries_match_reference(len_q):
    """A query or a chunk at the end of a long cache (SDPA gets a band mask, also for one query)."""
    torch.manual_seed(0)
    q, k, v = (t.detach() for t in random_qkv(2, 4, 2, len_q, 20, 16))
    got = attention(q, k, v, causal=True, window=5, backend="torch")
    want = naive_attention(q, k, v, causal=True, window=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:, :, -1:], naive_attention(q[:, :, -1:], k[:, :, -5:], v[:, :, -5:], causal=False))


@pytest.mark.parametrize("window,causal,error,message", [
    (0, True, ValueError, "window must be >= 1"),
    (-3, True, ValueError, "window must be >= 1"),
    (2.5, True, TypeError, "window must be an int"),
    (True, True, TypeError, "window must be an int"),
    (4, False, ValueError, "a window needs causal=True"),
])
def test_bad_windows_are_one_line_errors(window, causal, error, message):
    with pytest.raises(error, match=message) as info:
        attention(*_qkv(), causal=causal, window=window)
    assert "\n" not in str(info.value)


# -- backends against the reference ---------------------------------------------------------------------
@st.composite
def attention_cases(draw):
    causal = draw(st.booleans())
    len_k = draw(st.sampled_from(LENGTHS))
    len_q = draw(st.sampled_from([n for n in LENGTHS if n <= len_k] if causal else LENGTHS))
    n_kv_heads = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 3)), n_heads=n_kv_heads * draw(st.integers(1, 3)), n_kv_heads=n_kv_heads,
                len_q=len_q, len_k=len_k, head_dim=draw(st.sampled_from([16, 32, 64, 128])), causal=causal,
                layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])))


def run_case(case, dtype, backend, seed):
    torch.manual_seed(seed)
    causal, layout = case["causal"], case["layout"]
    shape = {k: case[k] for k in ("batch", "n_heads", "n_kv_heads", "len_q", "len_k", "head_dim")}
    q, k, v = random_qkv(**shape, dtype=dtype, layout=layout)
    dout = torch.randn(case["batch"], case["n_heads"], case["len_q"], case["head_dim"]).to(dtype)
    got = output_and_grads(attention, q, k, v, dout, causal=causal, backend=backend)
    # the fp32 reference of the very same (rounded) inputs
    upcast = [t.detach().float() for t in (q, k, v)]
    want = output_and_grads(attention, *upcast, dout.float(), causal=causal, backend="reference")
    return (q, k, v, dout), got, want


@settings(max_examples=100, deadline=None)
@given(case=attention_cases(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, seed):
    """The torch backend (SDPA) against the reference (itself checked against naive_attention above)."""
    _, got, want = run_case(case, torch.float32, "torch", seed)
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=60, deadline=None)
@given(case=attention_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_low_precision_is_as_close_as_low_precision_math(case, dtype, seed):
    """The torch backend may err by at most about what the plain formula computed in `dtype` errs by."""
    inputs, got, want = run_case(case, dtype, "torch", seed)
    plain = output_and_grads(naive_attention, *inputs, causal=case["causal"])
    for name, g, p, w in zip(["out", "dq", "dk", "dv"], got, plain, want, strict=True):
        assert g.dtype == dtype
        plain_error = (p.float() - w).abs().max().item()
        # floor: a few units of rounding of the result itself, for cases where plain math happens to be exact
        floor = 4 * torch.finfo(dtype).eps * max(w.abs().max().item(), 1.0)
        error = (g.float() - w).abs().max().item()
        assert error <= 2 * plain_error + floor, f"{name}: error {error:.3g} vs plain {dtype} math {plain_error:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "peer"])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_match_reference(backend, causal):
    torch.manual_seed(0)
    q, k, v = (t.detach().cuda() for t in random_qkv(2, 8, 2, 256, 384, 64, dtype=torch.bfloat16))
    dout = torch.randn_like(q)
    got = output_and_grads(attention, q, k, v, dout, causal=causal, backend=backend)
    upcast = [t.float() for t in (q, k, v, dout)]
    want = output_and_grads(attention, *upcast, causal=causal, backend="reference")
    plain = output_and_grads(naive_attention, q, k, v, dout, causal=causal)
    for g, p, w in zip(got, plain, want, strict=True):
        assert (g.float() - w).abs().max() <= 2 * (p.float() - w).abs().max() + 1e-3


# -- input checks and backend resolution ----------------------------------------------------------------
def _qkv(q_shape=(1, 4, 8, 16), kv_shape=(1, 2, 8, 16), dtype=torch.float32):
    return torch.randn(q_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)


@pytest.mark.parametrize("make,causal,error,message", [
    (lambda: (torch.randn(4, 8, 16), *_qkv()[1:]), False, ValueError, "q must be 4-D"),
    (lambda: _qkv(dtype=torch.float64), False, TypeError, "dtype torch.float64 is not supported"),
    (lambda: (_qkv()[0].half(), *_qkv()[1:]), False, TypeError, "must share one dtype"),
    (lambda: (_qkv()[0].to("meta"), *_qkv()[1:]), False, ValueError, "must be on one device"),
    (lambda: (*_qkv()[:2], torch.randn(1, 2, 9, 16)), False, ValueError, "k and v must have the same shape"),
    (lambda: _qkv(kv_shape=(2, 2, 8, 16)), False, ValueError, "must match in batch and head_dim"),
    (lambda: _qkv(kv_shape=(1, 2, 8, 32)), False, ValueError, "must match in batch and head_dim"),
    (lambda: _qkv(kv_shape=(1, 3, 8, 16)), False, ValueError, r"k/v heads \(3\) must divide q heads \(4\)"),
    (lambda: _qkv(kv_shape=(1, 2, 5, 16)), True, ValueError, "causal needs len_q <= len_k"),
    (lambda: _qkv((1, 4, 8, 15), (1, 2, 8, 15)), False, ValueError, "head_dim must be even and at most 256"),
    (lambda: _qkv((1, 4, 8, 512), (1, 2, 8, 512)), False, ValueError, "head_dim must be even and at most 256"),
])
def test_bad_inputs_are_one_line_errors(make, causal, error, message):
    with pytest.raises(error, match=message) as info:
        attention(*make(), causal=causal)
    assert "\n" not in str(info.value)


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("attention", "auto", cpu) == "torch"
    assert resolve_backend("attention", "auto", cuda) == "torch"  # SDPA: no benchmark shows ours as fast yet
    assert resolve_backend("attention", "triton", cuda) == "triton"
    assert resolve_backend("attention", "peer", cuda) == "peer"
    assert resolve_backend("attention", "reference", cpu) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("attention", "triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="'triton' backend for attention runs on CUDA, or on cpu only under"):
        resolve_backend("attention", "triton", cpu)
    with pytest.raises(ValueError, match="'peer' backend .* CUDA kernels"):
        resolve_backend("attention", "peer", cpu)
    with pytest.raises(ValueError, match="unknown backend 'flash' for attention; choose from " + ", ".join(BACKENDS)):
        resolve_backend("attention", "flash", cpu)
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        resolve_backend("conv", "auto", cpu)
    with pytest.raises(ValueError, match="'peer' backend"):
        attention(*_qkv(), causal=True, backend="peer")


def naive_masked(q, k, v, mask):
    """Softmax attention over the keys `mask` (broadcast to (B, H, Lq, Lk)) shows, written independently."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@settings(max_examples=20, deadline=None)
@given(len_q=st.integers(1, 12), len_k=st.integers(1, 12), kv_heads=st.sampled_from([1, 2]),
       per_row=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_explicit_mask_matches_naive_on_every_cpu_backend(len_q, len_k, kv_heads, per_row, seed):
    """Any pattern of visible keys (each query sees one at least), 2-D or per row, GQA or not, forward and grads."""
    torch.manual_seed(seed)
    q, k, v = random_qkv(2, 2, kv_heads, len_q, len_k, 8)
    mask = torch.rand((2, 1, len_q, len_k) if per_row else (len_q, len_k)) < 0.5
    mask[..., torch.arange(len_q), torch.randint(0, len_k, (len_q,))] = True
    expected = naive_masked(q, k, v, mask)
    grads = torch.autograd.grad(expected.sum(), (q, k, v))
    for backend in ("reference", "torch"):
        out = attention(q, k, v, causal=False, mask=mask, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_an_explicit_mask_runs_sdpa_under_auto_and_triton_refuses_it(monkeypatch):
    import archlab.kernels.attention as attention_module

    q, k, v = random_qkv(1, 2, 2, 16, 16, 16, dtype=torch.bfloat16)  # what auto gives our kernel on a GPU
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    monkeypatch.setattr(attention_module, "resolve_backend", lambda *args: "triton")
    torch.testing.assert_close(attention(q, k, v, causal=False, mask=mask).float(),  # auto: SDPA with the mask
                               attention_reference(q, k, v, causal=True)[0].float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="the triton backend takes no explicit mask"):
        attention(q, k, v, causal=False, mask=mask, backend="triton")


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(mask=torch.ones(4, 4)), TypeError, "mask must be a bool tensor"),
    (dict(mask=torch.ones(4, 4, dtype=torch.bool), causal=True), ValueError, "an explicit mask comes alone"),
    (dict(mask=torch.ones(4, 4, dtype=torch.bool), seq_idx=torch.zeros(1, 4, dtype=torch.int32)), ValueError,
     "an explicit mask comes alone"),
    (dict(mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, r"mask of shape \(3, 4\) does not broadcast"),
])
def test_bad_masks_are_one_line_errors(kwargs, error, message):
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8)
    kwargs = {"causal": False} | kwargs
    with pytest.raises(error, match=message) as caught:
        attention(q, k, v, **kwargs)
    assert "\n" not in str(caught.value)
