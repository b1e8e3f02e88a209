"""The causal conv1d's conformance spec (kernels/registry.py): the Mamba block's shapes, shrunk for the interpreter,
with and without packed documents (seq_idx, also flipped as a reversed layer passes it)."""
from __future__ import annotations

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

LENGTHS = (1, 2, 3, 5, 7, 31, 32, 33, 47, 64)  # 1, below the width, primes, around the test blocks


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    packed = draw(st.booleans())  # documents packed in each row; dim 8 then, which the peer needs to take seq_idx
    batch, length = draw(st.integers(1, 2)), draw(st.sampled_from(LENGTHS))
    dim, width = 8 if packed else draw(st.integers(1, 6)), draw(st.integers(2, 4))
    fp32_weights = draw(st.booleans())  # the Mamba block may keep its weights in fp32
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    channel_last = draw(st.booleans())  # a (batch, L, dim) tensor seen as (batch, dim, L), as the block passes it
    with_bias, activation = draw(st.booleans()), draw(st.sampled_from([None, "silu"]))
    seq_idx = None
    if packed:
        starts = draw(st.lists(st.lists(st.booleans(), min_size=length - 1, max_size=length - 1), min_size=batch,
                               max_size=batch))
        seq_idx = seq_idx_from_starts(torch.tensor(starts, dtype=torch.bool).reshape(batch, length - 1))
        seq_idx = seq_idx.flip(1) if draw(st.booleans()) else seq_idx  # flipped: what a reversed layer passes
    return _case(batch, dim, length, width, fp32_weights, channel_last, with_bias, activation, dtype, generator,
                 seq_idx)


def seq_idx_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(batch, L) int32 document ids from (batch, L - 1) bools: does a new document start at position 1, 2, ...?"""
    return torch.nn.functional.pad(starts.cumsum(1), (1, 0)).to(torch.int32)


# (batch, dim, length, width, fp32 weights, channel-last, with bias, activation): both layouts, every width, one
# position, lengths across several blocks, weights in the input's dtype and in float32
SELF_CHECK_SHAPES = ((1, 5, 33, 4, False, False, True, "silu"), (2, 3, 70, 3, True, True, False, None),
                     (1, 6, 1, 2, False, False, True, None), (1, 4, 130, 4, False, True, True, "silu"))
# and packed documents in both layouts: lengths 1, 2 (below the width), 30 and 7 (the first across a block)
PACKED_SHAPES = ((1, 5, 40, 4, False, False, True, "silu"), (1, 5, 40, 4, True, True, True, "silu"))
PACKED_STARTS = (1, 3, 33)


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    cases = [_case(*shape, dtype, generator) for shape in SELF_CHECK_SHAPES]
    for shape in PACKED_SHAPES:
        batch, _, length = shape[:3]
        starts = torch.zeros(batch, length - 1, dtype=torch.bool)
        starts[:, [start - 1 for start in PACKED_STARTS]] = True
        cases.append(_case(*shape, dtype, generator, seq_idx_from_starts(starts)))
    return cases


def _case(batch, dim, length, width, fp32_weights, channel_last, with_bias, activation, dtype, generator,
          seq_idx=None):
    weight_dtype = torch.float32 if fp32_weights else dtype
    if channel_last:
        x = torch.randn(batch, length, dim, generator=generator).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(batch, dim, length, generator=generator).to(dtype)
    weight = (torch.randn(dim, width, generator=generator) / width ** 0.5).to(weight_dtype)
    bias = torch.randn(dim, generator=generator).to(weight_dtype).requires_grad_() if with_bias else None
    packing = {} if seq_idx is None else {"seq_idx": seq_idx}
    return ConformanceCase((x.requires_grad_(), weight.requires_grad_(), bias), {"activation": activation, **packing})


def compile_launches(as_gpu) -> None:
    """The Mamba block's launches under bf16 autocast: x in bf16 in both layouts, fp32 weight and bias, width 4."""
    from archlab.kernels.causal_conv1d import new_like_x
    from archlab.kernels.causal_conv1d.triton import causal_conv1d_bwd, causal_conv1d_fwd

    for channel_last in (False, True):
        shape = (1, 512, 256) if channel_last else (1, 256, 512)
        x = torch.empty(shape, dtype=torch.bfloat16)
        x = as_gpu(x.transpose(1, 2) if channel_last else x)
        weight, bias = as_gpu(torch.empty(256, 4)), as_gpu(torch.empty(256))
        causal_conv1d_fwd(x, weight, bias, silu=True)
        causal_conv1d_bwd(new_like_x(x), x, weight, bias, silu=True)
    # packed documents (int32 seq_idx), in the layout every block passes: channel-last
    x, seq_idx = as_gpu(torch.empty(1, 512, 256, dtype=torch.bfloat16).transpose(1, 2)), as_gpu(
        torch.zeros(1, 512, dtype=torch.int32))
    causal_conv1d_fwd(x, weight, bias, silu=True, seq_idx=seq_idx)
    causal_conv1d_bwd(new_like_x(x), x, weight, bias, silu=True, seq_idx=seq_idx)


CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=2e-2, atol=1e-2),
    torch.float16: Tolerance(rtol=2e-3, atol=2e-3),
})
