"""`archlab bench attention`: our Triton FlashAttention against PyTorch SDPA (FLASH and cuDNN) on CUDA.

For each shape and causal setting it times the forward and forward+backward passes of every provider on
the same bf16 inputs, in one process, and reports ms, TFLOP/s, % of the device's bf16 peak and the ratio
to SDPA-FLASH and SDPA-cuDNN. FLOPs: forward 4·B·H·L²·D (two matmuls), halved when causal; backward is
2.5x forward (FlashAttention's convention), so forward+backward is 3.5x.
"""
from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from archlab.kernels.hardware import device_name, peak_flops

DEFAULT_SHAPES = ((8, 16, 2048, 64), (4, 16, 4096, 128))  # (batch, heads, seq_len, head_dim)
PROVIDERS = ("archlab-triton", "sdpa-flash", "sdpa-cudnn")


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, *, causal: bool, backward: bool) -> float:
    forward = 4 * batch * heads * seq_len * seq_len * head_dim * (0.5 if causal else 1.0)
    return forward * (3.5 if backward else 1.0)


def _provider(name: str):
    from archlab.kernels.attention import flash_attention

    if name == "archlab-triton":
        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5)[0]
    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def sdpa(q, k, v, causal):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


def _time_ms(fn, inputs: tuple, grad_out, *, causal: bool, backward: bool) -> float:
    """Median milliseconds of one forward (and backward) pass; gradients are reset between runs."""
    import triton.testing

    def run():
        out = fn(*inputs, causal)
        if backward:
            out.backward(grad_out)

    return triton.testing.do_bench(run, warmup=25, rep=100, grad_to_none=list(inputs), return_mode="median")


def bench_attention(shapes=DEFAULT_SHAPES, dtype: torch.dtype = torch.bfloat16) -> dict:
    device = torch.device("cuda")
    peak = peak_flops(device)
    rows = []
    for batch, heads, seq_len, head_dim in shapes:
        for causal in (True, False):
            q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            grad_out = torch.randn_like(q)
            for name in PROVIDERS:
                fn = _provider(name)
                for backward in (False, True):
                    row = {"provider": name, "batch": batch, "heads": heads, "seq_len": seq_len,
                           "head_dim": head_dim, "causal": causal, "pass": "fwd+bwd" if backward else "fwd"}
                    try:
                        ms = _time_ms(fn, (q, k, v), grad_out, causal=causal, backward=backward)
                    # an SDPA backend this GPU or shape lacks, a config that fails to compile: keep the other rows
                    except Exception as err:  # noqa: BLE001
                        rows.append({**row, "error": str(err).splitlines()[0][:200]})
                        continue
                    tflops = attention_flops(batch, heads, seq_len, head_dim, causal=causal,
                                             backward=backward) / ms / 1e9
                    rows.append({**row, "ms": round(ms, 4), "tflops": round(tflops, 1),
                                 "pct_peak": round(100 * tflops * 1e12 / peak, 1) if peak else None})
    _add_ratios(rows)
    return {"benchmark": "attention", "device": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "torch": torch.__version__, "triton": _triton_version(), "commit": _commit(),
            "date": datetime.date.today().isoformat(), "rows": rows}


def _add_ratios(rows: list[dict]) -> None:
    """ratio_vs_<peer> = peer time / our time at the same shape and pass (> 1: we are faster)."""
    def key(row):
        return row["batch"], row["heads"], row["seq_len"], row["head_dim"], row["causal"], row["pass"]

    times = {(row["provider"], key(row)): row.get("ms") for row in rows}
    for row in rows:
        if row["provider"] == "archlab-triton" and row.get("ms"):
            for peer in PROVIDERS[1:]:
                peer_ms = times.get((peer, key(row)))
                row[f"ratio_vs_{peer}"] = round(peer_ms / row["ms"], 3) if peer_ms else None


def to_markdown(result: dict) -> str:
    lines = [f"# Attention benchmark — {result['device']}, {result['date']}",
             "", f"{result['dtype']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}.",
             "TFLOP/s count causal attention as half the work; fwd+bwd = 3.5x forward FLOPs.", "",
             "| B | H | L | D | causal | pass | provider | ms | TFLOP/s | % peak | vs FLASH | vs cuDNN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        cells = [r["batch"], r["heads"], r["seq_len"], r["head_dim"], r["causal"], r["pass"], r["provider"]]
        if "error" in r:
            cells += [f"failed: {r['error']}", "", "", "", ""]
        else:
            cells += [r["ms"], r["tflops"], r["pct_peak"], r.get("ratio_vs_sdpa-flash", ""),
                      r.get("ratio_vs_sdpa-cudnn", "")]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    slug = "".join(c if c.isalnum() else "-" for c in result["device"]).strip("-").lower()
    stem = Path(out_dir) / f"attention-{slug}-{result['date']}-{result['commit']}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    md_path.write_text(to_markdown(result))
    return json_path, md_path


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent)
    return result.stdout.strip() or "unknown"
