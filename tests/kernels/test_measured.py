"""`auto` puts our Triton kernel first only where a committed benchmark shows it at least as fast there."""
import json

from archlab.kernels.measured import RESULTS_DIR, triton_measured_fast
from archlab.kernels.registry import kernel_ops

H100 = "NVIDIA H100 80GB HBM3"


def write_bench(folder, name, device, ratios, dtype="bfloat16", date="2026-12-01"):
    rows = [{"provider": "archlab-triton", "pass": "fwd+bwd", "ms": 1.0, "ratio_vs_sdpa-flash": ratio}
            for ratio in ratios]
    rows.append({"provider": "sdpa-flash", "pass": "fwd+bwd", "ms": 1.0})
    (folder / name).write_text(json.dumps({"benchmark": "attention", "device": device, "dtype": dtype,
                                           "date": date, "rows": rows}))


def test_no_committed_gpu_benchmark_means_no_promotion():
    for op in kernel_ops().values():
        assert triton_measured_fast(op, H100, "bfloat16", RESULTS_DIR) is None


def test_only_a_benchmark_of_the_same_family_dtype_and_all_rows_at_least_as_fast(tmp_path):
    op = kernel_ops()["attention"]
    write_bench(tmp_path, "attention-a100-2026-12-01-abc.json", "NVIDIA A100-SXM4-80GB", [1.5, 1.2])
    assert triton_measured_fast(op, H100, "bfloat16", tmp_path) is None  # another family
    write_bench(tmp_path, "attention-h100-2026-12-01-abc.json", "NVIDIA H100 PCIe", [1.5, 0.9])
    assert triton_measured_fast(op, "NVIDIA H100 PCIe", "bfloat16", tmp_path) is None  # one shape slower
    write_bench(tmp_path, "attention-h100-2026-12-02-def.json", "NVIDIA H100 PCIe", [1.1, 1.0], date="2026-12-02")
    why = triton_measured_fast(op, "NVIDIA H100 PCIe", "bfloat16", tmp_path)  # the newest file decides
    assert why == ("attention-h100-2026-12-02-def.json: ours >= every rival on H100 PCIe in bfloat16 "
                   "(worst ratio 1.00)")
    assert triton_measured_fast(op, "NVIDIA H100 PCIe", "float16", tmp_path) is None  # another dtype
    (tmp_path / "attention-broken.json").write_text("{ not json")
    assert triton_measured_fast(op, "NVIDIA H100 PCIe", "bfloat16", tmp_path) is not None  # unreadable: ignored


def test_only_the_rivals_a_result_names_count(tmp_path):
    """The SSD bench also times Mamba-1's scan: slower than it, ours still goes first if it beats the SSD peer."""
    rows = [{"provider": "archlab-triton", "pass": "fwd+bwd", "ms": 1.0, "ratio_vs_mamba_ssm": 1.2,
             "ratio_vs_mamba_ssm-mamba1": 0.5}]
    result = {"benchmark": "ssd", "device": H100, "dtype": "bfloat16", "date": "2026-12-01", "rows": rows}
    (tmp_path / "ssd-h100-2026-12-01-abc.json").write_text(json.dumps(result))
    assert triton_measured_fast(kernel_ops()["ssd"], H100, "bfloat16", tmp_path) is None  # every ratio counts
    (tmp_path / "ssd-h100-2026-12-01-abc.json").write_text(json.dumps({**result, "rivals": ["mamba_ssm"]}))
    assert "(worst ratio 1.20)" in triton_measured_fast(kernel_ops()["ssd"], H100, "bfloat16", tmp_path)
