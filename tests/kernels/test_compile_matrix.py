"""The compile matrix (kernels/compile_matrix.py): every Triton kernel in every autotune config compiles for every
GPU target without a GPU, at least one config of each fits each target's shared memory, and the committed table
is what this triton produces. The shared-memory pruning before autotuning (kernels/common/autotune.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

triton = pytest.importorskip("triton")

from archlab.kernels.common.autotune import SHARED_MEMORY_LIMIT, autotune, fitting_configs  # noqa: E402
from archlab.kernels.registry import kernel_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parents[2] / "compare" / "results"
# The target compiled in CI: Hopper. Since issue 19's packed-document variants the matrix holds 166 compiles per target
# (~260 s of a 2-core CI machine each), so CI compiles one target and compares its rows with the committed table,
# which `archlab compile-matrix` writes for all six (sm_80, 86, 89, 90, 100, 120): a kernel change that does not
# regenerate it fails here, and the other targets' fits and spills are read from that table.
CI_TARGETS = (90,)


def _configs(*blocks):
    return [triton.Config({"BLOCK": block}, num_warps=4) for block in blocks]


def test_configs_that_do_not_fit_are_dropped_and_none_fitting_is_one_error():
    configs = _configs(32, 64, 128)
    kept = fitting_configs(configs, lambda c: c.kwargs["BLOCK"] * 1024, limit=64 * 1024, kernel_name="k")
    assert kept == configs[:2]  # at the limit fits, above it does not; order kept
    with pytest.raises(RuntimeError, match=r"triton kernel k: no autotune config fits this GPU's 1000 bytes of "
                                           r"shared memory per block \(the smallest needs 32768\)"):
        fitting_configs(configs, lambda c: c.kwargs["BLOCK"] * 1024, limit=1000, kernel_name="k")


def test_the_autotuner_prunes_by_the_shared_memory_of_each_config_compiled_for_the_device(monkeypatch):
    compiled = []

    def warmup(*args, grid, **kwargs):  # what JITFunction.warmup returns: a compiled kernel with its metadata
        compiled.append(kwargs)
        return SimpleNamespace(metadata=SimpleNamespace(shared=kwargs["BLOCK"] * 1024))

    def toy_kernel(X, n, BLOCK):
        pass

    kernel = SimpleNamespace(fn=toy_kernel, arg_names=["X", "n", "BLOCK"], __name__="toy_kernel", warmup=warmup)
    monkeypatch.setattr("archlab.kernels.common.autotune._device_shared_memory_limit", lambda: 100 * 1024)
    tuned = autotune(_configs(32, 64, 128), key=["n"])(kernel)
    tuned.nargs = {"X": "x-tensor", "n": 7}
    kept = tuned.prune_configs({"grid": (1,), "warmup": False})
    assert [c.kwargs["BLOCK"] for c in kept] == [32, 64]
    # each config compiled with the launch's arguments and its own blocks; the launch's grid is not an argument
    assert [(c["X"], c["n"], c["BLOCK"], c["num_warps"]) for c in compiled] == [("x-tensor", 7, b, 4)
                                                                             for b in (32, 64, 128)]


def _committed() -> dict | None:
    path = RESULTS / f"compile-matrix-triton{triton.__version__}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _triton_kernels(op_name: str) -> dict[str, tuple[int, set[int]]]:
    """The op's launchable kernels (`*_kernel`), each with (its config count over all autotuners wrapping it, the
    config counts of those autotuners): a launch variant runs under one of them."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    module = importlib.import_module(f"archlab.kernels.{op_name}.triton")
    kernels = {name: [] for name in vars(module) if name.endswith("_kernel")}
    tuners = [v for value in vars(module).values() for v in (value.values() if isinstance(value, dict) else [value])
              if isinstance(v, Autotuner)]
    for tuner in tuners:
        kernels[tuner.fn.__name__].append(len(tuner.configs))
    # a kernel with fixed blocks: one config
    return {name: (sum(counts) or 1, set(counts) or {1}) for name, counts in kernels.items()}


def check_matrix(fresh: dict, committed: dict | None) -> None:
    """Every launchable kernel of every op with a triton backend, each launch variant (its constexprs) in each of its
    configs, compiled for each target; at least one config of each launch fits each target; and the committed table
    is this one."""
    rows, targets = fresh["rows"], fresh["meta"]["targets"]
    assert set(CI_TARGETS).issubset(targets)
    for op in kernel_ops().values():
        if "triton" not in op.backends:
            continue
        for kernel, (n_configs, tuner_sizes) in _triton_kernels(op.name).items():
            mine = [r for r in rows if (r["op"], r["kernel"]) == (op.name, kernel)]
            assert mine, f"{op.name} {kernel} is not in the compile matrix: add it to its compile_launches"
            for target in targets:
                here = [r for r in mine if r["target"] == target]
                assert len({(r["constexprs"], r["config"]) for r in here}) >= n_configs, (op.name, kernel, target)
                for constexprs in {r["constexprs"] for r in here}:  # each launch variant (e.g. windowed or not)
                    variant = [r for r in here if r["constexprs"] == constexprs]
                    assert len({r["config"] for r in variant}) in tuner_sizes, (op.name, kernel, constexprs, target)
                    assert any(r["fits"] for r in variant), \
                        f"no config of {op.name} {kernel} ({constexprs}) fits sm_{target}"
    assert all(r["fits"] == (r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["target"]]) for r in rows)
    if committed is not None:
        assert [r for r in committed["rows"] if r["target"] in targets] == rows, (
            "the committed compile matrix is stale: run `archlab compile-matrix` and commit "
            "compare/results/compile-matrix-*")


@pytest.mark.slow
def test_every_kernel_in_every_config_compiles_for_every_target_and_matches_the_committed_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # interpreted kernels do not compile
    done = subprocess.run([sys.executable, "-m", "archlab.compare.cli", "compile-matrix", "--out", str(tmp_path),
                           "--jobs", str(min(os.cpu_count() or 1, 4)), "--targets", *map(str, CI_TARGETS)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    committed = _committed()
    check_matrix(json.loads(next(tmp_path.glob("compile-matrix-*.json")).read_text()), committed)
    if committed is None:
        pytest.skip(f"compiled, but no committed table for triton {triton.__version__} to compare with: run "
                    "`archlab compile-matrix` and commit compare/results/compile-matrix-*")
