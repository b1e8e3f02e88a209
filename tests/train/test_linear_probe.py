"""Linear evaluation: the protocol on features with a known answer, its invariance to linear maps of the features,
`archlab eval --linear-probe` end to end with its baselines, and every bad input (one `error:` line, exit 2)."""
import dataclasses
import json

import pytest
import torch

from archlab.train import linear_probe
from archlab.train.config import run_config
from archlab.train.linear_probe import (
    Encoder,
    Protocol,
    evaluate_encoder,
    fit_probe,
    new_probe,
    probe_bpb,
    whitening,
)
from archlab.train.ngram import ByteNgrams
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer, initial_model

from .conftest import TINY
from .test_cli import run_cli

FAST = Protocol(pool_tokens=4096, held_out_tokens=1024, batch_tokens=256, check_every=20, patience=2, max_steps=400)


@pytest.fixture
def fast_protocol(monkeypatch):
    """The CLI's protocol shrunk to seconds (the full one is sized for real runs)."""
    monkeypatch.setattr(linear_probe, "PROTOCOL", FAST)


def test_whitening_gives_identity_covariance_and_survives_zero_features():
    gen = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    mixing = torch.diag(torch.logspace(-3, 1, 8)) @ rotation  # stds from 1e-3 to 10 along rotated axes: correlated
    features = torch.randn(5000, 8, generator=gen) @ mixing + 3.0
    mean, whitener = whitening(features, floor=0.0)
    white = (features - mean) @ whitener
    torch.testing.assert_close(white.T @ white / len(white), torch.eye(8), atol=2e-3, rtol=0)
    mean, whitener = whitening(torch.zeros(10, 4), floor=1e-4)
    assert torch.isfinite(whitener).all() and ((torch.zeros(10, 4) - mean) @ whitener == 0).all()


def synthetic_task(n: int, d: int, seed: int, scale: torch.Tensor | None = None):
    """Byte ids that a linear map of the features decides (one of 4 classes), features optionally rescaled."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(n, d, generator=gen)
    targets = (features[:, :4] * 3).argmax(dim=1) + ord("a")
    return (features if scale is None else features * scale), targets


def test_probe_learns_a_linear_task_and_stays_at_chance_on_noise():
    pool, held_out = synthetic_task(4096, 16, 0), synthetic_task(1024, 16, 1)
    fit = fit_probe("linear", pool, held_out, 3e-2, FAST)
    assert fit["held_out_bpb"] < 0.6  # 4 balanced classes: 2 bits at chance
    # features that say nothing, few rows and many dims: the probe overfits them
    noise = (torch.randn(512, 64), pool[1][:512]), (torch.randn(1024, 64), held_out[1])
    on_noise = fit_probe("linear", *noise, 0.1, FAST)
    assert on_noise["held_out_bpb"] > 1.9
    # noise overfits: early stopping ends the fit and restores the best check's weights, not the last ones
    assert on_noise["steps_run"] < FAST.max_steps and on_noise["step"] % FAST.check_every == 0
    assert probe_bpb(on_noise["probe"], *noise[1]) == pytest.approx(on_noise["held_out_bpb"], abs=1e-9)
    assert fit["held_out_bpb"] < probe_bpb(new_probe("linear", 16, FAST.seed), *held_out)


def test_probe_initialisation_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first, second = new_probe("mlp", 8, 0), new_probe("mlp", 8, 0)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True))


def test_probe_bpb_is_cross_entropy_in_bits():
    probe = torch.nn.Linear(3, 256)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.zero_()
    assert probe_bpb(probe, torch.randn(10, 3), torch.randint(0, 256, (10,))) == pytest.approx(8.0)


class Scaled(torch.nn.Module):
    """A stand-in encoder whose 'features' are the synthetic task's, optionally squeezed into tiny directions."""

    class Objective:
        probe_task = "next byte"

        def __init__(self, scale):
            self.scale = scale

        def probe_features(self, model, batch):
            features, targets = synthetic_task(batch.shape[0], 16, int(batch[0, 0]))
            return features * self.scale, targets

    def __init__(self, scale):
        super().__init__()
        self.objective = self.Objective(scale)


def test_result_does_not_depend_on_the_feature_scale():
    """The best linear probe is the same for any invertible linear map of the features; whitening makes the
    protocol find it whatever the encoder's conditioning (an encoder keeping its information in directions of
    tiny variance is not under-rated)."""
    windows = {"pool": [torch.full((2048, 2), 1)], "held_out": [torch.full((512, 2), 2)],
               "eval": [torch.full((512, 2), 3)]}
    results = []
    for scale in (torch.ones(16), torch.logspace(-2, 1, 16)):  # the task's 4 dims get ~1/1000 of the std
        encoder = Encoder("trained", "stand-in", 0, Scaled(scale), torch.device("cpu"))
        result, scored = evaluate_encoder(encoder, windows, ("linear",), dataclasses.replace(FAST, lrs=(1e-2,)))
        results.append(result["linear"]["val_bpb"])
        assert result["scored_bytes"] == len(scored) == 512
    assert results[0] < 0.7 and results[1] == pytest.approx(results[0], abs=0.05)


def test_initial_model_scores_what_the_run_scored_at_step_zero(tiny_config):
    trainer = Trainer(tiny_config("train.max_steps=4", "train.warmup_steps=1", "train.eval_every=4"))
    trainer.train()
    step_zero = read_metrics(trainer.run_dir / "metrics.jsonl")[0]
    assert step_zero["kind"] == "eval" and step_zero["step"] == 0
    torch.manual_seed(123)  # whatever the RNG holds: the rebuilt weights come from train.seed
    rebuilt = initial_model(trainer.cfg).eval()
    with torch.no_grad():
        scores = [(rebuilt.objective.evaluate(rebuilt, batch)) for batch in trainer.eval_set]
    bpb = sum(s["bpb"] * s["n_bytes"] for s in scores) / sum(s["n_bytes"] for s in scores)
    assert bpb == pytest.approx(step_zero["val_bpb"], abs=1e-6)


def test_probe_of_an_lm_nearly_reaches_its_own_head(tiny_config):
    """The model's own head (untied here: a free linear map) is one linear read-out of its last hidden states, so
    a protocol that fits its probe properly reaches about as low, or lower where the head still lags its moving
    encoder. An under-fitted probe would not. Measured after 300 steps: own head 3.44 bpb, fresh probe 3.35."""
    trainer = Trainer(tiny_config("train.max_steps=300", "train.eval_every=300", "train.checkpoint_every=300",
                                  "train.eval_tokens=8192", "train.lr=1e-2", "model.tie_embeddings=false"))
    own = trainer.train()["bpb"]
    protocol = Protocol(pool_tokens=2**16, batch_tokens=1024, check_every=50, max_steps=800)
    encoder = Encoder("trained", "tiny", 300, trainer.model, trainer.device)
    result = linear_probe.linear_evaluation(encoder, [], trainer.corpus.train, trainer.eval_set, seq_len=32,
                                            protocol=protocol)
    probe = result["encoders"][0]["linear"]["val_bpb"]
    assert probe < own + 0.05, (own, probe)


# -- end to end --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny autoregressive run, a tiny JEPA run and a tiny masked_span JEPA run, trained in this process."""
    from archlab.train.config import load_config

    folder = tmp_path_factory.mktemp("probe")
    extra = {"ar": [], "jepa": ["model.objective=jepa", "model.jepa.offsets=[1,4]", "sample.tokens=0"],
             "masked": ["model.objective=jepa", "model.jepa.mode=masked_span", "model.jepa.spans=2",
                        "model.jepa.span_length=[2,6]", "sample.tokens=0"],
             "diffusion": ["model.objective=masked_diffusion", "sample.tokens=0"]}
    for name, overrides in extra.items():
        Trainer(load_config(TINY, [f"run.dir={folder / name}", *overrides])).train()
    return folder


def test_linear_probe_of_a_run_beside_its_step_zero_encoder_and_a_baseline(capsys, runs, fast_protocol):
    code, out, err = run_cli(capsys, "eval", runs / "jepa", "--linear-probe", "--baseline", runs / "ar")
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((runs / "jepa" / "linear_probe.json").read_text()) == result
    assert result["task"] == "next byte" and result["kinds"] == ["linear"] and result["step"] == 12
    assert [e["name"] for e in result["encoders"]] == ["trained", "random init", "baseline"]
    sources = [(e["run_dir"], e["step"]) for e in result["encoders"]]
    assert sources == [(str(runs / "jepa"), 12), (str(runs / "jepa"), 0), (str(runs / "ar"), 12)]
    assert result["protocol"] == json.loads(json.dumps(dataclasses.asdict(FAST)))
    for encoder in result["encoders"]:
        probe = encoder["linear"]
        assert 0 < probe["val_bpb"] < 8 and probe["lr"] in FAST.lrs and len(probe["grid"]) == len(FAST.lrs)
        assert probe["held_out_bpb"] == min(fit["held_out_bpb"] for fit in probe["grid"])
        assert encoder["scored_bytes"] == 2048  # the tiny config's eval_tokens: the run's own eval windows
    trainer = Trainer(run_config(str(runs / "jepa"), None))
    ngrams = ByteNgrams(trainer.corpus.train)
    assert result["entropies"]["unigram_bpb"] == pytest.approx(ngrams.unigram_bpb(trainer.eval_set))
    assert result["entropies"]["bigram_bpb"] == pytest.approx(ngrams.bigram_bpb(trainer.eval_set))
    # deterministic: the same call gives the same figures
    assert json.loads(run_cli(capsys, "eval", runs / "jepa", "--linear-probe", "--baseline", runs / "ar")[1]) == result


def test_masked_span_runs_probe_the_hidden_bytes_with_an_mlp_too(capsys, runs, fast_protocol):
    code, out, err = run_cli(capsys, "eval", runs / "masked", "--linear-probe", "--mlp")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "masked byte" and result["kinds"] == ["linear", "mlp"]
    assert "bigram_bpb" not in result["entropies"]
    for encoder in result["encoders"]:
        assert 0 < encoder["scored_bytes"] < 2048 and all(0 < encoder[k]["val_bpb"] < 8 for k in ("linear", "mlp"))


@pytest.mark.parametrize("argv, message", [
    (["{runs}/diffusion", "--linear-probe"], "has no fixed representation to probe"),
    (["{runs}/jepa", "--linear-probe", "--baseline", "{runs}/masked"], "probes the masked byte"),
    (["{runs}/jepa", "--mlp"], "--mlp and --baseline go with --linear-probe"),
    (["{runs}/jepa", "--linear-probe", "--baseline", "{runs}/nowhere"], "is not a run directory"),
    (["{runs}/empty", "--linear-probe"], "has no checkpoint to probe"),
])
def test_bad_input_is_one_error_line(capsys, runs, argv, message):
    (runs / "empty").mkdir(exist_ok=True)
    (runs / "empty" / "config.yaml").write_text((runs / "ar" / "config.yaml").read_text())
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()}
    code, out, err = run_cli(capsys, "eval", *[a.format(runs=runs) for a in argv])
    assert code == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file()} == before
