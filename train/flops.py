"""Training-FLOP accounting and model FLOPs utilisation (MFU).

Backbones and objectives count their forward FLOPs analytically (2 per multiply-add); training costs
3x forward (backward = 2x forward), the convention of Kaplan et al. and PaLM's MFU.
"""
from __future__ import annotations

from archlab.kernels.hardware import peak_flops

__all__ = ["peak_flops", "training_flops_per_token"]


def training_flops_per_token(model, seq_len: int) -> int:
    """What one training token costs; the objective counts it (JEPA adds its target encoder and predictor)."""
    return model.objective.training_flops_per_token(model, seq_len)
