"""CUDA's launch limits and 32-bit offsets in every Triton kernel, at sizes no CPU test could allocate.

Grids: the launchers run on 'meta' tensors (shapes without memory) with batch * heads, batch * groups, batch or
dim / BLOCK_D past 65535, the limit of CUDA's grid axes 1 and 2, and every kernel is replaced by a recorder of its
grid: each grid must fit CUDA's limits and hold exactly one program per (block, row). Offsets: views whose row
stride puts the last rows past 2**31 elements, run in the interpreter, must give the bits of contiguous copies.
"""
import math

import pytest
import torch

from archlab.kernels.common.launch import MAX_PROGRAMS, flat_grid

pytest.importorskip("triton")
from archlab.kernels.attention import triton as attention  # noqa: E402
from archlab.kernels.causal_conv1d import triton as conv  # noqa: E402
from archlab.kernels.selective_scan import op as scan_op  # noqa: E402
from archlab.kernels.selective_scan import triton as scan  # noqa: E402
from archlab.kernels.ssd import triton as ssd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRID_AXIS_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA's limits on grid axes 0, 1 and 2
PAST_AXIS_LIMIT = 70000


def test_flat_grid_holds_every_program_on_axis_zero_up_to_cudas_limit():
    assert flat_grid("attention", 3, 5, 7) == (105,)
    assert flat_grid("attention", MAX_PROGRAMS) == (MAX_PROGRAMS,)
    with pytest.raises(ValueError, match=r"^triton selective_scan: 2147483648 programs exceed CUDA's grid limit of "
                                         r"2147483647; use a smaller batch or kernels.selective_scan=torch$"):
        flat_grid("selective_scan", 2**20, 2**11)


class Recorder:
    """Stands in for a jit kernel: `kernel[grid](...)` records the grid instead of launching."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return lambda *args, **kwargs: None


def record(monkeypatch, module, *names):
    recorders = {name: Recorder() for name in names}
    for name, recorder in recorders.items():
        monkeypatch.setattr(module, name, recorder)
    return recorders


def assert_launched(recorder, programs):
    """One launch, within CUDA's limits on every axis, with `programs` programs in all."""
    assert len(recorder.grids) == 1, recorder.grids
    grid = recorder.grids[0]
    assert all(size <= limit for size, limit in zip(grid, GRID_AXIS_LIMITS, strict=False)), grid
    assert math.prod(grid) == programs, grid


def meta(*shape):
    return torch.empty(shape, device="meta")


@pytest.mark.parametrize("batch,n_heads,len_q", [(PAST_AXIS_LIMIT // 2, 2, 65), (1, PAST_AXIS_LIMIT, 3)])
def test_attention_grids_fit_for_batch_times_heads_past_65535(monkeypatch, batch, n_heads, len_q):
    monkeypatch.setattr(attention, "AUTOTUNE", False)
    kernels = record(monkeypatch, attention, "_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
    len_k, head_dim = 65, 16  # one past a multiple of every block, so a block short is seen
    q, kv = meta(batch, n_heads, len_q, head_dim), meta(batch, n_heads, len_k, head_dim)
    out, lse = attention.flash_attn_fwd(q, kv, kv, causal=False, scale=1.0)
    attention.flash_attn_bwd(out, q, kv, kv, out, lse, causal=False, scale=1.0)
    block_m, block_n = attention.FIXED_BLOCKS["BLOCK_M"], attention.FIXED_BLOCKS["BLOCK_N"]
    rows = batch * n_heads
    assert_launched(kernels["_fwd_kernel"], math.ceil(len_q / block_m) * rows)
    assert_launched(kernels["_bwd_delta_kernel"], math.ceil(len_q / 64) * rows)
    assert_launched(kernels["_bwd_dkdv_kernel"], math.ceil(len_k / block_n) * rows)
    assert_launched(kernels["_bwd_dq_kernel"], math.ceil(len_q / block_m) * rows)


# batch past the limit of axis 2; dim / BLOCK_D past the limit of axis 1
CONV_SIZES = [(PAST_AXIS_LIMIT, conv.FIXED_BLOCKS["BLOCK_D"]), (1, PAST_AXIS_LIMIT * conv.FIXED_BLOCKS["BLOCK_D"])]


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("batch,dim", CONV_SIZES)
def test_causal_conv1d_grids_fit_for_batch_or_dim_past_65535(monkeypatch, channel_last, batch, dim):
    monkeypatch.setattr(conv, "AUTOTUNE", False)
    forward = {False: Recorder(), True: Recorder()}
    monkeypatch.setattr(conv, "_fwd_kernels", forward)
    backward = record(monkeypatch, conv, "_bwd_kernel")["_bwd_kernel"]
    length, width = 3 * conv.BWD_CHUNK_LEN // 2, 4
    x = meta(batch, length, dim).transpose(1, 2) if channel_last else meta(batch, dim, length)
    weight, bias = meta(dim, width), meta(dim)
    out = conv.causal_conv1d_fwd(x, weight, bias, silu=True)
    conv.causal_conv1d_bwd(out, x, weight, bias, silu=True)
    channel_blocks = math.ceil(dim / conv.FIXED_BLOCKS["BLOCK_D"])
    assert_launched(forward[channel_last], math.ceil(length / conv.FIXED_BLOCKS["BLOCK_L"]) * channel_blocks * batch)
    assert_launched(backward, math.ceil(length / conv.BWD_CHUNK_LEN) * channel_blocks * batch)


def scan_inputs(batch, dim, n_groups, n_state, length):
    return (meta(batch, dim, length), meta(batch, dim, length), meta(dim, n_state),
            meta(batch, n_groups, n_state, length), meta(batch, n_groups, n_state, length), meta(dim),
            meta(batch, dim, length), meta(dim))


@pytest.mark.parametrize("batch,n_groups", [(PAST_AXIS_LIMIT, 1), (PAST_AXIS_LIMIT // 2, 2)])
def test_selective_scan_grids_fit_for_batch_times_groups_past_65535(monkeypatch, batch, n_groups):
    monkeypatch.setattr(scan, "AUTOTUNE", False)
    kernels = record(monkeypatch, scan, "_fwd_kernel", "_bwd_kernel")
    dim, n_state, length, chunk_len = 6 * n_groups, 4, 20, 16
    inputs = scan_inputs(batch, dim, n_groups, n_state, length)
    out, _, chunk_states = scan.selective_scan_fwd(*inputs, delta_softplus=True, chunk_len=chunk_len)
    scan.selective_scan_bwd(out, *inputs, chunk_states, delta_softplus=True, chunk_len=chunk_len)
    programs = math.ceil(dim // n_groups / scan.FIXED_BLOCK_D) * batch * n_groups
    assert_launched(kernels["_fwd_kernel"], programs)
    assert_launched(kernels["_bwd_kernel"], programs)


def test_selective_scan_past_cudas_program_limit_is_a_one_line_error(monkeypatch):
    record(monkeypatch, scan, "_fwd_kernel")
    inputs = scan_inputs(2**20, 2**13, 1, 4, 1)  # 2**31 programs of FIXED_BLOCK_D = 4 channels
    with pytest.raises(ValueError, match=r"^triton selective_scan: 2147483648 programs exceed CUDA's grid limit"):
        scan.selective_scan_fwd(*inputs, delta_softplus=True, chunk_len=16)


SSD_KERNELS = ("_chunk_states_kernel", "_chunk_output_kernel", "_state_grads_kernel", "_chunk_grads_kernel",
               "_chunk_bc_grads_kernel")


def ssd_inputs(batch, length, heads, head_dim, groups, n_state):
    """(x, dt, A, B, C, D, z, dt_bias, initial_states, cu_seqlens) on 'meta'."""
    x = meta(batch, length, heads, head_dim)
    return (x, meta(batch, length, heads), meta(heads), meta(batch, length, groups, n_state),
            meta(batch, length, groups, n_state), meta(heads), x, meta(heads), meta(batch, heads, head_dim, n_state),
            None)


@pytest.mark.parametrize("batch,heads", [(PAST_AXIS_LIMIT // 2, 2), (1, PAST_AXIS_LIMIT)])
def test_ssd_grids_fit_for_batch_times_heads_past_65535(monkeypatch, batch, heads):
    monkeypatch.setattr(ssd, "AUTOTUNE", False)
    kernels = record(monkeypatch, ssd, *SSD_KERNELS)
    length, head_dim, n_state, chunk_len, block = 20, 17, 20, 16, ssd.FIXED_BLOCK  # two tiles of each, two chunks
    inputs = ssd_inputs(batch, length, heads, head_dim, 1, n_state)
    options = dict(dt_softplus=True, dt_limit=(0.0, float("inf")), chunk_len=chunk_len)
    out, final = ssd.ssd_fwd(*inputs, **options)
    ssd.ssd_bwd(out, final, *inputs, **options)
    chunks, tiles = batch * math.ceil(length / chunk_len), math.ceil(head_dim / block) * math.ceil(n_state / block)
    states = kernels["_chunk_states_kernel"]  # forward, and again in the backward (states are recomputed)
    assert states.grids[0] == states.grids[1]
    states.grids.pop()
    assert_launched(states, tiles * heads * batch)  # a batch row is a sequence
    assert_launched(kernels["_chunk_output_kernel"], math.ceil(head_dim / block) * heads * chunks)
    assert_launched(kernels["_state_grads_kernel"], tiles * heads * batch)
    assert_launched(kernels["_chunk_grads_kernel"], heads * chunks)
    assert_launched(kernels["_chunk_bc_grads_kernel"], math.ceil(n_state / block) * chunks)  # one group


def test_ssd_past_cudas_program_limit_is_a_one_line_error(monkeypatch):
    record(monkeypatch, ssd, *SSD_KERNELS)
    inputs = ssd_inputs(2**16, 1, 2**15, 1, 1, 1)  # 2**31 programs of one tile, one chunk
    with pytest.raises(ValueError, match=r"^triton ssd: 2147483648 programs exceed CUDA's grid limit of 2147483647; "
                                         r"use a smaller batch or kernels.ssd=torch$"):
        ssd.ssd_fwd(*inputs, dt_softplus=True, dt_limit=(0.0, float("inf")), chunk_len=16)


# -- offsets past int32, for real in the interpreter -----------------------------------------------------------
def huge_buffer(rows, stride):
    """(rows, stride) bf16, uninitialised: gigabytes of address space, of which the tests touch a few columns."""
    try:
        return torch.empty(rows, stride, dtype=torch.bfloat16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        pytest.skip(f"cannot reserve a {rows * stride * 2 / 1e9:.1f} GB buffer: {error}")


def strided_views(rows, stride, widths):
    """(rows, width) views with row stride `stride`, one per width, side by side, filled with random values; their
    last rows lie past 2**31 elements from their start. 2**31 elements of the buffer come before them, so an offset
    that wraps at int32 (to no less than -2**31) still lands in it: a missing int64 gives wrong values, not a crash."""
    padding = -(-2**31 // stride)
    buffer = huge_buffer(padding + rows, stride)[padding:]
    views, start = [], 0
    for width in widths:
        view = buffer[:, start:start + width]
        view.copy_(torch.randn(rows, width, device=DEVICE).to(torch.bfloat16))
        views.append(view)
        start += width
    assert (rows - 1) * stride >= 2**31
    return views


def assert_same_bits(names, got, want):
    for name, g, w in zip(names, got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_attention_row_offsets_past_int32(monkeypatch, causal):
    """q, k, v, dout as (1, 1, L, D) views with row stride 2**24 (a (batch, L, heads, dim) layout with 2**24 / D
    heads): rows * stride passes 2**31 at row 128, in every kernel's loads."""
    monkeypatch.setattr(attention, "AUTOTUNE", False)
    torch.manual_seed(0)
    length, head_dim, stride = 130, 16, 2**24
    q, k, v, dout = (view[None, None] for view in strided_views(length, stride, [head_dim] * 4))
    results = []
    for tensors in ((q, k, v, dout), tuple(t.contiguous() for t in (q, k, v, dout))):
        out, lse = attention.flash_attn_fwd(*tensors[:3], causal=causal, scale=0.25)
        results.append([out, lse, *attention.flash_attn_bwd(tensors[3], *tensors[:3], out, lse, causal=causal,
                                                            scale=0.25)])
    assert_same_bits(["out", "lse", "dq", "dk", "dv"], *results)


def test_selective_scan_state_offsets_past_int32(monkeypatch):
    """B and C as (1, 1, N, L) views with state stride 2**28: n * stride reaches 2**31 at n = 8."""
    monkeypatch.setattr(scan, "AUTOTUNE", False)
    torch.manual_seed(0)
    dim, n_state, length, stride = 4, 9, 5, 2**28
    B, C = (view[None, None] for view in strided_views(n_state, stride, [length, length]))
    u, delta, z, grad_out = (torch.randn(1, dim, length, device=DEVICE) for _ in range(4))
    A = -torch.rand(dim, n_state, device=DEVICE) - 0.1
    D, delta_bias = torch.randn(dim, device=DEVICE), torch.randn(dim, device=DEVICE)
    results = []
    for b, c in ((B, C), (B.contiguous(), C.contiguous())):
        tensors = (u, delta, A, b, c, D, z, delta_bias)
        out, last_state, chunk_states = scan.selective_scan_fwd(*tensors, delta_softplus=True,
                                                                chunk_len=scan_op.GPU_CHUNK_LEN)
        grads = scan.selective_scan_bwd(grad_out, *tensors, chunk_states, delta_softplus=True,
                                        chunk_len=scan_op.GPU_CHUNK_LEN)
        results.append([out, last_state, *grads])
    assert_same_bits(["out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias"], *results)


def test_ssd_position_offsets_past_int32(monkeypatch):
    """x, z, dt, B, C as (1, L, 1, width) views with position stride 2**25 (a (batch, L, heads, dim) layout with
    2**25 / dim heads): positions * stride passes 2**31 at position 64, in every kernel's loads."""
    monkeypatch.setattr(ssd, "AUTOTUNE", False)
    torch.manual_seed(0)
    length, head_dim, n_state, stride = 66, 2, 3, 2**25
    x, z, dt, B, C = strided_views(length, stride, [head_dim, head_dim, 1, n_state, n_state])
    x, z, B, C = (view[None, :, None, :] for view in (x, z, B, C))
    dt = dt.float().abs().to(torch.bfloat16)[None]  # (1, L, 1), positive
    A, D, dt_bias = -torch.rand(1, device=DEVICE) - 0.1, torch.randn(1, device=DEVICE), torch.rand(1, device=DEVICE)
    grad_out = torch.randn(1, length, 1, head_dim, device=DEVICE).to(torch.bfloat16)
    options = dict(dt_softplus=False, dt_limit=(0.0, float("inf")), chunk_len=16)
    results = []
    for tensors in ((x, dt, B, C, z), tuple(t.contiguous() for t in (x, dt, B, C, z))):
        x_, dt_, B_, C_, z_ = tensors
        inputs = (x_, dt_, A, B_, C_, D, z_, dt_bias, None, None)
        out, final = ssd.ssd_fwd(*inputs, **options)
        results.append([out, final, *ssd.ssd_bwd(grad_out, final, *inputs, **options)[:8]])
    assert_same_bits(["out", "final", "dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias"], *results)
