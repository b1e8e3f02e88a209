"""Scaling-law helpers for study reports (numpy only): a power-law fit L(C) = E + A·C^-alpha, Pareto fronts,
and the grouping behind an isoFLOP plot."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA_RANGE = (1e-3, 3.0)  # exponents seen in LM scaling are ~0.05-0.5; the range leaves room on both sides
GRID_POINTS = 200
GOLDEN = (math.sqrt(5) - 1) / 2


def fit_power_law(compute, loss) -> dict[str, float]:
    """Least-squares fit of loss = E + A * compute**-alpha with A > 0, alpha in ALPHA_RANGE, E >= 0.

    Variable projection: for a fixed alpha the model is linear in (E, A), solved exactly under the bounds;
    alpha is found by a coarse grid on log(alpha) and refined by golden-section search. Standard errors are
    sqrt(diag(sigma^2 (J^T J)^-1)) with J the Jacobian in (E, A, alpha) at the optimum and
    sigma^2 = SSE / (n - 3). With exactly 3 points there is no residual degree of freedom: the fit is returned
    with E_se, A_se, alpha_se = NaN. A parameter sitting on its bound (E = 0, alpha at a range end) gets the
    same linearised se, which then understates the uncertainty.
    """
    compute, loss = np.asarray(compute, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if compute.shape != loss.shape:
        raise ValueError(f"power-law fit: compute has {compute.size} values but loss has {loss.size}; pass pairs")
    if not (np.all(np.isfinite(compute)) and np.all(np.isfinite(loss))) or np.any(compute <= 0):
        raise ValueError("power-law fit: compute must be finite and > 0 and loss finite; drop the bad runs")
    if np.unique(compute).size < 3:
        raise ValueError(f"power-law fit needs at least 3 distinct compute values, got {np.unique(compute).size}")
    # Work with compute / geometric mean so that c**-alpha stays O(1) whatever the FLOP scale.
    scale = float(np.exp(np.mean(np.log(compute))))
    log_c = np.log(compute / scale)

    def projected(log_alpha: float) -> tuple[float, float, float]:
        x = np.exp(-math.exp(log_alpha) * log_c)
        e, a = _bounded_linear_fit(x, loss)
        return float(np.sum((loss - e - a * x) ** 2)), e, a

    grid = np.linspace(math.log(ALPHA_RANGE[0]), math.log(ALPHA_RANGE[1]), GRID_POINTS)
    sse = [projected(g)[0] for g in grid]
    best = int(np.argmin(sse))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, GRID_POINTS - 1)]
    log_alpha = _golden_section(lambda g: projected(g)[0], lo, hi)
    sse_best, e, a_scaled = projected(log_alpha)
    if a_scaled <= 0:
        raise ValueError("power-law fit: loss does not decrease with compute, so no A > 0 fits; check the runs")
    alpha = math.exp(log_alpha)

    n = compute.size
    x = np.exp(-alpha * log_c)
    jacobian = np.column_stack([np.ones(n), x, -a_scaled * x * log_c])
    if n > 3:
        sigma2 = sse_best / (n - 3)
        cov_scaled = sigma2 * np.linalg.pinv(jacobian.T @ jacobian)
    else:
        cov_scaled = np.full((3, 3), np.nan)
    # Back to unscaled A = A' * scale**alpha (delta method for its covariance).
    a = a_scaled * scale**alpha
    to_unscaled = np.array([[1.0, 0.0, 0.0], [0.0, scale**alpha, a * math.log(scale)], [0.0, 0.0, 1.0]])
    se = np.sqrt(np.abs(np.diag(to_unscaled @ cov_scaled @ to_unscaled.T)))
    return {"E": e, "A": a, "alpha": alpha, "E_se": float(se[0]), "A_se": float(se[1]), "alpha_se": float(se[2]),
            "n_points": n, "rmse": math.sqrt(sse_best / n)}


def power_law(compute, fit: dict[str, float]) -> np.ndarray:
    """The fitted curve E + A * C**-alpha at `compute`."""
    return fit["E"] + fit["A"] * np.asarray(compute, dtype=float) ** -fit["alpha"]


def _bounded_linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """argmin ||y - E - A x||^2 subject to E >= 0, A >= 0 (a 2-variable problem: check each active set)."""
    candidates = []
    design = np.column_stack([np.ones_like(x), x])
    (e, a), *_ = np.linalg.lstsq(design, y, rcond=None)
    if e >= 0 and a >= 0:
        return float(e), float(a)
    xx = float(x @ x)
    candidates.append((0.0, max(float(x @ y) / xx, 0.0) if xx > 0 else 0.0))  # E on its bound
    candidates.append((max(float(y.mean()), 0.0), 0.0))  # A on its bound: loss flat in compute
    return min(candidates, key=lambda p: float(np.sum((y - p[0] - p[1] * x) ** 2)))


def _golden_section(f, lo: float, hi: float, tol: float = 1e-10) -> float:
    """Minimum of a unimodal f on [lo, hi]."""
    a, b = lo, hi
    c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + GOLDEN * (b - a)
            fd = f(d)
    return (a + b) / 2


def pareto_front(points: Sequence[tuple[float, float]], cost_tolerance: float = 0.0) -> list[int]:
    """Indices (ascending) of the non-dominated (cost, loss) points, lower being better on both. A point is
    dominated when another is no worse on both and strictly better on one; equal points keep each other.
    Costs within `cost_tolerance` (relative) count as equal: budgets are met only to within a step, and a run
    that is 0.2% cheaper is not a better trade. Points with a NaN are never on the front."""
    valid = [i for i, (c, q) in enumerate(points) if not (math.isnan(c) or math.isnan(q))]
    return [i for i in valid if not any(_dominates(points[j], points[i], cost_tolerance) for j in valid if j != i)]


def _dominates(a: tuple[float, float], b: tuple[float, float], cost_tolerance: float) -> bool:
    """Whether (cost, loss) point a dominates b: no dearer (within tolerance), no worse, and better on one."""
    no_dearer, clearly_cheaper = a[0] <= b[0] * (1 + cost_tolerance), a[0] * (1 + cost_tolerance) < b[0]
    return no_dearer and a[1] <= b[1] and (a[1] < b[1] or clearly_cheaper)


def budget_clusters(flops: Sequence[float], rel_tol: float = 0.1) -> list[list[int]]:
    """Indices grouped by training budget, cheapest first: FLOPs within rel_tol of a group's cheapest run share
    its budget (a budget is only hit to within a step)."""
    clusters: list[list[int]] = []
    for index in sorted(range(len(flops)), key=lambda i: flops[i]):
        if clusters and flops[index] <= flops[clusters[-1][0]] * (1 + rel_tol):
            clusters[-1].append(index)
        else:
            clusters.append([index])
    return clusters


def budget_frontier(flops: Sequence[float], loss: Sequence[float], rel_tol: float = 0.1) -> list[int]:
    """Index of the lowest-loss point at each training budget: the compute-optimal points that an L(C) fit
    should use when a study trains several sizes at the same budget."""
    return [min(cluster, key=lambda i: loss[i]) for cluster in budget_clusters(flops, rel_tol)]


def isoflop_groups(runs: Sequence[dict], rel_tol: float = 0.1) -> list[dict]:
    """Group runs by training budget for an isoFLOP view (loss vs params at a fixed FLOP budget).

    runs: dicts with "arm", "size", "params", "flops" (total training FLOPs) and "loss" (final quality).
    Returns [{"flops": geometric-mean FLOPs of the group, "arms": {arm: [(params, loss, size), ...] sorted by
    params}}, ...] sorted by budget.
    """
    result = []
    for cluster in budget_clusters([r["flops"] for r in runs], rel_tol):
        arms: dict[str, list[tuple[float, float, str | None]]] = {}
        for run in (runs[i] for i in cluster):
            arms.setdefault(run["arm"], []).append((run["params"], run["loss"], run.get("size")))
        budget = float(np.exp(np.mean(np.log([runs[i]["flops"] for i in cluster]))))
        result.append({"flops": budget, "arms": {arm: sorted(pts, key=lambda p: p[0]) for arm, pts in arms.items()}})
    return result
