"""`archlab doctor`: what runs here. Versions, devices, and per kernel op the backends usable on this machine,
the self-check verdicts of our Triton kernels, and what `auto` picks and why. It never fails for a missing
package or device: it says so."""
from __future__ import annotations

import importlib.util
import platform

import torch

from archlab.kernels import self_check
from archlab.kernels.backend import auto_choice, numba_missing, peer_installed, triton_interpreting
from archlab.kernels.common.provenance import package_version
from archlab.kernels.registry import kernel_ops

CHECKED_DTYPES = (torch.bfloat16, torch.float32)  # what training runs in: bf16 autocast on CUDA, fp32 elsewhere


def environment_lines() -> list[str]:
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build, no CUDA"
    lines = [f"python {platform.python_version()}, torch {torch.__version__} ({cuda}), "
             f"triton {package_version('triton')}, numba {package_version('numba')}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"cuda:{index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        lines.append(f"no CUDA device: everything runs on the CPU ({platform.machine()}, "
                     f"{torch.get_num_threads()} threads)")
    interpreting = "on" if triton_interpreting() else "off"
    lines.append(f"self-checks: {self_check.MODE_VARIABLE}={self_check.mode()}, verdicts in {self_check.cache_dir()}; "
                 f"Triton interpreter (TRITON_INTERPRET=1) {interpreting}")
    return lines


def backend_status(op_name: str, backend: str, device: torch.device) -> str:
    """'usable' or why `backend` cannot run `op_name` on `device`."""
    op = kernel_ops()[op_name]
    if backend == "peer":
        if device.type != "cuda":
            return "needs CUDA"
        return "usable" if peer_installed(op_name) else f"{op.peer_package} not installed"
    if backend == "numba":
        if device.type != "cpu":
            return "CPU tensors only"
        return numba_missing() or "usable"
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton not installed"
        if device.type != "cuda" and not triton_interpreting():
            return "needs CUDA, or TRITON_INTERPRET=1: slow, for tests"
    return "usable"


def op_lines(op_name: str, device: torch.device, *, run_checks: bool) -> list[str]:
    op = kernel_ops()[op_name]
    states = ", ".join(f"{b} ({backend_status(op_name, b, device)})" for b in op.backends)
    lines = [f"{op_name}: {states}"]
    if "triton" in op.backends and not (run_checks and self_check.applies(device)):
        lines.append(f"  self-check: not run here (it runs on CUDA before first use; {self_check.MODE_VARIABLE}="
                     "always also runs it in the interpreter)")
    elif "triton" in op.backends:
        for dtype in CHECKED_DTYPES:
            name = str(dtype).removeprefix("torch.")
            found = self_check.verdict(op_name, device, dtype)
            state = "passed" if found.passed else "FAILED"
            source = "cached" if found.cached else f"ran in {found.seconds:.1f} s"
            lines.append(f"  self-check {name}: {state} ({found.detail}; {source})")
    for dtype in CHECKED_DTYPES if device.type == "cuda" else (torch.float32,):
        backend, why = auto_choice(op_name, device, dtype)
        lines.append(f"  auto in {str(dtype).removeprefix('torch.')}: {backend} ({why})")
    return lines


def report(*, run_checks: bool = True) -> str:
    """The doctor's report. `run_checks`: run self-checks that have no cached verdict (seconds on a GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = environment_lines() + [""]
    for op_name in kernel_ops():
        lines += op_lines(op_name, device, run_checks=run_checks)
    return "\n".join(lines) + "\n"
