"""scripts/gpu_check.sh (compare/gpu_check.py): its dry run walks every step on this CPU, a failing step does not
stop the ones after it, and summary.md says what each did."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from archlab.compare import gpu_check

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["doctor", "gpu tests", "peers", "bench attention", "bench scan", "bench conv1d", "bench ssd",
         "bench gated_delta", "trainer gpt124m", "study gpu-5min"]


def _summary_rows(path: Path) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in path.read_text().splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[2:]}  # past the header and rule


@pytest.mark.slow
def test_the_dry_run_walks_every_step_and_writes_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it (the conftest
    # keeps ARCHLAB_CACHE_DIR pointing at a temp folder)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**env, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = _summary_rows(tmp_path / "summary.md")
    assert list(rows) == STEPS
    assert all(status == "ok" or status.startswith("skipped") for status, *_ in rows.values()), rows
    assert "skipped" in rows["gpu tests"][2]  # pytest's tally: the gpu tests were collected and skipped here
    planned = (tmp_path / "study-gpu-5min.log").read_text()
    assert "name: hybrid-ar-s0" in planned and "name: mamba2-ar-s0" in planned  # the study was planned
    assert " tokens/s" in rows["trainer gpt124m"][2] and "params" in rows["trainer gpt124m"][2]
    for name in STEPS:
        if name != "peers":
            assert (tmp_path / f"{name.replace(' ', '-')}.log").read_text().startswith("$ ")


def test_the_study_figures_are_each_arms_final_quality(tmp_path):
    table = tmp_path / "results.csv"  # the columns a study's results.csv has, two of its rows
    table.write_text("name,arm,seed,final,quality_metric,train_seconds\n"
                     "transformer-ar-s0,transformer-ar,0,2.68163490,bpb,83.31\n"
                     "mamba2-ar-s0,mamba2-ar,0,2.45829806,bpb,115.86\n")
    assert gpu_check._study_figures(table) == "transformer-ar 2.6816 bpb in 83.31 s; mamba2-ar 2.4583 bpb in 115.86 s"


def test_a_failing_step_is_reported_and_the_next_steps_still_run(tmp_path, monkeypatch):
    def steps(out):
        return [gpu_check.Step("breaks", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 60),
                gpu_check.Step("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], 1),
                gpu_check.Step("works", [sys.executable, "-c", "print('fine')"], 60)]

    monkeypatch.setattr(gpu_check, "_dry_steps", steps)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 1
    rows = _summary_rows(tmp_path / "summary.md")
    assert rows["breaks"][0] == "failed (exit 3)" and rows["breaks"][2] == "boom"
    assert rows["hangs"][0] == "failed (over its 1 s limit)"
    assert rows["works"][0] == "ok" and rows["works"][2] == "fine"


def test_without_a_gpu_the_real_run_is_one_error_line(tmp_path, capsys):
    if gpu_check.device_slug() != "cpu":
        pytest.skip("this machine has a GPU")
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA GPU here; run `scripts/gpu_check.sh --dry-run`")
    assert not any(tmp_path.iterdir())
