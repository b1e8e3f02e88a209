"""`archlab compare` end to end on a tiny two-arm study: runs, skips finished arms on --resume, reports."""
import json

import pytest
import yaml
from matplotlib.image import imread

from archlab.compare.cli import main
from archlab.compare.runner import run_study
from archlab.train.errors import ConfigError, UserError

from ..train.conftest import TINY
from .test_report import table_row

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_study(tmp_path):
    study = {"study": "tiny", "base": {"include": [str(TINY)], "train": {"eval_every": 5}, "sample": {"tokens": 0}},
             "budget": {"tokens": 2560},  # 10 steps of 8 x 32 bytes
             "arms": {"transformer": {}, "mamba": {"model": {"backbone": "mamba", "d_state": 4}}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def test_study_runs_every_arm_resumes_without_redoing_and_reports(tiny_study, tmp_path, capsys):
    out = tmp_path / "out"
    run_study(tiny_study, out)
    record = json.loads((out / "study.json").read_text())
    assert [(r["name"], r["status"]) for r in record["runs"]] == [("transformer-s0", "finished"),
                                                                   ("mamba-s0", "finished")]
    for run in record["runs"]:
        summary = json.loads((out / run["run_dir"] / "summary.json").read_text())
        assert summary["step"] == 10 and summary["train_flops"] == 10 * 256 * run["flops_per_token"]
        assert summary["peak_memory_mb"] > 0
    report = (out / "report.md").read_text()
    assert "transformer" in report and "mamba" in report
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_SIGNATURE and imread(png).shape[0] > 100
    assert (out / "bpb_vs_flops.png").exists()

    # a study interrupted before its second arm finished: --resume redoes only that arm
    finished = out / "runs" / "transformer-s0" / "metrics.jsonl"
    before = finished.stat().st_mtime_ns
    (out / "runs" / "mamba-s0" / "summary.json").unlink()
    with pytest.raises(UserError, match="already holds study results; pass --resume"):
        run_study(tiny_study, out)
    capsys.readouterr()
    run_study(tiny_study, out, resume=True)
    printed = capsys.readouterr().out
    assert "transformer-s0: finished earlier, skipped" in printed and "mamba-s0: " in printed
    assert finished.stat().st_mtime_ns == before
    assert (out / "runs" / "mamba-s0" / "summary.json").exists()

    # the study file changed since: resuming would mix results of two studies, so it is refused
    changed = yaml.safe_load(tiny_study.read_text()) | {"budget": {"tokens": 5120}}
    tiny_study.write_text(yaml.safe_dump(changed, sort_keys=False))
    with pytest.raises(UserError, match="transformer-s0 was started with other settings .*train.max_steps"):
        run_study(tiny_study, out, resume=True)
    assert finished.stat().st_mtime_ns == before


def test_evals_score_each_run_once_and_join_the_report(tmp_path, capsys):
    study = {"study": "evals", "base": {"include": [str(TINY)], "sample": {"tokens": 0}},
             "budget": {"tokens": 1280}, "arms": {"transformer": {}, "diffusion": {"model": {"objective":
                                                                                         "masked_diffusion"}}},
             "evals": {"lengths": [1, 2], "passkey": False}}
    path = tmp_path / "evals.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp_path / "out"
    run_study(path, out)
    record = json.loads((out / "study.json").read_text())
    assert [run.get("length_eval") for run in record["runs"]] == ["finished", None]  # default: the AR arms
    result = out / "runs" / "transformer-s0" / "length_eval.json"
    assert [row["multiple"] for row in json.loads(result.read_text())["lengths"]] == [1, 2]
    report = (out / "report.md").read_text()
    assert "## Length" in report and "![length_bpb.png](length_bpb.png)" in report
    assert (out / "length_bpb.png").read_bytes()[:8] == PNG_SIGNATURE
    before = result.stat().st_mtime_ns
    capsys.readouterr()
    run_study(path, out, resume=True)
    assert "length eval of" not in capsys.readouterr().out and result.stat().st_mtime_ns == before

    # evals changed since: the diffusion arm joins (its overall bpb per length: no positions, no passkey) and the
    # transformer's result, made with the same settings, stays; other lengths redo it
    path.write_text(yaml.safe_dump(study | {"evals": {"arms": ["transformer", "diffusion"], "lengths": [1, 2],
                                                      "passkey": False}}, sort_keys=False))
    run_study(path, out, resume=True)
    diffusion = json.loads((out / "runs" / "diffusion-s0" / "length_eval.json").read_text())
    assert [("buckets" in row, "passkey" in row) for row in diffusion["lengths"]] == [(False, False)] * 2
    assert result.stat().st_mtime_ns == before
    path.write_text(yaml.safe_dump(study | {"evals": {"lengths": [1], "passkey": False}}, sort_keys=False))
    run_study(path, out, resume=True)
    assert [row["multiple"] for row in json.loads(result.read_text())["lengths"]] == [1]


def test_evals_that_could_not_run_are_refused_before_the_first_run(tmp_path):
    study = {"study": "bad", "base": {"include": [str(TINY)], "sample": {"tokens": 0}}, "budget": {"tokens": 1280},
             "arms": {"transformer": {}}, "evals": {"inference": {"contexts": [16, 64], "new_tokens": 16}}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(UserError, match="every context must exceed --new-tokens=16"):
        run_study(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tiny_study, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: study file")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["compare", str(tiny_study), "--out", str(tmp_path / "occupied")])
    assert "not empty and holds no study" in capsys.readouterr().err
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "occupied")])
    assert capsys.readouterr().err.startswith("error: ")


def test_dry_run_prints_the_plan(tiny_study, capsys, tmp_path):
    main(["compare", str(tiny_study), "--dry-run"])
    plan = yaml.safe_load(capsys.readouterr().out)
    assert [run["name"] for run in plan] == ["transformer-s0", "mamba-s0"]
    assert all(run["max_steps"] == 10 for run in plan)
    assert not (tmp_path / "runs").exists()


def test_synthetic_settings_no_row_could_train_are_refused_before_anything_is_written(tmp_path):
    study = {"study": "recall", "kind": "synthetic", "arms": {"transformer": {"model": {"n_layers": 1}}},
             "synthetic": {"widths": [16], "steps": 3, "batch_size": 32, "lr": 1e-3,
                           "tasks": [{"task": "mqar", "seq_len": 16, "n_pairs": 2, "train_examples": 16,
                                      "test_examples": 8}]}}
    path = tmp_path / "recall.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(ConfigError, match="arm transformer: batch_size=32 exceeds a train setting's train_examples"):
        run_study(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthetic_study_rows_resume_and_report(tmp_path, capsys):
    study = {"study": "recall", "kind": "synthetic", "seeds": [0],
             "arms": {"transformer": {"model": {"n_layers": 1, "n_heads": 2}},
                      "mamba": {"model": {"backbone": "mamba", "n_layers": 1, "d_state": 4}}},
             "synthetic": {"widths": [16, 32], "steps": 3, "batch_size": 4, "lr": 1e-3, "workers": 2,
                           "tasks": [{"task": "mqar", "train": [{"seq_len": 16, "n_pairs": 2}],
                                      "test": [{"seq_len": 16, "n_pairs": 2}, {"seq_len": 32, "n_pairs": 4}],
                                      "train_examples": 16, "test_examples": 8}]}}
    path, out = tmp_path / "recall.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    run_study(path, out)
    rows = json.loads((out / "study.json").read_text())["synthetic"]
    assert sorted((r["arm"], r["d_model"], r["seq_len"]) for r in rows) == [
        (arm, width, length) for arm in ("mamba", "transformer") for width in (16, 32) for length in (16, 32)]
    assert all(0 <= r["accuracy"] <= 1 and r["task"] == "mqar" and r["trained_on"] == "L16×2" for r in rows)
    state = {(r["arm"], r["d_model"], r["seq_len"]): r["state_bytes"] for r in rows}
    assert state["transformer", 16, 32] == 2 * state["transformer", 16, 16]  # a KV cache grows with the sequence
    assert state["mamba", 16, 32] == state["mamba", 16, 16] > 0
    assert (out / "recall_vs_state.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "mamba" in (out / "report.md").read_text()
    capsys.readouterr()
    run_study(path, out, resume=True)  # everything finished: no row is trained again
    assert "accuracy" not in capsys.readouterr().out
    assert json.loads((out / "study.json").read_text())["synthetic"] == rows
    study["synthetic"]["steps"] = 4  # a changed study: its old rows must not be mixed into the new results
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(UserError, match="no longer plans"):
        run_study(path, out, resume=True)


def test_linear_probe_study_option_probes_reports_and_resumes(tmp_path, monkeypatch, capsys):
    """linear_probe: the JEPA run is probed beside its step-0 encoder and the AR run of its seed, once trained; the
    report gets the table and the figure; --resume probes nothing twice."""
    from archlab.train import linear_probe

    monkeypatch.setattr(linear_probe, "PROTOCOL", linear_probe.Protocol(
        pool_tokens=4096, held_out_tokens=1024, batch_tokens=256, check_every=20, patience=2, max_steps=200))
    study = {"study": "probe", "budget": {"tokens": 2560},
             "base": {"include": [str(TINY)], "train": {"eval_every": 5}, "sample": {"tokens": 0}},
             "arms": {"ar": {}, "jepa": {"model": {"objective": "jepa", "jepa": {"offsets": [1, 4]}}}},
             "linear_probe": {"arms": ["jepa"], "baseline": "ar"}}
    path, out = tmp_path / "probe.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    run_study(path, out)
    entries = {r["name"]: r for r in json.loads((out / "study.json").read_text())["runs"]}
    assert entries["jepa-s0"]["linear_probe"] == "finished" and "linear_probe" not in entries["ar-s0"]
    result_path = out / "runs" / "jepa-s0" / "linear_probe.json"
    result = json.loads(result_path.read_text())
    assert [e["name"] for e in result["encoders"]] == ["trained", "random init", "baseline"]
    assert result["encoders"][2]["run_dir"] == str(out / "runs" / "ar-s0") and result["encoders"][1]["step"] == 0
    report = (out / "report.md").read_text()
    assert "## Linear evaluation" in report and "![linear evaluation](linear_probe.png)" in report
    row = table_row(report, "jepa-s0")
    assert row[1] == "next byte, linear" and float(row[2].strip("*")) == pytest.approx(
        result["encoders"][0]["linear"]["val_bpb"], abs=1e-4)
    assert float(row[6]) == pytest.approx(result["entropies"]["unigram_bpb"], abs=1e-4)
    assert (out / "linear_probe.png").read_bytes()[:8] == PNG_SIGNATURE
    assert imread(out / "linear_probe.png").shape[0] > 100
    before = result_path.stat().st_mtime_ns
    capsys.readouterr()
    run_study(path, out, resume=True)
    assert "linear evaluation of" not in capsys.readouterr().out and result_path.stat().st_mtime_ns == before


def test_runs_launch_under_torchrun_when_asked(tmp_path, monkeypatch):
    """nproc_per_node: 2 trains each run with 2 processes (gloo on CPU); the run matches its 1-process plan."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study = {"study": "ddp", "nproc_per_node": 2, "budget": {"tokens": 1536},
             "base": {"include": [str(TINY)], "train": {"eval_every": 3}, "sample": {"tokens": 0}},
             "arms": {"transformer": {}}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = run_study(path, tmp_path / "out")
    summary = json.loads((out / "runs" / "transformer-s0" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["tokens"] == 1536 and summary["processes"] == 2


def test_one_compare_per_output_directory(tiny_study, tmp_path):
    """A second `archlab compare` on an OUT that another one is working in is refused (they would train the same
    run into one run directory)."""
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another `archlab compare` is working in"):
            run_study(tiny_study, out, resume=True)
    assert [p.name for p in out.iterdir()] == [".lock"]
