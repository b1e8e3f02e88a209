"""Names in configs -> backbone and objective classes, and the one function that builds a Model.

archs/config.py imports BACKBONES, OBJECTIVES and closest lazily (inside a validator), so this module
may import the config at the top without a cycle.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from torch import nn

from archlab.archs.backbones.hybrid import HybridBackbone
from archlab.archs.backbones.mamba import MambaBackbone
from archlab.archs.backbones.transformer import TransformerBackbone
from archlab.archs.config import ModelConfig
from archlab.archs.model import Model
from archlab.archs.objectives.autoregressive import AutoregressiveObjective
from archlab.archs.objectives.jepa import JepaObjective
from archlab.archs.objectives.masked_diffusion import MaskedDiffusionObjective
from archlab.kernels.backend import check_backend

# Every backbone takes (cfg, *, causal, kernels): causal fixes the weights of those that differ by direction.
BACKBONES: dict[str, type] = {"transformer": TransformerBackbone, "mamba": MambaBackbone, "hybrid": HybridBackbone}
OBJECTIVES: dict[str, type] = {"autoregressive": AutoregressiveObjective, "masked_diffusion": MaskedDiffusionObjective,
                               "jepa": JepaObjective}


def closest(name: str, options: Iterable[str]) -> str:
    """The tail of an 'unknown name' error: a close match if there is one, else every option."""
    options = list(options)
    match = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {match[0]!r}?" if match else f"; choose from {', '.join(options)}"


def build_model(cfg: ModelConfig, *, kernels: Mapping[str, str] | None = None) -> Model:
    """A freshly initialised model on the CPU; weights are normal(0, cfg.init_std) (see the backbone).

    `kernels` maps an op ("attention", "selective_scan", "causal_conv1d") to a backend name
    (kernels/backend.py); ops left out use "auto". Names are checked here, not at the first step.
    """
    for op, backend in (kernels or {}).items():
        check_backend(op, backend)
    embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
    nn.init.normal_(embedding.weight, mean=0.0, std=cfg.init_std)
    backbone = BACKBONES[cfg.backbone](cfg, causal=cfg.runs_causally, kernels=kernels)
    objective = OBJECTIVES[cfg.objective](cfg)
    model = Model(cfg, embedding, backbone, objective)
    objective.attach(model, kernels=kernels)
    return model
