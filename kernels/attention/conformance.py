"""Attention's conformance spec (kernels/registry.py): small grouped-query cases the Triton interpreter runs fast."""
from __future__ import annotations

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

LENGTHS = (1, 2, 3, 5, 8, 13, 16, 17, 31, 33)  # 1, primes, and both sides of the interpreter's 16 x 32 blocks
HEAD_DIMS = (16, 32, 64)  # the Triton kernel's but 128, which the interpreter runs slowly
# sliding windows (causal only): none, one key, small, both sides of the 16 x 32 blocks, and at least any length
WINDOWS = (None, None, 1, 2, 5, 15, 16, 17, 31, 32, 33, 64)


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    causal = draw(st.booleans())
    len_k = draw(st.sampled_from(LENGTHS))
    len_q = draw(st.sampled_from([n for n in LENGTHS if n <= len_k] if causal else LENGTHS))
    n_kv_heads = draw(st.integers(1, 2))
    n_heads = n_kv_heads * draw(st.integers(1, 2))
    batch, head_dim = draw(st.integers(1, 2)), draw(st.sampled_from(HEAD_DIMS))
    transposed = draw(st.booleans())  # (batch, length, heads, dim) memory seen as (batch, heads, length, dim)
    window = draw(st.sampled_from(WINDOWS)) if causal else None
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    qkv = _qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator)
    return ConformanceCase(qkv, {"causal": causal, "scale": draw(st.sampled_from([None, 0.3])), "window": window})


def _qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator) -> tuple:
    def make(heads: int, length: int) -> torch.Tensor:
        shape = (batch, length, heads, head_dim) if transposed else (batch, heads, length, head_dim)
        t = torch.randn(shape, generator=generator).to(dtype)
        return (t.transpose(1, 2) if transposed else t).requires_grad_()

    return make(n_heads, len_q), make(n_kv_heads, len_k), make(n_kv_heads, len_k)


# (batch, heads, kv_heads, len_q, len_k, head_dim, causal, transposed, scale, window): causal and not, GQA and MQA,
# ragged and bottom-right aligned lengths, one query (decoding), every head dim the kernel compiles, several blocks on
# a GPU, and a sliding window that skips blocks behind it on a prefill chunk after a cache
SELF_CHECK_SHAPES = ((1, 2, 2, 37, 37, 16, False, False, None, None), (2, 4, 2, 150, 150, 32, True, False, None, None),
                     (1, 4, 1, 5, 70, 64, True, True, 0.3, None), (1, 2, 1, 70, 19, 128, False, False, None, None),
                     (1, 2, 2, 1, 33, 64, True, False, None, None), (1, 4, 2, 100, 230, 64, True, False, None, 40))


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    return [ConformanceCase(_qkv(batch, n_heads, n_kv_heads, len_q, len_k, head_dim, transposed, dtype, generator),
                            {"causal": causal, "scale": scale, "window": window})
            for batch, n_heads, n_kv_heads, len_q, len_k, head_dim, causal, transposed, scale, window
            in SELF_CHECK_SHAPES]


def compile_launches(as_gpu) -> None:
    """Training's launches at the head dim that needs the most registers and shared memory (128), in bf16, causal
    (both the masked and the unmasked loops) and grouped-query, without and with a sliding window."""
    from archlab.kernels.attention.triton import flash_attn_bwd, flash_attn_fwd

    q, k, v = (as_gpu(torch.empty(1, heads, 256, 128, dtype=torch.bfloat16)) for heads in (4, 2, 2))
    for window in (0, 64):
        out, lse = flash_attn_fwd(q, k, v, causal=True, scale=128 ** -0.5, window=window)
        flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, causal=True, scale=128 ** -0.5, window=window)


CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-5, atol=3e-5),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=4e-2),
    torch.float16: Tolerance(rtol=4e-3, atol=4e-3),
})
