"""Study files: arms x seeds (x sizes x budgets) of ordinary run configs, expanded and validated up front.

A study YAML (configs/studies/*.yaml):

    study: quick                  # name (default: the file name)
    kind: lm                      # lm (train and compare on text) | synthetic (compare/synthetic.py tasks)
    base: {include: [../quickstart.yaml], train: {...}}    # a partial run config shared by every run
    budget: {flops: 2.5e12}       # exactly one of flops | tokens | seconds; a list = one run per budget
    seeds: [0, 1]
    arms:                         # name -> partial run config merged over base (include allowed)
      transformer-ar: {}
      mamba-ar: {model: {backbone: mamba}, match: {to: transformer-ar, by: params, solve: d_model}}
    sizes:                        # optional (scaling studies): name -> partial model config, crossed with arms
      s: {d_model: 64}
    linear_probe:                 # optional: after training, fresh probes on frozen features (train/linear_probe.py)
      arms: [transformer-jepa]    # these arms' runs, each beside its own step-0 encoder
      baseline: transformer-ar    # and beside this arm's run of the same seed, size and budget
    evals:                        # optional: after training, for every run of these arms (default: the AR arms)
      arms: [transformer-ar, mamba-ar]
      lengths: [1, 2, 4, 8]       # bpb per position bucket and passkey retrieval at multiples of the trained length
      inference: {contexts: [128, 1024], batch_size: 1, new_tokens: 16}   # prefill, decode speed and memory
    resolved_by: configs/studies/quick-seeds.yaml   # optional: where more seeds resolve this study's differences
    synthetic:                    # kind: synthetic instead of a budget: every arm x width x task x seed
      widths: [32, 64]            # model.d_model values
      steps: 600                  # and batch_size, lr; workers: rows trained at once (one process, one thread each)
      tasks:                      # compare.synthetic.SyntheticTask, or SyntheticMixture (train and test settings)
        - {task: mqar, train: [{seq_len: 32, n_pairs: 4}], test: [...], train_examples: 20000, test_examples: 256}

Budgets become train.max_steps through the trainer's own FLOPs counter (training_flops_per_token x tokens per
step), so with a FLOPs or tokens budget every arm stops within one step of it; a seconds budget measures each
config's speed (10 steps) for max_steps and also sets train.max_seconds, which the trainer enforces (a run ends
by either; its summary.json says which). `match` solves model.d_model or model.n_layers so the arm's parameter
count or training FLOPs per token is within `tolerance` (default 2%) of the reference arm's, or fails with the
closest miss.
"""
from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from archlab.archs.model import Objective
from archlab.archs.config import fit_to_new_stack
from archlab.archs.pattern import is_bare_name
from archlab.archs.registry import build_model
from archlab.train.config import Config, deep_merge, resolve_includes, validate_config
from archlab.train.errors import ConfigError
from archlab.train.flops import training_flops_per_token

RUN_CONFIG_SECTIONS = ("include", "model", "data", "train", "kernels", "run", "sample")
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flops: Optional[float] = Field(None, gt=0, description="training FLOPs (the trainer's analytic count)")
    tokens: Optional[int] = Field(None, gt=0, description="training tokens (bytes)")
    seconds: Optional[float] = Field(None, gt=0, description="training wall-clock seconds (evals excluded)")

    @model_validator(mode="after")
    def _exactly_one(self) -> "Budget":
        given = [name for name in ("flops", "tokens", "seconds") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a budget names exactly one of flops, tokens, seconds (got {given or 'none'})")
        return self

    @property
    def label(self) -> str:
        kind = next(name for name in ("flops", "tokens", "seconds") if getattr(self, name) is not None)
        return f"{kind}={getattr(self, kind):.3g}"


class Match(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str = Field(description="the reference arm")
    by: Literal["params", "flops_per_token"] = "params"
    solve: Literal["d_model", "n_layers"] = "d_model"
    tolerance: float = Field(0.02, gt=0, lt=1)


class LinearProbeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arms: list[str] = Field(min_length=1, description="arms whose runs get linear evaluation once trained")
    baseline: Optional[str] = Field(None, description="an arm whose run of the same seed, size and budget is "
                                                      "probed the same way beside each (e.g. the autoregressive arm)")
    mlp: bool = Field(False, description="also an MLP probe")


class SyntheticSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[dict[str, Any]] = Field(min_length=1, description="compare.synthetic.SyntheticTask settings")
    widths: list[int] = Field(min_length=1, description="model.d_model values tried per arm")
    steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    workers: int = Field(1, gt=0, description="rows trained at once, each in its own one-thread process")


class InferenceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    contexts: list[PositiveInt] = Field(min_length=1, description="context lengths in tokens, prompt and new "
                                                                  "tokens (`archlab bench inference`)")
    batch_size: PositiveInt = 1
    new_tokens: PositiveInt = Field(16, description="tokens decoded one by one at the end of each context")


class EvalSettings(BaseModel):
    """Evaluations of every finished run of `arms` (default: the autoregressive arms), written into the run
    directory and shown in the report."""
    model_config = ConfigDict(extra="forbid")
    arms: Optional[list[str]] = Field(None, min_length=1)
    lengths: Optional[list[PositiveInt]] = Field(None, min_length=1, description="multiples of the trained length "
                                           "(`archlab eval RUN --lengths ... --per-position`)")
    passkey: bool = Field(True, description="with lengths: passkey retrieval at each length (autoregressive runs)")
    inference: Optional[InferenceSettings] = None

    @model_validator(mode="after")
    def _something(self) -> "EvalSettings":
        if self.lengths is None and self.inference is None:
            raise ValueError("evals needs lengths: [...] and/or inference: {contexts: [...]}")
        return self


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["lm", "synthetic"] = "lm"
    base: dict[str, Any] = {}
    budget: Optional[Union[Budget, list[Budget]]] = None
    seeds: list[int] = Field([0], min_length=1)
    arms: dict[str, dict[str, Any]] = Field(min_length=1)
    sizes: Optional[dict[str, dict[str, Any]]] = None
    nproc_per_node: int = Field(1, gt=0, description="processes (GPUs) per run: > 1 launches each run with torchrun")
    synthetic: Optional[SyntheticSettings] = None
    linear_probe: Optional[LinearProbeSettings] = None
    evals: Optional[EvalSettings] = None
    resolved_by: Optional[str] = Field(None, description="a study file that runs these arms over more seeds: the "
                                                         "report names it where one seed leaves differences "
                                                         "unresolved")

    @model_validator(mode="after")
    def _consistent(self) -> "Study":
        for name in [*self.arms, *(self.sizes or {})]:  # they become run directory names
            if not NAME.match(name):
                raise ValueError(f"name {name!r} may hold only letters, digits and _ . - (it names run directories)")
        if self.kind == "synthetic" and self.synthetic is None:
            raise ValueError("a synthetic study needs a synthetic: section (tasks, widths, steps, batch_size, lr)")
        if self.kind == "synthetic":
            self._check_synthetic()
        if self.kind == "lm" and self.budget is None:
            raise ValueError("an lm study needs a budget: {flops: ...}, {tokens: ...} or {seconds: ...}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds} repeat a value")
        if self.linear_probe is not None:
            self._check_linear_probe()
        if self.evals is not None:
            self._check_evals()
        for name, arm in self.arms.items():
            unknown = sorted(set(arm) - set(RUN_CONFIG_SECTIONS) - {"match"})
            if unknown:
                raise ValueError(f"arm {name}: unknown section {unknown[0]!r}; an arm holds "
                                 f"{', '.join(RUN_CONFIG_SECTIONS)} and match")
            if "match" in arm:
                match = Match.model_validate(arm["match"])
                if match.to not in self.arms or match.to == name or "match" in self.arms[match.to]:
                    raise ValueError(f"arm {name}: match.to={match.to!r} must name another arm without a match")
                if self.sizes:
                    raise ValueError(f"arm {name}: match and sizes do not go together; give sizes per arm instead")
        return self

    def _check_linear_probe(self) -> None:
        if self.kind != "lm":
            raise ValueError("linear_probe is for lm studies (it probes trained runs' features); remove it")
        settings = self.linear_probe
        for name in [*settings.arms, *([settings.baseline] if settings.baseline else [])]:
            if name not in self.arms:
                raise ValueError(f"linear_probe names arm {name!r}, which the study does not have")

    def _check_evals(self) -> None:
        if self.kind != "lm":
            raise ValueError("evals are for lm studies (they score trained runs); remove it")
        unknown = [name for name in self.evals.arms or [] if name not in self.arms]
        if unknown:
            raise ValueError(f"evals names arm {unknown[0]!r}, which the study does not have")

    def _check_synthetic(self) -> None:
        """Synthetic studies train each arm's model for synthetic.steps: budgets, sizes, matching and run
        settings other than model: would be ignored, so they are refused."""
        for key in ("budget", "sizes"):
            if getattr(self, key) is not None:
                raise ValueError(f"a synthetic study has no {key} (it trains synthetic.steps); remove it")
        trees = {"base": self.base, **{f"arm {arm}": arm_tree for arm, arm_tree in self.arms.items()}}
        for name, tree in trees.items():
            extra = sorted(set(tree) - {"model", "include"})
            if extra:
                raise ValueError(f"{name}: a synthetic study uses only model settings, not {extra[0]!r}")

    @property
    def budgets(self) -> list[Budget]:
        if self.budget is None:  # synthetic studies train for a fixed number of steps instead
            return []
        return self.budget if isinstance(self.budget, list) else [self.budget]


class RunSpec(BaseModel):
    """One run of an lm study: its validated config and what the report needs to know about it."""
    model_config = ConfigDict(arbitrary_types_allowed=True)
    name: str
    arm: str
    seed: int
    size: Optional[str]
    budget: Budget
    config: Config
    params: int
    flops_per_token: int
    quality_metric: str
    probe: bool
    bound: bool
    probe_task: Optional[str]
    match: Optional[dict[str, Any]] = None  # the achieved mismatch when the size was solved


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} not found; pass a YAML file such as configs/studies/quick.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"study {path} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"study {path} must be a mapping (study:, base:, budget:, arms:, ...)")
    raw.setdefault("study", path.stem)
    try:
        study = Study.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        # pydantic adds validator names such as "function-after[...]" to the location: keep the keys only
        where = ".".join(str(part) for part in first["loc"] if "[" not in str(part)) or "study"
        raise ConfigError(f"study {path}: {where}: {first['msg'].removeprefix('Value error, ')}") from None
    study.base = resolve_includes(study.base, path.parent, source=f"{path} base")
    study.arms = {name: resolve_includes(arm, path.parent, source=f"{path} arm {name}")
                  for name, arm in study.arms.items()}
    return study


def _run_tree(study: Study, arm: str, size: str | None, seed: int) -> dict[str, Any]:
    tree = copy.deepcopy(study.base)
    deep_merge(tree, {k: v for k, v in copy.deepcopy(study.arms[arm]).items() if k != "match"})
    if size is not None:
        deep_merge(tree, {"model": copy.deepcopy(study.sizes[size])})
    deep_merge(tree, {"train": {"seed": seed}})
    if isinstance(tree.get("model"), dict):
        size_tree = study.sizes[size] if size else {}
        tree["model"] = fit_to_new_stack(tree["model"], study.arms[arm].get("model", {}),
                                         depth_given="n_layers" in size_tree)
        tree["model"] = fit_to_new_stack(tree["model"], size_tree)
    return tree


def measure(cfg: Config) -> tuple[int, int, Objective]:
    """(trained parameters, training FLOPs per token, objective) of the model a config builds."""
    with torch.device("meta"):  # shapes only: no memory, no init (a GPU-sized arm built on the CPU took seconds)
        model = build_model(cfg.model)
    return model.num_parameters(), training_flops_per_token(model, cfg.data.seq_len), model.objective


def solve_size(tree: dict[str, Any], match: Match, target: float, source: str) -> tuple[dict[str, Any], dict]:
    """Sets model.<match.solve> in `tree` so that the measured quantity is nearest `target`.

    The quantity grows with d_model and n_layers, so a doubling search then bisection finds the bracketing
    values; d_model moves in steps that keep every mixer's constraints (attention: a multiple of 2 * n_heads)."""
    index = 0 if match.by == "params" else 1
    base_cfg = validate_config(tree, source=source)
    if match.solve == "n_layers" and not is_bare_name(base_cfg.model.layers):
        raise ConfigError(f"{source}: solve: n_layers needs model.layers to be one mixer repeated n_layers times, "
                          f"not the pattern {base_cfg.model.layers!r}; solve d_model instead")
    step = base_cfg.model.d_model_multiple() if match.solve == "d_model" else 1

    @functools.cache
    def value_at(units: int) -> float:
        trial = copy.deepcopy(tree)
        deep_merge(trial, {"model": {match.solve: units * step}})
        return measure(validate_config(trial, source=source))[index]

    low, high = 1, 1
    while value_at(high) < target:
        low, high = high, high * 2
        if high * step > 65536:
            raise ConfigError(f"{source}: no model.{match.solve} up to {high * step} reaches {match.by}={target:.4g}")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if value_at(middle) < target else (low, middle)
    best = min((low, high), key=lambda units: abs(value_at(units) - target))
    achieved = value_at(best)
    mismatch = achieved / target - 1
    if abs(mismatch) > match.tolerance:
        raise ConfigError(f"{source}: matching {match.by} to arm {match.to} ({target:.4g}) by model.{match.solve}: "
                          f"the closest, {best * step}, gives {achieved:.4g} ({mismatch:+.1%}, over "
                          f"{match.tolerance:.0%}); solve the other dimension or set the size by hand")
    solved = copy.deepcopy(tree)
    deep_merge(solved, {"model": {match.solve: best * step}})
    return solved, {"to": match.to, "by": match.by, match.solve: best * step, "target": target,
                    "achieved": achieved, "mismatch": round(mismatch, 5)}


def steps_for_budget(budget: Budget, cfg: Config, flops_per_token: int, steps_per_second: float | None) -> int:
    """train.max_steps that spends the budget: whole steps, at least one."""
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    if budget.flops is not None:
        return max(1, round(budget.flops / (flops_per_token * tokens_per_step)))
    if budget.tokens is not None:
        return max(1, round(budget.tokens / tokens_per_step))
    return max(1, round(budget.seconds * steps_per_second))


def plan_runs(study: Study, *, steps_per_second=None, known_steps: dict[str, int] | None = None) -> list[RunSpec]:
    """Every run of an lm study, validated and sized, before anything is written.

    `steps_per_second(cfg)` measures a config's training speed; only seconds budgets call it, and not for
    runs in `known_steps` (name -> max_steps an earlier invocation measured: a resumed run keeps its steps)."""
    specs = []
    sizes = list(study.sizes) if study.sizes else [None]
    for budget_index, budget in enumerate(study.budgets):
        for arm, arm_tree in study.arms.items():
            for size in sizes:
                for seed in study.seeds:
                    name = "-".join([arm, *([size] if size else []),
                                     *([f"b{budget_index}"] if len(study.budgets) > 1 else []), f"s{seed}"])
                    source = f"study {study.study}, run {name}"
                    tree, matched = _run_tree(study, arm, size, seed), None
                    if "match" in arm_tree:
                        match = Match.model_validate(arm_tree["match"])
                        reference = measure(validate_config(_run_tree(study, match.to, size, seed), source=source))
                        tree, matched = solve_size(tree, match, reference[0 if match.by == "params" else 1], source)
                    probe_cfg = validate_config(tree, source=source)
                    params, flops_per_token, objective = measure(probe_cfg)
                    if budget.seconds is not None and name in (known_steps or {}):
                        max_steps = known_steps[name]
                    else:
                        speed = steps_per_second(probe_cfg) if budget.seconds is not None else None
                        max_steps = steps_for_budget(budget, probe_cfg, flops_per_token, speed)
                    train = {"max_steps": max_steps}
                    if budget.seconds is not None:
                        train["max_seconds"] = budget.seconds
                    deep_merge(tree, {"train": train})
                    cfg = validate_config(tree, source=source)  # only the step budget differs from probe_cfg
                    specs.append(RunSpec(
                        name=name, arm=arm, seed=seed, size=size, budget=budget, config=cfg, params=params,
                        flops_per_token=flops_per_token, quality_metric=objective.quality_metric,
                        probe=objective.quality_is_probe, bound=objective.quality_is_bound,
                        probe_task=objective.probe_task, match=matched))
    names = [spec.name for spec in specs]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash:
        raise ConfigError(f"study {study.study}: two runs would both be named {clash}; rename an arm or a size")
    if study.linear_probe is not None:
        _check_probe_tasks(study, specs)
    return specs


def probe_pairs(study: Study, specs: list[RunSpec]) -> list[tuple[RunSpec, RunSpec | None]]:
    """(run to probe, its baseline run or None) for every run of the arms study.linear_probe names."""
    settings = study.linear_probe
    if settings is None:
        return []
    baselines = {(s.seed, s.size, s.budget.label): s for s in specs if s.arm == settings.baseline}
    return [(spec, baselines.get((spec.seed, spec.size, spec.budget.label)))
            for spec in specs if spec.arm in settings.arms]


def _check_probe_tasks(study: Study, specs: list[RunSpec]) -> None:
    for spec, baseline in probe_pairs(study, specs):
        if spec.probe_task is None:
            raise ConfigError(f"study {study.study}: linear_probe arm {spec.arm} trains objective "
                              f"{spec.config.model.objective}, which has no fixed representation to probe; "
                              "list autoregressive or jepa arms")
        if baseline is not None and baseline.probe_task != spec.probe_task:
            raise ConfigError(f"study {study.study}: linear_probe baseline {baseline.arm} probes the "
                              f"{baseline.probe_task or 'nothing'}, arm {spec.arm} the {spec.probe_task}; choose a "
                              "baseline arm whose objective probes the same thing")
