"""What the device can do: dense bf16 tensor-core peaks (vendor datasheets, no sparsity), its name and family."""
from __future__ import annotations

import platform

import torch

_PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("4090", 165e12),
]


def gpu_class(name: str) -> str | None:
    """The GPU family a device name belongs to ("NVIDIA H100 80GB HBM3" -> "H100"), or None where unknown."""
    return next((key for key, _ in _PEAK_BF16 if key in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPUs): then no MFU is reported."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_BF16 if key in name), None)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
