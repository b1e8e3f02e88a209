"""`archlab bench ssd`: the SSD (Mamba-2) op's backends against each other.

Today the op has a `torch` backend (chunked.py, what training runs) and the sequential `reference`; the Triton
kernel and mamba_ssm's SSD as a peer are still to come (issue 17), so on every device this times the chunked path
against the sequential loop, at the issue's CPU goal shape B1 L2048 H8 P64 N64 (goal: fwd+bwd >= 20x) and at a
Mamba-2 block's default head and state sizes (P64 N128). Inputs as a Mamba-2 layer's: dt around softplus^-1(0.01)
before its bias and softplus, A in -[1, 16], D per head, one group of B and C, chunk size 64.
"""
from __future__ import annotations

import torch

from archlab.kernels.bench import add_ratios, environment, time_cpu_ms, time_cuda_ms, time_passes

SHAPES = ((1, 2048, 8, 64, 64), (1, 2048, 8, 64, 128))  # (batch, seq_len, heads, head_dim, d_state)
PROVIDERS = {"archlab-torch": "torch", "reference": "reference"}  # report name -> backend
COLUMNS = ("batch", "seq_len", "heads", "head_dim", "d_state", "pass", "provider", "ms")


def ssd_inputs(batch: int, seq_len: int, heads: int, head_dim: int, d_state: int, *, device, dtype,
               seed: int = 0) -> tuple:
    """(x, dt, A, B, C, D, dt_bias), all requiring grad."""
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dtype=dtype):
        values = torch.randn(*shape, generator=generator, device=device) * scale + shift
        return values.to(dtype).requires_grad_()

    A = (-torch.linspace(1, 16, heads, device=device)).requires_grad_()
    return (randn(batch, seq_len, heads, head_dim), randn(batch, seq_len, heads, scale=0.5, shift=-4.6), A,
            randn(batch, seq_len, 1, d_state), randn(batch, seq_len, 1, d_state),
            randn(heads, dtype=torch.float32), randn(heads, scale=0.1, dtype=torch.float32))


def bench_ssd(device: torch.device | None = None, shapes=SHAPES, dtype: torch.dtype = torch.float32,
              min_run_time: float = 2.0) -> dict:
    from archlab.kernels.ssd import ssd

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timer(run, inputs):
        if device.type == "cuda":
            return time_cuda_ms(run, inputs)
        return time_cpu_ms(run, inputs, min_run_time=min_run_time)

    def forward(x, dt, A, B, C, D, dt_bias, backend):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, backend=backend)

    rows = []
    for batch, seq_len, heads, head_dim, d_state in shapes:
        inputs = ssd_inputs(batch, seq_len, heads, head_dim, d_state, device=device, dtype=dtype)
        for name, backend in PROVIDERS.items():
            shape = {"provider": name, "batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                     "d_state": d_state}
            rows += time_passes(shape, lambda *args, backend=backend: forward(*args, backend), inputs, timer)
    add_ratios(rows, ours=["archlab-torch"], peers=["reference"],
               key=("batch", "seq_len", "heads", "head_dim", "d_state", "pass"))
    return {"benchmark": "ssd", "title": "SSD (Mamba-2) benchmark", "columns": (*COLUMNS, "ratio_vs_reference"),
            "notes": ["Chunked torch path (chunk 64) vs the sequential float32 reference (no Triton or peer yet).",
                      "ratio_vs_reference = reference ms / chunked ms (> 1: the chunked path is faster)."],
            **environment(device, dtype), "rows": rows}
