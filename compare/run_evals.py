"""A study's `evals:` on its trained runs: length extrapolation with passkey retrieval (compare/length.py, as
`archlab eval RUN --lengths ... --per-position`) and inference cost (compare/inference_bench.py, as
`archlab bench inference RUN`). Each writes one file into the run directory, which the report reads; a run that has
its file already is skipped, so `archlab compare --resume` finishes only what is missing.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from archlab.compare.study import RunSpec, Study
from archlab.train.errors import UserError

AUTOREGRESSIVE = "autoregressive"


def evaluated_specs(study: Study, specs: list[RunSpec]) -> list[RunSpec]:
    """The runs `evals` applies to: those of evals.arms, or of every autoregressive arm."""
    wanted = study.evals.arms
    return [spec for spec in specs
            if (spec.arm in wanted if wanted else spec.config.model.objective == AUTOREGRESSIVE)]


def evaluate_runs(study: Study, out: Path, specs: list[RunSpec], record: dict[str, Any], *,
                  save: Callable[[], None]) -> None:
    """Runs each requested evaluation on each finished run that lacks its file; marks the entry `finished` or
    `failed` under the evaluation's name (a failure is printed and the other runs still get theirs), calling
    `save` (which writes study.json) after each."""
    if study.evals is None:
        return
    entries = {entry["name"]: entry for entry in record["runs"]}
    for spec in evaluated_specs(study, specs):
        entry = entries[spec.name]
        if entry["status"] != "finished":
            continue
        run_dir = out / entry["run_dir"]
        for name, result_file, evaluate in _evaluations(study):
            if (run_dir / result_file).exists():
                entry[name] = "finished"
                continue
            print(f"{name.replace('_', ' ')} of {spec.name}", flush=True)
            try:
                evaluate(run_dir, spec)
                entry[name] = "finished"
            except (UserError, ValueError) as err:  # e.g. a length the run cannot reach: the others still run
                print(f"error: {err}", file=sys.stderr, flush=True)
                entry[name] = "failed"
            save()


def failed_evaluations(record: dict[str, Any]) -> list[str]:
    return [f"{name.replace('_', ' ')} of {run['name']}" for run in record["runs"]
            for name in ("length_eval", "inference") if run.get(name) == "failed"]


def _evaluations(study: Study):
    """(entry key, result file in the run dir, function(run_dir, spec)) for each evaluation the study asks for."""
    evals = study.evals
    if evals.lengths is not None:
        from archlab.compare.length import LENGTH_FILE, evaluate_lengths

        def lengths(run_dir: Path, spec: RunSpec) -> None:
            evaluate_lengths(run_dir, evals.lengths, per_position=True,
                             passkey=evals.passkey and spec.config.model.objective == AUTOREGRESSIVE)

        yield "length_eval", LENGTH_FILE, lengths
    if evals.inference is not None:
        from archlab.compare.inference_bench import INFERENCE_FILE, measure_run_inference

        def inference(run_dir: Path, spec: RunSpec) -> None:
            settings = evals.inference
            measure_run_inference(run_dir, contexts=settings.contexts, batch_size=settings.batch_size,
                                  new_tokens=settings.new_tokens)

        yield "inference", INFERENCE_FILE, inference
