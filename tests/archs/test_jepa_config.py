"""JEPA objective: config errors, shipped configs, FLOP accounting, sampling."""
import math

import pytest
import torch
from pydantic import ValidationError

from archlab.archs.config import MASKED_SPAN_SIGREG_WEIGHT, ModelConfig
from archlab.compare.cli import main
from archlab.train.config import load_config
from archlab.train.errors import ConfigError
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from .jepa_helpers import MODES, SMALL, jepa_model, jepa_overrides


# -- 8. config errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (["model.jepa.mode=masked_span", "model.jepa.ar_weight=1.0"], r"jepa.ar_weight > 0 \(next-byte loss\) needs "
                                                                  "mode=next_latent"),
    (["model.jepa.offsets=[1,1]"], r"jepa.offsets \[1, 1\] must be distinct positive integers"),
    (["model.jepa.offsets=[0,2]"], r"jepa.offsets \[0, 2\] must be distinct positive integers"),
    (["model.jepa.offsets=[29]", "model.jepa.pool=4"], r"largest offset \(29\) \+ pool \(4\) exceeds data.seq_len=32"),
    (["model.jepa.offsets=[40]"], r"largest offset \(40\) \+ pool \(1\) exceeds"),
    (["model.jepa.mode=masked_span", "model.jepa.spans=2", "model.jepa.span_length=[4,16]", "sample.tokens=0"],
     "2 spans of up to 16 bytes could hide all of data.seq_len=32"),
    (["model.jepa.predictor_width=10", "model.jepa.predictor_heads=2"],
     "jepa predictor: head dim model.d_model/model.attention.n_heads=5 must be even for RoPE; set "
         "model.jepa.predictor_width"),
    (["model.jepa.predictor_width=10", "model.jepa.predictor_heads=3"],
     "jepa predictor: model.attention.n_heads=3 does not divide model.d_model=10"),
    (["model.causal=false"], "objective jepa needs a causal backbone; set model.causal=true or leave it unset"),
    (["model.jepa.mode=masked_span", "model.causal=true", "sample.tokens=0"], "needs a bidirectional backbone"),
    (["model.jepa.mode=masked_span", "model.jepa.spans=2", "model.jepa.span_length=[2,6]"],
     "objective jepa cannot generate text with these model settings; set sample.tokens=0"),
    (["model.jepa.latent_weight=0"], "jepa.latent_weight and jepa.ar_weight are both 0"),
])
def test_config_errors_are_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(TINY, [f"run.dir={tmp_path}", "model.objective=jepa", *overrides])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("piece,mode,hybrid", [("jepa.yaml", "next_latent", False),
                                               ("jepa-masked.yaml", "masked_span", False),
                                               ("jepa-hybrid.yaml", "next_latent", True)])
def test_shipped_configs_validate(tmp_path, piece, mode, hybrid):
    configs = TINY.parents[2] / "configs"
    config = tmp_path / "run.yaml"
    config.write_text(f"include: [{configs / 'quickstart.yaml'}, {configs / 'objectives' / piece}]\n")
    cfg = load_config(config)
    assert cfg.model.objective == "jepa" and cfg.model.jepa.mode == mode and (cfg.model.jepa.ar_weight > 0) == hybrid
    assert cfg.model.runs_causally == (mode == "next_latent") and (cfg.sample.tokens > 0) == (mode == "next_latent")
    if piece == "jepa.yaml":
        assert load_config(configs / "quickstart-jepa.yaml").model == cfg.model


def test_masked_span_gets_sigreg_unless_the_config_sets_it(tmp_path):
    base = [f"run.dir={tmp_path}", "model.objective=jepa", "sample.tokens=0"]
    masked = load_config(TINY, [*base, "model.jepa.mode=masked_span", "model.jepa.spans=2",
                                "model.jepa.span_length=[2,6]"])
    assert masked.model.jepa.sigreg_weight == MASKED_SPAN_SIGREG_WEIGHT > 0
    assert load_config(TINY, base).model.jepa.sigreg_weight == 0.0  # next_latent keeps none
    explicit = load_config(TINY, [*base, "model.jepa.mode=masked_span", "model.jepa.spans=2",
                                  "model.jepa.span_length=[2,6]", "model.jepa.sigreg_weight=0"])
    assert explicit.model.jepa.sigreg_weight == 0.0
    # the shipped masked piece inherits it too (jepa.yaml no longer pins sigreg_weight to 0)
    configs = TINY.parents[2] / "configs"
    config = tmp_path / "masked.yaml"
    config.write_text(f"include: [{configs / 'quickstart-jepa.yaml'}]\nmodel: {{jepa: {{mode: masked_span}}}}\n"
                      "sample: {tokens: 0}\n")
    assert load_config(config).model.jepa.sigreg_weight == MASKED_SPAN_SIGREG_WEIGHT


def test_runs_saved_before_target_norm_load_as_layernorm_runs(tmp_path, capsys):
    """A checkpoint or run config.yaml without model.jepa.target_norm predates it: it was built with LayerNorm
    targets, not with today's default; eval works on such a run, and resuming it under instance targets is refused."""
    run_dir = tmp_path / "old"
    short = ("train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=2", "train.eval_tokens=256")
    overrides = jepa_overrides(run_dir, {"offsets": [1, 4], "target_norm": "layer"}, "train.max_steps=2", *short)
    Trainer(load_config(TINY, overrides)).train()
    for path in [run_dir / "config.yaml", *run_dir.glob("checkpoints/*/meta.json")]:  # as an older archlab wrote them
        text = path.read_text()
        assert text.count("target_norm") == 1
        path.write_text("\n".join(line for line in text.splitlines() if "target_norm" not in line) + "\n")
    assert load_config(run_dir / "config.yaml", saved=True).model.jepa.target_norm == "layer"
    assert load_config(run_dir / "config.yaml").model.jepa.target_norm == "instance"  # a user config: the default
    assert main_code(capsys, "eval", run_dir) == 0
    today = jepa_overrides(run_dir, {"offsets": [1, 4]}, "train.max_steps=4", "run.resume=true", *short)
    with pytest.raises(ConfigError, match=r"different config \(model.jepa.target_norm"):
        Trainer(load_config(TINY, today))


def test_runs_of_other_objectives_saved_before_target_norm_still_resume(tmp_path):
    """model.jepa only matters to JEPA runs: an autoregressive run saved before target_norm existed is the same
    config today, and resumes."""
    run_dir = tmp_path / "ar"
    settings = [f"run.dir={run_dir}", "train.warmup_steps=1", "train.eval_every=2", "train.checkpoint_every=2",
                "train.eval_tokens=256", "sample.tokens=0", "train.max_steps=4"]
    Trainer(load_config(TINY, settings)).train(until_step=2)
    for path in [run_dir / "config.yaml", *run_dir.glob("checkpoints/*/meta.json")]:
        text = path.read_text()
        path.write_text("\n".join(line for line in text.splitlines() if "target_norm" not in line) + "\n")
    assert load_config(run_dir / "config.yaml", saved=True).model == load_config(TINY, settings).model
    resumed = Trainer(load_config(TINY, [*settings, "run.resume=true"]))
    assert resumed.step == 2 and resumed.train()["bpb"] < 8


def main_code(capsys, *argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        capsys.readouterr()
        return exit_.code
    capsys.readouterr()
    return 0


def test_limits_that_just_fit_are_accepted():
    load_config(TINY, ["model.objective=jepa", "model.jepa.offsets=[28]", "model.jepa.pool=4"])  # 28 + 4 = 32
    load_config(TINY, ["model.objective=jepa", "model.jepa.mode=masked_span", "model.jepa.spans=2",
                       "model.jepa.span_length=[4,15]", "sample.tokens=0"])  # 30 of 32 bytes at most
    model = jepa_model(jepa={"offsets": [28], "pool": 4})
    loss, _ = model.objective.loss(model, torch.randint(0, 256, (2, 33)))  # one position has a target
    assert math.isfinite(loss.item())
    with pytest.raises(ValidationError, match="jepa.span_length"):
        ModelConfig(objective="jepa", jepa={"span_length": [5, 3]})


def test_sample_command_on_a_masked_span_run_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = jepa_overrides(run_dir, MODES["masked_span"], "train.max_steps=2", "train.warmup_steps=1")
    Trainer(load_config(TINY, overrides)).train()
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(run_dir), "--tokens", "8"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "cannot generate text" in err


# -- 9. FLOPs ----------------------------------------------------------------------------------------------------
def transformer_layer_flops(d, heads, kv_heads, mlp_hidden, seq_len, causal):
    """One attention + SwiGLU layer by hand: q,o (2 d^2 each) and k,v (2 d d_kv each), three SwiGLU matmuls,
    and scores + weighted values over the average attended length ((L + 1) / 2 causal, L bidirectional)."""
    d_kv = d // heads * kv_heads
    context = (seq_len + 1) / 2 if causal else seq_len
    return int(2 * d * d * 2 + 2 * d * d_kv * 2 + 3 * 2 * d * mlp_hidden + 2 * 2 * d * context)


@pytest.mark.parametrize("variant", ["ema", "online", "hybrid", "mlp_probe", "masked_ema", "masked_online"])
def test_training_flops_count_every_pass(tmp_path, variant):
    """TINY's model: d = 32, 2 layers, 2 heads, SwiGLU width 128; the predictor: d = 16, 1 layer, 1 head,
    SwiGLU width 64 (8/3 * 16 rounded up to 64); seq_len 32; offsets [1, 4, 16]."""
    jepa = {"ema": {}, "online": {"target_encoder": "online"}, "hybrid": {"ar_weight": 1.0},
            "mlp_probe": {"probe": "mlp"}, "masked_ema": {"mode": "masked_span", "spans": 2, "span_length": [2, 6]},
            "masked_online": {"mode": "masked_span", "spans": 2, "span_length": [2, 6], "target_encoder": "online"}}
    masked = variant.startswith("masked")
    overrides = [f"run.dir={tmp_path}", "model.objective=jepa", *([] if not masked else ["sample.tokens=0"]),
                 *[f"model.jepa.{k}={v}" for k, v in jepa[variant].items()]]
    trainer = Trainer(load_config(TINY, overrides))
    causal = not masked
    encoder = 2 * transformer_layer_flops(32, 2, 2, 128, 32, causal)
    assert encoder == trainer.model.backbone.flops_per_token(32, causal=causal)  # the hand count matches the model's
    predictor = transformer_layer_flops(16, 1, 1, 64, 32, causal) + 2 * 2 * 32 * 16  # + in_proj and out_proj
    head = 2 * 32 * 256 + (2 * 32 * 32 if variant == "mlp_probe" else 0)
    runs = 1 if masked else 3
    target = {"ema": encoder, "online": 0, "hybrid": encoder, "mlp_probe": encoder, "masked_ema": encoder,
              "masked_online": 3 * encoder}[variant]  # masked_span's online target is a second, trained, pass
    sigreg = 3 * (2 * 32 * 64 + 4 * 64 * 17) if masked else 0  # masked_span's default SIGReg, 64 directions
    expected = 3 * encoder + 3 * head + target + 3 * runs * predictor + sigreg
    objective = trainer.model.objective
    assert objective.training_flops_per_token(trainer.model, 32) == expected
    assert trainer.flops_per_step == expected * 8 * 32


def test_regulariser_flops():
    d, directions = 32, 8
    plain = jepa_model()
    regularised = jepa_model(jepa={"vicreg_variance_weight": 1.0, "vicreg_covariance_weight": 1.0,
                                   "sigreg_weight": 1.0, "sigreg_directions": directions})
    extra = (regularised.objective.training_flops_per_token(regularised, 32)
             - plain.objective.training_flops_per_token(plain, 32))
    assert extra == 3 * 2 * d * d + 3 * (2 * d * directions + 4 * directions * 17)


# -- 10. sampling ------------------------------------------------------------------------------------------------
def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("mode", ["next_latent", "hybrid"])
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_sampling_continues_the_prompt_deterministically(backbone, mode):
    model = jepa_model(backbone, jepa=MODES[mode], init_std=0.1)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.objective.sample(model, prompt, 10, generator=seeded(0))
    assert out.shape == (2, 15) and out.dtype == torch.long and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.objective.sample(model, prompt, 10, generator=seeded(0)))
    assert not torch.equal(out, model.objective.sample(model, prompt, 10, generator=seeded(1)))
    assert model.training  # the sampler restores the mode
    greedy = model.objective.sample(model, prompt, 6, temperature=0)
    model.eval()
    with torch.no_grad():  # the cached sampler picks what a full forward pass over the prefix would
        for i in range(5, 11):
            assert torch.equal(greedy[:, i], model.objective.logits(model, greedy[:, :i])[:, -1].argmax(-1))


def test_masked_span_cannot_sample():
    model = jepa_model(jepa=MODES["masked_span"])
    assert not model.objective.can_sample(ModelConfig(**SMALL | {"jepa": MODES["masked_span"]}))
    with pytest.raises(ValueError, match="jepa mode masked_span cannot generate text .*; set sample.tokens=0"):
        model.objective.sample(model, torch.zeros(1, 4, dtype=torch.long), 4)
