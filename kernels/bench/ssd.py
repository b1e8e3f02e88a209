"""`archlab bench ssd`: the SSD (Mamba-2) op's backends against each other.

Today the op has a `torch` backend (chunked.py, what training runs) and the sequential `reference`; the Triton
kernel and mamba_ssm's SSD as a peer are still to come (issue 17), so on every device this times the chunked path
against the sequential loop in two groups of shapes:
  - issue 17's CPU goal, B1 L2048 H8 P64 N64 (fwd+bwd >= 20x), and the same at a Mamba-2 block's state size N128,
    chunk 64, float32;
  - the batches CPU training of a small Mamba-2 runs, B32 L128 at (H4 P64 N128), (H8 P32 N64), (H4 P64 N64), with
    chunks 64 and 128, in float32 and as under CPU bfloat16 autocast (x, dt, B, C arrive in bfloat16).
Inputs as a Mamba-2 layer's: dt around softplus^-1(0.01) before its bias and softplus, A in -[1, 16], D per head,
one group of B and C. The reference runs once per shape (it has no chunks) in float32.

On CPU each row also has cpu_ms: the least process CPU time of CPU_RUNS runs on one thread. Our CPU machines are
shared, and other jobs stretch wall times (two threads that must meet at every op most of all); CPU time on one thread
is what a call costs with the machine to itself, less the second thread's help.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from archlab.kernels.bench import add_ratios, environment, time_cpu_ms, time_cuda_ms, time_passes

GOAL_SHAPES = ((1, 2048, 8, 64, 64), (1, 2048, 8, 64, 128))  # (batch, seq_len, heads, head_dim, d_state)
GOAL_CHUNK = 64
TRAINING_SHAPES = ((32, 128, 4, 64, 128), (32, 128, 8, 32, 64), (32, 128, 4, 64, 64))
TRAINING_CHUNKS = (64, 128)
AUTOCAST = "bfloat16 autocast"  # the `inputs` of rows whose x, dt, B, C are bfloat16 inside a CPU autocast region
COLUMNS = ("batch", "seq_len", "heads", "head_dim", "d_state", "chunk", "inputs", "pass", "provider", "ms", "cpu_ms")
SHAPE = COLUMNS[:5]
CPU_RUNS = 5


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


def bench_ssd(device: torch.device | None = None, shapes=GOAL_SHAPES, training_shapes=TRAINING_SHAPES,
              training_chunks=TRAINING_CHUNKS, dtype: torch.dtype = torch.float32, min_run_time: float = 2.0) -> dict:
    from archlab.kernels.ssd import ssd

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def timer(run, inputs):
        if device.type == "cuda":
            return time_cuda_ms(run, inputs)
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
        if device.type == "cpu":
            cpu_rows = time_passes(row, forward, tensors, single_thread_cpu_ms)
            rows = [{**row, "cpu_ms": cpu_row.get("ms")} for row, cpu_row in zip(rows, cpu_rows, strict=True)]
        return rows

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
    if device.type == "cpu":
        _add_cpu_ratios(rows)
    return {"benchmark": "ssd", "title": "SSD (Mamba-2) benchmark",
            "columns": (*COLUMNS, "ratio_vs_reference") + (("cpu_ratio_vs_reference",) if device.type == "cpu" else ()),
            "notes": [f"Chunked torch path vs the sequential {name} reference (no Triton or peer yet). First issue "
                      f"17's CPU goal shapes (chunk {GOAL_CHUNK}), then a small Mamba-2's CPU training batches.",
                      f"inputs `{AUTOCAST}`: x, dt, B and C in bfloat16, called inside torch.autocast(bfloat16); "
                      "the chunked path computes in float32 either way.",
                      "ratio_vs_reference = reference ms / chunked ms at the same shape (> 1: the chunked path is "
                      "faster); ms: median wall time with the machine's threads.",
                      f"cpu_ms: least process CPU time of {CPU_RUNS} runs on one thread (CPU only), robust to other "
                      "jobs on a shared machine; cpu_ratio_vs_reference compares those."],
            **environment(device, dtype), "rows": rows}


def single_thread_cpu_ms(run, grad_to_none=(), runs: int = CPU_RUNS) -> float:
    """The least process CPU time of `run` in ms over `runs` runs (after a warm-up), with torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for attempt in range(runs + 1):
            for tensor in grad_to_none:
                tensor.grad = None
            start = time.process_time()
            run()
            if attempt:  # the first run warms up
                best = min(best, time.process_time() - start)
        return best * 1e3
    finally:
        torch.set_num_threads(threads)


def _add_cpu_ratios(rows: list[dict]) -> None:
    """cpu_ratio_vs_reference = the reference's cpu_ms / ours at the same shape and pass."""
    reference = {tuple(row[k] for k in (*SHAPE, "pass")): row.get("cpu_ms") for row in rows
                 if row["provider"] == "reference"}
    for row in rows:
        peer, ours = reference.get(tuple(row[k] for k in (*SHAPE, "pass"))), row.get("cpu_ms")
        if row["provider"] != "reference":
            row["cpu_ratio_vs_reference"] = round(peer / ours, 3) if peer and ours else None
