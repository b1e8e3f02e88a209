"""Autoregressive objective: loss and bits per byte, learning, KV-cached sampling."""
import math

import pytest
import torch
import torch.nn.functional as F

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model


def tiny_model(**overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**(dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2) | overrides)))


def test_loss_at_init_is_eight_bits_per_byte():
    # Logits = RMS-normed hidden (entries ~1) . embedding rows (std s): each ~ N(0, d s^2) = N(0, 0.0256).
    # E[cross-entropy] = E[logsumexp] - E[target logit] ~ ln 256 + var / 2, i.e. 8 + 0.0256 / (2 ln 2) bits:
    # uniform over 256 bytes is exactly 8 bits, the small logits add ~0.02.
    model = tiny_model(init_std=0.02)
    batch = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(1))
    loss, metrics = model.objective.loss(model, batch)
    assert abs(metrics["bpb"] - 8) < 0.15
    assert metrics["bpb"] == pytest.approx(metrics["loss"] / math.log(2)) and metrics["loss"] == loss.item()


def test_loss_is_next_byte_cross_entropy_and_evaluate_counts_bytes():
    model = tiny_model()
    batch = torch.randint(0, 256, (3, 11))
    loss, _ = model.objective.loss(model, batch)
    logits = model.objective.logits(model, batch[:, :-1])
    assert logits.shape == (3, 10, 256) and logits.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1)))
    metrics = model.objective.evaluate(model, batch)
    assert metrics["n_bytes"] == 30 and metrics["loss"] == pytest.approx(loss.item())
    with pytest.raises(ValueError, match=r"batch must be \(B, L \+ 1\)"):
        model.objective.loss(model, batch[:, :1])


def test_logits_are_float32_under_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.objective.logits(model, torch.randint(0, 256, (2, 8)))
    assert logits.dtype == torch.float32


def test_a_tiny_model_overfits_one_batch():
    model = tiny_model(d_model=64, n_layers=2)
    batch = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss, _ = model.objective.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.5:
            break
    assert loss.item() < 0.5


def test_sample_shape_determinism_and_mode():
    model = tiny_model().train()
    prompt = torch.randint(0, 256, (3, 4))
    first = model.objective.sample(model, prompt, 7, generator=torch.Generator().manual_seed(0))
    again = model.objective.sample(model, prompt, 7, generator=torch.Generator().manual_seed(0))
    assert first.shape == (3, 11) and first.dtype == torch.long and torch.equal(first[:, :4], prompt)
    assert torch.equal(first, again)
    assert model.training
    assert torch.equal(model.objective.sample(model, prompt, 0), prompt)
    top_1 = model.objective.sample(model, prompt, 5, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(top_1, model.objective.sample(model, prompt, 5, temperature=0))


def test_greedy_sample_is_argmax_of_full_recompute():
    model = tiny_model(init_std=0.1)  # larger weights: distinct argmaxes, no near-ties
    prompt = torch.randint(0, 256, (2, 5))
    out = model.objective.sample(model, prompt, 8, temperature=0)
    with torch.no_grad():
        for position in range(5, 13):
            next_byte = model.objective.logits(model, out[:, :position])[:, -1].argmax(-1)
            assert torch.equal(out[:, position], next_byte)


@pytest.mark.parametrize("prompt,kwargs,error,message", [
    (torch.zeros(1, 0, dtype=torch.long), {}, ValueError, "prompt must be non-empty"),
    (torch.zeros(1, 3), {}, TypeError, "prompt must be a LongTensor"),
    (torch.zeros(3, dtype=torch.long), {}, TypeError, "prompt must be a LongTensor"),
    (torch.full((1, 3), 256), {}, ValueError, r"prompt ids must lie in \[0, 256\)"),
    (torch.zeros(1, 3, dtype=torch.long), {"n_tokens": -1}, ValueError, "n_tokens must be >= 0"),
    (torch.zeros(1, 3, dtype=torch.long), {"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    (torch.zeros(1, 3, dtype=torch.long), {"top_k": 0}, ValueError, "top_k must be in 1..256"),
    (torch.zeros(1, 3, dtype=torch.long), {"top_k": 300}, ValueError, "top_k must be in 1..256"),
    (torch.zeros(1, 3, dtype=torch.long), {"context_len": 0}, ValueError, "context_len must be >= 1"),
])
def test_sample_argument_errors(prompt, kwargs, error, message):
    model = tiny_model()
    kwargs = {"n_tokens": 4} | kwargs
    with pytest.raises(error, match=message):
        model.objective.sample(model, prompt, **kwargs)


@pytest.mark.parametrize("prompt_len", [5, 9])
def test_context_len_bounds_what_sampling_attends_to(prompt_len):
    """Greedy decoding with a window equals the argmax of a full recompute over that window:
    the context of byte q is tokens[start:q], and start jumps to q - window // 2 when it would exceed it."""
    model = tiny_model(init_std=0.1)
    window, prompt = 6, torch.randint(0, 256, (2, prompt_len))
    out = model.objective.sample(model, prompt, 12, temperature=0, context_len=window)
    start = max(0, prompt_len - window)
    with torch.no_grad():
        for q in range(prompt_len, prompt_len + 12):
            if q - start > window:
                start = q - window // 2
            expected = model.objective.logits(model, out[:, start:q])[:, -1].argmax(-1)
            assert torch.equal(out[:, q], expected), q
    long_window = model.objective.sample(model, prompt, 12, temperature=0, context_len=prompt_len + 12)
    assert torch.equal(long_window, model.objective.sample(model, prompt, 12, temperature=0))
