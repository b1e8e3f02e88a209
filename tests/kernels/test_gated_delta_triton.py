"""The Triton gated delta rule (kernels + custom ops) against the float32 reference; on CPU through Triton's
interpreter, where the backward costs ~10 ms per token and program (a program: a sequence, value head and value
tile of 16), so shapes stay at a few chunks of 16 positions and a few programs (COST_BUDGET).

Every comparison covers the output, the final states and the gradient of every input, with the gradient flowing
from both outputs (fixed random projections of each), so the final states' backward is checked too, packed or not.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.checking import mismatch
from archlab.kernels.gated_delta.op import (GPU_CHUNK_LEN, INTERPRETER_CHUNK_LEN, gated_delta_bwd, gated_delta_fwd,
                                            gated_delta_triton)
from archlab.kernels.gated_delta.reference import gated_delta_reference
from archlab.kernels.registry import Tolerance

pytest.importorskip("triton")
from archlab.kernels.gated_delta import triton as gd_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "g", "beta", "initial_state")
CHUNK = INTERPRETER_CHUNK_LEN
# 1, 2, and one below, at and above one chunk of 16 positions, two chunks and one more, and a bit past that
LENGTHS = (1, 2, 15, 16, 17, 33, 40)
COST_BUDGET = 80  # value heads * value tiles of 16 * positions per drawn case: the interpreter's ~10 ms units
# The interpreter's arithmetic is fp32 throughout (true fp32 tl.dot): in half precision only the results' rounding
# to the inputs' type differs from the reference (fed the same rounded inputs). On a GPU tl.dot runs in tf32 for
# half inputs: the tolerance of kernels/ssd/conformance.py's half-precision matmuls.
TOLERANCES = {torch.float32: Tolerance(rtol=1e-4, atol=1e-5), torch.bfloat16: Tolerance(rtol=1e-2, atol=4e-3),
              torch.float16: Tolerance(rtol=2e-3, atol=1e-3)}
GPU_TOLERANCES = {**TOLERANCES, torch.bfloat16: Tolerance(rtol=2e-2, atol=1.6e-2),
                  torch.float16: Tolerance(rtol=5e-3, atol=2e-3)}


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """Fixed small value tiles and the interpreter's chunks on a GPU as well, so the property tests cross chunks
    and do not autotune every drawn shape; the GPU tests set their own."""
    monkeypatch.setattr(gd_kernels, "AUTOTUNE", False)
    monkeypatch.setattr("archlab.kernels.gated_delta.op.chunk_len_for", lambda device: CHUNK)


def make_inputs(shape, dtype, seed, *, n_states=None, initial_state=False, strided=False):
    """Leaves keyed like the reference's arguments: unit-norm q and k (as use_qk_l2norm makes them), g a log decay
    (logsigmoid), beta in (0, 1); strided: q and k as slices of one wider projection."""
    batch, length, heads, value_heads, key_dim, value_dim = shape
    gen = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=gen)

    def unit(size):
        if strided:
            return F.normalize(randn(*size[:-1], 2 * key_dim), dim=-1)[..., ::2] * 2 ** 0.5
        return F.normalize(randn(*size), dim=-1)

    tensors = dict(q=unit((batch, length, heads, key_dim)), k=unit((batch, length, heads, key_dim)),
                   v=randn(batch, length, value_heads, value_dim), g=F.logsigmoid(randn(batch, length, value_heads)),
                   beta=torch.rand(batch, length, value_heads, generator=gen))
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    tensors["initial_state"] = randn(n_states or batch, value_heads, key_dim, value_dim) if initial_state else None
    return {name: None if t is None else t.to(DEVICE).requires_grad_() for name, t in tensors.items()}


def run(inputs, function, *, seed=1, upcast=False, **options):
    """(o, final states, {name: grad}) of <o, g1> + <final, g2> for fixed random g1, g2. The leaves share the inputs'
    memory (strided ones stay strided); upcast: float32 copies, for the reference."""
    leaves = {name: None if t is None else (t.detach().float() if upcast else t.detach()).requires_grad_()
              for name, t in inputs.items()}
    out, final = function(**leaves, **options)
    gen = torch.Generator().manual_seed(seed)
    projections = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (out, final)]
    ((out.float() * projections[0]).sum() + (final * projections[1]).sum()).backward()
    return out.detach(), final.detach(), {name: t.grad for name, t in leaves.items() if t is not None}


def triton_rule(q, k, v, g, beta, initial_state, scale=None, cu_seqlens=None):
    return gated_delta_triton(q, k, v, g, beta, scale, initial_state, cu_seqlens)


def assert_conforms(inputs, dtype, tolerances=TOLERANCES, **options):
    got_out, got_final, got_grads = run(inputs, triton_rule, **options)
    want_out, want_final, want_grads = run(inputs, gated_delta_reference, upcast=True, **options)
    assert got_out.dtype == inputs["v"].dtype and got_final.dtype == torch.float32
    problems = [(name, mismatch(got, want, tolerances[dtype])) for name, got, want in
                [("o", got_out, want_out), ("final states", got_final, want_final)]
                + [(f"d{name}", got_grads[name], want_grads[name]) for name in want_grads]]
    assert not [p for p in problems if p[1]], problems
    for name, grad in got_grads.items():
        assert grad.dtype == inputs[name].dtype and grad.shape == inputs[name].shape, name


@st.composite
def gated_delta_cases(draw):
    heads = draw(st.sampled_from([1, 2]))
    value_heads = heads * draw(st.sampled_from([1, 2]))
    key_dim, value_dim = draw(st.sampled_from([16, 24, 32])), draw(st.sampled_from([16, 24, 32]))
    batch = draw(st.integers(1, 2))
    packed = batch == 1 and draw(st.booleans())
    per_position = batch * value_heads * -(-value_dim // 16)
    length = draw(st.sampled_from([n for n in LENGTHS if per_position * n <= COST_BUDGET] or [1]))
    cu_seqlens = None
    if packed and length > 1:  # boundaries anywhere: inside chunks, on chunk edges, next to each other
        cuts = draw(st.lists(st.integers(1, length - 1), max_size=2, unique=True))
        cu_seqlens = torch.tensor([0, *sorted(cuts), length], dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                                  device=DEVICE)
    options = dict(n_states=None if cu_seqlens is None else cu_seqlens.numel() - 1,
                   initial_state=draw(st.booleans()), strided=draw(st.booleans()))
    call = dict(cu_seqlens=cu_seqlens, scale=draw(st.sampled_from([None, 0.3])))
    return (batch, length, heads, value_heads, key_dim, value_dim), options, call


# few examples: tests/kernels/test_conformance.py draws 8 more per dtype through the dispatcher (power-of-two dims)
@settings(max_examples=5, deadline=None)
@given(case=gated_delta_cases(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, seed):
    shape, options, call = case
    assert_conforms(make_inputs(shape, torch.float32, seed, **options), torch.float32, **call)


@settings(max_examples=3, deadline=None)
@given(case=gated_delta_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_half_precision_matches_reference(case, dtype, seed):
    shape, options, call = case
    assert_conforms(make_inputs(shape, dtype, seed, **options), dtype, **call)


def test_packed_batch_equals_each_sequence_alone():
    """Each packed sequence is chunked from its own start and its own initial state, so outputs, final states and
    every gradient are the very bits of the sequence run alone."""
    bounds = torch.tensor([0, 1, 18, 23], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs((1, 23, 1, 2, 16, 16), torch.float32, seed=0, n_states=3, initial_state=True)
    packed_out, packed_final, packed_grads = run(inputs, triton_rule, cu_seqlens=bounds)
    gen = torch.Generator().manual_seed(1)  # run()'s projections, cut per sequence
    out_projection = torch.randn(packed_out.shape, generator=gen).to(DEVICE)
    final_projection = torch.randn(packed_final.shape, generator=gen).to(DEVICE)
    for n, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)):
        leaves = {name: t.detach().requires_grad_() for name, t in inputs.items()}
        alone = {name: t[n:n + 1] if name == "initial_state" else t[:, start:end] for name, t in leaves.items()}
        out, final = triton_rule(**alone)
        ((out * out_projection[:, start:end]).sum() + (final * final_projection[n:n + 1]).sum()).backward()
        assert torch.equal(out, packed_out[:, start:end]) and torch.equal(final[0], packed_final[n]), n
        for name in NAMES[:-1]:
            assert torch.equal(leaves[name].grad[:, start:end], packed_grads[name][:, start:end]), (n, name)
        assert torch.equal(leaves["initial_state"].grad[n], packed_grads["initial_state"][n]), n


def test_gpu_chunk_length_and_value_tiles(monkeypatch):
    """The GPU's chunks and value tiles in the interpreter: a length one past a chunk, a value_dim past one tile."""
    monkeypatch.setattr("archlab.kernels.gated_delta.op.chunk_len_for", lambda device: GPU_CHUNK_LEN)
    monkeypatch.setattr(gd_kernels, "FIXED_BLOCK_V", gd_kernels.GPU_BLOCK_V)
    inputs = make_inputs((1, GPU_CHUNK_LEN + 1, 1, 1, 16, gd_kernels.GPU_BLOCK_V + 8), torch.float32, seed=3,
                         initial_state=True)
    assert_conforms(inputs, torch.float32)


def test_strong_decay_stays_finite():
    """Log decays of -60 per position (exp underflows to 0 within a chunk): finite and right, both ways."""
    inputs = make_inputs((1, 17, 1, 1, 16, 16), torch.float32, seed=4, initial_state=True)
    with torch.no_grad():
        inputs["g"].mul_(60)
    assert_conforms(inputs, torch.float32)


def _backward_twice(shape, dtype, chunk_len):
    inputs = make_inputs(shape, dtype, seed=5, initial_state=True)
    tensors = [inputs[name].detach() for name in NAMES]
    out, final = gated_delta_fwd(*tensors, None, scale=0.1, chunk_len=chunk_len)
    grad_out, grad_final = torch.randn_like(out), torch.randn_like(final)
    return [gated_delta_bwd(grad_out, grad_final, *tensors, None, scale=0.1, chunk_len=chunk_len) for _ in range(2)]


@pytest.mark.gpu
def test_backward_is_deterministic_on_cuda(monkeypatch):
    """At a Gated DeltaNet shape, autotuned, where programs run concurrently and atomics would reorder sums."""
    monkeypatch.setattr(gd_kernels, "AUTOTUNE", True)
    first, second = _backward_twice((2, 1024, 4, 8, 128, 128), torch.bfloat16, GPU_CHUNK_LEN)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two runs"


@pytest.mark.gpu
def test_cuda_training_shape_bf16_matches_reference(monkeypatch):
    """B2 L512 H4 HV8 K=V=128 in bf16 with an initial state, autotuned, against the fp32 reference on the GPU."""
    monkeypatch.setattr(gd_kernels, "AUTOTUNE", True)
    monkeypatch.setattr("archlab.kernels.gated_delta.op.chunk_len_for", lambda device: GPU_CHUNK_LEN)
    inputs = make_inputs((2, 512, 4, 8, 128, 128), torch.bfloat16, seed=6, initial_state=True)
    assert_conforms(inputs, torch.bfloat16, tolerances=GPU_TOLERANCES)


def test_custom_ops_pass_opcheck():
    """Schema, fake kernels, autograd registration and AOT dispatch agree with the real kernels."""
    inputs = make_inputs((1, 5, 1, 2, 16, 16), torch.float32, seed=8, n_states=2, initial_state=True)
    packed = (*(inputs[name] for name in NAMES), torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE))
    torch.library.opcheck(gated_delta_fwd, packed, dict(scale=0.25, chunk_len=CHUNK))


def test_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph: a graph break is an error. aot_eager traces what inductor would (dynamo, the fake kernels, the
    autograd rule) without its C++ compile, which an opaque custom op does not need."""
    inputs = make_inputs((1, 7, 1, 2, 16, 16), torch.float32, seed=9, n_states=2, initial_state=True)
    bounds = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)

    def loss(**tensors):
        out, final = triton_rule(**tensors, cu_seqlens=bounds)
        return out.sin().sum() + final.square().sum()

    leaves = list(inputs.values())
    eager = loss(**inputs)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(**inputs)
    torch.testing.assert_close(compiled, eager)
    for name, got, want in zip(NAMES, torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves),
                               strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


def test_double_backward_is_a_clear_error():
    inputs = make_inputs((1, 3, 1, 1, 16, 16), torch.float32, seed=10)
    out, _ = triton_rule(**inputs)
    (grad_v,) = torch.autograd.grad(out.sum(), inputs["v"], create_graph=True)
    with pytest.raises(NotImplementedError, match="archlab::gated_delta_fwd has no second derivative; use "
                                                  "kernels.gated_delta=torch"):
        grad_v.sum().backward()


def test_op_imports_without_triton():
    """op.py imports the kernel module only inside the op bodies, so machines without triton can import it."""
    code = ("import sys; sys.modules['triton'] = None; import archlab.kernels.gated_delta.op as op; "
            "assert 'archlab.kernels.gated_delta.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


def test_gpu_half_precision_dots(monkeypatch):
    """The GPU's tl.dot choices for half inputs (q k^T and k k^T on the inputs as loaded, the rest in tf32) in the
    interpreter, whose fp16 tl.dot is right (its bf16 one is not): fp16 inputs crossing a chunk."""
    monkeypatch.setattr(gd_kernels, "_precision", lambda q, k, v: "tf32")
    inputs = make_inputs((1, 17, 1, 2, 16, 16), torch.float16, seed=11, initial_state=True)
    assert_conforms(inputs, torch.float16)


def test_head_dims_past_the_kernels_bound_are_refused():
    inputs = make_inputs((1, 2, 1, 1, 16, gd_kernels.TRITON_MAX_HEAD_DIM + 1), torch.float32, seed=12)
    with pytest.raises(ValueError, match=r"^triton gated_delta: key_dim 16 and value_dim 257 must be at most 256; "
                                         r"use kernels.gated_delta=torch$"):
        triton_rule(**inputs)
