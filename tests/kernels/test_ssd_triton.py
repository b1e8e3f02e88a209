"""The Triton SSD (kernels + custom ops) against the float32 reference; on CPU through Triton's interpreter, where
every program costs milliseconds (about 0.2 s per chunk and head, forward and backward), so shapes stay at a few
chunks of 16 positions and a few heads (COST_BUDGET).

Every comparison is the conformance test's (kernels/checking.py's `mismatch`, with kernels/ssd/conformance.py's
tolerances: in half precision the kernels round tl.dot's operands to the inputs' type, as on a GPU), over the
output, the final states and the gradient of every input, with the gradient flowing from both outputs (fixed
random projections of each), so the final states' backward is checked too, packed or not.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.checking import mismatch
from archlab.kernels.ssd import ssd
from archlab.kernels.ssd.conformance import CONFORMANCE
from archlab.kernels.ssd.op import GPU_CHUNK_LEN, INTERPRETER_CHUNK_LEN, ssd_bwd, ssd_fwd, ssd_triton

pytest.importorskip("triton")
from archlab.kernels.ssd import triton as ssd_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
STREAMS = ("x", "dt", "B", "C", "z")  # per position: drawn in the tested dtype; the parameters stay float32
CHUNK = INTERPRETER_CHUNK_LEN
# 1, primes, and one below, at and above one and two chunks of the interpreter's 16 positions
LENGTHS = (1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 37)
COST_BUDGET = 6  # batch * heads * chunks * head_dim tiles * state tiles per drawn case (tiles of 16)


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """Fixed small blocks and the interpreter's chunks on a GPU as well, so the property tests cross chunks and do
    not autotune every drawn shape; the tests of the GPU's blocks and chunks set those."""
    monkeypatch.setattr(ssd_kernels, "AUTOTUNE", False)
    monkeypatch.setattr("archlab.kernels.ssd.op.chunk_len_for", lambda device: CHUNK)


def gpu_chunks(monkeypatch, autotune):
    monkeypatch.setattr("archlab.kernels.ssd.op.chunk_len_for", lambda device: GPU_CHUNK_LEN)
    monkeypatch.setattr(ssd_kernels, "AUTOTUNE", autotune)


def make_inputs(shape, options, dtype, seed):
    """Leaves keyed like ssd's arguments; dt > 0 unless the softplus makes it so; A < 0 (decay)."""
    batch, length, heads, head_dim, groups, n_state = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size, dtype=dtype):
        return torch.randn(size, generator=gen).to(dtype)

    x = randn(batch, length, heads, 2 * head_dim)[..., ::2] if options.get("strided_x") else \
        randn(batch, length, heads, head_dim)
    dt = randn(batch, length, heads)
    D = {None: None, "per head": randn(heads, dtype=torch.float32),
         "per head and channel": randn(heads, head_dim, dtype=torch.float32)}[options.get("D")]
    tensors = dict(
        x=x, dt=dt if options.get("dt_softplus") else (dt.float().abs() * 0.5).to(dtype),
        A=-(torch.rand(heads, generator=gen) * 2 + 0.1), B=randn(batch, length, groups, n_state),
        C=randn(batch, length, groups, n_state), D=D,
        z=randn(batch, length, heads, head_dim) if options.get("z") else None,
        dt_bias=torch.rand(heads, generator=gen) * 0.5 if options.get("dt_bias") else None,
        initial_states=randn(batch, heads, head_dim, n_state, dtype=torch.float32)
        if options.get("initial_states") else None)
    return {name: None if t is None else t.to(DEVICE).requires_grad_() for name, t in tensors.items()}


def run(inputs, backend, *, seed=1, upcast=False, **options):
    """(out, final states, {name: grad}) of <out, g1> + <final, g2> for fixed random g1, g2. The leaves share the
    inputs' memory (a strided x stays strided); upcast: float32 copies, for the reference."""
    leaves = {name: None if t is None else (t.detach().float() if upcast else t.detach()).requires_grad_()
              for name, t in inputs.items()}
    out, final = ssd(**leaves, return_final_states=True, backend=backend, **options)
    gen = torch.Generator().manual_seed(seed)
    projections = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (out, final)]
    ((out.float() * projections[0]).sum() + (final * projections[1]).sum()).backward()
    return out.detach(), final.detach(), {name: t.grad for name, t in leaves.items() if t is not None}


def assert_conforms(inputs, dtype, **options):
    got_out, got_final, got_grads = run(inputs, "triton", **options)
    want_out, want_final, want_grads = run(inputs, "reference", upcast=True, **options)
    assert got_out.dtype == inputs["x"].dtype and got_final.dtype == torch.float32
    tolerance = CONFORMANCE.tolerance("triton", dtype)
    problems = [(name, mismatch(got, want, tolerance)) for name, got, want in
                [("out", got_out, want_out), ("final states", got_final, want_final)]
                + [(f"d{name}", got_grads[name], want_grads[name]) for name in want_grads]]
    assert not [p for p in problems if p[1]], problems
    for name, grad in got_grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name


def cost(batch, length, heads, head_dim, n_state, n_sequences=1):
    tiles = -(-head_dim // 16) * -(-n_state // 16)
    return batch * heads * (-(-length // 16) + n_sequences - 1) * tiles


@st.composite
def ssd_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    heads = groups * draw(st.sampled_from([1, 2]))
    batch, head_dim, n_state = draw(st.integers(1, 2)), draw(st.sampled_from([1, 3, 4, 17])), \
        draw(st.sampled_from([1, 4, 8, 17]))
    packed = batch == 1 and draw(st.booleans())
    lengths = [n for n in LENGTHS if cost(batch, n, heads, head_dim, n_state, 3 if packed else 1) <= COST_BUDGET]
    length = draw(st.sampled_from(lengths or [1]))
    cu_seqlens = None
    if packed and length > 1:  # boundaries anywhere: inside chunks, on chunk edges, next to each other
        cuts = draw(st.lists(st.integers(1, length - 1), max_size=2, unique=True))
        cu_seqlens = torch.tensor([0, *sorted(cuts), length], dtype=torch.int32, device=DEVICE)
    options = dict(D=draw(st.sampled_from([None, "per head", "per head and channel"])), z=draw(st.booleans()),
                   dt_bias=draw(st.booleans()), dt_softplus=draw(st.booleans()),
                   initial_states=cu_seqlens is None and draw(st.booleans()), strided_x=draw(st.booleans()))
    call = dict(dt_softplus=options["dt_softplus"], cu_seqlens=cu_seqlens,
                dt_limit=draw(st.sampled_from([(0.0, float("inf")), (0.05, 0.8)])))
    return (batch, length, heads, head_dim, groups, n_state), options, call


@settings(max_examples=6, deadline=None)
@given(case=ssd_cases(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, seed):
    shape, options, call = case
    assert_conforms(make_inputs(shape, options, torch.float32, seed), torch.float32, **call)


@settings(max_examples=3, deadline=None)
@given(case=ssd_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_half_precision_matches_reference(case, dtype, seed):
    shape, options, call = case
    assert_conforms(make_inputs(shape, options, dtype, seed), dtype, **call)


EVERYTHING = dict(D="per head", z=True, dt_bias=True, dt_softplus=True)


def test_packed_batch_equals_each_sequence_alone():
    """Each packed sequence is chunked from its own start, so outputs, final states and per-position gradients
    are the very bits of the sequence run alone; parameter gradients are sums over the sequences, in another
    order, so equal to rounding."""
    lengths = [1, 17, 5, 16]
    bounds = torch.tensor([0, 1, 18, 23, 39], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs((1, sum(lengths), 2, 3, 1, 4), EVERYTHING, torch.float32, seed=0)
    options = dict(dt_softplus=True)
    packed_out, packed_final, packed_grads = run(inputs, "triton", cu_seqlens=bounds, **options)
    gen = torch.Generator().manual_seed(1)  # run()'s projections, cut per sequence
    out_projection = torch.randn(packed_out.shape, generator=gen).to(DEVICE)
    final_projection = torch.randn(packed_final.shape, generator=gen).to(DEVICE)
    for k, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        leaves = {name: None if t is None else t.detach().requires_grad_() for name, t in inputs.items()}
        alone = {**leaves, **{name: leaves[name][:, start:end] for name in STREAMS}}
        out, final = ssd(**alone, return_final_states=True, backend="triton", **options)
        ((out * out_projection[:, start:end]).sum() + (final * final_projection[k:k + 1]).sum()).backward()
        assert torch.equal(out, packed_out[:, start:end]) and torch.equal(final[0], packed_final[k]), k
        for name in STREAMS:
            assert torch.equal(leaves[name].grad[:, start:end], packed_grads[name][:, start:end]), (k, name)
    # the parameters' gradients: the whole packed batch against the reference run per sequence
    want = run(inputs, "reference", cu_seqlens=bounds, **options)[2]
    for name in ("A", "D", "dt_bias"):
        assert mismatch(packed_grads[name], want[name], CONFORMANCE.tolerance("triton", torch.float32)) is None, name


def test_gpu_tiles_and_chunk_length(monkeypatch):
    """The GPU's blocks and chunks in the interpreter: head_dim one past the widest head_dim tile, a state one past
    a state tile, a length one past a chunk, and a packed boundary inside the first chunk."""
    monkeypatch.setattr(ssd_kernels, "_blocks", lambda x, *sizes: ssd_kernels._gpu_blocks(*sizes))
    gpu_chunks(monkeypatch, autotune=False)
    shape = (1, GPU_CHUNK_LEN + 1, 1, ssd_kernels.GPU_BLOCK_P + 1, 1, ssd_kernels.GPU_BLOCK_N + 1)
    bounds = torch.tensor([0, 40, GPU_CHUNK_LEN + 1], dtype=torch.int32, device=DEVICE)
    assert_conforms(make_inputs(shape, dict(EVERYTHING, strided_x=True), torch.float32, seed=3), torch.float32,
                    dt_softplus=True, cu_seqlens=bounds)


def test_large_decay_and_softplus_tail():
    """Pre-activations past softplus's linear branch (> 20) and decays exp(dt A) that underflow to 0: finite and
    right, forward and backward."""
    inputs = make_inputs((1, 19, 2, 3, 1, 4), EVERYTHING, torch.float32, seed=4)
    with torch.no_grad():
        inputs["dt"].mul_(30)
    assert_conforms(inputs, torch.float32, dt_softplus=True)


def _backward_twice(shape, dtype, chunk_len):
    inputs = make_inputs(shape, dict(EVERYTHING, initial_states=True), dtype, seed=5)
    tensors = [inputs[name].detach() if inputs[name] is not None else None for name in NAMES]
    options = dict(dt_softplus=True, dt_min=0.0, dt_max=float("inf"), chunk_len=chunk_len)
    out, final = ssd_fwd(*tensors, None, **options)
    grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
    return [ssd_bwd(grad_out, grad_final, *tensors, None, **options) for _ in range(2)]


def test_backward_is_deterministic():
    """Cannot fail under the (sequential) interpreter; it checks the plumbing. The GPU variant below is the test."""
    first, second = _backward_twice((1, 20, 2, 3, 1, 4), torch.float32, CHUNK)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@pytest.mark.gpu
def test_backward_is_deterministic_on_cuda(monkeypatch):
    """At a Mamba-2 shape, autotuned, where programs run concurrently and atomics would reorder sums."""
    monkeypatch.setattr(ssd_kernels, "AUTOTUNE", True)
    first, second = _backward_twice((2, 1024, 16, 64, 1, 128), torch.bfloat16, GPU_CHUNK_LEN)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@pytest.mark.gpu
def test_cuda_benchmark_shape_bf16_matches_reference(monkeypatch):
    """B2 L2048 H8 P64 N128 in bf16 with every option, autotuned, against the fp32 reference on the GPU."""
    gpu_chunks(monkeypatch, autotune=True)
    inputs = make_inputs((2, 2048, 8, 64, 1, 128), dict(EVERYTHING, initial_states=True), torch.bfloat16, seed=6)
    assert_conforms(inputs, torch.bfloat16, dt_softplus=True)


def test_chunk_tables():
    rows = ssd_kernels.chunk_tables(2, 35, None, 16, torch.device("cpu"))
    assert rows[0].tolist() == [[0, 0, 16], [0, 16, 16], [0, 32, 3], [1, 0, 16], [1, 16, 16], [1, 32, 3]]
    assert rows[1].tolist() == [[0, 3], [3, 3]]
    # sequences of 1, 17, 16 and 2: one chunk, two, one, one; the bound ceil(36 / 16) + 4 - 1 leaves one spare slot
    packed = ssd_kernels.chunk_tables(1, 36, torch.tensor([0, 1, 18, 34, 36], dtype=torch.int32), 16,
                                      torch.device("cpu"))
    assert packed[0].tolist() == [[0, 0, 1], [0, 1, 16], [0, 17, 1], [0, 18, 16], [0, 34, 2], [0, 0, 0]]
    assert packed[1].tolist() == [[0, 1], [1, 2], [3, 1], [4, 1]]


def test_public_function_and_chunk_size_independence():
    """ssd_triton gives out and differentiable final states; the op's chunk_size does not reach the kernel."""
    inputs = make_inputs((1, 9, 2, 3, 1, 4), EVERYTHING, torch.float32, seed=7)
    tensors = [inputs[name] for name in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")]
    out, final = ssd_triton(*tensors, True, (0.0, float("inf")), None, None)
    assert out.requires_grad and final.requires_grad
    other = ssd(**inputs, dt_softplus=True, chunk_size=2, return_final_states=True, backend="triton")
    assert torch.equal(out, other[0]) and torch.equal(final, other[1])


def test_custom_ops_pass_opcheck():
    """Schema, fake kernels, autograd registration and AOT dispatch agree with the real kernels."""
    inputs = make_inputs((1, 5, 2, 2, 1, 3), EVERYTHING, torch.float32, seed=8)
    packed = (*(inputs[name] for name in NAMES), torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE))
    torch.library.opcheck(ssd_fwd, packed, dict(dt_softplus=True, dt_min=0.0, dt_max=float("inf"), chunk_len=CHUNK))


def test_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph: a graph break is an error. aot_eager traces what inductor would (dynamo, the fake kernels, the
    autograd rule) without its C++ compile, ~20 s on 2 cores, which an opaque custom op does not need."""
    inputs = make_inputs((1, 7, 2, 2, 1, 3), EVERYTHING, torch.float32, seed=9)
    bounds = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)

    def loss(**tensors):
        out, final = ssd(**tensors, dt_softplus=True, cu_seqlens=bounds, return_final_states=True, backend="triton")
        return out.sin().sum() + final.square().sum()

    leaves = [t for t in inputs.values() if t is not None]
    eager = loss(**inputs)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(**inputs)
    torch.testing.assert_close(compiled, eager)
    for name, got, want in zip(NAMES, torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves),
                               strict=False):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


def test_double_backward_is_a_clear_error():
    inputs = make_inputs((1, 3, 1, 2, 1, 2), {}, torch.float32, seed=10)
    out = ssd(**inputs, backend="triton")
    (grad_x,) = torch.autograd.grad(out.sum(), inputs["x"], create_graph=True)
    with pytest.raises(NotImplementedError, match="archlab::ssd_fwd has no second derivative; use kernels.ssd=torch"):
        grad_x.sum().backward()


def test_op_imports_without_triton():
    """op.py imports the kernel module only inside the op bodies, so machines without triton can import it."""
    code = ("import sys; sys.modules['triton'] = None; import archlab.kernels.ssd.op as op; "
            "assert 'archlab.kernels.ssd.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})
