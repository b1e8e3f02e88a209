"""Typed model configuration (the `model:` section of a run config).

Lives in archs/ so that model builders need nothing from train/; the trainer embeds it in its config.
"""
from __future__ import annotations

import difflib
import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

import archlab.archs.layers  # noqa: F401 - registers the shipped mixers
from archlab.archs.config_migration import (
    LEGACY_MIXER_KEYS,
    merge_flat_keys,
    migrate_legacy_model,
    migrate_legacy_predictor,
)
from archlab.archs.layers.mixer import MIXERS, MixerSettings, closest
from archlab.archs.pattern import expand_layers, is_bare_name, stack_name

BYTE_VOCAB_SIZE = 256


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
    predictor_mixer: Optional[str] = Field(
        None, description="the predictor's mixer (any registered one); None = the encoder's mixer when its stack "
                          "has one kind, else attention")
    predictor_depth: int = Field(1, gt=0, description="predictor layers")
    predictor_width: Optional[int] = Field(None, gt=0, description="None = d_model // 2")
    predictor_heads: Optional[int] = Field(None, gt=0, description="a predictor with heads (attention): its "
                                           "heads; None = max(1, the encoder's attention.n_heads // 2)")
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
        """masked_span needs a regulariser against collapse: SIGReg unless the config sets sigreg_weight.
        The old key predictor_backbone is read as predictor_mixer."""
        data = migrate_legacy_predictor(data)
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
        if self.predictor_mixer is not None and self.predictor_mixer not in MIXERS:
            raise ValueError(f"jepa.predictor_mixer: unknown mixer {self.predictor_mixer!r}"
                             f"{closest(self.predictor_mixer, MIXERS)}")
        return self

    def predictor_mixer_for(self, encoder_mixers: list[str]) -> str:
        """The predictor's mixer for an encoder stack of these mixers."""
        return predictor_mixer(self.predictor_mixer, encoder_mixers)


def predictor_mixer(choice: str | None, encoder_mixers: list[str]) -> str:
    """jepa.predictor_mixer, or its default: the encoder's mixer when its stack has one kind, else attention."""
    if isinstance(choice, str):
        return choice
    return encoder_mixers[0] if len(set(encoder_mixers)) == 1 else "attention"


class BlockDiffusionConfig(BaseModel):
    """model.block_diffusion: the block diffusion objective's settings (archs/objectives/block_diffusion.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    block_size: int = Field(16, gt=0, description="positions per block, dividing data.seq_len: 1 is autoregressive "
                                                   "(in expectation), data.seq_len is MDLM")
    clip_min: float = Field(1e-3, gt=0, le=1, description="training draws each block's time t uniformly in "
                            "[clip_min, clip_max] (BD3-LM's clipped schedule: less gradient variance; the training "
                            "loss is then no bound); evaluation always integrates over [1e-3, 1], so val bpb stays one")
    clip_max: float = Field(1.0, gt=0, le=1, description="see clip_min")

    @model_validator(mode="after")
    def _clip_range(self) -> "BlockDiffusionConfig":
        if self.clip_min >= self.clip_max:
            raise ValueError(f"model.block_diffusion.clip_min={self.clip_min} must be below clip_max={self.clip_max}")
        return self


# Settings added after runs had been saved, whose default for new runs is not how those runs were built: a saved
# model config (a checkpoint's meta.json, a run's config.yaml) of that objective that lacks the key was built with
# this value. (objective, key in its section model.<objective>) -> value. Other objectives ignore the section.
PREDATED_VALUES = {("jepa", "target_norm"): "layer"}


def complete_saved_model_config(saved: dict) -> dict:
    """A model config as an older archlab saved it (JSON-like), completed: each key it predates gets the value it
    was built with (PREDATED_VALUES, for runs of that objective), the old flat format is read as today's, every
    other missing key takes today's default. A config that does not validate comes back as it was (the caller's
    comparison or validation then says what is wrong)."""
    complete = dict(saved)
    for (objective, key), value in PREDATED_VALUES.items():
        section = saved.get(objective)
        if saved.get("objective") == objective and isinstance(section, dict) and key not in section:
            complete[objective] = section | {key: value}
    try:
        return ModelConfig.model_validate(complete).model_dump(mode="json")
    except (ValidationError, ValueError):
        return complete


class ModelConfig(BaseModel):
    """The model: byte embedding, the stack of model.layers (each mixer's settings under model.<mixer>), the
    objective and its settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)

    objective: str = "autoregressive"
    layers: Union[str, list[str]] = Field(
        "transformer", description="the stack, one block per entry: a mixer name repeated n_layers times "
                                   "(transformer = attention), or a pattern such as 'mamba*3,attention' or "
                                   "'(mamba*3,attention)*2' (archs/pattern.py)")
    d_model: int = Field(256, gt=0)
    vocab_size: int = Field(BYTE_VOCAB_SIZE, ge=2, le=2 ** 32, description="token symbols: the trainer sets it from "
                            "data.tokenizer (256 for bytes); an objective that needs more (a mask token) adds them")
    n_layers: int = Field(4, gt=0, description="blocks; set by the pattern when it has a count or a comma")
    mlp_hidden: Optional[int] = Field(None, gt=0, description="SwiGLU width of blocks with an MLP; None = 8/3 "
                                      "d_model rounded up to 64")
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    init_std: float = Field(0.02, gt=0)
    causal: Optional[bool] = Field(None, description="None = what the objective needs; a bidirectional Mamba "
                                   "also scans the reversed sequence and averages the two directions")
    # masked and block diffusion (objective=masked_diffusion or block_diffusion; the others ignore these)
    noise_schedule: Literal["log_linear", "cosine"] = Field(
        "log_linear", description="masked_diffusion: alpha_t (probability a byte is still unmasked at time t); "
                                  "log_linear = 1 - t, cosine = cos(pi t / 2)")
    diffusion_eval_draws: int = Field(4, gt=0, description="masked_diffusion: (t, mask) draws per eval batch "
                                      "averaged into val bpb (fixed seed: the same batch gives the same figure)")
    jepa: JepaConfig = Field(JepaConfig(), description="objective=jepa: its settings (other objectives ignore them)")
    block_diffusion: BlockDiffusionConfig = Field(BlockDiffusionConfig(), description="objective=block_diffusion: its "
                                                  "settings (other objectives ignore them)")
    # model.<mixer> sections, one per mixer the model uses (filled with defaults); dumped as model.<mixer>
    mixers: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _read_mixer_sections(cls, data: Any) -> Any:
        """Old flat keys become today's; model.<mixer> sections are validated by their mixer's settings."""
        if not isinstance(data, dict):
            return data
        data, flat, changes = migrate_legacy_model(data)
        given = {name: data.pop(name) for name in list(data) if name in MIXERS}
        layers, n_layers = data.get("layers", "transformer"), data.get("n_layers")
        names = expand_layers(layers, n_layers if isinstance(n_layers, int) and n_layers > 0 else 1)
        if not is_bare_name(layers):
            if isinstance(n_layers, int) and n_layers != len(names):
                raise ValueError(f"model.n_layers={n_layers} disagrees with model.layers {layers!r} ({len(names)} "
                                 "blocks); leave n_layers out or make them agree")
            data["n_layers"] = len(names)
        used = used_mixers(names, data.get("objective", "autoregressive"), data.get("jepa"))
        given = merge_flat_keys(given, flat, used, changes)
        for name in given:
            if name not in used:
                raise ValueError(f"model.{name} sets {name} settings but no layer uses {name} (model.layers "
                                 f"{layers!r}); remove model.{name}")
        existing = data.get("mixers") or {}
        data["mixers"] = {name: _mixer_settings(name, given.get(name, existing.get(name, {}))) for name in used}
        return data

    @model_serializer(mode="wrap")
    def _dump_mixer_sections(self, handler, info) -> dict[str, Any]:
        dumped = handler(self)
        sections = {name: settings.model_dump(mode=info.mode) for name, settings in self.mixers.items()}
        at = list(dumped).index("n_layers") + 1  # after the stack's shape, before the rest
        items = list(dumped.items())
        return dict(items[:at] + list(sections.items()) + items[at:])

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        from archlab.archs.registry import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}{closest(self.objective, OBJECTIVES)}")
        for settings in self.mixers.values():
            settings.check(self.d_model)
        OBJECTIVES[self.objective].check_config(self)
        needed = OBJECTIVES[self.objective].causality(self)
        if needed is not None and self.causal is not None and self.causal != needed:
            kind, setting = ("causal", "true") if needed else ("bidirectional", "false")
            raise ValueError(f"objective {self.objective} needs a {kind} backbone; "
                             f"set model.causal={setting} or leave it unset")
        if not self.runs_causally:
            runs_bidirectionally = f"this model runs bidirectionally (objective {self.objective}, model.causal=" \
                                   f"{self.causal})"
            for name, settings in self.mixers.items():
                if MIXERS[name].bidirectional == "no":
                    raise ValueError(f"mixer {name} runs causally only, and {runs_bidirectionally}; use another "
                                     "mixer or a causal objective")
                if (reason := settings.causal_only()) is not None:
                    raise ValueError(f"{reason}, and {runs_bidirectionally}; use another setting or mixer, or a "
                                     "causal objective")
        return self

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer name of every block, in order."""
        return expand_layers(self.layers, self.n_layers)

    @property
    def stack_name(self) -> str:
        """What reports call this stack: transformer, mamba, hybrid, or its compact pattern."""
        return stack_name(self.layer_mixers)

    def mixer_settings(self, name: str) -> MixerSettings:
        """model.<name>: the settings of a mixer the model uses."""
        if name not in self.mixers:
            raise ValueError(f"this model uses no {name} (model.layers {self.layers!r}); no settings for it")
        return self.mixers[name]

    def d_model_multiple(self) -> int:
        """d_model must be a multiple of this for every mixer used (a study solving d_model steps by it)."""
        return math.lcm(*(settings.d_model_multiple() for settings in self.mixers.values()))

    @property
    def runs_causally(self) -> bool:
        """Whether the backbone runs causally. The validator has checked model.causal against the objective;
        one that works either way runs causally unless the config says otherwise."""
        from archlab.archs.registry import OBJECTIVES

        return self.causal if self.causal is not None else OBJECTIVES[self.objective].causality(self) is not False

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 64 * -(-(8 * self.d_model // 3) // 64)


def fit_to_new_stack(model: dict[str, Any], layer: dict[str, Any], *, depth_given: bool = False) -> dict[str, Any]:
    """A model section merged from config layers (included files, the file, a study's base / arm / size, command-
    line overrides), after `layer` (raw, the later one) was merged in.

    A layer that sets the stack (model.layers, or the old backbone / attn_layers) replaces the one before it, so
    what earlier layers said about the old stack does not carry over: their n_layers where a new pattern fixes the
    depth (unless `depth_given`: a study size sets it), their stack in the other form, and settings of mixers the
    new stack does not use. A later old-form flat key (n_heads) wins over the same key in an earlier model.<mixer>
    section. What `layer` sets itself stays, so a real disagreement is still an error."""
    if not isinstance(layer, dict):
        return model
    model = dict(model)
    for key in layer:
        mixer = LEGACY_MIXER_KEYS.get(key)
        if mixer in model and isinstance(model[mixer], dict) and mixer not in layer:
            model[mixer] = {k: v for k, v in model[mixer].items() if k != key}
    if "layers" in layer:
        for old in ("backbone", "attn_layers"):
            if old not in layer:
                model.pop(old, None)
        if not is_bare_name(layer["layers"]) and "n_layers" not in layer and not depth_given:
            model.pop("n_layers", None)
    elif "backbone" in layer or "attn_layers" in layer:
        model.pop("layers", None)
    else:
        return model
    try:
        migrated = migrate_legacy_model(model)[0]
        names = expand_layers(migrated.get("layers", "transformer"), migrated.get("n_layers", 1))
        used = used_mixers(names, model.get("objective", "autoregressive"), model.get("jepa"))
    except ValueError:
        return model  # validation then says what is wrong
    return {key: value for key, value in model.items() if key not in MIXERS or key in used or key in layer}


def used_mixers(names: list[str], objective: str, jepa: Any) -> list[str]:
    """The mixers a model uses: its stack's, then a JEPA predictor's."""
    used = list(dict.fromkeys(names))
    if objective == "jepa":
        # read, not validated: the jepa section is validated as a field, with its own error locations
        settings = jepa if isinstance(jepa, JepaConfig) else migrate_legacy_predictor(jepa or {})
        choice = settings.predictor_mixer if isinstance(settings, JepaConfig) else (
            settings.get("predictor_mixer") if isinstance(settings, dict) else None)
        used = list(dict.fromkeys([*used, predictor_mixer(choice, names)]))
    return used


def _mixer_settings(name: str, section: Any) -> MixerSettings:
    """A model.<name> section validated by that mixer's settings class, errors as one line naming the key."""
    settings_class = MIXERS[name].settings
    if isinstance(section, settings_class):
        return section
    if section is None:
        section = {}
    try:
        return settings_class.model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["model", name, *(str(part) for part in first["loc"])])
        if first["type"] == "extra_forbidden":
            field = str(first["loc"][-1])
            match = difflib.get_close_matches(field, list(settings_class.model_fields), n=1)
            hint = f"; did you mean model.{name}.{match[0]}?" if match else \
                f"; valid here: {', '.join(settings_class.model_fields)}"
            raise ValueError(f"unknown key {key}{hint}") from None
        message = first["msg"].removeprefix("Value error, ")
        given = "" if first["type"] == "value_error" else f" (got {first['input']!r})"
        raise ValueError(f"{key}: {message[0].lower() + message[1:]}{given}") from None
