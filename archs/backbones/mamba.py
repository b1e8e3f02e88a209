"""Mamba LM backbone (mamba_ssm's MixerModel): pre-norm residual blocks x + Mixer(RMSNorm(x)), no MLP,
a final RMSNorm. Causal by default; built bidirectional (each mixer also scans the reversed sequence, the
two directions averaged) when the model runs non-causally."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from archlab.archs.backbones.residual import ResidualStack, backend_for
from archlab.archs.config import ModelConfig
from archlab.archs.layers.mamba import MambaMixer, MambaState
from archlab.archs.layers.norm import rms_norm


class MambaBlock(nn.Module):
    """x + MambaMixer(norm(x)): one write into the residual stream."""

    residual_writes = 1

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, kernels: Mapping[str, str] | None = None):
        super().__init__()
        self.norm = rms_norm(cfg.d_model, cfg.norm_eps)
        self.mixer = MambaMixer(cfg, bidirectional=not causal, scan_backend=backend_for(kernels, "selective_scan"),
                                conv_backend=backend_for(kernels, "causal_conv1d"))

    def forward(self, x: Tensor, *, causal: bool, cache: MambaState | None = None) -> Tensor:
        return x + self.mixer(self.norm(x), causal=causal, state=cache)

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype, device: torch.device) -> MambaState:
        """The state is fixed-size, so max_len bounds nothing here (the sampler watches `.length`)."""
        return self.mixer.new_state(batch_size, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """The mixer's count (MambaMixer.flops_per_token): linear in the sequence, so per token it does not
        depend on seq_len; the causal flag is fixed at construction (a bidirectional mixer scans twice)."""
        return self.mixer.flops_per_token()


class MambaBackbone(ResidualStack):
    """n_layers Mamba blocks; `causal` picks the causal or the bidirectional mixer (their weights differ)."""

    kernel_ops = ("selective_scan", "causal_conv1d")

    def __init__(self, cfg: ModelConfig, *, causal: bool = True, kernels: Mapping[str, str] | None = None):
        super().__init__(cfg, [MambaBlock(cfg, causal=causal, kernels=kernels) for _ in range(cfg.n_layers)])
