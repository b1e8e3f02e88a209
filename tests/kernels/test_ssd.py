"""SSD (Mamba-2): the chunked torch backend against the sequential reference, packed sequences, state chaining,
decoding, input checks and torch.compile. tests/kernels/test_conformance.py adds hypothesis-drawn cases."""
import math

import pytest
import torch

from archlab.kernels.backend import resolve_backend
from archlab.kernels.ssd import ssd, ssd_state_update
from archlab.kernels.ssd.chunk_scan import decays, reaches
from archlab.kernels.ssd.chunked import ssd_chunked

DIFFERENTIABLE = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(batch, length, heads, head_dim, groups, n_state, *, D_shape="per head", with_z=True, with_bias=True,
                with_initial=False, decay_scale=1.0, seed=0):
    """Leaf tensors keyed like ssd's arguments, float32; dt >= 0 so every decay exp(dt A) is <= 1."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    D = {"per head": randn(heads), "per head and channel": randn(heads, head_dim), None: None}[D_shape]
    tensors = dict(x=randn(batch, length, heads, head_dim), dt=randn(batch, length, heads).abs() * 0.5,
                   A=-(torch.rand(heads, generator=gen) * 2 + 0.1) * decay_scale,
                   B=randn(batch, length, groups, n_state), C=randn(batch, length, groups, n_state), D=D,
                   z=randn(batch, length, heads, head_dim) if with_z else None,
                   dt_bias=torch.rand(heads, generator=gen) * 0.5 if with_bias else None,
                   initial_states=randn(batch, heads, head_dim, n_state) if with_initial else None)
    return {k: None if v is None else v.requires_grad_() for k, v in tensors.items()}


def fresh(inputs):
    """Detached copies that require grad again, so two runs never share .grad."""
    return {k: None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}


def run(inputs, *, seed=1, **kwargs):
    """(out, final states, {name: grad}) of a fixed random projection of both outputs: gradients reach the inputs
    through the output and the final states."""
    leaves = fresh(inputs)
    out, final = ssd(**leaves, return_final_states=True, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
    loss.backward()
    return out.detach(), final.detach(), {k: v.grad for k, v in leaves.items() if v is not None}


def assert_same(got, want, atol=1e-5, rtol=1e-4):
    out_g, final_g, grads_g = got
    out_w, final_w, grads_w = want
    torch.testing.assert_close(out_g, out_w, atol=atol, rtol=rtol)
    torch.testing.assert_close(final_g, final_w, atol=atol, rtol=rtol)
    assert grads_g.keys() == grads_w.keys()
    for name in grads_g:
        torch.testing.assert_close(grads_g[name], grads_w[name], atol=atol, rtol=rtol,
                                   msg=lambda m, n=name: f"d{n}: {m}")


# -- the definition, by hand ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_two_steps_worked_out_by_hand(backend):
    """One head, head_dim 1, state 1: pins down what both backends share (dt's bias, softplus and clamp, D, the silu
    gate, the initial state), which comparing them with each other cannot."""
    x, dt_raw, A, B, C, D, z, bias, h0 = [2.0, -1.0], [0.5, 2.0], -0.7, [1.0, 2.0], [3.0, 1.0], 0.5, [1.0, -0.5], \
        0.25, 0.3
    dt = [min(max(math.log1p(math.exp(d + bias)), 0.1), 2.0) for d in dt_raw]  # the upper limit clips step 2
    h1 = math.exp(dt[0] * A) * h0 + dt[0] * x[0] * B[0]
    h2 = math.exp(dt[1] * A) * h1 + dt[1] * x[1] * B[1]
    want = [(h * c + D * xi) * zi / (1 + math.exp(-zi)) for h, c, xi, zi in zip((h1, h2), C, x, z, strict=True)]

    def column(values, *shape):
        return torch.tensor(values).reshape(*shape)

    out, final = ssd(column(x, 1, 2, 1, 1), column(dt_raw, 1, 2, 1), torch.tensor([A]), column(B, 1, 2, 1, 1),
                     column(C, 1, 2, 1, 1), D=torch.tensor([D]), z=column(z, 1, 2, 1, 1), dt_bias=torch.tensor([bias]),
                     dt_softplus=True, dt_limit=(0.1, 2.0), initial_states=column([h0], 1, 1, 1, 1), chunk_size=2,
                     return_final_states=True, backend=backend)
    torch.testing.assert_close(out.flatten(), torch.tensor(want))
    torch.testing.assert_close(final.flatten(), torch.tensor([h2]))


# -- chunked vs the sequential definition -----------------------------------------------------------------------
@pytest.mark.parametrize("length,chunk_size", [(1, 8), (7, 8), (8, 8), (9, 8), (13, 4), (33, 16), (100, 64),
                                               (5, 1), (64, 64)])
@pytest.mark.parametrize("D_shape", ["per head", "per head and channel", None])
def test_chunked_matches_reference(length, chunk_size, D_shape):
    inputs = make_inputs(2, length, 4, 3, 2, 5, D_shape=D_shape, with_initial=True)
    options = dict(dt_softplus=True, dt_limit=(0.05, 1.5), chunk_size=chunk_size)
    assert_same(run(inputs, backend="torch", **options), run(inputs, backend="reference", **options))


@pytest.mark.parametrize("length,chunk_size,runs_with", [(10, 256, 16), (16, 256, 16), (17, 32, 32), (1, 64, 1),
                                                     (100, 64, 64)])
def test_torch_backend_caps_the_chunk_at_the_sequence(monkeypatch, length, chunk_size, runs_with):
    """A chunk past the next power of two of the length would only add padding (the mixer's default is 256)."""
    import archlab.kernels.ssd as ssd_module

    seen = []
    chunked = ssd_module.ssd_chunked
    monkeypatch.setattr(ssd_module, "ssd_chunked", lambda *a, **k: seen.append(k["chunk_size"]) or chunked(*a, **k))
    inputs = make_inputs(1, length, 2, 2, 1, 3)
    assert_same(run(inputs, backend="torch", chunk_size=chunk_size), run(inputs, backend="reference"))
    assert seen == [runs_with]


def test_long_sequence_with_strong_decay_stays_finite_and_exact():
    """exp is only taken of segment sums <= 0: 300 positions at decay rates up to exp(-30) neither overflow nor
    lose the recent inputs."""
    inputs = make_inputs(1, 300, 2, 2, 1, 4, decay_scale=30.0, with_initial=True)
    assert_same(run(inputs, backend="torch", chunk_size=64), run(inputs, backend="reference"))


# -- the torch backend's hand-derived backward and factored decays ---------------------------------------------
@pytest.mark.parametrize("length,chunk_size,groups,packed", [(7, 4, 1, False), (9, 16, 2, False), (20, 16, 1, True),
                                                             (5, 1, 2, True)])
def test_chunked_backward_passes_gradcheck_in_float64(length, chunk_size, groups, packed):
    """Finite differences in float64 (ssd_chunked computes in float64 for float64 inputs) through both outputs, on
    random projections (fast mode): several chunks with a tail, 16-position chunks (two decay blocks), groups, packed
    sequences, chunk size 1."""
    inputs = {k: None if v is None else v.detach().double().requires_grad_()
              for k, v in make_inputs(1, length, 2 * groups, 2, groups, 3, with_initial=not packed).items()}
    names = [k for k, v in inputs.items() if v is not None]
    cu_seqlens = torch.tensor([0, 1, length // 2, length], dtype=torch.int32) if packed else None

    def outputs(*tensors):
        return ssd_chunked(**dict(zip(names, tensors, strict=True)), dt_softplus=True, dt_limit=(0.05, 1.5),
                           cu_seqlens=cu_seqlens, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(outputs, [inputs[k] for k in names], fast_mode=True)


@pytest.mark.parametrize("length,chunk_size,with_initial", [(8, 8, False), (8, 8, True), (20, 8, False),
                                                               (20, 8, True), (5, 16, True)])
def test_gradients_through_the_output_alone(length, chunk_size, with_initial):
    """With the final state unused (training) the backward leaves out the last chunk's end state, and without an
    initial state the first chunk's carried-in term: one chunk and several, with and without initial states."""
    inputs = make_inputs(2, length, 4, 3, 2, 5, with_initial=with_initial)
    grads = {}
    for backend in ("torch", "reference"):
        leaves = fresh(inputs)
        out = ssd(**leaves, dt_softplus=True, chunk_size=chunk_size, backend=backend)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads[backend] = {k: v.grad for k, v in leaves.items() if v is not None}
    for name, grad in grads["torch"].items():
        torch.testing.assert_close(grad, grads["reference"][name], atol=1e-5, rtol=1e-4,
                                   msg=lambda m, n=name: f"d{n}: {m}")


def test_double_backward_of_the_chunked_path_is_refused():
    leaves = fresh(make_inputs(1, 6, 2, 2, 1, 3))
    out = ssd(**leaves, chunk_size=4, backend="torch")
    (grad_x,) = torch.autograd.grad(out.square().sum(), leaves["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        grad_x.sum().backward()


def test_autocast_leaves_the_chunked_path_in_float32():
    """Under CPU bfloat16 autocast (where a Mamba-2 mixer calls it) the matmuls still run in float32."""
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(2, 40, 4, 8, 1, 16).items()}
    plain = ssd(**inputs, chunk_size=16, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = ssd(**inputs, chunk_size=16, backend="torch")
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 8, 16, 64])
def test_factored_decays_equal_the_direct_exponentials(chunk_size):
    """decays() forms exp(s_i - s_j) from 8 x 8 diagonal blocks and products below them: the same values as the
    direct form (float64), exactly 0 where an input does not reach a position, never more than 1."""
    gen = torch.Generator().manual_seed(chunk_size)
    a = -torch.rand(2, 3, 2, chunk_size, generator=gen, dtype=torch.float64) * 3       # (b c h q): 3 chunks
    s = a.cumsum(-1)
    starts = torch.rand(3 * chunk_size, generator=gen) < 0.15                           # sequence starts anywhere
    sequence = starts.long().cumsum(0).reshape(3, chunk_size)
    position = torch.arange(chunk_size)
    for seq in (None, sequence):
        keep = reaches(seq, position[:, None], position[None, :])                       # (c or 1, q, q)
        direct = torch.exp(s[..., :, None] - s[..., None, :]) * keep[:, None]
        got = decays(s, seq, torch.float64)
        torch.testing.assert_close(got, direct, rtol=1e-12, atol=0)
        assert (got.masked_fill(keep[:, None], 0) == 0).all() and got.max() <= 1


# -- packed sequences ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths,chunk_size", [([1, 5, 1, 16, 17], 8), ([8, 8], 8), ([3], 4), ([2, 30, 1], 16)])
def test_packed_batch_equals_each_sequence_alone(lengths, chunk_size):
    """Outputs, per-sequence final states and every gradient: boundaries inside chunks, on chunk edges, next to each
    other, a single sequence."""
    inputs = make_inputs(1, sum(lengths), 4, 3, 2, 5, D_shape="per head and channel")
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    options = dict(dt_softplus=True, chunk_size=chunk_size, backend="torch")
    packed = run(inputs, cu_seqlens=cu_seqlens, **options)

    outs, finals, grads = [], [], {}
    gen = torch.Generator().manual_seed(1)  # the same projections as run()'s, cut per sequence
    out_proj = torch.randn(packed[0].shape, generator=gen)
    final_proj = torch.randn(packed[1].shape, generator=gen)
    bounds = cu_seqlens.tolist()
    for k, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        leaves = fresh(inputs)
        per_position = {n: leaves[n][:, s:e] for n in ("x", "dt", "B", "C", "z")}
        out, final = ssd(**{**leaves, **per_position}, return_final_states=True, **options)
        ((out * out_proj[:, s:e]).sum() + (final * final_proj[k:k + 1]).sum()).backward()
        outs.append(out.detach())
        finals.append(final.detach())
        for name, leaf in leaves.items():
            if leaf is not None:
                grads[name] = grads.get(name, 0) + leaf.grad
    assert_same(packed, (torch.cat(outs, dim=1), torch.cat(finals), grads))


def test_packed_reference_resets_at_boundaries():
    """The definition itself: the second sequence of a pack gives what it gives alone."""
    inputs = make_inputs(1, 9, 2, 2, 1, 3)
    out, final = ssd(**fresh(inputs), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
                     return_final_states=True, backend="reference")
    alone = {k: v[:, 4:] if k in ("x", "dt", "B", "C", "z") else v for k, v in fresh(inputs).items()}
    out_alone, final_alone = ssd(**alone, return_final_states=True, backend="reference")
    torch.testing.assert_close(out[:, 4:], out_alone)
    torch.testing.assert_close(final[1:], final_alone)


# -- state chaining and decoding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("split", [1, 8, 11, 19])
def test_final_state_continues_the_sequence(backend, split):
    """[0:a] then [a:L] from the first part's final state equals the whole, and gradients flow through the state."""
    inputs = make_inputs(1, 20, 2, 3, 2, 4, with_initial=True)
    options = dict(dt_softplus=True, chunk_size=8, backend=backend)
    whole = run(inputs, **options)

    leaves = fresh(inputs)
    part = {n: leaves[n] for n in ("A", "D", "dt_bias")}
    first_out, first_final = ssd(**part, **{n: leaves[n][:, :split] for n in ("x", "dt", "B", "C", "z")},
                                 initial_states=leaves["initial_states"], return_final_states=True, **options)
    second_out, final = ssd(**part, **{n: leaves[n][:, split:] for n in ("x", "dt", "B", "C", "z")},
                            initial_states=first_final, return_final_states=True, **options)
    out = torch.cat([first_out, second_out], dim=1)
    gen = torch.Generator().manual_seed(1)
    ((out * torch.randn(out.shape, generator=gen)).sum() + (final * torch.randn(final.shape, generator=gen)).sum()
     ).backward()
    assert_same((out.detach(), final.detach(), {k: v.grad for k, v in leaves.items() if v is not None}), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_equal_the_full_op(dtype):
    inputs = {k: None if v is None else v.detach() for k, v in make_inputs(2, 11, 4, 3, 2, 5, with_initial=True,
                                                                           D_shape="per head and channel").items()}
    streams = {n: inputs[n].to(dtype) for n in ("x", "dt", "B", "C", "z")}
    options = dict(dt_bias=inputs["dt_bias"], dt_softplus=True, dt_limit=(0.05, 1.5), D=inputs["D"])
    out, final = ssd(**streams, A=inputs["A"], initial_states=inputs["initial_states"], chunk_size=4,
                     return_final_states=True, backend="torch", **options)
    state = inputs["initial_states"].clone()
    steps = [ssd_state_update(state, *(streams[n][:, t] for n in ("x", "dt")), inputs["A"],
                              *(streams[n][:, t] for n in ("B", "C")), z=streams["z"][:, t], **options)
             for t in range(11)]
    assert all(step.dtype == dtype for step in steps)
    tolerance = {} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(torch.stack(steps, dim=1), out, **tolerance)
    torch.testing.assert_close(state, final)


# -- dispatch and input checks ------------------------------------------------------------------------------------
def test_auto_runs_torch_on_cpu_and_the_peer_needs_cuda():
    assert resolve_backend("ssd", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="the 'peer' backend for ssd runs third-party CUDA kernels and the tensors "
                                         "are on cpu; use auto, torch or reference off the GPU"):
        ssd(*(v for k, v in make_inputs(1, 3, 2, 2, 1, 2).items() if k in ("x", "dt", "A", "B", "C")), backend="peer")


def _bad(**changes):
    base = {k: None if v is None else v.detach() for k, v in make_inputs(1, 6, 4, 2, 2, 3, D_shape=None).items()}
    return {**base, **changes}


BAD_INPUTS = [
    ("groups must divide heads", dict(B=torch.randn(1, 6, 3, 3), C=torch.randn(1, 6, 3, 3)),
     "ssd: B and C have 3 groups, which must divide heads=4"),
    ("dt without heads", dict(dt=torch.rand(1, 6)), r"ssd: expected x \(batch, length, heads, head_dim\)"),
    ("dt of another length", dict(dt=torch.rand(1, 5, 4)), r"ssd: dt must be \(1, 6, 4\)"),
    ("C unlike B", dict(C=torch.randn(1, 6, 2, 4)), "ssd: B and C must both be"),
    ("z unlike x", dict(z=torch.randn(1, 6, 4, 3)), "ssd: z must have x's shape"),
    ("A per channel", dict(A=-torch.rand(4, 2)), r"ssd: A must be \(heads,\) = \(4,\)"),
    ("D of the wrong size", dict(D=torch.randn(3)), r"ssd: D must be \(heads,\) or \(heads, head_dim\)"),
    ("dt_bias of the wrong size", dict(dt_bias=torch.rand(2)), r"ssd: dt_bias must be \(heads,\)"),
    ("initial states without head_dim", dict(initial_states=torch.randn(1, 4, 3)), "ssd: initial_states must be"),
    ("float64 x", dict(x=torch.randn(1, 6, 4, 2, dtype=torch.float64)), "ssd: x has dtype torch.float64"),
    ("int B", dict(B=torch.ones(1, 6, 2, 3, dtype=torch.int64)), "ssd: B has dtype torch.int64"),
    ("empty", dict(x=torch.randn(1, 6, 4, 0), z=None), "ssd: empty inputs"),
    ("chunk 48", dict(chunk_size=48), "ssd: chunk_size must be a power of two, got 48"),
    ("chunk 0", dict(chunk_size=0), "ssd: chunk_size must be a power of two, got 0"),
    ("inverted dt_limit", dict(dt_limit=(1.0, 0.1)), r"ssd: dt_limit must be \(min, max\) with min <= max"),
    ("int64 cu_seqlens", dict(cu_seqlens=torch.tensor([0, 6])), "ssd: cu_seqlens must be a 1-D int32 tensor"),
    ("2-D cu_seqlens", dict(cu_seqlens=torch.tensor([[0, 6]], dtype=torch.int32)), "must be a 1-D int32 tensor"),
    ("cu_seqlens not from 0", dict(cu_seqlens=torch.tensor([1, 6], dtype=torch.int32)),
     "ssd: cu_seqlens must rise strictly from 0 to the packed length 6"),
    ("cu_seqlens short of the length", dict(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)),
     r"to the packed length 6 \(no empty sequences\), got \[0, 2, 5\]"),
    ("empty sequence", dict(cu_seqlens=torch.tensor([0, 2, 2, 6], dtype=torch.int32)), "no empty sequences"),
    ("cu_seqlens with batch 2", dict(x=torch.randn(2, 6, 4, 2), dt=torch.rand(2, 6, 4), B=torch.randn(2, 6, 2, 3),
                                     C=torch.randn(2, 6, 2, 3), z=None,
                                     cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)),
     "ssd: with cu_seqlens the sequences are packed in a batch of 1, got batch 2"),
    ("cu_seqlens with initial states", dict(initial_states=torch.randn(1, 4, 2, 3),
                                            cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)),
     "ssd: initial_states with cu_seqlens is not supported"),
    ("x not a tensor", dict(x=[[1.0]]), "ssd: x must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("changes,message", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_inputs_fail_in_one_line(changes, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        ssd(**_bad(**changes))
    assert "\n" not in str(error.value)


def test_bad_decode_inputs_fail_in_one_line():
    x, dt, A, B, C = torch.randn(2, 4, 3), torch.rand(2, 4), -torch.rand(4), torch.randn(2, 2, 5), torch.randn(2, 2, 5)
    for state, B_, message in [
            (torch.zeros(2, 4, 3, 5, dtype=torch.bfloat16), B, "ssd_state_update: state must be float32 of shape"),
            (torch.zeros(2, 4, 3, 4), B, r"state must be float32 of shape \(2, 4, 3, 5\)"),
            (torch.zeros(2, 4, 3, 5), torch.randn(2, 3, 5), "ssd_state_update: B and C must both be"),
    ]:
        with pytest.raises(ValueError, match=message) as error:
            ssd_state_update(state, x, dt, A, B_, C)
        assert "\n" not in str(error.value)


# -- torch.compile --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_torch_backend_compiles_and_matches_eager():
    """Graph breaks are allowed (cu_seqlens' values are read eagerly); the compiled forward and backward must match."""
    inputs = make_inputs(1, 12, 2, 2, 1, 3)
    cu_seqlens = torch.tensor([0, 5, 12], dtype=torch.int32)

    def loss(**tensors):
        out, final = ssd(**tensors, cu_seqlens=cu_seqlens, chunk_size=4, dt_softplus=True, return_final_states=True,
                         backend="torch")
        return out.sin().sum() + final.sum()

    eager_leaves, compiled_leaves = fresh(inputs), fresh(inputs)
    eager = loss(**eager_leaves)
    eager.backward()
    compiled = torch.compile(loss)(**compiled_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for name, leaf in eager_leaves.items():
        if leaf is not None:
            torch.testing.assert_close(compiled_leaves[name].grad, leaf.grad, msg=lambda m, n=name: f"d{n}: {m}")
