"""Our peer backend (mamba_ssm's selective_scan_fn and mamba_chunk_scan_combined, causal-conv1d's causal_conv1d_fn,
fla's chunk_gated_delta_rule) agrees with our references on CUDA, forward and backward.

The peers are called through `backend="peer"`, as a model calls them (kernels/selective_scan/__init__.py,
kernels/causal_conv1d/__init__.py), not directly: a mistake in how we hand them our arguments (B and C, delta_bias,
the softplus flag, the activation's name, layouts, the last state) then shows as a disagreement with the reference.
The inputs are each op's fixed self-check cases (kernels/<op>/conformance.py: shared and grouped B/C, one position,
several chunks, optional inputs present and absent, channel-last x, fp32 weights beside bf16 x), judged as the
conformance test judges them (kernels/checking.py, the op's tolerances). tests/kernels/test_conformance.py also
draws random cases for the peer on a GPU; this file is the fixed check that says which package is missing.

The decoding steps (selective_state_update, causal_conv1d_update) have no peer backend: one implementation serves
every backend (tests/archs/test_cached_decoding.py covers it), so there is no peer call of ours to check there.

Without CUDA the GPU test is skipped; the CPU tests below show that `disagreements` catches a backend that makes
such mistakes, so a pass on the GPU means something.
"""
import dataclasses
import functools
import sys
import types

import pytest
import torch

from archlab.kernels.checking import compare_with_reference
from archlab.kernels.registry import KernelOp, kernel_ops

PEER_PACKAGES = {"selective_scan": "mamba_ssm", "causal_conv1d": "causal_conv1d", "ssd": "mamba_ssm",
                 "gated_delta": "fla"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def disagreements(op: KernelOp, backend: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    """One line per output or gradient where `backend` and op.reference differ beyond the conformance tolerance for
    `dtype`, over the op's self-check cases run on `device`; empty when they agree."""
    tolerance = op.conformance.tolerance(backend, dtype)
    return [f"case {i}: {problem}" for i, case in enumerate(op.conformance.self_check(dtype))
            for problem in compare_with_reference(op, backend, case, tolerance, device)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op_name", list(PEER_PACKAGES))
def test_peer_agrees_with_reference(op_name, dtype):
    package = PEER_PACKAGES[op_name]
    pytest.importorskip(package, reason=f"the {op_name} peer needs {package}; scripts/build_peers.sh build installs "
                                        "it for this GPU")
    problems = disagreements(kernel_ops()[op_name], "peer", dtype, torch.device("cuda"))
    assert not problems, f"{op_name} peer vs reference in {dtype}: " + "; ".join(problems)


# -- the comparison itself, on CPU: the reference as the backend, then the reference called with a mistake ----------
def called_with_mistake(op: KernelOp, *, inputs=None, output=None) -> KernelOp:
    """`op` whose dispatch runs the reference backend on `inputs(args, kwargs)` and returns `output(result)`: a
    stand-in for a peer that we call wrongly."""
    @functools.wraps(op.dispatch)  # keeps the signature: disagreements names gradients by argument
    def dispatch(*args, backend, **kwargs):
        if inputs is not None:
            args, kwargs = inputs(list(args), dict(kwargs))
        result = op.dispatch(*args, backend="reference", **kwargs)
        return result if output is None else output(result)

    return dataclasses.replace(op, dispatch=dispatch)


def swap_B_and_C(args, kwargs):
    args[3], args[4] = args[4], args[3]
    return args, kwargs


def without_softplus(args, kwargs):
    return args, kwargs | {"delta_softplus": False}


def without_dt_softplus(args, kwargs):
    return args, kwargs | {"dt_softplus": False}


def taps_reversed(args, kwargs):
    args[1] = args[1].flip(-1)  # weight (dim, width): a correlation where the peer means a convolution, or back
    return args, kwargs


def without_activation(args, kwargs):
    return args, kwargs | {"activation": None}


def gradients_one_percent_high(result):
    """The same forward values, every gradient through the first output 1.01x: a wrong backward only."""
    first = result[0] if isinstance(result, tuple) else result
    first = first + 0.01 * (first - first.detach())
    return (first, *result[1:]) if isinstance(result, tuple) else first


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op_name", list(PEER_PACKAGES))
def test_the_reference_agrees_with_itself(op_name, dtype):
    assert disagreements(kernel_ops()[op_name], "reference", dtype, torch.device("cpu")) == []


@pytest.mark.parametrize("op_name,mistake,first_problem", [
    ("selective_scan", dict(inputs=swap_B_and_C), "case 0: output 0:"),
    ("selective_scan", dict(inputs=without_softplus), "case 0: output 0:"),
    ("selective_scan", dict(output=gradients_one_percent_high), "case 0: du:"),
    ("causal_conv1d", dict(inputs=taps_reversed), "case 0: output 0:"),
    ("causal_conv1d", dict(inputs=without_activation), "case 0: output 0:"),
    ("causal_conv1d", dict(output=gradients_one_percent_high), "case 0: dx:"),
    ("ssd", dict(inputs=swap_B_and_C), "case 0: output 0:"),
    ("ssd", dict(inputs=without_dt_softplus), "case 0: output 0:"),
    ("ssd", dict(output=gradients_one_percent_high), "case 0: dx:"),
], ids=["scan-B-C-swapped", "scan-softplus-dropped", "scan-wrong-backward", "conv-taps-reversed",
        "conv-activation-dropped", "conv-wrong-backward", "ssd-B-C-swapped", "ssd-softplus-dropped",
        "ssd-wrong-backward"])
def test_disagreements_catches_a_backend_called_wrongly(op_name, mistake, first_problem):
    problems = disagreements(called_with_mistake(kernel_ops()[op_name], **mistake), "peer", torch.float32,
                             torch.device("cpu"))
    assert problems and problems[0].startswith(first_problem), problems


def test_the_conv_peer_gets_only_layouts_causal_conv1d_takes(monkeypatch):
    """causal-conv1d's kernel refuses a channel-last x whose dim or strides are not multiples of 8, and the
    self-check cases have such inputs (dim 3 and 4). A stand-in package that refuses them as the real one does
    (csrc/causal_conv1d.cpp) shows that our peer call copies those to contiguous and keeps the rest as they are."""
    from archlab.kernels import causal_conv1d as conv

    layouts = []

    def causal_conv1d_fn(x, weight, bias=None, activation=None, seq_idx=None):
        assert seq_idx is None  # the unpacked cases here
        assert x.stride(2) == 1 or x.stride(1) == 1
        channel_last = x.stride(1) == 1 and x.stride(2) > 1
        if channel_last:
            assert x.shape[1] % 8 == 0, "causal_conv1d only supports channel dimension divisible by 8 for now"
            assert x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, "channel last layout requires strides % 8 == 0"
        layouts.append(channel_last)
        return conv.causal_conv1d_reference(x, weight, bias, activation)

    monkeypatch.setitem(sys.modules, "causal_conv1d", types.SimpleNamespace(causal_conv1d_fn=causal_conv1d_fn))
    mamba_like = torch.randn(2, 12, 32).transpose(1, 2)  # (batch, L, E) seen as (batch, E, L), E a multiple of 8
    cases = [case.args for case in conv.CONFORMANCE.self_check(torch.float32)
             if case.kwargs.get("seq_idx") is None] + [(mamba_like, torch.randn(32, 4))]
    for x, weight, *bias in cases:
        bias = bias[0] if bias else None
        torch.testing.assert_close(conv._peer(x, weight, bias, "silu"),
                                   conv.causal_conv1d_reference(x, weight, bias, "silu"))
    # the self-check cases' channel-last x (dim 3 and 4) went over contiguous, the Mamba-like one as it was
    assert layouts == [False, False, False, False, True]


class _BackwardRefused(torch.autograd.Function):
    """mamba_ssm's `assert not ctx.return_varlen_states` in its backward."""

    @staticmethod
    def forward(ctx, out):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("return_varlen_states is not supported in backward")


def test_the_ssd_peer_maps_packed_sequences_as_mamba_ssm_takes_them(monkeypatch):
    """A stand-in for mamba_ssm's mamba_chunk_scan_combined with its interface and limits (resets on seq_idx,
    per-sequence states only with return_varlen_states, whose backward asserts; chunks of 16 and up) shows that our
    peer call maps cu_seqlens to seq_idx, takes the per-sequence states from a forward-only call, and backpropagates
    through the other: the self-check cases, packed and not, agree with the reference forward and backward."""
    from archlab.kernels import ssd as ssd_op

    calls = []

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False):
        assert chunk_size >= 16
        calls.append((seq_idx is not None, return_varlen_states, torch.is_grad_enabled()))
        bounds = None
        if seq_idx is not None:  # its reset rule: a new sequence wherever seq_idx changes
            starts = torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1]).flatten() + 1
            bounds = torch.tensor([0, *starts.tolist(), x.shape[1]], dtype=torch.int32)
        out, finals = ssd_op.ssd_reference(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states,
                                           bounds)
        if return_varlen_states:
            assert cu_seqlens is not None and torch.equal(cu_seqlens, bounds)
            return _BackwardRefused.apply(out), finals
        row_finals = finals if bounds is None else finals[-1:]  # with seq_idx: the row's last sequence's
        return (out, row_finals) if return_final_states else out

    ssd_combined = types.SimpleNamespace(mamba_chunk_scan_combined=mamba_chunk_scan_combined)
    for name, module in (("mamba_ssm", types.ModuleType("mamba_ssm")), ("mamba_ssm.ops", types.ModuleType("o")),
                         ("mamba_ssm.ops.triton", types.ModuleType("t")),
                         ("mamba_ssm.ops.triton.ssd_combined", ssd_combined)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(ssd_op, "resolve_backend", lambda op, backend, device, dtype: backend)  # peer off CUDA
    assert disagreements(kernel_ops()["ssd"], "peer", torch.float32, torch.device("cpu")) == []
    case = ssd_op.CONFORMANCE.self_check(torch.float32)[2]  # packed, at a chunk size below the peer's least
    out, final = ssd_op.ssd(*case.args, **{**case.kwargs, "chunk_size": 1}, backend="peer")
    want_out, want_final = ssd_op.ssd(*case.args, **case.kwargs, backend="reference")
    torch.testing.assert_close((out, final), (want_out, want_final))
    packed = [call for call in calls if call[0]]
    assert packed and all((varlen, grad) in ((False, True), (True, False)) for _, varlen, grad in packed)
