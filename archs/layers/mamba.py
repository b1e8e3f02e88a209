"""The Mamba-1 mixer (Gu & Dao 2023) as mamba_ssm's `Mamba` (modules/mamba_simple.py), optionally bidirectional.

    x, z     = in_proj(u)                        d -> 2E, no bias
    x        = silu(causal_conv1d(x))            depthwise over positions, width d_conv, bias
    dt, B, C = x_proj(x)                         E -> R + 2N, no bias
    dt       = dt_proj.weight @ dt               R -> E; dt_proj's bias enters the scan as delta_bias,
                                                 softplus(dt + bias) inside the kernel, as mamba_ssm does
    y        = selective_scan(x, dt, A = -exp(A_log), B, C, D, z)   gated by silu(z)
    out      = out_proj(y)                       E -> d, no bias

Bidirectional (Vision Mamba's layout): the reversed sequence goes through a second set of direction-specific
weights (conv, x_proj, dt_proj, A_log, D) while in_proj and out_proj are shared, and the two directions'
gated outputs are averaged before out_proj.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import Tensor, nn

from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import (
    BuiltDirectionMixer,
    MixerSettings,
    RecurrentState,
    backend_for,
    no_weight_decay,
    register_mixer,
    writes_residual,
)
from archlab.kernels.causal_conv1d import causal_conv1d, causal_conv1d_update
from archlab.kernels.selective_scan import selective_scan, selective_state_update

class MambaSettings(MixerSettings):
    """model.mamba (mamba_ssm's defaults)"""

    mlp: bool = Field(False, description="a SwiGLU MLP after the mixer in each block (mamba_ssm: none)")
    d_state: int = Field(16, gt=0, description="SSM state size N per channel")
    d_conv: int = Field(4, ge=2, le=4, description="width of the depthwise causal conv (2..4)")
    expand: int = Field(2, gt=0, description="inner width E = expand * d_model")
    dt_rank: Optional[int] = Field(None, gt=0, description="rank of the dt projection; None = ceil(d_model/16)")
    dt_min: float = Field(0.001, gt=0, description="smallest initial step size dt")
    dt_max: float = Field(0.1, gt=0, description="largest initial step size dt")
    dt_init_floor: float = Field(1e-4, gt=0, description="initial dt is clamped at least to this")
    conv_bias: bool = Field(True, description="bias in the depthwise conv")

    def check(self, d_model: int) -> None:
        if self.dt_min > self.dt_max:
            raise ValueError(f"model.mamba.dt_min={self.dt_min} must not exceed model.mamba.dt_max={self.dt_max}")

    def narrowed(self, heads: int | None = None) -> "MambaSettings":
        return self.model_copy(update={"dt_rank": None})  # the default rank of the narrower width


class MambaState(RecurrentState):
    """Decoding state of one causal Mamba mixer after `length` positions: fixed-size, whatever the length.

    conv_state (B, E, d_conv - 1) holds the last pre-conv inputs (activation dtype), ssm_state (B, E, N)
    the scan's hidden state (float32, as the kernels keep it).
    """

    def __init__(self, batch_size: int, d_inner: int, d_conv: int, d_state: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(batch_size, d_inner, d_conv, dtype=dtype, device=device)
        self.ssm_state = torch.zeros(batch_size, d_inner, d_state, dtype=torch.float32, device=device)


def conv_parameters(channels: int, width: int, bias: bool) -> tuple[nn.Parameter, nn.Parameter | None]:
    """A depthwise conv's (channels, width) weight and optional bias, initialised as mamba_ssm's nn.Conv1d is:
    uniform(+-1/sqrt(fan_in = width))."""
    bound = 1 / math.sqrt(width)
    weight = nn.Parameter(torch.empty(channels, width).uniform_(-bound, bound))
    return weight, nn.Parameter(torch.empty(channels).uniform_(-bound, bound)) if bias else None


def initial_dt_bias(count: int, dt_min: float, dt_max: float, floor: float) -> Tensor:
    """softplus^-1 of `count` step sizes drawn log-uniformly in [dt_min, dt_max] (floored at `floor`): a time scale
    per channel (Mamba) or per head (Mamba-2), as mamba_ssm initialises them."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(count) * (log_max - log_min) + log_min).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse softplus, stable for small dt


class SelectiveSSM(nn.Module):
    """One scan direction: causal conv + SiLU, the input-dependent dt/B/C projections, the gated scan."""

    def __init__(self, d_model: int, cfg: MambaSettings, *, scan_backend: str, conv_backend: str):
        super().__init__()
        d_inner, self.d_state = cfg.expand * d_model, cfg.d_state
        self.dt_rank = cfg.dt_rank or math.ceil(d_model / 16)
        self.scan_backend, self.conv_backend = scan_backend, conv_backend
        self.conv_weight, self.conv_bias = conv_parameters(d_inner, cfg.d_conv, cfg.conv_bias)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self._init_dt(cfg, d_inner)
        # S4D-real: A[e, n] = -(n + 1) for every channel, stored as log(-A) so that A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        no_weight_decay(self.A_log, self.D, self.dt_proj.bias)

    def _init_dt(self, cfg: MambaSettings, d_inner: int) -> None:
        """dt_proj.weight uniform(+-R^-0.5); the bias is softplus^-1 of dt drawn log-uniformly in
        [dt_min, dt_max] (floored at dt_init_floor), so every channel starts with its own time scale."""
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        with torch.no_grad():
            self.dt_proj.bias.copy_(initial_dt_bias(d_inner, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        for param in (self.dt_proj.weight, self.dt_proj.bias):
            param._no_reinit = True  # the backbone's normal(init_std) pass leaves these alone

    def A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def _dt_B_C(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., E) -> dt (..., E) without dt_proj's bias (the scan adds it), B and C (..., N)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, x: Tensor, z: Tensor, state: MambaState | None = None,
                documents: Documents | None = None) -> Tensor:
        """x, z (B, E, L) -> gated scan output (B, E, L). A (fresh) `state` is filled for decoding onwards; with
        `documents` the conv and the scan restart at each document."""
        if state is not None:
            state.keep_conv_inputs(x)
        seq_idx = None if documents is None else documents.seq_idx
        x = causal_conv1d(x, self.conv_weight, self.conv_bias, activation="silu", backend=self.conv_backend,
                          seq_idx=seq_idx)
        dt, B, C = self._dt_B_C(rearrange(x, "b e l -> b l e"))
        out = selective_scan(x, rearrange(dt, "b l e -> b e l"), self.A(), rearrange(B, "b l n -> b n l"),
                             rearrange(C, "b l n -> b n l"), self.D.float(), z=z,
                             delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                             return_last_state=state is not None, backend=self.scan_backend, seq_idx=seq_idx)
        if state is None:
            return out
        out, last_state = out
        state.ssm_state.copy_(last_state)
        return out

    def step(self, x: Tensor, z: Tensor, state: MambaState) -> Tensor:
        """One position: x, z (B, E) -> (B, E); advances the state's conv window and SSM state in place."""
        x = causal_conv1d_update(x, state.conv_state, self.conv_weight, self.conv_bias, activation="silu")
        dt, B, C = self._dt_B_C(x)
        return selective_state_update(state.ssm_state, x, dt, self.A(), B, C, self.D.float(), z=z,
                                      dt_bias=self.dt_proj.bias.float(), dt_softplus=True)

    def flops_per_token(self) -> int:
        """conv 2 E d_conv, x_proj 2 E (R + 2N), dt_proj 2 R E, scan 9 E N (mamba_ssm's benchmark count)."""
        d_inner, width = self.conv_weight.shape
        return (2 * d_inner * width + 2 * d_inner * (self.dt_rank + 2 * self.d_state)
                + 2 * self.dt_rank * d_inner + 9 * d_inner * self.d_state)


@register_mixer
class MambaMixer(BuiltDirectionMixer):
    """u (B, L, d) -> (B, L, d). Built causal or bidirectional (their weights differ); decoding is causal only."""

    name = "mamba"
    title = "Mamba"
    settings = MambaSettings
    kernel_ops = ("selective_scan", "causal_conv1d")

    def __init__(self, d_model: int, settings: MambaSettings, *, causal: bool = True,
                 kernels: Mapping[str, str] | None = None):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        scan_backend, conv_backend = backend_for(kernels, "selective_scan"), backend_for(kernels, "causal_conv1d")
        self.d_inner, self.d_conv, self.d_state = settings.expand * d_model, settings.d_conv, settings.d_state
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.ssm = SelectiveSSM(d_model, settings, scan_backend=scan_backend, conv_backend=conv_backend)
        self.ssm_reversed = (None if causal else
                             SelectiveSSM(d_model, settings, scan_backend=scan_backend, conv_backend=conv_backend))
        self.out_proj = writes_residual(nn.Linear(self.d_inner, d_model, bias=False))

    def forward(self, u: Tensor, *, causal: bool, state: MambaState | None = None,
                documents: Documents | None = None) -> Tensor:
        """With a state, u holds the positions after the `state.length` already seen: an empty state is
        filled by one pass over u (prefill), a filled one is advanced position by position."""
        self.check_call(causal, state, u, documents)
        # two views of one (B, L, 2E) tensor; chunk's backward writes both gradients into one buffer (one copy),
        # where unpacking a "b l (two e) -> two b e l" view stacked them first (two copies)
        x, z = (rearrange(half, "b l e -> b e l") for half in self.in_proj(u).chunk(2, dim=-1))
        if state is not None and state.length > 0:
            y = torch.stack([self.ssm.step(x[..., t], z[..., t], state) for t in range(x.shape[-1])], dim=-1)
        elif self.ssm_reversed is None:
            y = self.ssm(x, z, state, documents)
        else:
            flipped = None if documents is None else documents.reversed
            y = (self.ssm(x, z, documents=documents)
                 + self.ssm_reversed(x.flip(-1), z.flip(-1), documents=flipped).flip(-1)) / 2
        if state is not None:
            state.length += u.shape[1]
        return self.out_proj(rearrange(y, "b e l -> b l e"))

    def new_state(self, batch_size: int, max_len: int, *, dtype: torch.dtype,
                  device: torch.device | str) -> MambaState:
        """The state is fixed-size, so max_len bounds nothing here (the sampler watches `.length`)."""
        self.check_decodes()
        return MambaState(batch_size, self.d_inner, self.d_conv, self.d_state, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token (2 per multiply-add), the same at every seq_len (the scan is linear in it), and
        its direction fixed at construction (a bidirectional mixer scans twice): in_proj 2 d 2E and out_proj 2 E d,
        plus each direction's conv, x_proj, dt_proj and scan (SelectiveSSM.flops_per_token); gating, softplus
        and the direction average are O(E) and left out."""
        d = self.in_proj.in_features
        directions = 1 if self.built_causal else 2
        return 2 * d * 2 * self.d_inner + 2 * self.d_inner * d + directions * self.ssm.flops_per_token()

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """The conv window (activation dtype) and the float32 SSM state: the same at every seq_len."""
        conv = batch_size * self.d_inner * (self.d_conv - 1) * dtype.itemsize
        return conv + batch_size * self.d_inner * self.d_state * torch.float32.itemsize
