"""`archlab compare STUDY.yaml [--out DIR] [--resume]`: run every arm of a study, then write its report.

Runs go one after another, each in its own process through the normal trainer (`archlab train`), into
OUT/runs/<name>; OUT/configs/<name>.yaml holds the exact config each was given and OUT/study.json the plan and
each run's status (rewritten atomically after every run). A run whose summary.json exists is finished and
skipped; an interrupted one continues from its last checkpoint (run.resume=auto), so `--resume` after a crash
or a kill redoes nothing that was finished. Everything is validated and sized before the first run starts.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import fcntl
import functools
import json
import multiprocessing
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from archlab.compare.run_evals import check_evals, evaluate_runs, failed_evaluations
from archlab.compare.study import RunSpec, Study, load_study, plan_runs, probe_pairs
from archlab.kernels.common.files import atomic_write, json_text
from archlab.kernels.common.provenance import git_commit
from archlab.kernels.common.timing import timed
from archlab.kernels.hardware import device_name
from archlab.train.config import RESUMABLE_CHANGES, Config, config_differences, dump_config, load_config
from archlab.train.data import resolve_data_path
from archlab.train.errors import ConfigError, UserError
from archlab.train.linear_probe import RESULT_FILE as PROBE_FILE, probe_run
from archlab.train.loading import resolve_device
from archlab.train.trainer import Trainer

STUDY_FILE = "study.json"
LOCK_FILE = ".lock"  # held while an `archlab compare` works in OUT


def measure_steps_per_second(cfg: Config, steps: int = 10) -> float:
    """Training steps per second of a config on this machine (one warm-up step, then `steps` timed)."""
    with tempfile.TemporaryDirectory() as tmp:
        timing = cfg.model_copy(deep=True)
        timing.run.dir, timing.run.wandb, timing.run.progress = str(Path(tmp) / "run"), "disabled", False
        trainer = Trainer(timing)
        trainer.train_step(trainer.sampler.batch(0))
        rate = steps / timed(functools.partial(_train_steps, trainer, first=1, count=steps), trainer.device)[1]
        del trainer
        if torch.cuda.is_available():  # leave the GPU's memory to the runs, which are other processes
            torch.cuda.empty_cache()
        return rate


def _train_steps(trainer: Trainer, *, first: int, count: int) -> None:
    for index in range(first, first + count):
        trainer.train_step(trainer.sampler.batch(index))


def _run_record(spec: RunSpec, status: str) -> dict[str, Any]:
    model = spec.config.model
    return {"name": spec.name, "arm": spec.arm, "seed": spec.seed, "size": spec.size, "budget": spec.budget.label,
            "run_dir": f"runs/{spec.name}", "status": status, "backbone": model.stack_name,
            "objective": model.objective, "d_model": model.d_model, "n_layers": model.n_layers,
            "params": spec.params, "flops_per_token": spec.flops_per_token, "max_steps": spec.config.train.max_steps,
            "quality_metric": spec.quality_metric, "probe": spec.probe, "bound": spec.bound, "match": spec.match}


def _header(study: Study, device: str) -> dict[str, Any]:
    budget = [b.model_dump(exclude_none=True) for b in study.budgets]
    return {"study": study.study, "kind": study.kind, "budget": budget[0] if len(budget) == 1 else budget or None,
            "seeds": study.seeds, "created": datetime.date.today().isoformat(), "device": device,
            "torch": torch.__version__, "commit": git_commit(), "resolved_by": study.resolved_by}


@contextlib.contextmanager
def _exclusive(out: Path):
    """One `archlab compare` per output directory at a time: two would train the same run into one run dir."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `archlab compare` is working in {out}; wait for it or choose another --out") \
                from None
        yield


def _check_out_dir(out: Path, resume: bool, study: Study) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    contents = [p for p in out.iterdir() if p.name != LOCK_FILE] if out.is_dir() else []
    saved = out / STUDY_FILE
    if contents and not saved.exists():
        raise UserError(f"--out {out} is not empty and holds no study; choose a new directory")
    if saved.exists():
        if not resume:
            raise UserError(f"{out} already holds study results; pass --resume to continue it or choose a new --out")
        if json.loads(saved.read_text()).get("study") != study.study:
            raise UserError(f"{out} holds another study; choose a new --out")


def _saved_configs(out: Path) -> dict[str, Config]:
    """The configs earlier invocations gave each run (OUT/configs/<name>.yaml)."""
    folder = out / "configs"
    if not folder.is_dir():
        return {}
    return {path.stem: load_config(path, saved=True) for path in sorted(folder.glob("*.yaml"))}


def _check_unchanged(spec: RunSpec, saved: Config | None) -> None:
    """A run started by an earlier invocation must get the same settings now: else results would mix."""
    if saved is None:
        return
    changed = [k for k in config_differences(saved, spec.config) if k not in RESUMABLE_CHANGES]
    if changed:
        raise UserError(f"run {spec.name} was started with other settings ({', '.join(changed[:3])} changed): the "
                        "study file changed since; use a new --out, or undo the change to resume")


def _resumed_header(out: Path, study: Study, device: str) -> dict[str, Any]:
    """The first invocation's header (date, device, commit), with later invocations listed under `resumed`."""
    header = _header(study, device)
    saved_path = out / STUDY_FILE
    if not saved_path.exists():
        return header
    saved = json.loads(saved_path.read_text())
    kept = {key: saved.get(key, header[key]) for key in ("created", "device", "torch", "commit")}
    resumed = saved.get("resumed", []) + [{key: header[key] for key in ("created", "device", "torch", "commit")}]
    return header | kept | {"resumed": resumed}


def run_lm_study(study: Study, out: Path, *, resume: bool, python: str = sys.executable) -> dict[str, Any]:
    """Plans (validating everything), then trains each unfinished run in its own process; returns study.json.

    A run that fails is marked `failed` and the others still run; the caller reports and then raises."""
    _check_out_dir(out, resume, study)
    device = device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    saved = _saved_configs(out)
    # a seconds budget was turned into steps by a speed measurement: resuming keeps that number of steps
    specs = plan_runs(study, steps_per_second=measure_steps_per_second,
                      known_steps={name: cfg.train.max_steps for name, cfg in saved.items()})
    for spec in specs:  # what the trainer would refuse at the start of a run, refused before the first one
        resolve_data_path(spec.config.data.path)
        resolve_device(spec.config.train.device)
        _check_unchanged(spec, saved.get(spec.name))
    check_evals(study, specs)
    unplanned = sorted(set(saved) - {spec.name for spec in specs})
    if unplanned:
        raise UserError(f"{out} holds run {unplanned[0]}, which the study no longer plans: the study file changed "
                        "since; use a new --out")
    with _exclusive(out):  # only now, when everything checked out: a refused study writes nothing
        return _train_runs(study, out, specs, device, python)


def _train_runs(study: Study, out: Path, specs: list[RunSpec], device: str, python: str) -> dict[str, Any]:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "runs").mkdir(exist_ok=True)
    record = _resumed_header(out, study, device)
    record["runs"] = [_run_record(spec, _status(out, spec)) for spec in specs]
    atomic_write(out / STUDY_FILE, json_text(record))
    for index, spec in enumerate(specs):
        entry = record["runs"][index]
        if entry["status"] == "finished":
            print(f"[{index + 1}/{len(specs)}] {spec.name}: finished earlier, skipped", flush=True)
            continue
        config_path = out / "configs" / f"{spec.name}.yaml"
        cfg = spec.config.model_copy(deep=True)
        cfg.run.dir, cfg.run.resume, cfg.run.progress = str((out / entry["run_dir"]).resolve()), "auto", False
        atomic_write(config_path, dump_config(cfg))
        print(f"[{index + 1}/{len(specs)}] {spec.name}: {spec.params / 1e6:.2f}M params, "
              f"{spec.flops_per_token / 1e6:.2f} MFLOP/token, {spec.config.train.max_steps} steps", flush=True)
        code = subprocess.run([python, "-m", "archlab.compare.cli", "train", str(config_path),
                               "--nproc", str(study.nproc_per_node)]).returncode
        entry["status"] = "finished" if code == 0 else "failed"
        entry["exit_code"] = code
        atomic_write(out / STUDY_FILE, json_text(record))
    _probe_runs(study, out, specs, record)
    evaluate_runs(study, out, specs, record, save=lambda: atomic_write(out / STUDY_FILE, json_text(record)))
    return record


def _probe_runs(study: Study, out: Path, specs: list[RunSpec], record: dict[str, Any]) -> None:
    """Linear evaluation (train/linear_probe.py, as `archlab eval RUN --linear-probe`) of the runs that
    study.linear_probe names, once trained. A run probed earlier is skipped, unless its baseline run has finished
    since (a baseline that failed before and was retrained on --resume joins its probe then)."""
    entries = {entry["name"]: entry for entry in record["runs"]}
    for spec, baseline in probe_pairs(study, specs):
        entry, run_dir = entries[spec.name], out / entries[spec.name]["run_dir"]
        if entry["status"] != "finished":
            continue
        baseline_dir = None
        if baseline is not None and entries[baseline.name]["status"] == "finished":
            baseline_dir = out / entries[baseline.name]["run_dir"]
        if (run_dir / PROBE_FILE).exists() and (baseline_dir is None or _probed_beside_a_baseline(run_dir)):
            entry["linear_probe"] = "finished"
            continue
        print(f"linear evaluation of {spec.name}" + (f" beside {baseline.name}" if baseline_dir else ""), flush=True)
        try:
            probe_run(run_dir, baseline=baseline_dir, mlp=study.linear_probe.mlp)
            entry["linear_probe"] = "finished"
        except UserError as err:  # e.g. a damaged checkpoint: the other runs still get theirs
            print(f"error: {err}", file=sys.stderr, flush=True)
            entry["linear_probe"] = "failed"
        atomic_write(out / STUDY_FILE, json_text(record))


def _probed_beside_a_baseline(run_dir: Path) -> bool:
    try:
        return any(e.get("name") == "baseline" for e in json.loads((run_dir / PROBE_FILE).read_text())["encoders"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unreadable: probe it again


def _status(out: Path, spec: RunSpec) -> str:
    return "finished" if (out / "runs" / spec.name / "summary.json").exists() else "pending"


def run_synthetic_study(study: Study, out: Path, *, resume: bool) -> dict[str, Any]:
    """Every arm x width x task x seed through compare.synthetic.train_and_score; rows saved as they finish.

    Each row records everything that made it (the model settings, the task, steps, lr, batch size, seed): on
    --resume a row is reused only when all of that is unchanged, and rows the study no longer plans are refused."""
    from archlab.archs.config import ModelConfig, fit_to_new_stack
    from archlab.compare.synthetic import SyntheticMixture, SyntheticTask, check_training
    from archlab.train.config import deep_merge, validate_config

    settings = study.synthetic
    tasks = [validate_config(task, source=f"study {study.study} task {i}",
                             section=SyntheticMixture if "train" in task else SyntheticTask)
             for i, task in enumerate(settings.tasks)]
    _check_out_dir(out, resume, study)
    device = resolve_device("auto")
    plan = []
    for task in tasks:
        for arm, arm_tree in study.arms.items():
            for width in settings.widths:
                model = {**study.base.get("model", {})}
                deep_merge(model, {**arm_tree.get("model", {}), "d_model": width})
                model = fit_to_new_stack(model, arm_tree.get("model", {}))
                model_cfg = validate_config(model, source=f"study {study.study} arm {arm} d_model={width}",
                                            section=ModelConfig)
                for seed in study.seeds:
                    plan.append((arm, model_cfg, task, seed))
    training = {"steps": settings.steps, "lr": settings.lr, "batch_size": settings.batch_size}
    for arm, model_cfg, task, _ in plan:  # what a row would refuse once training starts, refused before the first
        try:
            check_training(model_cfg, task, **training)
        except ValueError as err:
            raise ConfigError(f"study {study.study} arm {arm}: {err}") from None

    def key(arm: str, model: dict, setting: str, seed: int, steps: int, lr: float, batch_size: int) -> str:
        return json.dumps([arm, model, setting, seed, steps, lr, batch_size], sort_keys=True)

    planned = {key(arm, cfg.model_dump(mode="json"), task.model_dump_json(), seed, **training): (arm, cfg, task, seed)
               for arm, cfg, task, seed in plan}
    saved = json.loads((out / STUDY_FILE).read_text()).get("synthetic", []) if (out / STUDY_FILE).exists() else []
    done = {key(r["arm"], r["model"], r["setting"], r["seed"], r["steps"], r["lr"], r["batch_size"]) for r in saved}
    if done - set(planned):
        raise UserError(f"{out} holds results the study no longer plans (its file changed since); use a new --out")
    with _exclusive(out):
        return _score_rows(study, out, planned, done, saved, device, training)


def _score_rows(study: Study, out: Path, planned: dict, done: set, saved: list, device, training: dict) -> dict:
    """Trains every pending row, `synthetic.workers` at a time (each worker a process on one thread: tiny models
    use a core better alone than split across two), saving study.json as each finishes."""
    record = _resumed_header(out, study, device_name(device))
    record["runs"], record["synthetic"] = [], saved
    pending = [row for row_key, row in planned.items() if row_key not in done]
    workers = study.synthetic.workers
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads,
                initargs=(1,)))
            futures = [pool.submit(_train_row, row, device, training) for row in pending]
            # a row that fails cancels the rows not started yet (rows that finished are saved already)
            stack.callback(lambda: [future.cancel() for future in futures])
            finished = (future.result() for future in concurrent.futures.as_completed(futures))
        else:
            finished = (_train_row(row, device, training) for row in pending)
        for (arm, model_cfg, task, seed), result in finished:
            _add_rows(record, arm, model_cfg, task, seed, training, result)
            atomic_write(out / STUDY_FILE, json_text(record))
    atomic_write(out / STUDY_FILE, json_text(record))
    return record


def _train_row(row: tuple, device, training: dict) -> tuple[tuple, dict]:
    from archlab.compare.synthetic import train_and_score

    arm, model_cfg, task, seed = row
    return row, train_and_score(model_cfg, task, seed=seed, device=device, **training)


def _add_rows(record: dict, arm: str, model_cfg, task, seed: int, training: dict, result: dict) -> None:
    """One row per test setting, each with the model's decoding state bytes at its seq_len."""
    scores = result.pop("scores")
    for score in scores:
        record["synthetic"].append({
            "arm": arm, "backbone": model_cfg.stack_name, "mixers": sorted(set(model_cfg.layer_mixers)),
            "d_model": model_cfg.d_model, "seed": seed, "setting": task.model_dump_json(), "task": task.task,
            "power_a": task.power_a, "vocab": task.vocab, "train_examples": task.train_examples,
            "test_examples": task.test_examples, **training, "model": model_cfg.model_dump(mode="json"), **result,
            **score, "state_dtype": "float32"})
    print(f"{task.task} trained on {result['trained_on']} {arm} d={model_cfg.d_model} seed={seed}: accuracy "
          + ", ".join(f"L{s['seq_len']}×{s['n_pairs']} {s['accuracy']:.3f}" for s in scores), flush=True)


def run_study(path: str | Path, out: str | Path | None = None, *, resume: bool = False,
              report: bool = True) -> Path:
    study = load_study(path)
    out = Path(out) if out is not None else Path("runs") / "studies" / study.study
    if study.kind == "synthetic":
        record = run_synthetic_study(study, out, resume=resume)
    else:
        record = run_lm_study(study, out, resume=resume)
    failed = [run["name"] for run in record["runs"] if run["status"] == "failed"]
    if report and (record.get("synthetic") or len(failed) < len(record["runs"])):
        from archlab.compare.report import write_report

        written = write_report(out)
        print(f"report: {written.get('report.md', out / 'report.md')}")
    if failed:
        raise UserError(f"run {failed[0]} failed ({len(failed)} in all; output above); fix it and rerun with "
                        "--resume: finished runs are kept")
    unprobed = [run["name"] for run in record["runs"] if run.get("linear_probe") == "failed"]
    if unprobed:
        raise UserError(f"linear evaluation of {unprobed[0]} failed (output above); rerun with --resume to retry it")
    unevaluated = failed_evaluations(record)
    if unevaluated:
        raise UserError(f"{unevaluated[0]} failed (output above); rerun with --resume to retry it")
    return out


def describe_plan(path: str | Path) -> str:
    """The runs a study would make, as YAML (for `archlab compare --dry-run`)."""
    study = load_study(path)
    if study.kind == "synthetic":
        return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
    specs = plan_runs(study, steps_per_second=measure_steps_per_second)
    return yaml.safe_dump([_run_record(spec, "planned") for spec in specs], sort_keys=False)
