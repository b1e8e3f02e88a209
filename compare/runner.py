"""`archlab compare STUDY.yaml [--out DIR] [--resume]`: run every arm of a study, then write its report.

Runs go one after another, each in its own process through the normal trainer (`archlab train`), into
OUT/runs/<name>; OUT/configs/<name>.yaml holds the exact config each was given and OUT/study.json the plan and
each run's status (rewritten atomically after every run). A run whose summary.json exists is finished and
skipped; an interrupted one continues from its last checkpoint (run.resume=auto), so `--resume` after a crash
or a kill redoes nothing that was finished. Everything is validated and sized before the first run starts.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from archlab.compare.study import RunSpec, Study, load_study, plan_runs
from archlab.kernels.hardware import device_name
from archlab.train.config import Config, dump_config
from archlab.train.data import resolve_data_path
from archlab.train.errors import UserError
from archlab.train.trainer import Trainer, resolve_device

STUDY_FILE = "study.json"


def git_commit() -> str | None:
    """The checkout's commit (short hash), or None outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def measure_steps_per_second(cfg: Config, steps: int = 3) -> float:
    """Training steps per second of a config on this machine (one warm-up step, then `steps` timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        timing = cfg.model_copy(deep=True)
        timing.run.dir, timing.run.wandb, timing.run.progress = str(Path(tmp) / "run"), "disabled", False
        trainer = Trainer(timing)
        trainer.train_step(trainer.sampler.batch(0))
        start = time.perf_counter()
        for index in range(steps):
            trainer.train_step(trainer.sampler.batch(index + 1))
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return steps / (time.perf_counter() - start)


def _run_record(spec: RunSpec, status: str) -> dict[str, Any]:
    model = spec.config.model
    return {"name": spec.name, "arm": spec.arm, "seed": spec.seed, "size": spec.size, "budget": spec.budget.label,
            "run_dir": f"runs/{spec.name}", "status": status, "backbone": model.backbone,
            "objective": model.objective, "d_model": model.d_model, "n_layers": model.n_layers,
            "params": spec.params, "flops_per_token": spec.flops_per_token, "max_steps": spec.config.train.max_steps,
            "quality_metric": spec.quality_metric, "probe": spec.probe, "bound": spec.bound, "match": spec.match}


def _header(study: Study, device: str) -> dict[str, Any]:
    budget = [b.model_dump(exclude_none=True) for b in study.budgets]
    return {"study": study.study, "kind": study.kind, "budget": budget[0] if len(budget) == 1 else budget or None,
            "seeds": study.seeds, "created": datetime.date.today().isoformat(), "device": device,
            "torch": torch.__version__, "commit": git_commit()}


def _check_out_dir(out: Path, resume: bool, study: Study) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    contents = list(out.iterdir()) if out.is_dir() else []
    saved = out / STUDY_FILE
    if contents and not saved.exists():
        raise UserError(f"--out {out} is not empty and holds no study; choose a new directory")
    if saved.exists():
        if not resume:
            raise UserError(f"{out} already holds study results; pass --resume to continue it or choose a new --out")
        if json.loads(saved.read_text()).get("study") != study.study:
            raise UserError(f"{out} holds another study; choose a new --out")


def run_lm_study(study: Study, out: Path, *, resume: bool, python: str = sys.executable) -> dict[str, Any]:
    """Plans (validating everything), then trains each unfinished run in its own process; returns study.json."""
    cuda = torch.cuda.is_available()
    device = device_name(torch.device("cuda" if cuda else "cpu"))
    specs = plan_runs(study, steps_per_second=measure_steps_per_second)
    for spec in specs:  # what the trainer would refuse at the start of a run, refused before the first one
        resolve_data_path(spec.config.data.path)
        resolve_device(spec.config.train.device)
    _check_out_dir(out, resume, study)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    record = _header(study, device)
    record["runs"] = [_run_record(spec, _status(out, spec)) for spec in specs]
    write_json_atomic(out / STUDY_FILE, record)
    for index, spec in enumerate(specs):
        entry = record["runs"][index]
        if entry["status"] == "finished":
            print(f"[{index + 1}/{len(specs)}] {spec.name}: finished earlier, skipped", flush=True)
            continue
        config_path = out / "configs" / f"{spec.name}.yaml"
        cfg = spec.config.model_copy(deep=True)
        cfg.run.dir, cfg.run.resume, cfg.run.progress = str((out / entry["run_dir"]).resolve()), "auto", False
        tmp = config_path.with_suffix(".tmp")
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, config_path)
        print(f"[{index + 1}/{len(specs)}] {spec.name}: {spec.params / 1e6:.2f}M params, "
              f"{spec.flops_per_token / 1e6:.2f} MFLOP/token, {spec.config.train.max_steps} steps", flush=True)
        code = subprocess.run([python, "-m", "archlab.train.cli", "train", str(config_path)]).returncode
        entry["status"] = "finished" if code == 0 else "failed"
        write_json_atomic(out / STUDY_FILE, record)
        if code != 0:
            raise UserError(f"run {spec.name} failed (exit code {code}, output above); fix it and rerun with "
                            f"--resume: finished runs are kept")
    return record


def _status(out: Path, spec: RunSpec) -> str:
    return "finished" if (out / "runs" / spec.name / "summary.json").exists() else "pending"


def run_synthetic_study(study: Study, out: Path, *, resume: bool) -> dict[str, Any]:
    """Every arm x width x task x seed through compare.synthetic.train_and_score; rows saved as they finish."""
    from archlab.archs.config import ModelConfig
    from archlab.compare.synthetic import SyntheticTask, train_and_score
    from archlab.train.config import validate_config

    settings = study.synthetic
    tasks = [validate_config(task, source=f"study {study.study} task", section=SyntheticTask)
             for task in settings.tasks]
    arms = {name: validate_config(arm.get("model", {}), source=f"study {study.study} arm {name}",
                                  section=ModelConfig) for name, arm in study.arms.items()}
    _check_out_dir(out, resume, study)
    out.mkdir(parents=True, exist_ok=True)
    saved = json.loads((out / STUDY_FILE).read_text()) if (out / STUDY_FILE).exists() else {}
    record = _header(study, device_name(torch.device("cpu")))
    record["runs"], record["synthetic"] = [], saved.get("synthetic", [])
    done = {(row["arm"], row["d_model"], row["setting"], row["seed"]) for row in record["synthetic"]}
    for task in tasks:
        setting = task.model_dump_json()
        for arm, model_cfg in arms.items():
            for width in settings.widths:
                for seed in study.seeds:
                    if (arm, width, setting, seed) in done:
                        continue
                    sized = model_cfg.model_copy(update={"d_model": width})
                    sized = ModelConfig.model_validate(sized.model_dump())  # re-checks heads against the width
                    result = train_and_score(sized, task, steps=settings.steps, batch_size=settings.batch_size,
                                             lr=settings.lr, seed=seed)
                    row = {"arm": arm, "backbone": sized.backbone, "d_model": width, "seed": seed,
                           "setting": setting, **task.model_dump(), **result}
                    record["synthetic"].append(row)
                    print(f"{task.task} L={task.seq_len} pairs={task.n_pairs} {arm} d={width} seed={seed}: "
                          f"accuracy {result['accuracy']:.3f}", flush=True)
                    write_json_atomic(out / STUDY_FILE, record)
    write_json_atomic(out / STUDY_FILE, record)
    return record


def run_study(path: str | Path, out: str | Path | None = None, *, resume: bool = False,
              report: bool = True) -> Path:
    study = load_study(path)
    out = Path(out) if out is not None else Path("runs") / "studies" / study.study
    if study.kind == "synthetic":
        run_synthetic_study(study, out, resume=resume)
    else:
        run_lm_study(study, out, resume=resume)
    if report:
        from archlab.compare.report import write_report

        written = write_report(out)
        print(f"report: {written.get('report', out / 'report.md')}")
    return out


def describe_plan(path: str | Path) -> str:
    """The runs a study would make, as YAML (for `archlab compare --dry-run`)."""
    study = load_study(path)
    if study.kind == "synthetic":
        return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    specs = plan_runs(study, steps_per_second=measure_steps_per_second)
    return yaml.safe_dump([_run_record(spec, "planned") for spec in specs], sort_keys=False)
