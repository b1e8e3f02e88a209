"""The gated delta rule (Gated DeltaNet's mixer): `gated_delta_rule(q, k, v, g, beta, ..., backend="auto")` and
one-step decoding, `gated_delta_state_update`.

Arguments and layouts follow fla's `chunk_gated_delta_rule`: q, k (batch, length, heads, key_dim); v (batch,
length, value_heads, value_dim) with heads dividing value_heads (value head h reads query/key head
h // (value_heads / heads)); g, the log decay, and beta (batch, length, value_heads); states (batch or n_sequences,
value_heads, key_dim, value_dim) float32. reference.py holds the exact definition. o comes back in v's dtype.

Packed sequences: cu_seqlens, int32 or int64 (n_sequences + 1,) cumulative lengths from 0 to length, with batch 1.
Each sequence starts from its own row of initial_state (or zeros), and the final states are one per sequence, as in
fla.

use_qk_l2norm normalises q and k (reference.l2norm) in PyTorch before our backends run, in float32, so autograd
differentiates it; the peer normalises inside its kernel (fla's use_qk_l2norm_in_kernel).

Backends (kernels/backend.py decides): torch = chunked.py (CPU training; what `auto` picks on CPU), triton = our
kernels (op.py, triton.py: a chunked WY forward and a deterministic per-position backward; key and value dims up to
TRITON_MAX_HEAD_DIM), reference = the sequential definition, peer = fla's `chunk_gated_delta_rule` (CUDA; `auto`
takes it first where fla is installed, then ours).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from archlab.kernels.backend import resolve_backend
from archlab.kernels.common.inputs import check_cu_seqlens_bounds, check_device, check_float_dtype, shape_as_passed
from archlab.kernels.gated_delta.chunked import gated_delta_chunked
from archlab.kernels.gated_delta.conformance import CONFORMANCE
from archlab.kernels.gated_delta.op import gated_delta_triton  # registers the custom ops; no triton import
from archlab.kernels.gated_delta.reference import gated_delta_reference, gated_delta_step, l2norm, value_heads_of
from archlab.kernels.registry import KernelBench, KernelOp, register

__all__ = ["gated_delta_rule", "gated_delta_state_update", "gated_delta_reference"]

TRITON_MAX_HEAD_DIM = 256  # the largest key_dim and value_dim our Triton kernel tiles (one block per head dim)
# the torch backend's chunk length: on our CPUs at K = V = 64, 32 ran the goal shape's fwd+bwd about 10% faster than
# fla's 64 (half the chunk-square work, twice the short state loop's steps)
CHUNK_SIZE = 32
# fla is pure Python (Triton kernels): nothing to build, unlike the peers of scripts/build_peers.sh
FLA_INSTALL_HINT = "install it on a CUDA machine with pip install --no-deps fla-core (or pip install -e .[peers])"


def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *, scale: float | None = None,
                     initial_state: Tensor | None = None, output_final_state: bool = False,
                     cu_seqlens: Tensor | None = None, use_qk_l2norm: bool = False,
                     backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """o (batch, length, value_heads, value_dim) in v's dtype, or (o, final states float32 (batch or n_sequences,
    value_heads, key_dim, value_dim)) with output_final_state. scale defaults to key_dim ** -0.5."""
    _check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    name = resolve_backend("gated_delta", backend, q.device, q.dtype)
    if name == "triton" and max(k.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        if backend != "auto":
            raise ValueError(f"gated_delta: the triton backend takes key_dim and value_dim up to "
                             f"{TRITON_MAX_HEAD_DIM}, got key_dim={k.shape[-1]}, value_dim={v.shape[-1]}; use backend "
                             "auto or torch")
        name = "torch"  # auto: our kernel does not tile these head dims, the chunked torch path does
    if use_qk_l2norm and name != "peer":  # the peer normalises in its kernel
        # in float32; the Triton kernel then reads them in their own type, as fla's l2norm hands them over
        q, k = (l2norm(t.float()).to(t.dtype if name == "triton" else torch.float32) for t in (q, k))
    if name == "torch":
        o, final_state = gated_delta_chunked(q, k, v, g, beta, scale, initial_state, cu_seqlens, CHUNK_SIZE)
    elif name == "triton":
        o, final_state = gated_delta_triton(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    elif name == "peer":
        o, final_state = _peer_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm)
    else:
        o, final_state = gated_delta_reference(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    return (o, final_state) if output_final_state else o


def gated_delta_state_update(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, *,
                             scale: float | None = None, use_qk_l2norm: bool = False) -> Tensor:
    """One decoding step: updates state (batch, value_heads, key_dim, value_dim) float32 in place; q, k (batch,
    heads, key_dim), v (batch, value_heads, value_dim), g, beta (batch, value_heads). Returns o (batch, value_heads,
    value_dim) in v's dtype."""
    q_1, k_1, v_1, g_1, beta_1 = (t[:, None] if isinstance(t, Tensor) and t.ndim else t for t in (q, k, v, g, beta))
    _check_streams("gated_delta_state_update", q_1, k_1, v_1, g_1, beta_1, scale, unpacked=True,
                   layout="q, k (batch, heads, key_dim), v (batch, value_heads, value_dim), g and beta (batch, "
                          "value_heads)")
    want = (v.shape[0], v.shape[1], k.shape[-1], v.shape[-1])
    if not isinstance(state, Tensor) or state.shape != want or state.dtype != torch.float32 or state.device != q.device:
        raise ValueError(f"gated_delta_state_update: state must be float32 of shape {want} on {q.device}, got "
                         f"{getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))} on "
                         f"{getattr(state, 'device', None)}")
    with torch.autocast(q.device.type, enabled=False):  # the float32 state must not take bf16 matmul products
        q_c, k_c = q.float(), k.float()
        if use_qk_l2norm:
            q_c, k_c = l2norm(q_c), l2norm(k_c)
        value_heads = v.shape[1]
        q_c = value_heads_of(q_c, value_heads) * (k.shape[-1] ** -0.5 if scale is None else scale)
        o, new_state = gated_delta_step(state, q_c, value_heads_of(k_c, value_heads), v.float(), g.float(),
                                        beta.float())
    state.copy_(new_state)
    return o.to(v.dtype)


def _peer_gated_delta(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm) -> tuple[Tensor, Tensor]:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as error:
        raise ImportError(f"the 'peer' backend for gated_delta needs fla ({error}); {FLA_INSTALL_HINT}, or use "
                          "auto") from None
    o, final_state = chunk_gated_delta_rule(
        q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=True,
        use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())
    return o.to(v.dtype), final_state.float()


# -- input checks: one-line errors before any work ---------------------------------------------------------------
def _check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens) -> None:
    batch, _, _, key_dim = _check_streams(
        "gated_delta", q, k, v, g, beta, scale, unpacked=False,
        layout="q, k (batch, length, heads, key_dim), v (batch, length, value_heads, value_dim), g and beta (batch, "
               "length, value_heads)")
    if cu_seqlens is not None:
        batch = _check_cu_seqlens(cu_seqlens, q)
    if initial_state is not None:
        want = (batch, v.shape[2], key_dim, v.shape[3])
        if not isinstance(initial_state, Tensor) or initial_state.shape != want:
            raise ValueError(f"gated_delta: initial_state must be (batch or n_sequences, value_heads, key_dim, "
                             f"value_dim) = {want}, got {tuple(getattr(initial_state, 'shape', ()))}")
        check_device("gated_delta", "initial_state", initial_state, "q", q)
        check_float_dtype("gated_delta", "initial_state", initial_state)


def _check_streams(op, q, k, v, g, beta, scale, *, layout: str, unpacked: bool):
    """The checks the op and its decoding step share, on (batch, length, ...) views; returns q's shape."""
    for name, t in {"q": q, "k": k, "v": v, "g": g, "beta": beta}.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_device(op, name, t, "q", q)
        check_float_dtype(op, name, t)

    def shown(shape: tuple) -> tuple:
        return shape_as_passed(shape, unpacked)

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or g.ndim != 3 or beta.ndim != 3:
        raise ValueError(f"{op}: expected {layout}; got q {shown(q.shape)}, k {shown(k.shape)}, v {shown(v.shape)}, "
                         f"g {shown(g.shape)}, beta {shown(beta.shape)}")
    batch, length, heads, key_dim = q.shape
    value_heads, value_dim = v.shape[2], v.shape[3]
    if 0 in (batch, length, heads, key_dim, value_heads, value_dim):
        raise ValueError(f"{op}: empty inputs (q {shown(q.shape)}, v {shown(v.shape)}); every size must be >= 1")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape {shown(q.shape)}, got {shown(k.shape)}")
    if v.shape[:2] != (batch, length):
        raise ValueError(f"{op}: v must be {shown((batch, length, 'value_heads', 'value_dim'))} like q's leading "
                         f"dims, got {shown(v.shape)}")
    if value_heads % heads:
        raise ValueError(f"{op}: q and k have {heads} heads, which must divide v's value_heads={value_heads}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != v.shape[:3]:
            raise ValueError(f"{op}: {name} must be {shown(v.shape[:3])}, one value per value head, got "
                             f"{shown(t.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a number or None, got {type(scale).__name__}")
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(g).all()):  # one reduction; no read under compile
        raise ValueError(f"{op}: g (the log decay) has non-finite values; the decay exp(g) needs finite g (a large "
                         "negative g forgets)")
    return batch, length, heads, key_dim



def _check_cu_seqlens(cu_seqlens, q: Tensor) -> int:
    """Checks cu_seqlens against q; returns the number of sequences."""
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64) \
            or cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError("gated_delta: cu_seqlens must be a 1-D int32 or int64 tensor (n_sequences + 1,) of "
                         f"cumulative lengths, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    check_device("gated_delta", "cu_seqlens", cu_seqlens, "q", q)
    if q.shape[0] != 1:
        raise ValueError(f"gated_delta: with cu_seqlens the sequences are packed in a batch of 1, got batch "
                         f"{q.shape[0]}")
    check_cu_seqlens_bounds("gated_delta", cu_seqlens, q.shape[1])
    return cu_seqlens.numel() - 1


register(KernelOp(
    name="gated_delta", backends=("triton", "torch", "reference", "peer"), auto_on_cuda=("peer", "triton", "torch"),
    peer_package="fla",
    layout="q, k (batch, length, heads, key_dim); v (batch, length, value_heads, value_dim); g, beta (batch, length, "
           "value_heads); states (n, value_heads, key_dim, value_dim); cu_seqlens (n + 1,) with batch 1; o like v",
    dispatch=gated_delta_rule, reference=partial(gated_delta_rule, backend="reference"), conformance=CONFORMANCE,
    bench=KernelBench("gated_delta", "archlab.kernels.bench.gated_delta:bench_gated_delta",
                      "Triton vs fla's chunk_gated_delta_rule and flash attention on CUDA; torch backend vs "
                      "reference on CPU", needs_cuda=False)))
