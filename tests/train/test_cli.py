"""The command line end to end, and every bad input: exit code 2, one `error:` line, nothing written or lost."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archlab.compare.cli import main
from archlab.train.loading import load_run

from .conftest import ROOT, TINY


def run_cli(capsys, *argv):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory (None), so that a new empty directory counts as a change."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One finished tiny run shared by the read-only CLI tests (run in a subprocess: the real entry point)."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = subprocess.run([sys.executable, "-m", "archlab.compare.cli", "train", str(TINY), f"run.dir={run_dir}"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["step"] == 12 and summary["val_bpb"] < 8.0
    assert summary["state_bytes_4x"] == 4 * summary["state_bytes"] > 0  # attention only: a KV cache
    assert "--- sample" in result.stdout and (run_dir / "sample.txt").read_text().startswith("KING")
    return run_dir


def test_eval_prints_val_bpb(capsys, trained_run):
    code, out, _ = run_cli(capsys, "eval", trained_run)
    assert code == 0
    result = json.loads(out)
    summary = json.loads((trained_run / "summary.json").read_text())
    assert result["step"] == 12 and result["val_bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    code, out, _ = run_cli(capsys, "eval", trained_run, "--all")
    assert code == 0 and 0 < json.loads(out)["val_bpb"] < 8.0


def test_load_run_reads_weights_only_and_scores_as_the_trainer(capsys, trained_run, tmp_path):
    """The README's load_run snippet: no optimizer state is read (state.pt removed), nothing is written, the
    model is in eval mode, val bpb is the trainer's final figure, and sampling matches `archlab sample`."""
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    for state in run_dir.rglob("state.pt"):
        state.unlink()
    before = snapshot(run_dir)
    run = load_run(run_dir, "cpu")
    assert run.step == 12 and not run.model.training and run.device.type == "cpu"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert run.evaluate(run.eval_windows("val"))["bpb"] == pytest.approx(summary["val_bpb"], rel=1e-6)
    text = run.sample_text("ROMEO:", 30, temperature=0.8, top_k=None, seed=1)  # the CLI defaults
    code, out, _ = run_cli(capsys, "sample", run_dir, "--prompt", "ROMEO:", "--tokens", "30", "--seed", "1")
    assert code == 0 and out.rstrip("\n") == text and len(text.encode()) >= 36
    assert snapshot(run_dir) == before


def test_sample_prints_text(capsys, trained_run):
    code, out, _ = run_cli(capsys, "sample", trained_run, "--prompt", "ROMEO:", "--tokens", "30", "--seed", "1")
    assert code == 0 and out.startswith("ROMEO:")
    assert run_cli(capsys, "sample", trained_run, "--prompt", "ROMEO:", "--tokens", "30", "--seed", "1")[1] == out


def test_sample_refuses_diffusion_options_for_an_autoregressive_run(capsys, trained_run):
    code, _, err = run_cli(capsys, "sample", trained_run, "--tokens", "8", "--steps", "4")
    assert code == 2 and err.startswith("error: --steps does not apply to objective autoregressive")


def test_diffusion_run_samples_with_every_strategy(capsys, tmp_path):
    run_dir = tmp_path / "diffusion"
    code, _, _ = run_cli(capsys, "train", TINY, f"run.dir={run_dir}", "model.objective=masked_diffusion",
                         "train.max_steps=6", "sample.steps=4", "sample.strategy=confidence")
    assert code == 0 and (run_dir / "sample.txt").read_text().startswith("KING")
    for extra in ([], ["--strategy", "confidence", "--steps", "4"], ["--strategy", "block", "--block-size", "8"]):
        code, out, err = run_cli(capsys, "sample", run_dir, "--prompt", "ROMEO:", "--tokens", "16", *extra)
        assert code == 0 and out.startswith("ROMEO:"), (extra, err)
        assert run_cli(capsys, "sample", run_dir, "--prompt", "ROMEO:", "--tokens", "16", *extra)[1] == out
    code, _, err = run_cli(capsys, "sample", run_dir, "--prompt", "ROMEO:", "--tokens", "30")
    assert code == 2 and "ROMEO:" not in err and "the prompt (6) + --tokens (30) does not fit" in err


def test_train_again_with_auto_resume_is_idempotent(capsys, trained_run):
    before = snapshot(trained_run / "checkpoints")
    code, out, _ = run_cli(capsys, "train", TINY, f"run.dir={trained_run}", "run.resume=auto")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["step"] == 12
    assert snapshot(trained_run / "checkpoints") == before


def _bad_cases(tmp: Path, trained: Path):
    (tmp / "empty.txt").write_bytes(b"")
    (tmp / "short.txt").write_bytes(b"too short")
    (tmp / "data_dir").mkdir()
    other = tmp / "other"
    base = ["train", TINY]
    own_data = ["data.sha256=null"]  # tiny.yaml pins tinyshakespeare's checksum
    return {
        "missing data file": (base + own_data + ["data.path=no_such_corpus.txt"], "no_such_corpus.txt"),
        "empty data file": (base + own_data + [f"data.path={tmp / 'empty.txt'}"], "empty"),
        "data is a directory": (base + own_data + [f"data.path={tmp / 'data_dir'}"], "directory"),
        "data shorter than a sequence": (base + own_data + [f"data.path={tmp / 'short.txt'}"], "data.seq_len"),
        "unknown mixer": (base + ["model.layers=rnn"], "unknown mixer 'rnn'"),
        "unknown objective": (base + ["model.objective=jepa2"], "unknown objective 'jepa2'"),
        "unknown key": (base + ["train.learning_rate=1"], "unknown key train.learning_rate; did you mean train.lr?"),
        "unknown key far from any": (base + ["train.zzz=1"], "unknown key train.zzz; nearest valid key: train."),
        "removed key": (base + ["model.dropout=0.1"], "unknown key model.dropout"),
        "vocabulary not the tokenizer's": (base + ["model.vocab_size=128"], "model.vocab_size=128 but the tokenizer"),
        "causal objective on a bidirectional model": (base + ["model.causal=false"], "needs a causal backbone"),
        "head dim too large": (base + ["model.d_model=1024", "model.attention.n_heads=2"],
                              "head dim model.d_model/model.attention.n_heads=512"),
        "warmup not below max_steps": (base + ["train.max_steps=3"], "warmup_steps=3 must be below max_steps=3"),
        "unknown attention backend": (base + ["kernels.attention=flash3"], "kernels.attention: input should be"),
        "head dim the triton kernel lacks": (base + ["kernels.attention=triton", "model.attention.n_heads=4"],
                                             "kernels.attention=triton needs a head dim"),
        "empty sample prompt": (base + ["sample.prompt="], "sample.prompt"),
        "top_k above the vocabulary": (base + ["sample.top_k=300"], "sample.top_k"),
        "run dir is a file": (base + [f"run.dir={tmp / 'empty.txt'}"], "is a file"),
        "config is a directory": (["train", tmp / "data_dir"], "is a directory"),
        "sample with negative tokens": (["sample", trained, "--tokens", "-1"], "tokens"),
        "sample with top-k 0": (["sample", trained, "--top-k", "0"], "top_k"),
        "sample with empty prompt": (["sample", trained, "--prompt", ""], "prompt"),
        "wrong type": (base + ["model.n_layers=two"], "model.n_layers: input should be a valid integer"),
        "negative lr": (base + ["train.lr=-0.1"], "train.lr: input should be greater than 0"),
        "zero batch": (base + ["train.batch_size=0"], "train.batch_size"),
        "zero steps": (base + ["train.max_steps=0"], "train.max_steps"),
        "heads not dividing d_model": (base + ["model.attention.n_heads=5"], "does not divide model.d_model"),
        "resume without checkpoint": (base + [f"run.dir={other}", "--resume"], "nothing to resume"),
        "run dir not empty": (base + [f"run.dir={trained}"], "not empty; pass --resume"),
        "missing config": (["train", tmp / "nope.yaml"], "not found"),
        "eval of a non-run": (["eval", tmp], "not a run directory"),
        "unknown command": (["fly"], "invalid choice"),
        "unknown benchmark": (["bench", "kernels"], "unknown benchmark"),
        "unknown fetch target": (["data", "fetch", "enwik9"], "enwik9"),
        **({} if torch.cuda.is_available() else {
            "cuda without CUDA": (base + ["train.device=cuda"], "no CUDA device"),
            "GPU-only peer backend on CPU": (base + ["kernels.attention=peer"], "kernels.attention: the 'peer'"),
        }),
    }


def test_bad_inputs(capsys, tmp_path, trained_run):
    watched = snapshot(trained_run)
    for name, (argv, message) in _bad_cases(tmp_path, trained_run).items():
        listing = snapshot(tmp_path)
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2, f"{name}: exit {code}, stderr {err!r}"
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], f"{name}: {err!r}"
        assert snapshot(tmp_path) == listing, f"{name}: wrote files"
        assert not Path("runs/default").exists()
    assert snapshot(trained_run) == watched


def test_damaged_checkpoint_and_other_architecture(capsys, tmp_path, trained_run):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    latest = sorted((run / "checkpoints").iterdir())[-1]
    code, intact, _ = run_cli(capsys, "eval", run)
    assert code == 0
    weights = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(weights[:1000])
    code, _, err = run_cli(capsys, "eval", run)
    assert code == 2 and err.startswith("error: ") and "corrupted, truncated" in err and err.count("\n") == 1
    (latest / "model.safetensors").write_bytes(weights)
    # scoring reads the weights and meta.json only: a damaged training state matters to a resume, not to eval
    (latest / "state.pt").write_bytes(b"\x80\x04garbage, not a zip")
    assert run_cli(capsys, "eval", run)[:2] == (0, intact)
    code, _, err = run_cli(capsys, "train", TINY, f"run.dir={run}", "--resume")
    assert code == 2 and "corrupted, truncated" in err and err.count("\n") == 1

    other = tmp_path / "other"
    assert run_cli(capsys, "train", TINY, f"run.dir={other}", "model.d_model=64", "train.max_steps=1",
                   "train.warmup_steps=0", "sample.tokens=0")[0] == 0
    code, _, err = run_cli(capsys, "eval", trained_run, "--checkpoint", sorted((other / "checkpoints").iterdir())[-1])
    assert code == 2 and "different architecture" in err and err.count("\n") == 1


def test_triton_on_cpu_without_the_interpreter(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run_cli(capsys, "train", TINY, f"run.dir={tmp_path / 'run'}", "train.device=cpu",
                           "kernels.attention=triton")
    assert code == 2 and "TRITON_INTERPRET=1" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_debug_shows_traceback(capsys):
    from archlab.train.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", str(TINY), "train.lr=-1"])
