"""The attention benchmark's arithmetic and report; the timing itself needs CUDA (marker gpu)."""
import json

import pytest
import torch

from archlab.kernels.bench import _add_ratios, attention_flops, bench_attention, to_markdown, write_results
from archlab.train.cli import main


def test_attention_flops_convention():
    full = 4 * 2 * 3 * 128 * 128 * 64
    assert attention_flops(2, 3, 128, 64, causal=False, backward=False) == full
    assert attention_flops(2, 3, 128, 64, causal=True, backward=False) == full / 2
    assert attention_flops(2, 3, 128, 64, causal=True, backward=True) == full / 2 * 3.5


def _row(provider, ms, **shape):
    return {"provider": provider, "batch": 1, "heads": 2, "seq_len": 64, "head_dim": 32, "causal": True,
            "pass": "fwd", "ms": ms, "tflops": 1.0, "pct_peak": None, **shape}


def test_ratios_compare_same_shape_and_pass(tmp_path):
    rows = [_row("archlab-triton", 2.0), _row("sdpa-flash", 3.0), _row("sdpa-cudnn", 1.0),
            _row("archlab-triton", 4.0, causal=False), _row("sdpa-flash", 2.0, causal=False),
            {**_row("sdpa-cudnn", None, causal=False), "error": "not supported"}]
    _add_ratios(rows)
    assert rows[0]["ratio_vs_sdpa-flash"] == 1.5 and rows[0]["ratio_vs_sdpa-cudnn"] == 0.5
    assert rows[3]["ratio_vs_sdpa-flash"] == 0.5 and rows[3]["ratio_vs_sdpa-cudnn"] is None
    result = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23", "dtype": "bfloat16", "torch": "x",
              "triton": "y", "commit": "abc", "rows": rows}
    markdown = to_markdown(result)
    assert "| 1 | 2 | 64 | 32 | True | fwd | archlab-triton | 2.0 | 1.0 |  | 1.5 | 0.5 |" in markdown
    assert "failed: not supported" in markdown
    json_path, md_path = write_results(result, tmp_path)
    assert json_path.name == "attention-nvidia-h100-80gb-hbm3-2026-11-23-abc.json"
    assert json.loads(json_path.read_text())["rows"][0]["ratio_vs_sdpa-flash"] == 1.5 and md_path.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_bench_attention_on_cpu_says_it_needs_cuda(capsys):
    main(["bench", "attention"])
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_attention_runs_on_gpu():
    result = bench_attention(shapes=((1, 2, 256, 64),))
    ours = [r for r in result["rows"] if r["provider"] == "archlab-triton"]
    assert len(ours) == 4 and all(r["tflops"] > 0 for r in ours)
