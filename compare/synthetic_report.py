"""Synthetic-study report (`archlab report DIR` of a `kind: synthetic` study): recall accuracy against decoding
state size (the Zoology/Based figure) and against width, a table with each arm's seed spread, a Reading paragraph
computed from the numbers.

Seed noise: each figure is the mean over seeds ± half their range. Two arms' difference counts as resolved only when
both have two or more seeds and it exceeds the larger of their two half-ranges (compare/reading.py); otherwise it is
marked unresolved (in the table: ~ beside an arm not resolved from the best at its width and setting).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from archlab.compare.plots import human_bytes
from archlab.compare.reading import unresolved_reason
from archlab.compare.report import _csv, _metadata, _write_files
from archlab.kernels.common.files import atomic_path, atomic_write
from archlab.kernels.common.markdown import table
from archlab.kernels.common.plotting import png_bytes, pyplot
from archlab.train.errors import UserError

SETTING_KEYS = ("task", "trained_on", "seq_len", "n_pairs")  # what a test setting is; a panel of each plot
ROW_KEYS = {"arm", "d_model", "seed", "accuracy", "state_bytes", *SETTING_KEYS}
SPREAD_NOTE = ("mean over seeds ± half their range, (max − min) / 2; ~ marks an arm whose gap to the best arm at its "
               "width and setting is not larger than the larger of the two half-ranges (or one of them has one "
               "seed): not resolved; the best is in bold")


def _setting_label(setting: tuple) -> str:
    task, trained_on, seq_len, n_pairs = setting
    trained = f"trained on {trained_on}" if trained_on != f"L{seq_len}×{n_pairs}" else "trained on it alone"
    return f"{task} L{seq_len}×{n_pairs} ({trained})"


def summarize(rows: list[dict]) -> list[dict]:
    """One group per (arm, d_model, test setting): mean accuracy, spread (half range) and seed count."""
    missing = sorted({key for row in rows for key in ROW_KEYS if key not in row})
    if missing:
        raise UserError(f"synthetic rows lack {missing}; regenerate the study with `archlab compare` (rows now "
                        "carry state_bytes and trained_on)")
    by_key: dict[tuple, list[dict]] = {}
    for row in rows:
        by_key.setdefault((row["arm"], row["d_model"], tuple(row[k] for k in SETTING_KEYS)), []).append(row)
    groups = []
    for (arm, width, setting), members in by_key.items():
        accuracy = [m["accuracy"] for m in members]
        groups.append({"arm": arm, "d_model": width, "setting": setting, "mixers": members[0].get("mixers", []),
                       "params": members[0].get("params"), "state_bytes": members[0]["state_bytes"],
                       "mean": float(np.mean(accuracy)), "spread": (max(accuracy) - min(accuracy)) / 2,
                       "n": len(members)})
    return groups


def resolved(a: dict, b: dict) -> bool:
    """Whether two groups' mean accuracies differ by more than seed noise (compare/reading.py's rule)."""
    return unresolved_reason(a, b) is None


def _overall(rows: list[dict]) -> list[dict]:
    """Per (arm, d_model): accuracy averaged over the test settings per seed, then mean ± half range over seeds."""
    per_seed: dict[tuple, list[float]] = {}
    mixers = {}
    for row in rows:
        per_seed.setdefault((row["arm"], row["d_model"], row["seed"]), []).append(row["accuracy"])
        mixers[row["arm"]] = tuple(row.get("mixers", ()))
    by_arm: dict[tuple, list[float]] = {}
    for (arm, width, _), accuracy in per_seed.items():
        by_arm.setdefault((arm, width), []).append(float(np.mean(accuracy)))
    return [{"arm": arm, "d_model": width, "mixers": mixers[arm], "mean": float(np.mean(values)),
             "spread": (max(values) - min(values)) / 2, "n": len(values)} for (arm, width), values in by_arm.items()]


def _compare(a: dict, b: dict) -> str:
    gap = a["mean"] - b["mean"]
    return f"{gap:+.2f}" + ("" if resolved(a, b) else ", unresolved")


def _figure(group: dict) -> str:
    return f"{group['arm']} {group['mean']:.2f} ± {group['spread']:.2f}"


def reading(rows: list[dict]) -> str:
    """Facts only, from the averages over test settings: the best arm at the smallest and largest width, pure
    attention against each pure recurrent arm, and how much of that gap each hybrid closes."""
    overall = _overall(rows)
    widths = sorted({g["d_model"] for g in overall})
    text = ["Accuracy averaged over the test settings, mean ± half range over seeds."]
    for width in dict.fromkeys([widths[0], widths[-1]]):
        at = sorted((g for g in overall if g["d_model"] == width), key=lambda g: -g["mean"])
        text.append(f"At d_model={width}: best {_figure(at[0])}"
                    + (f", then {_figure(at[1])} ({_compare(at[1], at[0])})" if len(at) > 1 else "") + ".")
        attention = next((g for g in at if g["mixers"] == ("attention",)), None)
        pure = {g["mixers"][0]: g for g in at if len(g["mixers"]) == 1 and g is not attention}
        if attention is None:
            continue
        for mixer, recurrent in pure.items():
            text.append(f"Attention − {mixer}: {_compare(attention, recurrent)} "
                        f"({_figure(attention)} vs {_figure(recurrent)}).")
        for hybrid in (g for g in at if len(g["mixers"]) > 1):
            base = next((pure[m] for m in hybrid["mixers"] if m in pure), None)
            if base is None or not resolved(attention, base) or attention["mean"] <= base["mean"]:
                continue
            closed = (hybrid["mean"] - base["mean"]) / (attention["mean"] - base["mean"])
            text.append(f"{_figure(hybrid)} closes {closed:.0%} of the gap from {base['arm']} to "
                        f"{attention['arm']}" + ("" if resolved(hybrid, base) else " (unresolved from "
                                                 f"{base['arm']})") + ".")
    text += _shortcut(rows, widths[-1])
    return " ".join(text)


def _shortcut(rows: list[dict], width: int) -> list[str]:
    """MQAR: naming one of the n_pairs values in context scores 1/n_pairs without recalling anything. Which arms
    beat that by more than their seed spread in every test setting at `width`?"""
    groups = [g for g in summarize(rows) if g["d_model"] == width and g["setting"][0] == "mqar"]
    if not groups:
        return []
    arms = sorted({g["arm"] for g in groups})
    above = [arm for arm in arms if all(g["mean"] - g["spread"] > 1 / g["setting"][3] for g in groups
                                        if g["arm"] == arm)]
    return [f"Naming one of the n_pairs values in context scores 1/n_pairs without recall; above it by more than "
            f"the seed spread in every test setting at d_model={width}: {', '.join(above) or 'no arm'}."]


def accuracy_table(groups: list[dict]) -> list[str]:
    """Markdown lines: arm x width rows, a column per test setting; ~ and bold as SPREAD_NOTE says."""
    settings = sorted({g["setting"] for g in groups})
    best = {}
    for g in groups:
        key = (g["d_model"], g["setting"])
        if key not in best or g["mean"] > best[key]["mean"]:
            best[key] = g
    cells = {(g["arm"], g["d_model"], g["setting"]): g for g in groups}
    longest = max(settings, key=lambda s: s[2])
    rows = []
    for arm, width in dict.fromkeys((g["arm"], g["d_model"]) for g in sorted(groups, key=lambda g: (g["arm"],
                                                                                                  g["d_model"]))):
        first = next(g for g in groups if g["arm"] == arm and g["d_model"] == width)
        state = cells.get((arm, width, longest), first)["state_bytes"]
        row = [arm, width, f"{first['params']:,}" if first["params"] else "–", human_bytes(state)]
        for setting in settings:
            g = cells.get((arm, width, setting))
            if g is None:
                row.append("–")
                continue
            text = f"{g['mean']:.2f} ± {g['spread']:.2f}"
            top = best[(width, setting)]
            row.append(f"**{text}**" if g is top else text + (" ~" if not resolved(g, top) else ""))
        rows.append(row)
    columns = ["arm", "d_model", "params", f"state at L{longest[2]}", *(f"L{s[2]}×{s[3]}" for s in settings)]
    return table(columns, rows, compact_rule=True)


def _plot(groups: list[dict], settings: list[tuple], x_key: str, path: Path) -> None:
    """A panel per test setting, accuracy against x_key (log scale), a line per arm through its widths."""
    columns = min(4, len(settings) + 1)  # one more panel holds the legend
    n_rows = math.ceil((len(settings) + 1) / columns)
    figure, axes = pyplot().subplots(n_rows, columns, figsize=(4.2 * columns, 3.6 * n_rows), squeeze=False)
    arms = sorted({g["arm"] for g in groups})
    colors = {arm: f"C{i % 10}" for i, arm in enumerate(arms)}
    for axis, setting in zip(axes.flat, settings, strict=False):
        for arm in arms:
            points = sorted((g[x_key], g["mean"], g["spread"]) for g in groups
                            if g["arm"] == arm and g["setting"] == setting)
            if points:
                x, mean, spread = zip(*points, strict=True)
                axis.errorbar(x, mean, yerr=spread, marker="o", ms=4, capsize=2, color=colors[arm], label=arm)
        if setting[0] == "mqar":
            axis.axhline(1 / setting[3], color="gray", linestyle=":", lw=1, label="1/n_pairs: a value in context")
        axis.set_title(_setting_label(setting), fontsize=9)
        axis.set_xscale("log", base=2)
        axis.set_ylim(-0.03, 1.03)
        axis.set_xlabel("decoding state per sequence (bytes, float32)" if x_key == "state_bytes"
                        else "model width (d_model)")
        axis.set_ylabel("accuracy")
        axis.grid(True, alpha=0.3)
    for axis in list(axes.flat)[len(settings):]:
        axis.axis("off")
    axes.flat[len(settings)].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=9)
    atomic_write(path, png_bytes(figure))


def plot_accuracy_vs_state(rows: list[dict], path: Path) -> None:
    """The Zoology/Based figure: accuracy against decoding state bytes, a line per arm, a panel per setting."""
    if not rows:
        raise UserError("no synthetic rows to plot; run the synthetic study first")
    groups = summarize(rows)
    _plot(groups, sorted({g["setting"] for g in groups}), "state_bytes", Path(path))


def write_synthetic_report(study: dict, out_dir: Path) -> dict[str, Path]:
    """report.md, results.csv, recall_vs_state.png and recall_vs_width.png into out_dir; {name: path} written."""
    rows = study.get("synthetic") or []
    if not rows:
        raise UserError(f"{out_dir / 'study.json'} has no synthetic rows yet; let `archlab compare` finish a task")
    groups = summarize(rows)
    settings = sorted({g["setting"] for g in groups})
    dtypes = sorted({row.get("state_dtype", "float32") for row in rows})
    lines = [f"# Study report: {study['study']} (synthetic tasks)", "", *_metadata(study), "",
             "## Reading", "", reading(rows), "",
             "## Accuracy by arm, width and test setting", "",
             *(f"- L{s[2]}×{s[3]}: {_setting_label(s)}" for s in settings), "", *accuracy_table(groups), "",
             f"Exact-match accuracy over the test set's answer positions, {SPREAD_NOTE}. State: the model's "
             f"decoding state per sequence ({', '.join(dtypes)}: the dtype it was trained in; a KV cache grows with "
             "the sequence, a recurrent state does not), summed over blocks.", "",
             "![accuracy vs decoding state](recall_vs_state.png)", "", "![accuracy vs width](recall_vs_width.png)", ""]
    columns = [key for key in dict.fromkeys(k for row in rows for k in row) if key != "prefix_losses"]
    # the plots are drawn before the other files are written: one that fails leaves the directory as it was
    with atomic_path(out_dir / "recall_vs_state.png") as state_plot, \
            atomic_path(out_dir / "recall_vs_width.png") as width_plot:
        plot_accuracy_vs_state(rows, state_plot)
        _plot(groups, settings, "d_model", width_plot)
        written = _write_files(out_dir, {"results.csv": _csv(rows, columns),
                                         "report.md": ("\n".join(lines) + "\n").encode()})
    return {**written, "recall_vs_state.png": out_dir / "recall_vs_state.png",
            "recall_vs_width.png": out_dir / "recall_vs_width.png"}
