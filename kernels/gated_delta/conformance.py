"""The gated delta rule's conformance spec (kernels/registry.py): Gated-DeltaNet-like inputs, packed and not, small
enough that the sequential reference runs each case in milliseconds and the Triton interpreter in about a second."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from archlab.kernels.gated_delta.op import GPU_CHUNK_LEN
from archlab.kernels.gated_delta.reference import l2norm
from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

# batch * value_heads * blocks of 16 positions per case (a packed sequence can start one more): what the Triton
# interpreter pays for, about like SSD's (kernels/ssd/conformance.py)
INTERPRETER_BUDGET = 4
INTERPRETER_CHUNK = 16
MAX_CUTS = 2
MAX_LENGTH = 40
HEAD_DIMS = (16, 32)


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    packed = draw(st.booleans())
    batch = 1 if packed else draw(st.integers(1, 2))
    heads = draw(st.sampled_from([1, 2]))
    value_heads = heads * draw(st.sampled_from([1, 2]))
    key_dim, value_dim = draw(st.sampled_from(HEAD_DIMS)), draw(st.sampled_from(HEAD_DIMS))
    # 1, a few primes, and both sides of the interpreter's and a GPU's blocks of 16 and 32 positions
    lengths = [n for n in (1, 2, 3, 7, 13, 15, 16, 17, 31, 32, 33, MAX_LENGTH)
               if batch * value_heads * (-(-n // INTERPRETER_CHUNK) + packed * MAX_CUTS) <= INTERPRETER_BUDGET]
    length = draw(st.sampled_from(lengths or [1]))
    cu_seqlens = None
    if packed and length > 1:  # boundaries anywhere, next to each other included
        cuts = draw(st.lists(st.integers(1, length - 1), max_size=MAX_CUTS, unique=True))
        cu_seqlens = torch.tensor([0, *sorted(cuts), length], dtype=draw(st.sampled_from([torch.int32, torch.int64])))
    options = {"initial_state": draw(st.booleans()), "use_qk_l2norm": draw(st.booleans()),
               "scale": draw(st.sampled_from([None, 0.3]))}
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return _case(batch, length, heads, value_heads, key_dim, value_dim, cu_seqlens, options, dtype, generator)


def _case(batch, length, heads, value_heads, key_dim, value_dim, cu_seqlens, options, dtype, generator):
    def randn(*shape):
        return torch.randn(shape, generator=generator)

    n_states = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    q, k = randn(batch, length, heads, key_dim), randn(batch, length, heads, key_dim)
    # a model normalises k (in the op with use_qk_l2norm, else before it): beta |k|^2 <= 1 keeps the state bounded
    k = k if options["use_qk_l2norm"] else l2norm(k)
    tensors = {
        "q": q, "k": k, "v": randn(batch, length, value_heads, value_dim),
        "g": F.logsigmoid(randn(batch, length, value_heads) + 2),  # decays exp(g) mostly near 1, as a model's
        "beta": torch.sigmoid(randn(batch, length, value_heads)),
    }
    tensors = {name: t.to(dtype).requires_grad_() for name, t in tensors.items()}
    initial_state = randn(n_states, value_heads, key_dim, value_dim).requires_grad_() if options["initial_state"] \
        else None  # states stay float32, as fla keeps them
    return ConformanceCase(tuple(tensors.values()), {
        "scale": options["scale"], "initial_state": initial_state, "output_final_state": True,
        "cu_seqlens": cu_seqlens, "use_qk_l2norm": options["use_qk_l2norm"]})


def _options(initial_state=False, use_qk_l2norm=False, scale=None) -> dict:
    return dict(initial_state=initial_state, use_qk_l2norm=use_qk_l2norm, scale=scale)


# (batch, length, heads, value_heads, key_dim, value_dim, cu_seqlens, options): grouped value heads with every option
# on; two batches with nothing optional; a packed batch past a GPU's 64-position chunk whose boundaries fall inside
# chunks, with a sequence of one position and per-sequence initial states; fla's head dims 64 and 128 at a few
# positions; one position alone.
SELF_CHECK_CASES = (
    (1, 21, 2, 4, 32, 16, None, _options(initial_state=True, use_qk_l2norm=True, scale=0.25)),
    (2, 18, 1, 1, 16, 32, None, _options()),
    (1, 67, 1, 2, 16, 16, (0, 1, 40, 67), _options(initial_state=True, use_qk_l2norm=True)),
    (1, 5, 1, 1, 64, 128, None, _options(use_qk_l2norm=True)),
    (1, 1, 1, 1, 16, 16, None, _options(initial_state=True)),
)


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    return [_case(batch, length, heads, value_heads, key_dim, value_dim,
                  None if bounds is None else torch.tensor(bounds, dtype=torch.int32), options, dtype, generator)
            for batch, length, heads, value_heads, key_dim, value_dim, bounds, options in SELF_CHECK_CASES]


# The torch backend computes in float32 from the same half-precision inputs as the reference: only its output and
# gradients are rounded to the inputs' type, as SSD's (kernels/ssd/conformance.py).
# fla (the peer) feeds its matmuls tf32 operands in float32 (2^-11, like fp16) and keeps its chunk states and WY
# factors in the inputs' type in half precision: several rounding units of that type. Not yet measured on a GPU
# (tests/kernels/test_peer_parity.py will): set from that rounding, about 8 units in bf16 and 4 in fp16 and tf32.
PEER_TOLERANCES = {torch.float32: Tolerance(rtol=5e-3, atol=2e-3), torch.bfloat16: Tolerance(rtol=3e-2, atol=3e-2),
                   torch.float16: Tolerance(rtol=5e-3, atol=2e-3)}
# Our Triton kernel on a GPU takes q k^T and k k^T on the half-precision tiles as loaded, like the SSD kernel's
# matmuls: their tolerance in half precision (in the interpreter, and for fp32 inputs, it computes in true fp32).
TRITON_TOLERANCES = {torch.bfloat16: Tolerance(rtol=2e-2, atol=1.6e-2), torch.float16: Tolerance(rtol=5e-3, atol=2e-3)}


def compile_launches(as_gpu) -> None:
    """A Gated DeltaNet layer's launches in bf16 (B1 L256 H4 HV8 K=V=128: two value heads per key head; two packed
    sequences, the second starting inside a chunk; fp32 g and beta as a model computes them), forward and backward
    at the GPU's chunk length, with an initial state and a final-state gradient: the heaviest variants."""
    from archlab.kernels.gated_delta.triton import gated_delta_bwd as backward
    from archlab.kernels.gated_delta.triton import gated_delta_fwd as forward

    length, heads, value_heads, key_dim, value_dim = 256, 4, 8, 128, 128

    def empty(*shape, dtype=torch.bfloat16):
        return as_gpu(torch.empty(shape, dtype=dtype))

    q, k = empty(1, length, heads, key_dim), empty(1, length, heads, key_dim)
    v = empty(1, length, value_heads, value_dim)
    g, beta = empty(1, length, value_heads, dtype=torch.float32), empty(1, length, value_heads, dtype=torch.float32)
    cu_seqlens = as_gpu(torch.tensor([0, 100, length], dtype=torch.int32))
    initial = empty(2, value_heads, key_dim, value_dim, dtype=torch.float32)
    out, final = forward(q, k, v, g, beta, key_dim ** -0.5, initial, cu_seqlens, GPU_CHUNK_LEN)
    backward(torch.empty_like(out), torch.empty_like(final), q, k, v, g, beta, key_dim ** -0.5, initial, cu_seqlens,
             GPU_CHUNK_LEN)


CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-4),
    torch.float16: Tolerance(rtol=1.5e-3, atol=1e-4),
}, backend_tolerances={"triton": TRITON_TOLERANCES, "peer": PEER_TOLERANCES})
