"""torchrun with 2 CPU processes (gloo), DDP and FSDP2: the same loss curve as 1 process at the same global batch,
exact resume, and an FSDP2 checkpoint that a single process loads."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from archlab.train.checkpoint import latest_checkpoint
from archlab.train.config import load_config
from archlab.train.errors import ConfigError
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from .conftest import TINY

# DDP averages per-rank gradient means where one process averages over the whole batch: the same numbers summed
# in another order, so each step differs by float32 rounding (~1e-7 relative). Over 12 AdamW steps on the tiny
# model we measured differences up to ~2e-6 in the losses; 1e-4 leaves a wide margin and still catches any real
# mistake (a wrong shard, a missing all-reduce, a doubled gradient all move the loss by > 1e-2 within 2 steps).
TOLERANCE = 1e-4


def train(run_dir, *overrides, nproc=1):
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "archlab.compare.cli", "train", str(TINY), f"run.dir={run_dir}", "sample.tokens=0",
            *overrides, "--nproc", str(nproc)]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def final_weights(run_dir):
    return load_file(latest_checkpoint(run_dir) / "model.safetensors")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_curve(tmp_path, parallel):
    train(tmp_path / "one")
    result = train(tmp_path / "two", f"train.parallel={parallel}", nproc=2)
    assert result.stdout.count('"run_dir"') == 1  # one summary: only rank 0 prints and writes
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=TOLERANCE)
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=TOLERANCE, atol=TOLERANCE)
    summaries = [json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two")]
    assert summaries[0]["train_flops"] == summaries[1]["train_flops"]  # FLOPs are counted over the world
    assert (summaries[0]["processes"], summaries[1]["processes"]) == (1, 2)
    assert summaries[1]["val_bpb"] == pytest.approx(summaries[0]["val_bpb"], rel=TOLERANCE)


@pytest.mark.parametrize("objective,parallel", [("autoregressive", "ddp"), ("masked_diffusion", "ddp"),
                                                ("autoregressive", "fsdp")])
def test_two_process_run_resumes_exactly(tmp_path, objective, parallel):
    """A 2-process run cut after its step-6 checkpoint and resumed by 2 processes equals the straight run, bit for
    bit (diffusion draws masks from each rank's own RNG stream, which the checkpoint keeps per rank; FSDP2 saves
    and reloads full weights and optimizer state gathered from the shards)."""
    settings = [f"model.objective={objective}", f"train.parallel={parallel}"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(straight, *settings, nproc=2)
    shutil.copytree(straight, cut)
    shutil.rmtree(latest_checkpoint(cut))  # as if killed after the step-6 checkpoint
    (cut / "summary.json").unlink()
    assert latest_checkpoint(cut).name == "step_00000006"
    train(cut, *settings, "run.resume=true", nproc=2)
    assert losses(cut) == losses(straight)
    for name, tensor in final_weights(straight).items():
        assert torch.equal(final_weights(cut)[name], tensor), name


def test_global_batch_must_split_evenly(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="batch_size=8 must divide evenly over 3 processes"):
        Trainer(load_config(TINY, [f"run.dir={tmp_path / 'run'}"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="micro_batch_size=4 must divide the per-process batch 6"):
        Trainer(load_config(TINY, [f"run.dir={tmp_path / 'run'}", "train.batch_size=12", "train.micro_batch_size=4"]))


def test_fsdp_checkpoint_loads_in_one_process(tmp_path):
    """The sharded run's checkpoint holds full weights: `archlab eval` in a single process scores it the same."""
    train(tmp_path / "fsdp", "train.parallel=fsdp", nproc=2)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    result = subprocess.run([sys.executable, "-m", "archlab.compare.cli", "eval", str(tmp_path / "fsdp")],
                            capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
