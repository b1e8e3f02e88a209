"""Mamba-1 selective scan: `selective_scan(u, delta, A, B, C, ..., backend="auto")` and one-step decoding.

Layouts follow mamba_ssm: u, delta, z (batch, dim, L); A (dim, N) real; B, C (batch, N, L), or grouped
(batch, G, N, L) with G dividing dim (channel d reads group d // (dim / G)); D, delta_bias (dim,).
With delta' = softplus(delta + delta_bias) (bias and softplus optional) each channel runs the length-N recurrence
h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t from h = 0, and out = (C_t . h_t + D u_t) * silu(z_t);
reference.py holds the exact definition. Out comes back in u's dtype, the last state (batch, dim, N) in float32.
Packed documents: seq_idx (batch, L) int32 or int64, the document id of each position; the state resets to zero
where a document starts (t > 0 and seq_idx[t] != seq_idx[t - 1]), so each document scans as if alone, and the last
state is the row's last document's. Every backend but peer takes it (mamba_ssm's selective_scan_fn has none).

Backends (kernels/backend.py decides): numba = our fused CPU kernels (numba.py, custom ops in op.py; what `auto`
picks on CPU where numba imports), torch = chunked.py (pure PyTorch; `auto` on CPU without numba), triton = our
Triton kernels (op.py; `auto` on CUDA), reference = the sequential definition, peer = mamba_ssm's CUDA kernel.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from archlab.kernels.backend import PEER_INSTALL_HINT, resolve_backend
from archlab.kernels.common.inputs import check_seq_idx
from archlab.kernels.registry import KernelBench, KernelOp, register
from archlab.kernels.selective_scan.conformance import CONFORMANCE
from archlab.kernels.selective_scan.chunked import selective_scan_chunked, selective_state_update_torch
# registers the custom ops; imports neither triton nor numba
from archlab.kernels.selective_scan.op import selective_scan_numba, selective_scan_triton
from archlab.kernels.selective_scan.reference import selective_scan_reference, selective_state_update_reference

__all__ = ["selective_scan", "selective_state_update", "selective_scan_reference", "selective_state_update_reference"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, backend: str = "auto",
                   seq_idx: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """out (batch, dim, L) in u's dtype, or (out, last state (batch, dim, N) float32) with return_last_state.
    seq_idx (batch, L) int32/int64: document ids of packed documents, the state resets where they change."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx)
    name = _resolve(backend, u, packed=seq_idx is not None)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if name == "torch":
        out, last_state = selective_scan_chunked(*args, seq_idx)
    elif name == "reference":
        out, last_state = selective_scan_reference(*args, seq_idx)
    elif name == "triton":
        out, last_state = selective_scan_triton(*args, seq_idx)
    elif name == "numba":
        out, last_state = selective_scan_numba(*args, seq_idx)
    else:
        out, last_state = _peer_selective_scan(*args)
    return (out, last_state) if return_last_state else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
                           dt_softplus: bool = False) -> Tensor:
    """One decoding step: updates state (batch, dim, N) float32 in place, returns y (batch, dim) in x's dtype."""
    _check_update_inputs(state, x, dt, A, B, C, D, z, dt_bias)
    return selective_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _resolve(backend: str, u: Tensor, packed: bool) -> str:
    """The concrete backend; with packed documents never peer (no seq_idx there): auto takes ours instead."""
    if packed and backend == "peer":
        raise ValueError("selective_scan: the 'peer' backend (mamba_ssm's selective_scan_fn) has no seq_idx for "
                         "packed documents; use auto, triton or torch")
    name = resolve_backend("selective_scan", backend, u.device, u.dtype)
    if not packed or name != "peer":
        return name
    try:  # auto's next choice on CUDA, if our kernel is usable here
        return resolve_backend("selective_scan", "triton", u.device, u.dtype)
    except ValueError:
        return "torch"


def _peer_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> tuple[Tensor, Tensor]:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        raise ImportError(f"the 'peer' backend for selective_scan needs mamba_ssm ({error}); {PEER_INSTALL_HINT}, "
                          "or use auto") from None
    tensors = [None if t is None else t.contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
    u, delta, A, B, C, D, z, delta_bias = tensors
    out, last_state = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True)
    return out, last_state.float()


# -- input checks: one-line errors before any work ---------------------------------------------------------------
def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, seq_idx) -> None:
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    _check_shapes_and_dtypes("selective_scan", named, lead="u", like_lead=("delta", "z"), layout="(batch, dim, L)",
                             bc_layout="(batch, [G,] N, L)", bias="delta_bias")
    if seq_idx is not None:
        check_seq_idx("selective_scan", seq_idx, u.shape[0], u.shape[2], u.device)


def _check_update_inputs(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    named = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    batch, dim, n_state = _check_shapes_and_dtypes("selective_state_update", named, lead="x", like_lead=("dt", "z"),
                                                   layout="(batch, dim)", bc_layout="(batch, [G,] N)", bias="dt_bias")
    if state.shape != (batch, dim, n_state) or state.dtype != torch.float32:
        raise ValueError(f"selective_state_update: state must be float32 of shape {(batch, dim, n_state)}, got "
                         f"{state.dtype} {tuple(state.shape)}")


def _check_shapes_and_dtypes(op: str, named: dict, *, lead: str, like_lead: tuple, layout: str, bc_layout: str,
                             bias: str) -> tuple[int, int, int]:
    """The checks the scan and the decoding step share: `lead` (u or x) sets batch, dim and the positions (if any),
    `like_lead` must match it, A is (dim, N), B and C follow `bc_layout`. Returns (batch, dim, N)."""
    _check_tensors(op, named)
    ndim = layout.count(",") + 1
    for name in (lead, *like_lead):
        if named[name] is not None and named[name].ndim != ndim:
            raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {tuple(named[name].shape)}")
    lead_t, A, B, C = named[lead], named["A"], named["B"], named["C"]
    if A.ndim != 2:
        raise ValueError(f"{op}: A must be 2-D (dim, N), got shape {tuple(A.shape)}")
    (batch, dim, *positions), n_state = lead_t.shape, A.shape[1]
    if 0 in (batch, dim, *positions, n_state):
        raise ValueError(f"{op}: empty inputs ({lead} {tuple(lead_t.shape)}, A {tuple(A.shape)}); every size must "
                         "be >= 1")
    for name in like_lead:
        if named[name] is not None and named[name].shape != lead_t.shape:
            raise ValueError(f"{op}: {name} must have {lead}'s shape {tuple(lead_t.shape)}, got "
                             f"{tuple(named[name].shape)}")
    if A.shape[0] != dim:
        raise ValueError(f"{op}: A must be (dim, N) with dim={dim}, got shape {tuple(A.shape)}")
    for name in ("B", "C"):
        _check_bc(op, name, named[name], batch, dim, n_state, tuple(positions), bc_layout)
    if B.shape != C.shape:
        raise ValueError(f"{op}: B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    _check_per_channel(op, {"D": named["D"], bias: named[bias]}, dim)
    _check_dtypes(op, named, streams=(lead, *like_lead, "B", "C"), params=("A", "D", bias))
    return batch, dim, n_state


def _check_tensors(op: str, named: dict) -> None:
    first = None
    for name, t in named.items():
        if t is None and name in ("D", "z", "delta_bias", "dt_bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_complex():
            raise TypeError(f"{op}: {name} is complex; only real A (and real inputs) are supported, as in Mamba-1 "
                            "with real-valued A_log")
        first = first or (name, t)
        if t.device != first[1].device:
            raise ValueError(f"{op}: all tensors must be on one device, got {first[0]} on {first[1].device} and "
                             f"{name} on {t.device}")


def _check_bc(op: str, name: str, t: Tensor, batch: int, dim: int, n_state: int, tail: tuple, layout: str) -> None:
    grouped = t.ndim == 3 + len(tail)
    if t.ndim not in (2 + len(tail), 3 + len(tail)) or t.shape[0] != batch or t.shape[-1 - len(tail)] != n_state \
            or tuple(t.shape[t.ndim - len(tail):]) != tail:
        raise ValueError(f"{op}: {name} must be {layout} with batch={batch}, N={n_state}" +
                         (f", L={tail[0]}" if tail else "") + f", got shape {tuple(t.shape)}")
    if grouped and (t.shape[1] == 0 or dim % t.shape[1]):
        raise ValueError(f"{op}: {name} has {t.shape[1]} groups, which must divide dim={dim}")


def _check_per_channel(op: str, named: dict, dim: int) -> None:
    for name, t in named.items():
        if t is not None and t.shape != (dim,):
            raise ValueError(f"{op}: {name} must be 1-D of length dim={dim}, got shape {tuple(t.shape)}")


def _check_dtypes(op: str, named: dict, streams: tuple, params: tuple) -> None:
    lead = named[streams[0]]
    if lead.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {streams[0]} has dtype {lead.dtype}; use float32, float16 or bfloat16")
    for name in streams[1:]:
        t = named[name]
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    for name in params:
        t = named[name]
        if t is not None and t.dtype not in (torch.float32, lead.dtype):
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; use float32 or {streams[0]}'s dtype {lead.dtype}")


register(KernelOp(
    name="selective_scan", backends=("triton", "numba", "torch", "reference", "peer"),
    auto_on_cuda=("peer", "triton", "torch"), auto_on_cpu=("numba", "torch"), peer_package="mamba_ssm",
    layout="u, delta, z (batch, dim, L); A (dim, N); B, C (batch, [groups,] N, L); out (batch, dim, L)",
    dispatch=selective_scan, reference=partial(selective_scan, backend="reference"), conformance=CONFORMANCE,
    bench=KernelBench("scan", "archlab.kernels.bench.scan:bench_scan",
                      "Triton vs mamba_ssm on CUDA; numba and torch backends vs reference on CPU",
                      needs_cuda=False)))
