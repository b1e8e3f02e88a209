import csv
import json
from pathlib import Path

import matplotlib.image
import pytest

from archlab.compare.report import write_report
from archlab.compare.synthetic_report import accuracy_table, reading, summarize
from tests.compare.test_synthetic import synthetic_rows
from archlab.train.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVAL_STEPS = (0, 25, 50, 75, 100)
# arm -> (backbone, objective, final bpb, training FLOPs, training seconds, flags, quality metric).
# Pareto by construction: FLOPs front = transformer-ar (best) + mamba-ar (cheapest); time front = transformer-ar only
# (mamba-ar is slower and worse); jepa and diffusion are dominated; masked-jepa is not bpb.
ARMS = {
    "transformer-ar": ("transformer", "autoregressive", 2.25, 2.3e13, 1000.0, {}, "bpb"),
    "mamba-ar": ("mamba", "autoregressive", 2.30, 2.0e13, 1100.0, {}, "bpb"),
    "transformer-jepa": ("transformer", "jepa", 2.60, 3.0e13, 1500.0, {"probe": True}, "bpb"),
    "transformer-diffusion": ("transformer", "masked_diffusion", 3.20, 2.5e13, 1200.0, {"bound": True}, "bpb"),
    "masked-jepa": ("transformer", "jepa", 2.90, 3.1e13, 1600.0, {"probe": True}, "masked_probe_bpb"),
}

# decoding state per sequence at L and 4L (summary.json): a KV cache grows 4x, a recurrent state stays
STATE_BYTES = {"transformer": {"state_bytes": 131072, "state_bytes_4x": 524288},
               "mamba": {"state_bytes": 20480, "state_bytes_4x": 20480}}


def add_run(out: Path, study: dict, arm: str, seed: int, final: float, train_flops: float, seconds: float,
            size: str | None = None, params: int = 885888, status: str = "finished", **entry_extra) -> dict:
    """One run dir with plausible metrics.jsonl (bpb decaying towards `final`) and summary.json."""
    backbone, objective, _, _, _, flags, metric = ARMS.get(arm, ("transformer", "autoregressive", 0, 0, 0, {}, "bpb"))
    name = entry_extra.pop("name", None) or (f"{arm}-{size}-s{seed}" if size else f"{arm}-s{seed}")
    tokens = 4096000
    entry = {"name": name, "arm": arm, "seed": seed, "size": size, "run_dir": f"runs/{name}", "status": status,
             "backbone": backbone, "objective": objective, "params": params,
             "flops_per_token": train_flops / tokens, "probe": False, "bound": False, "quality_metric": metric,
             **flags, **entry_extra}
    study["runs"].append(entry)
    run_dir = out / entry["run_dir"]
    run_dir.mkdir(parents=True)
    if status != "finished":
        return entry
    records = []
    for step in EVAL_STEPS:
        fraction = step / EVAL_STEPS[-1]
        value = 8.0 if step == 0 else final + 1.5 * (1 / fraction - 1) ** 0.5
        records.append({"kind": "train", "step": step, "loss": value, "tokens": int(tokens * fraction),
                        "flops": train_flops * fraction, "tokens_per_s": tokens / seconds})
        records.append({"kind": "eval", "step": step, "tokens": int(tokens * fraction),
                        "flops": train_flops * fraction, f"val_{metric}": value})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"step": EVAL_STEPS[-1], "val_bpb": final if metric == "bpb" else None,
               "probe": bool(flags.get("probe")), "val": {metric: final}, "tokens": tokens,
               "train_flops": train_flops, "train_seconds": seconds, "tokens_per_s": round(tokens / seconds),
               "params": params, "backbone": backbone, "objective": objective, "device": "cpu",
               "peak_memory_mb": 512.0, **(STATE_BYTES.get(backbone, {}) if objective == "autoregressive" else {})}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return entry


def new_study(name: str = "quick", budget: dict | None = None, kind: str = "lm") -> dict:
    return {"study": name, "kind": kind, "budget": budget or {"flops": 2.0e13}, "created": "2026-11-23T12:00:00",
            "device": "cpu (x86_64, 2 cores)", "torch": "2.13.0+cpu", "commit": "abc1234", "runs": []}


def save(out: Path, study: dict) -> Path:
    (out / "study.json").write_text(json.dumps(study))
    return out


@pytest.fixture
def arms_study(tmp_path) -> Path:
    """2 arms x 2 seeds + JEPA (probe) + diffusion (bound) + a non-bpb arm + a pending and a broken run."""
    study = new_study()
    for arm, (_, _, final, flops, seconds, _, _) in ARMS.items():
        for seed in (0, 1) if arm.endswith("-ar") else (0,):
            add_run(tmp_path, study, arm, seed, final + 0.01 * seed, flops, seconds)
    add_run(tmp_path, study, "transformer-ar", 2, 2.2, 2.3e13, 1000.0, status="pending")
    add_run(tmp_path, study, "mamba-ar", 2, 2.3, 2.0e13, 1100.0)
    (tmp_path / "runs/mamba-ar-s2/summary.json").unlink()
    return save(tmp_path, study)


def table_row(report: str, label: str) -> list[str]:
    return [cell.strip() for cell in next(line for line in report.splitlines()
                                          if line.startswith(f"| {label} |")).strip("|").split("|")]


def check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] >= 400 and image.shape[1] >= 700 and image.std() > 0.01  # not blank


def test_report_lists_every_arm_with_flags_pareto_and_skips(arms_study):
    written = write_report(arms_study)
    assert set(written) == {"report.md", "results.csv", "bpb_vs_flops.png", "bpb_vs_wallclock.png"}
    report = (arms_study / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in report
    assert table_row(report, "transformer-ar")[1] == "2" and "2.2550 ± 0.0050" in table_row(report, "transformer-ar")
    marks = {arm: tuple(table_row(report, arm)[-3:]) for arm in ARMS}
    assert marks == {"transformer-ar": ("★", "★", "★"), "mamba-ar": ("★", "", "★"), "transformer-jepa": ("", "", ""),
                     "transformer-diffusion": ("", "", ""), "masked-jepa": ("", "", "")}
    assert table_row(report, "transformer-jepa")[4] == "probe"
    assert table_row(report, "transformer-diffusion")[4] == "bound"
    # seed noise: 2 seeds each and a gap of 0.05 against spreads of 0.005 resolve; one seed never does
    assert table_row(report, "transformer-ar")[5] == "best"
    assert table_row(report, "mamba-ar")[5] == "+0.0500 (resolved)"
    assert table_row(report, "transformer-diffusion")[5] == "+0.9450 (not resolved: one seed)"
    assert "resolved by the seeds" in report.split("Reading")[1] and "transformer-ar ±0.0050 (2)" in report
    costs = report.split("## Costs")[1]
    assert table_row(costs, "transformer-ar")[-2:] == ["128.0 KiB", "512.0 KiB"]
    assert table_row(costs, "mamba-ar")[-2:] == ["20.0 KiB", "20.0 KiB"]
    assert table_row(costs, "transformer-diffusion")[-2:] == ["–", "–"]
    assert "not a likelihood" in report and "upper bound" in report and "half the range" in report
    assert "kept out of the plots and the Pareto fronts: masked-jepa" in report
    assert "transformer-ar-s2: status pending" in report and "mamba-ar-s2: finished but" in report
    assert "Lowest final val bpb: **transformer-ar** at 2.2550" in report
    assert "0.0500 bpb (2.2% above the lowest)" in report
    assert "transformer-diffusion: an upper bound on the likelihood" in report
    assert "Probe figures, left out of the ranking" in report and "transformer-jepa" in report.split("Reading")[1]
    assert "![val bpb vs training FLOPs](bpb_vs_flops.png)" in report and "approximated" in report
    for name in ("bpb_vs_flops.png", "bpb_vs_wallclock.png"):
        check_png(arms_study / name)
    assert not list(arms_study.glob("*.tmp"))


def test_one_seed_leaves_every_difference_unresolved_and_names_the_study_that_resolves_them(tmp_path):
    out = tmp_path / "quick"
    out.mkdir()
    study = new_study() | {"resolved_by": "configs/studies/quick-seeds.yaml"}
    for arm, final in (("transformer-ar", 2.25), ("mamba-ar", 2.40)):  # a wide gap, but one seed each
        add_run(out, study, arm, 0, final, 2.0e13, 1000.0)
    write_report(save(out, study))
    report = (out / "report.md").read_text()
    assert table_row(report, "mamba-ar")[5] == "+0.1500 (not resolved: one seed)"
    assert "no difference in this report is resolved" in report and "`configs/studies/quick-seeds.yaml`" in report
    assert "**not resolved** (one seed)" in report.split("## Reading")[1]

    # the resolving study's results beside this one's: the report quotes their spreads against its own gaps
    seeds = tmp_path / "quick-seeds"
    seeds.mkdir()
    resolving = new_study("quick-seeds")
    for arm, final in (("transformer-ar", 2.25), ("mamba-ar", 2.40)):
        for seed in (0, 1):
            add_run(seeds, resolving, arm, seed, final + 0.02 * seed, 2.0e13, 1000.0)
    save(seeds, resolving)
    write_report(out)
    report = (out / "report.md").read_text()
    assert "their spread there: transformer-ar ±0.0100 (2 seeds), mamba-ar ±0.0100 (2 seeds)" in report
    assert "The smallest gap between those arms here, 0.1500, is larger than the largest of those spreads" in report


def write_inference(run_dir: Path, decode_ms: float, state: int) -> None:
    """A run's inference.json (compare/inference_bench.py's schema) at one context."""
    row = {"run": run_dir.name, "decoding": "cache", "steps": None, "context": 4096, "batch_size": 1,
           "prefill_ms": 100.0, "decode_ms_per_token": decode_ms, "decode_tokens_per_s": 1000 / decode_ms,
           "cache_bytes": state, "state_bytes": state, "decode_peak_bytes": state, "peak_bytes": 2 * state}
    result = {"contexts": [4096], "batch_sizes": [1], "rows": [row], "device": "cpu", "date": "2026-12-07",
              "commit": "abc1234", "repeats": 3, "peak_memory_measure": "torch.profiler allocator events"}
    (run_dir / "inference.json").write_text(json.dumps(result))


def test_inference_results_add_a_pareto_front_a_section_and_a_plot(arms_study):
    # mamba-ar decodes faster but is worse: both on the decode front; its 2 seeds average their costs
    write_inference(arms_study / "runs/transformer-ar-s0", 20.0, 2**24)
    write_inference(arms_study / "runs/mamba-ar-s0", 10.0, 2**17)
    write_inference(arms_study / "runs/mamba-ar-s1", 14.0, 2**17)
    written = write_report(arms_study)
    report = (arms_study / "report.md").read_text()
    assert "| Pareto decode |" in report.split("## Results per arm")[1].splitlines()[2]
    assert table_row(report, "transformer-ar")[-1] == table_row(report, "mamba-ar")[-1] == "★"
    assert table_row(report, "transformer-diffusion")[-1] == ""
    assert "## Inference cost" in report and "decode_ms_per_token" in report and "(decode latency)" in report
    assert "median of 3 timed call(s)" in report and "peak memory: torch.profiler allocator events" in report
    check_png(written["quality_vs_inference.png"])


def test_results_csv_has_one_row_per_finished_run(arms_study):
    write_report(arms_study)
    with (arms_study / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 and {r["arm"] for r in rows} == set(ARMS)
    by_name = {r["name"]: r for r in rows}
    mamba = by_name["mamba-ar-s1"]
    assert float(mamba["final"]) == pytest.approx(2.31) and float(mamba["train_flops"]) == 2.0e13
    assert float(mamba["train_seconds"]) == 1100.0 and mamba["quality_metric"] == "bpb" and mamba["seed"] == "1"
    assert by_name["transformer-jepa-s0"]["probe"] == "True" and by_name["transformer-diffusion-s0"]["bound"] == "True"
    assert by_name["masked-jepa-s0"]["quality_metric"] == "masked_probe_bpb"


@pytest.mark.parametrize("budget_kind", ["tokens", "flops"])
def test_scaling_study_gets_fits_and_scaling_plots(tmp_path, budget_kind):
    """tokens: each size has its own compute, all points on L(C). flops: 4 budgets x 4 sizes where size i is the
    best at budget i with loss L(C_i) exactly, the others worse: the fit must use only the best size per budget."""
    sizes = {"d64": 2e5, "d128": 8e5, "d256": 3.2e6, "d512": 1.28e7}
    budgets = [1e13, 4e13, 1.6e14, 6.4e14]
    study = new_study("scaling", {"tokens": 4096000} if budget_kind == "tokens" else [{"flops": b} for b in budgets])
    for arm, offset in (("transformer-ar", 0.0), ("mamba-ar", 0.1)):
        for index, (size, params) in enumerate(sizes.items()):
            if budget_kind == "tokens":
                flops = 6 * params * 4096000
                add_run(tmp_path, study, arm, 0, 1.5 + offset + 400 * flops ** -0.2, flops, flops / 1e10, size=size,
                        params=int(params), budget="tokens=4.1e+06")
                continue
            for best_index, flops in enumerate(budgets):
                final = 1.5 + offset + 400 * flops ** -0.2 + 0.05 * (index - best_index) ** 2
                add_run(tmp_path, study, arm, 0, final, flops, flops / 1e10, size=size, params=int(params),
                        budget=f"flops={flops:.3g}", name=f"{arm}-{size}-{flops:.0e}")
    add_run(tmp_path, study, "transformer-jepa", 0, 3.0, 3e13, 1500.0, size="d64", params=200000,
            budget="tokens=4.1e+06")
    write_report(save(tmp_path, study))
    report = (tmp_path / "report.md").read_text()
    assert "## Scaling" in report and "| transformer-jepa | not enough sizes (1 distinct training budgets" in report
    for name in ("isoflop.png", "scaling.png", "bpb_vs_flops.png"):
        check_png(tmp_path / name)
    for arm in ("transformer-ar", "mamba-ar"):
        alpha, alpha_se = (float(x) for x in table_row(report, arm)[3].split("±"))
        assert alpha == pytest.approx(0.2, rel=1e-4) and alpha_se < 1e-3
        assert table_row(report, arm)[4] == "4"  # one point per budget
    label = "transformer-ar @ d256" + ("" if budget_kind == "tokens" else " @ flops=1.6e+14")
    assert f"| {label} |" in report


def test_synthetic_report_tables_spread_marks_unresolved_and_reads_the_numbers(tmp_path):
    study = new_study("recall", kind="synthetic")
    study["synthetic"] = synthetic_rows()
    written = write_report(save(tmp_path, study))
    assert set(written) == {"report.md", "results.csv", "recall_vs_state.png", "recall_vs_width.png"}
    assert all(path.read_bytes()[:8] == PNG_SIGNATURE for name, path in written.items() if name.endswith(".png"))
    report = (tmp_path / "report.md").read_text()
    # at d32: hybrid 0.41 ± 0.01 vs transformer 0.46 ± 0.01, a resolved gap; the smallest width first
    assert "| hybrid | 32 | 3,200 | 2.0 KiB | 0.41 ± 0.01 | 0.41 ± 0.01 |" in report
    assert "| transformer | 32 | 3,200 | 2.0 KiB | **0.46 ± 0.01** | **0.46 ± 0.01** |" in report
    assert "d_model=32: best transformer 0.46 ± 0.01, then hybrid 0.41 ± 0.01 (-0.05)" in report
    assert "Attention − mamba: +0.30 (transformer 0.46 ± 0.01 vs mamba 0.16 ± 0.01)" in report
    assert "hybrid 0.41 ± 0.01 closes 83% of the gap from mamba to transformer" in report
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(study["synthetic"])


def test_synthetic_report_marks_one_seed_and_small_gaps_unresolved():
    rows = synthetic_rows(seeds=(0,))
    assert "| hybrid | 32 | 3,200 | 2.0 KiB | 0.40 ± 0.00 ~ |" in "\n".join(accuracy_table(summarize(rows)))
    assert "(-0.05, unresolved)" in reading(rows) and "Attention − mamba: +0.30, unresolved" in reading(rows)
    noisy = synthetic_rows(noise=0.2)  # seeds 0.2 apart: half-range 0.1 > the 0.05 gap
    assert "hybrid 0.50 ± 0.10 (-0.05, unresolved)" in reading(noisy)
    assert "| hybrid | 32 | 3,200 | 2.0 KiB | 0.50 ± 0.10 ~ |" in "\n".join(accuracy_table(summarize(noisy)))


def test_synthetic_report_refuses_old_rows_and_writes_nothing(tmp_path):
    study = new_study("recall", kind="synthetic")
    study["synthetic"] = [{k: v for k, v in row.items() if k != "state_bytes"} for row in synthetic_rows()]
    with pytest.raises(UserError, match="state_bytes"):
        write_report(save(tmp_path, study))
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_missing_or_invalid_study_json_writes_nothing(tmp_path):
    with pytest.raises(UserError, match="study.json not found"):
        write_report(tmp_path)
    (tmp_path / "study.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        write_report(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]


def test_no_finished_run_writes_nothing(tmp_path):
    study = new_study()
    add_run(tmp_path, study, "transformer-ar", 0, 2.2, 2.3e13, 1000.0, status="failed")
    save(tmp_path, study)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UserError, match="no finished run"):
        write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
