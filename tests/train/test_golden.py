"""Golden loss curves: the first 12 training losses (and 3 evals) of a tiny config of every backbone x objective
that trains today, on CPU, against a committed file.

Any change to initialisation, data order, the model's math, the optimizer or the schedule moves these
numbers by far more than the tolerance. Tolerance: with 1 and 2 threads the curves were identical here;
another CPU's BLAS may sum in another order, an fp32 rounding effect (~1e-7 relative per op) that stays
far below 1e-4 over 12 steps. The smallest meaningful change we tried (lr 3e-3 -> 3.03e-3, i.e. 1%) moves
each curve by more than 10x the tolerance within 12 steps (a test below checks it for every case).
Regenerate after an intended change: ARCHLAB_UPDATE_GOLDEN=1 python -m pytest tests/train/test_golden.py

Kernel backends: the cases run `auto`, what training uses by default. On CPU that runs the selective scan on its
numba kernels where numba imports and on the PyTorch path elsewhere, which the `mamba-autoregressive-torch-scan`
case pins, so that both CPU scans stay on the curve wherever the suite runs. The Mamba curves were recorded with
the torch scan and F.conv1d; with the numba scan and the conv as a channels-last conv2d they differ by at most
5e-7 (float-order noise, far inside the tolerance).
"""
import json
import os
from pathlib import Path

import pytest

from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

GOLDEN = Path(__file__).with_name("golden_tiny_losses.json")
TOLERANCE = 1e-4

# case -> overrides of tests/train/tiny.yaml (a 2-layer, d_model 32 Transformer LM)
CASES = {
    "transformer-autoregressive": [],
    "mamba-autoregressive": ["model.layers=mamba"],
    "mamba-autoregressive-torch-scan": ["model.layers=mamba", "kernels.selective_scan=torch"],
    "hybrid-autoregressive": ["model.layers=mamba,attention"],
    "transformer-masked_diffusion": ["model.objective=masked_diffusion"],
    "transformer-jepa": ["model.objective=jepa", "sample.tokens=0"],
}


def tiny_curve(tiny_config, tmp_path, *overrides):
    Trainer(tiny_config(*overrides, run_dir=tmp_path / "golden")).train()
    records = read_metrics(tmp_path / "golden" / "metrics.jsonl")
    return {"train_loss": [r["loss"] for r in records if r["kind"] == "train"],
            "val_bpb": [r["val_bpb"] for r in records if r["kind"] == "eval"]}


def golden_curves() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES)
def test_golden_loss_curve(case, tiny_config, tmp_path):
    curve = tiny_curve(tiny_config, tmp_path, *CASES[case])
    if os.environ.get("ARCHLAB_UPDATE_GOLDEN"):
        curves = golden_curves() if GOLDEN.exists() else {}
        GOLDEN.write_text(json.dumps(curves | {case: curve}, indent=1, sort_keys=True) + "\n")
    golden = golden_curves()[case]
    assert len(curve["train_loss"]) == len(golden["train_loss"]) == 12
    assert curve["train_loss"] == pytest.approx(golden["train_loss"], abs=TOLERANCE, rel=0)
    assert curve["val_bpb"] == pytest.approx(golden["val_bpb"], abs=TOLERANCE, rel=0)


@pytest.mark.parametrize("case", CASES)
def test_tolerance_catches_a_one_percent_lr_change(case, tiny_config, tmp_path):
    """The tolerance is not so loose that a small real change passes."""
    golden = golden_curves()[case]
    changed = tiny_curve(tiny_config, tmp_path, *CASES[case], "train.lr=3.03e-3")
    assert max(abs(a - b) for a, b in zip(changed["train_loss"], golden["train_loss"], strict=True)) > 10 * TOLERANCE
