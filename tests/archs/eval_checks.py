"""Checks every objective with a random evaluation (masks, noise levels) must pass."""
import torch


def assert_reproducible_eval(model, batch: torch.Tensor, metric: str) -> dict:
    """evaluate() gives the same figures for the same batch whatever the global seed, leaves the global RNG
    untouched, and gives a different `metric` for another batch. Returns the first figures."""
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = model.objective.evaluate(model, batch)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    assert model.objective.evaluate(model, batch) == first
    assert model.objective.evaluate(model, torch.randint(0, 256, batch.shape))[metric] != first[metric]
    return first
