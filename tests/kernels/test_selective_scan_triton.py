"""The Triton selective scan (kernels + custom op) against the float32 reference; on CPU through Triton's
interpreter, where the per-element cost of tl.associative_scan keeps the shapes small.

Tolerances. Float32: the kernel and the reference add the same terms in different orders (a scan tree and
per-chunk restarts vs one sequential loop); for sums of up to L terms that differs by at most about L * eps32
relative to the size of the terms, so each result must match within FP32_ULPS_PER_POSITION * L * eps32 times its
largest magnitude (or 1). Half precision: both sides see the same rounded inputs and compute in float32, and the
kernel rounds each half-precision result once at the end, so it may differ by that float32 allowance plus one
unit of rounding of the result itself (rtol = eps of the dtype). Gradients of float32 parameters (A, D,
delta_bias) are never rounded and keep the float32 allowance alone.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.selective_scan import op as scan_op
from archlab.kernels.selective_scan.op import selective_scan_bwd, selective_scan_fwd, selective_scan_triton
from archlab.kernels.selective_scan.reference import selective_scan_reference

pytest.importorskip("triton")
from archlab.kernels.selective_scan import triton as scan_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
HALF_PRECISION_INPUTS = {"u", "delta", "B", "C", "z"}  # A, D, delta_bias stay float32 as in Mamba
FP32_ULPS_PER_POSITION = 4
# 1, primes, multiples of the interpreter's 16-position chunks and their neighbours
LENGTHS = [1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 61, 64, 67, 97, 100]
# batch * dim * N * L bound per drawn case: the interpreter pays ~50 us per scanned element
INTERPRETER_BUDGET = 4000


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """Fixed small blocks on a GPU as well, so the property tests do not autotune every drawn shape."""
    monkeypatch.setattr(scan_kernels, "AUTOTUNE", False)


def _stored(shape, dtype, layout):
    """A tensor of `shape` whose memory is laid out as asked: the kernels must honour every stride."""
    if layout == "transposed":  # L is not the fastest dimension
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2).to(dtype)
    if layout == "sliced":  # every other position of a longer buffer
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2].to(dtype)
    return torch.randn(shape).to(dtype)


def _parameter(dim, strided):
    """A (dim,) parameter, or one with stride 2 (a column of a (dim, 2) buffer): the kernels index it by channel."""
    return torch.randn(dim, 2)[:, 1] if strided else torch.randn(dim)


def make_inputs(case, dtype, seed):
    """(u, delta, A, B, C, D, z, delta_bias, grad_out); absent optional inputs are None."""
    torch.manual_seed(seed)
    batch, dim, length, n_state, groups = (case[k] for k in ("batch", "dim", "length", "n_state", "groups"))
    layout = case["layout"]
    u = _stored((batch, dim, length), dtype, layout)
    # Mamba's delta is positive (softplus of a projection); without softplus draw it positive directly
    delta = _stored((batch, dim, length), dtype, layout)
    delta = delta if case["softplus"] else (delta.float().abs() * 0.5).to(dtype)
    A = -torch.rand(dim, n_state) * 2 - 0.1  # A = -exp(A_log): negative, so the state decays
    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    B, C = _stored(bc_shape, dtype, layout), _stored(bc_shape, dtype, layout)
    D = _parameter(dim, case["strided_params"]) if case["has_D"] else None
    z = _stored((batch, dim, length), dtype, layout) if case["has_z"] else None
    bias = _parameter(dim, case["strided_params"])
    bias = bias if case["softplus"] else bias.abs()  # positive too when nothing rectifies it
    delta_bias = bias * 0.5 if case["has_delta_bias"] else None
    grad_out = torch.randn(batch, dim, length).to(dtype)
    to_device = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return [to_device(t) for t in (u, delta, A, B, C, D, z, delta_bias, grad_out)]


def triton_scan(inputs, softplus, chunk_len):
    """(out, last_state, grads) through the custom op and its autograd rule. The leaves share the inputs' memory:
    clone() would make the non-dense layouts (sliced, strided parameters) contiguous and hide them."""
    *tensors, grad_out = inputs
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    out, last_state, _ = selective_scan_fwd(*leaves, delta_softplus=softplus, chunk_len=chunk_len)
    out.backward(grad_out)
    return out.detach(), last_state, [None if t is None else t.grad for t in leaves]


def reference_scan(inputs, softplus):
    """The same from the reference on float32 copies of the (already rounded) inputs, grads by autograd."""
    *tensors, grad_out = inputs
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in tensors]
    out, last_state = selective_scan_reference(*leaves, delta_softplus=softplus)
    out.backward(grad_out.float())
    return out.detach(), last_state, [None if t is None else t.grad for t in leaves]


def assert_matches(name, got, want, length, rounding_eps):
    """See the module docstring: float32 allowance ~ L * eps32 * scale, plus one rounding of a half result."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    scale = max(want.abs().max().item(), 1.0)
    atol = FP32_ULPS_PER_POSITION * max(length, 8) * torch.finfo(torch.float32).eps * scale
    torch.testing.assert_close(got.float(), want, rtol=rounding_eps, atol=atol,
                               msg=lambda m: f"{name} (L={length}): {m}")


def check_case(case, dtype, seed, chunk_len=16):
    inputs = make_inputs(case, dtype, seed)
    got_out, got_state, got_grads = triton_scan(inputs, case["softplus"], chunk_len)
    want_out, want_state, want_grads = reference_scan(inputs, case["softplus"])
    half_eps = torch.finfo(dtype).eps if dtype != torch.float32 else 0.0
    assert got_out.dtype == dtype and got_state.dtype == torch.float32
    assert_matches("out", got_out, want_out, case["length"], half_eps)
    assert_matches("last_state", got_state, want_state, case["length"], 0.0)
    for name, tensor, got, want in zip(NAMES, inputs[:-1], got_grads, want_grads, strict=True):
        assert (got is None) == (tensor is None), name
        if tensor is not None:
            assert got.dtype == tensor.dtype, f"d{name}: dtype {got.dtype} vs {tensor.dtype}"
            assert_matches(f"d{name}", got, want, case["length"], half_eps if name in HALF_PRECISION_INPUTS else 0.0)


@st.composite
def scan_cases(draw):
    batch, n_state = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4, 16]))
    groups = draw(st.sampled_from([None, 1, 2]))
    # dims that are not multiples of the interpreter's 4-channel blocks; a group's channels share one B/C row
    dim_per_group = draw(st.sampled_from([1, 2, 3, 4, 5, 7] if groups != 2 else [1, 3, 4, 5]))
    dim = dim_per_group * (groups or 1)
    lengths = [n for n in LENGTHS if batch * dim * n_state * n <= INTERPRETER_BUDGET] or [1]
    return dict(batch=batch, dim=dim, length=draw(st.sampled_from(lengths)), n_state=n_state, groups=groups,
                has_D=draw(st.booleans()), has_z=draw(st.booleans()), has_delta_bias=draw(st.booleans()),
                softplus=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "transposed", "sliced"])),
                strided_params=draw(st.booleans()))


@settings(max_examples=12, deadline=None)
@given(case=scan_cases(), seed=st.integers(0, 2**16))
def test_float32_matches_reference(case, seed):
    check_case(case, torch.float32, seed)


@settings(max_examples=10, deadline=None)
@given(case=scan_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_half_precision_is_one_rounding_from_reference(case, dtype, seed):
    check_case(case, dtype, seed)


def _case(**overrides):
    case = dict(batch=2, dim=6, length=37, n_state=4, groups=None, has_D=True, has_z=True, has_delta_bias=True,
                softplus=True, layout="contiguous", strided_params=False)
    return {**case, **overrides}


@pytest.mark.parametrize("chunk_len,length", [(2, 5), (4, 4), (8, 33), (32, 31), (32, 64)])
def test_chunk_lengths_and_boundaries(chunk_len, length):
    """State carried and saved across chunk edges: lengths one short, exact and one past a chunk multiple."""
    check_case(_case(length=length, n_state=3, groups=2), torch.float32, seed=length, chunk_len=chunk_len)


# The autotuned forward's configs differ in BLOCK_D and num_warps (which the interpreter ignores); the backward's
# only in num_warps, at GPU_BWD_BLOCK_D channels.
GPU_FWD_BLOCKS = sorted({config.kwargs["BLOCK_D"] for config in scan_kernels._fwd_tuned.configs})


@pytest.mark.parametrize("fwd_block_d", GPU_FWD_BLOCKS)
def test_every_gpu_config(monkeypatch, fwd_block_d):
    """Every forward autotune config with the backward's GPU block, at the GPU chunk length: channels per group
    just over the larger block (so both kernels cross a block edge), L just over a chunk."""
    assert all(not config.kwargs for config in scan_kernels._bwd_tuned.configs)  # else test them here too
    monkeypatch.setattr(scan_kernels, "FIXED_BLOCK_D", fwd_block_d)
    monkeypatch.setattr(scan_kernels, "_bwd_block_d", lambda t: scan_kernels.GPU_BWD_BLOCK_D)
    dim_per_group = max(fwd_block_d, scan_kernels.GPU_BWD_BLOCK_D) + 1
    check_case(_case(batch=1, dim=2 * dim_per_group, length=scan_op.GPU_CHUNK_LEN + 3, n_state=2, groups=2,
                     strided_params=True), torch.float32, seed=fwd_block_d, chunk_len=scan_op.GPU_CHUNK_LEN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_D_and_delta_bias(dtype):
    """D and delta_bias with stride 2: right outputs, and gradients of the parameters' own shape (dim,)."""
    check_case(_case(length=21, strided_params=True, layout="sliced"), dtype, seed=7)


def test_large_decay_and_softplus_tail():
    """Big pre-activations hit softplus's linear branch (> 20) and make exp(delta A) underflow to 0."""
    inputs = make_inputs(_case(length=19, n_state=4), torch.float32, seed=3)
    inputs[1] = inputs[1] * 30
    got_out, got_state, got_grads = triton_scan(inputs, True, 16)
    want_out, want_state, want_grads = reference_scan(inputs, True)
    assert_matches("out", got_out, want_out, 19, 0.0)
    for name, got, want in zip(NAMES, got_grads, want_grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert_matches(f"d{name}", got, want, 19, 0.0)


def _assert_backward_is_deterministic(case, dtype, chunk_len):
    *tensors, grad_out = make_inputs(case, dtype, seed=0)
    out, _, chunk_states = selective_scan_fwd(*tensors, delta_softplus=True, chunk_len=chunk_len)
    first = selective_scan_bwd(grad_out, *tensors, chunk_states, delta_softplus=True, chunk_len=chunk_len)
    second = selective_scan_bwd(grad_out, *tensors, chunk_states, delta_softplus=True, chunk_len=chunk_len)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"d{name} differs between two runs"


def test_backward_is_deterministic():
    """Cannot fail under the (sequential) interpreter; it checks the plumbing. The GPU variant below is the test."""
    _assert_backward_is_deterministic(_case(dim=5, length=40, groups=None), torch.float32, chunk_len=16)


@pytest.mark.gpu
def test_backward_is_deterministic_on_cuda(monkeypatch):
    """At a realistic shape, autotuned, where programs run concurrently and atomics would reorder sums."""
    monkeypatch.setattr(scan_kernels, "AUTOTUNE", True)
    _assert_backward_is_deterministic(_case(batch=4, dim=2048, length=2048, n_state=16, groups=None),
                                      torch.bfloat16, chunk_len=scan_op.GPU_CHUNK_LEN)


def _huge_buffer(length, stride):
    """(1, length, stride) bf16, uninitialised: 4.3 GB of address space, of which the tests touch a few columns."""
    try:
        return torch.empty(1, length, stride, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip(f"cannot reserve a 4.3 GB buffer: {error}")


def test_offsets_past_int32(monkeypatch):
    """Views with a position stride so large that (L - 1) * stride >= 2**31 elements (as the Mamba block's z,
    stride 2 * dim, at long L): the offsets must be int64. The same kernels on contiguous copies give the same bits.
    The shared buffer reserves 4.3 GB but only the few columns in use are written (a few MB touched), so this runs
    under the interpreter too; skipped where the allocation is refused."""
    monkeypatch.setattr(scan_kernels, "AUTOTUNE", True)
    torch.manual_seed(0)
    dim, n_state, stride = 8, 4, 2**24
    length = 2**31 // stride + 2  # 130 positions
    buffer = _huge_buffer(length, stride)

    def view(start, width):  # (1, width, L) with stride `stride` along L
        buffer[:, :, start:start + width] = torch.randn(1, length, width, device=DEVICE).to(torch.bfloat16)
        return buffer[:, :, start:start + width].transpose(1, 2)

    u, delta, z = view(0, dim), view(dim, dim), view(2 * dim, dim)
    B, C = view(3 * dim, n_state), view(3 * dim + n_state, n_state)
    assert (length - 1) * u.stride(2) >= 2**31
    A = -torch.rand(dim, n_state, device=DEVICE) * 2 - 0.1
    D, delta_bias = torch.randn(dim, device=DEVICE), torch.randn(dim, device=DEVICE)
    grad_out = torch.randn(1, dim, length, device=DEVICE).to(torch.bfloat16)
    strided = [u, delta, A, B, C, D, z, delta_bias]
    results = []
    for tensors in (strided, [t.contiguous() for t in strided]):
        out, last_state, chunk_states = selective_scan_fwd(*tensors, delta_softplus=True,
                                                           chunk_len=scan_op.GPU_CHUNK_LEN)
        grads = selective_scan_bwd(grad_out, *tensors, chunk_states, delta_softplus=True,
                                   chunk_len=scan_op.GPU_CHUNK_LEN)
        results.append([out, last_state, *grads])
    for name, got, want in zip(["out", "last_state", *(f"d{n}" for n in NAMES)], *results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_public_function_returns_out_and_a_constant_last_state():
    *tensors, _ = make_inputs(_case(length=9), torch.float32, seed=1)
    leaves = [t.requires_grad_() for t in tensors]
    out, last_state = selective_scan_triton(*leaves, True)
    want_out, want_state = selective_scan_reference(*leaves, delta_softplus=True)
    assert out.requires_grad and not last_state.requires_grad
    assert_matches("out", out.detach(), want_out.detach(), 9, 0.0)
    assert_matches("last_state", last_state, want_state.detach(), 9, 0.0)


def test_custom_op_passes_opcheck():
    """Schema, fake kernels, autograd registration and AOT dispatch agree with the real kernels."""
    *tensors, _ = make_inputs(_case(batch=1, dim=3, length=5, n_state=2), torch.float32, seed=2)
    leaves = [t.requires_grad_() for t in tensors]
    torch.library.opcheck(selective_scan_fwd, tuple(leaves), {"delta_softplus": True, "chunk_len": 4})
    no_optionals = (*leaves[:5], None, None, None)
    torch.library.opcheck(selective_scan_fwd, no_optionals, {"delta_softplus": False, "chunk_len": 4})


def test_compiles_without_graph_breaks_and_matches_eager():
    *tensors, _ = make_inputs(_case(batch=1, dim=5, length=21, groups=1), torch.float32, seed=4)
    leaves = [t.requires_grad_() for t in tensors]

    def loss(*inputs):
        out, last_state = selective_scan_triton(*inputs, True)
        return out.sin().sum() + last_state.sum()

    compiled = torch.compile(loss, fullgraph=True)  # fullgraph: a graph break is an error
    eager_loss = loss(*leaves)
    compiled_loss = compiled(*leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled_grads = torch.autograd.grad(compiled_loss, leaves)
    for name, got, want in zip(NAMES, compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"d{name}: {m}")


def test_double_backward_is_a_clear_error():
    *tensors, _ = make_inputs(_case(batch=1, dim=2, length=3, n_state=2), torch.float32, seed=5)
    u = tensors[0].requires_grad_()
    out, _ = selective_scan_triton(*tensors, True)
    (grad_u,) = torch.autograd.grad(out.sum(), u, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        grad_u.sum().backward()


def test_op_imports_without_triton():
    """op.py imports the kernel module only inside the op bodies, so machines without triton can import it."""
    code = ("import sys; sys.modules['triton'] = None; import archlab.kernels.selective_scan.op as op; "
            "assert 'archlab.kernels.selective_scan.triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": "0"})


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [None, 4])
def test_cuda_benchmark_shape_bf16_matches_reference(monkeypatch, groups):
    """B8 D2048 L2048 N16 in bf16 with z, D, delta_bias and softplus, autotuned, vs the fp32 reference on GPU."""
    monkeypatch.setattr(scan_kernels, "AUTOTUNE", True)
    case = _case(batch=8, dim=2048, length=2048, n_state=16, groups=groups, layout="contiguous")
    check_case(case, torch.bfloat16, seed=0, chunk_len=scan_op.chunk_len_for(torch.device("cuda")))
