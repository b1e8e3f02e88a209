"""Fault tests: real processes killed with SIGKILL at unplanned moments, a kill in the middle of a checkpoint
write, a full disk and a read-only checkpoint directory, a NaN through the command line, and a compare study
killed between its arms. After each, the run resumes, and the result is checked bit for bit against an
uninterrupted run (CPU).

test_trainer.py covers the in-process versions (test_exact_resume_equals_straight_run,
test_crash_during_checkpoint_keeps_previous, test_nan_loss_stops_with_step_and_last_checkpoint,
test_half_written_checkpoint_is_ignored_then_cleaned) and tests/compare/test_runner.py the resume between arms
after a deleted summary; these tests do the same to real processes and real files.

The killed processes run the real command line; their fault (a slower step, a hang inside a checkpoint write)
comes from a `sitecustomize` module (FAULT_HOOKS) put on their PYTHONPATH and switched on by ARCHLAB_FAULT.
"""
import contextlib
import copy
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from archlab.archs.objectives.autoregressive import AutoregressiveObjective
from archlab.train import checkpoint as ckpt
from archlab.train.config import load_config
from archlab.train.errors import UserError
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from .conftest import ROOT, TINY
from .test_cli import run_cli

MAX_STEPS = 16
CHECKPOINT_EVERY = 4
COMMON = (f"train.max_steps={MAX_STEPS}", "train.log_every=1", "sample.tokens=0")
STEP_DELAY = 0.1  # seconds added to every step of a process that is to be killed, so a poll can catch a step
VOLATILE = {"tokens_per_s", "mfu"}  # wall-clock rates: the only record fields that differ between equal runs

FAULT_HOOKS = '''\
"""Fault hooks of tests/train/test_faults.py, loaded at interpreter start-up when ARCHLAB_FAULT is set."""
import json
import os

if os.environ.get("ARCHLAB_FAULT"):
    import time
    from pathlib import Path

    from archlab.train import checkpoint, trainer

    fault = json.loads(os.environ["ARCHLAB_FAULT"])
    if fault.get("step_delay"):
        train_step = trainer.Trainer.train_step

        def slow_train_step(self, batch):
            time.sleep(fault["step_delay"])  # wall-clock only: the math is untouched
            return train_step(self, batch)

        trainer.Trainer.train_step = slow_train_step
    if fault.get("hang_in_checkpoint"):
        save_model = checkpoint.save_model

        def hanging_save_model(model, filename, *args, **kwargs):
            save_model(model, filename, *args, **kwargs)
            if fault["hang_in_checkpoint"] in filename:  # weights written; state.pt and meta.json not yet
                Path(fault["marker"]).write_text(filename)
                time.sleep(3600)

        checkpoint.save_model = hanging_save_model
'''


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): same float sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(run_dir: Path, *overrides: str):
    return load_config(TINY, [f"run.dir={run_dir}", *COMMON, *overrides])


def train_argv(run_dir: Path, *overrides: str) -> list[str]:
    return ["train", str(TINY), f"run.dir={run_dir}", *COMMON, *overrides]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_thread):
    """The uninterrupted run every faulty one must equal; it keeps all its checkpoints (4, 8, 12, 16)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    trainer = Trainer(config(run_dir, f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.keep_last=100"))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory):
    """Builds the environment of a process that gets `fault` (see FAULT_HOOKS)."""
    hooks = tmp_path_factory.mktemp("fault_hooks")
    (hooks / "sitecustomize.py").write_text(FAULT_HOOKS)
    python_path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))

    def make(**fault) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": python_path, "ARCHLAB_FAULT": json.dumps(fault),
                "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}

    return make


def kill_when(argv: list[str], env: dict[str, str], ready, log: Path, timeout: float = 120.0) -> None:
    """Starts `python -m archlab.compare.cli ARGV`, polls `ready()` and SIGKILLs the process group the moment
    it holds: the process and any children, wherever they are (a kill -9 of the whole job)."""
    with log.open("w") as output:
        proc = subprocess.Popen([sys.executable, "-m", "archlab.compare.cli", *argv], cwd=ROOT, env=env,
                                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the process ended (exit code {proc.returncode}) before the kill point:\n"
                            f"{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"the kill point was not reached in {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.005)
    finally:
        with contextlib.suppress(ProcessLookupError):  # also the children of a process that ended on its own
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def last_train_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"] if metrics.exists() else []
    return steps[-1] if steps else 0


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir / "metrics.jsonl")]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_equals_straight_run(run_dir: Path, straight: Trainer) -> None:
    """Every record (loss, lr, grad norm, evals) and the final weights bit-identical, each step logged once."""
    assert [r["step"] for r in curve(run_dir) if r["kind"] == "train"] == list(range(1, MAX_STEPS + 1))
    assert curve(run_dir) == curve(straight.run_dir)
    assert ckpt.latest_checkpoint(run_dir).name == f"step_{MAX_STEPS:08d}"
    assert_same_weights(weights(ckpt.latest_checkpoint(run_dir)), weights(ckpt.latest_checkpoint(straight.run_dir)))
    assert not list(ckpt.checkpoint_root(run_dir).glob(".tmp-*"))  # an interrupted save's leftovers are cleaned


def assert_loadable(checkpoint: Path, straight: Trainer) -> None:
    """Loads like a resume would (safetensors + weights_only state) and holds the straight run's weights."""
    model = copy.deepcopy(straight.model)
    state = ckpt.load_checkpoint(checkpoint, model, straight.cfg.model.model_dump(mode="json"))
    assert state["step"] == int(checkpoint.name.removeprefix("step_"))
    assert_same_weights(weights(checkpoint), weights(straight.run_dir / "checkpoints" / checkpoint.name))


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file's bytes and every entry's mtime: a rewrite with equal bytes still counts as touched."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


# -- kill -9 at a random step ------------------------------------------------------------------------------
# seed 0 kills at step 10 (checkpoint 8 complete); seed 2 at step 4, racing the first checkpoint's write (the
# kill mostly lands before it is complete); seed 1 at step 3 of a run whose first checkpoint would come at the end
@pytest.mark.parametrize(("seed", "checkpoint_every"), [(0, CHECKPOINT_EVERY), (2, CHECKPOINT_EVERY), (1, 100)],
                         ids=["seed0", "seed2", "seed1-before-first-checkpoint"])
def test_kill_at_a_random_step_then_resume_equals_straight_run(seed, checkpoint_every, straight, fault_env,
                                                               tmp_path):
    """SIGKILL as soon as a seeded random step is logged: wherever it lands (a step, an eval, a checkpoint
    write, a metrics line), run.resume=auto finishes the run exactly as if nothing had happened. With
    checkpoint_every=100 the kill comes before the first checkpoint, so auto starts the run over."""
    run_dir = tmp_path / "run"
    before_first = checkpoint_every > MAX_STEPS
    kill_step = random.Random(seed).randint(1 if before_first else checkpoint_every, MAX_STEPS - 1)
    overrides = (f"train.checkpoint_every={checkpoint_every}",)
    kill_when(train_argv(run_dir, *overrides), fault_env(step_delay=STEP_DELAY),
              lambda: last_train_step(run_dir) >= kill_step, tmp_path / "killed.log")

    assert not (run_dir / "summary.json").exists()
    killed_at = last_train_step(run_dir)
    found = ckpt.list_checkpoints(run_dir)
    for checkpoint in found:  # atomic saves: whatever is listed is complete, even if the kill hit a save
        assert_loadable(checkpoint, straight)
    assert all(int(p.name.removeprefix("step_")) <= killed_at for p in found)
    if before_first:
        assert not found

    resumed = Trainer(config(run_dir, *overrides, "run.resume=auto"))
    assert resumed.step == (int(found[-1].name.removeprefix("step_")) if found else 0)
    resumed.train()
    assert_equals_straight_run(run_dir, straight)


# -- kill -9 in the middle of a checkpoint write -----------------------------------------------------------
def test_kill_during_a_checkpoint_write_keeps_the_previous_one(straight, fault_env, tmp_path, capsys):
    """Killed after step 8's weights are written into the temporary directory but before its state: step 4
    stays the latest checkpoint and loads, the half-written one is ignored, and `--resume` (the CLI) finishes
    the run bit-identically, removing the leftover at its next save."""
    run_dir = tmp_path / "run"
    marker = tmp_path / "hanging"
    overrides = (f"train.checkpoint_every={CHECKPOINT_EVERY}",)
    kill_when(train_argv(run_dir, *overrides),
              fault_env(hang_in_checkpoint="step_00000008", marker=str(marker)),
              marker.exists, tmp_path / "killed.log")

    leftover = ckpt.checkpoint_root(run_dir) / ".tmp-step_00000008"
    assert sorted(p.name for p in leftover.iterdir()) == ["model.safetensors"]
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000004"]
    assert_loadable(ckpt.latest_checkpoint(run_dir), straight)

    code, out, err = run_cli(capsys, *train_argv(run_dir, *overrides), "--resume")
    assert code == 0, err
    assert "resuming from" in out and "step_00000004" in out
    assert not leftover.exists()
    assert_equals_straight_run(run_dir, straight)


# -- disk full, read-only checkpoint directory -------------------------------------------------------------
WRITE_FAULTS = ["disk_full", "read_only"]


class WriteFault:
    """Makes every later checkpoint write of a run fail as a full disk or a read-only directory would."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.read_only: list[Path] = []

    def install(self, fault: str, run_dir: Path) -> str:
        """Returns the OS's message for the fault, which the error must carry."""
        root = ckpt.checkpoint_root(run_dir)
        if fault == "disk_full":
            save_model = ckpt.save_model

            def fill_disk(model, filename, *args, **kwargs):
                save_model(model, filename, *args, **kwargs)
                with open(filename, "r+b") as file:  # the disk filled up half-way through the weights
                    file.truncate(os.path.getsize(filename) // 2)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

            self.monkeypatch.setattr(ckpt, "save_model", fill_disk)
            return os.strerror(errno.ENOSPC)
        if os.geteuid() != 0:
            root.chmod(0o555)
            self.read_only.append(root)
            return os.strerror(errno.EACCES)
        # root ignores permission bits: the refusal the kernel gives everyone else is raised here instead
        mkdir = Path.mkdir

        def refuse(path, *args, **kwargs):
            if path.parent == root:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return mkdir(path, *args, **kwargs)

        self.monkeypatch.setattr(Path, "mkdir", refuse)
        return os.strerror(errno.EACCES)

    def undo(self) -> None:
        """Room on the disk again, the directory writable again."""
        self.monkeypatch.undo()
        for folder in self.read_only:
            folder.chmod(0o755)
        self.read_only.clear()


@pytest.fixture
def write_fault(monkeypatch):
    fault = WriteFault(monkeypatch)
    yield fault
    fault.undo()  # so that pytest can delete tmp_path


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_failed_checkpoint_write_keeps_the_last_good_one(fault, straight, write_fault, tmp_path):
    """The save at step 8 fails: the step-4 checkpoint stays byte-for-byte, nothing half-written is left, and
    once the disk has room again the run resumes from step 4 to the straight run's result."""
    run_dir = tmp_path / "run"
    overrides = (f"train.checkpoint_every={CHECKPOINT_EVERY}",)
    Trainer(config(run_dir, *overrides)).train(until_step=CHECKPOINT_EVERY)
    good = ckpt.latest_checkpoint(run_dir)
    before = snapshot(good)
    # a new Trainer, as a real restart would: a second train() on the same Trainer drops the metrics of its first
    trainer = Trainer(config(run_dir, *overrides, "run.resume=true"))
    reason = write_fault.install(fault, run_dir)

    with pytest.raises((OSError, UserError), match=reason):  # OSError today; see the test below
        trainer.train()
    assert trainer.step == 2 * CHECKPOINT_EVERY
    assert sorted(p.name for p in ckpt.checkpoint_root(run_dir).iterdir()) == [good.name]
    assert snapshot(good) == before
    assert_loadable(good, straight)

    write_fault.undo()
    resumed = Trainer(config(run_dir, *overrides, "run.resume=true"))
    assert resumed.step == CHECKPOINT_EVERY
    resumed.train()
    assert_equals_straight_run(run_dir, straight)


@pytest.mark.parametrize("fault", WRITE_FAULTS)
def test_failed_checkpoint_write_is_one_error_line(fault, write_fault, tmp_path, capsys):
    """Through the CLI: exit code 2 and one `error:` line carrying the OS's reason and naming the last good
    checkpoint, which stays as it was."""
    run_dir = tmp_path / "run"
    overrides = (f"train.checkpoint_every={CHECKPOINT_EVERY}",)
    Trainer(config(run_dir, *overrides)).train(until_step=CHECKPOINT_EVERY)
    good = ckpt.latest_checkpoint(run_dir)
    before = snapshot(good)
    reason = write_fault.install(fault, run_dir)

    code, _, err = run_cli(capsys, *train_argv(run_dir, *overrides), "--resume")
    assert snapshot(good) == before
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert reason in err and good.name in err


# -- a NaN through the command line ------------------------------------------------------------------------
def test_nan_through_the_cli_names_step_and_checkpoint_and_replays(straight, tmp_path, capsys, monkeypatch):
    """The loss turns NaN on the batch of step 7 (a data-borne fault, not a step counter): one `error:` line
    naming step 7 and the step-4 checkpoint, which stays byte-for-byte; resuming restores the data position,
    meets the same batch and stops with the same line, and nothing after step 6 reaches a checkpoint."""
    nan_step = 7
    poisoned_batch = straight.sampler.batch(nan_step - 1)  # the sampler's batches are a pure function of index
    plain_loss = AutoregressiveObjective.loss

    def loss(self, model, batch):
        value, metrics = plain_loss(self, model, batch)
        return (value * float("nan") if torch.equal(batch.cpu(), poisoned_batch) else value), metrics

    monkeypatch.setattr(AutoregressiveObjective, "loss", loss)
    run_dir = tmp_path / "run"
    argv = train_argv(run_dir, f"train.checkpoint_every={CHECKPOINT_EVERY}")
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: training stopped: loss became nan at step {nan_step}; "
                          f"last good checkpoint: {run_dir / 'checkpoints' / 'step_00000004'}.")
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000004"]
    assert last_train_step(run_dir) == nan_step - 1
    kept = snapshot(run_dir / "checkpoints")
    assert_loadable(ckpt.latest_checkpoint(run_dir), straight)

    code, out, again = run_cli(capsys, *argv, "--resume")
    assert code == 2 and again == err and "resuming from" in out
    assert snapshot(run_dir / "checkpoints") == kept
    assert curve(run_dir) == curve(straight.run_dir)[:len(curve(run_dir))]  # the replay retraced steps 5 and 6
    assert last_train_step(run_dir) == nan_step - 1


# -- a compare study killed between arms -------------------------------------------------------------------
def test_compare_killed_in_its_second_arm_resumes_only_that_arm(fault_env, tmp_path, capsys):
    """`archlab compare` and the arm it runs are killed together (kill -9 of the job) in the second arm;
    `archlab compare --resume` leaves the finished first arm untouched (bytes and mtimes), continues the
    second from its checkpoint or from scratch, and marks both finished."""
    study = {"study": "faults", "base": {"include": [str(TINY)], "train": {"eval_every": 5, "log_every": 1},
                                         "sample": {"tokens": 0}},
             "budget": {"tokens": 2560},  # 10 steps of 8 x 32 bytes
             "arms": {"transformer": {}, "mamba": {"model": {"backbone": "mamba", "d_state": 4}}}}
    study_file, out = tmp_path / "study.yaml", tmp_path / "out"
    study_file.write_text(yaml.safe_dump(study, sort_keys=False))
    second = out / "runs" / "mamba-s0"
    kill_step = random.Random(3).randint(1, 9)
    kill_when(["compare", str(study_file), "--out", str(out)], fault_env(step_delay=STEP_DELAY),
              lambda: last_train_step(second) >= kill_step, tmp_path / "killed.log")

    record = json.loads((out / "study.json").read_text())
    assert [(r["name"], r["status"]) for r in record["runs"]] == [("transformer-s0", "finished"),
                                                                   ("mamba-s0", "pending")]
    assert not (second / "summary.json").exists()
    first = out / "runs" / "transformer-s0"
    finished = snapshot(first)

    code, out_text, err = run_cli(capsys, "compare", study_file, "--out", out, "--resume")
    assert code == 0, err
    assert "transformer-s0: finished earlier, skipped" in out_text
    assert snapshot(first) == finished
    record = json.loads((out / "study.json").read_text())
    assert [(r["name"], r["status"]) for r in record["runs"]] == [("transformer-s0", "finished"),
                                                                   ("mamba-s0", "finished")]
    assert len(record["resumed"]) == 1
    assert json.loads((second / "summary.json").read_text())["step"] == 10
    assert [r["step"] for r in read_metrics(second / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 11))
