"""Shared settings and builders of the JEPA tests."""
import torch

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model
from archlab.train.run_log import read_metrics

SMALL = dict(objective="jepa", d_model=32, n_layers=1, n_heads=2, d_state=4)
MONITORS = ("val_effective_rank", "val_target_std", "val_mean_cosine", "val_latent_loss")
MODES = {  # mode name -> model.jepa settings that fit the tiny config's 32-byte windows
    "next_latent": {"offsets": [1, 4]},
    "masked_span": {"mode": "masked_span", "spans": 2, "span_length": [2, 6]},
    "hybrid": {"offsets": [1, 4], "ar_weight": 1.0},
}


def jepa_model(backbone="transformer", jepa=None, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**(SMALL | {"layers": backbone, "jepa": jepa or {}} | overrides)))


def encoder_parameters(model):
    """(name, parameter) of the context encoder, named as in the target ModuleDict."""
    return [(f"embedding.{n}", p) for n, p in model.embedding.named_parameters()] + [
        (f"backbone.{n}", p) for n, p in model.backbone.named_parameters()]


def jepa_overrides(run_dir, jepa, *extra):
    """Dotted overrides for a tiny JEPA run: model.jepa.<key>=<value> for each setting, then `extra`."""
    settings = [f"model.jepa.{key}={value}" for key, value in jepa.items()]
    return [f"run.dir={run_dir}", "model.objective=jepa", "model.n_layers=1", "sample.tokens=0",
            *settings, *extra]


def evals(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"]


