"""Every kind of bad input, through `archlab` itself (issue 9): configs, data, checkpoints, studies, arguments, env.

Each case must end with exit code 2 and exactly one stderr line `error: ...` naming the problem, no traceback,
nothing new written (the case's folder, the default run dir `runs/default`, the data cache) and the saved runs
byte-identical afterwards.
"""
from __future__ import annotations

import contextlib
import io
import json
import lzma
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from archlab.compare.cli import main

from .train.conftest import ROOT, TINY
from .train.test_cli import run_cli, snapshot

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs every case watches: an autoregressive transformer, a Mamba and a masked-diffusion one."""
    root = tmp_path_factory.mktemp("saved")
    short = ["train.max_steps=2", "train.warmup_steps=0", "train.checkpoint_every=1", "sample.tokens=0"]
    variants = {"ar": [], "mamba": ["model.layers=mamba", *short],
                "diffusion": ["model.objective=masked_diffusion", *short]}
    for name, overrides in variants.items():
        with contextlib.redirect_stdout(io.StringIO()):
            main(["train", str(TINY), f"run.dir={root / name}", *overrides])
    return {name: root / name for name in variants}


@dataclass
class Context:
    """What a case's setup gets: its own empty folder (also the cwd) and the saved runs to copy from."""

    tmp: Path
    runs: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def copy_run(self, name: str) -> tuple[Path, Path]:
        """A copy of a saved run (damage it, never the original) and the copy's latest checkpoint."""
        run = self.tmp / f"{name}-copy"
        shutil.copytree(self.runs[name], run)
        return run, sorted((run / "checkpoints").iterdir())[-1]

    def edit_meta(self, checkpoint: Path, **changes) -> None:
        meta = json.loads((checkpoint / "meta.json").read_text())
        meta.update(changes)
        (checkpoint / "meta.json").write_text(json.dumps(meta))

    def study(self, body: str, name: str = "study.yaml") -> Path:
        """A study file over the quickstart model; steps are short enough that no warmup check trips first."""
        base = (f"base: {{include: [{QUICKSTART}], train: {{warmup_steps: 0}}, run: {{wandb: disabled}}, "
                "sample: {tokens: 0}}\n")
        return self.write(name, base + body)


class CodeRunner:
    """Pickled, it would create `marker` when unpickled: a state.pt that must be refused, never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def pickle_payload(ctx: Context) -> Path:
    run, checkpoint = ctx.copy_run("ar")
    (checkpoint / "state.pt").write_bytes(pickle.dumps({"optimizer": CodeRunner(ctx.tmp / "payload-ran")}, protocol=2))
    return run


def train(*overrides: str) -> Callable[[Context], list]:
    """`archlab train tiny.yaml run.dir=<case dir>/run OVERRIDES`."""
    return lambda ctx: ["train", TINY, f"run.dir={ctx.tmp / 'run'}", *overrides]


def train_file(content: str) -> Callable[[Context], list]:
    return lambda ctx: ["train", ctx.write("bad.yaml", content), f"run.dir={ctx.tmp / 'run'}"]


def train_data(name: str, content: bytes) -> Callable[[Context], list]:
    return lambda ctx: train("data.sha256=null", f"data.path={ctx.write(name, content)}")(ctx)


def two_member_zip(ctx: Context) -> list:
    with zipfile.ZipFile(ctx.tmp / "two.zip", "w") as archive:
        archive.writestr("a.txt", "a" * 1000)
        archive.writestr("b.txt", "b" * 1000)
    return train("data.sha256=null", f"data.path={ctx.tmp / 'two.zip'}")(ctx)


def resume_with(damage: Callable[[Context, Path, Path], None], command: str = "eval") -> Callable[[Context], list]:
    """Damage a copy of the autoregressive run, then `archlab eval COPY` or `archlab train ... --resume`."""
    def setup(ctx: Context) -> list:
        run, checkpoint = ctx.copy_run("ar")
        damage(ctx, run, checkpoint)
        return ["eval", run] if command == "eval" else ["train", TINY, f"run.dir={run}", "--resume"]
    return setup


def truncate(file: str) -> Callable[[Context, Path, Path], None]:
    return lambda ctx, run, checkpoint: (checkpoint / file).write_bytes((checkpoint / file).read_bytes()[:1000])


def overwrite(file: str, content: bytes) -> Callable[[Context, Path, Path], None]:
    return lambda ctx, run, checkpoint: (checkpoint / file).write_bytes(content)


def mamba_weights_in_transformer_checkpoint(ctx: Context, run: Path, checkpoint: Path) -> None:
    mamba = sorted((ctx.runs["mamba"] / "checkpoints").iterdir())[-1]
    shutil.copyfile(mamba / "model.safetensors", checkpoint / "model.safetensors")


def stranger_state(ctx: Context, run: Path, checkpoint: Path) -> None:
    """A weights-only-loadable state.pt that archlab did not write: the keys the trainer restores are absent."""
    torch.save({"format_version": 1, "weights": torch.zeros(3)}, checkpoint / "state.pt")


def report_dir(study_json: str | None) -> Callable[[Context], list]:
    def setup(ctx: Context) -> list:
        (ctx.tmp / "study-out").mkdir()
        if study_json is not None:
            ctx.write("study-out/study.json", study_json)
        return ["report", ctx.tmp / "study-out"]
    return setup


def compare(body: str, *extra: str) -> Callable[[Context], list]:
    return lambda ctx: ["compare", ctx.study(body), "--out", ctx.tmp / "study-out", *extra]


def compare_into(prepare: Callable[[Path], None], *extra: str) -> Callable[[Context], list]:
    """A valid study, but --out already holds something that must not be touched."""
    def setup(ctx: Context) -> list:
        prepare(ctx.tmp / "out")
        return ["compare", ctx.study("budget: {flops: 1.0e9}\narms: {a: {}}\n"), "--out", ctx.tmp / "out", *extra]
    return setup


def env(setup: Callable[[Context], list], **variables: str | None) -> Callable[[Context], list]:
    """Run `setup` with environment variables set (a value) or removed (None); paths are relative to the case."""
    def with_env(ctx: Context) -> list:
        for name, value in variables.items():
            if value is None:
                ctx.monkeypatch.delenv(name, raising=False)
            else:
                ctx.monkeypatch.setenv(name, str(ctx.tmp / value))
        return setup(ctx)
    return with_env


STUDY_OK = "budget: {flops: 1.0e9}\n"
CASES = [
    # -- config files -------------------------------------------------------------------------------
    ("yaml: unclosed flow mapping", train_file("model: {d_model: 32\n"), "is not valid YAML at line"),
    ("yaml: tab indentation", train_file("model:\n\td_model: 32\n"), "is not valid YAML"),
    ("yaml: a list, not sections", train_file("- model\n- train\n"), "must be a mapping of sections"),
    ("yaml: include of a missing file", train_file("include: [nowhere.yaml]\n"), "nowhere.yaml not found"),
    ("yaml: include that is a number", train_file("include: 3\n"), "include must be a file name"),
    ("yaml: unknown section", train_file("optimizer: {lr: 1}\n"), "unknown key optimizer"),
    ("yaml: another codebase's key name", train_file("model: {n_embd: 64}\n"),
     "unknown key model.n_embd; did you mean model.d_model?"),
    ("yaml: list where an int goes", train_file("train: {batch_size: [8]}\n"),
     "train.batch_size: input should be a valid integer"),
    ("override: section given a value", train("model=3"), "model: input should be a valid dictionary"),
    ("override: no =", train("train.lr"), "must look like section.key=value"),
    ("override: key below a value", train("train.lr.peak=1"), "train.lr is a value, not a section"),
    ("override: not a boolean", train("train.compile=maybe"), "train.compile: input should be a valid boolean"),
    ("override: unknown device", train("train.device=tpu"), "train.device: input should be"),
    ("range: beta2 of 1", train("train.beta2=1"), "train.beta2: input should be less than 1"),
    ("range: conv width 5", train("model.layers=mamba", "model.mamba.d_conv=5"), "model.mamba.d_conv"),
    ("range: negative temperature", train("sample.temperature=-1"), "sample.temperature"),
    ("range: val + test fractions reach 1", train("data.val_fraction=0.6", "data.test_fraction=0.5"),
     "val_fraction + test_fraction must be below 1"),
    ("range: micro batch not dividing batch", train("train.micro_batch_size=3"), "must divide batch_size=8"),
    ("range: kv heads not dividing heads", train("model.attention.n_kv_heads=3"),
     "model.attention.n_kv_heads=3 must divide model.attention.n_heads=2"),
    ("range: odd head dim for RoPE", train("model.d_model=30"), "must be even for RoPE"),
    ("range: dt_min above dt_max", train("model.layers=mamba", "model.mamba.dt_min=0.5"),
     "model.mamba.dt_min=0.5 must not exceed"),
    ("range: Mamba-2 heads not dividing the inner width", train("model.layers=mamba2", "model.mamba2.head_dim=48"),
     "model.mamba2.head_dim=48 does not divide the inner width expand * d_model = 64"),
    ("range: Mamba-2 groups not dividing the heads", train("model.layers=mamba2", "model.mamba2.head_dim=16",
                                                          "model.mamba2.n_groups=3"),
     "model.mamba2.n_groups=3 does not divide the 4 heads"),
    ("range: Mamba-2 chunk not a power of two", train("model.layers=mamba2", "model.mamba2.chunk_size=100"),
     "model.mamba2.chunk_size=100 must be a power of two"),
    # -- impossible architecture combinations -------------------------------------------------------
    ("arch: causal masked diffusion", train("model.objective=masked_diffusion", "model.causal=true"),
     "objective masked_diffusion needs a bidirectional backbone"),
    ("arch: bidirectional next_latent jepa", train("model.objective=jepa", "model.causal=false"),
     "objective jepa needs a causal backbone"),
    ("arch: masked_span jepa with a next-byte loss",
     train("model.objective=jepa", "model.jepa.mode=masked_span", "model.jepa.ar_weight=1"), "needs mode=next_latent"),
    ("arch: masked_span jepa asked to sample",
     train("model.objective=jepa", "model.jepa.mode=masked_span", "model.jepa.spans=1", "model.jepa.span_length=[2,4]"),
     "cannot generate text with these model settings"),
    ("arch: jepa spans hiding the whole window", train("model.objective=jepa", "model.jepa.mode=masked_span",
                                                       "sample.tokens=0"), "could hide all of data.seq_len=32"),
    ("arch: jepa offset beyond the window", train("model.objective=jepa", "model.jepa.offsets=[40]"),
     "exceeds data.seq_len=32"),
    ("arch: jepa offset 0", train("model.objective=jepa", "model.jepa.offsets=[0]"), "distinct positive integers"),
    ("arch: jepa span min above max", train("model.objective=jepa", "model.jepa.span_length=[5,2]"),
     "must be [min, max]"),
    ("arch: jepa with no loss", train("model.objective=jepa", "model.jepa.latent_weight=0"), "nothing would train"),
    ("arch: unknown jepa key", train("model.objective=jepa", "model.jepa.horizon=4"), "unknown key model.jepa.horizon"),
    ("arch: unknown mixer in the pattern", train("model.layers=mamba*2,atention"),
     "unknown mixer 'atention'; did you mean 'attention'?"),
    ("arch: empty pattern", train("model.layers="), "model.layers is empty"),
    ("arch: malformed pattern", train("model.layers=(mamba*2,attention"), "a '(' is not closed"),
    ("arch: repeat count 0", train("model.layers=mamba*0"), "a repeat count must be at least 1"),
    ("arch: n_layers disagreeing with the pattern", train("model.layers=mamba,attention", "model.n_layers=3"),
     "model.n_layers=3 disagrees with model.layers 'mamba,attention' (2 blocks)"),
    ("arch: settings of an unused mixer", train("model.mamba.d_state=4"), "no layer uses mamba"),
    ("arch: sliding window below 1", train("model.attention.window=0"),
     "model.attention.window: input should be greater than or equal to 1"),
    ("arch: sliding window in a bidirectional model", train("model.objective=masked_diffusion", "model.layers=swa"),
     "model.swa.window=128: a sliding window is defined for causal attention only here"),
    ("arch: old hybrid without attention layers", train("model.backbone=hybrid"), "needs model.attn_layers"),
    ("arch: old hybrid attention layer out of range", train("model.backbone=hybrid", "model.attn_layers=[5]"),
     "attn_layers [5] outside 0..1"),
    ("arch: old attention layers on a transformer", train("model.attn_layers=[0]"),
     "attn_layers is for backbone=hybrid"),
    ("arch: old and new stack keys together", train("model.layers=mamba", "model.backbone=mamba"),
     "old form of model.layers"),
    ("arch: diffusion steps on an autoregressive run", train("sample.steps=4"),
     "sample.steps does not apply to objective autoregressive"),
    ("arch: diffusion sample longer than its window", train("model.objective=masked_diffusion", "sample.tokens=40"),
     "must fit in data.seq_len=32"),
    pytest.param("arch: block strategy without a block size",
                 train("model.objective=masked_diffusion", "train.max_steps=1", "train.warmup_steps=0",
                       "sample.tokens=8", "sample.strategy=block"), "block_size"),
    pytest.param("arch: block size without the block strategy",
                 train("model.objective=masked_diffusion", "train.max_steps=1", "train.warmup_steps=0",
                       "sample.tokens=8", "sample.block_size=4"), "block_size"),
    ("arch: block diffusion block not tiling the sequence",
     train("model.objective=block_diffusion", "model.block_diffusion.block_size=5"),
     "model.block_diffusion.block_size=5 must divide the sequence length 32 (data.seq_len)"),
    ("arch: block diffusion on a recurrent mixer", train("model.objective=block_diffusion", "model.layers=mamba"),
     "which mixer mamba cannot (it reads its inputs in order); use mixers that can: attention"),
    ("arch: block diffusion on a hybrid", train("model.objective=block_diffusion", "model.layers=mamba,attention"),
     "which mixer mamba cannot"),
    ("arch: block diffusion on the Triton attention kernel",
     train("model.objective=block_diffusion", "kernels.attention=triton"), "set kernels.attention=auto or torch"),
    ("arch: block diffusion clip range reversed",
     train("model.objective=block_diffusion", "model.block_diffusion.clip_min=0.8",
           "model.block_diffusion.clip_max=0.3"),
     "clip_min=0.8 must be below clip_max=0.3"),
    ("arch: block strategy on block diffusion", train("model.objective=block_diffusion", "sample.tokens=8",
                                                      "sample.strategy=block", "sample.block_size=4"),
     "sample.block_size does not apply to objective block_diffusion"),
    # -- data files -------------------------------------------------------------------------------------
    ("data: missing absolute path", train("data.sha256=null", "data.path=/nonexistent/corpus.txt"),
     "/nonexistent/corpus.txt does not exist"),
    ("data: relative path in no data root", env(train("data.sha256=null", "data.path=corpus.txt"),
                                                ARCHLAB_DATA="data-root"), "is not in any data root"),
    ("data: empty file", train_data("empty.bin", b""), "is empty"),
    ("data: a directory", lambda ctx: train("data.sha256=null", f"data.path={ctx.tmp}")(ctx), "is a directory"),
    ("data: shorter than one window", train_data("short.bin", b"\x00\xff" * 10), "data.seq_len=32 needs 33 tokens"),
    ("data: checksum mismatch", train("data.sha256=" + "ab" * 32), "but data.sha256 is abab"),
    ("data: test split too small", train("data.test_fraction=0.000001"), "test split of tinyshakespeare.txt has only"),
    ("data: window longer than the corpus", train("data.seq_len=2000000"), "data.seq_len=2000000 needs"),
    ("data: eval tokens below one window", train("train.eval_tokens=16"), "no window fits"),
    ("data: zip of two files", two_member_zip, "holds 2 files, not one"),
    pytest.param("data: gzip that is not", train_data("corpus.gz", b"not gzip" * 100), "not a valid .gz archive"),
    pytest.param("data: xz of nothing", train_data("empty.xz", lzma.compress(b"")), "empty.xz"),
    # -- checkpoints ------------------------------------------------------------------------------------
    ("ckpt: truncated weights, resume", resume_with(truncate("model.safetensors"), "train"), "corrupted, truncated"),
    ("ckpt: random bytes as weights", resume_with(overwrite("model.safetensors", os.urandom(4096))),
     "corrupted, truncated"),
    # eval reads the weights only; a damaged state.pt matters to a resume
    ("ckpt: truncated state, resume", resume_with(truncate("state.pt"), "train"), "corrupted, truncated"),
    ("ckpt: empty state, resume", resume_with(overwrite("state.pt", b""), "train"), "corrupted, truncated"),
    ("ckpt: code-running pickle, resume", lambda ctx: ["train", TINY, f"run.dir={pickle_payload(ctx)}", "--resume"],
     "corrupted, truncated"),
    ("ckpt: another format version", resume_with(lambda ctx, run, ck: ctx.edit_meta(ck, format_version=999)),
     "has format version 999, this archlab reads version 1"),
    ("ckpt: no format version", resume_with(lambda ctx, run, ck: ctx.edit_meta(ck, format_version=None)),
     "has format version None"),
    ("ckpt: meta.json not JSON", resume_with(overwrite("meta.json", b"{step: 12")), "corrupted or incomplete"),
    ("ckpt: meta.json missing", resume_with(lambda ctx, run, ck: (ck / "meta.json").unlink()),
     "corrupted or incomplete"),
    ("ckpt: mamba run's checkpoint into a transformer",
     lambda ctx: ["eval", ctx.copy_run("ar")[0], "--checkpoint", ctx.copy_run("mamba")[1]],
     "different architecture (model.layers: 'mamba' in checkpoint vs 'transformer'"),
    ("ckpt: mamba weights under transformer meta", resume_with(mamba_weights_in_transformer_checkpoint),
     "does not fit this model"),
    pytest.param("ckpt: state.pt archlab did not write", resume_with(stranger_state, "train"), "state.pt"),
    ("ckpt: resume with another config", lambda ctx: ["train", TINY, f"run.dir={ctx.copy_run('ar')[0]}",
                                                      "model.d_model=64", "--resume"], "with a different config"),
    ("ckpt: run's config.yaml damaged", resume_with(lambda ctx, run, ck: (run / "config.yaml").write_text("model: [")),
     "is not valid YAML"),
    ("ckpt: --checkpoint not a checkpoint", lambda ctx: ["eval", ctx.runs["ar"], "--checkpoint", ctx.tmp],
     "is not a checkpoint directory"),
    # -- CLI arguments ------------------------------------------------------------------------------
    ("cli: no command", lambda ctx: [], "the following arguments are required: command"),
    ("cli: unknown option", train("--fast"), "unrecognized arguments: --fast"),
    ("cli: eval of an unknown split", lambda ctx: ["eval", ctx.runs["ar"], "--split", "dev"], "invalid choice"),
    ("cli: eval of an empty split", lambda ctx: ["eval", ctx.runs["ar"], "--split", "test"], "test split"),
    ("cli: eval of a file", lambda ctx: ["eval", ctx.write("notes.txt", "x")], "not a run directory"),
    ("cli: sample tokens not a number", lambda ctx: ["sample", ctx.runs["ar"], "--tokens", "many"],
     "argument --tokens: invalid int value"),
    ("cli: sample top-k above the vocabulary", lambda ctx: ["sample", ctx.runs["ar"], "--top-k", "257"], "top_k"),
    ("cli: sample negative temperature", lambda ctx: ["sample", ctx.runs["ar"], "--temperature", "-1"],
     "temperature"),
    ("cli: sample of a directory without a run", lambda ctx: ["sample", ctx.tmp], "not a run directory"),
    ("cli: diffusion sample unknown strategy",
     lambda ctx: ["sample", ctx.runs["diffusion"], "--strategy", "zigzag", "--tokens", "8"], "strategy"),
    pytest.param("cli: diffusion block strategy without a size",
                 lambda ctx: ["sample", ctx.runs["diffusion"], "--strategy", "block", "--tokens", "8"], "block"),
    pytest.param("cli: diffusion block size not dividing tokens",
                 lambda ctx: ["sample", ctx.runs["diffusion"], "--strategy", "block", "--block-size", "3",
                              "--tokens", "8"], "block"),
    ("cli: decode bench with one run", lambda ctx: ["bench", "decode", ctx.runs["diffusion"]],
     "takes run directories: masked_diffusion and/or block_diffusion runs and one autoregressive run"),
    ("cli: decode bench with two AR runs",
     lambda ctx: ["bench", "decode", ctx.runs["ar"], ctx.runs["diffusion"], ctx.runs["mamba"]],
     "needs exactly one autoregressive run (it scores every sample), got 2"),
    ("cli: inference bench without runs", lambda ctx: ["bench", "inference"], "takes one or more run directories"),
    ("cli: inference bench context within the new tokens",
     lambda ctx: ["bench", "inference", ctx.runs["ar"], ctx.runs["diffusion"], "--contexts", "8,64",
                  "--new-tokens", "8"], "every context must exceed --new-tokens=8"),
    # -- studies: archlab compare / report ----------------------------------------------------------
    ("compare: missing study", lambda ctx: ["compare", ctx.tmp / "nope.yaml"], "study file"),
    ("compare: invalid YAML", compare("arms: {a: {}\n"), "is not valid YAML"),
    ("compare: study is a list", lambda ctx: ["compare", ctx.write("list.yaml", "- a\n")], "must be a mapping"),
    ("compare: unknown top-level key", compare(STUDY_OK + "arms: {a: {}}\nsteps: 4\n"), "steps"),
    ("compare: unknown arm section", compare(STUDY_OK + "arms: {a: {optimizer: {lr: 1}}}\n"),
     "arm a: unknown section 'optimizer'"),
    pytest.param("compare: two budget kinds", compare("budget: {flops: 1.0e9, tokens: 1000}\narms: {a: {}}\n"),
                 "exactly one of flops, tokens, seconds"),
    ("compare: no budget", compare("arms: {a: {}}\n"), "needs a budget"),
    ("compare: match to an unknown arm", compare(STUDY_OK + "arms: {a: {}, b: {match: {to: zz}}}\n"),
     "match.to='zz' must name another arm"),
    ("compare: arm name with a slash", compare(STUDY_OK + "arms: {'a/b': {}}\n"), "name 'a/b' may hold only"),
    ("compare: repeated seeds", compare(STUDY_OK + "seeds: [0, 0]\narms: {a: {}}\n"), "repeat a value"),
    ("compare: impossible arm config", compare(STUDY_OK + "arms: {a: {model: {attention: {n_heads: 5}}}}\n"),
     "n_heads=5 does not divide model.d_model"),
    ("compare: arm data file missing", compare(STUDY_OK + "arms: {a: {data: {path: nosuch.txt, sha256: null}}}\n"),
     "nosuch.txt"),
    ("compare: synthetic without settings", compare("kind: synthetic\narms: {a: {}}\n"), "needs a synthetic: section"),
    ("compare: synthetic mixture setting with too many keys", lambda ctx: ["compare", ctx.write("mix.yaml", (
        "study: mix\nkind: synthetic\narms: {a: {}}\nsynthetic: {widths: [16], steps: 1, batch_size: 2, lr: 1.0e-3, "
        "tasks: [{task: mqar, train: [{seq_len: 16, n_pairs: 2}, {seq_len: 16, n_pairs: 8}], train_examples: 4, "
        "test_examples: 2}]}\n")), "--out", ctx.tmp / "mix-out"],
     "train setting L16×8: mqar needs seq_len >= 4 * n_pairs"),
    ("compare: --out not empty, no study", compare_into(lambda out: (out.mkdir(), (out / "notes.txt").write_text("x"))),
     "is not empty and holds no study"),
    ("compare: --out is a file", compare_into(lambda out: out.write_text("x")), "is a file"),
    ("compare: --out holds results", compare_into(lambda out: (out.mkdir(), (out / "study.json").write_text(
        json.dumps({"study": "study", "runs": []})))), "pass --resume"),
    ("compare: --resume into another study", compare_into(lambda out: (out.mkdir(), (out / "study.json").write_text(
        json.dumps({"study": "other", "runs": []}))), "--resume"), "holds another study"),
    ("report: no study.json", report_dir(None), "study.json not found"),
    ("report: study.json not JSON", report_dir("{runs: "), "is not valid JSON"),
    ("report: study.json a list", report_dir("[1, 2]"), "lacks the study name or a runs list"),
    ("report: no finished run", report_dir(json.dumps({"study": "s", "runs": [{"status": "failed"}]})),
     "no finished run"),
    pytest.param("report: a run entry not a mapping", report_dir(json.dumps({"study": "s", "runs": [1]})),
                 "study.json"),
    pytest.param("report: finished run without run_dir",
                 report_dir(json.dumps({"study": "s", "runs": [{"status": "finished"}]})), "run_dir"),
    # -- environment --------------------------------------------------------------------------------
    pytest.param("env: train.device=cuda", train("train.device=cuda"), "no CUDA device", marks=NO_CUDA),
    pytest.param("env: eval --device cuda", lambda ctx: ["eval", ctx.runs["ar"], "--device", "cuda"],
                 "no CUDA device", marks=NO_CUDA),
    pytest.param("env: study arm on cuda", compare(STUDY_OK + "arms: {a: {train: {device: cuda}}}\n"),
                 "no CUDA device", marks=NO_CUDA),
    pytest.param("env: GPU-only scan backend", train("model.layers=mamba", "kernels.selective_scan=peer"),
                 "kernels.selective_scan: the 'peer' backend", marks=NO_CUDA),
    ("env: wandb online without credentials",
     env(train("run.wandb=online"), WANDB_API_KEY=None, WANDB_MODE=None, NETRC="no-netrc"), "run.wandb=online"),
]


def _files(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """snapshot() plus modification times: rewriting a file with the same bytes also counts as a change."""
    return {name: (data, (folder / name).stat().st_mtime_ns) for name, data in snapshot(folder).items()}


def _as_param(case):
    """A table row (id, setup, message) or pytest.param(id, setup, message, marks=...) as a pytest parameter."""
    values, marks = (case.values, case.marks) if hasattr(case, "marks") else (case, ())
    return pytest.param(*values[1:], id=values[0], marks=marks)


PARAMS = [_as_param(case) for case in CASES]


@pytest.mark.parametrize(("setup", "message"), PARAMS)
def test_bad_input_is_refused_cleanly(setup, message, saved_runs, tmp_path, monkeypatch, capsys):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    monkeypatch.chdir(case_dir)  # the default run dir runs/default would appear here
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))  # decompressed data would appear here
    argv = setup(Context(case_dir, saved_runs, monkeypatch))
    watched = {"case": _files(case_dir), "saved": _files(saved_runs["ar"].parent)}

    code, out, err = run_cli(capsys, *argv)

    lines = err.splitlines()
    assert code == 2, f"exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line: {err!r}"
    assert message in lines[0], f"{message!r} not in {lines[0]!r}"
    assert "Traceback" not in out + err
    assert "function-after[" not in lines[0], "pydantic's internal validator name leaks into the message"
    assert not (case_dir / "payload-ran").exists(), "the pickled payload ran"
    assert {"case": _files(case_dir), "saved": _files(saved_runs["ar"].parent)} == watched, "files written or changed"
    assert not (tmp_path / "cache").exists(), "the data cache was written"


def test_the_pickle_payload_would_run_code(tmp_path):
    """The refused state.pt is a real threat: plain unpickling runs it (here, harmlessly creating a file)."""
    pickle.loads(pickle.dumps(CodeRunner(tmp_path / "ran"), protocol=2))
    assert (tmp_path / "ran").exists()


def test_table_is_large_and_covers_every_source():
    ids = [param.id for param in PARAMS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40
    for kind in ("yaml", "override", "range", "arch", "data", "ckpt", "cli", "compare", "report", "env"):
        assert any(i.startswith(f"{kind}:") for i in ids), kind
