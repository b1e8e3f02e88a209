"""The study report's figures: quality vs training FLOPs / wall-clock, the isoFLOP view and the scaling fits.

Each function returns PNG bytes (the report writes all files only once everything has been computed).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from archlab.compare.scaling import isoflop_groups, pareto_front, power_law
from archlab.kernels.common.plotting import png_bytes, pyplot


def _style(group: dict, index: int) -> dict:
    """Colour per arm; dashed and labelled lines for values that are not the model's own likelihood."""
    flag = " (probe)" if group["probe"] else " (bound)" if group["bound"] else ""
    return {"color": f"C{index % 10}", "linestyle": "--" if flag else "-", "label": group["label"] + flag}


def curve_plot(groups: list[dict], axis: int, xlabel: str, study_name: str) -> bytes:
    """Validation bpb vs cost (axis 0: FLOPs, 1: seconds): mean over seeds, min–max band when several seeds."""
    plt = pyplot()
    many = 5 < len(groups) <= 10  # then the legend goes beside the axes instead of over the curves
    per_arm_legend = len(groups) > 10  # scaling grids: colour = arm in the legend, one line per size/budget
    fig, ax = plt.subplots(figsize=(9.5 if many else 7, 4.5))
    arm_index = {arm: i for i, arm in enumerate(dict.fromkeys(g["arm"] for g in groups))}
    for group in groups:
        length = min(len(r["curve"]) for r in group["runs"])
        if length == 0:
            continue
        curves = np.array([r["curve"][:length] for r in group["runs"]])  # seed, evaluation, (flops, seconds, value)
        x, values = curves[:, :, axis].mean(axis=0), curves[:, :, 2]
        keep = np.isfinite(x) & (x > 0)  # log axis: the step-0 evaluation (x = 0) cannot be drawn
        style = _style(group, arm_index[group["arm"]])  # one colour per arm; sizes differ by marker
        sizes_before = sum(1 for g in groups[:groups.index(group)] if g["arm"] == group["arm"])
        if per_arm_legend:
            style["label"] = style["label"].replace(group["label"], group["arm"]) if sizes_before == 0 else None
        ax.plot(x[keep], values.mean(axis=0)[keep], marker="osD^vP"[sizes_before % 6], markersize=4, **style)
        if len(group["runs"]) > 1:
            ax.fill_between(x[keep], values.min(axis=0)[keep], values.max(axis=0)[keep], color=style["color"],
                            alpha=0.18, linewidth=0)
    unigram = {r["unigram_bpb"] for g in groups for r in g["runs"] if r.get("unigram_bpb") is not None}
    if len(unigram) == 1:  # one eval text: its byte-frequency floor as a reference line
        ax.axhline(unigram.pop(), color="grey", linestyle=":", linewidth=1.2,
                   label="unigram entropy of the eval bytes")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val bits per byte (lower is better)")
    ax.set_title(f"{study_name}: validation bpb vs {'training FLOPs' if axis == 0 else 'wall-clock'}\n"
                 + ("lines: size × budget; " if per_arm_legend else "")
                 + "mean over seeds, band = min–max; dashed = probe / bound", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if many else {"loc": "best"}))
    return png_bytes(fig)


def isoflop_plot(groups: list[dict], study_name: str) -> bytes:
    """Final bpb vs params: one panel per training budget that holds several sizes of one arm; when budgets
    differ by size (token or time budgets) a single panel of all sizes."""
    plt = pyplot()
    points = [{"arm": g["arm"], "size": g["size"], "params": g["params"], "flops": g["train_flops"],
               "loss": g["mean"]} for g in groups if g["params"] and g["train_flops"]]
    budgets = [b for b in isoflop_groups(points) if any(len(p) > 1 for p in b["arms"].values())][-4:]
    panels = [(f"budget ≈ {b['flops']:.2g} FLOPs", b["arms"]) for b in budgets]
    if not panels:  # every size has its own budget: one panel, all sizes (rel_tol=inf puts them in one group)
        panels = [("each size at its own budget", isoflop_groups(points, rel_tol=math.inf)[0]["arms"])]
    columns, rows = min(len(panels), 2), math.ceil(len(panels) / 2)
    fig, axes = plt.subplots(rows, columns, figsize=(7 if columns == 1 else 10, 4.5 if rows == 1 else 7.5),
                             squeeze=False, sharey=True)
    arm_index = {arm: i for i, arm in enumerate(dict.fromkeys(g["arm"] for g in groups))}
    arm_group = {g["arm"]: g for g in groups}
    for ax, (title, arms) in zip(axes.flat, panels, strict=False):  # a 3-budget grid leaves one axis empty
        for arm, pts in sorted(arms.items()):
            style = _style({**arm_group[arm], "label": arm}, arm_index[arm])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", **style)
            for params, loss, size in pts:
                ax.annotate(str(size), (params, loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        # Ticks at the model sizes themselves: narrow panels spanning < 2 decades get unreadable log minor labels.
        ticks = sorted({p[0] for pts in arms.values() for p in pts})
        ax.set_xticks(ticks, [human_count(t) for t in ticks], fontsize=8)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("parameters (log scale)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("final val bits per byte")
    axes[0][-1].legend()
    fig.suptitle(f"{study_name}: isoFLOP view (final bpb vs model size, mean over seeds)", fontsize=11)
    return png_bytes(fig)


def scaling_plot(groups: list[dict], fits: dict, study_name: str) -> bytes:
    """Final bpb vs training FLOPs per run, with each arm's fitted L(C) = E + A·C^-alpha (hollow: runs of a size
    that was not the best at its budget, left out of the fit)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, arm in enumerate(dict.fromkeys(g["arm"] for g in groups)):
        arm_groups = [g for g in groups if g["arm"] == arm and g["train_flops"]]
        if not arm_groups:
            continue
        fit = fits.get(arm)
        style = _style({**arm_groups[0], "label": arm}, index)
        style["label"] += f": α = {fit['alpha']:.3f} ± {fit['alpha_se']:.3f}" if isinstance(fit, dict) else " (no fit)"
        for group in arm_groups:
            hollow = isinstance(fit, dict) and not group.get("fitted")
            ax.plot([r["train_flops"] for r in group["runs"]], [r["final"] for r in group["runs"]], marker="o",
                    linestyle="none", color=style["color"], markerfacecolor="none" if hollow else None)
        if isinstance(fit, dict):
            flops = [g["train_flops"] for g in arm_groups]
            grid = np.logspace(np.log10(min(flops)), np.log10(max(flops)), 100)
            ax.plot(grid, power_law(grid, fit), **style)
        else:
            ax.plot([], [], marker="o", linestyle="none", color=style["color"], label=style["label"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (log scale)")
    ax.set_ylabel("final val bits per byte")
    ax.set_title(f"{study_name}: power-law fits L(C) = E + A·C$^{{-α}}$\n"
                 "points = runs; hollow = not the best size at its budget (not fitted)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return png_bytes(fig)


def linear_probe_plot(runs: list[dict], study_name: str) -> bytes:
    """Linear evaluation: per probed run and probe kind, horizontal bars for the trained encoder, its step-0 encoder,
    the baseline run and the run's own figure (a JEPA's online probe, an LM's own head), with the unigram / bigram
    floors as vertical lines."""
    plt = pyplot()
    rows = []  # (label, [(bar label, bpb, colour, hatch)])
    for run in runs:
        result = run["linear_probe"]
        encoders = {e["name"]: e for e in result["encoders"]}
        for kind in result["kinds"]:
            bars = [("trained encoder", encoders["trained"][kind]["val_bpb"], "C0", None),
                    ("its step-0 encoder", encoders["random init"][kind]["val_bpb"], "C1", None)]
            if "baseline" in encoders:
                name = Path(encoders["baseline"]["run_dir"]).name
                bars.append((f"baseline run: {name}", encoders["baseline"][kind]["val_bpb"], "C2", None))
            bars.append((f"the run's own val_{run['quality_metric']}", run["final"], "lightgrey", "//"))
            rows.append((f"{run['name']}\n({result['task']}, {kind})", bars))
    fig, ax = plt.subplots(figsize=(9, 1.4 + 1.5 * len(rows)))
    labelled = set()
    for index, (_, bars) in enumerate(rows):
        height = 0.8 / len(bars)
        for offset, (label, value, colour, hatch) in enumerate(bars):
            y = index - 0.4 + height * (offset + 0.5)
            ax.barh(y, value, height=height * 0.9, color=colour, hatch=hatch, edgecolor="grey" if hatch else None,
                    label=None if label in labelled else label)
            labelled.add(label)
            ax.annotate(f"{value:.3f}", (value, y), fontsize=7.5, va="center", xytext=(3, 0),
                        textcoords="offset points")
    entropies = runs[0]["linear_probe"]["entropies"]
    ax.axvline(entropies["unigram_bpb"], color="black", linestyle="--", linewidth=1,
               label=f"unigram entropy {entropies['unigram_bpb']:.3f}")
    if "bigram_bpb" in entropies:
        ax.axvline(entropies["bigram_bpb"], color="black", linestyle=":", linewidth=1,
                   label=f"bigram entropy {entropies['bigram_bpb']:.3f}")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    values = [value for _, bars in rows for _, value, _, _ in bars]
    ax.set_xlim(max(0.0, min(values) - 0.5), max(entropies["unigram_bpb"], *values) + 0.35)
    ax.set_xlabel("val bits per byte of a fresh probe on frozen features (lower = more in the features)")
    ax.set_title(f"{study_name}: linear evaluation", fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return png_bytes(fig)


def quality_cost_plot(groups: list[dict], costs: list[tuple[str, str]], study_name: str, *,
                      cost_tolerance: float) -> bytes:
    """Final val bpb against each inference cost (a panel per (group key, label)), a point per arm, the Pareto
    front of each panel as a step line; arms without that cost are left out of its panel."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs) + 2.5, 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], costs, strict=True):
        points = [(g[key], g["mean"], g) for g in groups if g.get(key)]
        for index, (cost, value, group) in enumerate(points):
            ax.errorbar(cost, value, yerr=group["spread"] or None, fmt="o", capsize=3,
                        label=group["label"], color=f"C{index % 10}")
        front = sorted((points[i][0], points[i][1])
                       for i in pareto_front([(c, v) for c, v, _ in points], cost_tolerance=cost_tolerance))
        if len(front) > 1:
            ax.step(*zip(*front, strict=True), where="post", color="grey", linestyle="--", linewidth=1,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("final val bits per byte (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.suptitle(f"{study_name}: quality vs inference cost (error bars: seed half-range)", fontsize=10)
    return png_bytes(fig)


def human_bytes(value: float | None) -> str:
    """Bytes in B / KiB / MiB with one decimal; – for none."""
    if value is None:
        return "–"
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def human_count(count: float) -> str:
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= divisor:
            return f"{count / divisor:.3g}{suffix}"
    return f"{count:.3g}"
