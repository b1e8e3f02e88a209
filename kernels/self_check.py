"""A Triton kernel is checked against its reference on each GPU before it first runs there.

Our Triton kernels are proven on CPU, in Triton's interpreter; a user's GPU, triton and torch are the first place
the compiled code runs. So before an op's Triton backend first runs on a device in a dtype, its
`conformance.self_check(dtype)` cases (small shapes that cover the kernel's code paths) run forward and backward
there and are compared with the reference (kernels/checking.py, the conformance test's rule and tolerances).

The verdict is kept in memory and on disk (ARCHLAB_CACHE_DIR, default ~/.cache/archlab, under self-check/), keyed
by op, dtype, GPU name, compute capability, triton and torch versions and a hash of the op's source files, so it
costs seconds once per machine and is redone after any of those changes. A cache file that is unreadable or
whose key differs is never trusted: the check runs again and rewrites it.

ARCHLAB_SELF_CHECK chooses where it runs: `auto` (default) on CUDA devices, `always` also under Triton's CPU
interpreter (how the tests run this very path), `off` never (you vouch for the kernels yourself).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from archlab.kernels.checking import compare_with_reference
from archlab.kernels.common.files import atomic_write, json_text
from archlab.kernels.common.provenance import package_version
from archlab.kernels.registry import KernelOp, kernel_ops

MODE_VARIABLE = "ARCHLAB_SELF_CHECK"
MODES = ("auto", "always", "off")
CACHE_VARIABLE = "ARCHLAB_CACHE_DIR"


@dataclass(frozen=True)
class Verdict:
    passed: bool
    detail: str  # what was off (first failing case), or how many cases passed
    seconds: float
    cached: bool = False


_verdicts: dict[tuple, Verdict] = {}  # this process's verdicts by (op, device, dtype)
_running = False  # a self-check calls the op's triton backend, which must not check itself again


def mode() -> str:
    value = os.environ.get(MODE_VARIABLE, "auto")
    if value not in MODES:
        raise ValueError(f"{MODE_VARIABLE}={value!r}; choose from {', '.join(MODES)}")
    return value


def applies(device: torch.device) -> bool:
    """Whether a Triton kernel about to run on `device` is self-checked first."""
    chosen = mode()
    return not _running and (chosen == "always" or (chosen == "auto" and device.type == "cuda"))


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "archlab") / "self-check"


def device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"device": torch.cuda.get_device_name(device), "capability": f"sm_{major}{minor}"}
    return {"device": device.type, "capability": "Triton interpreter"}


def source_hash(op: KernelOp) -> str:
    """sha256 of the files that define the op: its package's .py files (a one-module op: that module)."""
    module = inspect.getmodule(op.dispatch)
    path = Path(inspect.getfile(module))
    files = sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(op: KernelOp, device: torch.device, dtype: torch.dtype) -> dict:
    return {"op": op.name, "dtype": str(dtype).removeprefix("torch."), **device_description(device),
            "triton": package_version("triton"), "torch": torch.__version__, "source": source_hash(op)}


def _cache_file(key: dict) -> Path:
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / f"{key['op']}-{key['dtype']}-{name}.json"


def _read_cached(path: Path, key: dict) -> Verdict | None:
    """The verdict stored for exactly `key`, or None (no file, unreadable, another key or version)."""
    try:
        stored = json.loads(path.read_text())
        if stored["key"] != key:
            return None
        return Verdict(passed=bool(stored["passed"]), detail=str(stored["detail"]),
                       seconds=float(stored["seconds"]), cached=True)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(path: Path, key: dict, verdict: Verdict) -> None:
    with contextlib.suppress(OSError):  # a read-only home only costs a re-check in the next process
        stored = {"key": key, "passed": verdict.passed, "detail": verdict.detail, "seconds": round(verdict.seconds, 3)}
        atomic_write(path, json_text(stored))


@contextlib.contextmanager
def _checking() -> Iterator[None]:
    global _running
    _running, before = True, _running
    try:
        yield
    finally:
        _running = before


def run_self_check(op: KernelOp, device: torch.device, dtype: torch.dtype) -> Verdict:
    """Runs the op's self-check cases on its triton backend on `device` in `dtype`; never raises for a kernel
    that fails (to compile, to launch or to match): that is the verdict."""
    tolerance = op.conformance.tolerance("triton", dtype)
    start = time.perf_counter()
    # the first call may come from inside a caller's no_grad, inference_mode or autocast block: the check must
    # run as the conformance test does (gradients on, the reference in float32) or it would fail a good kernel
    with _checking(), torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        cases = op.conformance.self_check(dtype)
        for index, case in enumerate(cases, 1):
            try:
                problems = compare_with_reference(op, "triton", case, tolerance, device)
            except Exception as err:  # noqa: BLE001 -- a kernel that does not compile or launch fails its check
                problems = [f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"]
            if problems:
                return Verdict(False, f"case {index} of {len(cases)}: {problems[0]}", time.perf_counter() - start)
    return Verdict(True, f"{len(cases)} cases match the reference", time.perf_counter() - start)


def verdict(op_name: str, device: torch.device, dtype: torch.dtype) -> Verdict:
    """The self-check verdict for `op_name`'s Triton kernel on `device` in `dtype`: from this process, else the
    disk cache, else run now (and stored in both)."""
    memo_key = (op_name, str(device), dtype)
    if memo_key not in _verdicts:  # sources and versions do not change within a process
        op = kernel_ops()[op_name]
        key = cache_key(op, device, dtype)
        path = _cache_file(key)
        found = _read_cached(path, key)
        if found is None:
            found = run_self_check(op, device, dtype)
            _write_cached(path, key, found)
        _verdicts[memo_key] = found
    return _verdicts[memo_key]


def known_verdict(op_name: str, device: torch.device, dtype: torch.dtype) -> Verdict | None:
    """The verdict if this process already has it (for code that cannot run kernels now, e.g. while
    torch.compile traces); None otherwise."""
    return _verdicts.get((op_name, str(device), dtype))


def forget() -> None:
    """Drops this process's verdicts (tests; the disk cache stays)."""
    _verdicts.clear()
