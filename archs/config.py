"""Typed model configuration (the `model:` section of a run config).

Lives in archs/ so that model builders need nothing from train/; the trainer embeds it in its config.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from archlab.kernels.attention import MAX_HEAD_DIM

BYTE_VOCAB_SIZE = 256

# Backbones built from attention layers: the head-shape checks apply to these only.
ATTENTION_BACKBONES = ("transformer", "hybrid")


# masked_span with EMA + stop-gradient alone collapses on bytes (quickstart, 638 steps: mean cosine 0.996, effective
# rank 3.5 of 128); SIGReg at this weight kept it healthy there (rank 35, cosine 0.03, per-dim std 0.97).
MASKED_SPAN_SIGREG_WEIGHT = 0.001


class JepaConfig(BaseModel):
    """model.jepa: the JEPA objective's settings (archs/objectives/jepa.py explains each mode)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    mode: Literal["next_latent", "masked_span"] = Field(
        "next_latent", description="next_latent: causal encoder predicts future latents; masked_span: bidirectional "
                                   "encoder predicts the latents of hidden spans (I-JEPA / data2vec style)")
    offsets: list[int] = Field([1, 4, 16], min_length=1, description="next_latent: predict z_{t+k} for these k")
    pool: int = Field(1, gt=0, description="next_latent: the target is the mean of `pool` latents from t+k on")
    loss: Literal["smooth_l1", "mse"] = Field("smooth_l1", description="distance between prediction and target")
    target_norm: Literal["instance", "layer"] = Field(
        "instance", description="instance: each target channel standardised over the positions of its sequence "
                                "(data2vec), so features constant within a sequence are worth nothing; layer: "
                                "parameter-free LayerNorm over channels (I-JEPA), which lets a next_latent encoder "
                                "collapse onto slow, sequence-level features")
    target_encoder: Literal["ema", "online"] = Field(
        "ema", description="ema: an EMA copy, no gradient; online: the context encoder itself with gradient (the "
                           "collapse-prone ablation: no EMA, no stop-gradient)")
    ema_momentum_start: float = Field(0.996, ge=0, le=1, description="EMA momentum at step 0 (I-JEPA: 0.996)")
    ema_momentum_end: float = Field(1.0, ge=0, le=1, description="EMA momentum at train.max_steps (linear)")
    predictor_backbone: Optional[Literal["transformer", "mamba"]] = Field(
        None, description="None = mamba for a mamba encoder, else transformer")
    predictor_depth: int = Field(1, gt=0, description="predictor layers")
    predictor_width: Optional[int] = Field(None, gt=0, description="None = d_model // 2")
    predictor_heads: Optional[int] = Field(None, gt=0, description="None = max(1, n_heads // 2)")
    spans: int = Field(4, gt=0, description="masked_span: target spans hidden per sequence (they may overlap)")
    span_length: tuple[int, int] = Field((8, 16), description="masked_span: span lengths drawn uniformly in [min, max]")
    ar_weight: float = Field(0.0, ge=0, description="> 0: hybrid; add ar_weight x next-byte cross-entropy (LLM-JEPA)")
    latent_weight: float = Field(1.0, ge=0, description="weight of the latent prediction loss")
    vicreg_variance_weight: float = Field(0.0, ge=0, description="VICReg variance hinge on context representations")
    vicreg_covariance_weight: float = Field(0.0, ge=0, description="VICReg covariance penalty on them")
    sigreg_weight: float = Field(0.0, ge=0, description="LeJEPA SIGReg (isotropic Gaussian) penalty on them; "
                                 f"unset: {MASKED_SPAN_SIGREG_WEIGHT} for masked_span, 0 for next_latent")
    sigreg_directions: int = Field(64, gt=0, description="random 1-D projections SIGReg tests per step")
    probe: Literal["linear", "mlp"] = Field("linear", description="byte probe on stop-gradient representations")

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data):
        """masked_span needs a regulariser against collapse: SIGReg unless the config sets sigreg_weight."""
        if isinstance(data, dict) and data.get("mode") == "masked_span" and "sigreg_weight" not in data:
            return data | {"sigreg_weight": MASKED_SPAN_SIGREG_WEIGHT}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "JepaConfig":
        if any(k < 1 for k in self.offsets) or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"jepa.offsets {self.offsets} must be distinct positive integers")
        low, high = self.span_length
        if not 1 <= low <= high:
            raise ValueError(f"jepa.span_length {list(self.span_length)} must be [min, max] with 1 <= min <= max")
        if self.mode == "masked_span" and self.ar_weight > 0:
            raise ValueError("jepa.ar_weight > 0 (next-byte loss) needs mode=next_latent: a bidirectional encoder "
                             "sees the next byte")
        if self.ar_weight == 0 and self.latent_weight == 0:
            raise ValueError("jepa.latent_weight and jepa.ar_weight are both 0: nothing would train the encoder")
        return self


# Settings added after runs had been saved, whose default for new runs is not how those runs were built: a saved
# model config (a checkpoint's meta.json, a run's config.yaml) of that objective that lacks the key was built with
# this value. (objective, key in its section model.<objective>) -> value. Other objectives ignore the section.
PREDATED_VALUES = {("jepa", "target_norm"): "layer"}


def complete_saved_model_config(saved: dict) -> dict:
    """A model config as an older archlab saved it (JSON-like), completed: each key it predates gets the value it
    was built with (PREDATED_VALUES, for runs of that objective), every other missing key today's default."""
    complete = ModelConfig().model_dump(mode="json")
    for key, value in saved.items():
        nested = isinstance(value, dict) and isinstance(complete.get(key), dict)
        complete[key] = complete[key] | value if nested else value
    for (objective, key), value in PREDATED_VALUES.items():
        section = saved.get(objective)
        if saved.get("objective") == objective and isinstance(section, dict) and key not in section:
            complete[objective][key] = value
    return complete


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    backbone: str = "transformer"
    objective: str = "autoregressive"
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: Optional[int] = Field(None, gt=0, description="grouped-query attention; None = n_heads")
    mlp_hidden: Optional[int] = Field(None, gt=0, description="SwiGLU width; None = 8/3 d_model rounded up to 64")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    causal: Optional[bool] = Field(None, description="None = what the objective needs; a bidirectional Mamba "
                                   "also scans the reversed sequence and averages the two directions")
    # Mamba-1 (mamba_ssm's defaults)
    d_state: int = Field(16, gt=0, description="Mamba: SSM state size N per channel")
    d_conv: int = Field(4, ge=2, le=4, description="Mamba: width of the depthwise causal conv (2..4)")
    expand: int = Field(2, gt=0, description="Mamba: inner width E = expand * d_model")
    dt_rank: Optional[int] = Field(None, gt=0, description="Mamba: rank of the dt projection; None = ceil(d_model/16)")
    dt_min: float = Field(0.001, gt=0, description="Mamba: smallest initial step size dt")
    dt_max: float = Field(0.1, gt=0, description="Mamba: largest initial step size dt")
    dt_init_floor: float = Field(1e-4, gt=0, description="Mamba: initial dt is clamped at least to this")
    conv_bias: bool = Field(True, description="Mamba: bias in the depthwise conv")
    attn_layers: Optional[list[int]] = Field(None, description="hybrid: indices of the attention + SwiGLU "
                                             "blocks (0-based); the other layers are Mamba blocks")
    # masked diffusion (objective=masked_diffusion; the other objectives ignore these)
    noise_schedule: Literal["log_linear", "cosine"] = Field(
        "log_linear", description="masked_diffusion: alpha_t (probability a byte is still unmasked at time t); "
                                  "log_linear = 1 - t, cosine = cos(pi t / 2)")
    diffusion_eval_draws: int = Field(4, gt=0, description="masked_diffusion: (t, mask) draws per eval batch "
                                      "averaged into val bpb (fixed seed: the same batch gives the same figure)")
    jepa: JepaConfig = Field(JepaConfig(), description="objective=jepa: its settings (other objectives ignore them)")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        from archlab.archs.registry import BACKBONES, OBJECTIVES, closest

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}{closest(self.backbone, BACKBONES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}{closest(self.objective, OBJECTIVES)}")
        if self.has_attention:
            self._check_attention_shapes()
        self._check_mamba_settings()
        OBJECTIVES[self.objective].check_config(self)
        needed = OBJECTIVES[self.objective].causality(self)
        if needed is not None and self.causal is not None and self.causal != needed:
            kind, setting = ("causal", "true") if needed else ("bidirectional", "false")
            raise ValueError(f"objective {self.objective} needs a {kind} backbone; "
                             f"set model.causal={setting} or leave it unset")
        return self

    def _check_attention_shapes(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} is above {MAX_HEAD_DIM}; raise n_heads")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    def _check_mamba_settings(self) -> None:
        if self.dt_min > self.dt_max:
            raise ValueError(f"dt_min={self.dt_min} must not exceed dt_max={self.dt_max}")
        if self.backbone != "hybrid":
            if self.attn_layers is not None:
                raise ValueError(f"attn_layers is for backbone=hybrid, not {self.backbone}; remove model.attn_layers")
            return
        if not self.attn_layers:
            raise ValueError("backbone=hybrid needs model.attn_layers, the indices of its attention blocks "
                             "(e.g. [1]); use backbone=mamba for none")
        outside = [i for i in self.attn_layers if not 0 <= i < self.n_layers]
        if outside:
            raise ValueError(f"attn_layers {outside} outside 0..{self.n_layers - 1} (n_layers={self.n_layers})")
        if len(set(self.attn_layers)) != len(self.attn_layers):
            raise ValueError(f"attn_layers {self.attn_layers} repeats an index; list each attention layer once")

    @property
    def vocab_size(self) -> int:
        """Byte symbols; an objective that needs extra symbols (a mask token) adds them itself."""
        return BYTE_VOCAB_SIZE

    @property
    def runs_causally(self) -> bool:
        """Whether the backbone runs causally. The validator has checked model.causal against the objective;
        one that works either way runs causally unless the config says otherwise."""
        from archlab.archs.registry import OBJECTIVES

        return self.causal if self.causal is not None else OBJECTIVES[self.objective].causality(self) is not False

    @property
    def has_attention(self) -> bool:
        return self.backbone in ATTENTION_BACKBONES

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def d_inner(self) -> int:
        """Mamba: the expanded width E the conv and the scan run at."""
        return self.expand * self.d_model

    @property
    def dt_rank_or_default(self) -> int:
        return self.dt_rank or math.ceil(self.d_model / 16)
