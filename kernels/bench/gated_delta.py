"""`archlab bench gated_delta`: the gated delta rule's backends against each other, and against attention.

On CUDA, bf16, with use_qk_l2norm (as Gated DeltaNet calls it):
  - `vs fla`: our Triton kernel vs fla's `chunk_gated_delta_rule` (the peer) at B2 L16384 and B8 L2048, H16
    K = V = 128;
  - `crossover`: our Triton kernel vs our causal flash attention (kernels/attention, backend triton) at B2 H16
    head dim 128 from L512 to L16384: where the linear-time recurrence overtakes quadratic attention.

On CPU: the chunked torch path (chunked.py, what training runs) vs the sequential reference at issue 18's CPU goal
shape, B1 L2048 H4 K = V = 64, float32 (fwd+bwd >= 20x). Each CPU row also has cpu_ms: the least process CPU time
of CPU_RUNS runs on one thread, robust to other jobs on our shared machines (kernels/bench/ssd.py says more).

Inputs as a Gated DeltaNet layer's: q, k, v normal (q and k normalised in the op), g = logsigmoid (decays near 1),
beta = sigmoid, one key head per value head.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from archlab.kernels.bench import (CPU_RUNS, add_cpu_ratios, add_ratios, environment, single_thread_cpu_ms,
                                   time_cpu_ms, time_cuda_ms, time_passes)

GPU_SHAPES = ((2, 16384, 16, 128), (8, 2048, 16, 128))  # (batch, seq_len, heads, head_dim): K = V = head_dim
# report name -> backend of gated_delta_rule
GPU_PROVIDERS = {"archlab-triton": "triton", "fla": "peer"}
CROSSOVER_SHAPE = (2, 16, 128)  # (batch, heads, head_dim)
CROSSOVER_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
ATTENTION = "flash-attention"  # our Triton flash attention, causal
GPU_COLUMNS = ("part", "batch", "seq_len", "heads", "head_dim", "pass", "provider", "ms", "ratio_vs_fla",
               f"ratio_vs_{ATTENTION}")

GOAL_SHAPES = ((1, 2048, 4, 64),)
SHAPE = ("batch", "seq_len", "heads", "head_dim")
CPU_COLUMNS = (*SHAPE, "pass", "provider", "ms", "cpu_ms", "ratio_vs_reference", "cpu_ratio_vs_reference")


def gated_delta_inputs(batch: int, seq_len: int, heads: int, head_dim: int, *, device, dtype,
                       seed: int = 0) -> tuple:
    """(q, k, v, g, beta), all in dtype and requiring grad."""
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    q, k, v = (randn(batch, seq_len, heads, head_dim) for _ in range(3))
    g, beta = F.logsigmoid(randn(batch, seq_len, heads) + 2), torch.sigmoid(randn(batch, seq_len, heads))
    return tuple(t.to(dtype).requires_grad_() for t in (q, k, v, g, beta))


def bench_gated_delta(device: torch.device | None = None, shapes=None, dtype: torch.dtype | None = None,
                      min_run_time: float = 2.0, providers: dict | None = None, crossover_shape=CROSSOVER_SHAPE,
                      crossover_lengths=CROSSOVER_LENGTHS) -> dict:
    """On CUDA, or with providers (report name -> backend) given: the providers at shapes (GPU_SHAPES by default)
    and the crossover with attention. On CPU otherwise: the chunked path vs the reference at shapes (GOAL_SHAPES)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" or providers:
        return _bench_providers(device, shapes or GPU_SHAPES, dtype or torch.bfloat16, min_run_time,
                                providers or GPU_PROVIDERS, crossover_shape, crossover_lengths)
    return _bench_chunked_on_cpu(device, shapes or GOAL_SHAPES, dtype or torch.float32, min_run_time)


def _gated_delta(backend: str):
    from archlab.kernels.gated_delta import gated_delta_rule

    return lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, backend=backend)


def _bench_providers(device, shapes, dtype, min_run_time, providers, crossover_shape, crossover_lengths) -> dict:
    from archlab.kernels.attention import attention

    def timer(run, inputs):
        return time_cuda_ms(run, inputs) if device.type == "cuda" else time_cpu_ms(run, inputs,
                                                                                    min_run_time=min_run_time)

    def causal_attention(q, k, v):
        return attention(q, k, v, causal=True, backend="triton")

    rows = []
    for batch, seq_len, heads, head_dim in shapes:
        inputs = gated_delta_inputs(batch, seq_len, heads, head_dim, device=device, dtype=dtype)
        for name, backend in providers.items():
            row = {"part": "vs fla", "batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                   "provider": name}
            rows += time_passes(row, _gated_delta(backend), inputs, timer)
    batch, heads, head_dim = crossover_shape
    ours = next(iter(providers))
    for seq_len in crossover_lengths:
        row = {"part": "crossover", "batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim}
        inputs = gated_delta_inputs(batch, seq_len, heads, head_dim, device=device, dtype=dtype)
        rows += time_passes({**row, "provider": ours}, _gated_delta(providers[ours]), inputs, timer)
        qkv = tuple(torch.randn(batch, heads, seq_len, head_dim, device=device, dtype=dtype, requires_grad=True)
                    for _ in range(3))  # attention's layout: (batch, heads, length, dim)
        rows += time_passes({**row, "provider": ATTENTION}, causal_attention, qkv, timer)
    peers = [name for name in providers if name != ours]
    add_ratios(rows, ours=[ours], peers=[*peers, ATTENTION], key=("part", *SHAPE, "pass"))
    return {"benchmark": "gated_delta", "title": "Gated delta rule benchmark",
            "columns": (*GPU_COLUMNS[:-2], *(f"ratio_vs_{name}" for name in (*peers, ATTENTION))),
            "rivals": peers,  # what kernels/measured.py weighs our kernel against: other backends of the op
            "notes": [f"Providers: {', '.join(f'{name} (backend {b})' for name, b in providers.items())} of "
                      f"gated_delta_rule with use_qk_l2norm; {ATTENTION}: kernels/attention's Triton kernel, causal, "
                      "(batch, heads, length, dim) inputs of the same batch, heads and head dim.",
                      f"ratio_vs_<provider> = that provider's ms / {ours} ms (> 1: {ours} is faster); in the "
                      f"crossover rows ratio_vs_{ATTENTION} > 1 is where the gated delta rule is the faster mixer."],
            **environment(device, dtype), "rows": rows}


def _bench_chunked_on_cpu(device, shapes, dtype, min_run_time) -> dict:
    from archlab.kernels.gated_delta import CHUNK_SIZE

    load = os.getloadavg()[0]  # our CPU machines are shared: what else ran beside the timings

    def timer(run, inputs):
        return time_cpu_ms(run, inputs, min_run_time=min_run_time)

    rows = []
    for shape in shapes:
        inputs = gated_delta_inputs(*shape, device=device, dtype=dtype)
        for backend, provider in (("torch", "archlab-torch"), ("reference", "reference")):
            row = {**dict(zip(SHAPE, shape, strict=True)), "provider": provider}
            wall = time_passes(row, _gated_delta(backend), inputs, timer)
            one_thread = time_passes(row, _gated_delta(backend), inputs, single_thread_cpu_ms)
            rows += [{**w, "cpu_ms": c.get("ms")} for w, c in zip(wall, one_thread, strict=True)]
    add_ratios(rows, ours=["archlab-torch"], peers=["reference"], key=(*SHAPE, "pass"))
    add_cpu_ratios(rows, ours=["archlab-torch"], peer="reference", key=(*SHAPE, "pass"))
    name = str(dtype).removeprefix("torch.")
    return {"benchmark": "gated_delta", "title": "Gated delta rule benchmark", "columns": CPU_COLUMNS,
            "rivals": ["reference"],
            "notes": [f"Chunked torch path (chunk {CHUNK_SIZE}) vs the sequential {name} reference at issue 18's CPU "
                      "goal shape (K = V = head_dim), use_qk_l2norm.",
                      "ratio_vs_reference = reference ms / chunked ms at the same shape (> 1: the chunked path is "
                      "faster); ms: median wall time with the machine's threads.",
                      f"cpu_ms: least process CPU time of {CPU_RUNS} runs on one thread, robust to other jobs on a "
                      "shared machine; cpu_ratio_vs_reference compares those.",
                      f"Load average (1 min) when the timings began: {load:.1f} on {os.cpu_count()} cores."],
            **environment(device, dtype), "rows": rows}
