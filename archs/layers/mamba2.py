"""The Mamba-2 mixer (Dao & Gu 2024) as mamba_ssm's `Mamba2` (modules/mamba2.py), optionally bidirectional.

    z, xBC, dt = in_proj(u)                      d -> E + (E + 2 G N) + H, no bias (mamba_ssm's order)
    xBC        = silu(causal_conv1d(xBC))        depthwise over positions, width d_conv, bias
    x, B, C    = split(xBC)                      x (E = H heads of P channels), B and C (G groups of N)
    y          = ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus)    one scalar decay per head
    y          = rmsnorm(y * silu(z)) * weight   gated RMSNorm over each group's E / G channels
    out        = out_proj(y)                     E -> d, no bias

mamba_ssm's default norm_before_gate=False gates first and normalises the product; norm_before_gate=True is
norm(y) * silu(z). With rmsnorm=False the gate is silu(z) alone, applied inside the SSD op.

Bidirectional (like our Mamba-1): the reversed sequence goes through a second set of direction-specific weights
(conv, A_log, dt_bias, D) while in_proj, the norm and out_proj are shared; the two directions' SSD outputs are
averaged before the gate and norm.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field, model_validator
from torch import Tensor, nn

from archlab.archs.documents import Documents
from archlab.archs.layers.mamba import conv_parameters, initial_dt_bias
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
from archlab.kernels.ssd import ssd, ssd_state_update


class Mamba2Settings(MixerSettings):
    """model.mamba2 (mamba_ssm's Mamba2 defaults)"""

    mlp: bool = Field(False, description="a SwiGLU MLP after the mixer in each block (mamba_ssm: none)")
    d_state: int = Field(128, gt=0, description="SSM state size N per head")
    d_conv: int = Field(4, ge=2, le=4, description="width of the depthwise causal conv over x, B and C (2..4)")
    expand: int = Field(2, gt=0, description="inner width E = expand * d_model")
    head_dim: int = Field(64, gt=0, description="channels P per head; heads H = E / head_dim")
    n_groups: int = Field(1, gt=0, description="groups G of B and C, each shared by H / G heads")
    A_init_range: tuple[float, float] = Field((1.0, 16.0), description="A = -exp(A_log) starts uniform in "
                                              "-[min, max], one per head")
    dt_min: float = Field(0.001, gt=0, description="smallest initial step size dt")
    dt_max: float = Field(0.1, gt=0, description="largest initial step size dt")
    dt_init_floor: float = Field(1e-4, gt=0, description="initial dt is clamped at least to this")
    dt_limit: Optional[tuple[float, float]] = Field(None, description="dt is clamped to [min, max] in the SSD; None "
                                                    "= [0, inf), mamba_ssm's default")
    D_has_hdim: bool = Field(False, description="the skip D per channel (H, P) instead of per head (H,)")
    rmsnorm: bool = Field(True, description="gated RMSNorm before out_proj; False: y * silu(z) alone")
    norm_before_gate: bool = Field(False, description="True: norm(y) * silu(z); False (mamba_ssm's default): "
                                                      "norm(y * silu(z))")
    conv_bias: bool = Field(True, description="bias in the depthwise conv")
    chunk_size: int = Field(256, gt=0, description="positions per chunk of the SSD (a power of two; mamba_ssm: "
                                                   "256); the torch path caps it at the sequence length")

    @model_validator(mode="after")
    def _consistent(self) -> "Mamba2Settings":
        low, high = self.A_init_range
        if not 0 < low <= high:
            raise ValueError(f"model.mamba2.A_init_range {list(self.A_init_range)} must be [min, max] with "
                             "0 < min <= max")
        if self.dt_min > self.dt_max:
            raise ValueError(f"model.mamba2.dt_min={self.dt_min} must not exceed model.mamba2.dt_max={self.dt_max}")
        if self.dt_limit is not None and not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"model.mamba2.dt_limit {list(self.dt_limit)} must be [min, max] with 0 <= min <= max")
        if self.chunk_size & (self.chunk_size - 1):
            raise ValueError(f"model.mamba2.chunk_size={self.chunk_size} must be a power of two")
        return self

    def check(self, d_model: int) -> None:
        inner = self.expand * d_model
        if inner % self.head_dim:
            raise ValueError(f"model.mamba2.head_dim={self.head_dim} does not divide the inner width "
                             f"expand * d_model = {inner}; change model.mamba2.head_dim or model.d_model")
        if (inner // self.head_dim) % self.n_groups:
            raise ValueError(f"model.mamba2.n_groups={self.n_groups} does not divide the {inner // self.head_dim} "
                             f"heads (expand * d_model / head_dim); change model.mamba2.n_groups")

    def d_model_multiple(self) -> int:
        per_group = self.head_dim * self.n_groups  # expand * d_model must be a multiple of it
        return per_group // math.gcd(self.expand, per_group)

    def narrowed(self, heads: int | None = None) -> "Mamba2Settings":
        """A predictor at half the width keeps the head count: half the head dim (`heads` counts attention's)."""
        return self.model_copy(update={"head_dim": max(1, self.head_dim // 2)})


class Mamba2State(RecurrentState):
    """Decoding state of one causal Mamba-2 mixer after `length` positions: fixed-size, whatever the length.

    conv_state (B, E + 2 G N, d_conv - 1) holds the last pre-conv inputs (activation dtype), ssm_state
    (B, H, P, N) the SSD state (float32, as the op keeps it).
    """

    def __init__(self, batch_size: int, conv_dim: int, d_conv: int, heads: int, head_dim: int, d_state: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__(batch_size, conv_dim, d_conv, dtype=dtype, device=device)
        self.ssm_state = torch.zeros(batch_size, heads, head_dim, d_state, dtype=torch.float32, device=device)


class SSDDirection(nn.Module):
    """One scan direction: causal conv + SiLU over x, B and C, then the SSD with its own A, D and dt bias."""

    def __init__(self, cfg: Mamba2Settings, d_inner: int, heads: int, *, ssd_backend: str, conv_backend: str):
        super().__init__()
        self.cfg, self.d_inner, self.heads = cfg, d_inner, heads
        self.ssd_backend, self.conv_backend = ssd_backend, conv_backend
        self.dt_limit = cfg.dt_limit or (0.0, math.inf)
        conv_dim = d_inner + 2 * cfg.n_groups * cfg.d_state
        self.conv_weight, self.conv_bias = conv_parameters(conv_dim, cfg.d_conv, cfg.conv_bias)
        self.dt_bias = nn.Parameter(initial_dt_bias(heads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(*cfg.A_init_range)))
        self.D = nn.Parameter(torch.ones(d_inner if cfg.D_has_hdim else heads))
        no_weight_decay(self.A_log, self.D, self.dt_bias)

    def A(self) -> Tensor:
        return -torch.exp(self.A_log.float())

    def skip(self) -> Tensor:
        """D as the SSD takes it: (H,) or (H, P)."""
        return rearrange(self.D, "(h p) -> h p", h=self.heads) if self.cfg.D_has_hdim else self.D

    def _split(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., E + 2 G N) -> x (..., H, P), B and C (..., G, N): views."""
        groups, n = self.cfg.n_groups, self.cfg.d_state
        x, B, C = xBC.split([self.d_inner, groups * n, groups * n], dim=-1)
        return (rearrange(x, "... (h p) -> ... h p", h=self.heads), rearrange(B, "... (g n) -> ... g n", g=groups),
                rearrange(C, "... (g n) -> ... g n", g=groups))

    def forward(self, xBC: Tensor, dt: Tensor, z: Tensor | None, state: Mamba2State | None = None,
                documents: Documents | None = None) -> Tensor:
        """xBC (B, L, E + 2 G N), dt (B, L, H), z (B, L, H, P) or None -> y (B, L, H, P). A (fresh) `state` is
        filled for decoding onwards; with `documents` the conv and the SSD restart at each document (the SSD runs
        the rows packed into one, cut at every document)."""
        xBC = rearrange(xBC, "b l c -> b c l")
        if state is not None:
            state.keep_conv_inputs(xBC)
        xBC = causal_conv1d(xBC, self.conv_weight, self.conv_bias, activation="silu", backend=self.conv_backend,
                            seq_idx=None if documents is None else documents.seq_idx)
        x, B, C = self._split(rearrange(xBC, "b c l -> b l c"))
        if documents is not None:
            x, dt, B, C, z = (None if t is None else documents.pack(t) for t in (x, dt, B, C, z))
        out = ssd(x, dt, self.A(), B, C, chunk_size=self.cfg.chunk_size, D=self.skip(), z=z, dt_bias=self.dt_bias,
                  dt_softplus=True, dt_limit=self.dt_limit, return_final_states=state is not None,
                  cu_seqlens=None if documents is None else documents.cu_seqlens, backend=self.ssd_backend)
        if documents is not None:
            return documents.unpack(out)
        if state is None:
            return out
        out, final_states = out
        state.ssm_state.copy_(final_states)
        return out

    def step(self, xBC: Tensor, dt: Tensor, z: Tensor | None, state: Mamba2State) -> Tensor:
        """One position: xBC (B, E + 2 G N), dt (B, H), z (B, H, P) or None -> (B, H, P); advances the state."""
        xBC = causal_conv1d_update(xBC, state.conv_state, self.conv_weight, self.conv_bias, activation="silu")
        x, B, C = self._split(xBC)
        return ssd_state_update(state.ssm_state, x, dt, self.A(), B, C, D=self.skip(), z=z, dt_bias=self.dt_bias,
                                dt_softplus=True, dt_limit=self.dt_limit)

    def flops_per_token(self, seq_len: int) -> int:
        """conv 2 (E + 2GN) d_conv, plus the chunked SSD's matmuls (mamba_ssm's algorithm) with chunks of
        Q = min(chunk_size, seq_len) positions: C B^T per group and the within-chunk mixing of x per head, each
        over the (Q + 1) / 2 positions a causal chunk row holds on average, then each chunk's state and the
        states' read-out, 2 H P N each."""
        conv_dim, width = self.conv_weight.shape
        cfg, chunk = self.cfg, min(self.cfg.chunk_size, seq_len)
        within_chunks = (chunk + 1) * (cfg.n_groups * cfg.d_state + self.d_inner)
        return 2 * conv_dim * width + within_chunks + 4 * self.d_inner * cfg.d_state


@register_mixer
class Mamba2Mixer(BuiltDirectionMixer):
    """u (B, L, d) -> (B, L, d). Built causal or bidirectional (their weights differ); decoding is causal only."""

    name = "mamba2"
    title = "Mamba-2"
    settings = Mamba2Settings
    kernel_ops = ("ssd", "causal_conv1d")

    def __init__(self, d_model: int, settings: Mamba2Settings, *, causal: bool = True,
                 kernels: Mapping[str, str] | None = None):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        backends = dict(ssd_backend=backend_for(kernels, "ssd"), conv_backend=backend_for(kernels, "causal_conv1d"))
        self.cfg = settings
        self.d_inner = settings.expand * d_model
        self.heads = self.d_inner // settings.head_dim
        self.conv_dim = self.d_inner + 2 * settings.n_groups * settings.d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.heads, bias=False)
        self.ssd = SSDDirection(settings, self.d_inner, self.heads, **backends)
        self.ssd_reversed = None if causal else SSDDirection(settings, self.d_inner, self.heads, **backends)
        self.norm = nn.RMSNorm(self.d_inner, eps=1e-5) if settings.rmsnorm else None
        self.out_proj = writes_residual(nn.Linear(self.d_inner, d_model, bias=False))

    def forward(self, u: Tensor, *, causal: bool, state: Mamba2State | None = None,
                documents: Documents | None = None) -> Tensor:
        """With a state, u holds the positions after the `state.length` already seen: an empty state is
        filled by one pass over u (prefill), a filled one is advanced position by position."""
        self.check_call(causal, state, u, documents)
        # one matmul per part (rows of in_proj's weight): xBC comes out contiguous, which the conv reads and writes
        # channel-last without copies (a view into the joint output cost the layer ~1.5x its conv time on CPU)
        z, xBC, dt = (F.linear(u, weight) for weight in
                      self.in_proj.weight.split([self.d_inner, self.conv_dim, self.heads]))
        z = rearrange(z, "b l (h p) -> b l h p", h=self.heads)
        gate_in_ssd = None if self.norm is not None else z  # without the norm, silu(z) gates inside the op
        if state is not None and state.length > 0:
            y = torch.stack([self.ssd.step(xBC[:, t], dt[:, t], None if gate_in_ssd is None else gate_in_ssd[:, t],
                                           state) for t in range(u.shape[1])], dim=1)
        elif self.ssd_reversed is None:
            y = self.ssd(xBC, dt, gate_in_ssd, state, documents)
        else:
            flipped = [None if t is None else t.flip(1) for t in (xBC, dt, gate_in_ssd)]
            reversed_documents = None if documents is None else documents.reversed
            y = (self.ssd(xBC, dt, gate_in_ssd, documents=documents)
                 + self.ssd_reversed(*flipped, documents=reversed_documents).flip(1)) / 2
        if state is not None:
            state.length += u.shape[1]
        y = rearrange(y, "b l h p -> b l (h p)")
        if self.norm is not None:
            y = self._gated_norm(y, rearrange(z, "b l h p -> b l (h p)"))
        return self.out_proj(y)

    def _gated_norm(self, y: Tensor, z: Tensor) -> Tensor:
        """RMSNorm over each group's channels (mamba_ssm's RMSNormGated, group_size E / G), in float32, with the
        silu(z) gate before or after it; returns y's dtype."""
        y32, gate = y.float(), F.silu(z.float())
        if not self.cfg.norm_before_gate:
            y32 = y32 * gate
        grouped = rearrange(y32, "... (g c) -> ... g c", g=self.cfg.n_groups)
        normed = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + self.norm.eps)
        out = rearrange(normed, "... g c -> ... (g c)") * self.norm.weight.float()
        if self.cfg.norm_before_gate:
            out = out * gate
        return out.to(y.dtype)

    def new_state(self, batch_size: int, max_len: int, *, dtype: torch.dtype,
                  device: torch.device | str) -> Mamba2State:
        """The state is fixed-size, so max_len bounds nothing here (the sampler watches `.length`)."""
        self.check_decodes()
        return Mamba2State(batch_size, self.conv_dim, self.cfg.d_conv, self.heads, self.cfg.head_dim,
                           self.cfg.d_state, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token (2 per multiply-add): in_proj 2 d (2E + 2GN + H) and out_proj 2 E d, plus each
        direction's conv and SSD (SSDDirection.flops_per_token); gating, softplus, the norm and the direction
        average are O(E) and left out. The direction is fixed at construction (a bidirectional mixer scans twice)."""
        d = self.in_proj.in_features
        directions = 1 if self.built_causal else 2
        return (2 * d * self.in_proj.out_features + 2 * self.d_inner * d
                + directions * self.ssd.flops_per_token(seq_len))

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """The conv window (activation dtype) and the float32 SSD state: the same at every seq_len."""
        conv = batch_size * self.conv_dim * (self.cfg.d_conv - 1) * dtype.itemsize
        return conv + batch_size * self.heads * self.cfg.head_dim * self.cfg.d_state * torch.float32.itemsize
