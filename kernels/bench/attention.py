"""`archlab bench attention`: our Triton FlashAttention against PyTorch SDPA (FLASH and cuDNN) on CUDA, and our
sliding-window attention against full causal attention.

For each shape and causal setting it times the forward and forward+backward passes of every provider on
the same bf16 inputs, in one process, and reports ms, TFLOP/s, % of the device's bf16 peak and the ratio
to SDPA-FLASH and SDPA-cuDNN. FLOPs: forward 4·B·H·L²·D (two matmuls), halved when causal; backward is
2.5x forward (FlashAttention's convention), so forward+backward is 3.5x.

Sliding-window rows (WINDOW_SHAPES): our kernel with a window (`archlab-triton-swa`) beside every provider's full
causal attention at the same shape; `ratio_vs_archlab-triton` is how many times faster the window makes our kernel
(the goal: >= 3x at window 512, L 8192). Their FLOPs count the attended pairs, 4·B·H·D·(L·W - W²/2), which is the
causal count at W = L.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from archlab.kernels.bench import add_ratios, environment, time_cuda_ms, time_passes
from archlab.kernels.hardware import peak_flops

DEFAULT_SHAPES = ((8, 16, 2048, 64), (4, 16, 4096, 128))  # (batch, heads, seq_len, head_dim)
WINDOW_SHAPES = ((1, 16, 8192, 64, 512), (1, 16, 8192, 64, 2048), (2, 16, 4096, 128, 512))  # ..., window
PROVIDERS = ("archlab-triton", "sdpa-flash", "sdpa-cudnn")
WINDOW_PROVIDER = "archlab-triton-swa"
COLUMNS = ("batch", "heads", "seq_len", "head_dim", "causal", "window", "pass", "provider", "ms", "tflops", "pct_peak",
           "ratio_vs_sdpa-flash", "ratio_vs_sdpa-cudnn", "ratio_vs_archlab-triton")
_SAME_WORK = ("batch", "heads", "seq_len", "head_dim", "causal", "pass")  # what a ratio compares across providers


def attention_flops(batch: int, heads: int, seq_len: int, head_dim: int, *, causal: bool, backward: bool,
                    window: int | None = None) -> float:
    if window is not None and window < seq_len:
        pairs = seq_len * window - window * window / 2
    else:
        pairs = seq_len * seq_len * (0.5 if causal else 1.0)
    return 4 * batch * heads * head_dim * pairs * (3.5 if backward else 1.0)


def bench_cases(shapes=DEFAULT_SHAPES, window_shapes=WINDOW_SHAPES) -> list[tuple[dict, str]]:
    """(shape, provider) of every measurement: each shape causal and not on every provider, each window shape
    windowed on ours and causal on every provider (the full attention it is compared with)."""
    cases = []
    for batch, heads, seq_len, head_dim in shapes:
        for causal in (True, False):
            shape = {"batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim, "causal": causal,
                     "window": None}
            cases += [(shape, name) for name in PROVIDERS]
    full_done = set()
    for batch, heads, seq_len, head_dim, window in window_shapes:
        shape = {"batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim, "causal": True}
        cases.append((shape | {"window": window}, WINDOW_PROVIDER))
        if (batch, heads, seq_len, head_dim) not in full_done:  # one full causal baseline for all its windows
            full_done.add((batch, heads, seq_len, head_dim))
            cases += [(shape | {"window": None}, name) for name in PROVIDERS]
    return cases


def _provider(name: str, window: int | None):
    from archlab.kernels.attention import flash_attention

    if name in ("archlab-triton", WINDOW_PROVIDER):
        return lambda q, k, v, causal: flash_attention(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5,
                                                       window=window or 0)[0]
    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def sdpa(q, k, v, causal):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return sdpa


def bench_attention(shapes=DEFAULT_SHAPES, dtype: torch.dtype = torch.bfloat16, window_shapes=WINDOW_SHAPES) -> dict:
    device = torch.device("cuda")
    peak = peak_flops(device)
    rows, inputs = [], {}
    for shape, name in bench_cases(shapes, window_shapes):
        size = (shape["batch"], shape["heads"], shape["seq_len"], shape["head_dim"])
        if size not in inputs:
            inputs.clear()  # one size's inputs at a time: L 8192 at batch 8 would not fit twice
            inputs[size] = [torch.randn(size, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        fn, causal = _provider(name, shape["window"]), shape["causal"]
        for row in time_passes({"provider": name, **shape}, lambda q, k, v, fn=fn, causal=causal: fn(q, k, v, causal),
                               inputs[size], time_cuda_ms):
            if "ms" in row:
                tflops = attention_flops(*size, causal=causal, backward=row["pass"] == "fwd+bwd",
                                         window=shape["window"]) / row["ms"] / 1e9
                row |= {"tflops": round(tflops, 1), "pct_peak": round(100 * tflops * 1e12 / peak, 1) if peak else None}
            rows.append(row)
    add_ratios(rows, ours=PROVIDERS[:1], peers=PROVIDERS[1:], key=_SAME_WORK)
    add_ratios(rows, ours=[WINDOW_PROVIDER], peers=PROVIDERS, key=_SAME_WORK)
    return {"benchmark": "attention", "title": "Attention benchmark", "columns": COLUMNS,
            "notes": ["TFLOP/s count causal attention as half the work and a window W as L·W - W²/2 of the L² "
                      "pairs; fwd+bwd = 3.5x forward FLOPs.",
                      f"{WINDOW_PROVIDER}: our kernel with a sliding window; its ratio_vs_* compare it with full "
                      "causal attention at the same shape (goal: >= 3x ours at window 512, L 8192)."],
            **environment(device, dtype), "rows": rows}
