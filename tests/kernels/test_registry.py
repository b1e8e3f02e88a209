"""The kernel op registry: shipped ops register on import, and an op registered from outside the package (a toy
cumulative sum, in the new-op layout with cu_seqlens) is at once a config key, a backend check, a benchmark and a
conformance test."""
import json
import subprocess
import sys

import pytest
import torch

from archlab.kernels.backend import check_backend, resolve_backend
from archlab.kernels.bench import environment
from archlab.kernels.registry import (Conformance, ConformanceCase, KernelBench, KernelOp, Tolerance, kernel_benches,
                                      kernel_ops, register, unregister)
from archlab.compare.cli import main
from archlab.train.config import dump_config, load_config
from archlab.train.errors import ConfigError
from tests.kernels.test_conformance import check_conformance


# -- a toy op, as a researcher would write it outside the package ------------------------------------------------
def toy_cumsum(x, cu_seqlens=None, *, backend="auto"):
    """Running sum over the length of x (batch, length, heads, dim), restarting at each packed sequence's start."""
    name = resolve_backend("toy_cumsum", backend, x.device)
    if name == "reference":
        return toy_cumsum_reference(x, cu_seqlens)
    if cu_seqlens is None:
        return x.cumsum(1)
    sequences = x.tensor_split(cu_seqlens[1:-1].tolist(), dim=1)
    return torch.cat([sequence.cumsum(1) for sequence in sequences], dim=1)


def toy_cumsum_reference(x, cu_seqlens=None):
    """One position at a time in float32."""
    starts = {0} if cu_seqlens is None else set(cu_seqlens.tolist())
    total, sums = None, []
    for position in range(x.shape[1]):
        step = x[:, position].float()
        total = step if position in starts else total + step
        sums.append(total)
    return torch.stack(sums, dim=1).to(x.dtype)


def draw_toy_case(draw, dtype):
    from hypothesis import strategies as st

    lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    packed = draw(st.booleans())
    batch, length = (1, sum(lengths)) if packed else (draw(st.integers(1, 3)), lengths[0])
    x = torch.randn(batch, length, draw(st.integers(1, 2)), draw(st.integers(1, 4))).to(dtype).requires_grad_()
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32) if packed else None
    return ConformanceCase((x, cu_seqlens))


def toy_bench() -> dict:
    return {"benchmark": "toy", "title": "Toy benchmark", "columns": ("provider", "ms"), "notes": [],
            "rows": [{"provider": "toy", "ms": 1.0}], **environment(torch.device("cpu"), torch.float32)}


def toy_op(name="toy_cumsum", dispatch=toy_cumsum):
    return KernelOp(
        name=name, backends=("torch", "reference"), auto_on_cuda="torch",
        layout="x (batch, length, heads, dim), cu_seqlens (n + 1,) int32 with batch 1; out like x",
        dispatch=dispatch, reference=toy_cumsum_reference,
        conformance=Conformance(draw_toy_case, tolerances={torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
                                                           torch.bfloat16: Tolerance(rtol=2e-2, atol=2e-2)},
                                backend_dtypes={"reference": (torch.float32,)}),
        bench=KernelBench(f"{name}-bench", f"{__name__}:toy_bench", "toy timings", needs_cuda=False))


@pytest.fixture
def registered_toy():
    op = register(toy_op())
    yield op
    unregister(op.name)


# -- the shipped ops ---------------------------------------------------------------------------------------------
def test_importing_the_kernels_registers_every_shipped_op():
    code = ("import archlab.kernels.registry as r; "
            "print(list(r.kernel_ops()), list(r.kernel_benches()))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[0] == "['attention', 'selective_scan', 'causal_conv1d', 'ssd', 'gated_delta'] " \
                                           "['attention', 'scan', 'conv1d', 'ssd', 'gated_delta']"
    for op in kernel_ops().values():
        assert op.conformance.tolerances and op.layout and op.bench.load()


# -- an op registered from outside the package -------------------------------------------------------------------
def test_toy_op_is_a_config_key_and_a_backend_check(registered_toy, tmp_path):
    check_backend("toy_cumsum", "reference")
    assert resolve_backend("toy_cumsum", "auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="toy_cumsum has no 'triton' backend yet; use auto, torch or reference"):
        check_backend("toy_cumsum", "triton")
    cfg = load_config(None, ["kernels.toy_cumsum=reference"])
    assert cfg.kernels.toy_cumsum == "reference" and cfg.kernels.model_dump()["toy_cumsum"] == "reference"
    assert list(cfg.kernels.model_dump()) == ["attention", "selective_scan", "causal_conv1d", "ssd", "gated_delta",
                                                 "toy_cumsum"]
    assert load_config(None).kernels.model_dump()["toy_cumsum"] == "auto"
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match="kernels.toy_cumsum: toy_cumsum has no 'triton' backend yet"):
        load_config(None, ["kernels.toy_cumsum=triton"])


def test_toy_op_passes_the_conformance_check(registered_toy):
    for backend in registered_toy.backends:
        for dtype in registered_toy.conformance.dtypes(backend):
            check_conformance(registered_toy, backend, dtype, max_examples=15)
    assert registered_toy.conformance.dtypes("reference") == (torch.float32,)


def test_a_backend_may_have_its_own_tolerances():
    loose = Tolerance(rtol=1e-1, atol=1e-1)
    conformance = Conformance(draw_toy_case, tolerances={torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
                                                         torch.bfloat16: Tolerance(rtol=2e-2, atol=2e-2)},
                              backend_tolerances={"triton": {torch.bfloat16: loose}})
    assert conformance.tolerance("triton", torch.bfloat16) == loose
    assert conformance.tolerance("triton", torch.float32) == conformance.tolerances[torch.float32]
    assert conformance.tolerance("torch", torch.bfloat16) == conformance.tolerances[torch.bfloat16]


def test_conformance_check_catches_a_backend_that_ignores_cu_seqlens():
    op = register(toy_op("toy_unpacked", lambda x, cu_seqlens=None, *, backend="auto": x.cumsum(1)))
    try:
        with pytest.raises(AssertionError, match="output 0"):
            check_conformance(op, "torch", torch.float32, max_examples=30)
    finally:
        unregister(op.name)


def test_toy_op_benchmark_runs_from_the_registry(registered_toy, tmp_path, capsys):
    assert "toy_cumsum-bench" in kernel_benches()
    main(["bench", "toy_cumsum-bench", "--out", str(tmp_path)])
    assert "Toy benchmark" in capsys.readouterr().out
    [json_path] = tmp_path.glob("*.json")
    assert json.loads(json_path.read_text())["rows"] == [{"provider": "toy", "ms": 1.0}]


def test_an_unregistered_op_is_unknown_again():
    assert "toy_cumsum" not in kernel_ops()
    with pytest.raises(ValueError, match="unknown op 'toy_cumsum'; choose from attention, selective_scan"):
        check_backend("toy_cumsum", "torch")
    with pytest.raises(ConfigError, match="unknown key kernels.toy_cumsum; nearest valid key"):
        load_config(None, ["kernels.toy_cumsum=torch"])


@pytest.mark.parametrize("change,message", [
    (dict(backends=("reference",), auto_on_cuda="reference"), "needs a torch backend: it is what auto falls back to"),
    (dict(backends=("torch", "cuda")), "unknown backend 'cuda'; choose from triton, numba, torch, reference, peer"),
    (dict(auto_on_cuda="triton"), "auto_on_cuda='triton' is not one of its backends torch, reference"),
    (dict(auto_on_cpu=("numba", "torch")), "auto_on_cpu='numba' is not one of its backends torch, reference"),
    (dict(name="toy-cumsum"), "must be an identifier"),
    (dict(backends=("triton", "torch", "reference")), "has a triton backend but no conformance.self_check cases"),
])
def test_a_malformed_op_is_refused_in_one_line(change, message):
    fields = {**toy_op().__dict__, **change}
    with pytest.raises(ValueError, match=message) as info:
        KernelOp(**fields)
    assert "\n" not in str(info.value)


def test_names_and_bench_names_are_unique(registered_toy):
    with pytest.raises(ValueError, match="'toy_cumsum' is already registered"):
        register(toy_op())
    with pytest.raises(ValueError, match="bench name 'scan' is taken by 'selective_scan'"):
        register(KernelOp(**{**toy_op("toy_other").__dict__,
                             "bench": KernelBench("scan", f"{__name__}:toy_bench", "clash", needs_cuda=False)}))
    assert "toy_other" not in kernel_ops()
