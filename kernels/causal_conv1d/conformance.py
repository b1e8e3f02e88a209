"""The causal conv1d's conformance spec (kernels/registry.py): the Mamba block's shapes, shrunk for the interpreter."""
from __future__ import annotations

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

LENGTHS = (1, 2, 3, 5, 7, 31, 32, 33, 47, 64)  # 1, below the width, primes, around the test blocks


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    batch, dim, length = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.sampled_from(LENGTHS))
    width = draw(st.integers(2, 4))
    weight_dtype = draw(st.sampled_from([dtype, torch.float32]))  # the Mamba block may keep its weights in fp32
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):  # channel-last: a (batch, L, dim) tensor seen as (batch, dim, L), as the block passes it
        x = torch.randn(batch, length, dim, generator=generator).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, generator=generator).to(dtype)
    weight = (torch.randn(dim, width, generator=generator) / width ** 0.5).to(weight_dtype)
    bias = torch.randn(dim, generator=generator).to(weight_dtype).requires_grad_() if draw(st.booleans()) else None
    return ConformanceCase((x.requires_grad_(), weight.requires_grad_(), bias),
                           {"activation": draw(st.sampled_from([None, "silu"]))})


CONFORMANCE = Conformance(draw_case, tolerances={
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=1e-2),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3),
})
