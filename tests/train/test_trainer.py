import json
import math

import pytest
import torch

from archlab.train import checkpoint as ckpt
from archlab.train.config import load_config
from archlab.train.errors import CheckpointError, ConfigError, UserError
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer, TrainingDiverged, lr_at, parameter_groups


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_run_directory_layout_and_records(tiny_config, tmp_path):
    trainer = Trainer(tiny_config())
    trainer.train()
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert [r["step"] for r in trains] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "flops"} <= trains[0].keys()
    assert "val_bpb" in evals[0] and abs(evals[0]["val_bpb"] - 8.0) < 0.2  # uniform at init: 8 bits per byte
    assert trains[-1]["tokens"] == 12 * 8 * 32
    assert trains[-1]["flops"] == 12 * trainer.flops_per_step
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000006", "step_00000012"]
    assert load_config(run / "config.yaml") == trainer.cfg


def test_log_every_includes_the_last_step(tiny_config, tmp_path):
    Trainer(tiny_config("train.log_every=5")).train()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"] == [5, 10, 12]


STACKS = {"transformer": [], "mamba": ["model.layers=mamba"], "hybrid": ["model.layers=mamba,attention"]}
RESUME_CASES = [pytest.param(stack, precision, id=f"{stack}-{precision}") for precision in ("fp32", "bf16")
                for stack in STACKS]


@pytest.mark.parametrize("stack,precision", RESUME_CASES)
def test_exact_resume_equals_straight_run(tiny_config, tmp_path, stack, precision):
    """Every backbone, in fp32 and under CPU bf16 autocast: a run stopped at its checkpoint and resumed is the
    straight run, bit for bit; and bf16 trains (finite falling loss, no dtype errors)."""
    overrides = [*STACKS[stack], f"train.precision={precision}"]
    straight = Trainer(tiny_config(*overrides, run_dir=tmp_path / "straight"))
    straight.train()

    first = Trainer(tiny_config(*overrides, run_dir=tmp_path / "resumed"))
    first.train(until_step=6)
    del first
    second = Trainer(tiny_config(*overrides, "run.resume=true", run_dir=tmp_path / "resumed"))
    assert second.step == 6
    second.train()

    losses = train_losses(tmp_path / "straight")
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0] - 0.3, losses
    assert train_losses(tmp_path / "resumed") == losses  # bit-identical on CPU
    for a, b in zip(straight.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_truncates_records_after_the_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config("train.checkpoint_every=4"))
    trainer.train(until_step=6)  # checkpoint at 4, records up to 6
    resumed = Trainer(tiny_config("train.checkpoint_every=4", "run.resume=true"))
    assert resumed.step == 4
    resumed.train()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_non_empty_run_dir_needs_resume(tiny_config, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not empty; pass --resume"):
        Trainer(tiny_config())
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_resume_without_checkpoint_is_an_error(tiny_config, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(tiny_config("run.resume=true"))
    assert not (tmp_path / "run").exists()


def test_resume_auto_starts_fresh_then_continues(tiny_config):
    Trainer(tiny_config("run.resume=auto")).train(until_step=6)
    assert Trainer(tiny_config("run.resume=auto")).step == 6


def test_resume_with_changed_math_is_refused(tiny_config):
    Trainer(tiny_config()).train(until_step=6)
    with pytest.raises(ConfigError, match="train.lr"):
        Trainer(tiny_config("run.resume=true", "train.lr=0.1"))
    assert Trainer(tiny_config("run.resume=true", "train.log_every=3")).step == 6  # bookkeeping may change


def test_nan_loss_stops_with_step_and_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config("train.checkpoint_every=3"))
    real_loss = trainer.model.objective.loss

    def poisoned(model, batch):
        loss, metrics = real_loss(model, batch)
        return (loss * float("nan") if trainer.step == 4 else loss), metrics

    monkeypatch.setattr(trainer.model.objective, "loss", poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5; last good checkpoint: .*step_00000003"):
        trainer.train()
    assert trainer.step == 4 and all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_crash_during_checkpoint_keeps_previous(tiny_config, tmp_path, monkeypatch):
    trainer = Trainer(tiny_config())
    trainer.train(until_step=6)
    run = tmp_path / "run"

    def crash(*args, **kwargs):
        raise OSError("disk pulled out mid-write")

    monkeypatch.setattr(torch, "save", crash)
    trainer.train(until_step=7)
    with pytest.raises(CheckpointError, match="could not write the checkpoint .*mid-write"):
        trainer._save()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000006"]  # no temp dirs left
    monkeypatch.undo()
    assert Trainer(tiny_config("run.resume=true")).step == 6


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta"])
def test_damaged_checkpoint_is_a_clear_error(tiny_config, tmp_path, damage):
    Trainer(tiny_config()).train(until_step=6)
    latest = ckpt.latest_checkpoint(tmp_path / "run")
    target = latest / ("meta.json" if damage == "meta" else "model.safetensors")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="corrupted"):
        Trainer(tiny_config("run.resume=true"))


def test_checkpoint_from_other_architecture_is_refused(tiny_config, tmp_path):
    Trainer(tiny_config()).train(until_step=6)
    other = Trainer(tiny_config("model.d_model=64", run_dir=tmp_path / "other"))
    with pytest.raises(CheckpointError, match="different architecture .*d_model"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"), other.model,
                             other.cfg.model.model_dump(mode="json"))


def test_checkpoint_from_before_newer_model_keys_loads(tiny_config, tmp_path):
    """A checkpoint written before a model key existed was built with that key's default."""
    trainer = Trainer(tiny_config())
    trainer.train(until_step=6)
    path = ckpt.latest_checkpoint(tmp_path / "run")
    meta = json.loads((path / "meta.json").read_text())
    for newer_key in ("mlp_hidden", "jepa"):  # jepa: a nested section
        del meta["model"][newer_key]
    del meta["model"]["attention"]["rope_theta"]  # a key inside a mixer's section
    (path / "meta.json").write_text(json.dumps(meta))
    ckpt.load_checkpoint(path, trainer.model, trainer.cfg.model.model_dump(mode="json"))
    meta["model"]["attention"]["n_kv_heads"] = 1  # a key that is there still has to match
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="attention"):
        ckpt.load_checkpoint(path, trainer.model, trainer.cfg.model.model_dump(mode="json"))


def test_keep_last_prunes_old_checkpoints(tiny_config, tmp_path):
    Trainer(tiny_config("train.checkpoint_every=2", "train.keep_last=2")).train()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_00000010", "step_00000012"]


def test_grad_accumulation_matches_full_batch(tiny_config, tmp_path):
    full = Trainer(tiny_config(run_dir=tmp_path / "full"))
    full.train(until_step=3)
    accum = Trainer(tiny_config("train.micro_batch_size=2", run_dir=tmp_path / "accum"))
    accum.train(until_step=3)
    assert train_losses(tmp_path / "accum") == pytest.approx(train_losses(tmp_path / "full"), rel=1e-5)


def test_lr_schedules():
    cfg = load_config(None, ["train.lr=1.0", "train.warmup_steps=10", "train.max_steps=110",
                             "train.min_lr_ratio=0.1"]).train
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(109, cfg) == pytest.approx(0.1)  # last step: floor
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    wsd = cfg.model_copy(update={"schedule": "wsd", "decay_fraction": 0.2})
    assert lr_at(80, wsd) == 1.0 and lr_at(87, wsd) == 1.0
    assert lr_at(109, wsd) == pytest.approx(0.1)
    assert all(lr_at(s, wsd) >= lr_at(s + 1, wsd) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_embeddings(tiny_config):
    model = Trainer(tiny_config()).model
    decay, no_decay = parameter_groups(model, 0.1, decay_embeddings=False)
    decayed = {id(p) for p in decay["params"]}
    for name, param in model.named_parameters():
        expect = param.ndim >= 2 and "embedding" not in name
        assert (id(param) in decayed) == expect, name
    assert no_decay["weight_decay"] == 0.0


def test_cuda_device_without_cuda_is_an_error(tiny_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA"):
        Trainer(tiny_config("train.device=cuda"))
    assert not (tmp_path / "run").exists()


def test_sample_is_deterministic(tiny_config):
    trainer = Trainer(tiny_config())
    trainer.train(until_step=2)
    a = trainer.sample_text("KING", 20, temperature=1.0, top_k=None, seed=3)
    assert a == trainer.sample_text("KING", 20, temperature=1.0, top_k=None, seed=3)
    assert a.startswith("KING") and len(a.encode("utf-8", errors="surrogateescape")) >= 4


def test_wandb_offline_needs_no_network(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the suite disables wandb; this test wants the default
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    Trainer(tiny_config("run.wandb=offline", "train.max_steps=2", "train.warmup_steps=1")).train()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_wandb_online_without_key_fails_before_writing(tiny_config, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(UserError, match="WANDB_API_KEY"):
        Trainer(tiny_config("run.wandb=online"))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tiny_config, tmp_path):
    """train.compile=true runs the same math (~20 s of compilation on CPU)."""
    short = ("train.max_steps=3", "train.warmup_steps=1")
    Trainer(tiny_config("train.compile=true", *short, run_dir=tmp_path / "compiled")).train()
    Trainer(tiny_config(*short, run_dir=tmp_path / "eager")).train()
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), abs=1e-5)


def test_exact_resume_restores_the_torch_rng(tiny_config, tmp_path, monkeypatch):
    """An objective that draws random numbers (as masking objectives do) still resumes exactly."""
    from archlab.archs.objectives.autoregressive import AutoregressiveObjective

    plain_loss = AutoregressiveObjective.loss

    def noisy_loss(self, model, batch):
        loss, metrics = plain_loss(self, model, batch)
        return loss + 0.1 * torch.rand(()), metrics

    monkeypatch.setattr(AutoregressiveObjective, "loss", noisy_loss)
    Trainer(tiny_config(run_dir=tmp_path / "straight")).train()
    Trainer(tiny_config(run_dir=tmp_path / "resumed")).train(until_step=6)
    Trainer(tiny_config("run.resume=true", run_dir=tmp_path / "resumed")).train()
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")


def test_run_killed_before_its_first_checkpoint(tiny_config, tmp_path):
    """Only its own records are left: --resume explains, run.resume=auto starts it over cleanly."""
    Trainer(tiny_config("train.checkpoint_every=100")).train(until_step=3)
    assert not ckpt.list_checkpoints(tmp_path / "run")
    with pytest.raises(CheckpointError, match="stopped before the first checkpoint: run.resume=auto"):
        Trainer(tiny_config("train.checkpoint_every=100", "run.resume=true"))
    Trainer(tiny_config("train.checkpoint_every=100", "run.resume=auto")).train()
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_resume_survives_a_torn_metrics_line(tiny_config, tmp_path):
    Trainer(tiny_config()).train(until_step=7)
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 8, "lo')  # killed in the middle of a write
    Trainer(tiny_config("run.resume=true")).train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert not any('"lo' in line and line.endswith('"lo') for line in lines)  # the torn record is gone
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, 13))


def test_half_written_checkpoint_is_ignored_then_cleaned(tiny_config, tmp_path):
    trainer = Trainer(tiny_config())
    trainer.train(until_step=6)
    partial = tmp_path / "run" / "checkpoints" / ".tmp-step_00000009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    resumed = Trainer(tiny_config("run.resume=true"))
    assert resumed.resume_from.name == "step_00000006"
    resumed.train()
    assert not partial.exists()


def test_saving_the_same_step_twice_keeps_one_checkpoint(tiny_config, tmp_path):
    trainer = Trainer(tiny_config())
    trainer.train(until_step=6)
    trainer._save()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000006"]
    assert Trainer(tiny_config("run.resume=true")).step == 6


def test_time_budget_stops_the_run_and_it_stays_stopped(tiny_config, tmp_path, monkeypatch):
    """train.max_seconds ends training at the step that crosses it: eval, checkpoint, summary say so."""
    import archlab.train.trainer as trainer_module

    clock = iter(range(0, 10_000))  # every perf_counter() call advances one second
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(clock)))
    trainer = Trainer(tiny_config("train.max_seconds=3", "train.max_steps=50", "train.warmup_steps=1"))
    final = trainer.train()
    assert 1 <= trainer.step < 50 and trainer.train_seconds >= 3
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["kind"] == "eval" and records[-1]["step"] == trainer.step and "bpb" in final
    assert ckpt.latest_checkpoint(tmp_path / "run").name == f"step_{trainer.step:08d}"
    assert trainer.write_summary(final)["stopped_by"] == "max_seconds"
    again = Trainer(tiny_config("train.max_seconds=3", "train.max_steps=50", "train.warmup_steps=1",
                                "run.resume=true"))
    again.train()
    assert again.step == trainer.step  # over its time budget already: nothing more is trained
