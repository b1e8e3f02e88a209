"""Training-FLOP accounting and model FLOPs utilisation (MFU).

Backbones and objectives count their forward FLOPs analytically (2 per multiply-add); training costs
3x forward (backward = 2x forward), the convention of Kaplan et al. and PaLM's MFU.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks from the vendors' datasheets (no sparsity), FLOP/s.
_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12),
]


def training_flops_per_token(model, seq_len: int) -> int:
    return 3 * model.flops_per_token(seq_len)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where unknown (CPUs): then MFU is not reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)
