"""Typed model configuration (the `model:` section of a run config).

Lives in archs/ so that model builders need nothing from train/; the trainer embeds it in its config.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from archlab.kernels.attention import MAX_HEAD_DIM

BYTE_VOCAB_SIZE = 256


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
    causal: Optional[bool] = Field(None, description="None = what the objective needs")

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        from archlab.archs.registry import BACKBONES, OBJECTIVES, closest

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}{closest(self.backbone, BACKBONES)}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}{closest(self.objective, OBJECTIVES)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads={self.n_heads} does not divide d_model={self.d_model}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"head dim d_model/n_heads={self.head_dim} is above {MAX_HEAD_DIM}; raise n_heads")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        needed = OBJECTIVES[self.objective].requires_causal
        if needed is not None and self.causal is not None and self.causal != needed:
            kind, setting = ("causal", "true") if needed else ("bidirectional", "false")
            raise ValueError(f"objective {self.objective} needs a {kind} backbone; "
                             f"set model.causal={setting} or leave it unset")
        return self

    @property
    def vocab_size(self) -> int:
        """Byte symbols; an objective that needs extra symbols (a mask token) adds them itself."""
        return BYTE_VOCAB_SIZE

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)
