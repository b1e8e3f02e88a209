"""Mamba-2's SSD (state space duality): `ssd(x, dt, A, B, C, ..., backend="auto")` and one-step decoding.

Arguments and layouts follow mamba_ssm's `mamba_chunk_scan_combined`: x, z (batch, length, heads, head_dim);
dt (batch, length, heads); A (heads,); B, C (batch, length, groups, state) with groups dividing heads; D (heads,) or
(heads, head_dim); dt_bias (heads,); initial_states (batch, heads, head_dim, state). reference.py holds the exact
definition. Out comes back in x's dtype, final states in float32.

Packed sequences: cu_seqlens, int32 (n_sequences + 1,) cumulative lengths from 0 to length, with batch 1. Each
sequence starts from h = 0, and return_final_states gives one state per sequence (n_sequences, heads, head_dim,
state). mamba_ssm differs in form, not in result: it resets on seq_idx (batch, length) and returns these per-sequence
states only as `varlen_states` (return_varlen_states=True, forward only). With cu_seqlens, initial_states is refused:
mamba_ssm would apply it to the first sequence of the row alone, which is rarely what a caller means.

Backends (kernels/backend.py decides): torch = chunked.py (CPU training; what `auto` picks on CPU), triton = our
kernels (op.py, triton.py; gradients also flow through the final states, packed or not), reference = the sequential
definition, peer = mamba_ssm's `mamba_chunk_scan_combined` (CUDA; `auto` takes it first where it is installed).
The peer resets packed sequences through seq_idx, made from cu_seqlens; its backward refuses the per-sequence
states, so with cu_seqlens they come from a second, forward-only call and are not differentiable there.
chunk_size is the torch and peer backends' chunk length (the torch path's at most the sequence's next power of two:
longer chunks would only pad; the peer's at least PEER_MIN_CHUNK, its tile); the triton backend chunks by its own
(op.py). The chunk length changes results only by rounding. The triton backend takes any
head_dim, state size, heads and groups (it tiles them); the one size it refuses is a launch past CUDA's grid limit
(kernels/common/launch.py), with a one-line error.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from archlab.kernels.backend import PEER_INSTALL_HINT, resolve_backend
from archlab.kernels.common.inputs import check_cu_seqlens_bounds, check_device, check_float_dtype, shape_as_passed
from archlab.kernels.registry import KernelBench, KernelOp, register
from archlab.kernels.ssd.chunked import ssd_chunked
from archlab.kernels.ssd.conformance import CONFORMANCE
from archlab.kernels.ssd.op import ssd_triton  # registers the custom ops; no triton import
from archlab.kernels.ssd.reference import effective_dt, skip_and_gate, ssd_reference, ssd_step

__all__ = ["ssd", "ssd_state_update", "ssd_reference"]

NO_LIMIT = (0.0, float("inf"))
PEER_MIN_CHUNK = 16  # mamba_ssm's SSD tiles the chunk in blocks of 16 and more; it is tested from chunks of 16 up


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int = 64, D: Tensor | None = None,
        z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
        dt_limit: tuple[float, float] = NO_LIMIT, initial_states: Tensor | None = None,
        cu_seqlens: Tensor | None = None, return_final_states: bool = False,
        backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """out (batch, length, heads, head_dim) in x's dtype, or (out, final states float32) with return_final_states:
    (batch, heads, head_dim, state), or (n_sequences, heads, head_dim, state) with cu_seqlens. chunk_size: a power
    of two, the torch and peer backends' chunk length (see the module docstring)."""
    _check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, cu_seqlens)
    name = resolve_backend("ssd", backend, x.device, x.dtype)
    args = (x, dt, A, B, C, D, z, dt_bias, dt_softplus, tuple(dt_limit), initial_states, cu_seqlens)
    if name == "torch":
        # chunks past the sequence's length would only pad it: the same result (to rounding) for less work
        out, final_states = ssd_chunked(*args, chunk_size=min(chunk_size, 1 << (x.shape[1] - 1).bit_length()))
    elif name == "triton":
        out, final_states = ssd_triton(*args)
    elif name == "peer":
        out, final_states = _peer_ssd(*args, chunk_size=chunk_size)
    else:
        out, final_states = ssd_reference(*args)
    return (out, final_states) if return_final_states else out


def ssd_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                     z: Tensor | None = None, dt_bias: Tensor | None = None, dt_softplus: bool = False,
                     dt_limit: tuple[float, float] = NO_LIMIT) -> Tensor:
    """One decoding step: updates state (batch, heads, head_dim, state) float32 in place; x, z (batch, heads,
    head_dim), dt (batch, heads), B, C (batch, groups, state). Returns y (batch, heads, head_dim) in x's dtype."""
    x_1, dt_1, B_1, C_1, z_1 = (t[:, None] if isinstance(t, Tensor) and t.ndim else t for t in (x, dt, B, C, z))
    _check_streams("ssd_state_update", x_1, dt_1, A, B_1, C_1, D, z_1, dt_bias, dt_limit, unpacked=True,
                   layout="x (batch, heads, head_dim), dt (batch, heads), B and C (batch, groups, state)")
    if not isinstance(state, Tensor) or state.shape != (*x.shape, B.shape[-1]) or state.dtype != torch.float32 \
            or state.device != x.device:
        raise ValueError(f"ssd_state_update: state must be float32 of shape {(*x.shape, B.shape[-1])} on {x.device}, "
                         f"got {getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}"
                         f" on {getattr(state, 'device', None)}")
    x_c = x.float()
    dt_c = effective_dt(dt.float(), dt_bias, dt_softplus, tuple(dt_limit))
    y, new_state = ssd_step(state, x_c, dt_c, A.float(), B.float(), C.float())
    state.copy_(new_state)
    return skip_and_gate(y, x_c, D, z).to(x.dtype)


def _peer_ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, cu_seqlens, *,
              chunk_size: int) -> tuple[Tensor, Tensor]:
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError as error:
        raise ImportError(f"the 'peer' backend for ssd needs mamba_ssm ({error}); {PEER_INSTALL_HINT}, or use auto"
                          ) from None
    run = partial(mamba_chunk_scan_combined, x, dt, A, B, C, max(chunk_size, PEER_MIN_CHUNK), D=D, z=z,
                  dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)
    if cu_seqlens is None:
        out, final_states = run(initial_states=initial_states, return_final_states=True)
        return out, final_states.float()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequences = torch.arange(lengths.numel(), dtype=torch.int32, device=x.device)
    seq_idx = torch.repeat_interleave(sequences, lengths, output_size=x.shape[1])[None]  # no host sync
    out = run(seq_idx=seq_idx)
    with torch.no_grad():  # its backward asserts on return_varlen_states: the states come from a forward-only call
        _, final_states = run(seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_varlen_states=True)
    return out, final_states.float()


# -- input checks: one-line errors before any work ---------------------------------------------------------------
def _check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, dt_limit, initial_states, cu_seqlens) -> None:
    batch, _, heads, head_dim = _check_streams(
        "ssd", x, dt, A, B, C, D, z, dt_bias, dt_limit, unpacked=False,
        layout="x (batch, length, heads, head_dim), dt (batch, length, heads), B and C (batch, length, groups, state)")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"ssd: chunk_size must be a power of two, got {chunk_size!r}")
    if initial_states is not None:
        want = (batch, heads, head_dim, B.shape[-1])
        if not isinstance(initial_states, Tensor) or initial_states.shape != want:
            raise ValueError(f"ssd: initial_states must be (batch, heads, head_dim, state) = {want}, got "
                             f"{tuple(getattr(initial_states, 'shape', ()))}")
        check_device("ssd", "initial_states", initial_states, "x", x)
        check_float_dtype("ssd", "initial_states", initial_states)
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, x, initial_states)


def _check_streams(op, x, dt, A, B, C, D, z, dt_bias, dt_limit, *, layout: str, unpacked: bool):
    """The checks ssd and its decoding step share, on (batch, length, ...) views; returns x's shape."""
    named = {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    for name, t in named.items():
        if t is None and name in ("D", "z", "dt_bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        check_device(op, name, t, "x", x)
        check_float_dtype(op, name, t)

    def shown(t: Tensor) -> tuple:
        return shape_as_passed(t.shape, unpacked)

    if x.ndim != 4 or dt.ndim != 3 or B.ndim != 4:
        raise ValueError(f"{op}: expected {layout}; got x {shown(x)}, dt {shown(dt)}, B {shown(B)}")
    batch, length, heads, head_dim = x.shape
    groups, n_state = B.shape[2], B.shape[3]
    if 0 in (batch, length, heads, head_dim, groups, n_state):
        raise ValueError(f"{op}: empty inputs (x {shown(x)}, B {shown(B)}); every size must "
                         "be >= 1")
    if dt.shape != (batch, length, heads):
        raise ValueError(f"{op}: dt must be {(batch, length, heads)[unpacked:]} like x's leading dims, got "
                         f"{shown(dt)}")
    if B.shape[:2] != (batch, length) or C.shape != B.shape:
        raise ValueError(f"{op}: B and C must both be {(batch, length, 'groups', 'state')[unpacked:]}, got "
                         f"{shown(B)} and {shown(C)}")
    if heads % groups:
        raise ValueError(f"{op}: B and C have {groups} groups, which must divide heads={heads}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{op}: z must have x's shape {shown(x)}, got {shown(z)}")
    if A.shape != (heads,):
        raise ValueError(f"{op}: A must be (heads,) = ({heads},), got {tuple(A.shape)}")
    if dt_bias is not None and dt_bias.shape != (heads,):
        raise ValueError(f"{op}: dt_bias must be (heads,) = ({heads},), got {tuple(dt_bias.shape)}")
    if D is not None and D.shape not in ((heads,), (heads, head_dim)):
        raise ValueError(f"{op}: D must be (heads,) or (heads, head_dim) = ({heads},) or {(heads, head_dim)}, got "
                         f"{tuple(D.shape)}")
    if len(dt_limit) != 2 or not dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"{op}: dt_limit must be (min, max) with min <= max, got {tuple(dt_limit)}")
    return batch, length, heads, head_dim


def _check_cu_seqlens(cu_seqlens, x: Tensor, initial_states) -> None:
    if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.ndim != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError("ssd: cu_seqlens must be a 1-D int32 tensor (n_sequences + 1,) of cumulative lengths, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    check_device("ssd", "cu_seqlens", cu_seqlens, "x", x)
    if x.shape[0] != 1:
        raise ValueError(f"ssd: with cu_seqlens the sequences are packed in a batch of 1, got batch {x.shape[0]}")
    if initial_states is not None:
        raise ValueError("ssd: initial_states with cu_seqlens is not supported; every packed sequence starts from "
                         "zero (run a sequence alone to continue it from a state)")
    check_cu_seqlens_bounds("ssd", cu_seqlens, x.shape[1])


register(KernelOp(
    name="ssd", backends=("triton", "torch", "reference", "peer"), auto_on_cuda=("peer", "triton", "torch"),
    peer_package="mamba_ssm",
    layout="x, z (batch, length, heads, head_dim); dt (batch, length, heads); A (heads,); B, C (batch, length, "
           "groups, state); cu_seqlens (n + 1,) int32 with batch 1; out like x",
    dispatch=ssd, reference=partial(ssd, backend="reference"), conformance=CONFORMANCE,
    bench=KernelBench("ssd", "archlab.kernels.bench.ssd:bench_ssd", "Triton vs mamba_ssm and Mamba-1's scan on CUDA; "
                      "torch backend vs reference on CPU",
                      needs_cuda=False)))
