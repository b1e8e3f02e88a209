"""SSD's conformance spec (kernels/registry.py): Mamba-2-like inputs, packed and not, small enough that the
sequential reference runs each case in milliseconds and the Triton interpreter in about a second."""
from __future__ import annotations

import torch

from archlab.kernels.registry import Conformance, ConformanceCase, Tolerance

CHUNK_SIZES = (1, 2, 4, 8, 16)
PRIME_LENGTHS = (1, 2, 3, 5, 7, 13, 17, 31)
# batch * heads * chunks of 16 positions per case (a packed sequence can start one more): the Triton interpreter pays
# about 0.2 s for each, forward and backward (tests/kernels/test_ssd_triton.py)
INTERPRETER_BUDGET = 4
INTERPRETER_CHUNK = 16
MAX_CUTS = 2


def draw_case(draw, dtype: torch.dtype) -> ConformanceCase:
    from hypothesis import strategies as st  # a test dependency: imported only when a case is drawn

    chunk_size = draw(st.sampled_from(CHUNK_SIZES))
    packed = draw(st.booleans())
    batch = 1 if packed else draw(st.integers(1, 2))
    groups = draw(st.sampled_from([1, 2]))
    heads = groups * draw(st.integers(1, 2))
    head_dim, n_state = draw(st.sampled_from([1, 3, 4])), draw(st.sampled_from([1, 4, 8]))
    # 1, primes, and both sides of one and two chunk lengths: the padding and the carries between chunks
    lengths = sorted({n for n in (*PRIME_LENGTHS, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size + 1)
                      if n >= 1 and batch * heads * (-(-n // INTERPRETER_CHUNK) + packed * MAX_CUTS)
                      <= INTERPRETER_BUDGET})
    length = draw(st.sampled_from(lengths or [1]))
    cu_seqlens = None
    if packed and length > 1:  # boundaries anywhere: inside chunks, on chunk edges, next to each other
        cuts = draw(st.lists(st.integers(1, length - 1), max_size=MAX_CUTS, unique=True))
        cu_seqlens = torch.tensor([0, *sorted(cuts), length], dtype=torch.int32)
    options = {
        "D": draw(st.sampled_from(["none", "per head", "per head and channel"])),
        "z": draw(st.booleans()), "dt_bias": draw(st.booleans()), "dt_softplus": draw(st.booleans()),
        "dt_limit": draw(st.sampled_from([(0.0, float("inf")), (0.05, 0.8)])),
        "initial_states": cu_seqlens is None and draw(st.booleans()),
        "strided_x": draw(st.booleans()),  # Mamba-2 hands over x as a slice of one projection's output
    }
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return _case(batch, length, heads, head_dim, groups, n_state, chunk_size, cu_seqlens, options, dtype, generator)


def _case(batch, length, heads, head_dim, groups, n_state, chunk_size, cu_seqlens, options, dtype, generator):
    def randn(*shape, dtype=dtype):
        return torch.randn(shape, generator=generator).to(dtype)

    x = randn(batch, length, heads, 2 * head_dim)[..., :head_dim] if options["strided_x"] else \
        randn(batch, length, heads, head_dim)
    dt = randn(batch, length, heads)
    # Mamba's dt is positive (a softplus); without the softplus here, draw it positive directly
    dt = dt if options["dt_softplus"] else (dt.float().abs() * 0.5).to(dtype)
    A = -(torch.rand(heads, generator=generator) * 2 + 0.1)  # -exp(A_log): the state decays
    D_shape = {"none": None, "per head": (heads,), "per head and channel": (heads, head_dim)}[options["D"]]
    tensors = {  # A, D, dt_bias and the initial states stay float32, as in Mamba-2
        "x": x, "dt": dt, "A": A,
        "B": randn(batch, length, groups, n_state), "C": randn(batch, length, groups, n_state),
        "D": None if D_shape is None else randn(*D_shape, dtype=torch.float32),
        "z": randn(batch, length, heads, head_dim) if options["z"] else None,
        "dt_bias": torch.rand(heads, generator=generator) * 0.5 if options["dt_bias"] else None,
        "initial_states": randn(batch, heads, head_dim, n_state, dtype=torch.float32)
        if options["initial_states"] else None,
    }
    tensors = {name: None if t is None else t.requires_grad_() for name, t in tensors.items()}
    positional = tuple(tensors.pop(name) for name in ("x", "dt", "A", "B", "C"))
    return ConformanceCase(positional, {**tensors, "chunk_size": chunk_size, "cu_seqlens": cu_seqlens,
                                        "dt_softplus": options["dt_softplus"], "dt_limit": options["dt_limit"],
                                        "return_final_states": True})


def _options(D="none", z=False, dt_bias=False, dt_softplus=False, dt_limit=(0.0, float("inf")), initial_states=False,
             strided_x=False) -> dict:
    return dict(D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
                strided_x=strided_x)


# (batch, length, heads, head_dim, groups, state, cu_seqlens, options): groups of 2 heads, every optional input
# present, then absent; a state of 80 (two of a GPU's 64-wide state tiles); a packed batch whose boundaries fall
# inside chunks, with a sequence of one position; one position alone. Lengths are off the GPU's 64-position
# chunks and cross the interpreter's 16.
SELF_CHECK_CASES = (
    (1, 21, 4, 5, 2, 8, None, _options("per head", z=True, dt_bias=True, dt_softplus=True, dt_limit=(0.05, 0.8),
                                       initial_states=True, strided_x=True)),
    (2, 18, 1, 3, 1, 80, None, _options()),
    (1, 67, 2, 4, 1, 4, (0, 1, 40, 67), _options("per head and channel", z=True, dt_softplus=True)),
    (1, 1, 1, 1, 1, 1, None, _options("per head", dt_bias=True, initial_states=True)),
)


def self_check_cases(dtype: torch.dtype) -> list[ConformanceCase]:
    generator = torch.Generator().manual_seed(0)
    return [_case(batch, length, heads, head_dim, groups, n_state, 64,
                  None if bounds is None else torch.tensor(bounds, dtype=torch.int32), options, dtype, generator)
            for batch, length, heads, head_dim, groups, n_state, bounds, options in SELF_CHECK_CASES]


def compile_launches(as_gpu) -> None:
    """A Mamba-2 block's launches under bf16 autocast (B1 L256 H8 P64 N128, one group, D per head, dt_bias,
    softplus), forward and backward, at the GPU's chunk length; final states unused, as in training. With z: the
    heavier variant (mamba_ssm's Mamba2 hands z to the SSD with rmsnorm=False, to its gated norm otherwise)."""
    from archlab.kernels.ssd.op import GPU_CHUNK_LEN
    from archlab.kernels.ssd.triton import ssd_bwd, ssd_fwd

    batch, length, heads, head_dim, n_state = 1, 256, 8, 64, 128

    def empty(*shape, dtype=torch.bfloat16):
        return as_gpu(torch.empty(shape, dtype=dtype))

    x, z, dt = empty(batch, length, heads, head_dim), empty(batch, length, heads, head_dim), empty(batch, length, heads)
    B, C = empty(batch, length, 1, n_state), empty(batch, length, 1, n_state)
    A, D, dt_bias = (empty(heads, dtype=torch.float32) for _ in range(3))
    options = dict(dt_softplus=True, dt_limit=(0.0, float("inf")), chunk_len=GPU_CHUNK_LEN)
    out, _ = ssd_fwd(x, dt, A, B, C, D, z, dt_bias, None, None, **options)
    ssd_bwd(torch.empty_like(out), None, x, dt, A, B, C, D, z, dt_bias, None, None, **options)


# Half precision: the torch backend computes in float32 (only its inputs and output are rounded); the Triton kernel,
# like mamba_ssm's (the peer), rounds the matmul operands it computes (the decay-weighted C B^T, dy x^T) to the
# inputs' type once; the states go in as two halves (hi + lo), as their rounding would reach dA through sums that
# cancel. So their results are those of a half-precision matmul: off by a few rounding units of the inputs' type
# (bf16 2^-8, fp16 2^-11) times their largest value. The worst seen over 40 drawn cases per dtype and the self-check
# cases: atol 6e-3 (bf16) and 3e-4 (fp16); allowed: about 4 rounding units (bf16 1.6e-2, fp16 2e-3).
HALF_PRECISION_MATMULS = {torch.bfloat16: Tolerance(rtol=2e-2, atol=1.6e-2), torch.float16: Tolerance(rtol=5e-3,
                                                                                                          atol=2e-3)}
CONFORMANCE = Conformance(draw_case, self_check=self_check_cases, compile_launches=compile_launches, tolerances={
    torch.float32: Tolerance(rtol=1e-4, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-4),
    torch.float16: Tolerance(rtol=1.5e-3, atol=1e-4),
}, backend_tolerances={"triton": HALF_PRECISION_MATMULS, "peer": HALF_PRECISION_MATMULS})
