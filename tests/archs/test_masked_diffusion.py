"""Masked diffusion objective: the NELBO and its schedule, SUBS invariants, the three samplers, reproducible
evaluation, config errors, training through the Trainer."""
import math

import pytest
import torch
from pydantic import ValidationError

from archlab.archs.config import ModelConfig
from archlab.archs.objectives.masked_diffusion import EPS
from archlab.archs.registry import build_model
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from .eval_checks import assert_reproducible_eval

MASK = 256
SMALL = dict(objective="masked_diffusion", d_model=32, n_layers=1, n_heads=2, d_state=4)


def tiny_model(backbone="transformer", **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**(SMALL | {"layers": backbone} | overrides)))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("schedule", ["log_linear", "cosine"])
def test_uniform_predictions_score_eight_bits_per_byte(schedule):
    # With uniform logits every masked byte costs ln 256, so one row's estimate (bits) is 8 w(t) K / L with
    # K ~ Binomial(L, p_t), p_t = 1 - a_t. Its mean over t ~ U[eps, 1] is 8 E[-a'_t] = 8 (a_eps - a_1) / (1 - eps):
    # exactly 8 for log-linear, 8 cos(pi eps / 2) / (1 - eps) for cosine. Given t its variance is
    # 64 w^2 p (1 - p) / L = 64 c(t) / L with c = a'^2 a / (1 - a): (1 - t) / t for log-linear, whose mean over
    # [eps, 1] is (ln(1 / eps) - 1 + eps) / (1 - eps) = 5.92; (pi^2 / 2) cos^2(pi t / 4) cos(pi t / 2) <= 4.94 for
    # cosine. The conditional mean is constant in t, so stratifying t changes nothing; N rows of L bytes give
    # sd = 8 sqrt(c / (N L)) <= 8 sqrt(6 / 2^16) = 0.077 bits for N L = 4 * 64 * 256 (also what evaluate scores:
    # 4 draws x 64 rows x 256 bytes); we allow 5 sd.
    model = tiny_model(noise_schedule=schedule)
    with torch.no_grad():
        model.embedding.weight.zero_()  # the tied head: all logits 0
    torch.manual_seed(1)
    bpb = [model.objective.loss(model, torch.randint(0, 256, (64, 257)))[1]["bpb"].item() for _ in range(4)]
    expected = 8.0 if schedule == "log_linear" else 8 * math.cos(math.pi * EPS / 2) / (1 - EPS)
    assert abs(sum(bpb) / len(bpb) - expected) < 5 * 8 * math.sqrt(6 / (4 * 64 * 256)), bpb
    metrics = model.objective.evaluate(model, torch.randint(0, 256, (64, 257)))
    assert abs(metrics["bpb"] - expected) < 5 * 8 * math.sqrt(6 / (4 * 64 * 256))
    assert metrics["n_bytes"] == 64 * 256 and metrics["bound"] == 1.0
    assert metrics["bpb"] == pytest.approx(metrics["loss"] / math.log(2))


@pytest.mark.parametrize("schedule", ["log_linear", "cosine"])
def test_masking_rate_and_weight_follow_the_schedule(schedule):
    objective = tiny_model(noise_schedule=schedule).objective
    t = torch.linspace(EPS, 1, 101, dtype=torch.float64)
    alpha = 1 - t if schedule == "log_linear" else torch.cos(math.pi * t / 2)
    torch.testing.assert_close(objective.alpha(t), alpha)
    # w(t) = -alpha'(t) / (1 - alpha(t)), alpha' by autograd against the closed form
    t_grad = t.clone().requires_grad_()
    (d_alpha,) = torch.autograd.grad(objective.alpha(t_grad).sum(), t_grad)
    torch.testing.assert_close(objective.loss_weight(t), -d_alpha / (1 - alpha))
    if schedule == "log_linear":
        torch.testing.assert_close(objective.loss_weight(t), 1 / t)
    # the loss's draws: t stratified over [eps, 1]; masked counts K_b ~ Binomial(L, 1 - alpha(t_b)), so
    # z = sum (K_b - L p_b) / sqrt(sum L p_b (1 - p_b)) is ~ N(0, 1): |z| < 5
    times = torch.cat([objective.draw_times(64, generator=seeded(s)) for s in range(16)])
    assert times.min() >= EPS and times.max() <= 1
    strata = ((torch.cat([objective.draw_times(64, generator=seeded(s)) for s in range(3)]) - EPS) / (1 - EPS) * 64)
    assert all(sorted(chunk.floor().long().tolist()) == list(range(64)) for chunk in strata.split(64))
    model = tiny_model(noise_schedule=schedule)
    seen = []
    captured = model.objective.weighted_nll

    def spy(model_, x, t, mask, documents=None):
        seen.append((t, mask))
        return captured(model_, x, t, mask, documents)

    model.objective.weighted_nll = spy
    _, metrics = model.objective.loss(model, torch.randint(0, 256, (len(times), 129)))
    t, mask = seen[-1]  # t: each position's time, one per row
    assert t.shape == mask.shape and torch.equal(t, t[:, :1].expand_as(t))
    p = objective.mask_prob(t[:, 0])
    counts = mask.sum(1).double()
    z = (counts - 128 * p).sum() / (128 * p * (1 - p)).sum().sqrt()
    assert abs(z) < 5, z
    assert metrics["masked_fraction"] == pytest.approx(mask.float().mean().item())


def test_only_masked_positions_count():
    model = tiny_model()
    batch = torch.randint(0, 256, (8, 33))
    torch.manual_seed(3)
    reference, _ = model.objective.loss(model, batch)
    original = model.objective.hidden

    def scrambled(model_, z, documents=None):  # arbitrary hidden states (so predictions) wherever not masked
        h = original(model_, z, documents)
        return torch.where((z == MASK).unsqueeze(-1), h, 100 * torch.randn_like(h))

    model.objective.hidden = scrambled
    torch.manual_seed(3)
    changed, _ = model.objective.loss(model, batch)
    assert changed.item() == reference.item()


def test_loss_gradients_reach_the_mask_embedding_and_logits_are_float32():
    model = tiny_model()
    loss, _ = model.objective.loss(model, torch.randint(0, 256, (4, 17)))
    loss.backward()
    assert model.objective.mask_embedding.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.objective.logits(model, torch.full((2, 5), MASK)).dtype == torch.float32


def record_network_inputs(model):
    inputs = []
    original = model.objective.logits

    def logits(model_, z):
        inputs.append(z.clone())
        return original(model_, z)

    model.objective.logits = logits
    return inputs


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("strategy,block_size", [("ancestral", None), ("confidence", None), ("block", 4)])
def test_samplers_keep_prompt_and_unmasked_bytes_never_leave_a_mask_and_are_deterministic(backbone, strategy,
                                                                                         block_size):
    model = tiny_model(backbone, init_std=0.1).train()
    prompt = torch.randint(0, 256, (3, 5))
    inputs = record_network_inputs(model)
    kwargs = dict(steps=8, strategy=strategy, block_size=block_size)
    out = model.objective.sample(model, prompt, 12, generator=seeded(0), **kwargs)
    again = model.objective.sample(model, prompt, 12, generator=seeded(0), **kwargs)
    assert out.shape == (3, 17) and out.dtype == torch.long and model.training
    assert torch.equal(out, again) and not torch.equal(out, model.objective.sample(
        model, prompt, 12, generator=seeded(1), **kwargs))
    assert torch.equal(out[:, :5], prompt) and out.max() < MASK and out.min() >= 0
    calls = inputs[:len(inputs) // 3]
    for z in calls:  # SUBS: a byte once unmasked is carried over to the end
        assert torch.equal(z[:, :5], prompt)
        assert torch.equal(torch.where(z == MASK, out, z), out)
    assert model.objective.last_sample_stats["network_evals"] == len(inputs) // 3


def test_ancestral_unmasks_one_byte_per_step_in_expectation():
    # log-linear, steps = n: each masked byte unmasks at a uniform one of the n steps, so a row's count at a
    # step is Binomial(n, 1 / n): mean 1, variance (n - 1) / n; over R rows the mean has sd sqrt(15 / 16 / R).
    model = tiny_model()
    rows, n = 256, 16
    out = model.objective.sample(model, torch.randint(0, 256, (rows, 2)), n, generator=seeded(0))
    per_step = torch.tensor(model.objective.last_sample_stats["unmasked_per_step"], dtype=torch.float64) / rows
    assert len(per_step) == n and out.max() < MASK and per_step.sum() == n
    assert (per_step - 1).abs().max() < 5 * math.sqrt(15 / 16 / rows), per_step


def test_ancestral_caching_saves_network_calls():
    model = tiny_model()
    prompt = torch.randint(0, 256, (1, 4))
    out = model.objective.sample(model, prompt, 8, steps=64, generator=seeded(0))
    stats = model.objective.last_sample_stats
    assert out.max() < MASK and stats["steps"] <= 64
    # one network call per distinct input: at most one per unmasking step, so at most n_tokens
    assert stats["network_evals"] == sum(1 for c in stats["unmasked_per_step"] if c) <= 8 < 64


def test_confidence_commits_the_schedule_and_block_goes_left_to_right():
    model = tiny_model(init_std=0.1)
    prompt = torch.randint(0, 256, (2, 3))
    inputs = record_network_inputs(model)
    model.objective.sample(model, prompt, 10, steps=4, strategy="confidence", generator=seeded(0))
    assert [int((z == MASK).sum(1)[0]) for z in inputs] == [10, 7, 4, 2]  # ceil(10/4)=3, ceil(7/3)=3, 2, 2
    inputs.clear()
    out = model.objective.sample(model, prompt, 12, steps=6, strategy="block", block_size=4, temperature=0)
    assert model.objective.last_sample_stats == {"strategy": "block", "steps": 6, "network_evals": 6}
    for z in inputs:
        start = 3 + (int((z[0] == MASK).nonzero()[0]) - 3) // 4 * 4  # the block being decoded
        assert (z[:, :start] != MASK).all() and (z[:, start + 4:] == MASK).all()
    assert out.max() < MASK


def test_greedy_confidence_picks_argmax():
    model = tiny_model(init_std=0.1)
    prompt = torch.randint(0, 256, (2, 3))
    out = model.objective.sample(model, prompt, 1, strategy="confidence", temperature=0)
    z = torch.cat([prompt, torch.full((2, 1), MASK)], dim=1)
    with torch.no_grad():
        assert torch.equal(out[:, -1], model.objective.logits(model, z)[:, -1].argmax(-1))
    assert torch.equal(model.objective.sample(model, prompt, 0), prompt)


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps must be >= 1"),
    ({"strategy": "greedy"}, "unknown sampling strategy 'greedy'; choose from ancestral, confidence, block"),
    ({"strategy": "block", "block_size": 3}, "block_size=3 must divide n_tokens=8"),
    ({"strategy": "block"}, "strategy='block' needs block_size"),
    ({"block_size": 4}, "block_size is for strategy='block'"),
    ({"context_len": 10}, r"prompt \(4 bytes\) \+ n_tokens \(8\) exceeds context_len 10"),
    ({"top_k": 0}, "top_k must be in 1..256"),
    ({"temperature": -1}, "temperature must be >= 0"),
])
def test_sample_argument_errors(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.objective.sample(model, torch.zeros(1, 4, dtype=torch.long), 8, **kwargs)


def test_evaluate_is_reproducible_and_leaves_the_global_rng_alone():
    first = assert_reproducible_eval(tiny_model(), torch.randint(0, 256, (4, 65)), "bpb")
    assert first["n_bytes"] == 4 * 64


def test_config_needs_a_bidirectional_backbone_and_a_known_schedule():
    with pytest.raises(ValidationError, match="objective masked_diffusion needs a bidirectional backbone"):
        ModelConfig(objective="masked_diffusion", causal=True)
    with pytest.raises(ValidationError, match="noise_schedule"):
        ModelConfig(objective="masked_diffusion", noise_schedule="linear")
    with pytest.raises(ValidationError, match="diffusion_eval_draws"):
        ModelConfig(objective="masked_diffusion", diffusion_eval_draws=0)
    assert not ModelConfig(objective="masked_diffusion").runs_causally
    model = tiny_model()
    assert model.objective.head_flops_per_token(32) == 2 * 32 * 256
    assert model.num_parameters() == tiny_model(objective="autoregressive").num_parameters() + 32


@pytest.mark.parametrize("backbone,steps", [("transformer", 40), ("mamba", 30)])
def test_trainer_run_lowers_the_bound(tmp_path, backbone, steps):
    overrides = [f"run.dir={tmp_path}", "model.objective=masked_diffusion", f"model.layers={backbone}",
                 "model.n_layers=1", f"train.max_steps={steps}", f"train.eval_every={steps}",
                 f"train.checkpoint_every={steps}", "train.lr=1e-2", "train.eval_tokens=512",
                 "model.diffusion_eval_draws=2"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    evals = [r["val_bpb"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert abs(evals[0] - 8) < 0.5 and evals[-1] < 6.0, evals
    text = trainer.sample_text("KING", 12, temperature=0.8, top_k=None, seed=0, steps=6, strategy="block",
                               block_size=4)
    assert text.startswith("KING") and len(text.encode("utf-8", "surrogateescape")) >= 4
