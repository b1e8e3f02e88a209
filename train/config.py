"""Typed run configuration: YAML files composed with `include:`, dotted CLI overrides, strict validation.

pydantic (not omegaconf) because it validates what omegaconf cannot — ranges (lr > 0), literals, cross-field
rules (heads dividing d_model) — with the path of the offending key, and it is already how archs/ declares
its model config. Composition needs only a deep merge, which is a few lines.

    cfg = load_config("configs/quickstart.yaml", ["train.max_steps=200", "model.d_model=128"])
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_serializer, model_validator
from pydantic_core import InitErrorDetails

from archlab.archs.config import BYTE_VOCAB_SIZE, ModelConfig, complete_saved_model_config, fit_to_new_stack
from archlab.kernels.backend import check_backend
from archlab.kernels.registry import BACKENDS, kernel_ops
from archlab.train.errors import ConfigError, UserError

BackendName = Literal[BACKENDS]


class _Section(BaseModel):
    # coerce_numbers_to_str: `run.dir=2024` on the command line is a name, not a number
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class PrepareConfig(_Section):
    """data.prepare: raw sources that `archlab data prepare` turns into the prepared directory data.path when it is
    missing (relative data.path: under the cache's datasets/ folder)."""

    sources: list[str] = Field(min_length=1, description="text, JSONL, parquet or datasets dirs (data roots apply)")
    tokenizer: Optional[str] = Field(None, description="bytes | tiktoken:<name> | hf:<tokenizer.json>")
    train_tokenizer: Optional[int] = Field(None, gt=256, description="train a byte-level BPE of this vocabulary "
                                           "on the train split instead")
    split_on: Optional[str] = Field(None, description="plain text: a line matching this regex starts a document")
    max_doc_chars: Optional[int] = Field(None, gt=0, description="plain text: a document reaching this many "
                                         "characters ends at the next line")

    @model_validator(mode="after")
    def _one_tokenizer(self) -> "PrepareConfig":
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("data.prepare needs exactly one of tokenizer and train_tokenizer")
        return self


class DataConfig(_Section):
    path: str = Field("tinyshakespeare.txt", description="text file or prepared dataset directory, absolute or "
                      "relative to a data root")
    seq_len: int = Field(256, gt=0)
    val_fraction: float = Field(0.1, gt=0, lt=1, description="contiguous split after train")
    test_fraction: float = Field(0.0, ge=0, lt=1, description="contiguous split at the end")
    sha256: Optional[str] = Field(None, description="expected sha256 of the (decompressed) bytes")
    tokenizer: Optional[str] = Field(None, description="None: bytes for a text file, a prepared dataset's own "
                                     "tokenizer; bytes | tiktoken:<name> | hf:<tokenizer.json> need a prepared dataset")
    packing: Literal["documents", "stream"] = Field("documents", description="documents: where the data has "
                                                    "document boundaries, rows keep documents apart (masked attention, "
                                                    "reset states, RoPE from 0); stream: one stream of tokens")
    separator: Optional[str] = Field(None, description="text file: a line matching this regex starts a document")
    prepare: Optional[PrepareConfig] = Field(None, description="build data.path with `archlab data prepare` first")
    identity: Optional[str] = Field(None, description="set by the trainer: the prepared dataset's manifest sha256 "
                                    "(a resume on other data is refused)")

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1 to leave training data")
        return self


class TrainConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(1337, ge=0)
    batch_size: int = Field(32, gt=0, description="sequences per optimizer step")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="sequences per forward; None = batch_size")
    max_steps: int = Field(1000, gt=0)
    max_seconds: Optional[float] = Field(None, gt=0, description="also stop once this much training time has "
                                         "passed (evals and checkpoints excluded); the lr schedule follows max_steps")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr / peak lr")
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of steps in the final decay")
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings: bool = False
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = False
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="under torchrun: ddp (replicated weights) or fsdp "
                                             "(FSDP2 fully_shard: weights, gradients and optimizer state sharded)")
    eval_every: int = Field(250, gt=0)
    eval_tokens: Optional[int] = Field(131072, gt=0, description="val bytes scored per eval; None = whole split")
    checkpoint_every: int = Field(500, gt=0)
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    log_every: int = Field(10, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(f"micro_batch_size={self.micro_batch_size} must divide batch_size={self.batch_size}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be below max_steps={self.max_steps}; "
                             "lower train.warmup_steps")
        return self


class _RegisteredKernelOps(_Section):
    """The keys of `kernels:` are the kernel registry's ops (kernels/registry.py), each `auto` when left out.

    KernelsConfig below has a field per op registered by the time this module is imported (every shipped op). An op
    registered later (a researcher's module imported afterwards, a test's toy op) is read from the registry at each
    validation instead: it arrives as an extra key, checked and dumped like the fields, because a built pydantic
    model keeps the fields it was built with. Typo suggestions name the fields only."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, BackendName]

    @model_validator(mode="before")
    @classmethod
    def _registered_ops_only(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        unknown = next((key for key in data if key not in kernel_ops()), None)
        if unknown is not None:  # the error an unknown field gets, so that it names the nearest op the same way
            raise ValidationError.from_exception_data(cls.__name__, [
                InitErrorDetails(type="extra_forbidden", loc=(unknown,), input=data[unknown])])
        registered_later = {name: "auto" for name in kernel_ops() if name not in cls.model_fields}
        return {**registered_later, **data}

    @model_validator(mode="after")
    def _implemented(self) -> "_RegisteredKernelOps":
        for name in kernel_ops():
            backend = getattr(self, name, "auto")  # an instance made before the op was registered runs it on auto
            try:
                check_backend(name, backend)
            except ValueError as err:
                raise ValidationError.from_exception_data(type(self).__name__, [
                    InitErrorDetails(type="value_error", loc=(name,), input=backend, ctx={"error": err})]) from None
        return self

    @model_serializer(mode="wrap")
    def _every_registered_op(self, handler) -> dict[str, Any]:
        dumped = handler(self)  # lacks the ops registered after this instance was made (a field default): auto
        return {name: dumped.get(name, "auto") for name in kernel_ops()}


KernelsConfig = create_model(
    "KernelsConfig", __base__=_RegisteredKernelOps, __doc__="Backend per kernel op (kernels/backend.py resolves "
    "it); the field names are the op names build_model takes.",
    **{name: (BackendName, "auto") for name in kernel_ops()})


class RunConfig(_Section):
    dir: str = "runs/default"
    resume: Union[bool, Literal["auto"]] = Field(False, description="true: continue; auto: continue if possible")
    wandb: Literal["offline", "online", "disabled"] = "offline"
    wandb_project: str = "archlab"
    progress: bool = True


class SampleConfig(_Section):
    prompt: str = Field("\n", min_length=1)
    tokens: int = Field(300, ge=0, description="bytes generated at the end of training; 0 = none")
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: Optional[int] = Field(None, gt=0, le=BYTE_VOCAB_SIZE)
    # masked_diffusion and block_diffusion (block: masked_diffusion only); objectives list what they take in
    # Objective.sample_options
    steps: Optional[int] = Field(None, gt=0, description="denoising steps; None = one per generated byte")
    strategy: Optional[Literal["ancestral", "confidence", "block"]] = Field(
        None, description="ancestral (MDLM), confidence (LLaDA low-confidence remasking), block (semi-AR); "
                          "None = ancestral")
    block_size: Optional[int] = Field(None, gt=0, description="strategy=block: bytes per block")

    @model_validator(mode="after")
    def _block_settings(self) -> "SampleConfig":
        if self.strategy == "block":
            if self.block_size is None:
                raise ValueError("strategy=block needs block_size (bytes per block, dividing tokens)")
            if self.tokens % self.block_size:
                raise ValueError(f"block_size={self.block_size} must divide tokens={self.tokens}")
        elif self.block_size is not None:
            raise ValueError(f"block_size is for strategy=block, not {self.strategy or 'ancestral'}; remove it")
        return self

    def options(self) -> dict[str, Any]:
        """The objective-specific settings that are set, as keyword arguments for Objective.sample."""
        return {name: getattr(self, name) for name in ("steps", "strategy", "block_size")
                if getattr(self, name) is not None}


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    kernels: KernelsConfig = KernelsConfig()
    run: RunConfig = RunConfig()
    sample: SampleConfig = SampleConfig()

    @model_validator(mode="after")
    def _kernels_fit_the_model(self) -> "Config":
        for settings in self.model.mixers.values():
            settings.check_kernels(self.model.d_model, self.kernels.model_dump())
        from archlab.archs.registry import OBJECTIVES

        objective = OBJECTIVES[self.model.objective]
        objective.check_kernels(self.model, self.kernels.model_dump())
        unused = sorted(set(self.sample.options()) - set(objective.sample_options))
        if unused:
            raise ValueError(f"sample.{unused[0]} does not apply to objective {self.model.objective}; remove it")
        objective.check_seq_len(self.model, self.data.seq_len)
        if self.sample.tokens and not objective.can_sample(self.model):
            raise ValueError(f"objective {self.model.objective} cannot generate text with these model settings; "
                             "set sample.tokens=0")
        sample_len = len(self.sample.prompt.encode()) + self.sample.tokens
        if objective.samples_within_context and self.sample.tokens and sample_len > self.data.seq_len:
            raise ValueError(f"{self.model.objective} generates prompt and sample in one window: sample.prompt "
                             f"({sample_len - self.sample.tokens} bytes) + sample.tokens ({self.sample.tokens}) must "
                             f"fit in data.seq_len={self.data.seq_len}; lower sample.tokens")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Keys that may change when a run is resumed: they steer bookkeeping, not the math of the loss curve.
RESUMABLE_CHANGES = {
    "train.max_seconds",
    "run.dir", "run.resume", "run.wandb", "run.wandb_project", "run.progress", "train.device", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.log_every", "sample.prompt", "sample.tokens",
    "sample.temperature", "sample.top_k", "sample.steps", "sample.strategy", "sample.block_size",
}


# Names other codebases use for our keys, so that the suggestion for a typo-free miss is still right.
COMMON_ALIASES = {
    "learning_rate": "lr", "steps": "max_steps", "iters": "max_steps", "max_iters": "max_steps",
    "bs": "batch_size", "dim": "d_model", "n_embd": "d_model", "hidden_size": "d_model", "layers": "n_layers",
    "n_layer": "n_layers", "heads": "n_heads", "n_head": "n_heads", "block_size": "seq_len",
    "context_length": "seq_len", "warmup": "warmup_steps", "wd": "weight_decay", "clip": "grad_clip",
}


def load_config(path: str | Path | None, overrides: list[str] = (), *, saved: bool = False) -> Config:
    """Read a YAML config (or the defaults when path is None), apply `a.b=value` overrides, validate.

    `saved`: the file is one archlab wrote for a run (its config.yaml, a study's configs/NAME.yaml), which lists
    every model key of its day: a key it lacks predates it and takes the value that run was built with."""
    raw = _read_yaml_tree(Path(path), ()) if path is not None else {}
    if saved and isinstance(raw.get("model"), dict):
        raw["model"] = complete_saved_model_config(raw["model"])
    overridden: dict[str, Any] = {}
    for override in overrides:
        _apply_override(raw, override)
        _apply_override(overridden, override)
    _fit_model_to_new_stack(raw, overridden)
    return validate_config(raw, source=str(path) if path else "overrides")


def run_config(run_dir: str | Path, device: str | None = None, *, need_checkpoint: str | None = None) -> Config:
    """The config a finished or running run was trained with (its config.yaml), pointed at that run directory to
    be resumed from its checkpoint, quietly. `need_checkpoint` (what the caller would do with it) refuses a run
    without a checkpoint in one line."""
    from archlab.train.checkpoint import latest_checkpoint  # lazy: checkpoint.py needs this module's neighbours

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml); pass the run.dir of a training run")
    if need_checkpoint and latest_checkpoint(Path(run_dir)) is None:
        raise UserError(f"{run_dir} has no checkpoint to {need_checkpoint}; let its training reach its first "
                        "checkpoint (train.checkpoint_every) or finish")
    overrides = [f"run.dir={run_dir}", "run.resume=true", "run.wandb=disabled", "run.progress=false"]
    return load_config(path, overrides + ([f"train.device={device}"] if device else []), saved=True)


def validate_config(raw: dict[str, Any], *, source: str, section: type[BaseModel] = Config):
    """`raw` as a validated Config (or one section of it, e.g. SampleConfig for CLI arguments)."""
    try:
        return section.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    flat_old, flat_new = _flatten(old.to_dict()), _flatten(new.to_dict())
    return sorted(k for k in flat_old.keys() | flat_new.keys() if flat_old.get(k) != flat_new.get(k))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _read_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.expanduser()
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory; pass a YAML file such as configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass the path of a YAML file such as configs/quickstart.yaml")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"config {path} includes itself (through {' -> '.join(p.name for p in seen)})")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config {path} is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"config {path} must be a mapping of sections (model:, data:, train:, ...)")
    return resolve_includes(tree, path.parent, source=str(path), seen=seen + (resolved,))


def resolve_includes(tree: dict[str, Any], folder: Path, *, source: str,
                     seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config tree with its `include: [...]` files (relative to `folder`) merged in first, its own keys last."""
    tree = dict(tree)
    includes = tree.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"config {source}: include must be a file name or a list of file names")
    merged: dict[str, Any] = {}
    for include in includes:
        layer = _read_yaml_tree(folder / include, seen)
        deep_merge(merged, layer)
        _fit_model_to_new_stack(merged, layer)
    deep_merge(merged, copy.deepcopy(tree))
    _fit_model_to_new_stack(merged, tree)
    return merged


def _fit_model_to_new_stack(merged: dict[str, Any], layer: dict[str, Any]) -> None:
    """A config layer that sets model.layers replaces the stack of the layers before it (archs.config.
    fit_to_new_stack): `archlab train configs/quickstart.yaml model.layers=mamba` drops the attention settings."""
    if isinstance(merged.get("model"), dict) and isinstance(layer.get("model"), dict):
        merged["model"] = fit_to_new_stack(merged["model"], layer["model"])


def deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_merge(into[key], value)
        else:
            into[key] = value


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.split(".")
    node, path = raw, []
    for part in parents:
        path.append(part)
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(path)} is a value, not a section")
        node = child
    node[leaf] = value


def _describe(err: ValidationError) -> str:
    """First validation error as one line: dotted key, what is wrong, nearest valid key for typos."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    key = ".".join(loc)
    if first["type"] == "extra_forbidden":
        return f"unknown key {key}{_nearest_key(loc)}"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, "):]
    show_input = first["type"] != "value_error" and not isinstance(first["input"], dict)
    given = f" (got {first['input']!r})" if show_input else ""
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if key and f"{key}." in message:  # the message names the key itself (a model.<mixer> setting, model.layers)
        return f"{message}{given}{more}"
    return f"{key or 'config'}: {message[0].lower() + message[1:]}{given}{more}"


def _nearest_key(loc: list[str]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return ""
        model = field.annotation
    prefix = ".".join(loc[:-1] + [""])
    names = list(model.model_fields)
    if COMMON_ALIASES.get(loc[-1]) in names:
        return f"; did you mean {prefix}{COMMON_ALIASES[loc[-1]]}?"
    nearest = max(names, key=lambda name: difflib.SequenceMatcher(None, loc[-1], name).ratio())
    if difflib.get_close_matches(loc[-1], [nearest], cutoff=0.5):
        return f"; did you mean {prefix}{nearest}?"
    return f"; nearest valid key: {prefix}{nearest} (valid here: {', '.join(names)})"
