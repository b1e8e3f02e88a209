"""The Gated DeltaNet mixer (Yang, Kautz & Hatamizadeh, ICLR 2025) as fla's `GatedDeltaNet` layer, optionally
bidirectional.

    q, k, v  = silu(causal_conv1d(W_q u, W_k u, W_v u))     depthwise over positions, width d_conv, per channel
    q, k     = l2norm(q), l2norm(k)                          per head of head_dim channels (inside the op)
    beta     = sigmoid(W_b u)                                one write strength per value head (x 2 with
                                                             allow_neg_eigval: eigenvalues of I - beta k k^T < 0)
    g        = -exp(A_log) * softplus(W_a u + dt_bias)       log decay per value head, Mamba-2's parametrisation
    o        = gated_delta_rule(q, k, v, g, beta)            S_t = e^g S (I - beta k k^T) + beta v k^T, o = S q
    o        = rmsnorm(o) * silu(W_g u)                      per value head (fla's FusedRMSNormGated); without
                                                             the gate: rmsnorm(o)
    out      = out_proj(o)

Heads: n_heads query/key heads of head_dim channels and n_v_heads value heads (default n_heads) of
head_dim * expand_v channels; several value heads may share a query/key head (fla's grouped value attention).
Init as fla: A uniform in [0, 16] (A_log = log A), dt log-uniform in [dt_min, dt_max] through the softplus inverse,
the conv as nn.Conv1d, no weight decay on A_log and dt_bias.

Bidirectional (as our Mamba-2): the reversed sequence runs through a second direction (its own conv, A_log,
dt_bias) while the projections, the norm and out_proj are shared; the two outputs are averaged before the norm.
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
from archlab.kernels.gated_delta import CHUNK_SIZE, TRITON_MAX_HEAD_DIM, gated_delta_rule, gated_delta_state_update


class GatedDeltaNetSettings(MixerSettings):
    """model.gated_deltanet (fla's GatedDeltaNet defaults, sized for hidden 2048: presets shrink the heads)"""

    mlp: bool = Field(True, description="a SwiGLU MLP after the mixer in each block (fla's GatedDeltaNet blocks)")
    n_heads: int = Field(6, gt=0, description="query/key heads")
    n_v_heads: Optional[int] = Field(None, gt=0, description="value heads, a multiple of n_heads (grouped value "
                                                             "attention); None = n_heads")
    head_dim: int = Field(256, gt=0, description="channels per query/key head (the state's key size)")
    expand_v: float = Field(2.0, gt=0, description="value head channels = head_dim * expand_v (a whole number)")
    d_conv: int = Field(4, ge=2, le=4, description="width of the depthwise causal conv over q, k and v (2..4)")
    conv_bias: bool = Field(False, description="bias in the depthwise conv (fla: none)")
    use_gate: bool = Field(True, description="output gate silu(W_g u) after the per-head RMSNorm")
    allow_neg_eigval: bool = Field(False, description="beta = 2 sigmoid(W_b u), so I - beta k k^T can have negative "
                                                      "eigenvalues (Grazzi et al. 2025)")
    A_init_range: tuple[float, float] = Field((0.0, 16.0), description="A starts uniform in [min, max] per value "
                                              "head; the decay rate is A * softplus(W_a u + dt_bias)")
    dt_min: float = Field(0.001, gt=0, description="smallest initial softplus(dt_bias)")
    dt_max: float = Field(0.1, gt=0, description="largest initial softplus(dt_bias)")
    dt_init_floor: float = Field(1e-4, gt=0, description="initial softplus(dt_bias) is clamped at least to this")
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of the per-head output RMSNorm")

    @model_validator(mode="after")
    def _consistent(self) -> "GatedDeltaNetSettings":
        low, high = self.A_init_range
        if not 0 <= low < high:
            raise ValueError(f"model.gated_deltanet.A_init_range {list(self.A_init_range)} must be [min, max] with "
                             "0 <= min < max")
        if self.dt_min > self.dt_max:
            raise ValueError(f"model.gated_deltanet.dt_min={self.dt_min} must not exceed "
                             f"model.gated_deltanet.dt_max={self.dt_max}")
        if not math.isclose(self.head_dim * self.expand_v, round(self.head_dim * self.expand_v)):
            raise ValueError(f"model.gated_deltanet.head_dim * expand_v = {self.head_dim * self.expand_v} must be a "
                             "whole number of value channels; change expand_v")
        if self.n_v_heads is not None and self.n_v_heads % self.n_heads:
            raise ValueError(f"model.gated_deltanet.n_v_heads={self.n_v_heads} must be a multiple of "
                             f"model.gated_deltanet.n_heads={self.n_heads}")
        return self

    @property
    def value_heads(self) -> int:
        return self.n_v_heads or self.n_heads

    @property
    def value_head_dim(self) -> int:
        return round(self.head_dim * self.expand_v)

    def check_kernels(self, d_model: int, kernels: Mapping[str, str]) -> None:
        if kernels.get("gated_delta") == "triton" and max(self.head_dim, self.value_head_dim) > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"kernels.gated_delta=triton takes head dims up to {TRITON_MAX_HEAD_DIM}, got key "
                             f"{self.head_dim} and value {self.value_head_dim}; lower model.gated_deltanet.head_dim "
                             "or expand_v, or use kernels.gated_delta=auto")

    def narrowed(self, heads: int | None = None) -> "GatedDeltaNetSettings":
        """A predictor at half the width keeps the head count: half the head dim (`heads` counts attention's),
        validated again (head_dim * expand_v must stay whole)."""
        return self.model_validate(self.model_dump() | {"head_dim": max(1, self.head_dim // 2)})


class GatedDeltaNetState(RecurrentState):
    """Decoding state of one causal Gated DeltaNet mixer after `length` positions: fixed-size, whatever the length.

    conv_state (B, 2 H K + HV V, d_conv - 1) holds the last pre-conv q, k, v (activation dtype); delta_state
    (B, HV, K, V) the delta rule's state (float32, as the op keeps it).
    """

    def __init__(self, batch_size: int, conv_dim: int, d_conv: int, value_heads: int, head_dim: int,
                 value_head_dim: int, *, dtype: torch.dtype, device: torch.device | str):
        super().__init__(batch_size, conv_dim, d_conv, dtype=dtype, device=device)
        self.delta_state = torch.zeros(batch_size, value_heads, head_dim, value_head_dim, dtype=torch.float32,
                                       device=device)


class DeltaDirection(nn.Module):
    """One direction: causal conv + SiLU over q, k and v, then the gated delta rule with its own A and dt bias."""

    def __init__(self, cfg: GatedDeltaNetSettings, *, delta_backend: str, conv_backend: str):
        super().__init__()
        self.cfg, self.delta_backend, self.conv_backend = cfg, delta_backend, conv_backend
        self.key_dim, self.value_dim = cfg.n_heads * cfg.head_dim, cfg.value_heads * cfg.value_head_dim
        self.conv_weight, self.conv_bias = conv_parameters(2 * self.key_dim + self.value_dim, cfg.d_conv,
                                                           cfg.conv_bias)
        self.dt_bias = nn.Parameter(initial_dt_bias(cfg.value_heads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(cfg.value_heads).uniform_(*cfg.A_init_range)))
        no_weight_decay(self.A_log, self.dt_bias)

    def log_decay(self, a: Tensor) -> Tensor:
        """g = -exp(A_log) softplus(a + dt_bias), float32: a (..., HV) -> (..., HV)."""
        return -torch.exp(self.A_log.float()) * F.softplus(a.float() + self.dt_bias.float())

    def _split(self, qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 2 H K + HV V) -> q, k (..., H, K) and v (..., HV, V): views."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        return (rearrange(q, "... (h d) -> ... h d", d=self.cfg.head_dim),
                rearrange(k, "... (h d) -> ... h d", d=self.cfg.head_dim),
                rearrange(v, "... (h d) -> ... h d", d=self.cfg.value_head_dim))

    def forward(self, qkv: Tensor, a: Tensor, beta: Tensor, state: GatedDeltaNetState | None = None,
                documents: Documents | None = None) -> Tensor:
        """qkv (B, L, 2 H K + HV V), a and beta (B, L, HV) -> o (B, L, HV, V). A (fresh) `state` is filled for
        decoding onwards; with `documents` the conv and the delta rule restart at each document (the rule runs the
        rows packed into one, cut at every document)."""
        qkv = rearrange(qkv, "b l c -> b c l")
        if state is not None:
            state.keep_conv_inputs(qkv)
        qkv = causal_conv1d(qkv, self.conv_weight, self.conv_bias, activation="silu", backend=self.conv_backend,
                            seq_idx=None if documents is None else documents.seq_idx)
        q, k, v = self._split(rearrange(qkv, "b c l -> b l c"))
        g = self.log_decay(a)
        if documents is not None:
            q, k, v, g, beta = (documents.pack(t) for t in (q, k, v, g, beta))
        out = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, output_final_state=state is not None,
                               cu_seqlens=None if documents is None else documents.cu_seqlens,
                               backend=self.delta_backend)
        if documents is not None:
            return documents.unpack(out)
        if state is None:
            return out
        out, final_state = out
        state.delta_state.copy_(final_state)
        return out

    def step(self, qkv: Tensor, a: Tensor, beta: Tensor, state: GatedDeltaNetState) -> Tensor:
        """One position: qkv (B, 2 H K + HV V), a and beta (B, HV) -> (B, HV, V); advances the state."""
        qkv = causal_conv1d_update(qkv, state.conv_state, self.conv_weight, self.conv_bias, activation="silu")
        q, k, v = self._split(qkv)
        return gated_delta_state_update(state.delta_state, q, k, v, self.log_decay(a), beta, use_qk_l2norm=True)

    def flops_per_token(self, seq_len: int, chunk_size: int) -> int:
        """conv 2 C d_conv, plus the chunked delta rule's matmuls (fla's algorithm) per value head with chunks of
        Q = min(chunk_size, seq_len): k k^T, the WY factors w and u, q k^T and the scores times the new values,
        each over the (Q + 1) / 2 positions a causal chunk row holds on average, then three K x V products with the
        state (w S, q S and the state's update)."""
        conv_dim, width = self.conv_weight.shape
        cfg, chunk = self.cfg, min(chunk_size, seq_len)
        key, value = cfg.head_dim, cfg.value_head_dim
        within_chunks = (chunk + 1) * (3 * key + 2 * value)  # 2 FLOPs x (Q + 1) / 2 positions
        return 2 * conv_dim * width + cfg.value_heads * (within_chunks + 6 * key * value)


@register_mixer
class GatedDeltaNetMixer(BuiltDirectionMixer):
    """u (B, L, d) -> (B, L, d). Built causal or bidirectional (their weights differ); decoding is causal only."""

    name = "gated_deltanet"
    title = "Gated DeltaNet"
    settings = GatedDeltaNetSettings
    kernel_ops = ("gated_delta", "causal_conv1d")

    def __init__(self, d_model: int, settings: GatedDeltaNetSettings, *, causal: bool = True,
                 kernels: Mapping[str, str] | None = None):
        super().__init__(d_model, settings, causal=causal, kernels=kernels)
        backends = dict(delta_backend=backend_for(kernels, "gated_delta"),
                        conv_backend=backend_for(kernels, "causal_conv1d"))
        self.cfg = settings
        self.delta = DeltaDirection(settings, **backends)
        self.delta_reversed = None if causal else DeltaDirection(settings, **backends)
        self.conv_dim = 2 * self.delta.key_dim + self.delta.value_dim
        # rows: q, k, v (convolved together), the output gate, a (decay), b (beta)
        self.parts = [self.conv_dim, self.delta.value_dim if settings.use_gate else 0, settings.value_heads,
                      settings.value_heads]
        self.in_proj = nn.Linear(d_model, sum(self.parts), bias=False)
        self.norm = nn.RMSNorm(settings.value_head_dim, eps=settings.norm_eps)
        self.out_proj = writes_residual(nn.Linear(self.delta.value_dim, d_model, bias=False))

    def forward(self, u: Tensor, *, causal: bool, state: GatedDeltaNetState | None = None,
                documents: Documents | None = None) -> Tensor:
        """With a state, u holds the positions after the `state.length` already seen: an empty state is filled by
        one pass over u (prefill), a filled one is advanced position by position."""
        self.check_call(causal, state, u, documents)
        # one matmul per part (rows of in_proj's weight): qkv comes out contiguous, which the conv reads channel-last
        qkv, gate, a, b = (F.linear(u, weight) for weight in self.in_proj.weight.split(self.parts))
        beta = torch.sigmoid(b.float()) * (2 if self.cfg.allow_neg_eigval else 1)
        if state is not None and state.length > 0:
            o = torch.stack([self.delta.step(qkv[:, t], a[:, t], beta[:, t], state) for t in range(u.shape[1])],
                            dim=1)
        elif self.delta_reversed is None:
            o = self.delta(qkv, a, beta, state, documents)
        else:
            reversed_documents = None if documents is None else documents.reversed
            o = (self.delta(qkv, a, beta, documents=documents)
                 + self.delta_reversed(*(t.flip(1) for t in (qkv, a, beta)), documents=reversed_documents).flip(1)) / 2
        if state is not None:
            state.length += u.shape[1]
        return self.out_proj(rearrange(self._gated_norm(o, gate), "b l h v -> b l (h v)"))

    def _gated_norm(self, o: Tensor, gate: Tensor) -> Tensor:
        """RMSNorm over each value head's channels in float32, then * silu(gate) (fla's FusedRMSNormGated);
        returns o's dtype."""
        out = F.rms_norm(o.float(), (o.shape[-1],), self.norm.weight.float(), self.norm.eps)
        if self.cfg.use_gate:
            out = out * F.silu(rearrange(gate, "... (h v) -> ... h v", v=o.shape[-1]).float())
        return out.to(o.dtype)

    def new_state(self, batch_size: int, max_len: int, *, dtype: torch.dtype,
                  device: torch.device | str) -> GatedDeltaNetState:
        """The state is fixed-size, so max_len bounds nothing here (the sampler watches `.length`)."""
        self.check_decodes()
        cfg = self.cfg
        return GatedDeltaNetState(batch_size, self.conv_dim, cfg.d_conv, cfg.value_heads, cfg.head_dim,
                                  cfg.value_head_dim, dtype=dtype, device=device)

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:
        """Forward FLOPs per token (2 per multiply-add): in_proj 2 d (2 H K + 2 HV V + 2 HV) (HV V less without the
        gate) and out_proj 2 HV V d, plus each direction's conv and delta rule (DeltaDirection.flops_per_token);
        the l2 norms, gates, softplus, the output norm and the direction average are O(width) and left out. The
        direction is fixed at construction (a bidirectional mixer runs twice)."""
        d = self.in_proj.in_features
        directions = 1 if self.built_causal else 2
        return (2 * d * self.in_proj.out_features + 2 * self.delta.value_dim * d
                + directions * self.delta.flops_per_token(seq_len, CHUNK_SIZE))  # the kernels' chunk length

    def state_bytes(self, batch_size: int, seq_len: int, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """The conv window (activation dtype) and the float32 delta-rule state: the same at every seq_len."""
        cfg = self.cfg
        conv = batch_size * self.conv_dim * (cfg.d_conv - 1) * dtype.itemsize
        return conv + batch_size * cfg.value_heads * cfg.head_dim * cfg.value_head_dim * torch.float32.itemsize
