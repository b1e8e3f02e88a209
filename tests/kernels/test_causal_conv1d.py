"""Causal conv1d: every backend against the float32 reference, the Triton op's plumbing, the decoding step.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py), so their shapes stay small.
"""
import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.kernels.causal_conv1d import (causal_conv1d, causal_conv1d_reference, causal_conv1d_triton,
                                           causal_conv1d_update)

pytest.importorskip("triton")
from archlab.kernels.causal_conv1d import triton as conv_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 1, lengths below the width, primes, and neighbours of the 32-position test blocks and 48-position chunks
LENGTHS = [1, 2, 3, 5, 7, 31, 32, 33, 47, 49, 64, 97, 131, 257, 300]
LAYOUTS = ["contiguous", "channel_last", "sliced"]


@pytest.fixture(autouse=True)
def fixed_blocks(monkeypatch):
    """Small fixed blocks everywhere, so a GPU run does not autotune every drawn shape."""
    monkeypatch.setattr(conv_triton, "AUTOTUNE", False)


def make_x(batch, dim, length, dtype, layout):
    """(batch, dim, L); channel_last is a (batch, L, dim) tensor transposed, as the Mamba block passes it."""
    if layout == "channel_last":
        return torch.randn(batch, length, dim).to(dtype).transpose(1, 2)
    if layout == "sliced":
        return torch.randn(batch, dim, 2 * length).to(dtype)[..., ::2]
    return torch.randn(batch, dim, length).to(dtype)


def naive_conv(x, weight, bias, activation):
    """The formula written out in x's own dtype (no fp32 upcast): what plain low-precision math gives."""
    width, length = weight.shape[1], x.shape[2]
    padded = F.pad(x, (width - 1, 0))
    out = sum(weight[:, k, None].to(x.dtype) * padded[:, :, k:k + length] for k in range(width))
    if bias is not None:
        out = out + bias.to(x.dtype)[:, None]
    return F.silu(out) if activation == "silu" else out


def output_and_grads(fn, x, weight, bias, dout, **kw):
    """[out, dx, dweight(, dbias)] of fn on fresh leaves. They share the inputs' memory: clone() would make the
    non-dense layouts (sliced x, strided bias) contiguous and hide them."""
    leaves = [t.detach().requires_grad_() for t in (x, weight) + (() if bias is None else (bias,))]
    x, weight, bias = leaves[0], leaves[1], leaves[2] if bias is not None else None
    out = fn(x, weight, bias, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


@st.composite
def conv_cases(draw):
    length = draw(st.sampled_from(LENGTHS))
    long = length > 64  # the interpreter's cost grows with batch * dim * L: long sequences get few channels
    return dict(batch=draw(st.integers(1, 2 if long else 3)), dim=draw(st.integers(1, 4 if long else 9)),
                length=length, width=draw(st.integers(2, 4)), bias=draw(st.sampled_from([False, True, "strided"])),
                activation=draw(st.sampled_from([None, "silu"])), layout=draw(st.sampled_from(LAYOUTS)),
                dout_channel_last=draw(st.booleans()), chunk_len=draw(st.sampled_from([48, 512])))


def make_inputs(case, dtype, weight_dtype, seed):
    torch.manual_seed(seed)
    batch, dim, length = case["batch"], case["dim"], case["length"]
    x = make_x(batch, dim, length, dtype, case["layout"]).to(DEVICE)
    weight = (torch.randn(dim, case["width"]) / case["width"] ** 0.5).to(weight_dtype).to(DEVICE)
    if case["bias"] == "strided":  # stride 2: a column of a (dim, 2) buffer
        bias = torch.randn(dim, 2).to(weight_dtype).to(DEVICE)[:, 1]
    else:
        bias = torch.randn(dim).to(weight_dtype).to(DEVICE) if case["bias"] else None
    dout = make_x(batch, dim, length, dtype, "channel_last" if case["dout_channel_last"] else "contiguous")
    return x, weight, bias, dout.to(DEVICE)


def run_case(case, dtype, weight_dtype, backend, seed):
    """Inputs, the backend's results, and the fp32 reference's results on the very same (rounded) inputs."""
    x, weight, bias, dout = inputs = make_inputs(case, dtype, weight_dtype, seed)
    with mock.patch.object(conv_triton, "BWD_CHUNK_LEN", case["chunk_len"]):  # 48: several backward chunks
        got = output_and_grads(causal_conv1d, x, weight, bias, dout, activation=case["activation"], backend=backend)
    upcast = [None if t is None else t.float() for t in (x, weight, bias)]
    want = output_and_grads(causal_conv1d, *upcast, dout.float(), activation=case["activation"], backend="reference")
    return inputs, got, want


NAMES = ["out", "dx", "dweight", "dbias"]


def check_float32(case, backend, seed):
    _, got, want = run_case(case, torch.float32, torch.float32, backend, seed)
    # dweight and dbias sum batch * L products: fp32 rounding grows with the number of terms
    terms = case["batch"] * case["length"]
    for name, g, w in zip(NAMES[:len(got)], got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape
        atol = 1e-5 if name in ("out", "dx") else 1e-6 * terms
        torch.testing.assert_close(g, w, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_torch_float32_matches_reference(case, seed):
    check_float32(case, "torch", seed)


@settings(max_examples=20, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_triton_float32_matches_reference(case, seed):
    check_float32(case, "triton", seed)


@settings(max_examples=15, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), weight_in_fp32=st.booleans(),
       seed=st.integers(0, 2**16))
def test_triton_low_precision_rounds_once(case, dtype, weight_in_fp32, seed):
    """The kernels compute in fp32 and round each result once: within one unit in the last place of the fp32
    reference (a rounding to nearest is half a unit; the other half covers fp32 sums taken in another order)."""
    weight_dtype = torch.float32 if weight_in_fp32 else dtype
    _, got, want = run_case(case, dtype, weight_dtype, "triton", seed)
    for name, g, w in zip(NAMES[:len(got)], got, want, strict=True):
        result_dtype = dtype if name in ("out", "dx") else weight_dtype
        assert g.dtype == result_dtype
        ulp = torch.finfo(result_dtype).eps * w.abs()
        fp32_noise = 1e-5 * max(w.abs().max().item(), 1.0)
        error = (g.float() - w).abs()
        assert (error <= ulp + fp32_noise).all(), f"{name}: max error {error.max():.3g} is more than one ulp"


@settings(max_examples=40, deadline=None)
@given(case=conv_cases(), dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_torch_low_precision_is_as_close_as_low_precision_math(case, dtype, seed):
    """The torch backend may err by at most about what the formula computed in `dtype` errs by."""
    (x, weight, bias, dout), got, want = run_case(case, dtype, dtype, "torch", seed)
    plain = output_and_grads(naive_conv, x, weight, bias, dout, activation=case["activation"])
    for name, g, p, w in zip(NAMES[:len(got)], got, plain, want, strict=True):
        assert g.dtype == dtype
        plain_error = (p.float() - w).abs().max().item()
        # floor: a few units of rounding of the result, for cases where plain math happens to be exact
        floor = 4 * torch.finfo(dtype).eps * max(w.abs().max().item(), 1.0)
        error = (g.float() - w).abs().max().item()
        assert error <= 2 * plain_error + floor, f"{name}: error {error:.3g} vs plain {dtype} math {plain_error:.3g}"


def test_swish_is_silu_and_auto_is_torch_on_cpu():
    x, weight, bias = torch.randn(2, 3, 9), torch.randn(3, 4), torch.randn(3)
    expected = causal_conv1d_reference(x, weight, bias, "silu")
    torch.testing.assert_close(causal_conv1d(x, weight, bias, "swish", backend="reference"), expected)
    if DEVICE == "cpu":
        assert torch.equal(causal_conv1d(x, weight, bias, "silu"), causal_conv1d(x, weight, bias, "silu",
                                                                                 backend="torch"))


# -- the Triton op ----------------------------------------------------------------------------------------
def _small(dtype=torch.float32, layout="contiguous", length=45, dim=6, width=4):
    torch.manual_seed(0)
    x = make_x(2, dim, length, dtype, layout).to(DEVICE).requires_grad_()
    weight = torch.randn(dim, width, device=DEVICE, requires_grad=True)
    bias = torch.randn(dim, device=DEVICE, requires_grad=True)
    return x, weight, bias


def _assert_backward_is_deterministic(x, weight, bias):
    dout = torch.randn(x.shape, device=x.device).to(x.dtype)
    runs = [output_and_grads(causal_conv1d, x, weight, bias, dout, activation="silu", backend="triton")
            for _ in range(2)]
    for name, first, second in zip(NAMES, *runs, strict=True):
        assert torch.equal(first, second), f"{name} differs between two runs"


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_triton_backward_is_deterministic(monkeypatch, layout):
    """Cannot fail under the (sequential) interpreter; it checks the plumbing. The GPU variant below is the test."""
    monkeypatch.setattr(conv_triton, "BWD_CHUNK_LEN", 16)  # several partial rows per channel to sum
    _assert_backward_is_deterministic(*_small(torch.bfloat16, layout, length=40, dim=3))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_triton_backward_is_deterministic_on_cuda(monkeypatch, layout):
    """At a realistic shape, autotuned, where programs run concurrently and atomics would reorder sums."""
    monkeypatch.setattr(conv_triton, "AUTOTUNE", True)
    torch.manual_seed(0)
    x = make_x(4, 2048, 2048, torch.bfloat16, layout).to(DEVICE)
    weight, bias = torch.randn(2048, 4, device=DEVICE), torch.randn(2048, device=DEVICE)
    _assert_backward_is_deterministic(x, weight.to(torch.bfloat16), bias.to(torch.bfloat16))


def _huge_buffer(length, stride):
    """(1, length, stride) bf16, uninitialised: 4.3 GB of address space, of which the tests touch a few columns."""
    try:
        return torch.empty(1, length, stride, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip(f"cannot reserve a 4.3 GB buffer: {error}")


def test_channel_last_offsets_past_int32(monkeypatch):
    """A channel-last x whose position stride makes (L - 1) * stride >= 2**31 elements (the Mamba block's in_proj
    view has stride 2 * dim): the offsets must be int64. The same kernels on a channel-last copy give the same bits.
    The shared buffer reserves 4.3 GB but only the few columns in use are written (a few MB touched), so this runs
    under the interpreter too; skipped where the allocation is refused."""
    monkeypatch.setattr(conv_triton, "AUTOTUNE", True)
    torch.manual_seed(0)
    dim, stride = 8, 2**24
    length = 2**31 // stride + 2  # 130 positions
    buffer = _huge_buffer(length, stride)
    buffer[:, :, :dim] = torch.randn(1, length, dim, device=DEVICE).to(torch.bfloat16)
    x = buffer[:, :, :dim].transpose(1, 2)
    assert (length - 1) * x.stride(2) >= 2**31
    copy = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel-last too, so the same kernels run
    weight, bias = torch.randn(dim, 4, device=DEVICE), torch.randn(dim, device=DEVICE)
    dout = torch.randn(1, dim, length, device=DEVICE).to(torch.bfloat16)
    got, want = (output_and_grads(causal_conv1d, t, weight, bias, dout, activation="silu", backend="triton")
                 for t in (x, copy))
    for name, g, w in zip(NAMES, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


# -- every GPU autotune config, under the interpreter -------------------------------------------------------------
def _config_blocks(tuned):
    """The distinct block sizes among an autotuner's configs (the interpreter ignores num_warps)."""
    return sorted({(config.kwargs["BLOCK_D"], config.kwargs["BLOCK_L"]) for config in tuned.configs})


GPU_CONFIGS = [pytest.param(direction, channel_last, blocks, id=f"{direction}-{layout}-D{blocks[0]}-L{blocks[1]}")
               for direction, tuned in (("fwd", conv_triton._fwd_tuned), ("bwd", conv_triton._bwd_tuned))
               for channel_last, layout in ((False, "channel_first"), (True, "channel_last"))
               for blocks in _config_blocks(tuned[channel_last])]


@pytest.mark.parametrize("direction,channel_last,blocks", GPU_CONFIGS)
def test_every_gpu_config(monkeypatch, direction, channel_last, blocks):
    """Each block size of the GPU autotuner, forward and backward, both layouts, in bf16 (so channel-first reads
    8-position vectors, as on the GPU): dim just over BLOCK_D, L just over BLOCK_L (and, for the 512-position
    blocks, over a backward chunk), against the fp32 reference within one rounding."""
    block_d, block_l = blocks
    monkeypatch.setattr(conv_triton, "FIXED_BLOCKS", {"BLOCK_D": block_d, "BLOCK_L": block_l})
    case = dict(batch=1, dim=block_d + 1, length=block_l + 3, width=4, bias="strided", activation="silu",
                layout="channel_last" if channel_last else "contiguous", dout_channel_last=channel_last,
                chunk_len=conv_triton.BWD_CHUNK_LEN)
    x, weight, bias, dout = make_inputs(case, torch.bfloat16, torch.float32, seed=block_d + block_l)
    upcast = [x.float().requires_grad_(), weight.requires_grad_(), bias.requires_grad_()]
    want_out = causal_conv1d_reference(*upcast, "silu")
    if direction == "fwd":
        got, want = [conv_triton.causal_conv1d_fwd(x, weight, bias, silu=True)], [want_out.detach()]
    else:
        got = conv_triton.causal_conv1d_bwd(dout, x, weight, bias, silu=True)
        want = torch.autograd.grad(want_out, upcast, dout.float())
    for name, g, w in zip(["out"] if direction == "fwd" else NAMES[1:], got, want, strict=True):
        assert g.shape == w.shape, name
        error = (g.float() - w).abs()
        allowed = torch.finfo(g.dtype).eps * w.abs() + 1e-5 * max(w.abs().max().item(), 1.0)
        assert (error <= allowed).all(), f"{name}: max error {error.max():.3g}"


def test_strided_bias():
    """A bias with stride 2: right output, and a dbias of the bias's own shape (dim,)."""
    for layout in ("contiguous", "channel_last"):
        case = dict(batch=2, dim=6, length=37, width=4, bias="strided", activation="silu", layout=layout,
                    dout_channel_last=False, chunk_len=16)
        check_float32(case, "triton", seed=1)


def test_triton_output_keeps_the_channel_last_layout():
    x, weight, bias = _small(layout="channel_last")
    out = causal_conv1d(x, weight, bias, "silu", backend="triton")
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, causal_conv1d_reference(x, weight, bias, "silu"), rtol=1e-5, atol=1e-5)


def test_custom_op_passes_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch agree with the real kernel."""
    for layout in ("contiguous", "channel_last"):
        x, weight, bias = _small(layout=layout, length=9, dim=3)
        torch.library.opcheck(causal_conv1d_triton, (x, weight, bias, True))
    x, weight, _ = _small(length=9, dim=3, width=2)
    torch.library.opcheck(causal_conv1d_triton, (x, weight, None, False))


def test_compiles_without_graph_breaks():
    x, weight, bias = _small(length=20, dim=3)

    def loss(x, weight, bias):
        return causal_conv1d(x, weight, bias, "silu", backend="triton").sin().sum()

    compiled = torch.compile(loss, fullgraph=True)  # fullgraph: a graph break is an error
    eager = loss(x, weight, bias)
    eager_grads = torch.autograd.grad(eager, (x, weight, bias))
    result = compiled(x, weight, bias)
    compiled_grads = torch.autograd.grad(result, (x, weight, bias))
    torch.testing.assert_close(result, eager)
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_double_backward_is_a_clear_error():
    x, weight, bias = _small(length=8, dim=2)
    out = causal_conv1d(x, weight, bias, "silu", backend="triton")
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative; use backend='torch'"):
        grad_x.sum().backward()


# -- decoding step ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)])
def test_update_steps_through_the_full_conv(width, dtype, state_dtype):
    torch.manual_seed(width)
    batch, dim, length = 2, 5, 7
    x = torch.randn(batch, dim, length).to(dtype)
    weight, bias = torch.randn(dim, width), torch.randn(dim)
    state = torch.zeros(batch, dim, width - 1, dtype=state_dtype)
    steps = []
    for t in range(length):
        steps.append(causal_conv1d_update(x[:, :, t], state, weight, bias, "silu"))
        assert steps[-1].dtype == dtype and state.dtype == state_dtype
        # the state is the last width - 1 inputs, oldest first, zeros before position 0
        last_inputs = F.pad(x[:, :, :t + 1], (width - 1, 0))[..., -(width - 1):]
        torch.testing.assert_close(state, last_inputs.to(state_dtype), rtol=0, atol=0)
    full = causal_conv1d_reference(x, weight, bias, "silu")
    # the same fp32 sums: equal up to the last rounding into dtype
    torch.testing.assert_close(torch.stack(steps, dim=-1), full, rtol=torch.finfo(dtype).eps, atol=1e-6)
    torch.testing.assert_close(state, x[:, :, -(width - 1):].to(state_dtype))


# -- input checks and backends off the GPU ---------------------------------------------------------------
def _args(x=(2, 3, 8), weight=(3, 4), bias=(3,), dtype=torch.float32):
    return (torch.randn(x, dtype=dtype), torch.randn(weight), None if bias is None else torch.randn(bias))


@pytest.mark.parametrize("args,activation,error,message", [
    ((torch.randn(3, 8), *_args()[1:]), None, ValueError, r"x must be 3-D \(batch, dim, L\)"),
    (([[1.0]], *_args()[1:]), None, TypeError, "x must be a torch.Tensor, got list"),
    (_args(dtype=torch.float64), None, TypeError, "x has dtype torch.float64; use float32"),
    (_args(x=(2, 3, 0)), None, ValueError, "empty input x"),
    (_args(weight=(4, 4)), None, ValueError, r"weight \(4, 4\) must have x's dim 3 rows"),
    (_args(weight=(3,)), None, ValueError, r"weight must be 2-D \(dim, width\)"),
    (_args(weight=(3, 5)), None, ValueError, "width must be 2, 3 or 4"),
    (_args(weight=(3, 1)), None, ValueError, "width must be 2, 3 or 4"),
    (_args(bias=(4,)), None, ValueError, r"bias must have shape \(3,\)"),
    ((*_args()[:2], torch.randn(3, dtype=torch.float64)), None, TypeError, "bias has dtype torch.float64"),
    ((*_args()[:2], torch.randn(3, device="meta")), None, ValueError, "must be on one device"),
    (_args(), "relu", ValueError, "activation must be None or 'silu' .'swish' is an alias., got 'relu'"),
    (_args(), True, ValueError, "activation must be None or 'silu'"),
])
def test_bad_inputs_are_one_line_errors(args, activation, error, message):
    with pytest.raises(error, match=message) as info:
        causal_conv1d(*args, activation=activation)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("x,state,weight,message", [
    ((2, 3, 1), (2, 3, 3), (3, 4), r"x must be 2-D \(batch, dim\)"),
    ((2, 3), (2, 3, 4), (3, 4), r"conv_state must have shape \(batch, dim, width - 1\) = \(2, 3, 3\), got"),
    ((2, 3), (1, 3, 3), (3, 4), "conv_state must have shape"),
    ((2, 3), (2, 3), (3, 4), r"conv_state must be 3-D"),
    ((2, 3), (2, 3, 3), (2, 4), "must have x's dim 3 rows"),
])
def test_bad_update_inputs_are_one_line_errors(x, state, weight, message):
    with pytest.raises(ValueError, match=message) as info:
        causal_conv1d_update(torch.randn(x), torch.zeros(state), torch.randn(weight))
    assert "\n" not in str(info.value)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU messages")
def test_peer_off_the_gpu_and_without_the_package_says_what_to_do(monkeypatch):
    with pytest.raises(ValueError, match="'peer' backend for causal_conv1d runs third-party CUDA kernels.*use auto"):
        causal_conv1d(*_args(), backend="peer")
    import archlab.kernels.causal_conv1d as conv_module

    monkeypatch.setattr(conv_module, "resolve_backend", lambda op, requested, device, dtype: requested)  # as on CUDA
    monkeypatch.setitem(sys.modules, "causal_conv1d", None)  # makes the import fail as if it were missing
    with pytest.raises(ImportError, match=r"needs causal-conv1d .*pip install -e \.\[peers\]"):
        causal_conv1d(*_args(), backend="peer")


# -- on the GPU: the Mamba shape ------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
@pytest.mark.parametrize("backend", ["triton", "peer"])
def test_mamba_shape_on_cuda_matches_torch_backend(monkeypatch, layout, backend):
    """B8 D4096 L2048 width 4, bf16, SiLU: autotuned kernels against the torch backend and the fp32 reference."""
    if backend == "peer":
        pytest.importorskip("causal_conv1d")
    monkeypatch.setattr(conv_triton, "AUTOTUNE", True)
    case = dict(batch=8, dim=4096, length=2048, width=4, bias=True, activation="silu", layout=layout,
                dout_channel_last=False, chunk_len=conv_triton.BWD_CHUNK_LEN)
    inputs, got, want = run_case(case, torch.bfloat16, torch.bfloat16, backend, seed=0)
    torch_backend = output_and_grads(causal_conv1d, *inputs, activation="silu", backend="torch")
    for name, g, t, w in zip(NAMES[:len(got)], got, torch_backend, want, strict=True):
        error, torch_error = ((r.float() - w).abs().max().item() for r in (g, t))
        assert error <= 2 * torch_error + 1e-2, f"{name}: error {error:.3g} vs torch backend {torch_error:.3g}"
