"""Study report (`archlab report DIR`): report.md, results.csv and PNG plots from a study output directory.

Reads OUT/study.json and each finished run's summary.json and metrics.jsonl (layout: notes in compare/runner.py).
Everything is computed in memory first, so a bad study directory raises before any file is written; the files
are then all written to temporary names before any is moved into place.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from archlab.archs.registry import build_model
from archlab.archs.summary import decoding_state_bytes

from archlab.compare import plots
from archlab.compare.inference_bench import INFERENCE_FILE, inference_cost, inference_section
from archlab.compare.length import LENGTH_FILE, length_report_section
from archlab.compare.reading import comparable, ranked_groups, reading, seed_note, versus_best
from archlab.compare.scaling import budget_frontier, fit_power_law, pareto_front
from archlab.kernels.common.files import atomic_write_all
from archlab.kernels.common.markdown import table, table_row
from archlab.train.config import run_config
from archlab.train.errors import UserError
from archlab.train.loading import autocast_dtype
from archlab.train.linear_probe import RESULT_FILE as PROBE_FILE
from archlab.train.run_log import read_metrics

CSV_COLUMNS = ["name", "arm", "seed", "size", "budget", "backbone", "objective", "params", "flops_per_token", "tokens",
               "train_flops", "train_seconds", "tokens_per_s", "peak_memory_mb", "state_bytes", "state_bytes_4x",
               "final", "quality_metric", "probe", "bound"]
ARM_COLUMNS = ["arm", "seeds", "final metric", "metric", "flags", "vs best", "Pareto FLOPs", "Pareto time",
               "Pareto state"]
PARETO_MARKS = ["pareto_flops", "pareto_time", "pareto_state"]
COST_COLUMNS = ["arm", "params", "FLOPs/token", "tokens", "train FLOPs", "train tokens/s", "peak memory MB",
                "state @L", "state @4L"]
FIT_COLUMNS = ["arm", "E", "A", "α", "points", "rmse"]
PROBE_COLUMNS = ["run", "probe", "trained encoder", "its step-0 encoder", "baseline run", "own figure", "unigram",
                 "bigram", "training added"]
SPREAD = "± half the range over seeds, (max − min) / 2"
FLAG_NOTES = {"probe": "JEPA: bpb of a linear byte probe on frozen features, not a likelihood of the model",
              "bound": "diffusion: the NELBO, an upper bound on the true bpb"}
WALLCLOCK_NOTE = ("Wall-clock at each evaluation is approximated as train_seconds × flops_k / train_flops "
                  "(constant cost per step); evaluation time is not counted.")
FIT_NOTE = ("Fit of L(C) = E + A·C^−α per arm (C = training FLOPs) over the runs of its best size at each training "
            "budget (every size, when each has its own budget); ± = standard error from the Jacobian at the optimum "
            "(NaN with exactly 3 points).")
LINEAR_PROBE_NOTE = (
    "Fresh byte probes trained on frozen features once training is over (`archlab eval RUN --linear-probe`; "
    "protocol in train/linear_probe.py: whitened features, AdamW over an lr grid, early stopping on held-out train "
    "windows), scored in bits per byte on the run's eval windows. Beside each: the same protocol on the run's "
    "step-0 encoder (rebuilt from its seed) and on the baseline arm's run at equal training FLOPs. Unigram / "
    "bigram: the eval bytes' entropy under the train split's byte (pair) frequencies, what byte statistics alone "
    "give. Training added = step-0 encoder's bpb − trained encoder's bpb. Own figure = the run's final quality "
    "metric (a JEPA's online probe, trained alongside the encoder; an LM's own head).")
STATE_NOTE = ("State @L / @4L: one sequence's decoding state (KV cache or recurrent state, from the mixers' "
              "state_bytes) after the trained length and after 4x it, in the run's activation dtype; – for a "
              "bidirectional model, whose sampler reruns the whole sequence.")
INFERENCE_NOTE = ("Measured by `evals: {{inference: ...}}` (`archlab bench inference RUN`; method in "
                  "compare/inference_bench.py): times are the median of {repeats} timed call(s) per setting after a "
                  "warm-up, so on a shared CPU read them as ±50%; state bytes are the cache's tensors; peak memory: "
                  "{peak}. Pareto decode in the table above: final val bpb vs decode ms per token at that context.")
# the inference-cost axes of quality_vs_inference.png: (group key, axis label)
INFERENCE_COSTS = [("state_bytes_4x", "decoding state per sequence at 4x the trained length, bytes"),
                   ("decode_ms", "decode ms per token at the largest measured context")]
PARETO_COST_TOLERANCE = 0.02  # runs matched to one budget land within a step of it: equal cost, not cheaper

def write_report(out_dir: Path) -> dict[str, Path]:
    """Write the report files into out_dir; returns {file name: path} of what was written."""
    out_dir = Path(out_dir)
    study = _read_study(out_dir)
    if study.get("kind") == "synthetic":
        from archlab.compare.synthetic_report import write_synthetic_report  # it imports this module's helpers

        return write_synthetic_report(study, out_dir)
    loaded = [(entry.get("name", "?"), *_load_run(out_dir, entry)) for entry in study["runs"]]
    runs = [run for _, run, _ in loaded if run is not None]
    skipped = [(name, reason) for name, run, reason in loaded if run is None]
    if not runs:
        raise UserError(f"no finished run in {out_dir} ({len(skipped)} pending/failed/incomplete); "
                        "let `archlab compare` finish at least one run first")
    groups = _aggregate(runs)
    files: dict[str, bytes] = {}
    bpb_groups = [g for g in groups if g["quality_metric"] == "bpb"]
    if bpb_groups:
        files["bpb_vs_flops.png"] = plots.curve_plot(bpb_groups, 0, "training FLOPs (log scale)", study["study"])
        files["bpb_vs_wallclock.png"] = plots.curve_plot(bpb_groups, 1, "training wall-clock, s (log scale)",
                                                    study["study"])
    fits = None
    if any(r["size"] is not None for r in runs) or len({r["budget"] for r in runs}) > 1:
        fits = _fit_arms(groups)
        if bpb_groups:
            files["isoflop.png"] = plots.isoflop_plot(bpb_groups, study["study"])
            files["scaling.png"] = plots.scaling_plot(bpb_groups, fits, study["study"])
    probed = [run for run in runs if run["linear_probe"] is not None]
    if probed:
        files["linear_probe.png"] = plots.linear_probe_plot(probed, study["study"])
    sections = []
    lengths = [(run["name"], run["length_eval"]) for run in runs if run["length_eval"]]
    if lengths:
        markdown, images = length_report_section(lengths, "Length: bits per byte past the trained length, passkey")
        sections.append(markdown)
        files |= images
    measured = [run["inference"] for run in runs if run["inference"]]
    if measured:
        note = INFERENCE_NOTE.format(repeats="/".join(sorted({str(r.get("repeats", "?")) for r in measured})),
                                     peak="; ".join(sorted({str(r.get("peak_memory_measure")) for r in measured})))
        sections.append(f"## Inference cost\n\n{inference_section(measured)}\n{note}\n\n"
                        "![quality vs inference cost](quality_vs_inference.png)\n")
        files["quality_vs_inference.png"] = plots.quality_cost_plot(
            [g for g in groups if comparable(g)], INFERENCE_COSTS, study["study"],
            cost_tolerance=PARETO_COST_TOLERANCE)
    files["results.csv"] = _csv(runs, CSV_COLUMNS)
    resolving = _resolving_groups(out_dir, study.get("resolved_by"))
    files["report.md"] = _report_md(study, groups, skipped, fits, files, sections, resolving).encode()
    return _write_files(out_dir, files)


def _resolving_groups(out_dir: Path, resolved_by: str | None) -> list[dict] | None:
    """The arms of the resolved_by study, aggregated over its seeds, when its output lies beside this one's (as
    `archlab compare` puts them: runs/studies/NAME, or compare/results/NAME); None otherwise."""
    if not resolved_by:
        return None
    sibling = out_dir.resolve().parent / Path(resolved_by).stem
    if sibling == out_dir.resolve() or not (sibling / "study.json").is_file():
        return None
    loaded = [_load_run(sibling, entry)[0] for entry in _read_study(sibling)["runs"]]
    return _aggregate([run for run in loaded if run is not None]) if any(loaded) else None


def _read_study(out_dir: Path) -> dict:
    path = out_dir / "study.json"
    if not path.is_file():
        raise UserError(f"{path} not found; pass the output directory of `archlab compare`")
    try:
        study = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); rerun `archlab compare` to rewrite it") from None
    if not isinstance(study, dict) or not isinstance(study.get("runs", []), list) or "study" not in study:
        raise UserError(f"{path} lacks the study name or a runs list; rerun `archlab compare` to rewrite it")
    study.setdefault("runs", [])
    if not all(isinstance(entry, dict) and (entry.get("status") != "finished" or isinstance(entry.get("run_dir"), str))
               for entry in study["runs"]):
        raise UserError(f"{path}: every runs[] entry must be a mapping, and a finished one needs its run_dir; rerun "
                        "`archlab compare` to rewrite it")
    return study


def _load_run(out_dir: Path, entry: dict) -> tuple[dict | None, str]:
    """(run, "") for a usable finished run, else (None, why it is skipped)."""
    if entry.get("status") != "finished":
        return None, f"status {entry.get('status', 'unknown')}"
    run_dir = out_dir / entry["run_dir"]
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None, f"finished but {entry['run_dir']}/summary.json is missing or unreadable"
    metric = entry.get("quality_metric", "bpb")
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    evals = [(r["flops"], r[f"val_{metric}"]) for r in records
             if r.get("kind") == "eval" and f"val_{metric}" in r and r.get("flops") is not None]
    final = summary.get("val", {}).get(metric, summary.get(f"val_{metric}"))
    final = evals[-1][1] if final is None and evals else final
    if final is None:
        return None, f"no val_{metric} in summary.json or metrics.jsonl"
    unigram = next((r["val_unigram_bpb"] for r in reversed(records) if "val_unigram_bpb" in r), None)
    train_flops, train_seconds = summary.get("train_flops"), summary.get("train_seconds")
    seconds_per_flop = train_seconds / train_flops if train_flops and train_seconds else math.nan
    run = {key: entry.get(key) for key in ("name", "arm", "seed", "size", "budget", "flops_per_token")}
    run |= {key: summary.get(key, entry.get(key)) for key in ("backbone", "objective", "params")}
    run |= {key: summary.get(key) for key in ("tokens", "train_flops", "train_seconds", "tokens_per_s",
                                              "peak_memory_mb")}
    run |= _state_bytes(summary, run_dir)
    return run | {"final": float(final), "quality_metric": metric, "bound": bool(entry.get("bound")),
                  "probe": bool(entry.get("probe") or summary.get("probe")), "unigram_bpb": unigram,
                  "linear_probe": _read_probe(run_dir / PROBE_FILE),
                  "length_eval": _read_result(run_dir / LENGTH_FILE, "lengths"),
                  "inference": _read_result(run_dir / INFERENCE_FILE, "rows"),
                  "curve": [(f, f * seconds_per_flop, v) for f, v in evals]}, ""


def _state_bytes(summary: dict, run_dir: Path) -> dict:
    """The summary's decoding-state figures; for runs from before summaries carried them, the same figures from
    the run's saved config (the mixers' state_bytes need no weights)."""
    keys = ("state_bytes", "state_bytes_4x")
    if "state_bytes" in summary or not (run_dir / "config.yaml").is_file():
        return {key: summary.get(key) for key in keys}
    cfg = run_config(run_dir)
    if not cfg.model.runs_causally:  # no decoding state: nothing to build the model for
        return dict.fromkeys(keys)
    dtype = autocast_dtype(cfg, torch.device(summary.get("device", "cpu"))) or torch.float32
    state = decoding_state_bytes(build_model(cfg.model), cfg.data.seq_len, dtype=dtype)
    return {key: state[key] for key in keys}


def _read_result(path: Path, key: str) -> dict | None:
    """A run's evaluation file (written by `evals:`), None when it has none; one that cannot be read or lacks
    `key` fails here, before anything is written."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        if not isinstance(result, dict) or not result.get(key):
            raise ValueError("incomplete")
        return result
    except (OSError, ValueError):
        raise UserError(f"{path} is unreadable; delete it and rerun `archlab compare --resume` to redo it") from None


def _read_probe(path: Path) -> dict | None:
    """A run's linear evaluation (train/linear_probe.py), None when it has none; checked for every field the
    report reads, so a damaged file fails here, before anything is written."""
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
        encoders = {e["name"]: e for e in result["encoders"]}
        figures = [float(e[kind]["val_bpb"]) for e in encoders.values() for kind in result["kinds"]]
        float(result["entropies"]["unigram_bpb"])
        if not ({"trained", "random init"} <= set(encoders) and figures and isinstance(result["task"], str)
                and all(isinstance(e["run_dir"], str) for e in encoders.values())):
            raise ValueError("incomplete")
        return result
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is unreadable; delete it and rerun `archlab compare --resume` to redo the probe") \
            from None


def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _aggregate(runs: list[dict]) -> list[dict]:
    """One row per arm (per arm, size and budget in scaling studies): means over seeds, spread, Pareto marks."""
    by_key: dict[tuple, list[dict]] = {}
    for run in runs:
        by_key.setdefault((run["arm"], run["size"], run["budget"]), []).append(run)
    several_budgets = len({run["budget"] for run in runs}) > 1
    groups = []
    for (arm, size, budget), members in by_key.items():
        finals = [m["final"] for m in members]
        label = " @ ".join(str(part) for part in (arm, size, budget if several_budgets else None) if part is not None)
        group = {"label": label, "arm": arm, "size": size, "runs": members, "n": len(members),
                 "mean": float(np.mean(finals)), "spread": (max(finals) - min(finals)) / 2,
                 "quality_metric": members[0]["quality_metric"], "probe": any(m["probe"] for m in members),
                 "bound": any(m["bound"] for m in members), "pareto_flops": False, "pareto_time": False,
                 "pareto_state": False}
        for key in ("params", "flops_per_token", "tokens", "train_flops", "train_seconds", "tokens_per_s",
                    "peak_memory_mb", "state_bytes", "state_bytes_4x"):
            group[key] = _mean(m[key] for m in members)
        group["decode_ms"] = _mean(_decode_cost(m) for m in members)
        groups.append(group)
    # a probe's bpb is not the model's likelihood: it never competes on the front
    competing = [g for g in groups if comparable(g)]
    costs = [("train_flops", "pareto_flops"), ("train_seconds", "pareto_time"), ("state_bytes_4x", "pareto_state")]
    if any(g["decode_ms"] is not None for g in competing):
        costs.append(("decode_ms", "pareto_decode"))
    for cost, mark in costs:
        for group in groups:
            group.setdefault(mark, False)
        points = [(g[cost] if g[cost] is not None else math.nan, g["mean"]) for g in competing]
        for index in pareto_front(points, cost_tolerance=PARETO_COST_TOLERANCE):
            competing[index][mark] = True
    return groups


def _decode_cost(run: dict) -> float | None:
    """Decode milliseconds per token at the largest context the run's inference.json measured (batch 1)."""
    if run["inference"] is None:
        return None
    costs = list(inference_cost(run["inference"]).values())
    return costs[0]["decode_ms_per_token"] if costs else None


def _fit_arms(groups: list[dict]) -> dict[str, dict | str]:
    """Per arm: the L(C) fit over the runs of its best size at each training budget (all of them when every size
    has its own budget), or the reason there is none. Marks the groups used with "fitted"."""
    fits: dict[str, dict | str] = {}
    for arm in dict.fromkeys(g["arm"] for g in groups):
        candidates = [g for g in groups if g["arm"] == arm and g["train_flops"]]
        frontier = [candidates[i] for i in budget_frontier([g["train_flops"] for g in candidates],
                                                           [g["mean"] for g in candidates])]
        if len(frontier) < 3:
            fits[arm] = f"not enough sizes ({len(frontier)} distinct training budgets, need 3)"
            continue
        for group in frontier:
            group["fitted"] = True
        members = [run for group in frontier for run in group["runs"]]
        try:
            fits[arm] = fit_power_law([r["train_flops"] for r in members], [r["final"] for r in members])
        except ValueError as exc:
            fits[arm] = str(exc)
    return fits


def _csv(rows: list[dict], columns: list[str]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _fmt(value, kind: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.0f}" if kind == "int" else f"{value:.3g}"


def _final(group: dict) -> str:
    """The final metric, with the seed spread when there are several seeds."""
    return f"{group['mean']:.4f} ± {group['spread']:.4f}" if group["n"] > 1 else f"{group['mean']:.4f}"


def _report_md(study: dict, groups: list[dict], skipped: list, fits: dict | None, files: dict,
               sections: list[str], resolving: list[dict] | None) -> str:
    best = next(iter(ranked_groups(groups)), None)
    decode = any("pareto_decode" in g for g in groups)
    marks, columns = PARETO_MARKS + ["pareto_decode"] * decode, ARM_COLUMNS + ["Pareto decode"] * decode
    lines = [f"# Study report: {study['study']}", "", *_metadata(study),
             f"- finished runs: {sum(g['n'] for g in groups)}, skipped: {len(skipped)}", "", "## Results per arm", "",
             *table(columns, [_arm_cells(g, best, marks) for g in groups], compact_rule=True)]
    lines += ["", f"Final metric: mean over seeds {SPREAD}. Lower is better. Flags: "
              + "; ".join(f"**{k}** = {v}" for k, v in FLAG_NOTES.items()) + ".",
              seed_note(groups, study.get("resolved_by"), resolving),
              "★ = on the Pareto front of final val bpb vs total training FLOPs (Pareto FLOPs), vs training "
              "wall-clock (Pareto time) or vs one sequence's decoding state at 4x the trained length (Pareto state): "
              f"no other arm is both cheaper and better (costs within {PARETO_COST_TOLERANCE:.0%} count as equal; "
              "probe arms are left out, and bidirectional models, which keep no decoding state, from Pareto state)."]
    others = [g["label"] for g in groups if g["quality_metric"] != "bpb"]
    if others:
        lines.append(f"Not bpb, so kept out of the plots and the Pareto fronts: {', '.join(others)}.")
    lines += ["", "## Reading", "", reading(groups, _fmt), "", "## Costs", "",
              *table(COST_COLUMNS, [_cost_cells(g) for g in groups], compact_rule=True), "", STATE_NOTE, ""]
    probed = [run for g in groups for run in g["runs"] if run["linear_probe"] is not None]
    if probed:
        lines += _linear_probe_md(probed)
    if "bpb_vs_flops.png" in files:
        lines += ["## Curves", "", "![val bpb vs training FLOPs](bpb_vs_flops.png)", "",
                  "![val bpb vs wall-clock](bpb_vs_wallclock.png)", "", WALLCLOCK_NOTE, ""]
    if fits is not None:
        lines += ["## Scaling", "", FIT_NOTE, "", *table(FIT_COLUMNS, [], compact_rule=True),
                  *(_fit_row(arm, fit) for arm, fit in fits.items())]
        if "scaling.png" in files:
            lines += ["", "![isoFLOP view](isoflop.png)", "", "![scaling fits](scaling.png)"]
        lines.append("")
    lines += sections
    if skipped:
        lines += ["## Skipped runs", "", *(f"- {name}: {reason}" for name, reason in skipped), ""]
    lines += ["Per-run numbers: [results.csv](results.csv)."]
    return "\n".join(lines) + "\n"


def _fit_row(arm: str, fit: dict | str) -> str:
    if isinstance(fit, str):  # why there is no fit, with the row's other cells left empty
        return f"| {arm} | {fit} | | | | |"
    return table_row([arm, f"{fit['E']:.4g} ± {fit['E_se']:.2g}", f"{fit['A']:.4g} ± {fit['A_se']:.2g}",
                      f"{fit['alpha']:.4f} ± {fit['alpha_se']:.2g}", fit["n_points"], f"{fit['rmse']:.3g}"])


def _arm_cells(g: dict, best: dict | None, marks: list[str]) -> list:
    flags = ", ".join(flag for flag in ("probe", "bound") if g[flag]) or "–"
    return [g["label"], g["n"], _final(g), f"val_{g['quality_metric']}", flags, versus_best(g, best),
            *("★" if g.get(mark) else "" for mark in marks)]


def _cost_cells(g: dict) -> list:
    return [g["label"], _fmt(g["params"], "int"), _fmt(g["flops_per_token"]), _fmt(g["tokens"], "int"),
            _fmt(g["train_flops"]), _fmt(g["tokens_per_s"], "int"), _fmt(g["peak_memory_mb"], "int"),
            plots.human_bytes(g["state_bytes"]), plots.human_bytes(g["state_bytes_4x"])]


def _linear_probe_md(runs: list[dict]) -> list[str]:
    """The linear-evaluation table: each probed run's encoder beside its step-0 encoder, the baseline run and the
    floor lines, and what training added over initialisation."""
    rows = []
    for run in runs:
        result = run["linear_probe"]
        by_name = {e["name"]: e for e in result["encoders"]}
        entropies = result["entropies"]
        bigram = f"{entropies['bigram_bpb']:.4f}" if "bigram_bpb" in entropies else "–"
        for kind in result["kinds"]:
            trained, start = by_name["trained"][kind]["val_bpb"], by_name["random init"][kind]["val_bpb"]
            baseline = by_name.get("baseline")
            shown = f"{baseline[kind]['val_bpb']:.4f} ({Path(baseline['run_dir']).name})" if baseline else "–"
            rows.append([run["name"], f"{result['task']}, {kind}", f"**{trained:.4f}**", f"{start:.4f}", shown,
                         f"{run['final']:.4f}", f"{entropies['unigram_bpb']:.4f}", bigram,
                         f"{start - trained:+.4f} bits"])
    return ["## Linear evaluation", "", LINEAR_PROBE_NOTE, "", *table(PROBE_COLUMNS, rows, compact_rule=True), "",
            "![linear evaluation](linear_probe.png)", ""]


def _metadata(study: dict) -> list[str]:
    budgets = study.get("budget") or []  # one {"flops": ...} dict, or a list of them for multi-budget studies
    budget = "; ".join(", ".join(f"{key} {value:.3g}" for key, value in b.items())
                       for b in (budgets if isinstance(budgets, list) else [budgets]))
    return [f"- kind: {study.get('kind', 'lm')}; budget per run: {budget or '–'}",
            f"- device: {study.get('device', '–')}; torch {study.get('torch', '–')}; commit {study.get('commit', '–')}",
            f"- created: {study.get('created', '–')}"]


def _write_files(out_dir: Path, files: dict[str, bytes]) -> dict[str, Path]:
    atomic_write_all({out_dir / name: data for name, data in files.items()})
    return {name: out_dir / name for name in files}
