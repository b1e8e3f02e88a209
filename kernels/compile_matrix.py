"""Every Triton kernel in every autotune config, compiled for GPU targets we may never see, on a CPU machine.

`archlab compile-matrix` (and tests/kernels/test_compile_matrix.py, in CI) compiles each launch with Triton's own
front end and the ptxas it ships, exactly as Triton would at the first launch on that GPU, and records per
config and target the registers per thread, the bytes spilled, the shared memory, and whether it fits the
target's shared memory: kernels/common/autotune.py prunes the configs that don't before autotuning.

Launches come from each op's `Conformance.compile_launches(as_gpu)`: it calls the op's launchers on CPU tensors
that report is_cuda, so they take their GPU (autotuned) path, and the launch is intercepted instead of run.
Needs triton and no GPU; not under TRITON_INTERPRET=1 (interpreted kernels have no compiler).
"""
from __future__ import annotations

import contextlib
import io
import multiprocessing
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

from archlab.kernels.common.autotune import SHARED_MEMORY_LIMIT, fits
from archlab.kernels.common.files import atomic_write_all, json_text
from archlab.kernels.common.markdown import table
from archlab.kernels.registry import kernel_ops

TARGETS = (80, 86, 89, 90, 100, 120)  # A100; A10/3090; L4/4090; H100; B200; RTX 5090


class _PretendCuda(torch.Tensor):
    """A CPU tensor the launchers take for a CUDA one, so they choose their autotuned GPU path."""

    @property
    def is_cuda(self) -> bool:
        return True


def as_gpu(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_PretendCuda)


@dataclass(frozen=True)
class Launch:
    op: str
    kernel: JITFunction
    configs: tuple[triton.Config, ...]  # the autotuner's; one default Config for a launch with fixed blocks
    args: tuple
    kwargs: dict  # constexprs, without the autotuned ones

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclass(frozen=True)
class Compiled:
    op: str
    kernel: str
    constexprs: str  # the launch's, which tell two launches of one kernel apart (e.g. the conv's layouts)
    config: str
    target: int
    registers: int
    spill_bytes: int  # stores + loads
    shared_bytes: int
    fits: bool


@contextlib.contextmanager
def _intercepted(launches: list, op: str) -> Iterator[None]:
    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(op, self, (triton.Config({}),), args, kwargs))

    def autotuner_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(op, self.fn, tuple(self.configs), args, kwargs))

    with mock.patch.object(JITFunction, "run", jit_run), mock.patch.object(Autotuner, "run", autotuner_run):
        yield


def record_launches() -> list[Launch]:
    """Every distinct launch the registered ops' compile_launches make (an op's kernel with the same constexprs
    and argument dtypes once)."""
    launches: list[Launch] = []
    for op in kernel_ops().values():
        if op.conformance.compile_launches is not None:
            with _intercepted(launches, op.name):
                op.conformance.compile_launches(as_gpu)
    distinct = {}
    for launch in launches:
        dtypes = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in launch.args)
        distinct.setdefault((launch.op, launch.name, dtypes, tuple(sorted(launch.kwargs.items()))), launch)
    return list(distinct.values())


def config_label(config: triton.Config) -> str:
    blocks = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{blocks} warps={config.num_warps} stages={config.num_stages}".strip()


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_launch(launch: Launch, config: triton.Config, target: int) -> Compiled:
    """Compiles as JITFunction.run does on a device of compute capability `target`; reads ptxas's -v report."""
    gpu = GPUTarget("cuda", target, 32)
    backend = make_backend(gpu)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(launch.kernel.signature, launch.kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), knobs.nvidia.scope():
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=gpu,
                                options=options.__dict__)
    report = log.getvalue()
    registers, spills = _REGISTERS.search(report), _SPILLS.search(report)
    if registers is None or spills is None:
        raise RuntimeError(f"compile matrix: no ptxas report for {launch.name} on sm_{target}; was it a cache hit?")
    shared = kernel.metadata.shared
    constexpr_text = " ".join(f"{k}={v}" for k, v in launch.kwargs.items())
    return Compiled(launch.op, launch.name, constexpr_text, config_label(config), target, int(registers.group(1)),
                    int(spills.group(1)) + int(spills.group(2)), shared, fits(shared, SHARED_MEMORY_LIMIT[target]))


_LAUNCHES: list[Launch] = []  # the parent's, inherited by forked workers (a Launch holds a JITFunction: no pickling)


def _compile_job(job: tuple[int, int, int]) -> Compiled:
    launch_index, config_index, target = job
    launch = _LAUNCHES[launch_index]
    return compile_launch(launch, launch.configs[config_index], target)


def compile_matrix(targets: tuple[int, ...] = TARGETS, jobs: int = 1) -> list[Compiled]:
    """Every recorded launch in every config for every target, in a fresh Triton cache (a cache hit has no ptxas
    report), on `jobs` processes."""
    unknown = [t for t in targets if t not in SHARED_MEMORY_LIMIT]
    if unknown:
        raise ValueError(f"compile matrix: unknown target {unknown[0]}; choose compute capabilities from "
                         f"{', '.join(map(str, SHARED_MEMORY_LIMIT))}")
    _LAUNCHES[:] = record_launches()
    work = [(i, c, t) for i, launch in enumerate(_LAUNCHES) for c in range(len(launch.configs)) for t in targets]
    with tempfile.TemporaryDirectory(prefix="archlab-compile-matrix-") as cache, knobs.cache.scope():
        knobs.cache.dir = cache
        if jobs <= 1:
            return [_compile_job(job) for job in work]
        # fork: workers inherit _LAUNCHES and the cache setting
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_compile_job, work, chunksize=4))


def as_records(rows: list[Compiled]) -> list[dict]:
    return [asdict(row) for row in rows]


def _cell(row: Compiled) -> str:
    text = f"{row.registers} r, {row.shared_bytes / 1024:.1f} KB"
    if row.spill_bytes:
        text += f", **spills {row.spill_bytes} B**"
    return text if row.fits else f"~~{text}~~ pruned"


def to_markdown(rows: list[Compiled], meta: dict) -> str:
    targets = sorted({row.target for row in rows})
    launches = list(dict.fromkeys((row.op, row.kernel, row.constexprs) for row in rows))
    lines = ["# Compile matrix: every Triton kernel in every autotune config, per GPU target", "",
             f"Compiled on a CPU machine, no GPU, by `{meta['command']}`: triton {meta['triton']} and its "
             f"ptxas {meta['ptxas']}, archlab {meta['commit']}. Per config: registers per thread (r), shared "
             "memory, spilled bytes (stores + loads) when any. Struck out: more shared memory than the target "
             "gives a block, so kernels/common/autotune.py prunes it there before autotuning. Limits (KB): "
             + ", ".join(f"sm_{t} {SHARED_MEMORY_LIMIT[t] / 1024:g}" for t in targets) + ".", "",
             "## Configs that fit, per target", ""]
    summary = []
    for op, kernel, constexprs in launches:
        mine = [row for row in rows if (row.op, row.kernel, row.constexprs) == (op, kernel, constexprs)]
        cells = []
        for target in targets:
            here = [row for row in mine if row.target == target]
            spilling = sum(row.spill_bytes > 0 for row in here if row.fits)
            cells.append(f"{sum(row.fits for row in here)}/{len(here)}" + (f" ({spilling} spill)" if spilling else ""))
        summary.append((f"{op} `{kernel}`", *cells))
    lines += table(["kernel", *(f"sm_{t}" for t in targets)], summary)
    for op, kernel, constexprs in launches:
        mine = [row for row in rows if (row.op, row.kernel, row.constexprs) == (op, kernel, constexprs)]
        by_config = {}
        for row in mine:
            by_config.setdefault(row.config, {})[row.target] = row
        lines += ["", f"## {op} `{kernel}`", "", f"constexprs: {constexprs or 'none'}", ""]
        lines += table(["config", *(f"sm_{t}" for t in targets)],
                       [(config, *(_cell(cells[t]) for t in targets)) for config, cells in by_config.items()])
    return "\n".join(lines) + "\n"


def ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas_version

    report = get_ptxas_version()  # "... Cuda compilation tools, release 12.9, V12.9.86 ..."
    return next((line.split("release")[-1].strip(" ,") for line in report.splitlines() if "release" in line),
                report.strip().splitlines()[-1])


def results_stem() -> str:
    return f"compile-matrix-triton{triton.__version__}"


def write_results(rows: list[Compiled], meta: dict, out_dir: Path) -> tuple[Path, Path]:
    """compile-matrix-triton<version>.json and .md under out_dir, both or neither."""
    json_path, md_path = out_dir / f"{results_stem()}.json", out_dir / f"{results_stem()}.md"
    atomic_write_all({json_path: json_text({"meta": meta, "rows": as_records(rows)}),
                      md_path: to_markdown(rows, meta)})
    return json_path, md_path
