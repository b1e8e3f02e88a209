import math

import numpy as np
import pytest

from archlab.compare.scaling import budget_frontier, fit_power_law, isoflop_groups, pareto_front, power_law

TRUE = {"E": 1.7, "A": 400.0, "alpha": 0.2}


def synthetic(n: int, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    compute = np.logspace(12, 16, n)
    loss = power_law(compute, TRUE) + np.random.default_rng(seed).normal(0.0, noise, n)
    return compute, loss


def test_noiseless_fit_recovers_parameters():
    fit = fit_power_law(*synthetic(6))
    assert fit["E"] == pytest.approx(TRUE["E"], rel=1e-7)
    assert fit["A"] == pytest.approx(TRUE["A"], rel=1e-6)
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-7)
    assert fit["rmse"] < 1e-8 and fit["n_points"] == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_fit_is_within_a_few_standard_errors(seed):
    fit = fit_power_law(*synthetic(16, noise=0.01, seed=seed))
    for name in ("E", "A", "alpha"):
        assert 0 < fit[f"{name}_se"] < math.inf
        assert abs(fit[name] - TRUE[name]) < 4 * fit[f"{name}_se"], name
    assert fit["rmse"] == pytest.approx(0.01, rel=0.6)


def test_standard_errors_shrink_with_more_points():
    few = np.mean([fit_power_law(*synthetic(8, 0.01, s))["alpha_se"] for s in range(3)])
    many = np.mean([fit_power_law(*synthetic(64, 0.01, s))["alpha_se"] for s in range(3)])
    assert many < few / 2  # ~ 1/sqrt(n): 8x the points -> ~2.8x smaller


def test_three_points_fit_without_uncertainty():
    fit = fit_power_law(*synthetic(3))
    assert fit["alpha"] == pytest.approx(TRUE["alpha"], rel=1e-5)
    assert all(math.isnan(fit[f"{name}_se"]) for name in ("E", "A", "alpha"))


def test_fit_respects_bounds_when_the_floor_is_below_zero():
    compute = np.logspace(10, 14, 8)
    fit = fit_power_law(compute, 50.0 * compute**-0.1 - 0.5)  # best unconstrained E would be negative
    assert fit["E"] >= 0 and fit["A"] > 0 and fit["alpha"] > 0


@pytest.mark.parametrize("compute, loss, message", [
    ([1e12, 1e12, 1e13, 1e13], [3.0, 3.1, 2.9, 2.8], "at least 3 distinct"),
    ([1e12, 1e13], [3.0, 2.0], "at least 3 distinct"),
    ([1e12, 1e13, 1e14], [3.0, 2.0], "pass pairs"),
    ([1e12, 0.0, 1e14], [3.0, 2.0, 1.0], "> 0"),
    ([1e12, 1e13, 1e14], [3.0, float("nan"), 1.0], "finite"),
    ([1e12, 1e13, 1e14, 1e15], [2.0, 2.5, 3.0, 3.5], "does not decrease"),
])
def test_errors(compute, loss, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(compute, loss)


@pytest.mark.parametrize("points, front", [
    ([(1, 3), (2, 2), (3, 1)], [0, 1, 2]),            # a clean trade-off: all on the front
    ([(1, 3), (2, 4), (3, 1)], [0, 2]),               # (2, 4) dominated by (1, 3)
    ([(1, 1), (2, 2), (3, 3)], [0]),                  # one point dominates everything
    ([(1, 2), (1, 3), (2, 2)], [0]),                  # ties on one axis: strictly better on the other wins
    ([(1, 2), (1, 2), (5, 5)], [0, 1]),               # equal points keep each other
    ([(1, float("nan")), (2, 2)], [1]),
    ([], []),
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def test_isoflop_groups_by_budget_and_arm():
    runs = [{"arm": arm, "size": size, "params": params, "flops": flops, "loss": loss}
            for arm, size, params, flops, loss in [
                ("a", "s", 1e5, 1.00e13, 3.0), ("a", "m", 4e5, 1.04e13, 2.8), ("b", "s", 1e5, 0.98e13, 3.1),
                ("a", "s", 1e5, 1e14, 2.5), ("a", "m", 4e5, 1.02e14, 2.3)]]
    groups = isoflop_groups(runs)
    assert len(groups) == 2
    assert groups[0]["flops"] == pytest.approx(1.007e13, rel=1e-3)
    assert groups[0]["arms"] == {"a": [(1e5, 3.0, "s"), (4e5, 2.8, "m")], "b": [(1e5, 3.1, "s")]}
    assert list(groups[1]["arms"]) == ["a"] and len(groups[1]["arms"]["a"]) == 2


def test_budget_frontier_takes_the_best_size_per_budget():
    flops = [1e13, 1.05e13, 0.97e13, 1e14, 1.01e14, 5e14]
    loss = [3.0, 2.8, 2.9, 2.4, 2.5, 2.0]
    assert budget_frontier(flops, loss) == [1, 3, 5]


def test_pareto_costs_within_tolerance_count_as_equal():
    # equal-budget runs land within a step of the budget: 0.2% cheaper must not put a worse run on the front
    points = [(6.01e12, 2.68), (6.0e12, 2.41), (5.99e12, 4.0)]
    assert pareto_front(points) == [1, 2]
    assert pareto_front(points, cost_tolerance=0.02) == [1]
