"""The Gated DeltaNet mixer (archs/layers/gated_deltanet.py): fla's layer written out by hand, init, accounting,
bidirectional directions, decoding, config errors, and training under every objective, alone and in hybrids.
The shared mixer checks (causality, decoding, accounting, gradients) run in test_mixers.py."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.layers.gated_deltanet import GatedDeltaNetMixer, GatedDeltaNetSettings
from archlab.archs.registry import build_model
from archlab.kernels.gated_delta.reference import gated_delta_reference, l2norm
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer, parameter_groups

from ..train.conftest import TINY

# d 32; 2 query/key heads of 8 channels, value heads of 16 (expand_v 2); conv width 4
SMALL = dict(layers="gated_deltanet", d_model=32, n_layers=2)


def gdn_config(**overrides) -> ModelConfig:
    """SMALL with overrides; Gated DeltaNet settings (n_heads, head_dim, ...) go to model.gated_deltanet."""
    settings = {"n_heads": 2, "head_dim": 8, "mlp": False} | {
        key: overrides.pop(key) for key in list(overrides) if key in GatedDeltaNetSettings.model_fields}
    return ModelConfig(**(SMALL | {"gated_deltanet": settings} | overrides))


def gdn_mixer(*, causal: bool = True, **settings) -> GatedDeltaNetMixer:
    return GatedDeltaNetMixer(32, gdn_config(**settings).mixer_settings("gated_deltanet"), causal=causal)


def by_hand(mixer: GatedDeltaNetMixer, u: torch.Tensor, direction=None) -> torch.Tensor:
    """fla's GatedDeltaNet.forward written out with plain torch and the sequential reference (one direction)."""
    cfg, direction = mixer.cfg, direction or mixer.delta
    qkv, gate, a, b = mixer.in_proj(u).split(mixer.parts, dim=-1)
    width = cfg.d_conv
    conv = F.conv1d(F.pad(qkv.transpose(1, 2), (width - 1, 0)), direction.conv_weight[:, None],
                    direction.conv_bias, groups=qkv.shape[-1])
    q, k, v = F.silu(conv.transpose(1, 2)).split([direction.key_dim, direction.key_dim, direction.value_dim], -1)
    q, k = (l2norm(t.unflatten(-1, (cfg.n_heads, cfg.head_dim))) for t in (q, k))
    v = v.unflatten(-1, (cfg.value_heads, cfg.value_head_dim))
    beta = torch.sigmoid(b) * (2 if cfg.allow_neg_eigval else 1)
    g = -direction.A_log.exp() * F.softplus(a + direction.dt_bias)
    o, _ = gated_delta_reference(q, k, v, g, beta)
    return o


def gated_output(mixer: GatedDeltaNetMixer, u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """fla's FusedRMSNormGated per value head (norm, weight, then * silu(gate)), then out_proj."""
    gate = mixer.in_proj(u).split(mixer.parts, dim=-1)[1]
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mixer.cfg.norm_eps) * mixer.norm.weight
    if mixer.cfg.use_gate:
        normed = normed * F.silu(gate.unflatten(-1, o.shape[-2:]))
    return mixer.out_proj(normed.flatten(2))


@pytest.mark.parametrize("settings", [dict(), dict(n_v_heads=4, expand_v=1.5, conv_bias=True, d_conv=3),
                                      dict(use_gate=False, allow_neg_eigval=True)])
def test_the_layer_is_fla_gated_deltanet_written_out(settings):
    torch.manual_seed(0)
    mixer = gdn_mixer(dt_min=0.1, dt_max=0.5, **settings)
    with torch.no_grad():
        mixer.norm.weight.uniform_(0.5, 1.5)
    u = torch.randn(2, 9, 32)
    want = gated_output(mixer, u, by_hand(mixer, u))
    torch.testing.assert_close(mixer(u, causal=True), want, rtol=1e-4, atol=1e-5)


def test_published_init():
    torch.manual_seed(0)
    cfg = gdn_config(d_model=64, n_layers=4, dt_min=0.002, dt_max=0.05, n_heads=4, n_v_heads=32)
    mixer = ResidualStack(cfg).blocks[0].mixer
    A = mixer.delta.A_log.exp()
    assert A.shape == (32,) and A.min() >= 0 and A.max() <= 16 and A.max() - A.min() > 8  # uniform in [0, 16]
    dt = F.softplus(mixer.delta.dt_bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5) and dt.max() / dt.min() > 5
    assert mixer.delta.conv_bias is None and torch.equal(mixer.norm.weight, torch.ones(16))
    bound = 4 ** -0.5  # conv: uniform(+-1/sqrt(width)), as nn.Conv1d
    assert mixer.delta.conv_weight.abs().max() <= bound and mixer.delta.conv_weight.abs().max() > 0.9 * bound
    assert mixer.out_proj.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)  # 1/sqrt(n_layers)
    model = build_model(gdn_config(conv_bias=True))
    decay, no_decay = (set(map(id, group["params"])) for group in parameter_groups(model, 0.1, False))
    delta = model.backbone.blocks[0].mixer.delta
    assert {id(delta.A_log), id(delta.dt_bias), id(delta.conv_bias)} <= no_decay
    assert id(delta.conv_weight) in decay


def test_parameter_count_flops_and_state_bytes_by_hand():
    # per layer: norm 32, in_proj 32 x (q 16 + k 16 + v 32 + gate 32 + a 2 + b 2), conv 64 x 4, A_log + dt_bias
    # 2 x 2, output norm 16, out_proj 32 x 32
    per_layer = 32 + 32 * 100 + 256 + 4 + 16 + 1024
    torch.manual_seed(0)
    model = build_model(gdn_config())
    assert model.num_parameters() == 256 * 32 + 2 * per_layer + 32
    bidirectional = ResidualStack(gdn_config(), causal=False)
    assert sum(p.numel() for p in bidirectional.parameters()) == 2 * (per_layer + 256 + 4) + 32
    # seq_len 10 (one chunk of 10): (10 + 1) (3 K + 2 V) within the chunk and 6 K V with the state, per value head
    delta = 2 * ((10 + 1) * (3 * 8 + 2 * 16) + 6 * 8 * 16)
    in_out, conv = 2 * 32 * 100 + 2 * 32 * 32, 2 * 64 * 4
    assert model.backbone.flops_per_token(10, causal=True) == 2 * (in_out + conv + delta)
    assert bidirectional.flops_per_token(10, causal=False) == 2 * (in_out + 2 * (conv + delta))
    mixer = gdn_mixer()
    conv_window, state = 2 * 64 * 3 * 2, 2 * 2 * 8 * 16 * 4  # bf16 (width - 1) conv window, float32 (HV, K, V)
    assert mixer.state_bytes(2, 10) == mixer.state_bytes(2, 1000) == conv_window + state


def test_bidirectional_averages_the_directions_before_the_gated_norm():
    torch.manual_seed(0)
    mixer = gdn_mixer(causal=False, dt_min=0.1, dt_max=0.5)
    u = torch.randn(2, 7, 32)
    forward = by_hand(mixer, u)
    backward = by_hand(mixer, u.flip(1), mixer.delta_reversed).flip(1)
    torch.testing.assert_close(mixer(u, causal=False), gated_output(mixer, u, (forward + backward) / 2),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="Gated DeltaNet layer was built bidirectional but is called with causal"):
        mixer(u, causal=True)
    with pytest.raises(ValueError, match="a bidirectional Gated DeltaNet cannot decode"):
        mixer.new_state(1, 8, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("settings", [dict(n_v_heads=4, d_conv=2), dict(use_gate=False, allow_neg_eigval=True)])
def test_prefill_then_steps_equal_the_full_sequence(settings):
    """A prompt longer than the conv window, a chunk of 3, then single positions; grouped value heads too."""
    torch.manual_seed(0)
    mixer = gdn_mixer(dt_min=0.1, dt_max=0.5, **settings)
    u = torch.randn(2, 12, 32)
    full = mixer(u, causal=True)
    state = mixer.new_state(2, 12, dtype=torch.float32, device="cpu")
    cuts = [0, 5, 8, *range(9, 13)]
    cached = torch.cat([mixer(u[:, a:b], causal=True, state=state) for a, b in itertools.pairwise(cuts)], dim=1)
    assert state.length == 12 and state.delta_state.dtype == torch.float32
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Gated DeltaNet state was made for batch 2 but got 1; make a new cache"):
        mixer(u[:1, :1], causal=True, state=state)


@pytest.mark.parametrize("overrides,message", [
    (dict(n_v_heads=3), "model.gated_deltanet.n_v_heads=3 must be a multiple of model.gated_deltanet.n_heads=2"),
    (dict(expand_v=1.3), "head_dim \\* expand_v = 10.4 must be a whole number"),
    (dict(A_init_range=(4.0, 1.0)), "A_init_range \\[4.0, 1.0\\] must be \\[min, max\\] with 0 <= min < max"),
    (dict(dt_min=0.2), "model.gated_deltanet.dt_min=0.2 must not exceed model.gated_deltanet.dt_max=0.1"),
    (dict(d_conv=5), "less than or equal to 4"),
    (dict(gated_deltanet=dict(head_dims=8)), "unknown key model.gated_deltanet.head_dims; did you mean "
                                             "model.gated_deltanet.head_dim"),
])
def test_config_errors(overrides, message):
    with pytest.raises((ValidationError, ValueError), match=message):
        gdn_config(**overrides)


def test_a_jepa_predictor_at_half_width_keeps_the_heads():
    cfg = ModelConfig(layers="gated_deltanet", d_model=32, n_layers=2, objective="jepa",
                      gated_deltanet=dict(n_heads=2, head_dim=8))
    torch.manual_seed(0)
    predictor = build_model(cfg).objective.predictor.backbone.blocks[0].mixer
    assert (predictor.cfg.n_heads, predictor.cfg.head_dim, predictor.delta.value_dim) == (2, 4, 16)


@pytest.mark.parametrize("layers,objective", [
    ("gated_deltanet*2", "autoregressive"),
    ("gated_deltanet,attention", "masked_diffusion"),
    ("gated_deltanet,mamba2", "jepa"),
])
def test_trains_from_config_alone_and_in_hybrids_under_each_objective(tmp_path, layers, objective):
    overrides = [f"run.dir={tmp_path}", f"model.layers={layers}", f"model.objective={objective}",
                 "model.gated_deltanet.n_heads=2", "model.gated_deltanet.head_dim=8", "train.max_steps=8",
                 "train.warmup_steps=2", "train.lr=1e-2", "train.eval_tokens=256", "train.eval_every=8"]
    if "mamba2" in layers:
        overrides += ["model.mamba2.d_state=8", "model.mamba2.head_dim=16"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
