"""The one place that decides which implementation of an op runs; the ops and their backends are the registry's
(kernels/registry.py).

Backends:
  auto       the fastest one available on the tensors' device
  triton     our own Triton kernels (kernels/<op>/triton.py)
  torch      fast pure-PyTorch path; what CPU training uses
  reference  plain float32 PyTorch, the definition of correct (slow)
  peer       a mature third-party kernel (SDPA flash/cuDNN, mamba_ssm, ...), CUDA only
"""
from __future__ import annotations

import importlib.util
import os

import torch

from archlab.kernels.registry import BACKENDS, kernel_ops


def _choices(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


PEER_INSTALL_HINT = ("install the peers on a CUDA machine with scripts/build_peers.sh (this GPU's arch only, "
                     "~9 min) or pip install -e .[peers]")


def check_backend(op: str, requested: str) -> None:
    """Device-independent validation, so a bad name fails when the model is built, not at the first step."""
    ops = kernel_ops()
    if op not in ops:
        raise ValueError(f"unknown op {op!r}; choose from {', '.join(ops)}")
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} for {op}; choose from {', '.join(BACKENDS)}")
    if requested != "auto" and requested not in ops[op].backends:
        raise ValueError(f"{op} has no {requested!r} backend yet; use {_choices(('auto', *ops[op].backends))}")


def resolve_backend(op: str, requested: str, device: torch.device) -> str:
    """Maps a requested backend name to the concrete backend that runs `op` on `device`."""
    check_backend(op, requested)
    if requested == "auto":
        return kernel_ops()[op].auto_on_cuda if device.type == "cuda" else "torch"
    if requested == "peer" and device.type != "cuda":
        raise ValueError(f"the 'peer' backend for {op} runs third-party CUDA kernels and the tensors are on "
                         f"{device.type}; use auto, torch or reference off the GPU")
    if requested == "triton":
        _check_triton(op, device)
    return requested


def triton_interpreting() -> bool:
    """Triton's CPU interpreter runs the real kernels (slowly); it must be on before kernels are imported."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(op: str, device: torch.device) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"the 'triton' backend for {op} needs the triton package; install it or use auto")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"the 'triton' backend for {op} runs on CUDA, or on {device.type} only under Triton's "
                         "interpreter (set TRITON_INTERPRET=1 before starting; slow, for tests); or use auto")


def refuse_double_backward(backward_op, op_name: str, alternative: str) -> None:
    """Makes a Triton custom op's backward op non-differentiable with a clear error: our kernels have no
    second derivative, so double backward must go through `alternative` (a PyTorch path)."""
    def refuse(ctx, *grads):
        raise NotImplementedError(f"{op_name} has no second derivative; use {alternative} for double backward")

    def nothing_to_save(ctx, inputs, output, keyword_only_inputs=None):
        return None

    backward_op.register_autograd(refuse, setup_context=nothing_to_save)
