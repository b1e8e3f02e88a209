"""Depthwise causal conv1d: `causal_conv1d(x, weight, bias=None, activation=None, backend="auto", seq_idx=None)`.

Layout as in the causal-conv1d package: x (batch, dim, L), weight (dim, width) with width 2..4, bias (dim,);
out[:, d, t] = act(bias[d] + sum_k weight[d, k] * x[:, d, t - (width - 1) + k]) in x's dtype.
seq_idx (batch, L), int32 or int64 on x's device, packs documents in a row (the packing convention of issue 19, as
the causal-conv1d package's seq_idx): a tap reads x[s] only where seq_idx[b, s] == seq_idx[b, t], so each document
is convolved as if it ran alone (its first width - 1 outputs see zeros, not the previous document). Only equality
counts, so a flipped row (a reversed layer's) works too. The peer takes it only for a channel-last x with dim a
multiple of 8 (a channel-first x is copied to channel-last for it); `auto` runs our Triton kernel otherwise.
`activation` is None or "silu"; "swish" is accepted as another name for SiLU, as the peer does.
x may be channel-last (a (batch, L, dim) tensor transposed), as the Mamba block passes it; the triton
backend reads it in place and returns out in the same layout.

`causal_conv1d_update(x, conv_state, weight, bias, activation)` is one decoding step: x (batch, dim),
conv_state (batch, dim, width - 1) holding the previous inputs, oldest first, shifted in place.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from archlab.kernels.backend import PEER_INSTALL_HINT, refuse_double_backward, resolve_backend
from archlab.kernels.common.inputs import check_seq_idx
from archlab.kernels.causal_conv1d.conformance import CONFORMANCE
from archlab.kernels.causal_conv1d.reference import (causal_conv1d_reference, causal_conv1d_update_reference,
                                                     same_document_taps)
from archlab.kernels.registry import KernelBench, KernelOp, register

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_reference", "causal_conv1d_update_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
WIDTHS = (2, 3, 4)
ACTIVATIONS = {None: None, "silu": "silu", "swish": "silu"}  # the peer's names, mapped to ours


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                  backend: str = "auto", seq_idx: Tensor | None = None) -> Tensor:
    """x (batch, dim, L), weight (dim, width) -> out (batch, dim, L) in x's dtype. See the module docstring."""
    activation = _check_inputs(x, weight, bias, activation, seq_idx)
    name = resolve_backend("causal_conv1d", backend, x.device, x.dtype)
    if name == "peer" and seq_idx is not None and not _peer_takes_seq_idx(x):
        if backend == "peer":
            raise ValueError(f"causal_conv1d: the 'peer' backend (causal-conv1d) takes seq_idx only with a dim that "
                             f"is a multiple of 8, got dim {x.shape[1]}; use backend='triton' or 'auto'")
        name = "triton"  # auto: our kernel honours seq_idx at any dim
    if name == "triton":
        return causal_conv1d_triton(x, weight, bias, activation == "silu", seq_idx)
    if name == "reference":
        return causal_conv1d_reference(x, weight, bias, activation, seq_idx)
    if name == "peer":
        return _peer(x, weight, bias, activation, seq_idx)
    return _torch(x, weight, bias, activation, seq_idx)


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None,
                         activation: str | None = None) -> Tensor:
    """One decoding step: x (batch, dim) -> (batch, dim); conv_state (batch, dim, width - 1) shifts in place
    and keeps its dtype. Computed as causal_conv1d_update_reference does (the window in x's dtype, fp32 math)."""
    activation = _check_update_inputs(x, conv_state, weight, bias, activation)
    # the reference convolves the (width)-long window: O(width^2) per channel, nothing next to a decoding step
    return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)


def _torch(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None, seq_idx: Tensor | None) -> Tensor:
    if seq_idx is not None:
        out = _within_documents(x, weight, bias, seq_idx)
        return F.silu(out) if activation == "silu" else out
    width, length = weight.shape[1], x.shape[2]
    # depthwise (groups=dim); padding both sides then cutting to L is the causal (left-padded) conv. As a conv2d of
    # height 1, which oneDNN runs channels-last on a channel-last x (the Mamba block's) without copying it and
    # returns channel-last: forward + backward 1.6x faster than F.conv1d at B32 D256 L128 on CPU, and the Mamba
    # block's x_proj then reads the output without a copy either
    out = F.conv2d(x[:, :, None], weight.to(x.dtype)[:, None, None, :], None if bias is None else bias.to(x.dtype),
                   padding=(0, width - 1), groups=x.shape[1])[:, :, 0, :length]
    return F.silu(out) if activation == "silu" else out


def _within_documents(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor) -> Tensor:
    """The pre-activation with seq_idx, in x's dtype: width masked shifted multiply-adds. Faster than the conv2d above
    plus a sparse correction of the taps that cross a document start: forward + backward at B32 D256 L128 width 4,
    SiLU, ~4 documents a row, one-thread CPU time 20.7 vs 30.7 ms channel-last and 18.3 vs 26.7 ms channel-first
    (the conv2d without seq_idx: 18.7 and 13.4 ms)."""
    width, length = weight.shape[1], x.shape[2]
    padded = F.pad(x, (width - 1, 0))
    weight = weight.to(x.dtype)
    out = sum(weight[:, k, None] * (padded[:, :, k:k + length] * same[:, None].to(x.dtype))
              for k, same in enumerate(same_document_taps(seq_idx, width)))
    return out if bias is None else out + bias.to(x.dtype)[:, None]


def _peer(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
          seq_idx: Tensor | None = None) -> Tensor:
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError as error:
        raise ImportError(f"the 'peer' backend for causal_conv1d needs causal-conv1d ({error}); {PEER_INSTALL_HINT}, "
                          "or use auto") from None
    if seq_idx is not None:  # the package reads seq_idx (int32, contiguous) only with a channel-last x
        if not (is_channel_last(x) and _peer_takes_channel_last(x)):
            x = rearrange(rearrange(x, "b d l -> b l d").contiguous(), "b l d -> b d l")
        seq_idx = seq_idx.to(torch.int32).contiguous()
    elif not (x.is_contiguous() or (is_channel_last(x) and _peer_takes_channel_last(x))):
        x = x.contiguous()  # the package takes (batch, dim, L) contiguous or channel-last, nothing else
    return causal_conv1d_fn(x, weight, bias, seq_idx=seq_idx, activation=activation)


def _peer_takes_seq_idx(x: Tensor) -> bool:
    """causal-conv1d reads seq_idx only with a channel-last x, which needs dim to be a multiple of 8."""
    return x.shape[1] % 8 == 0


def _peer_takes_channel_last(x: Tensor) -> bool:
    """causal-conv1d refuses a channel-last x unless dim and x.stride(0), x.stride(2) are multiples of 8
    ("causal_conv1d only supports channel dimension divisible by 8")."""
    return x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0


# -- layout shared by the Triton kernels and the custom op's fake implementation ------------------------------
def is_channel_last(x: Tensor) -> bool:
    """dim is the unit-stride axis (and L is not): a (batch, L, dim) tensor seen as (batch, dim, L)."""
    return x.stride(1) == 1 and x.stride(2) != 1


def new_like_x(x: Tensor) -> Tensor:
    """An uninitialised (batch, dim, L) tensor in x's dtype, channel-last exactly when x is."""
    batch, dim, length = x.shape
    if is_channel_last(x):
        return x.new_empty((batch, length, dim)).transpose(1, 2)
    return x.new_empty((batch, dim, length))


# -- our Triton kernels as a torch.library custom op: opaque to torch.compile, differentiable ------------
# The kernel module is imported on first use, so machines without triton can still import this package.

@torch.library.custom_op("archlab::causal_conv1d", mutates_args=())
def causal_conv1d_triton(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                         seq_idx: Tensor | None = None) -> Tensor:
    """Triton forward: out (batch, dim, L) in x's dtype, channel-last exactly when x is."""
    from archlab.kernels.causal_conv1d.triton import causal_conv1d_fwd

    return causal_conv1d_fwd(x, weight, bias, silu, seq_idx)


@causal_conv1d_triton.register_fake
def _(x, weight, bias, silu, seq_idx=None):
    return new_like_x(x)


@torch.library.custom_op("archlab::causal_conv1d_backward", mutates_args=())
def causal_conv1d_triton_backward(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool,
                                  seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Triton backward (deterministic: no atomics): dx, dweight, dbias (float32 zeros' shape without a bias)."""
    from archlab.kernels.causal_conv1d.triton import causal_conv1d_bwd

    return causal_conv1d_bwd(grad_out, x, weight, bias, silu, seq_idx)


@causal_conv1d_triton_backward.register_fake
def _(grad_out, x, weight, bias, silu, seq_idx=None):
    bias_dtype = torch.float32 if bias is None else bias.dtype
    return new_like_x(x), weight.new_empty(weight.shape), weight.new_empty(weight.shape[:1], dtype=bias_dtype)


refuse_double_backward(causal_conv1d_triton_backward, "archlab::causal_conv1d", "backend='torch'")


def _save_for_backward(ctx, inputs, output):
    x, weight, bias, silu, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx)
    ctx.silu, ctx.has_bias = silu, bias is not None


def _causal_conv1d_grad(ctx, grad_out):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_triton_backward(grad_out, x, weight, bias, ctx.silu, seq_idx)
    return dx, dweight, dbias if ctx.has_bias else None, None, None


causal_conv1d_triton.register_autograd(_causal_conv1d_grad, setup_context=_save_for_backward)


# -- input checks: one-line errors, raised before any work ------------------------------------------------
def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"causal_conv1d: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"causal_conv1d: {name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"causal_conv1d: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")


def _check_weight_bias_activation(x: Tensor, weight: Tensor, bias: Tensor | None, activation) -> str | None:
    dim = x.shape[1]
    _check_tensor("weight", weight, 2, "(dim, width)")
    if weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight {tuple(weight.shape)} must have x's dim {dim} rows")
    if weight.shape[1] not in WIDTHS:
        raise ValueError(f"causal_conv1d: width must be 2, 3 or 4, got weight {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, 1, "(dim,)")
        if bias.shape[0] != dim:
            raise ValueError(f"causal_conv1d: bias must have shape ({dim},) to match x's dim, got {tuple(bias.shape)}")
    tensors = [x, weight] + ([] if bias is None else [bias])
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"causal_conv1d: x, weight and bias must be on one device, got "
                         f"{', '.join(str(t.device) for t in tensors)}")
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be None or 'silu' ('swish' is an alias), got {activation!r}")
    return ACTIVATIONS[activation]


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, activation, seq_idx: Tensor | None) -> str | None:
    _check_tensor("x", x, 3, "(batch, dim, L)")
    if 0 in x.shape:
        raise ValueError(f"causal_conv1d: empty input x {tuple(x.shape)}; batch, dim and L must be >= 1")
    if seq_idx is not None:
        check_seq_idx("causal_conv1d", seq_idx, x.shape[0], x.shape[2], x.device)
    return _check_weight_bias_activation(x, weight, bias, activation)


def _check_update_inputs(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None,
                         activation) -> str | None:
    _check_tensor("x", x, 2, "(batch, dim) (one step)")
    if 0 in x.shape:
        raise ValueError(f"causal_conv1d_update: empty input x {tuple(x.shape)}; batch and dim must be >= 1")
    activation = _check_weight_bias_activation(x, weight, bias, activation)
    _check_tensor("conv_state", conv_state, 3, "(batch, dim, width - 1)")
    expected = (x.shape[0], x.shape[1], weight.shape[1] - 1)
    if tuple(conv_state.shape) != expected:
        raise ValueError(f"causal_conv1d_update: conv_state must have shape (batch, dim, width - 1) = {expected}, "
                         f"got {tuple(conv_state.shape)}")
    if conv_state.device != x.device:
        raise ValueError(f"causal_conv1d_update: conv_state is on {conv_state.device} but x is on {x.device}")
    return activation


register(KernelOp(
    name="causal_conv1d", backends=("triton", "torch", "reference", "peer"),
    auto_on_cuda=("peer", "triton", "torch"), peer_package="causal_conv1d",
    layout="x (batch, dim, L), channel-last allowed; weight (dim, width); bias (dim,); seq_idx (batch, L) int32 "
           "document ids or None; out like x",
    dispatch=causal_conv1d, reference=partial(causal_conv1d, backend="reference"), conformance=CONFORMANCE,
    bench=KernelBench("conv1d", "archlab.kernels.bench.conv1d:bench_conv1d",
                      "Triton vs causal-conv1d and cuDNN; CUDA")))
