"""Hybrid stacks (Mamba blocks with attention blocks): layer layout, mixed decoding state, FLOPs as the sum of its
blocks, validation, training."""
import math

import pytest
import torch
from pydantic import ValidationError

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.layers.attention import Attention, KVCache
from archlab.archs.layers.mamba import MambaMixer, MambaState
from archlab.archs.registry import build_model
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from ..train.conftest import TINY

SMALL = dict(layers="mamba,attention,mamba", d_model=32, mlp_hidden=64, attention=dict(n_heads=2),
             mamba=dict(d_state=4))


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**(SMALL | overrides)))


def test_layer_layout_and_cache_follow_the_pattern():
    model = tiny_model(layers="attention,mamba*2,attention")
    assert [type(b.mixer) for b in model.backbone.blocks] == [Attention, MambaMixer, MambaMixer, Attention]
    assert [b.mlp is not None for b in model.backbone.blocks] == [True, False, False, True]
    cache = model.backbone.new_cache(2, 16)
    assert [type(c) for c in cache] == [KVCache, MambaState, MambaState, KVCache]
    model(torch.randint(0, 256, (2, 5)), cache=cache)
    assert [c.length for c in cache] == [5] * 4


def test_residual_writes_are_scaled_over_the_whole_stack():
    # 3 layers, one of them attention + SwiGLU: 2 + 1 + 1 = 4 residual writes, so 0.02 / 2
    model = tiny_model(d_model=128, attention=dict(n_heads=4), mlp_hidden=None)
    attention, mamba = model.backbone.blocks[1], model.backbone.blocks[0]
    for weight in (attention.mixer.o_proj.weight, attention.mlp.w_down.weight, mamba.mixer.out_proj.weight):
        assert weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert attention.mixer.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_flops_are_the_sum_of_the_blocks():
    model = tiny_model()
    attention_block = 2 * 32 * (32 + 2 * 32) + 2 * 32 * 32 + 3 * 2 * 32 * 64 + 2 * 32 * 11  # causal, seq_len 10
    mamba_block = 2 * 32 * 128 + 2 * 64 * 32 + 2 * 64 * 4 + 2 * 64 * 10 + 2 * 2 * 64 + 9 * 64 * 4
    assert model.backbone.flops_per_token(10, causal=True) == attention_block + 2 * mamba_block == 54464


@pytest.mark.parametrize("causal", [True, False])
def test_future_tokens_reach_earlier_outputs_only_when_bidirectional(causal):
    torch.manual_seed(0)
    backbone = ResidualStack(ModelConfig(**SMALL, init_std=0.2), causal=causal)
    x = torch.randn(2, 8, 32)
    changed = x.clone()
    changed[:, 5] += 1.0
    before, after = backbone(x, causal=causal), backbone(changed, causal=causal)
    assert torch.equal(before[:, :5], after[:, :5]) == causal
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_cached_decoding_equals_full_recompute():
    model = tiny_model(init_std=0.1).eval()
    tokens = torch.randint(0, 256, (2, 10))
    full = model.objective.logits(model, tokens)
    cache = model.backbone.new_cache(2, 10)
    pieces = [tokens[:, :4], tokens[:, 4:7]] + [tokens[:, i:i + 1] for i in range(7, 10)]
    cached = torch.cat([model.objective.logits(model, piece, cache=cache) for piece in pieces], dim=1)
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    prompt = tokens[:, :4]
    out = model.objective.sample(model, prompt, 6, temperature=0, context_len=6)  # rebuilds the cache once
    start = 0
    with torch.no_grad():
        for q in range(4, 10):
            if q - start > 6:
                start = q - 3
            assert torch.equal(out[:, q], model.objective.logits(model, out[:, start:q])[:, -1].argmax(-1)), q


LEGACY = dict(backbone="hybrid", d_model=32, n_layers=3, n_heads=2, mlp_hidden=64, d_state=4)


@pytest.mark.parametrize("attn_layers,message", [
    (None, "backbone=hybrid needs model.attn_layers"),
    ([], "backbone=hybrid needs model.attn_layers"),
    ([3], r"attn_layers \[3\] outside 0..2"),
    ([-1], r"attn_layers \[-1\] outside 0..2"),
    ([1, 1], "repeats an index"),
])
def test_old_attn_layers_validation(attn_layers, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**(LEGACY | {"attn_layers": attn_layers}))


def test_old_hybrid_config_reads_as_a_pattern():
    old = ModelConfig(**(LEGACY | {"attn_layers": [1]}))
    assert old == ModelConfig(**SMALL) and old.layer_mixers == ["mamba", "attention", "mamba"]


def test_attention_checks_apply_to_hybrid():
    with pytest.raises(ValidationError, match="n_heads=3 does not divide model.d_model=32"):
        ModelConfig(**(SMALL | {"attention": {"n_heads": 3}}))


def test_trainer_run_lowers_the_loss(tmp_path):
    overrides = [f"run.dir={tmp_path}", "model.layers=mamba,attention", "model.mamba.d_state=4",
                 "train.max_steps=8", "train.warmup_steps=2", "train.lr=1e-2", "train.eval_tokens=256"]
    Trainer(load_config(TINY, overrides)).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
