"""The selective scan's conformance spec (kernels/registry.py): Mamba-like inputs at sizes the Triton interpreter
scans in about a second, half of them packed documents (seq_idx)."""
from __future__ import annotations

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

LENGTHS = (1, 2, 3, 5, 7, 13, 16, 17, 31, 33)  # 1, primes, and both sides of the interpreter's 16-position chunks
# batch * dim * N * L per case: the interpreter pays ~50 us per scanned element (see test_selective_scan_triton.py)
ELEMENT_BUDGET = 2000


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    batch, n_state, groups = draw(st.integers(1, 2)), draw(st.sampled_from([1, 4, 8])), draw(st.sampled_from([0, 1, 2]))
    dim = max(groups, 1) * draw(st.integers(1, 3))  # groups 0: B and C are (batch, N, L), shared by every channel
    length = draw(st.sampled_from([n for n in LENGTHS if batch * dim * n_state * n <= ELEMENT_BUDGET]))
    softplus, with_d, with_z, with_bias = (draw(st.booleans()) for _ in range(4))
    seq_idx = draw_seq_idx(draw, batch, length) if draw(st.booleans()) else None
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return scan_case(batch, dim, length, n_state, groups, softplus, with_d, with_z, with_bias, dtype, generator,
                     seq_idx)


def draw_document_lengths(draw, length: int) -> list[int]:
    """Ragged lengths of documents packed into `length` positions (length-1 documents included)."""
    from hypothesis import strategies as st

    cuts = sorted(draw(st.sets(st.integers(1, length - 1), max_size=6))) if length > 1 else []
    return [end - start for start, end in zip([0, *cuts], [*cuts, length], strict=True)]


def draw_seq_idx(draw, batch: int, length: int) -> torch.Tensor:
    """(batch, L) int32 document ids, each row its own ragged documents; ids rise along a row, or fall (a reversed
    layer's flipped seq_idx)."""
    from hypothesis import strategies as st

    rows = [seq_idx_of(draw_document_lengths(draw, length)) for _ in range(batch)]
    seq_idx = torch.stack(rows)
    return seq_idx.flip(-1) if draw(st.booleans()) else seq_idx


def seq_idx_of(lengths: list[int]) -> torch.Tensor:
    """(sum(lengths),) int32: document i's positions hold id i."""
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))


# (batch, dim, length, n_state, groups, softplus, with D, with z, with delta_bias): B and C shared by every channel,
# grouped and per-channel, one position, several chunks, each optional input present and absent
SELF_CHECK_SHAPES = ((1, 4, 33, 4, 0, True, True, True, True), (2, 4, 17, 8, 2, False, False, False, False),
                     (1, 3, 1, 16, 1, True, True, False, True), (1, 2, 70, 4, 0, False, False, True, False))
# and packed documents: one of length 1, one ending at a 32-position chunk boundary, one crossing the next
SELF_CHECK_DOCUMENTS = (1, 4, 70, 4, 2, True, True, True, True), (1, 31, 38)


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    shape, lengths = SELF_CHECK_DOCUMENTS
    packed = scan_case(*shape, dtype, generator, seq_idx_of(list(lengths)).expand(shape[0], -1))
    return [scan_case(*shape, dtype, generator) for shape in SELF_CHECK_SHAPES] + [packed]


def scan_case(batch, dim, length, n_state, groups, softplus, with_d, with_z, with_bias, dtype, generator,
              seq_idx=None):
    """A call of selective_scan(..., return_last_state=True) on random Mamba-like inputs (groups 0: B and C shared
    by every channel), every floating input differentiable."""
    def randn(*shape, dtype=dtype):
        return torch.randn(shape, generator=generator).to(dtype)

    bc_shape = (batch, n_state, length) if groups == 0 else (batch, groups, n_state, length)
    delta = randn(batch, dim, length)
    # Mamba's delta is positive (a softplus); without the softplus here, draw it positive directly
    delta = delta if softplus else (delta.float().abs() * 0.5).to(dtype)
    A = -(torch.rand(dim, n_state, generator=generator) * 2 + 0.1)  # -exp(A_log): the state decays
    D = randn(dim, dtype=torch.float32) if with_d else None  # A, D, delta_bias stay float32, as in Mamba
    z = randn(batch, dim, length) if with_z else None
    delta_bias = torch.rand(dim, generator=generator) * 0.5 if with_bias else None
    tensors = (randn(batch, dim, length), delta, A, randn(*bc_shape), randn(*bc_shape), D, z, delta_bias)
    return ConformanceCase(tuple(None if t is None else t.requires_grad_() for t in tensors),
                           {"delta_softplus": softplus, "return_last_state": True, "seq_idx": seq_idx})


def compile_launches(as_gpu) -> None:
    """The Mamba block's launches under bf16 autocast: every optional input present, N = 16, GPU chunks; without
    and with packed documents (int32 seq_idx)."""
    from archlab.kernels.selective_scan.op import GPU_CHUNK_LEN
    from archlab.kernels.selective_scan.triton import selective_scan_bwd, selective_scan_fwd

    def bf16(*shape):
        return as_gpu(torch.empty(shape, dtype=torch.bfloat16))

    batch, dim, length, n_state = 1, 256, 256, 16
    u, delta, z, B, C = bf16(batch, dim, length), bf16(batch, dim, length), bf16(batch, dim, length), \
        bf16(batch, n_state, length), bf16(batch, n_state, length)
    A, D, delta_bias = as_gpu(torch.empty(dim, n_state)), as_gpu(torch.empty(dim)), as_gpu(torch.empty(dim))
    for seq_idx in (None, as_gpu(torch.zeros(batch, length, dtype=torch.int32))):
        _, _, chunk_states = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, True, GPU_CHUNK_LEN, seq_idx)
        selective_scan_bwd(torch.empty_like(u), u, delta, A, B, C, D, z, delta_bias, chunk_states, True,
                           GPU_CHUNK_LEN, seq_idx)


CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-4),
    torch.float16: Tolerance(rtol=1.5e-3, atol=1e-4),
})
