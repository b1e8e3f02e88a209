"""`archlab bench ssd`: the SSD (Mamba-2) op's backends against each other, and against Mamba-1's scan.

On CUDA: our Triton SSD vs mamba_ssm's `mamba_chunk_scan_combined` (the peer), and Mamba-1's selective scan at the
same model width (dim = heads * head_dim, N = 16, Mamba-1's default; ours in Triton and mamba_ssm's), bf16, at the
issue's shapes B8 L2048 and B4 L8192 with H32 P64 N128; chunk_size 256 (Mamba-2's default, what the peer runs; our
Triton kernel chunks by its own 64). The Mamba-1 rows are mamba_ssm's block's scan: z gate, D skip, delta bias,
softplus (kernels/bench/scan.py's inputs).

On CPU: the chunked torch path (chunked.py, what training runs) vs the sequential reference in two groups of shapes:
  - issue 17's CPU goal, B1 L2048 H8 P64 N64 (fwd+bwd >= 20x), and the same at a Mamba-2 block's state size N128,
    chunk 64, float32;
  - the batches CPU training of a small Mamba-2 runs, B32 L128 at (H4 P64 N128), (H8 P32 N64), (H4 P64 N64), with
    chunks 64 and 128, in float32 and as under CPU bfloat16 autocast (x, dt, B, C arrive in bfloat16).
The reference runs once per shape (it has no chunks) in float32. Each CPU row also has cpu_ms: the least process CPU
time of CPU_RUNS runs on one thread. Our CPU machines are shared, and other jobs stretch wall times (two threads that
must meet at every op most of all); CPU time on one thread is what a call costs with the machine to itself, less the
second thread's help.

Inputs as a Mamba-2 layer's everywhere: dt around softplus^-1(0.01) before its bias and softplus, A in -[1, 16], D
per head, one group of B and C, no z (Mamba-2 gates in its norm).
"""
from __future__ import annotations

import contextlib

import torch

from archlab.kernels.bench import (CPU_RUNS, add_cpu_ratios, add_ratios, environment, single_thread_cpu_ms,
                                   time_cpu_ms, time_cuda_ms, time_passes)

GPU_SHAPES = ((8, 2048, 32, 64, 128), (4, 8192, 32, 64, 128))  # (batch, seq_len, heads, head_dim, d_state)
# report name -> (op, backend)
GPU_PROVIDERS = {"archlab-triton": ("ssd", "triton"), "mamba_ssm": ("ssd", "peer"),
                 "archlab-triton-mamba1": ("scan", "triton"), "mamba_ssm-mamba1": ("scan", "peer")}
MAMBA1_D_STATE = 16
GPU_CHUNK_SIZE = 256
GPU_COLUMNS = ("batch", "seq_len", "heads", "head_dim", "d_state", "pass", "provider", "ms")

GOAL_SHAPES = ((1, 2048, 8, 64, 64), (1, 2048, 8, 64, 128))
GOAL_CHUNK = 64
TRAINING_SHAPES = ((32, 128, 4, 64, 128), (32, 128, 8, 32, 64), (32, 128, 4, 64, 64))
TRAINING_CHUNKS = (64, 128)
AUTOCAST = "bfloat16 autocast"  # the `inputs` of rows whose x, dt, B, C are bfloat16 inside a CPU autocast region
CPU_COLUMNS = ("batch", "seq_len", "heads", "head_dim", "d_state", "chunk", "inputs", "pass", "provider", "ms",
               "cpu_ms")
SHAPE = CPU_COLUMNS[:5]


def ssd_inputs(batch: int, seq_len: int, heads: int, head_dim: int, d_state: int, *, device, dtype,
               seed: int = 0) -> tuple:
    """(x, dt, A, B, C, D, dt_bias), all requiring grad; x, dt, B, C in dtype, the parameters in float32."""
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dtype=dtype):
        values = torch.randn(*shape, generator=generator, device=device) * scale + shift
        return values.to(dtype).requires_grad_()

    A = (-torch.linspace(1, 16, heads, device=device)).requires_grad_()
    return (randn(batch, seq_len, heads, head_dim), randn(batch, seq_len, heads, scale=0.5, shift=-4.6), A,
            randn(batch, seq_len, 1, d_state), randn(batch, seq_len, 1, d_state),
            randn(heads, dtype=torch.float32), randn(heads, scale=0.1, dtype=torch.float32))


def bench_ssd(device: torch.device | None = None, shapes=None, dtype: torch.dtype | None = None,
              min_run_time: float = 2.0, providers: dict | None = None, training_shapes=TRAINING_SHAPES,
              training_chunks=TRAINING_CHUNKS) -> dict:
    """On CUDA, or with providers (report name -> (op, backend)) given: the providers at shapes (GPU_SHAPES by
    default). On CPU otherwise: the chunked path vs the reference at shapes (GOAL_SHAPES) and training_shapes."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or providers:
        return _bench_providers(device, shapes or GPU_SHAPES, dtype or torch.bfloat16, min_run_time,
                                providers or GPU_PROVIDERS)
    return _bench_chunked_on_cpu(device, shapes or GOAL_SHAPES, training_shapes, training_chunks,
                                 dtype or torch.float32, min_run_time)


def _bench_providers(device, shapes, dtype, min_run_time, providers) -> dict:
    from archlab.kernels.bench.scan import scan_inputs
    from archlab.kernels.selective_scan import selective_scan
    from archlab.kernels.ssd import ssd

    def timer(run, inputs):
        return time_cuda_ms(run, inputs) if device.type == "cuda" else time_cpu_ms(run, inputs,
                                                                                    min_run_time=min_run_time)

    def mamba2(x, dt, A, B, C, D, dt_bias, backend):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=GPU_CHUNK_SIZE, backend=backend)

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
            "columns": (*GPU_COLUMNS, *(f"ratio_vs_{name}" for name in others)),
            # what kernels/measured.py weighs our kernel against: other backends of SSD, not Mamba-1's scan
            "rivals": [name for name in others if providers[name][0] == "ssd"],
            "notes": [f"Providers: {', '.join(f'{name} ({op} {backend})' for name, (op, backend) in providers.items())}"
                      f"; SSD chunk_size {GPU_CHUNK_SIZE} (our Triton kernel chunks by its own). Mamba-1 rows: its "
                      f"selective scan at dim = heads * head_dim, N = {MAMBA1_D_STATE}.",
                      f"ratio_vs_<provider> = that provider's ms / {ours[0]} ms (> 1: {ours[0]} is faster)."],
            **environment(device, dtype), "rows": rows}


def _bench_chunked_on_cpu(device, shapes, training_shapes, training_chunks, dtype, min_run_time) -> dict:
    from archlab.kernels.ssd import ssd

    def timer(run, inputs):
        return time_cpu_ms(run, inputs, min_run_time=min_run_time)

    def case(shape, backend, chunk, inputs):
        row = {**dict(zip(SHAPE, shape, strict=True)), "chunk": chunk, "inputs": inputs,
               "provider": "reference" if backend == "reference" else "archlab-torch"}
        autocast = inputs == AUTOCAST
        region = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

        def forward(x, dt, A, B, C, D, dt_bias):
            with region():
                return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, chunk_size=chunk or GOAL_CHUNK,
                           backend=backend)

        tensors = ssd_inputs(*shape, device=device, dtype=torch.bfloat16 if autocast else dtype)
        rows = time_passes(row, forward, tensors, timer)
        cpu_rows = time_passes(row, forward, tensors, single_thread_cpu_ms)
        return [{**row, "cpu_ms": cpu_row.get("ms")} for row, cpu_row in zip(rows, cpu_rows, strict=True)]

    name = str(dtype).removeprefix("torch.")
    rows = []
    for shape in shapes:
        rows += case(shape, "torch", GOAL_CHUNK, name) + case(shape, "reference", None, name)
    for shape in training_shapes:
        for inputs in (name, AUTOCAST):
            for chunk in training_chunks:
                rows += case(shape, "torch", chunk, inputs)
        rows += case(shape, "reference", None, name)
    add_ratios(rows, ours=["archlab-torch"], peers=["reference"], key=(*SHAPE, "pass"))
    add_cpu_ratios(rows, ours=["archlab-torch"], peer="reference", key=(*SHAPE, "pass"))
    return {"benchmark": "ssd", "title": "SSD (Mamba-2) benchmark",
            "columns": (*CPU_COLUMNS, "ratio_vs_reference", "cpu_ratio_vs_reference"),
            "rivals": ["reference"],
            "notes": [f"Chunked torch path vs the sequential {name} reference. First issue 17's CPU goal shapes "
                      f"(chunk {GOAL_CHUNK}), then a small Mamba-2's CPU training batches.",
                      f"inputs `{AUTOCAST}`: x, dt, B and C in bfloat16, called inside torch.autocast(bfloat16); "
                      "the chunked path computes in float32 either way.",
                      "ratio_vs_reference = reference ms / chunked ms at the same shape (> 1: the chunked path is "
                      "faster); ms: median wall time with the machine's threads.",
                      f"cpu_ms: least process CPU time of {CPU_RUNS} runs on one thread, robust to other "
                      "jobs on a shared machine; cpu_ratio_vs_reference compares those."],
            **environment(device, dtype), "rows": rows}
