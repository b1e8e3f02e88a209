"""Cached decoding gives the full forward's logits: every backbone, on every kernel backend that runs on CPU, in
float32 and under CPU bf16 autocast.

One cache takes a prompt (prefill), then a multi-position chunk, then single positions; the logits of all pieces,
concatenated, must be the logits of one forward over the whole sequence. What a backend changes on this path:
  attention  every piece runs the backend's kernel, the chunk and the steps with fewer queries than keys (the
             bottom-right aligned causal mask) over the KV cache;
  swa        the same with a sliding window of 3 over a ring-buffer cache: the prompt is longer than the window,
             the chunk reads the window before it back from the ring, each step overwrites its oldest slot;
  mamba      the prefill runs the backend's conv and scan, whose conv window and last state seed the cache; later
  mamba2     positions run selective_state_update (ssd_state_update for Mamba-2) / causal_conv1d_update, which
             have one implementation for every backend (kernels/selective_scan, kernels/ssd, kernels/causal_conv1d),
             so they are tested on each backend's prefill here rather than per backend.
The peer backend runs third-party CUDA kernels only; tests/kernels/test_peer_parity.py compares it with the
reference op by op on a GPU.
"""
import contextlib
import importlib.util
import itertools

import pytest
import torch

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model
from archlab.kernels.backend import triton_interpreting

# Tiny, because the triton backend runs in Triton's interpreter, where a Mamba layer's scan costs about a second per
# forward at batch 2, 32 channels and d_state 4 (the cost grows with each): so d_model 16, expand 1 and d_state 2
# where there are Mamba layers. The Transformer keeps d_model 32 for n_kv_heads=1 < n_heads=2: grouped-query heads in
# the KV cache. Head dims are 16, one the Triton attention kernel compiles for.
# dt drawn in [0.1, 0.5] rather than mamba_ssm's [0.001, 0.1]: larger steps make the SSM state carry more of the
# output, so a state handed over wrongly from the prefill shows (dropping it moved the logits by 3e-4 of the largest
# logit instead of 8e-5; D u, the skip, carries most of a fresh model's output).
MAMBA = dict(d_state=2, expand=1, dt_min=0.1, dt_max=0.5)
# Mamba-2 alike: 2 heads of 8 channels, chunks of 4 so that the prompt and the sequence span several
MAMBA2 = dict(d_state=4, expand=1, head_dim=8, chunk_size=4, dt_min=0.1, dt_max=0.5)
BACKBONES = {
    "transformer": dict(layers="transformer", n_layers=2, d_model=32, attention=dict(n_heads=2, n_kv_heads=1)),
    "mamba": dict(layers="mamba", n_layers=2, d_model=16, mamba=MAMBA),
    "hybrid": dict(layers="mamba,attention", d_model=16, attention=dict(n_heads=1), mamba=MAMBA),
    "swa": dict(layers="attention,swa", d_model=32, attention=dict(n_heads=2, n_kv_heads=1),
                swa=dict(n_heads=2, n_kv_heads=1, window=3)),
    "mamba2": dict(layers="mamba2", n_layers=2, d_model=16, mamba2=MAMBA2),
}
BATCH = 2
# prompt of 5 (longer than the conv window of 3, so the window comes from the prompt alone), a chunk of 3, then
# 4 single positions
CUTS = (0, 5, 8, 9, 10, 11, 12)
FP32_ATOL = 1e-5
# bf16 keeps 8 significant bits: one rounding moves a value by up to 2^-8 = 0.4%. The full forward and the cached
# pieces round at different places (SDPA with a mask vs is_causal, F.conv1d in bf16 vs the fp32 update, the chunked
# scan vs single steps), which moved the logits by at most 0.51% of the largest logit (30 seeds of these models on
# torch, 4 on triton; 0.50% for the seed below; reference, which upcasts everything, 1e-7). 1% of the largest logit
# is twice that, and half of what decoding positions one behind in the KV cache's RoPE do to the hybrid (2.2%; 6.6%
# in the Transformer). A bug that moves the logits by less (a dropped SSM state: 0.03%) only fp32 catches.
BF16_RELATIVE_ATOL = 1e-2


def backend_params():
    for backend in ("torch", "triton", "reference"):
        marks = []
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            marks = [pytest.mark.skip(reason="triton is not installed")]
        elif backend == "triton" and not triton_interpreting():
            # tests/conftest.py turns the interpreter on only where there is no CUDA
            marks = [pytest.mark.skip(reason="these CPU tensors need Triton's interpreter (TRITON_INTERPRET=1)")]
        yield pytest.param(backend, marks=marks, id=backend)


def tiny_model(backbone: str, backend: str):
    torch.manual_seed(0)
    # init_std 0.1: attention far from uniform and Mamba outputs of order one, so that a wrong position in the
    # cache shows in the logits instead of vanishing in near-constant activations
    cfg = ModelConfig(**BACKBONES[backbone], mlp_hidden=64, init_std=0.1)
    model = build_model(cfg, kernels={op: backend for op in ("attention", "selective_scan", "causal_conv1d", "ssd")})
    return model.eval()


def full_and_cached_logits(model, tokens, *, bf16: bool):
    """(logits of one forward over tokens, the same positions' logits from one cache fed piece by piece, the cache)."""
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), precision:
        full = model.objective.logits(model, tokens)
        cache = model.backbone.new_cache(tokens.shape[0], tokens.shape[1])  # bf16 under autocast
        pieces = [model.objective.logits(model, tokens[:, a:b], cache=cache) for a, b in itertools.pairwise(CUTS)]
    return full, torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", list(backend_params()))
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_cached_decoding_equals_full_forward(backbone, backend, precision):
    model = tiny_model(backbone, backend)
    tokens = torch.randint(0, 256, (BATCH, CUTS[-1]), generator=torch.Generator().manual_seed(1))
    full, cached, cache = full_and_cached_logits(model, tokens, bf16=precision == "bf16")
    scale = full.abs().max().item()
    assert scale > 1.0  # logits of order one: the tolerances below are far under the values compared
    atol = FP32_ATOL if precision == "fp32" else BF16_RELATIVE_ATOL * scale
    torch.testing.assert_close(cached, full, rtol=0, atol=atol,
                               msg=lambda m: f"{backbone} on {backend} in {precision}: cached decoding differs "
                                             f"from the full forward: {m}")
    assert [layer.length for layer in cache] == [CUTS[-1]] * len(cache)
