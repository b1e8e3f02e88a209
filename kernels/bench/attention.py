"""`archlab bench attention`: our Triton FlashAttention against PyTorch SDPA (FLASH and cuDNN) on CUDA.

For each shape and causal setting it times the forward and forward+backward passes of every provider on
the same bf16 inputs, in one process, and reports ms, TFLOP/s, % of the device's bf16 peak and the ratio
to SDPA-FLASH and SDPA-cuDNN. FLOPs: forward 4·B·H·L²·D (two matmuls), halved when causal; backward is
2.5x forward (FlashAttention's convention), so forward+backward is 3.5x.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from archlab.kernels.bench import add_ratios, environment, time_cuda_ms, time_passes
from archlab.kernels.hardware import peak_flops

DEFAULT_SHAPES = ((8, 16, 2048, 64), (4, 16, 4096, 128))  # (batch, heads, seq_len, head_dim)
PROVIDERS = ("archlab-triton", "sdpa-flash", "sdpa-cudnn")
COLUMNS = ("batch", "heads", "seq_len", "head_dim", "causal", "pass", "provider", "ms", "tflops", "pct_peak",
           "ratio_vs_sdpa-flash", "ratio_vs_sdpa-cudnn")


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


def bench_attention(shapes=DEFAULT_SHAPES, dtype: torch.dtype = torch.bfloat16) -> dict:
    device = torch.device("cuda")
    peak = peak_flops(device)
    rows = []
    for batch, heads, seq_len, head_dim in shapes:
        for causal in (True, False):
            q, k, v = (torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            for name in PROVIDERS:
                fn = _provider(name)
                shape = {"provider": name, "batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim,
                         "causal": causal}
                for row in time_passes(shape, lambda q, k, v, fn=fn, causal=causal: fn(q, k, v, causal), (q, k, v),
                                       time_cuda_ms):
                    if "ms" in row:
                        tflops = attention_flops(batch, heads, seq_len, head_dim, causal=causal,
                                                 backward=row["pass"] == "fwd+bwd") / row["ms"] / 1e9
                        row |= {"tflops": round(tflops, 1),
                                "pct_peak": round(100 * tflops * 1e12 / peak, 1) if peak else None}
                    rows.append(row)
    add_ratios(rows, ours=PROVIDERS[:1], peers=PROVIDERS[1:],
               key=("batch", "heads", "seq_len", "head_dim", "causal", "pass"))
    return {"benchmark": "attention", "title": "Attention benchmark", "columns": COLUMNS,
            "notes": ["TFLOP/s count causal attention as half the work; fwd+bwd = 3.5x forward FLOPs."],
            **environment(device, dtype), "rows": rows}
