"""`archlab bench inference`: measured decoding state against the mixers' analytic count (attention linear in the
context, a recurrence flat), decoding from the prefilled state is the real forward, the files, and bad input."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
import yaml

from archlab.compare import inference_bench
from archlab.compare.inference_bench import (
    INFERENCE_FILE,
    bench_runs,
    cache_bytes,
    check_runs,
    decode_with_cache,
    inference_cost,
    inference_section,
    load_runs,
    measure_cache_decoding,
    measure_run_inference,
    random_prompt,
    write_results,
)
from archlab.archs.model import inference
from archlab.train.config import load_config
from archlab.train.errors import UserError
from archlab.train.loading import load_run
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from ..train.test_cli import run_cli

N_TOKENS = 4  # tiny.yaml: data.seq_len = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(run_dir, *overrides):
    Trainer(load_config(TINY, [f"run.dir={run_dir}", "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2",
                               "train.checkpoint_every=2", "train.eval_tokens=256", *overrides])).train()
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("inference")
    return {"attention": _train(root / "attention"),
            "mamba": _train(root / "mamba", "model.layers=mamba"),
            "diffusion": _train(root / "diffusion", "model.objective=masked_diffusion")}


def test_attention_cache_grows_linearly_and_a_recurrent_state_is_flat(runs):
    measured = {}
    for name in ("attention", "mamba"):
        run = load_run(runs[name], "cpu")
        rows = [measure_cache_decoding(run, context, 2, N_TOKENS, repeats=1) for context in (8, 16, 64)]
        assert all(row["cache_bytes"] == row["state_bytes"] > 0 for row in rows)  # measured == analytic
        assert all(row["peak_bytes"] >= row["decode_peak_bytes"] >= row["cache_bytes"] for row in rows)
        measured[name] = [(row["cache_bytes"], row["decode_peak_bytes"]) for row in rows]
    kv = [cache for cache, _ in measured["attention"]]
    assert kv[1] == 2 * kv[0] and kv[2] == 8 * kv[0]  # keys + values of every position
    assert measured["attention"][2][1] > kv[2] > measured["attention"][0][1]  # decoding memory grows with it
    assert len(set(measured["mamba"])) == 1  # a fixed-size state and fixed step transients, whatever the context


def test_decoding_from_the_prefilled_state_matches_a_full_forward(runs):
    for name in ("attention", "mamba"):
        run = load_run(runs[name], "cpu")
        model, prompt = run.model, random_prompt(run, 2, 12)
        with inference(model):
            cache, tokens, last, _, _ = decode_with_cache(model, prompt, N_TOKENS)
            full = model.objective.logits(model, torch.cat([prompt, tokens], dim=1))[:, -1]
        assert tokens.shape == (2, N_TOKENS) and all(layer.length == 12 + N_TOKENS for layer in cache)
        torch.testing.assert_close(last, full, atol=1e-4, rtol=1e-4)


def test_cache_bytes_counts_shared_storage_once():
    buffer = torch.zeros(4, 8)
    state = SimpleNamespace(a=buffer, view=buffer[1:], nested=[{"b": torch.zeros(3, dtype=torch.float64)}], n=3)
    assert cache_bytes([state]) == 4 * 8 * 4 + 3 * 8


def test_files_cost_and_the_run_file(runs, tmp_path):
    result = bench_runs([str(runs["attention"]), str(runs["diffusion"])], contexts=[8, 16], batch_sizes=[1],
                        n_tokens=N_TOKENS, repeats=1, device="cpu")
    rows = result["rows"]
    assert [r["decoding"] for r in result["runs"]] == ["cache", "diffusion"] and not any("error" in r for r in rows)
    diffusion = [r for r in rows if r["decoding"] == "diffusion"]
    assert {r["steps"] for r in diffusion} == {N_TOKENS} and all(r["cache_bytes"] is None for r in diffusion)
    assert len(rows) == 2 * 2 and all(r["peak_bytes"] > 0 for r in rows)
    json_path, md_path, png_path = write_results(result, tmp_path / "out")
    assert sorted((tmp_path / "out").iterdir()) == sorted([json_path, md_path, png_path])
    assert json.loads(json_path.read_text())["rows"] == rows
    assert png_path.read_bytes().startswith(b"\x89PNG") and f"]({png_path.name})" in md_path.read_text()
    costs = inference_cost(result)
    assert costs["attention"]["context"] == 16 and costs["attention"]["batch_size"] == 1
    assert costs["attention"]["state_bytes"] > 0 and costs["diffusion"]["state_bytes"] == 0

    run_dir = shutil.copytree(runs["mamba"], tmp_path / "mamba")
    own, path = measure_run_inference(run_dir, contexts=[16], batch_size=1, new_tokens=N_TOKENS, device="cpu")
    assert path == run_dir / INFERENCE_FILE and json.loads(path.read_text()) == own
    assert set(inference_cost(own)) == {"mamba"}
    section = inference_section([result, own])
    assert all(f"| {name} |" in section for name in ("attention", "diffusion", "mamba"))


def _masked_jepa(run_dir, tmp_path):
    """A copy of a run whose config says jepa masked_span (check_runs reads configs alone)."""
    copy = shutil.copytree(run_dir, tmp_path / "jepa")
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["objective"] = "jepa"
    cfg["model"]["jepa"] = {**cfg["model"].get("jepa", {}), "mode": "masked_span", "span_length": [2, 4]}
    cfg["sample"]["tokens"] = 0  # as a masked_span run must say
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    return copy


def test_a_run_that_cannot_generate_is_skipped_beside_others_and_refused_alone(runs, tmp_path):
    jepa = _masked_jepa(runs["attention"], tmp_path)
    usable, skipped = check_runs([str(runs["attention"]), str(jepa)], [16], "cpu")
    assert usable == [str(runs["attention"])] and skipped[0]["dir"] == str(jepa)
    assert "cannot generate" in skipped[0]["reason"]
    with pytest.raises(UserError, match="none of the runs can generate"):
        check_runs([str(jepa)], [16], "cpu")


def test_runs_of_different_tokenizers_are_refused(monkeypatch):
    def fake_load(run_dir, device, purpose):
        return SimpleNamespace(corpus=SimpleNamespace(tokenizer=SimpleNamespace(spec=run_dir)))

    monkeypatch.setattr(inference_bench, "load_run", fake_load)
    with pytest.raises(UserError, match="different tokenizers"):
        load_runs(["bytes", "tiktoken:gpt2"], "cpu")
    assert len(load_runs(["bytes", "bytes"], "cpu")) == 2


@pytest.mark.parametrize("options, message", [
    (["--contexts", "4,16"], "every context must exceed --new-tokens=4"),
    (["--contexts", "16", "--batch-sizes", "0"], "--batch-sizes must be >= 1"),
    (["--contexts", "16", "--repeats", "0"], "--repeats must be >= 1"),
    (["--contexts", "16,x"], "expected comma-separated integers"),
])
def test_bad_settings_are_one_error_line_and_write_nothing(runs, tmp_path, capsys, options, message):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "bench", "inference", runs["attention"], "--new-tokens", "4", "--out", out,
                           *options)
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
