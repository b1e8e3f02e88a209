"""`archlab bench scan`: the selective scan's backends against each other.

On CUDA: our Triton kernels vs mamba_ssm's selective_scan_fn (the peer) at the Mamba shapes, bf16, with
z gate, D skip, delta bias and softplus. On CPU, float32: our numba kernels and the torch backend (the chunked
PyTorch scan) vs the sequential reference, at B2 D256 N16 L512 / L2048 and the quickstart Mamba's layer, B32 D256
N16 L128. Reported per pass: ms, effective GB/s and the ratio to the peer (the reference on CPU; the numba rows
also to the torch backend).

Effective GB/s counts the least memory traffic a pass needs: every input read once, every output written
once. Forward: u, delta, z (batch, dim, L), B, C (batch, N, L) read, out written: 4·b·d·L + 2·b·N·L
elements. Backward adds dout read and du, ddelta, dz, dB, dC written next to the inputs read again:
7·b·d·L + 4·b·N·L; forward+backward is the sum. A, D and the bias are O(d·N) and left out.
"""
from __future__ import annotations

import torch

from archlab.kernels.bench import add_ratios, environment, time_cpu_ms, time_cuda_ms, time_passes

GPU_SHAPES = ((8, 2048, 2048, 16), (4, 4096, 4096, 16))  # (batch, dim, seq_len, d_state)
CPU_SHAPES = ((2, 256, 512, 16), (2, 256, 2048, 16), (32, 256, 128, 16))
GPU_PROVIDERS = {"archlab-triton": "triton", "mamba_ssm": "peer"}  # report name -> backend
CPU_PROVIDERS = {"archlab-numba": "numba", "archlab-torch": "torch", "reference": "reference"}
COLUMNS = ("batch", "dim", "seq_len", "d_state", "pass", "provider", "ms", "gb_per_s")


def scan_bytes(batch: int, dim: int, seq_len: int, d_state: int, itemsize: int, *, backward: bool) -> int:
    forward = 4 * batch * dim * seq_len + 2 * batch * d_state * seq_len
    backward_only = 7 * batch * dim * seq_len + 4 * batch * d_state * seq_len
    return itemsize * (forward + (backward_only if backward else 0))


def scan_inputs(batch: int, dim: int, seq_len: int, d_state: int, *, device, dtype, seed: int = 0) -> tuple:
    """(u, delta, A, B, C, D, z, delta_bias) like a Mamba layer's: A = -(1..N) per channel, delta before the
    softplus around softplus^-1(0.01), all requiring grad."""
    generator = torch.Generator(device).manual_seed(seed)

    def randn(*shape, scale=1.0, shift=0.0, dtype=dtype):
        values = torch.randn(*shape, generator=generator, device=device) * scale + shift
        return values.to(dtype).requires_grad_()

    u, delta = randn(batch, dim, seq_len), randn(batch, dim, seq_len, scale=0.5, shift=-4.6)
    A = (-torch.arange(1, d_state + 1, device=device, dtype=torch.float32)).repeat(dim, 1).requires_grad_()
    B, C = randn(batch, d_state, seq_len), randn(batch, d_state, seq_len)
    D, z, delta_bias = randn(dim, dtype=torch.float32), randn(batch, dim, seq_len), randn(dim, scale=0.1,
                                                                                          dtype=torch.float32)
    return u, delta, A, B, C, D, z, delta_bias


def bench_scan(device: torch.device | None = None, shapes=None, dtype: torch.dtype | None = None,
               min_run_time: float = 2.0) -> dict:
    from archlab.kernels.selective_scan import selective_scan

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    shapes = shapes or (GPU_SHAPES if on_gpu else CPU_SHAPES)
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    providers = GPU_PROVIDERS if on_gpu else CPU_PROVIDERS

    def timer(run, inputs):
        return time_cuda_ms(run, inputs) if on_gpu else time_cpu_ms(run, inputs, min_run_time=min_run_time)

    rows = []
    for batch, dim, seq_len, d_state in shapes:
        inputs = scan_inputs(batch, dim, seq_len, d_state, device=device, dtype=dtype)
        for name, backend in providers.items():
            shape = {"provider": name, "batch": batch, "dim": dim, "seq_len": seq_len, "d_state": d_state}
            for row in time_passes(shape, lambda *args, backend=backend: selective_scan(
                    *args, delta_softplus=True, backend=backend), inputs, timer):
                if "ms" in row:
                    moved = scan_bytes(batch, dim, seq_len, d_state, dtype.itemsize, backward=row["pass"] != "fwd")
                    row["gb_per_s"] = round(moved / row["ms"] / 1e6, 3)
                rows.append(row)
    *ours, peer = providers
    key = ("batch", "dim", "seq_len", "d_state", "pass")
    add_ratios(rows, ours=ours, peers=[peer], key=key)
    ratios = [f"ratio_vs_{peer}"]
    if not on_gpu:  # the fused kernel against the PyTorch path it replaces
        add_ratios(rows, ours=ours[:1], peers=ours[1:], key=key)
        ratios.append(f"ratio_vs_{ours[1]}")
    return {"benchmark": "scan", "title": "Selective scan benchmark", "columns": (*COLUMNS, *ratios),
            "notes": ["Inputs: z gate, D skip, delta bias, softplus; B and C input-dependent (batch, N, L).",
                      "GB/s: least traffic per pass (each input read once, each output written once).",
                      *(f"{ratio} = {ratio.removeprefix('ratio_vs_')} ms / our ms (> 1: ours is faster)."
                        for ratio in ratios)],
            **environment(device, dtype), "rows": rows}
