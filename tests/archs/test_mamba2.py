"""Mamba-2 mixer: mamba_ssm's init, the gated norm, causality and bidirectionality, decoding, FLOP and parameter
counts, config validation, torch.compile, training through the Trainer. tests/archs/test_mixers.py adds the shared
mixer checks and tests/archs/test_cached_decoding.py the logits-level decoding check on every backend."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.layers.mamba2 import Mamba2Mixer, Mamba2Settings
from archlab.archs.registry import build_model
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer, parameter_groups

from ..train.conftest import TINY

# d 32, E 64, head_dim 16: H 4 heads, N 8, one group, width 4
SMALL = dict(layers="mamba2", d_model=32, n_layers=2)


def mamba2_config(**overrides) -> ModelConfig:
    """SMALL with overrides; Mamba-2 settings (head_dim, d_state, ...) go to model.mamba2."""
    settings = {"d_state": 8, "head_dim": 16} | {key: overrides.pop(key) for key in list(overrides)
                                                  if key in Mamba2Settings.model_fields}
    return ModelConfig(**(SMALL | {"mamba2": settings} | overrides))


def mamba2_mixer(*, causal: bool = True, **settings) -> Mamba2Mixer:
    return Mamba2Mixer(32, mamba2_config(**settings).mixer_settings("mamba2"), causal=causal)


def test_published_init():
    torch.manual_seed(0)
    cfg = mamba2_config(d_model=64, n_layers=4, dt_min=0.002, dt_max=0.05, head_dim=4)  # 32 heads
    block = ResidualStack(cfg).blocks[0]
    mixer, ssd = block.mixer, block.mixer.ssd
    A = -ssd.A()
    assert A.shape == (32,) and A.min() >= 1 and A.max() <= 16 and A.max() - A.min() > 8  # uniform in [1, 16]
    dt = F.softplus(ssd.dt_bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5) and dt.max() / dt.min() > 5
    assert torch.equal(ssd.D, torch.ones(32)) and torch.equal(mixer.norm.weight, torch.ones(128))
    bound = 4 ** -0.5  # conv: uniform(+-1/sqrt(width)), as nn.Conv1d
    assert ssd.conv_weight.abs().max() <= bound and ssd.conv_weight.abs().max() > 0.9 * bound
    # residual-writing out_proj scaled by 1/sqrt(n_layers), in_proj normal(init_std)
    assert mixer.out_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    torch.manual_seed(0)
    floored = ResidualStack(mamba2_config(dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)).blocks[0].mixer.ssd
    torch.testing.assert_close(F.softplus(floored.dt_bias), torch.full((4,), 1e-3), rtol=1e-4, atol=0)


def test_no_weight_decay_on_A_log_D_and_dt_bias():
    torch.manual_seed(0)
    model = build_model(mamba2_config(D_has_hdim=True))
    decay, no_decay = (set(map(id, group["params"])) for group in parameter_groups(model, 0.1, False))
    mixer = model.backbone.blocks[0].mixer
    for param in (mixer.ssd.A_log, mixer.ssd.D, mixer.ssd.dt_bias, mixer.ssd.conv_bias, mixer.norm.weight):
        assert id(param) in no_decay
    for param in (mixer.in_proj.weight, mixer.out_proj.weight, mixer.ssd.conv_weight):
        assert id(param) in decay


def test_parameter_count_by_hand():
    # per layer: norm 32, in_proj 32 x (z 64 + xBC 80 + dt 4), conv 80 x 4 + 80, dt_bias + A_log + D 3 x 4,
    # gated norm 64, out_proj 64 x 32
    per_layer = 32 + 32 * 148 + 400 + 12 + 64 + 2048
    torch.manual_seed(0)
    assert build_model(mamba2_config()).num_parameters() == 256 * 32 + 2 * per_layer + 32 == 22808
    bidirectional = ResidualStack(mamba2_config(), causal=False)
    assert sum(p.numel() for p in bidirectional.parameters()) == 2 * (per_layer + 400 + 12) + 32


def test_flops_per_token_by_hand():
    in_proj, out_proj, conv = 2 * 32 * 148, 2 * 64 * 32, 2 * 80 * 4
    # the chunked SSD at seq_len 10 (one chunk of 10): C B^T and the within-chunk mixing over (10 + 1) / 2
    # positions, 2 FLOPs each: (10 + 1) (G N + E); chunk states and their read-out 2 E N each
    ssd = (10 + 1) * (8 + 64) + 4 * 64 * 8
    torch.manual_seed(0)
    model = build_model(mamba2_config())
    assert model.backbone.flops_per_token(10, causal=True) == 2 * (in_proj + out_proj + conv + ssd) == 34096
    # chunks of 4 at seq_len 10: the within-chunk term counts 4 + 1
    short_chunks = build_model(mamba2_config(chunk_size=4)).backbone
    assert short_chunks.flops_per_token(10, causal=True) == 34096 - 2 * 6 * 72
    bidirectional = ResidualStack(mamba2_config(), causal=False)
    assert bidirectional.flops_per_token(10, causal=False) == 2 * (in_proj + out_proj + 2 * (conv + ssd))


def test_state_bytes_are_fixed_size():
    mixer = mamba2_mixer()
    conv, ssm = 2 * 80 * 3 * 2, 2 * 4 * 16 * 8 * 4  # bf16 conv window (width - 1), float32 (H, P, N) state
    assert mixer.state_bytes(2, 10) == mixer.state_bytes(2, 1000) == conv + ssm


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_gated_norm_is_mamba_ssm_rmsnorm_gated(norm_before_gate, groups):
    """Each group's E / G channels normalised on their own; the gate silu(z) before (mamba_ssm's default) or after."""
    torch.manual_seed(0)
    mixer = mamba2_mixer(n_groups=groups, norm_before_gate=norm_before_gate)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
    y, z = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    gated = y * F.silu(z) if not norm_before_gate else y
    size = 64 // groups
    pieces = [gated[..., g * size:(g + 1) * size] for g in range(groups)]
    normed = torch.cat([p / torch.sqrt(p.pow(2).mean(-1, keepdim=True) + 1e-5) for p in pieces], dim=-1)
    want = normed * mixer.norm.weight * (F.silu(z) if norm_before_gate else 1)
    torch.testing.assert_close(mixer._gated_norm(y, z), want)


def test_without_the_norm_the_ssd_gates_with_silu_z():
    torch.manual_seed(0)
    mixer = mamba2_mixer(rmsnorm=False)
    assert mixer.norm is None
    u = torch.randn(2, 6, 32)
    z, xBC, dt = mixer.in_proj(u).split([64, 80, 4], dim=-1)
    ungated = mixer.ssd(xBC, dt, None)
    want = mixer.out_proj(ungated.flatten(2) * F.silu(z))
    torch.testing.assert_close(mixer(u, causal=True), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_future_tokens_reach_earlier_outputs_only_when_bidirectional(causal):
    torch.manual_seed(0)
    backbone = ResidualStack(mamba2_config(init_std=0.2), causal=causal)
    x = torch.randn(2, 9, 32)
    changed = x.clone()
    changed[:, 6] += 1.0
    before, after = backbone(x, causal=causal), backbone(changed, causal=causal)
    assert torch.equal(before[:, :6], after[:, :6]) == causal
    assert not torch.allclose(before[:, 6:], after[:, 6:])
    assert any("ssd_reversed" in name for name in backbone.state_dict()) == (not causal)


def test_bidirectional_averages_the_directions_before_the_gated_norm():
    """Checked from outside: the causal mixer's pieces with each direction's weights, the reversed one on the
    flipped sequence, averaged, then the shared gated norm and out_proj."""
    torch.manual_seed(0)
    mixer = mamba2_mixer(causal=False)
    u = torch.randn(2, 7, 32)
    z, xBC, dt = mixer.in_proj(u).split([64, 80, 4], dim=-1)
    forward = mixer.ssd(xBC, dt, None)
    backward = mixer.ssd_reversed(xBC.flip(1), dt.flip(1), None).flip(1)
    want = mixer.out_proj(mixer._gated_norm(((forward + backward) / 2).flatten(2), z))
    torch.testing.assert_close(mixer(u, causal=False), want)
    changed = u.clone()
    changed[:, 6] += 1.0  # the reversed direction's first output reads the last input
    _, xBC_changed, dt_changed = mixer.in_proj(changed).split([64, 80, 4], dim=-1)
    backward_changed = mixer.ssd_reversed(xBC_changed.flip(1), dt_changed.flip(1), None).flip(1)
    assert not torch.allclose(backward_changed[:, 0], backward[:, 0])


def test_running_with_the_other_causal_flag_is_an_error():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="Mamba-2 layer was built causal but is called with causal=False"):
        ResidualStack(mamba2_config())(torch.randn(1, 3, 32), causal=False)
    bidirectional = ResidualStack(mamba2_config(), causal=False)
    with pytest.raises(ValueError, match="built bidirectional but is called with causal=True"):
        bidirectional(torch.randn(1, 3, 32), causal=True)
    with pytest.raises(ValueError, match="a bidirectional Mamba-2 cannot decode"):
        bidirectional.new_cache(1, 8)


@pytest.mark.parametrize("settings", [dict(), dict(rmsnorm=False, D_has_hdim=True, n_groups=2, chunk_size=2),
                                      dict(norm_before_gate=True, d_conv=2, dt_limit=(0.05, 0.3))])
@pytest.mark.parametrize("prefill", [2, 5])
def test_prefill_then_steps_equal_the_full_sequence(prefill, settings):
    """A prompt shorter (2) and longer (5) than the conv window, then a chunk of 3 and single positions."""
    torch.manual_seed(0)
    mixer = mamba2_mixer(dt_min=0.1, dt_max=0.5, **settings)  # PyTorch's default Linear init: outputs of order 1
    u = torch.randn(2, 12, 32)
    full = mixer(u, causal=True)
    state = mixer.new_state(2, 12, dtype=torch.float32, device="cpu")
    cuts = [0, prefill, prefill + 3, *range(prefill + 4, 13)]
    cached = torch.cat([mixer(u[:, a:b], causal=True, state=state) for a, b in itertools.pairwise(cuts)], dim=1)
    assert state.length == 12 and state.ssm_state.dtype == torch.float32
    assert full.abs().mean() > 0.01  # the tolerance below is far under the values compared
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


def test_state_for_another_batch_is_an_error():
    torch.manual_seed(0)
    model = build_model(mamba2_config())
    with pytest.raises(ValueError, match="Mamba-2 state was made for batch 1 but got 2; make a new cache"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=model.backbone.new_cache(1, 4))


@pytest.mark.parametrize("overrides,message", [
    (dict(head_dim=48), "model.mamba2.head_dim=48 does not divide the inner width expand \\* d_model = 64"),
    (dict(n_groups=3), "model.mamba2.n_groups=3 does not divide the 4 heads"),
    (dict(chunk_size=48), "model.mamba2.chunk_size=48 must be a power of two"),
    (dict(A_init_range=(0.0, 4.0)), "A_init_range \\[0.0, 4.0\\] must be \\[min, max\\] with 0 < min <= max"),
    (dict(dt_min=0.2), "model.mamba2.dt_min=0.2 must not exceed model.mamba2.dt_max=0.1"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit \\[0.5, 0.1\\] must be \\[min, max\\]"),
    (dict(d_conv=5), "less than or equal to 4"),
    (dict(mamba2=dict(d_stat=8)), "unknown key model.mamba2.d_stat; did you mean model.mamba2.d_state"),
])
def test_config_errors(overrides, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        mamba2_config(**overrides)


def test_a_study_solving_d_model_steps_by_whole_heads_and_groups():
    assert mamba2_config().d_model_multiple() == 8  # expand 2 * d_model a multiple of head_dim 16
    assert mamba2_config(n_groups=2, head_dim=16, expand=3).d_model_multiple() == 32
    assert mamba2_config(layers="mamba2,attention", attention=dict(n_heads=4)).d_model_multiple() == 8


def test_a_jepa_predictor_at_half_width_keeps_the_heads():
    cfg = ModelConfig(layers="mamba2", d_model=32, n_layers=2, objective="jepa", mamba2=dict(head_dim=16))
    torch.manual_seed(0)
    predictor = build_model(cfg).objective.predictor.backbone.blocks[0].mixer
    assert (predictor.heads, predictor.cfg.head_dim, predictor.d_inner) == (4, 8, 32)


@pytest.mark.slow
def test_torch_compile_matches_eager():
    """Inductor traces the whole mixer (conv, the chunked SSD, the gated norm) without a graph break; forward and
    every gradient equal eager."""
    torch.manual_seed(0)
    mixer = mamba2_mixer(n_groups=2, dt_min=0.1, dt_max=0.5)
    u = torch.randn(2, 10, 32, requires_grad=True)
    eager = mixer(u, causal=True)
    eager.square().sum().backward()
    want = {name: p.grad.clone() for name, p in mixer.named_parameters()} | {"u": u.grad.clone()}
    mixer.zero_grad()
    u.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: mixer(x, causal=True), fullgraph=True)(u)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for name, p in [*mixer.named_parameters(), ("u", u)]:
        torch.testing.assert_close(p.grad, want[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


def test_trainer_run_from_the_quickstart_pattern_lowers_the_loss(tmp_path):
    overrides = [f"run.dir={tmp_path}", "model.layers=mamba2*2", "model.mamba2.d_state=8",
                 "model.mamba2.head_dim=16", "train.max_steps=8", "train.warmup_steps=2", "train.lr=1e-2",
                 "train.eval_tokens=256"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.3, losses
    assert trainer.flops_per_step == 3 * trainer.model.flops_per_token(32) * 8 * 32
