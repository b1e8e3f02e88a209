"""`archlab bench decode`: the study's metrics, rows, report and plot (with the AR model standing in for a
diffusion sampler), end to end on masked and block diffusion runs, and every bad input to the command."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from archlab.compare.decode_bench import (
    bench_decode,
    check_runs,
    default_block_size,
    generative_bpb,
    step_grid,
    to_markdown,
    unigram_entropy_bits,
    val_prompts,
    write_results,
)
from archlab.train.config import load_config
from archlab.train.loading import load_run
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from ..train.test_cli import run_cli

N_TOKENS, PROMPT_LEN, SAMPLES = 16, 8, 3  # tiny.yaml: data.seq_len = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(run_dir, *overrides):
    trainer = Trainer(load_config(TINY, [f"run.dir={run_dir}", "train.max_steps=6", *overrides]))
    trainer.train()
    return run_dir


@pytest.fixture(scope="module")
def ar_run(tmp_path_factory, one_thread):
    return _train(tmp_path_factory.mktemp("decode") / "ar")


def _load(run_dir):
    return load_run(run_dir, "cpu")


class StandInDiffusion:
    """The diffusion sampler's interface on top of the AR sampler; rejects `block` below n_tokens steps."""

    strategies = ("ancestral", "confidence", "block")

    def __init__(self, ar):
        self.ar, self.last_sample_stats = ar, None

    def sample(self, model, prompt, n_tokens, *, temperature=1.0, top_k=None, generator=None, context_len=None,
               steps=None, strategy="ancestral", block_size=None):
        assert model.objective is self and temperature == 1.0 and steps is not None
        if strategy == "block" and steps < n_tokens:
            raise ValueError(f"block: {steps} steps are too few\nsecond line")
        out = self.ar.model.objective.sample(self.ar.model, prompt, n_tokens, temperature=temperature, top_k=top_k,
                                             generator=generator, context_len=context_len)
        self.last_sample_stats = {"network_evals": steps, "steps": steps}
        return out


def test_step_grid_and_entropy():
    assert step_grid(96) == [8, 16, 32, 64, 96]
    assert step_grid(16) == [8, 16] and step_grid(64) == [8, 16, 32, 64] and step_grid(5) == [5]
    assert [default_block_size(n) for n in (96, 16, 30, 7, 1)] == [24, 4, 6, 1, 1]
    rows = torch.stack([torch.full((256,), 7), torch.arange(256), torch.tensor([1, 2] * 128)])
    assert unigram_entropy_bits(rows[:1]) == 0.0
    assert unigram_entropy_bits(rows[1:2]) == pytest.approx(8.0)
    assert unigram_entropy_bits(rows) == pytest.approx((0 + 8 + 1) / 3)


def test_val_prompts_are_fixed_windows():
    val = np.arange(100, dtype=np.uint8)
    prompts, continuations = val_prompts(val, 3, 4, 6)
    assert prompts.tolist() == [[0, 1, 2, 3], [45, 46, 47, 48], [90, 91, 92, 93]]
    assert continuations[2].tolist() == [94, 95, 96, 97, 98, 99]
    assert torch.equal(val_prompts(val, 3, 4, 6)[0], prompts)
    with pytest.raises(Exception, match="fewer than prompt"):
        val_prompts(val, 3, 50, 60)


def test_generative_bpb_scores_only_generated_bytes(ar_run):
    ar = _load(ar_run)
    prompts, generated = torch.randint(0, 256, (2, 5)), torch.randint(0, 256, (2, 7))
    tokens = torch.cat([prompts, generated], dim=1)
    with torch.no_grad():
        logp = torch.log_softmax(ar.model.objective.logits(ar.model, tokens[:, :-1]), dim=-1)
    nll = -sum(logp[b, i - 1, tokens[b, i]] for b in range(2) for i in range(5, 12)) / 14
    assert generative_bpb(ar, prompts, generated) == pytest.approx(float(nll) / math.log(2), rel=1e-5)


def stand_in(ar, objective="masked_diffusion"):
    cfg = SimpleNamespace(model=SimpleNamespace(objective=objective), run=SimpleNamespace(dir="runs/stand-in"),
                          data=ar.cfg.data)
    return SimpleNamespace(model=SimpleNamespace(objective=StandInDiffusion(ar)), device=ar.device, cfg=cfg)


def test_decode_study_report_and_plot(ar_run, tmp_path):
    import matplotlib.image

    ar = _load(ar_run)
    result = bench_decode([stand_in(ar)], ar, n_tokens=N_TOKENS, samples=SAMPLES, prompt_len=PROMPT_LEN)
    rows = result["rows"]
    md = "masked_diffusion"
    assert [(r["model"], r["strategy"], r["steps"]) for r in rows] == [
        (md, "ancestral", 8), (md, "ancestral", 16), (md, "confidence", 8), (md, "confidence", 16), (md, "block", 8),
        (md, "block", 16), ("autoregressive", "kv-cache", 16), ("data", "val continuation", None)]
    assert {r["run"] for r in rows[:-1]} == {"stand-in", ar_run.name}
    block_8 = rows[4]
    assert block_8["error"] == "block: 8 steps are too few" and "generative_bpb" not in block_8
    ok = [r for r in rows if "error" not in r]
    ar_row, data_row = rows[-2], rows[-1]
    assert ar_row["network_evals_per_token"] == 1.0 and ar_row["tokens_per_s"] > 0
    for row in ok[:-2]:
        assert row["network_evals_per_token"] == row["steps"] / N_TOKENS and row["tokens_per_s"] > 0
        assert row["steps_taken"] == row["steps"] and "speedup_vs_mdlm" not in row
        assert row["speed_vs_ar"] == round(row["tokens_per_s"] / ar_row["tokens_per_s"], 3)
        # the stand-in draws the AR model's samples with the same seed: the same bytes, so the same scores
        assert row["generative_bpb"] == ar_row["generative_bpb"]
        assert row["unigram_entropy_bits"] == ar_row["unigram_entropy_bits"]
    for row in ok:
        assert 0 < row["generative_bpb"] < 12 and 0 < row["unigram_entropy_bits"] <= math.log2(N_TOKENS)
    assert data_row["tokens_per_s"] is None and data_row["generative_bpb"] < ar_row["generative_bpb"] + 4
    assert result["temperature"] == 1.0 and result["samples"] == SAMPLES and result["n_tokens"] == N_TOKENS
    assert any("scored by itself" in note for note in result["notes"])

    json_path, md_path, png_path = write_results(result, tmp_path / "results")
    assert json_path.name.startswith("decode-cpu") and json_path.stem == md_path.stem == png_path.stem
    assert json.loads(json_path.read_text())["rows"] == rows
    markdown = md_path.read_text()
    assert markdown == to_markdown(result, png_path.name) and "failed: block: 8 steps are too few" in markdown
    assert f"]({png_path.name})" in markdown and "temperature 1.0" in markdown
    image = matplotlib.image.imread(png_path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(
        p.name for p in (json_path, md_path, png_path))  # no temporary files left


def test_cli_writes_the_report(capsys, ar_run, tmp_path, monkeypatch):
    """`archlab bench decode` end to end, with the stand-in as the diffusion run (load_pair is checked below)."""
    import archlab.compare.decode_bench as decode_bench

    def stand_in_runs(run_dirs, device, *, n_tokens, prompt_len):
        assert (run_dirs, device, n_tokens, prompt_len) == ([str(ar_run)] * 2, "cpu", N_TOKENS, PROMPT_LEN)
        ar = _load(run_dirs[1])
        return [stand_in(ar)], ar

    monkeypatch.setattr(decode_bench, "load_runs", stand_in_runs)
    out = tmp_path / "results"
    code, stdout, err = run_cli(capsys, "bench", "decode", ar_run, ar_run, "--tokens", N_TOKENS, "--samples", 2,
                                "--prompt-len", PROMPT_LEN, "--device", "cpu", "--out", out, "--denoising-steps", "4")
    assert code == 0, err
    (json_path,) = out.glob("decode-*.json")
    assert f"wrote {json_path}" in stdout and f"| autoregressive | {ar_run.name} | kv-cache | 16 |" in stdout
    result = json.loads(json_path.read_text())
    assert result["samples"] == 2 and json_path.with_suffix(".png").is_file()
    assert {r["steps"] for r in result["rows"] if r["model"] == "masked_diffusion"} == {4}


def test_bad_inputs(capsys, ar_run, tmp_path):
    code, _, err = run_cli(capsys, "bench", "decode", ar_run, ar_run, "--out", tmp_path / "out")
    assert code == 2 and "exactly one autoregressive run (it scores every sample), got 2" in err
    assert len(err.splitlines()) == 1
    code, _, err = run_cli(capsys, "bench", "decode", tmp_path / "nowhere", ar_run)
    assert code == 2 and "not a run directory" in err
    code, _, err = run_cli(capsys, "bench", "decode", ar_run)
    assert code == 2 and "takes run directories" in err
    assert not (tmp_path / "out").exists()

    def cfg(objective, seq_len=32):
        return SimpleNamespace(model=SimpleNamespace(objective=objective), data=SimpleNamespace(seq_len=seq_len),
                               run=SimpleNamespace(dir="runs/x"))

    check_runs([cfg("masked_diffusion"), cfg("autoregressive")], 24, 8)
    check_runs([cfg("autoregressive"), cfg("block_diffusion"), cfg("masked_diffusion")], 24, 8)
    with pytest.raises(Exception, match="exactly one autoregressive run .*, got 0"):
        check_runs([cfg("masked_diffusion"), cfg("masked_diffusion")], 16, 8)
    with pytest.raises(Exception, match="at least one masked_diffusion or block_diffusion run"):
        check_runs([cfg("autoregressive")], 16, 8)
    with pytest.raises(Exception, match="trained model.objective=jepa, which bench decode does not sample"):
        check_runs([cfg("jepa"), cfg("autoregressive")], 16, 8)
    with pytest.raises(Exception, match=r"differ in data.seq_len \(32, 64\)"):
        check_runs([cfg("masked_diffusion", 64), cfg("autoregressive")], 16, 8)
    with pytest.raises(Exception, match="must be >= 2 bytes and fit in data.seq_len=32"):
        check_runs([cfg("masked_diffusion"), cfg("autoregressive")], 25, 8)


def test_decode_bench_end_to_end(capsys, ar_run, tmp_path):
    diffusion_run = _train(tmp_path / "diffusion", "model.objective=masked_diffusion", "sample.tokens=0")
    block_run = _train(tmp_path / "block", "model.objective=block_diffusion", "model.block_diffusion.block_size=4",
                       "sample.tokens=0")
    out = tmp_path / "results"
    code, stdout, err = run_cli(capsys, "bench", "decode", diffusion_run, ar_run, block_run, "--tokens", N_TOKENS,
                                "--samples", 2, "--prompt-len", PROMPT_LEN, "--device", "cpu", "--out", out)
    assert code == 0, err
    (json_path,) = out.glob("decode-*.json")
    result = json.loads(json_path.read_text())
    assert str(json_path) in stdout and json_path.with_suffix(".png").is_file()
    assert {name: run["objective"] for name, run in result["runs"].items()} == {
        "diffusion": "masked_diffusion", "block": "block_diffusion", ar_run.name: "autoregressive"}
    rows = {(r["model"], r["strategy"], r["steps"]): r for r in result["rows"]}
    for model in ("masked_diffusion", "block_diffusion"):
        for strategy in ("ancestral", "confidence"):
            for steps in (8, 16):
                row = rows[(model, strategy, steps)]
                assert "error" not in row, row
                assert row["tokens_per_s"] > 0 and 0 < row["generative_bpb"] < 16
                assert 0 < row["network_evals_per_token"] <= 2 * steps / N_TOKENS + 1
    assert ("block_diffusion", "block", 8) not in rows  # block diffusion has no `block` strategy
    # 16 bytes after an 8-byte prompt in blocks of 4: 4 blocks to generate, so 8 steps take 2 per block
    block_8 = rows[("block_diffusion", "confidence", 8)]
    assert block_8["block_size"] == 4 and block_8["steps_taken"] == 8
    assert block_8["network_evals_per_token"] == 8 / N_TOKENS  # one pass a step: the cache fills ride along
    assert block_8["speedup_vs_mdlm"] == round(
        block_8["tokens_per_s"] / rows[("masked_diffusion", "confidence", 8)]["tokens_per_s"], 2)
    assert rows[("autoregressive", "kv-cache", N_TOKENS)]["network_evals_per_token"] == 1.0
    assert any("masked diffusion run's tokens/s" in line for line in result["reading"])
