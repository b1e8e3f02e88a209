"""The gated delta rule: the chunked torch backend against the sequential reference (every gradient, also through
the final state), packed batches, chunk edges, a float64 gradcheck, state chaining, decoding steps, the peer's
arguments and input checks. tests/kernels/test_conformance.py adds drawn cases through the public op."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels import gated_delta as gated_delta_module
from archlab.kernels.backend import resolve_backend
from archlab.kernels.gated_delta import gated_delta_rule, gated_delta_state_update
from archlab.kernels.gated_delta.chunked import gated_delta_chunked
from archlab.kernels.gated_delta.reference import gated_delta_reference, l2norm

STREAMS = ("q", "k", "v", "g", "beta")
CHUNK_SIZES = (1, 2, 4, 8, 16)


def make_inputs(batch, length, heads, value_heads, key_dim, value_dim, *, n_states=None, with_initial=True,
                decay_shift=2.0, seed=0, dtype=torch.float32):
    """Leaf tensors keyed like the op's arguments: k unit length (beta |k|^2 <= 1 keeps the state bounded),
    g = logsigmoid(normal + decay_shift) < 0, beta in (0, 1); states float32."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    tensors = dict(q=randn(batch, length, heads, key_dim), k=l2norm(randn(batch, length, heads, key_dim)),
                   v=randn(batch, length, value_heads, value_dim),
                   g=F.logsigmoid(randn(batch, length, value_heads) + decay_shift),
                   beta=torch.sigmoid(randn(batch, length, value_heads)))
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    tensors["initial_state"] = randn(n_states or batch, value_heads, key_dim, value_dim).to(state_dtype) \
        if with_initial else None
    return {k: None if v is None else v.requires_grad_() for k, v in tensors.items()}


def fresh(inputs):
    """Detached copies that require grad again, so two runs never share .grad."""
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in inputs.items()}


def run(fn, inputs, *, seed=1, **kwargs):
    """(o, final state, {name: grad}) of a fixed random projection of both outputs: gradients reach every input
    through the output and through the final state."""
    leaves = fresh(inputs)
    o, final = fn(*(leaves[n] for n in STREAMS), initial_state=leaves["initial_state"], **kwargs)
    gen = torch.Generator().manual_seed(seed)
    ((o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
     ).backward()
    return o.detach(), final.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_same(got, want, atol=1e-5, rtol=1e-4):
    (o_g, final_g, grads_g), (o_w, final_w, grads_w) = got, want
    torch.testing.assert_close(o_g, o_w, atol=atol, rtol=rtol)
    torch.testing.assert_close(final_g, final_w, atol=atol, rtol=rtol)
    assert grads_g.keys() == grads_w.keys()
    for name in grads_g:
        assert grads_g[name] is not None, f"no gradient reaches {name}"
        torch.testing.assert_close(grads_g[name], grads_w[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def chunked(chunk_size):
    return lambda *args, **kwargs: gated_delta_chunked(*args, **kwargs, chunk_size=chunk_size)


# -- the chunked form against the definition ----------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_chunked_matches_reference_with_every_gradient(data):
    """Lengths on both sides of one and two chunks (padding, carries between chunks), grouped value heads, with and
    without an initial state, default and explicit scale."""
    chunk_size = data.draw(st.sampled_from(CHUNK_SIZES))
    length = data.draw(st.sampled_from(sorted({n for n in (1, 7, chunk_size - 1, chunk_size, chunk_size + 1,
                                                           2 * chunk_size + 1) if n >= 1})))
    heads = data.draw(st.sampled_from([1, 2]))
    inputs = make_inputs(data.draw(st.integers(1, 2)), length, heads, heads * data.draw(st.sampled_from([1, 2])),
                         data.draw(st.sampled_from([4, 8])), data.draw(st.sampled_from([3, 8])),
                         with_initial=data.draw(st.booleans()), seed=data.draw(st.integers(0, 2**16)))
    scale = data.draw(st.sampled_from([None, 0.7]))
    assert_same(run(chunked(chunk_size), inputs, scale=scale), run(gated_delta_reference, inputs, scale=scale))


@settings(max_examples=15, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=4), chunk_size=st.sampled_from(CHUNK_SIZES),
       seed=st.integers(0, 2**16))
def test_packed_batch_equals_each_sequence_alone(lengths, chunk_size, seed):
    """Outputs, per-sequence final states and every gradient (each sequence from its own initial state): boundaries
    inside chunks, on chunk edges, next to each other, a single sequence."""
    inputs = make_inputs(1, sum(lengths), 1, 2, 4, 3, n_states=len(lengths), seed=seed)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = run(chunked(chunk_size), inputs, cu_seqlens=cu_seqlens)

    gen = torch.Generator().manual_seed(1)  # the same projections as run()'s, cut per sequence
    o_proj, final_proj = torch.randn(packed[0].shape, generator=gen), torch.randn(packed[1].shape, generator=gen)
    leaves = fresh(inputs)
    bounds = cu_seqlens.tolist()
    outs, finals = [], []
    for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        o, final = gated_delta_chunked(*(leaves[name][:, s:e] for name in STREAMS),
                                       initial_state=leaves["initial_state"][n:n + 1], chunk_size=chunk_size)
        ((o * o_proj[:, s:e]).sum() + (final * final_proj[n:n + 1]).sum()).backward()
        outs.append(o.detach())
        finals.append(final.detach())
    assert_same(packed, (torch.cat(outs, dim=1), torch.cat(finals), {k: v.grad for k, v in leaves.items()}))


def test_packed_reference_resets_at_boundaries():
    """The definition itself: the second sequence of a pack gives what it gives alone from its own state."""
    inputs = {k: v.detach() for k, v in make_inputs(1, 9, 1, 1, 4, 3, n_states=2).items()}
    o, final = gated_delta_reference(*(inputs[n] for n in STREAMS), initial_state=inputs["initial_state"],
                                     cu_seqlens=torch.tensor([0, 4, 9]))
    o_alone, final_alone = gated_delta_reference(*(inputs[n][:, 4:] for n in STREAMS),
                                                 initial_state=inputs["initial_state"][1:])
    torch.testing.assert_close(o[:, 4:], o_alone)
    torch.testing.assert_close(final[1:], final_alone)


def test_chunked_backward_passes_gradcheck_in_float64():
    inputs = make_inputs(1, 5, 1, 2, 3, 2, dtype=torch.float64)
    leaves = [inputs[n] for n in (*STREAMS, "initial_state")]

    def op(q, k, v, g, beta, initial_state):
        return gated_delta_chunked(q, k, v, g, beta, 0.8, initial_state, chunk_size=2)

    assert torch.autograd.gradcheck(op, leaves)


def test_long_sequence_with_strong_decay_stays_finite_and_exact():
    """exp(G_i - G_j) is formed only where j <= i: with g near -30 per position, the other half would overflow."""
    inputs = make_inputs(1, 150, 1, 1, 4, 4, decay_shift=-30.0)
    got, want = run(chunked(64), inputs), run(gated_delta_reference, inputs)
    assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2].values()))
    assert_same(got, want)


# -- the public op ------------------------------------------------------------------------------------------------
def test_auto_runs_torch_on_cpu_and_normalises_q_and_k_as_the_definition():
    assert resolve_backend("gated_delta", "auto", torch.device("cpu")) == "torch"
    inputs = make_inputs(2, 70, 2, 4, 8, 4)
    inputs["k"] = (inputs["k"].detach() * 3).requires_grad_()  # l2norm must undo this
    got = run(gated_delta_rule, inputs, use_qk_l2norm=True, output_final_state=True, scale=0.5)
    assert_same(got, run(gated_delta_reference, inputs, use_qk_l2norm=True, scale=0.5))
    o = gated_delta_rule(*(inputs[n] for n in STREAMS))
    assert o.shape == (2, 70, 4, 4) and o.dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("split", [1, 15, 16, 17])
def test_final_state_continues_the_sequence(backend, split):
    """[0:a] then [a:L] from the first part's final state equals the whole (the torch backend's chunk is capped at
    the length's next power of two: 16 for a part of 15 or 16 positions), and gradients flow through the state."""
    inputs = make_inputs(1, 33, 1, 2, 4, 3)
    options = dict(output_final_state=True, backend=backend)
    whole = run(gated_delta_rule, inputs, **options)
    leaves = fresh(inputs)
    first_o, first_final = gated_delta_rule(*(leaves[n][:, :split] for n in STREAMS),
                                            initial_state=leaves["initial_state"], **options)
    second_o, final = gated_delta_rule(*(leaves[n][:, split:] for n in STREAMS), initial_state=first_final, **options)
    o = torch.cat([first_o, second_o], dim=1)
    gen = torch.Generator().manual_seed(1)
    ((o * torch.randn(o.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
     ).backward()
    assert_same((o.detach(), final.detach(), {k: v.grad for k, v in leaves.items()}), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_equal_the_full_op(dtype):
    inputs = {k: v.detach() for k, v in make_inputs(2, 11, 2, 4, 8, 4).items()}
    streams = {n: inputs[n].to(dtype) for n in STREAMS}
    options = dict(scale=0.4, use_qk_l2norm=True)
    o, final = gated_delta_rule(*streams.values(), initial_state=inputs["initial_state"], output_final_state=True,
                                backend="torch", **options)
    state = inputs["initial_state"].clone()
    steps = [gated_delta_state_update(state, *(streams[n][:, t] for n in STREAMS), **options) for t in range(11)]
    assert all(step.dtype == dtype for step in steps)
    tolerance = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(torch.stack(steps, dim=1), o, **tolerance)
    torch.testing.assert_close(state, final)


def test_the_peer_gets_fla_arguments(monkeypatch):
    """fla's chunk_gated_delta_rule (a stand-in here) gets int64 cu_seqlens, the l2norm flag and is asked for the
    final state, which comes back float32; without fla the peer says how to install it."""
    calls = []

    def chunk_gated_delta_rule(q, k, v, g, beta, **kwargs):
        calls.append(kwargs)
        o, final = gated_delta_reference(q, k, v, g, beta, kwargs["scale"], kwargs["initial_state"],
                                         kwargs["cu_seqlens"], kwargs["use_qk_l2norm_in_kernel"])
        return o, final.to(torch.bfloat16)

    monkeypatch.setattr(gated_delta_module, "resolve_backend", lambda op, backend, device, dtype: backend)
    inputs = {k: v.detach() for k, v in make_inputs(1, 9, 1, 1, 4, 3, n_states=2).items()}
    args = dict(initial_state=inputs["initial_state"], cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
                use_qk_l2norm=True, output_final_state=True)
    monkeypatch.setitem(sys.modules, "fla", None)
    with pytest.raises(ImportError, match="the 'peer' backend for gated_delta needs fla .*pip install --no-deps "
                                          "fla-core"):
        gated_delta_rule(*(inputs[n] for n in STREAMS), **args, backend="peer")
    fake = types.SimpleNamespace(chunk_gated_delta_rule=chunk_gated_delta_rule)
    for name, module in (("fla", types.ModuleType("fla")), ("fla.ops", types.ModuleType("fla.ops")),
                         ("fla.ops.gated_delta_rule", fake)):
        monkeypatch.setitem(sys.modules, name, module)
    o, final = gated_delta_rule(*(inputs[n] for n in STREAMS), **args, backend="peer")
    want_o, want_final = gated_delta_rule(*(inputs[n] for n in STREAMS), **args, backend="reference")
    assert calls[0]["cu_seqlens"].dtype == torch.int64 and calls[0]["use_qk_l2norm_in_kernel"]
    assert calls[0]["output_final_state"] and final.dtype == torch.float32
    torch.testing.assert_close(o, want_o)
    torch.testing.assert_close(final, want_final, atol=1e-2, rtol=1e-2)


# -- input checks: one line each, before any work -----------------------------------------------------------------
def _bad(**changes):
    base = {k: v.detach() for k, v in make_inputs(1, 6, 2, 4, 8, 4).items()}
    return {**base, **changes}


def _call_with(inputs: dict, **options):
    streams = [inputs.pop(n) for n in STREAMS]
    return gated_delta_rule(*streams, **inputs, **options)


def _cu(*bounds, dtype=torch.int32):
    return torch.tensor(bounds, dtype=dtype)


BAD_INPUTS = [
    ("heads must divide value heads", dict(v=torch.randn(1, 6, 3, 4), g=torch.rand(1, 6, 3), beta=torch.rand(1, 6, 3),
                                           initial_state=None),
     "gated_delta: q and k have 2 heads, which must divide v's value_heads=3"),
    ("q without heads", dict(q=torch.randn(1, 6, 8)), r"gated_delta: expected q, k \(batch, length, heads, key_dim\)"),
    ("g without value heads", dict(g=torch.rand(1, 6)), "gated_delta: expected q, k"),
    ("k unlike q", dict(k=torch.randn(1, 6, 2, 4)), r"gated_delta: k must have q's shape \(1, 6, 2, 8\)"),
    ("v of another length", dict(v=torch.randn(1, 5, 4, 4)), r"gated_delta: v must be \(1, 6, 'value_heads'"),
    ("g per head", dict(g=torch.rand(1, 6, 2)), r"gated_delta: g must be \(1, 6, 4\), one value per value head, got "
                                                r"\(1, 6, 2\)"),
    ("beta of another length", dict(beta=torch.rand(1, 5, 4)), r"gated_delta: beta must be \(1, 6, 4\)"),
    ("g infinite", dict(g=torch.full((1, 6, 4), -torch.inf)), "gated_delta: g .* has non-finite values"),
    ("g nan", dict(g=torch.full((1, 6, 4), torch.nan)), "gated_delta: g .* has non-finite values"),
    ("scale a string", dict(scale="0.1"), "gated_delta: scale must be a number or None, got str"),
    ("initial state without value_dim", dict(initial_state=torch.randn(1, 4, 8)),
     r"gated_delta: initial_state must be \(batch or n_sequences, value_heads, key_dim, value_dim\) = \(1, 4, 8, 4\)"),
    ("initial state transposed", dict(initial_state=torch.randn(1, 4, 4, 8)), "gated_delta: initial_state must be"),
    ("initial state per batch with packing", dict(cu_seqlens=_cu(0, 2, 6)),
     r"initial_state must be .* = \(2, 4, 8, 4\), got \(1, 4, 8, 4\)"),
    ("float64 q", dict(q=torch.randn(1, 6, 2, 8, dtype=torch.float64)), "gated_delta: q has dtype torch.float64"),
    ("int beta", dict(beta=torch.ones(1, 6, 4, dtype=torch.int64)), "gated_delta: beta has dtype torch.int64"),
    ("float64 initial state", dict(initial_state=torch.randn(1, 4, 8, 4, dtype=torch.float64)),
     "gated_delta: initial_state has dtype torch.float64"),
    ("empty", dict(v=torch.randn(1, 6, 4, 0), initial_state=None), "gated_delta: empty inputs"),
    ("float cu_seqlens", dict(cu_seqlens=torch.tensor([0.0, 6.0]), initial_state=None),
     "gated_delta: cu_seqlens must be a 1-D int32 or int64 tensor"),
    ("2-D cu_seqlens", dict(cu_seqlens=_cu(0, 6)[None], initial_state=None), "must be a 1-D int32 or int64 tensor"),
    ("cu_seqlens not from 0", dict(cu_seqlens=_cu(1, 6, dtype=torch.int64), initial_state=None),
     "gated_delta: cu_seqlens must rise strictly from 0 to the packed length 6"),
    ("cu_seqlens short of the length", dict(cu_seqlens=_cu(0, 2, 5), initial_state=None),
     r"to the packed length 6 \(no empty sequences\), got \[0, 2, 5\]"),
    ("empty sequence", dict(cu_seqlens=_cu(0, 2, 2, 6), initial_state=None), "no empty sequences"),
    ("cu_seqlens with batch 2", dict(q=torch.randn(2, 6, 2, 8), k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 4, 4),
                                     g=torch.zeros(2, 6, 4), beta=torch.rand(2, 6, 4), initial_state=None,
                                     cu_seqlens=_cu(0, 6)),
     "gated_delta: with cu_seqlens the sequences are packed in a batch of 1, got batch 2"),
    ("q not a tensor", dict(q=[[1.0]]), "gated_delta: q must be a torch.Tensor, got list"),
    ("unknown backend", dict(backend="cuda"), "unknown backend 'cuda' for gated_delta"),
]


@pytest.mark.parametrize("changes,message", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_inputs_fail_in_one_line(changes, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        _call_with(_bad(**changes))
    assert "\n" not in str(error.value)


def test_head_dims_past_the_triton_kernel_fail_in_one_line_or_auto_takes_torch(monkeypatch):
    """As on a GPU without fla, where auto resolves to triton."""
    monkeypatch.setattr(gated_delta_module, "resolve_backend",
                        lambda op, backend, device, dtype: "triton" if backend in ("auto", "triton") else backend)
    wide = _bad(v=torch.randn(1, 6, 4, 257), initial_state=None)
    with pytest.raises(ValueError, match="gated_delta: the triton backend takes key_dim and value_dim up to 256, got "
                                         "key_dim=8, value_dim=257; use backend auto or torch"):
        _call_with(dict(wide), backend="triton")
    torch.testing.assert_close(_call_with(dict(wide), backend="auto"), _call_with(dict(wide), backend="reference"))


def test_a_decode_step_under_autocast_keeps_float32_products():
    """Sampling runs under the trainer's autocast: the state's update must not take bf16 matmul products."""
    inputs = {k: v.detach() for k, v in make_inputs(2, 1, 2, 4, 64, 64).items()}
    steps = []
    for autocast in (False, True):
        state = inputs["initial_state"].clone()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o = gated_delta_state_update(state, *(inputs[n][:, 0] for n in STREAMS), use_qk_l2norm=True)
        steps.append((o, state))
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=0)


def test_peer_needs_cuda():
    with pytest.raises(ValueError, match="the 'peer' backend for gated_delta runs third-party CUDA kernels"):
        _call_with(_bad(), backend="peer")


def test_bad_decode_inputs_fail_in_one_line():
    q, k, v, g, beta = torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 2, 4), torch.rand(2, 2), \
        torch.rand(2, 2)
    for state, g_, message in [
            (torch.zeros(2, 2, 8, 4, dtype=torch.bfloat16), g, "gated_delta_state_update: state must be float32"),
            (torch.zeros(2, 2, 4, 8), g, r"state must be float32 of shape \(2, 2, 8, 4\)"),
            (torch.zeros(2, 2, 8, 4), torch.rand(2, 1), r"gated_delta_state_update: g must be \(2, 2\), one value per "
                                                        r"value head, got \(2, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            gated_delta_state_update(state, q, k, v, g_, beta)
        assert "\n" not in str(error.value)
