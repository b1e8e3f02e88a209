"""Sliding-window attention as a mixer: model.attention.window and the swa mixer, their ring-buffer KV cache, their
accounting and their refusal of bidirectional models (tests/archs/test_cached_decoding.py decodes a windowed stack on
every backend)."""
import itertools

import pytest
import torch

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.layers.attention import Attention, AttentionSettings, SlidingWindowAttention
from archlab.archs.registry import build_model

from .mixer_conformance import check_mixer

D_MODEL = 32


def test_swa_conforms_with_a_window_shorter_than_the_sequence():
    check_mixer("swa", {"window": 3, "n_heads": 2, "n_kv_heads": 1})


def test_a_window_at_least_the_length_is_full_attention():
    torch.manual_seed(0)
    full = Attention(D_MODEL, AttentionSettings(n_heads=2), causal=True)
    x = torch.randn(2, 9, D_MODEL)
    for window in (9, 50):
        windowed = SlidingWindowAttention(D_MODEL, AttentionSettings(n_heads=2, window=window), causal=True)
        windowed.load_state_dict(full.state_dict())
        assert torch.equal(windowed(x, causal=True), full(x, causal=True))
        assert windowed.flops_per_token(9, causal=True) == full.flops_per_token(9, causal=True)
    windowed.window = 8
    assert not torch.equal(windowed(x, causal=True), full(x, causal=True))


@pytest.mark.parametrize("window", [1, 4, 20])
@pytest.mark.parametrize("cuts", [(0, 9, 10, 11, 12, 13), (0, 2, 7, 13), tuple(range(14))],
                         ids=["long-prefill-then-steps", "chunks", "one-by-one"])
def test_ring_buffer_decoding_equals_the_full_forward(cuts, window):
    """Windows of 1 and 4 over 13 positions: a prefill longer than the window, chunks that read the window before them
    back from the ring and wrap around it, and single steps from the start; a window of 20 never fills its ring
    (the cache holds min(window, max_len) positions)."""
    cfg = ModelConfig(layers="attention,swa*2", d_model=D_MODEL, init_std=0.2, swa={"n_heads": 2, "window": window})
    torch.manual_seed(0)
    stack = ResidualStack(cfg, causal=True, kernels={"attention": "torch"})
    x = torch.randn(2, 13, D_MODEL)
    with torch.no_grad():
        full = stack(x, causal=True)
        cache = stack.new_cache(2, 13, dtype=torch.float32)
        pieces = [stack(x[:, a:b], causal=True, cache=cache) for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert [layer.keys.shape[2] for layer in cache] == [13, *[min(window, 13)] * 2]  # full attention keeps all


def test_cache_memory_is_bounded_by_the_window():
    mixer = SlidingWindowAttention(D_MODEL, AttentionSettings(n_heads=2, n_kv_heads=1, window=5), causal=True)
    assert mixer.new_state(3, 1000, dtype=torch.float32, device="cpu").keys.shape == (3, 1, 5, 16)
    assert mixer.new_state(3, 2, dtype=torch.float32, device="cpu").keys.shape == (3, 1, 2, 16)  # min(window, max_len)
    assert mixer.state_bytes(1, 1000) == mixer.state_bytes(1, 5) == 2 * 5 * 16 * 2
    assert mixer.state_bytes(1, 3) == 2 * 3 * 16 * 2
    cache = mixer.new_state(1, 8, dtype=torch.float32, device="cpu")
    mixer(torch.randn(1, 8, D_MODEL), causal=True, state=cache)
    with pytest.raises(ValueError, match="holds 8 positions but 9 are needed"):
        mixer(torch.randn(1, 1, D_MODEL), causal=True, state=cache)


def test_flops_count_the_window_not_the_length():
    mixer = SlidingWindowAttention(D_MODEL, AttentionSettings(n_heads=2, window=4), causal=True)
    projections = 2 * D_MODEL * 3 * D_MODEL + 2 * D_MODEL * D_MODEL  # q, k, v (n_kv_heads = n_heads) and o
    # positions 1..10 see 1, 2, 3, 4, 4, ..., 4 positions: 10 + 6 * 4 = 34 in all, 3.4 on average
    assert mixer.flops_per_token(10, causal=True) == projections + 4 * D_MODEL * 34 // 10
    assert mixer.flops_per_token(4000, causal=True) < mixer.flops_per_token(40, causal=True) + 4 * D_MODEL


@pytest.mark.parametrize("model,message", [
    (dict(objective="masked_diffusion", attention={"window": 64}),
     r"model.attention.window=64: a sliding window is defined for causal attention only here"),
    (dict(objective="masked_diffusion", layers="(attention,swa)*2"), r"model.swa.window=128: a sliding window"),
    (dict(objective="jepa", layers="mamba,swa", jepa={"mode": "masked_span"}), "this model runs bidirectionally"),
    (dict(attention={"window": 0}), r"model.attention.window: input should be greater than or equal to 1"),
    (dict(layers="swa", swa={"window": -2}), r"model.swa.window: input should be greater than or equal to 1"),
])
def test_bad_windows_are_one_line_config_errors(model, message):
    with pytest.raises(ValueError, match=message) as info:
        ModelConfig(**model)
    assert "\n" not in str(info.value).splitlines()[1]  # pydantic's first line is its own header


def test_full_and_windowed_attention_mix_in_one_stack():
    cfg = ModelConfig(layers="(mamba,swa)*2", d_model=D_MODEL, swa={"window": 16})
    assert cfg.layer_mixers == ["mamba", "swa"] * 2 and cfg.mixer_settings("swa").window == 16
    model = build_model(ModelConfig(layers="(attention,swa)", d_model=D_MODEL, swa={"window": 16}))
    windows = [block.mixer.window for block in model.backbone.blocks]
    assert windows == [None, 16]
