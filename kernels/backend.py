"""The one place that decides which implementation of an op runs; the ops and their backends are the registry's
(kernels/registry.py).

Backends:
  auto       what is known good and fast on the tensors' device (auto_choice says which, and why)
  triton     our own Triton kernels (kernels/<op>/triton.py)
  numba      our own CPU kernels compiled by numba (kernels/<op>/numba.py)
  torch      fast pure-PyTorch path; what CPU training uses where no kernel of ours runs there
  reference  plain float32 PyTorch, the definition of correct (slow)
  peer       a mature third-party kernel (SDPA flash/cuDNN, mamba_ssm, ...), CUDA only
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

from archlab.kernels import self_check
from archlab.kernels.measured import triton_measured_fast
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


def resolve_backend(op: str, requested: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Maps a requested backend name to the concrete backend that runs `op` on `device`. With `dtype` (what the
    dispatchers pass) a Triton kernel passes its self-check there first (kernels/self_check.py): `auto` then
    falls back with one warning line, an explicit `triton` fails with a one-line ValueError."""
    check_backend(op, requested)
    if requested == "auto":
        return auto_choice(op, device, dtype)[0]
    if requested == "peer" and device.type != "cuda":
        raise ValueError(f"the 'peer' backend for {op} runs third-party CUDA kernels and the tensors are on "
                         f"{device.type}; use auto, torch or reference off the GPU")
    if requested == "numba":
        _check_numba(op, device)
    if requested == "triton":
        _check_triton(op, device)
        failed = _failed_self_check(op, device, dtype)
        if failed:
            raise ValueError(f"our Triton kernel for {op} failed its self-check on {failed}; use "
                             f"kernels.{op}=auto (it falls back) or torch")
    return requested


def auto_choice(op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, str]:
    """(the backend `auto` runs `op` on `device` with, why). On CPU: the op's auto_on_cpu order, numba taken where
    the numba package imports, else torch. On CUDA: the op's auto_on_cuda order (our Triton kernel first where a
    committed benchmark shows it at least as fast on this GPU family), each taken if usable here: a peer whose
    package is installed, a Triton kernel that passed its self-check. Elsewhere: torch."""
    if device.type not in ("cpu", "cuda"):
        return "torch", f"on {device.type} the PyTorch path; our kernels and peers need a CPU or CUDA"
    key = (op, str(device), dtype)
    if key not in _auto_choices:  # every kernel call asks: decide once (files, package lookups, self-check)
        _auto_choices[key] = _choose_on_cuda(op, device, dtype) if device.type == "cuda" else _choose_on_cpu(op)
    return _auto_choices[key]


_auto_choices: dict[tuple, tuple[str, str]] = {}  # (op, device, dtype) -> (backend, why), for this process


def forget_choices() -> None:
    """Drops this process's `auto` decisions (tests that change what is installed, measured or checked)."""
    _auto_choices.clear()


def _choose_on_cuda(op: str, device: torch.device, dtype: torch.dtype | None) -> tuple[str, str]:
    spec = kernel_ops()[op]
    order, why_first = list(spec.auto_on_cuda), "the op's default order on CUDA"
    if "triton" in spec.backends and dtype is not None:
        fast = triton_measured_fast(spec, torch.cuda.get_device_name(device), str(dtype).removeprefix("torch."))
        if fast:
            order, why_first = ["triton", *(b for b in order if b != "triton")], fast
    passed_over = []
    for backend in order:
        if backend == "peer" and not peer_installed(op):
            passed_over.append(f"peer skipped: {spec.peer_package} is not installed")
            continue
        if backend == "triton":
            if importlib.util.find_spec("triton") is None:
                passed_over.append("triton skipped: the triton package is not installed")
                continue
            failed = _failed_self_check(op, device, dtype)
            if failed:
                _warn_once(f"warning: kernels.{op}: our Triton kernel failed its self-check on {failed}; "
                               f"auto uses {next_usable(op, order, backend)} instead")
                passed_over.append(f"triton skipped: failed its self-check on {failed}")
                continue
        return backend, "; ".join([*passed_over, f"{backend}: {why_first}"])
    return "torch", "; ".join([*passed_over, "torch: nothing before it is usable here"])


def _choose_on_cpu(op: str) -> tuple[str, str]:
    passed_over = []
    for backend in kernel_ops()[op].auto_on_cpu:
        missing = numba_missing() if backend == "numba" else None
        if missing:
            passed_over.append(f"numba skipped: {missing}")
            continue
        return backend, "; ".join([*passed_over, f"{backend}: the op's default order on CPU"])
    return "torch", "; ".join([*passed_over, "torch: nothing before it is usable here"])


def numba_missing() -> str | None:
    """Why the numba package cannot be used here (one line), or None when it imports."""
    try:
        import numba  # noqa: F401
    except ImportError as error:
        return f"numba does not import ({str(error).splitlines()[0]})"
    return None


def _check_numba(op: str, device: torch.device) -> None:
    if device.type != "cpu":
        raise ValueError(f"the 'numba' backend for {op} runs on CPU tensors and these are on {device.type}; "
                         "use auto")
    missing = numba_missing()
    if missing:
        raise ValueError(f"the 'numba' backend for {op} needs the numba package: {missing}; pip install numba, "
                         "or use auto (it falls back to torch)")


def next_usable(op: str, order: list[str], after: str) -> str:
    rest = order[order.index(after) + 1:]
    return next((b for b in rest if b != "peer" or peer_installed(op)), "torch")


def peer_installed(op: str) -> bool:
    package = kernel_ops()[op].peer_package
    return package is None or importlib.util.find_spec(package) is not None


def _failed_self_check(op: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Where and how `op`'s Triton kernel failed its self-check ("<device> in <dtype> (<detail>)"), or None: it
    passed, or is not checked (no dtype given, checks off here, or torch.compile is tracing and no verdict is
    known yet: kernels cannot run inside a trace; the Trainer checks before it compiles)."""
    if dtype is None or not self_check.applies(device):
        return None
    if torch.compiler.is_compiling():
        found = self_check.known_verdict(op, device, dtype)
    else:
        found = self_check.verdict(op, device, dtype)
    if found is None or found.passed:
        return None
    where = self_check.device_description(device)
    return f"{where['device']} ({where['capability']}) in {str(dtype).removeprefix('torch.')} ({found.detail})"


_warned: set[str] = set()  # a fallback is said once per process, not at every call


def _warn_once(line: str) -> None:
    if line not in _warned:
        _warned.add(line)
        print(line, file=sys.stderr, flush=True)


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
