"""Names in configs -> objective classes, and the one function that builds a Model. (Mixers have their own
registry, archs/layers/mixer.py; the backbone is always the residual stack of model.layers.)

archs/config.py imports OBJECTIVES lazily (inside a validator), so this module may import the config at the
top without a cycle.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.model import Model
from archlab.archs.objectives.autoregressive import AutoregressiveObjective
from archlab.archs.objectives.block_diffusion import BlockDiffusionObjective
from archlab.archs.objectives.jepa import JepaObjective
from archlab.archs.objectives.masked_diffusion import MaskedDiffusionObjective
from archlab.kernels.backend import check_backend

OBJECTIVES: dict[str, type] = {"autoregressive": AutoregressiveObjective, "masked_diffusion": MaskedDiffusionObjective,
                               "block_diffusion": BlockDiffusionObjective, "jepa": JepaObjective}


def build_model(cfg: ModelConfig, *, kernels: Mapping[str, str] | None = None) -> Model:
    """A freshly initialised model on the CPU; weights are normal(0, cfg.init_std) (see the backbone).

    `kernels` maps an op ("attention", "selective_scan", "causal_conv1d") to a backend name
    (kernels/backend.py); ops left out use "auto". Names are checked here, not at the first step.
    """
    for op, backend in (kernels or {}).items():
        check_backend(op, backend)
    embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
    nn.init.normal_(embedding.weight, mean=0.0, std=cfg.init_std)
    backbone = ResidualStack(cfg, causal=cfg.runs_causally, kernels=kernels)
    objective = OBJECTIVES[cfg.objective](cfg)
    model = Model(cfg, embedding, backbone, objective)
    objective.attach(model, kernels=kernels)
    return model
