"""Kernel ops register themselves here; config keys, benchmarks and conformance tests come from the registry.

Each kernels/<op>/__init__.py ends with `register(KernelOp(...))`, and importing `archlab.kernels` (which any
`archlab.kernels.*` import does first) imports every shipped op. A researcher's op outside the package registers
the same way from its own module. Once registered, an op
  - is a config key, `kernels.<name>: auto|triton|numba|torch|reference|peer` (train/config.py), and
    kernels/backend.py's check_backend / resolve_backend accept it;
  - gets tests/kernels/test_conformance.py: every backend it implements that can run there is compared with its
    reference, forward outputs and the gradient of every differentiable input, over inputs drawn by its
    `conformance` spec, in every dtype the spec has tolerances for. Nothing else to write;
  - gets `archlab bench <bench.name>` when it brings a KernelBench.

Layout. New ops take the layout of their best-known peers, mamba_ssm's `mamba_chunk_scan_combined` and fla's
`chunk_gated_delta_rule`: (batch, length, heads, dim), and they accept `cu_seqlens` from the start: an int32
tensor (n_sequences + 1,) of cumulative lengths, starting at 0, for sequences packed end to end in a batch of 1,
so that a packed batch gives each sequence what it gives alone. The ops that predate this keep their layouts:
attention (batch, heads, length, dim); selective_scan and causal_conv1d (batch, dim, length), mamba_ssm's.
`KernelOp.layout` records each op's in one line.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

BACKENDS = ("auto", "triton", "numba", "torch", "reference", "peer")
CONCRETE_BACKENDS = BACKENDS[1:]  # what `auto` resolves to


@dataclass(frozen=True)
class Tolerance:
    """A result passes when |got - want| <= rtol * |want| + atol * max(max |want|, 1) elementwise: rounding errors
    of sums grow with the size of their terms, so the absolute part scales with the result's largest value."""

    rtol: float
    atol: float


@dataclass(frozen=True)
class ConformanceCase:
    """One call: `dispatch(*args, **kwargs, backend=...)`. Tensors with requires_grad set are the differentiable
    inputs whose gradients are compared; float16/bfloat16 tensors are upcast to float32 for the reference."""

    args: tuple
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Conformance:
    """How the conformance test checks an op.

    draw_case(draw, dtype) returns a ConformanceCase whose floating inputs are in `dtype` (parameters an op keeps
    in float32 may stay float32); `draw` is hypothesis's (`draw(st.integers(1, 3))`), so failures shrink. Keep the
    sizes small: on CPU the Triton backend runs in Triton's interpreter, at 0.1-2 s a call.
    tolerances: the dtypes to check, each with how close every output and gradient must be to the reference
    (gradients flow back from the first output only; later ones, e.g. a last state, are compared forward).
    backend_dtypes: for a backend that supports fewer dtypes, the ones to check it in.
    backend_tolerances: for a backend that rounds more (a kernel that feeds its matmuls half-precision operands),
    its own tolerances by dtype, in place of `tolerances` there; the other backends keep theirs.
    self_check: fixed cases (no hypothesis: it is not installed with archlab) that cover the Triton kernel's code
    paths, for the check it passes on a GPU before its first use (kernels/self_check.py); required with a triton
    backend. self_check(dtype) returns them built on the CPU in `dtype`; they are judged by tolerance("triton",
    dtype).
    compile_launches(as_gpu): calls the op's Triton launchers (fwd and bwd) the way training on a GPU does, on
    CPU tensors passed through `as_gpu`, for the compile matrix (kernels/compile_matrix.py), which intercepts
    each launch and compiles it in every autotune config for every GPU target; required with a triton backend.
    """

    draw_case: Callable[[Callable, torch.dtype], ConformanceCase]
    tolerances: Mapping[torch.dtype, Tolerance]
    backend_dtypes: Mapping[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    backend_tolerances: Mapping[str, Mapping[torch.dtype, Tolerance]] = field(default_factory=dict)
    self_check: Callable[[torch.dtype], list[ConformanceCase]] | None = None
    compile_launches: Callable[[Callable[[torch.Tensor], torch.Tensor]], None] | None = None

    def dtypes(self, backend: str) -> tuple[torch.dtype, ...]:
        return self.backend_dtypes.get(backend, tuple(self.tolerances))

    def tolerance(self, backend: str, dtype: torch.dtype) -> Tolerance:
        """How close `backend`'s results in `dtype` must be to the reference."""
        return self.backend_tolerances.get(backend, {}).get(dtype, self.tolerances[dtype])


@dataclass(frozen=True)
class KernelBench:
    """`archlab bench <name>`: `function` ("module:function", imported only when the bench runs) takes no
    arguments and returns a result dict for kernels/bench's write_results."""

    name: str
    function: str
    summary: str  # one line for `archlab bench --help`
    needs_cuda: bool = True

    def load(self) -> Callable[[], dict]:
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class KernelOp:
    """A kernel op: `dispatch(..., backend="auto")` runs it on the backend that kernels/backend.py resolves.

    backends: the concrete backends it implements (from CONCRETE_BACKENDS; torch is required: what `auto` falls
    back to). auto_on_cuda: what `auto` may pick on CUDA, best first (one name or several): kernels/backend.py takes
    the first that is usable there (peer: its package is installed; triton: it passed its self-check), else torch.
    Our Triton kernel also goes first where a committed benchmark shows it at least as fast on that GPU class
    (kernels/measured.py). auto_on_cpu: the same off CUDA (numba: the numba package imports), torch by default.
    layout: its tensor layout in one line. reference: the definition of correct, called
    like `dispatch` without `backend` and returning the same outputs. peer_package: the module the peer backend
    imports (None: it is part of torch, as SDPA).
    """

    name: str
    backends: tuple[str, ...]
    auto_on_cuda: str | tuple[str, ...]
    layout: str
    dispatch: Callable
    reference: Callable
    conformance: Conformance
    bench: KernelBench | None = None
    peer_package: str | None = None
    auto_on_cpu: str | tuple[str, ...] = "torch"

    def __post_init__(self):
        for order in ("auto_on_cuda", "auto_on_cpu"):
            if isinstance(getattr(self, order), str):
                object.__setattr__(self, order, (getattr(self, order),))
        if not self.name.isidentifier():
            raise ValueError(f"kernel op name {self.name!r} must be an identifier (it is a config key)")
        unknown = [b for b in self.backends if b not in CONCRETE_BACKENDS]
        if unknown:
            raise ValueError(f"kernel op {self.name}: unknown backend {unknown[0]!r}; choose from "
                             f"{', '.join(CONCRETE_BACKENDS)}")
        if "torch" not in self.backends:
            raise ValueError(f"kernel op {self.name} needs a torch backend: it is what auto falls back to")
        for order in ("auto_on_cuda", "auto_on_cpu"):
            unknown = [b for b in getattr(self, order) if b not in self.backends]
            if unknown or not getattr(self, order):
                raise ValueError(f"kernel op {self.name}: {order}={unknown[0] if unknown else ''!r} is not one of "
                                 f"its backends {', '.join(self.backends)}")
        if "triton" in self.backends and self.conformance.self_check is None:
            raise ValueError(f"kernel op {self.name} has a triton backend but no conformance.self_check cases: a "
                             "Triton kernel is checked against its reference on each GPU before it first runs")
        if "triton" in self.backends and self.conformance.compile_launches is None:
            raise ValueError(f"kernel op {self.name} has a triton backend but no conformance.compile_launches: every "
                             "Triton kernel is compiled for each GPU target in CI (kernels/compile_matrix.py)")


_OPS: dict[str, KernelOp] = {}


def register(op: KernelOp) -> KernelOp:
    """Adds `op` (names and bench names are unique); returns it."""
    if op.name in _OPS:
        raise ValueError(f"kernel op {op.name!r} is already registered; choose another name or unregister it first")
    owner = next((other.name for other in _OPS.values() if op.bench and other.bench
                  and other.bench.name == op.bench.name), None)
    if owner is not None:
        raise ValueError(f"kernel op {op.name}: bench name {op.bench.name!r} is taken by {owner!r}; choose another")
    _OPS[op.name] = op
    return op


def unregister(name: str) -> None:
    """Removes a registered op (tests register toy ops and take them away again)."""
    del _OPS[name]


def kernel_ops() -> Mapping[str, KernelOp]:
    """Every registered op by name, in registration order (a read-only live view)."""
    return MappingProxyType(_OPS)


def kernel_benches() -> dict[str, KernelBench]:
    """The registered ops' benchmarks by bench name, in registration order."""
    return {op.bench.name: op.bench for op in _OPS.values() if op.bench is not None}
