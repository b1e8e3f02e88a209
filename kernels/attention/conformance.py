"""Attention's conformance spec (kernels/registry.py): small grouped-query cases the Triton interpreter runs fast, half
of them packed rows (seq_idx) of ragged documents."""
from __future__ import annotations

from itertools import pairwise

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

LENGTHS = (1, 2, 3, 5, 8, 13, 16, 17, 31, 33)  # 1, primes, and both sides of the interpreter's 16 x 32 blocks
HEAD_DIMS = (16, 32, 64)  # the Triton kernel's but 128, which the interpreter runs slowly
# sliding windows (causal only): none, one key, small, both sides of the 16 x 32 blocks, and at least any length
WINDOWS = (None, None, 1, 2, 5, 15, 16, 17, 31, 32, 33, 64)
MAX_DOCUMENTS = 4  # per packed row


def packed_seq_idx(document_lengths: list[list[int]], dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """seq_idx (B, L) for rows of documents of these lengths (each row's summing to L), ids 0, 1, ... per row."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in document_lengths]
                       ).to(dtype)


def draw_document_lengths(draw, length: int, max_documents: int = MAX_DOCUMENTS) -> list[int]:
    """Ragged lengths of 1 to max_documents documents filling `length` positions."""
    from hypothesis import strategies as st

    cuts = draw(st.lists(st.integers(1, length - 1), unique=True, max_size=max_documents - 1)) if length > 1 else []
    bounds = [0, *sorted(cuts), length]
    return [end - start for start, end in pairwise(bounds)]


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    causal, packed = draw(st.booleans()), draw(st.booleans())
    len_k = draw(st.sampled_from(LENGTHS))
    len_q = len_k if packed else draw(st.sampled_from([n for n in LENGTHS if n <= len_k] if causal else LENGTHS))
    n_kv_heads = draw(st.integers(1, 2))
    n_heads = n_kv_heads * draw(st.integers(1, 2))
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    transposed = draw(st.booleans())  # (batch, length, heads, dim) memory seen as (batch, heads, length, dim)
    window = draw(st.sampled_from(WINDOWS)) if causal else None
    seq_idx = packed_seq_idx([draw_document_lengths(draw, len_k) for _ in range(batch)],
                             draw(st.sampled_from([torch.int32, torch.int64]))) if packed else None
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    qkv = _qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator)
    return ConformanceCase(qkv, {"causal": causal, "scale": draw(st.sampled_from([None, 0.3])), "window": window,
                                 "seq_idx": seq_idx})


def _qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator) -> tuple:
    def make(heads: int, length: int) -> torch.Tensor:
        shape = (batch, length, heads, head_dim) if transposed else (batch, heads, length, head_dim)
        t = torch.randn(shape, generator=generator).to(dtype)
        return (t.transpose(1, 2) if transposed else t).requires_grad_()

    return make(n_heads, len_q), make(n_kv_heads, len_k), make(n_kv_heads, len_k)


# (batch, heads, kv_heads, len_q, len_k, head_dim, causal, transposed, scale, window, documents): causal and not,
# GQA and MQA, ragged and bottom-right aligned lengths, one query (decoding), every head dim the kernel compiles,
# several blocks on a GPU, a sliding window that skips blocks behind it on a prefill chunk after a cache, and packed
# rows (each row's document lengths) causal and bidirectional, documents shorter and longer than a GPU block (small:
# the interpreter runs these in CI)
SELF_CHECK_SHAPES = (
    (1, 2, 2, 37, 37, 16, False, False, None, None, None), (2, 4, 2, 150, 150, 32, True, False, None, None, None),
    (1, 4, 1, 5, 70, 64, True, True, 0.3, None, None), (1, 2, 1, 70, 19, 128, False, False, None, None, None),
    (1, 2, 2, 1, 33, 64, True, False, None, None, None), (1, 4, 2, 100, 230, 64, True, False, None, 40, None),
    (2, 4, 2, 150, 150, 64, True, False, None, None, ((7, 70, 1, 72), (150,))),
    (1, 2, 2, 100, 100, 32, False, False, None, None, ((64, 1, 35),)))


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    return [ConformanceCase(_qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator),
                            {"causal": causal, "scale": scale, "window": window,
                             "seq_idx": None if documents is None else packed_seq_idx(documents)})
            for batch, n_heads, n_kv_heads, len_q, len_k, head_dim, causal, transposed, scale, window, documents
            in SELF_CHECK_SHAPES]


def compile_launches(as_gpu) -> None:
    """Training's launches at the head dim that needs the most registers and shared memory (128), in bf16, causal
    (both the masked and the unmasked loops) and grouped-query, without and with a sliding window, and on packed rows
    (causal only: one new variant keeps CI's compiles few; windowed and bidirectional packed rows are variants the
    matrix leaves out)."""
    from archlab.kernels.attention.triton import flash_attn_bwd, flash_attn_fwd

    q, k, v = (as_gpu(torch.empty(1, heads, 256, 128, dtype=torch.bfloat16)) for heads in (4, 2, 2))
    seq_idx = as_gpu(torch.zeros(1, 256, dtype=torch.int32))
    for window, documents in ((0, None), (64, None), (0, seq_idx)):
        out, lse = flash_attn_fwd(q, k, v, causal=True, scale=128 ** -0.5, window=window, seq_idx=documents)
        flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, causal=True, scale=128 ** -0.5, window=window,
                       seq_idx=documents)


CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-5, atol=3e-5),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=4e-2),
    torch.float16: Tolerance(rtol=4e-3, atol=4e-3),
})
