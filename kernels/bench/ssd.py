"""`archlab bench ssd`: the SSD (Mamba-2) op's backends against each other, and against Mamba-1's scan.

On CUDA: our Triton SSD vs mamba_ssm's `mamba_chunk_scan_combined` (the peer), and Mamba-1's selective scan at the
same model width (dim = heads * head_dim, N = 16, Mamba-1's default; ours in Triton and mamba_ssm's), bf16, at the
issue's shapes B8 L2048 and B4 L8192 with H32 P64 N128. On CPU: the chunked torch path (what training runs) vs the
sequential reference, at the issue's CPU goal shape B1 L2048 H8 P64 N64 (goal: fwd+bwd >= 20x) and at a Mamba-2
block's default head and state sizes (P64 N128).

Inputs as a Mamba-2 layer's: dt around softplus^-1(0.01) before its bias and softplus, A in -[1, 16], D per head,
one group of B and C, no z (Mamba-2 gates in its norm). chunk_size 256 on CUDA (Mamba-2's default, what the peer
runs; our Triton kernel chunks by its own 64), 64 on CPU. The Mamba-1 rows are mamba_ssm's block's scan: z gate,
D skip, delta bias, softplus (kernels/bench/scan.py's inputs).
"""
from __future__ import annotations

import torch

from archlab.kernels.bench import add_ratios, environment, time_cpu_ms, time_cuda_ms, time_passes

GPU_SHAPES = ((8, 2048, 32, 64, 128), (4, 8192, 32, 64, 128))  # (batch, seq_len, heads, head_dim, d_state)
CPU_SHAPES = ((1, 2048, 8, 64, 64), (1, 2048, 8, 64, 128))
# report name -> (op, backend)
GPU_PROVIDERS = {"archlab-triton": ("ssd", "triton"), "mamba_ssm": ("ssd", "peer"),
                 "archlab-triton-mamba1": ("scan", "triton"), "mamba_ssm-mamba1": ("scan", "peer")}
CPU_PROVIDERS = {"archlab-torch": ("ssd", "torch"), "reference": ("ssd", "reference")}
MAMBA1_D_STATE = 16
GPU_CHUNK_SIZE, CPU_CHUNK_SIZE = 256, 64
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


def bench_ssd(device: torch.device | None = None, shapes=None, dtype: torch.dtype | None = None,
              min_run_time: float = 2.0, providers: dict | None = None) -> dict:
    """providers (report name -> (op, backend)): GPU_PROVIDERS on CUDA, CPU_PROVIDERS elsewhere by default."""
    from archlab.kernels.bench.scan import scan_inputs
    from archlab.kernels.selective_scan import selective_scan
    from archlab.kernels.ssd import ssd

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shapes = shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    providers = providers or (GPU_PROVIDERS if on_gpu else CPU_PROVIDERS)
    chunk_size = GPU_CHUNK_SIZE if on_gpu else CPU_CHUNK_SIZE

    def timer(run, inputs):
        return time_cuda_ms(run, inputs) if on_gpu else time_cpu_ms(run, inputs, min_run_time=min_run_time)

    def mamba2(x, dt, A, B, C, D, dt_bias, backend):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk_size, backend=backend)

    def mamba1(*inputs, backend):
        return selective_scan(*inputs, delta_softplus=True, backend=backend)

    rows = []
    for batch, seq_len, heads, head_dim, d_state in shapes:
        shape = {"batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim}
        inputs = {"ssd": lambda: ssd_inputs(batch, seq_len, heads, head_dim, d_state, device=device, dtype=dtype),
                  "scan": lambda: scan_inputs(batch, heads * head_dim, seq_len, MAMBA1_D_STATE, device=device,
                                              dtype=dtype)}
        made = {}  # each op's inputs, built once per shape
        for name, (op, backend) in providers.items():
            row = {**shape, "d_state": d_state if op == "ssd" else MAMBA1_D_STATE, "provider": name}
            made[op] = made.get(op) or inputs[op]()
            forward = mamba2 if op == "ssd" else mamba1
            rows += time_passes(row, lambda *args, forward=forward, backend=backend: forward(*args, backend=backend),
                                made[op], timer)
    ours = [name for name in providers if name.startswith("archlab-")][:1]
    others = [name for name in providers if name not in ours]
    # Mamba-1 rows run at N = 16: beside them the ratios compare by model shape, not by state size
    with_mamba1 = any(op == "scan" for op, _ in providers.values())
    key = ("batch", "seq_len", "heads", "head_dim", *(() if with_mamba1 else ("d_state",)), "pass")
    add_ratios(rows, ours=ours, peers=others, key=key)
    return {"benchmark": "ssd", "title": "SSD (Mamba-2) benchmark",
            "columns": (*COLUMNS, *(f"ratio_vs_{name}" for name in others)),
            # what kernels/measured.py weighs our kernel against: other backends of SSD, not Mamba-1's scan
            "rivals": [name for name in others if providers[name][0] == "ssd"],
            "notes": [f"Providers: {', '.join(f'{name} ({op} {backend})' for name, (op, backend) in providers.items())}"
                      f"; SSD chunk_size {chunk_size} (our Triton kernel chunks by its own). Mamba-1 rows: its "
                      f"selective scan at dim = heads * head_dim, N = {MAMBA1_D_STATE}.",
                      f"ratio_vs_<provider> = that provider's ms / {ours[0]} ms (> 1: {ours[0]} is faster)."],
            **environment(device, dtype), "rows": rows}
