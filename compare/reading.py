"""What a study's numbers say, in words: which differences between arms its seeds resolve, and the Reading paragraph.

A difference between two arms is resolved only when both ran at least two seeds and their means differ by more
than the larger of the two seed spreads (half the range over seeds): with one seed the spread is unknown, and a gap
inside the spread is one that another draw of seeds could reverse.
"""
from __future__ import annotations

import math

MIN_SEEDS = 2
# the Pareto marks a report may compute (cost in words -> group key), training costs first
PARETO_NAMES = {"training FLOPs": "pareto_flops", "training wall-clock": "pareto_time",
                "decoding state at 4x the trained length": "pareto_state", "decode latency": "pareto_decode"}


def unresolved_reason(a: dict, b: dict) -> str | None:
    """None when the gap between groups a and b (aggregated arms: mean, spread, n) is resolved, else why not."""
    if min(a["n"], b["n"]) < MIN_SEEDS:
        return "one seed"
    larger = max(a["spread"], b["spread"])
    if abs(a["mean"] - b["mean"]) <= larger:
        return f"within the seed spread ±{larger:.4f}"
    return None


def versus_best(group: dict, best: dict | None) -> str:
    """The table's cell: the gap to the best comparable arm, marked when the seeds do not resolve it."""
    if best is None or not comparable(group):
        return "–"
    if group is best:
        return "best"
    reason = unresolved_reason(group, best)
    gap = f"{group['mean'] - best['mean']:+.4f}"
    return f"{gap} (not resolved: {reason})" if reason else f"{gap} (resolved)"


def ranked_groups(groups: list[dict]) -> list[dict]:
    """The groups the study ranks by final val bpb (probes are not likelihoods), best first."""
    return sorted((g for g in groups if comparable(g)), key=lambda g: g["mean"])


def seed_note(groups: list[dict], resolved_by: str | None, resolving: list[dict] | None = None) -> str:
    """One line on the seeds behind the table: each arm's count and spread, and where single-seed studies get
    their differences resolved; `resolving` (the aggregated arms of the resolved_by study, when its results lie
    beside this one's) adds their measured spreads."""
    seeds = sorted({g["n"] for g in groups})
    if seeds != [1]:
        spreads = ", ".join(f"{g['label']} ±{g['spread']:.4f} ({g['n']})" for g in groups
                            if comparable(g) or g["probe"])
        return (f"Seeds: spread (half the range) and seed count per arm: {spreads}. A difference is resolved only "
                f"when both arms ran >= {MIN_SEEDS} seeds and it exceeds the larger spread.")
    text = "Seeds: one per arm, so the seed spread is unknown and **no difference in this report is resolved**."
    if not resolved_by:
        return text + " Run more seeds (study `seeds:`) to resolve them."
    shared = [g for g in resolving or [] if g["n"] >= MIN_SEEDS and any(h["arm"] == g["arm"] for h in groups)]
    if not shared:
        return text + (f" `{resolved_by}` runs arms of this study over more seeds: its report gives their seed "
                       "spread and which of these differences it resolves.")
    spreads = ", ".join(f"{g['label']} ±{g['spread']:.4f} ({g['n']} seeds)" for g in shared)
    here = {g["arm"]: g for g in groups if comparable(g)}
    gaps = [abs(here[a["arm"]]["mean"] - here[b["arm"]]["mean"]) for i, a in enumerate(shared) for b in shared[i + 1:]
            if a["arm"] in here and b["arm"] in here]
    largest = max(g["spread"] for g in shared)
    compared = (f" The smallest gap between those arms here, {min(gaps):.4f}, is "
                + ("larger" if min(gaps) > largest else "not larger")
                + f" than the largest of those spreads, {largest:.4f}." if gaps else "")
    return text + f" `{resolved_by}` ran some of its arms over more seeds; their spread there: {spreads}." + compared


def reading(groups: list[dict], fmt) -> str:
    """Facts only: the ranking by final metric with the gaps and whether the seeds resolve them (probe arms apart:
    not likelihoods), the Pareto arms of every cost."""
    ranked = ranked_groups(groups)
    probes = [g for g in groups if g["quality_metric"] == "bpb" and g["probe"]]
    probe_note = ("Probe figures, left out of the ranking (a byte probe on frozen features, not the model's "
                  "likelihood): " + ", ".join(f"{g['label']} {g['mean']:.4f}" for g in probes) + ".") if probes else ""
    if not ranked:
        return probe_note or "No arm reports val bpb; see the table."
    best = ranked[0]
    text = [f"Lowest final val bpb: **{best['label']}** at {best['mean']:.4f} ({best['n']} seed(s)) after "
            f"{fmt(best['train_flops'])} training FLOPs and {fmt(best['train_seconds'], 'int')} s of training."]
    if len(ranked) > 1:
        second, worst = ranked[1], ranked[-1]
        gap = second["mean"] - best["mean"]
        reason = unresolved_reason(second, best)
        text.append(f"Next: **{second['label']}** at {second['mean']:.4f}, {gap:.4f} bpb "
                    f"({gap / best['mean']:.1%} above the lowest), after {fmt(second['train_flops'])} FLOPs: "
                    + (f"**not resolved** ({reason}), so this study does not rank these two." if reason
                       else "resolved by the seeds."))
        unresolved = [g["label"] for g in ranked[2:] if unresolved_reason(g, best)]
        if unresolved:
            text.append(f"Also not resolved against the lowest: {', '.join(unresolved)}.")
        if len(ranked) > 2:
            text.append(f"Highest: **{worst['label']}** at {worst['mean']:.4f}.")
    mentioned = ranked[:2] + ranked[-1:] if len(ranked) > 2 else ranked
    flagged = [g["label"] for g in mentioned if g["bound"]]
    if flagged:
        text.append(f"{', '.join(flagged)}: an upper bound on the likelihood (diffusion NELBO), not the likelihood.")
    if probe_note:
        text.append(probe_note)
    fronts = [f"({name}): " + (", ".join(g["label"] for g in ranked if g.get(mark)) or "–")
              for name, mark in PARETO_NAMES.items() if any(mark in g for g in ranked)]
    text.append("Pareto fronts " + "; ".join(fronts) + ".")
    return " ".join(text)


def comparable(group: dict) -> bool:
    """Whether an aggregated arm competes on val bpb (a probe's bpb is not a likelihood of the model)."""
    return group["quality_metric"] == "bpb" and not group["probe"] and not math.isnan(group["mean"])
