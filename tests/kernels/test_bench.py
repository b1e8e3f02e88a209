"""The kernel benchmarks' arithmetic and reports; GPU timings are covered by `gpu`-marked tests."""
import importlib.util
import json
import time

import pytest
import torch

from archlab.kernels.backend import numba_missing, triton_interpreting
from archlab.kernels.bench import add_ratios, to_markdown, write_results
from archlab.kernels.bench.attention import COLUMNS as ATTENTION_COLUMNS
from archlab.kernels.bench.attention import WINDOW_PROVIDER, attention_flops, bench_attention, bench_cases
from archlab.kernels.bench.conv1d import bench_conv1d, conv1d_bytes
from archlab.kernels.bench.gated_delta import ATTENTION, bench_gated_delta
from archlab.kernels.bench.gated_delta import GPU_PROVIDERS as GATED_DELTA_GPU_PROVIDERS
from archlab.kernels.bench.scan import bench_scan, scan_bytes
from archlab.kernels.bench.ssd import AUTOCAST, bench_ssd
from archlab.kernels.bench.ssd import GPU_PROVIDERS as SSD_GPU_PROVIDERS
from archlab.compare.cli import main


def test_attention_flops_convention():
    full = 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 64, causal=False, backward=False) == full
    assert attention_flops(2, 3, 128, 64, causal=True, backward=False) == full / 2
    assert attention_flops(2, 3, 128, 64, causal=True, backward=True) == full / 2 * 3.5
    # a window W of L: L·W - W²/2 of the L² pairs, the causal count at W >= L
    assert attention_flops(2, 3, 128, 64, causal=True, backward=False, window=32) == full * (128 * 32 - 512) / 128**2
    assert attention_flops(2, 3, 128, 64, causal=True, backward=True, window=128) == full / 2 * 3.5


def test_every_window_row_has_full_causal_attention_to_compare_with():
    cases = bench_cases(shapes=((1, 2, 64, 32),), window_shapes=((1, 2, 256, 64, 16), (1, 2, 256, 64, 64)))
    windowed = [shape for shape, provider in cases if provider == WINDOW_PROVIDER]
    assert [shape["window"] for shape in windowed] == [16, 64] and all(shape["causal"] for shape in windowed)
    full = [(shape, provider) for shape, provider in cases if shape["seq_len"] == 256 and shape["window"] is None]
    assert sorted(provider for _, provider in full) == ["archlab-triton", "sdpa-cudnn", "sdpa-flash"]  # once
    assert all(shape["causal"] for shape, _ in full)
    assert len(cases) == 2 * 3 + 2 + 3  # the plain shape causal and not on three providers
    # the windowed rows' ratios read the full causal rows at the same shape and pass
    rows = [_row(WINDOW_PROVIDER, 1.0, window=16), _row(WINDOW_PROVIDER, 2.0, window=64), _row("archlab-triton", 4.0)]
    add_ratios(rows, ours=[WINDOW_PROVIDER], peers=["archlab-triton"],
               key=("batch", "heads", "seq_len", "head_dim", "causal", "pass"))
    assert [row["ratio_vs_archlab-triton"] for row in rows[:2]] == [4.0, 2.0]


def test_scan_and_conv_traffic_counts_each_tensor_once():
    batch, dim, seq_len, d_state = 2, 3, 5, 4
    forward = batch * dim * seq_len * 4 + batch * d_state * seq_len * 2  # u, delta, z, out; B, C
    backward = batch * dim * seq_len * 7 + batch * d_state * seq_len * 4  # + dout, du, ddelta, dz; dB, dC
    assert scan_bytes(batch, dim, seq_len, d_state, 2, backward=False) == 2 * forward
    assert scan_bytes(batch, dim, seq_len, d_state, 2, backward=True) == 2 * (forward + backward)
    assert conv1d_bytes(batch, dim, seq_len, 2, backward=False) == 2 * 2 * batch * dim * seq_len
    assert conv1d_bytes(batch, dim, seq_len, 2, backward=True) == 2 * 5 * batch * dim * seq_len


def _row(provider, ms, **shape):
    return {"provider": provider, "batch": 1, "heads": 2, "seq_len": 64, "head_dim": 32, "causal": True,
            "pass": "fwd", "ms": ms, "tflops": 1.0, "pct_peak": None, **shape}


def test_ratios_compare_same_shape_and_pass(tmp_path):
    rows = [_row("archlab-triton", 2.0), _row("sdpa-flash", 3.0), _row("sdpa-cudnn", 1.0),
            _row("archlab-triton", 4.0, causal=False), _row("sdpa-flash", 2.0, causal=False),
            {**_row("sdpa-cudnn", None, causal=False), "error": "not supported"}]
    add_ratios(rows, ours=["archlab-triton"], peers=["sdpa-flash", "sdpa-cudnn"],
               key=("batch", "heads", "seq_len", "head_dim", "causal", "pass"))
    assert rows[0]["ratio_vs_sdpa-flash"] == 1.5 and rows[0]["ratio_vs_sdpa-cudnn"] == 0.5
    assert rows[3]["ratio_vs_sdpa-flash"] == 0.5 and rows[3]["ratio_vs_sdpa-cudnn"] is None
    result = {"benchmark": "attention", "title": "Attention benchmark", "columns": ATTENTION_COLUMNS,
              "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "dtype": "bfloat16", "torch": "x",
              "triton": "y", "commit": "abc", "rows": rows}
    markdown = to_markdown(result)
    assert "| 1 | 2 | 64 | 32 | True |  | fwd | archlab-triton | 2.0 | 1.0 |  | 1.5 | 0.5 |  |" in markdown
    assert "| 1 | 2 | 64 | 32 | False |  | fwd | sdpa-cudnn | failed: not supported |  |  |  |  |  |" in markdown
    json_path, md_path = write_results(result, tmp_path)
    assert json_path.name == "attention-nvidia-h100-80gb-hbm3-2026-11-23-abc.json"
    assert json.loads(json_path.read_text())["rows"][0]["ratio_vs_sdpa-flash"] == 1.5 and md_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [json_path.name, md_path.name]  # no temporary files left


@pytest.mark.skipif(numba_missing() is not None, reason=f"{numba_missing()}")
def test_scan_bench_on_cpu_times_numba_and_torch_against_reference():
    result = bench_scan(torch.device("cpu"), shapes=((1, 8, 16, 4),), min_run_time=0.01)
    rows = {(r["provider"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(p, s) for p in ("archlab-numba", "archlab-torch", "reference") for s in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["gb_per_s"] > 0 for r in rows.values()), result["rows"]
    for ours in ("archlab-numba", "archlab-torch"):
        row = rows[(ours, "fwd+bwd")]
        assert row["ratio_vs_reference"] == pytest.approx(rows[("reference", "fwd+bwd")]["ms"] / row["ms"], rel=1e-2)
    numba_row = rows[("archlab-numba", "fwd")]
    assert numba_row["ratio_vs_archlab-torch"] == pytest.approx(rows[("archlab-torch", "fwd")]["ms"] / numba_row["ms"],
                                                                rel=1e-2)
    assert "ratio_vs_reference | ratio_vs_archlab-torch |" in to_markdown(result)


def test_ssd_bench_times_the_chunked_path_against_the_reference():
    threads = torch.get_num_threads()
    result = bench_ssd(torch.device("cpu"), shapes=((1, 9, 2, 4, 3),), training_shapes=((2, 5, 2, 4, 3),),
                       training_chunks=(2, 4), min_run_time=0.01)
    rows = {(r["batch"], r["provider"], r["chunk"], r["inputs"], r["pass"]): r for r in result["rows"]}
    goal = {(1, "archlab-torch", 64, "float32"), (1, "reference", None, "float32")}
    training = {(2, "archlab-torch", chunk, inputs) for chunk in (2, 4) for inputs in ("float32", AUTOCAST)}
    assert set(rows) == {(*case, s) for case in goal | training | {(2, "reference", None, "float32")}
                         for s in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["cpu_ms"] > 0 for r in rows.values()), result["rows"]
    for (batch, provider, _, _, pass_), ours in rows.items():  # every chunk and input dtype vs the float32 reference
        if provider == "archlab-torch":
            reference = rows[batch, "reference", None, "float32", pass_]
            assert ours["ratio_vs_reference"] == pytest.approx(reference["ms"] / ours["ms"], rel=1e-2)
            assert ours["cpu_ratio_vs_reference"] == pytest.approx(reference["cpu_ms"] / ours["cpu_ms"], rel=1e-2)
    assert torch.get_num_threads() == threads  # restored after the one-thread CPU timings
    assert result["benchmark"] == "ssd" and "ratio_vs_reference" in to_markdown(result)


def test_ssd_bench_plan_for_cuda_runs_on_cpu_where_it_can(monkeypatch):
    """The CUDA providers, run here (timed once each): our Triton SSD and scan in the interpreter, the peers as
    failed rows; the Triton SSD's ratios compare with Mamba-1 at the same model shape (its N = 16), not the same
    state size."""
    if importlib.util.find_spec("triton") is None or not triton_interpreting():
        pytest.skip("needs triton's interpreter")

    def once_ms(run, inputs, min_run_time):
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr("archlab.kernels.bench.ssd.time_cpu_ms", once_ms)
    result = bench_ssd(torch.device("cpu"), shapes=((1, 5, 1, 4, 4),), min_run_time=0.01, providers=SSD_GPU_PROVIDERS)
    rows = {(r["provider"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(p, s) for p in SSD_GPU_PROVIDERS for s in ("fwd", "fwd+bwd")}
    assert rows[("archlab-triton-mamba1", "fwd")]["d_state"] == 16 and rows[("archlab-triton", "fwd")]["d_state"] == 4
    assert "CUDA" in rows[("mamba_ssm", "fwd")]["error"] and "CUDA" in rows[("mamba_ssm-mamba1", "fwd")]["error"]
    ours, mamba1 = rows[("archlab-triton", "fwd+bwd")], rows[("archlab-triton-mamba1", "fwd+bwd")]
    assert ours["ratio_vs_archlab-triton-mamba1"] == pytest.approx(mamba1["ms"] / ours["ms"], rel=1e-2)
    assert ours["ratio_vs_mamba_ssm"] is None
    assert "ratio_vs_mamba_ssm-mamba1" in to_markdown(result)


def test_gated_delta_bench_times_the_chunked_path_against_the_reference():
    result = bench_gated_delta(torch.device("cpu"), shapes=((1, 9, 2, 4),), min_run_time=0.01)
    rows = {(r["provider"], r["pass"]): r for r in result["rows"]}
    assert set(rows) == {(p, s) for p in ("archlab-torch", "reference") for s in ("fwd", "fwd+bwd")}
    assert all(r["ms"] > 0 and r["cpu_ms"] > 0 for r in rows.values()), result["rows"]
    for pass_ in ("fwd", "fwd+bwd"):
        ours, reference = rows["archlab-torch", pass_], rows["reference", pass_]
        assert ours["ratio_vs_reference"] == pytest.approx(reference["ms"] / ours["ms"], rel=1e-2)
        assert ours["cpu_ratio_vs_reference"] == pytest.approx(reference["cpu_ms"] / ours["cpu_ms"], rel=1e-2)
    assert result["benchmark"] == "gated_delta" and "cpu_ratio_vs_reference" in to_markdown(result)


def test_gated_delta_bench_plan_for_cuda_runs_on_cpu_where_it_can(monkeypatch):
    """The CUDA plan, run here (timed once each): our flash attention in the interpreter where there is one, fla as
    failed rows; ratios compare within each part (vs fla, crossover) at the same shape."""
    def once_ms(run, inputs, min_run_time):
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr("archlab.kernels.bench.gated_delta.time_cpu_ms", once_ms)
    result = bench_gated_delta(torch.device("cpu"), shapes=((1, 5, 1, 16),), min_run_time=0.01,
                               providers=GATED_DELTA_GPU_PROVIDERS, crossover_shape=(1, 1, 16),
                               crossover_lengths=(16, 32))
    rows = {(r["part"], r["seq_len"], r["provider"], r["pass"]): r for r in result["rows"]}
    passes = ("fwd", "fwd+bwd")
    assert set(rows) == {("vs fla", 5, p, s) for p in GATED_DELTA_GPU_PROVIDERS for s in passes} | {
        ("crossover", n, p, s) for n in (16, 32) for p in ("archlab-triton", ATTENTION) for s in passes}
    assert "CUDA" in rows[("vs fla", 5, "fla", "fwd")]["error"] and result["rivals"] == ["fla"]
    if importlib.util.find_spec("triton") is not None and triton_interpreting():
        assert rows[("crossover", 32, ATTENTION, "fwd+bwd")]["ms"] > 0
    ours, attention = rows[("crossover", 32, "archlab-triton", "fwd+bwd")], rows[("crossover", 32, ATTENTION,
                                                                                "fwd+bwd")]
    if "ms" in ours and "ms" in attention:
        assert ours[f"ratio_vs_{ATTENTION}"] == pytest.approx(attention["ms"] / ours["ms"], rel=1e-2)
    assert f"ratio_vs_{ATTENTION}" in to_markdown(result)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
@pytest.mark.parametrize("what", ["attention", "conv1d"])
def test_cuda_only_benches_on_cpu_say_so(what, capsys):
    main(["bench", what])
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_kernel_bench_rejects_a_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "scan", "configs/quickstart.yaml"])
    assert exit_info.value.code == 2 and "takes no config" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_attention_runs_on_gpu():
    result = bench_attention(shapes=((1, 2, 256, 64),), window_shapes=((1, 2, 512, 64, 64),))
    ours = [r for r in result["rows"] if r["provider"] == "archlab-triton"]
    assert len(ours) == 6 and all(r["tflops"] > 0 for r in ours)
    windowed = [r for r in result["rows"] if r["provider"] == WINDOW_PROVIDER]
    assert len(windowed) == 2 and all(r["tflops"] > 0 and r["ratio_vs_archlab-triton"] > 0 for r in windowed)


@pytest.mark.gpu
def test_scan_and_conv1d_benches_run_on_gpu():
    scan = bench_scan(torch.device("cuda"), shapes=((1, 64, 256, 16),))
    conv = bench_conv1d(shapes=((1, 64, 256, 4),))
    for result in (scan, conv):
        ours = [r for r in result["rows"] if r["provider"] == "archlab-triton"]
        assert len(ours) == 2 and all(r["gb_per_s"] > 0 for r in ours), ours
