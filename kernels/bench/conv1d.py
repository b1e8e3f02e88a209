"""`archlab bench conv1d` (CUDA): our Triton causal conv1d vs the causal-conv1d package and cuDNN via F.conv1d.

Shape B8 D4096 L2048 width 4, bf16, bias, SiLU — the Mamba layer's conv. The op is memory-bound, so
effective GB/s counts the least traffic: forward reads x and writes out (2·b·d·L elements); backward
reads x and dout and writes dx (3·b·d·L); the weights are O(d·width) and left out.
"""
from __future__ import annotations

import torch

from archlab.kernels.bench import add_ratios, environment, time_cuda_ms, time_passes

DEFAULT_SHAPES = ((8, 4096, 2048, 4),)  # (batch, dim, seq_len, width)
PROVIDERS = {"archlab-triton": "triton", "causal-conv1d": "peer", "torch-conv1d": "torch"}
COLUMNS = ("batch", "dim", "seq_len", "width", "pass", "provider", "ms", "gb_per_s", "ratio_vs_causal-conv1d",
           "ratio_vs_torch-conv1d")


def conv1d_bytes(batch: int, dim: int, seq_len: int, itemsize: int, *, backward: bool) -> int:
    return itemsize * batch * dim * seq_len * (5 if backward else 2)


def bench_conv1d(shapes=DEFAULT_SHAPES, dtype: torch.dtype = torch.bfloat16) -> dict:
    from archlab.kernels.causal_conv1d import causal_conv1d

    device = torch.device("cuda")
    rows = []
    for batch, dim, seq_len, width in shapes:
        x = torch.randn(batch, dim, seq_len, device=device, dtype=dtype, requires_grad=True)
        weight = torch.randn(dim, width, device=device, dtype=dtype, requires_grad=True)
        bias = torch.randn(dim, device=device, dtype=dtype, requires_grad=True)
        for name, backend in PROVIDERS.items():
            shape = {"provider": name, "batch": batch, "dim": dim, "seq_len": seq_len, "width": width}
            for row in time_passes(shape, lambda x, weight, bias, backend=backend: causal_conv1d(
                    x, weight, bias, activation="silu", backend=backend), (x, weight, bias), time_cuda_ms):
                if "ms" in row:
                    moved = conv1d_bytes(batch, dim, seq_len, dtype.itemsize, backward=row["pass"] != "fwd")
                    row["gb_per_s"] = round(moved / row["ms"] / 1e6, 3)
                rows.append(row)
    add_ratios(rows, ours=["archlab-triton"], peers=["causal-conv1d", "torch-conv1d"],
               key=("batch", "dim", "seq_len", "width", "pass"))
    return {"benchmark": "conv1d", "title": "Causal conv1d benchmark", "columns": COLUMNS,
            "notes": ["bias + SiLU; GB/s: least traffic per pass (x read, out written; see kernels/bench/conv1d.py).",
                      "ratio_vs_X = X ms / our ms (> 1: ours is faster)."],
            **environment(device, dtype), "rows": rows}
