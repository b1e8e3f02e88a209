"""Runs saved by an older archlab still load and evaluate to the same val bpb (tests/fixtures/legacy-runs)."""
import json
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT
from .test_cli import run_cli

LEGACY = ROOT / "tests" / "fixtures" / "legacy-runs"
# eval is deterministic; another CPU's BLAS may sum in another order (~1e-7 relative per op)
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", sorted(p.name for p in LEGACY.iterdir() if p.is_dir()))
def test_legacy_run_evaluates_to_its_saved_bpb(name, capsys, tmp_path):
    run_dir = Path(shutil.copytree(LEGACY / name, tmp_path / name))  # a copy: evaluation must not touch the fixture
    expected = json.loads((LEGACY / f"{name}.eval.json").read_text())
    code, out, err = run_cli(capsys, "eval", run_dir)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == expected["step"]
    assert result["val_bpb"] == pytest.approx(expected["val_bpb"], abs=TOLERANCE, rel=0)
