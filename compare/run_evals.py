"""A study's `evals:` on its trained runs: length extrapolation with passkey retrieval (compare/length.py, as
`archlab eval RUN --lengths ... --per-position`) and inference cost (compare/inference_bench.py, as
`archlab bench inference RUN`). Each writes one file into the run directory, which the report reads; a run whose
file holds the study's current settings is skipped, so `archlab compare --resume` does only what is missing or
was asked for differently since.
"""
from __future__ import annotations

import json
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


def check_evals(study: Study, specs: list[RunSpec]) -> None:
    """What the evaluations would refuse once every run has trained, refused before the first run instead."""
    if study.evals is None:
        return
    from archlab.archs.registry import OBJECTIVES
    from archlab.compare.inference_bench import check_settings, decoding_of

    inference = study.evals.inference
    if inference is not None:
        check_settings(inference.contexts, [inference.batch_size], inference.new_tokens, repeats=1)
    for spec in evaluated_specs(study, specs):
        cfg = spec.config
        if inference is not None and decoding_of(cfg) is None:
            raise UserError(f"evals: arm {spec.arm} (model.objective={cfg.model.objective}) cannot generate text, "
                            "so it has no inference cost to measure; leave it out of evals.arms")
        lengths = [m * cfg.data.seq_len for m in study.evals.lengths or []]
        for length in [*lengths, *(inference.contexts if inference else [])]:
            try:
                OBJECTIVES[cfg.model.objective].check_seq_len(cfg.model, length)
            except ValueError as err:
                raise UserError(f"evals: arm {spec.arm} cannot run {length} tokens: {err}") from None


def evaluate_runs(study: Study, out: Path, specs: list[RunSpec], record: dict[str, Any], *,
                  save: Callable[[], None]) -> None:
    """Runs each requested evaluation on each finished run that lacks its result (or has one made with other
    settings); marks the entry `finished` or
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
        for name, result_file, wanted, evaluate in _evaluations(study):
            if _saved_settings(run_dir / result_file, spec) == wanted(spec):
                entry[name] = "finished"
                continue
            print(f"{name.replace('_', ' ')} of {spec.name}", flush=True)  # missing, or done with other settings
            try:
                evaluate(run_dir, spec)
                entry[name] = "finished"
            # a length the run cannot reach, or out of memory: the other runs still get theirs
            except (UserError, ValueError, RuntimeError) as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                entry[name] = "failed"
            save()


def failed_evaluations(record: dict[str, Any]) -> list[str]:
    return [f"{name.replace('_', ' ')} of {run['name']}" for run in record["runs"]
            for name in ("length_eval", "inference") if run.get(name) == "failed"]


def _evaluations(study: Study):
    """(entry key, result file in the run dir, settings(spec) as the file records them, evaluate(run_dir, spec))
    for each evaluation the study asks for."""
    evals = study.evals
    if evals.lengths is not None:
        from archlab.compare.length import LENGTH_FILE, evaluate_lengths

        def length_settings(spec: RunSpec) -> dict:
            causal = spec.config.model.objective == AUTOREGRESSIVE  # positions and passkey need next-token scores
            return {"lengths": sorted(evals.lengths), "per_position": causal, "passkey": evals.passkey and causal}

        def lengths(run_dir: Path, spec: RunSpec) -> None:
            settings = length_settings(spec)
            evaluate_lengths(run_dir, settings["lengths"], per_position=settings["per_position"],
                             passkey=settings["passkey"])

        yield "length_eval", LENGTH_FILE, length_settings, lengths
    if evals.inference is not None:
        from archlab.compare.inference_bench import INFERENCE_FILE, measure_run_inference

        def inference_settings(spec: RunSpec) -> dict:
            settings = evals.inference
            return {"contexts": sorted(settings.contexts), "batch_sizes": [settings.batch_size],
                    "n_tokens": settings.new_tokens}

        def inference(run_dir: Path, spec: RunSpec) -> None:
            settings = evals.inference
            measure_run_inference(run_dir, contexts=settings.contexts, batch_size=settings.batch_size,
                                  new_tokens=settings.new_tokens)

        yield "inference", INFERENCE_FILE, inference_settings, inference


def _saved_settings(path: Path, spec: RunSpec) -> dict | None:
    """The settings an earlier evaluation recorded in `path` (None if there is none or it is unreadable), in the
    form of the `settings(spec)` functions above, so a study whose evals changed redoes them on --resume."""
    try:
        result = json.loads(path.read_text())
        if "lengths" in result:
            rows = result["lengths"]
            return {"lengths": [row["multiple"] for row in rows], "per_position": all("buckets" in r for r in rows),
                    "passkey": all("passkey" in r for r in rows)}
        return {key: result[key] for key in ("contexts", "batch_sizes", "n_tokens")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
