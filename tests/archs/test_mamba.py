"""Mamba backbone: the published init, causality and bidirectionality, decoding equivalence, FLOP and
parameter counts, config validation, kernel choices, training through the Trainer."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.layers.mamba import MambaMixer, MambaSettings
from archlab.archs.registry import build_model
from archlab.train.config import load_config
from archlab.train.errors import ConfigError
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer, parameter_groups

from ..train.conftest import TINY

# d=32, E=64, N=4, R=ceil(32/16)=2, width 4: small enough for the float32 reference kernels
SMALL = dict(layers="mamba", d_model=32, n_layers=2)


def mamba_config(**overrides) -> ModelConfig:
    """SMALL with overrides; Mamba settings (d_state, dt_min, ...) go to model.mamba."""
    mamba = {"d_state": 4} | {key: overrides.pop(key) for key in list(overrides) if key in MambaSettings.model_fields}
    return ModelConfig(**(SMALL | {"mamba": mamba} | overrides))


def mamba_mixer(*, causal: bool = True) -> MambaMixer:
    return MambaMixer(32, mamba_config().mixer_settings("mamba"), causal=causal)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_model(mamba_config(**overrides))


def test_published_init():
    cfg = mamba_config(d_model=64, n_layers=4, dt_min=0.002, dt_max=0.05)
    torch.manual_seed(0)
    block = ResidualStack(cfg).blocks[0]
    ssm = block.mixer.ssm
    torch.testing.assert_close(ssm.A(), -torch.arange(1.0, 5.0).expand(128, 4), rtol=1e-6, atol=0)  # S4D-real
    assert torch.equal(ssm.D, torch.ones(128))
    dt = F.softplus(ssm.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert dt.max() / dt.min() > 5  # log-uniform: spread over the range, not one value
    bound = 4 ** -0.5  # R = ceil(64 / 16)
    assert ssm.dt_proj.weight.abs().max() <= bound and ssm.dt_proj.weight.abs().max() > 0.9 * bound
    # residual-writing out_proj scaled by 1/sqrt(n_layers), the other projections normal(init_std)
    assert block.mixer.out_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert block.mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert ssm.x_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_dt_floor_applies():
    torch.manual_seed(0)
    ssm = ResidualStack(mamba_config(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)).blocks[0].mixer.ssm
    torch.testing.assert_close(F.softplus(ssm.dt_proj.bias), torch.full((64,), 1e-3), rtol=1e-4, atol=0)


def test_no_weight_decay_on_A_log_D_and_dt_bias():
    model = tiny_model()
    decay, no_decay = (set(map(id, group["params"])) for group in parameter_groups(model, 0.1, False))
    ssm = model.backbone.blocks[0].mixer.ssm
    for param in (ssm.A_log, ssm.D, ssm.dt_proj.bias, ssm.conv_bias):
        assert id(param) in no_decay
    for param in (ssm.x_proj.weight, ssm.dt_proj.weight, ssm.conv_weight):
        assert id(param) in decay


def test_parameter_count_by_hand():
    # per layer: norm 32, in_proj 32x128, conv 64x4 + 64, x_proj 64x10, dt_proj 2x64 + 64, A_log 64x4, D 64,
    # out_proj 64x32
    per_layer = 32 + 4096 + 320 + 640 + 192 + 256 + 64 + 2048
    assert tiny_model().num_parameters() == 256 * 32 + 2 * per_layer + 32 == 23520
    torch.manual_seed(0)
    bidirectional = ResidualStack(mamba_config(), causal=False)
    direction = 320 + 640 + 192 + 256 + 64
    assert sum(p.numel() for p in bidirectional.parameters()) == 2 * (per_layer + direction) + 32


def test_flops_per_token_by_hand():
    in_proj, out_proj = 2 * 32 * 128, 2 * 64 * 32
    direction = 2 * 64 * 4 + 2 * 64 * (2 + 8) + 2 * 2 * 64 + 9 * 64 * 4  # conv, x_proj, dt_proj, scan = 4352
    model = tiny_model()
    assert model.backbone.flops_per_token(10, causal=True) == 2 * (in_proj + out_proj + direction) == 33280
    assert model.flops_per_token(10) == 33280 + 2 * 32 * 256  # + the head
    torch.manual_seed(0)
    bidirectional = ResidualStack(mamba_config(), causal=False)
    assert bidirectional.flops_per_token(10, causal=False) == 2 * (in_proj + out_proj + 2 * direction) == 41984


@pytest.mark.parametrize("causal", [True, False])
def test_future_tokens_reach_earlier_outputs_only_when_bidirectional(causal):
    torch.manual_seed(0)
    backbone = ResidualStack(mamba_config(init_std=0.2), causal=causal)
    x = torch.randn(2, 9, 32)
    changed = x.clone()
    changed[:, 6] += 1.0
    before, after = backbone(x, causal=causal), backbone(changed, causal=causal)
    assert before.shape == (2, 9, 32)
    assert torch.equal(before[:, :6], after[:, :6]) == causal
    assert not torch.allclose(before[:, 6:], after[:, 6:])
    has_reversed = [block.mixer.ssm_reversed is not None for block in backbone.blocks]
    assert has_reversed == [not causal] * 2
    assert any("ssm_reversed" in name for name in backbone.state_dict()) == (not causal)


def test_bidirectional_is_the_average_of_two_causal_mixers_one_on_the_reversed_sequence():
    """Checked from outside: two causal mixers sharing in/out_proj, one with the reversed direction's weights
    and run on the flipped sequence (its output flipped back); out_proj is linear, so averaging after it is
    the same as before it."""
    torch.manual_seed(0)
    mixer = mamba_mixer(causal=False)
    forward_only, backward_only = mamba_mixer(), mamba_mixer()
    for causal_mixer, ssm in ((forward_only, mixer.ssm), (backward_only, mixer.ssm_reversed)):
        causal_mixer.in_proj, causal_mixer.out_proj, causal_mixer.ssm = mixer.in_proj, mixer.out_proj, ssm
    u = torch.randn(2, 7, 32)
    expected = (forward_only(u, causal=True) + backward_only(u.flip(1), causal=True).flip(1)) / 2
    torch.testing.assert_close(mixer(u, causal=False), expected)
    # the reversed direction really reads the sequence backwards: its last output depends on the first input
    changed = u.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(backward_only(u.flip(1), causal=True)[:, -1],
                              backward_only(changed.flip(1), causal=True)[:, -1])


def test_running_with_the_other_causal_flag_is_an_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="built causal but is called with causal=False"):
        ResidualStack(mamba_config())(torch.randn(1, 3, 32), causal=False)
    bidirectional = ResidualStack(mamba_config(), causal=False)
    with pytest.raises(ValueError, match="built bidirectional but is called with causal=True"):
        bidirectional(torch.randn(1, 3, 32), causal=True)
    with pytest.raises(ValueError, match="a bidirectional Mamba cannot decode"):
        bidirectional.new_cache(1, 8)


@pytest.mark.parametrize("prefill", [2, 5])
def test_prefill_then_steps_equal_the_full_sequence(prefill):
    """A prompt shorter (2) and longer (5) than the conv window, then a chunk of 3 and single positions."""
    torch.manual_seed(0)
    mixer = mamba_mixer()  # PyTorch's default Linear init: outputs of order 1
    u = torch.randn(2, 12, 32)
    full = mixer(u, causal=True)
    state = mixer.new_state(2, 12, dtype=torch.float32, device="cpu")
    cuts = [0, prefill, prefill + 3, *range(prefill + 4, 13)]
    cached = torch.cat([mixer(u[:, a:b], causal=True, state=state) for a, b in itertools.pairwise(cuts)], dim=1)
    assert state.length == 12 and state.ssm_state.dtype == torch.float32
    assert full.abs().mean() > 0.01  # the tolerance below is far under the values compared
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_state_for_another_batch_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="made for batch 1 but got 2; make a new cache"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.backbone.new_cache(1, 4))


def test_new_cache_follows_autocast_dtype():
    model = tiny_model()
    assert model.backbone.new_cache(1, 4)[0].conv_state.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.backbone.new_cache(1, 4)[0]
    assert state.conv_state.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32


@pytest.mark.parametrize("context_len", [None, 6])
def test_greedy_sample_with_state_is_argmax_of_full_recompute(context_len):
    """As for the Transformer: with a window, the context of byte q restarts at q - window // 2 when full."""
    model = tiny_model(init_std=0.1)  # larger weights: distinct argmaxes, no near-ties
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model.objective.sample(model, prompt, 8, temperature=0, context_len=context_len)
    assert torch.equal(out, model.objective.sample(model, prompt, 8, top_k=1, context_len=context_len))
    window, start = context_len or 13, 0
    with torch.no_grad():
        for q in range(5, 13):
            if q - start > window:
                start = q - window // 2
            expected = model.objective.logits(model, out[:, start:q])[:, -1].argmax(-1)
            assert torch.equal(out[:, q], expected), q


def test_build_model_kernel_choices():
    cfg = mamba_config()
    torch.manual_seed(0)
    chosen = build_model(cfg, kernels={"selective_scan": "reference", "causal_conv1d": "reference"})
    torch.manual_seed(0)
    default = build_model(cfg)
    tokens = torch.randint(0, 256, (2, 7))
    torch.testing.assert_close(chosen(tokens), default(tokens))
    assert chosen.backbone.blocks[0].mixer.ssm.scan_backend == "reference"
    assert default.backbone.blocks[0].mixer.ssm.conv_backend == "auto"
    with pytest.raises(ValueError, match="unknown backend 'fast' for selective_scan"):
        build_model(cfg, kernels={"selective_scan": "fast"})
    with pytest.raises(ValueError, match="unknown op 'scan'"):
        build_model(cfg, kernels={"scan": "torch"})


@pytest.mark.parametrize("overrides,message", [
    (dict(d_conv=5), "less than or equal to 4"),
    (dict(d_conv=1), "greater than or equal to 2"),
    (dict(dt_min=0.2), "mamba.dt_min=0.2 must not exceed model.mamba.dt_max=0.1"),
    (dict(mamba=dict(d_stat=8)), "unknown key model.mamba.d_stat; did you mean model.mamba.d_state"),
    (dict(attention=dict(n_heads=4)), "no layer uses attention"),
    (dict(layers="mamba*3"), "model.n_layers=2 disagrees with model.layers 'mamba\\*3'"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValidationError, match=message):
        mamba_config(**overrides)


@pytest.mark.parametrize("old,message", [
    (dict(backbone="mamba", attn_layers=[0]), "attn_layers is for backbone=hybrid, not mamba"),
    (dict(backbone="transformer", n_heads=4, attn_layers=[]), "attn_layers is for backbone=hybrid"),
    (dict(backbone="mamba", layers="mamba"), "old form of model.layers; give model.layers alone"),
])
def test_old_format_errors(old, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**old)


def test_old_format_reads_as_today(capsys, monkeypatch):
    monkeypatch.setattr("archlab.archs.config_migration._said", set())  # the note is said once per process
    old = ModelConfig(backbone="mamba", d_model=32, n_layers=2, d_state=4, n_heads=2)
    assert old == mamba_config()
    assert "n_heads (settings of a mixer no layer uses)" in capsys.readouterr().err


def test_attention_checks_do_not_apply_to_mamba():
    assert mamba_config(d_model=30).d_model == 30  # the default 4 heads do not divide 30: no attention here
    config = load_config(TINY, ["model.layers=mamba", "model.d_model=24", "kernels.attention=triton"])
    assert config.kernels.attention == "triton"  # head dim 12 would be refused for a Transformer
    with pytest.raises(ConfigError, match="kernels.selective_scan: input should be"):
        load_config(TINY, ["model.layers=mamba", "kernels.selective_scan=fast"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="peer runs on CUDA")
def test_trainer_names_the_kernel_key_that_cannot_run(tmp_path):
    config = load_config(TINY, [f"run.dir={tmp_path}", "model.layers=mamba", "kernels.causal_conv1d=peer"])
    with pytest.raises(ConfigError, match="kernels.causal_conv1d: the 'peer' backend"):
        Trainer(config)
    # a backend for an op the model never runs is not checked against the device
    Trainer(load_config(TINY, [f"run.dir={tmp_path / 'run'}", "model.layers=mamba", "kernels.attention=peer"]))


def test_trainer_run_lowers_the_loss(tmp_path):
    overrides = [f"run.dir={tmp_path}", "model.layers=mamba", "model.n_layers=1", "model.mamba.d_state=4",
                 "train.max_steps=8", "train.warmup_steps=2", "train.lr=1e-2", "train.eval_tokens=256"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    assert trainer.flops_per_step == 3 * trainer.model.flops_per_token(32) * 8 * 32
