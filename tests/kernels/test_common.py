"""kernels/common: the small utilities every layer shares."""
import json
import math
import re
from pathlib import Path

import pytest
import torch

from archlab.kernels.common import provenance
from archlab.kernels.common.files import atomic_output, atomic_path, atomic_write, atomic_write_all, json_text
from archlab.kernels.common.markdown import table
from archlab.kernels.common.plotting import STYLE, png_bytes, pyplot
from archlab.kernels.common.schedule import lr_at
from archlab.kernels.common.timing import timed

ROOT = Path(__file__).resolve().parents[2]


# -- files ------------------------------------------------------------------------------------------
def test_atomic_write_replaces_the_file_readable_by_all_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "result.json"
    assert atomic_write(path, "first") == path
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second" and path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_a_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="killed"), atomic_output(path) as file:
        file.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_atomic_path_hands_a_temporary_name_next_to_the_target(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_path(path) as temporary:
        assert temporary.parent == tmp_path and temporary != path and not path.exists()
        temporary.write_bytes(b"png")
    assert path.read_bytes() == b"png" and not temporary.exists()


def test_atomic_write_all_moves_nothing_until_every_file_is_written(tmp_path):
    first, second = tmp_path / "report.md", tmp_path / "results.csv"
    atomic_write_all({first: "old report", second: "old csv"})
    with pytest.raises(TypeError):
        atomic_write_all({first: "new report", second: 3})  # the second file cannot be written
    assert first.read_text() == "old report" and second.read_text() == "old csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.csv"]


def test_json_text_is_indented_by_one_and_ends_with_a_newline():
    assert json_text({"a": [1]}) == '{\n "a": [\n  1\n ]\n}\n'
    assert json_text({"a": 1}, indent=None) == '{"a": 1}\n' and json.loads(json_text([2.5])) == [2.5]


# -- provenance -------------------------------------------------------------------------------------
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not run from a git checkout")
def test_git_commit_is_this_checkouts_short_hash_or_none_without_git(monkeypatch):
    assert re.fullmatch(r"[0-9a-f]{7,40}", provenance.git_commit())

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    assert provenance.git_commit() is None


# -- markdown ---------------------------------------------------------------------------------------
def test_table_lines_with_either_rule_and_none_as_an_empty_cell():
    assert table(["a", "b"], [[1, None], ["x", 2.5]]) == ["| a | b |", "| --- | --- |", "| 1 |  |", "| x | 2.5 |"]
    assert table(["a", "b"], [], compact_rule=True) == ["| a | b |", "|---|---|"]


# -- timing -----------------------------------------------------------------------------------------
def test_timed_waits_for_the_gpu_before_and_after_the_run(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append(f"sync {device}"))
    result, seconds = timed(lambda: events.append("run") or 7, torch.device("cuda:0"))
    assert (result, events) == (7, ["sync cuda:0", "run", "sync cuda:0"]) and seconds >= 0
    events.clear()
    assert timed(lambda: 8, torch.device("cpu"))[0] == 8 and events == []  # nothing to wait for on the CPU


# -- plotting ---------------------------------------------------------------------------------------
def test_pyplot_has_the_house_style_and_png_bytes_closes_the_figure():
    plt = pyplot()
    assert all(plt.rcParams[key] == value for key, value in STYLE.items())
    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    assert png_bytes(figure)[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(figure.number)


# -- schedule ---------------------------------------------------------------------------------------
def test_lr_schedules_warm_up_then_reach_the_floor_on_the_last_step():
    common = {"lr": 2.0, "warmup_steps": 4, "max_steps": 20, "min_lr_ratio": 0.25}
    cosine = [lr_at(step, schedule="cosine", **common) for step in range(20)]
    assert cosine[:4] == [0.5, 1.0, 1.5, 2.0] and cosine[19] == 0.5
    assert cosine[10] == 0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 6 / 15))
    wsd = [lr_at(step, schedule="wsd", decay_fraction=0.25, **common) for step in range(20)]
    assert wsd[4:15] == [2.0] * 11 and wsd[15] == 2.0 - 1.5 / 5 and wsd[19] == 0.5
    assert lr_at(19, schedule="constant", **common) == 2.0
    with pytest.raises(ValueError, match="decay_fraction"):
        lr_at(19, schedule="wsd", **common)
