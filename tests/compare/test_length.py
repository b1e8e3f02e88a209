"""`archlab eval RUN --lengths ...`: per-position buckets agree with the overall figure, 1x is `archlab eval`'s score
on the same windows, the passkey sequence holds its pieces where it says, and bad input is refused before anything
is written."""
import json
import math
import os

import numpy as np
import pytest
import torch

from archlab.compare import length
from archlab.archs.model import Model
from archlab.compare.length import (
    LENGTH_FILE,
    LENGTH_PLOT,
    NEEDLE,
    QUESTION,
    evaluate_lengths,
    length_report_section,
    parse_lengths,
    passkey_sequence,
)
from archlab.train.config import load_config
from archlab.train.data import eval_batches
from archlab.train.errors import UserError
from archlab.train.loading import load_run
from archlab.train.tokenizers import ByteTokenizer
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from ..train.test_cli import run_cli, snapshot

SEQ_LEN, EVAL_TOKENS = 32, 512  # tiny.yaml's data.seq_len; train.eval_tokens as the runs below set it
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on one thread (tests/compare/conftest.py)


@pytest.fixture
def no_run_plot(monkeypatch):
    """evaluate_lengths without drawing RUN/length_eval.png (the CLI test checks it): a second less per call."""
    monkeypatch.setattr(length, "run_figure", lambda result: b"")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny autoregressive run and a tiny masked-diffusion run, one training step each."""
    folder = tmp_path_factory.mktemp("length")
    for name, objective in {"ar": "autoregressive", "diffusion": "masked_diffusion"}.items():
        Trainer(load_config(TINY, [f"run.dir={folder / name}", f"model.objective={objective}", "train.max_steps=1",
                                   "train.warmup_steps=0", "train.eval_tokens=512", "sample.tokens=0"])).train()
    return folder


def test_buckets_match_the_overall_bpb_and_1x_is_archlab_evals_score(capsys, runs):
    code, out, err = run_cli(capsys, "eval", runs / "ar", "--lengths", "8x,4x", "--per-position", "--passkey",
                             "--passkey-trials", "3", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert json.loads((runs / "ar" / LENGTH_FILE).read_text()) == result
    assert (runs / "ar" / LENGTH_PLOT).read_bytes().startswith(b"\x89PNG")
    assert result["trained_seq_len"] == SEQ_LEN and result["step"] == 1 and result["scored_tokens"] == EVAL_TOKENS
    assert [row["multiple"] for row in result["lengths"]] == [4, 8]
    for row in result["lengths"]:
        assert row["windows"] * row["tokens"] == result["scored_tokens"]
        buckets = row["buckets"]
        assert [start for start, _, _ in buckets] == list(range(0, row["tokens"], SEQ_LEN // 2))
        assert buckets[-1][1] == row["tokens"]
        # bytes: one per token here, so a bucket's weight is its width
        weighted = sum(bpb * (end - start) for start, end, bpb in buckets) / row["tokens"]
        assert weighted == pytest.approx(row["bpb"], rel=1e-9)
        assert row["passkey"]["trials"] == 3 and 0 <= row["passkey"]["accuracy"] <= 1
        assert row["passkey"]["bits_per_digit"] > 0 and 0 < row["passkey"]["digit_bits_per_digit"] < 8


def test_1x_is_archlab_evals_score_on_the_same_windows(runs, no_run_plot):
    run = load_run(runs / "ar", "cpu")
    one_x, _ = evaluate_lengths(runs / "ar", [1], per_position=False, passkey=False, device="cpu")
    val = run.corpus.split("val")
    same_windows = eval_batches(val[:EVAL_TOKENS + 1], seq_len=SEQ_LEN, batch_size=8, max_tokens=None)
    assert one_x["lengths"][0]["bpb"] == pytest.approx(run.evaluate(same_windows)["bpb"], rel=1e-5)


def test_passkey_sequence_puts_the_key_where_it_says_and_the_question_last():
    tokenizer, data = ByteTokenizer(), np.frombuffer(bytes(range(256)) * 8, dtype=np.uint8)
    ids, info = passkey_sequence(tokenizer.encode, data, 200, np.random.default_rng(3))
    again, _ = passkey_sequence(tokenizer.encode, data, 200, np.random.default_rng(3))
    assert torch.equal(ids, again) and len(ids) == 200
    key, start = info["key"], info["needle_start"]
    assert len(key) == 5 and key.isdigit()
    needle = NEEDLE.format(key=key)
    text = bytes(ids.tolist())
    assert text[start:start + len(needle)] == needle.encode()
    assert text.endswith((QUESTION + key).encode())
    filler = text[:start] + text[start + len(needle):-len(QUESTION + key)]
    assert len(filler) == 200 - len(needle) - len(QUESTION) - 5
    assert bytes(data.tobytes()).find(filler) >= 0  # one contiguous stretch of the split, cut at the needle
    assert info["depth"] == pytest.approx(start / len(filler), abs=1 / len(filler))


def test_a_diffusion_run_gives_its_bound_per_length_and_refuses_positions_and_passkey(capsys, runs, no_run_plot):
    before = snapshot(runs / "diffusion")
    for flag, message in [("--per-position", "per-position bits need an autoregressive run"),
                          ("--passkey", "passkey retrieval needs an autoregressive run")]:
        code, out, err = run_cli(capsys, "eval", runs / "diffusion", "--lengths", "1x,2x", flag, "--device", "cpu")
        assert code == 2 and out == "" and err.startswith("error: " + message) and err.count("\n") == 1, err
    assert snapshot(runs / "diffusion") == before
    result, path = evaluate_lengths(runs / "diffusion", [1, 2], per_position=False, passkey=False, device="cpu")
    assert path == runs / "diffusion" / LENGTH_FILE and result["bound"] is True
    assert all(math.isfinite(row["bpb"]) and "buckets" not in row for row in result["lengths"])


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "1x,2y"], "'2y' is not a multiple of the trained length"),
    (["--lengths", "256"], "'256' is not a multiple"),
    (["--lengths", "0x"], "'0x' is not a multiple"),
    (["--lengths", "1x,,2x"], "an empty entry"),
    (["--lengths", "2x,2x"], "names a length twice"),
    (["--lengths", "99999x"], "the longest that fits is"),
    (["--lengths", "1x", "--split", "test"], "the test split of tinyshakespeare.txt is empty"),
    (["--per-position"], "go with --lengths"),
    (["--lengths", "1x", "--linear-probe"], "separate evaluations"),
    (["--lengths", "1x", "--passkey", "--passkey-trials", "0"], "--passkey-trials must be >= 1"),
    (["--lengths", "1x,8x", "--passkey"], "the passkey sentence and question take"),
    (["--lengths", "8x", "--passkey-trials", "3"], "--passkey-trials goes with --passkey"),
])
def test_bad_lengths_are_refused_before_anything_is_written(capsys, runs, argv, message):
    before = snapshot(runs / "ar")
    code, out, err = run_cli(capsys, "eval", runs / "ar", *argv, "--device", "cpu")
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    assert snapshot(runs / "ar") == before


def test_parse_lengths_sorts():
    assert parse_lengths(" 4x, 1x,2x") == [1, 2, 4]
    with pytest.raises(UserError, match="1.5x"):
        parse_lengths("1.5x")


def test_a_failed_write_leaves_the_previous_result(runs, monkeypatch, no_run_plot):
    path = runs / "ar" / LENGTH_FILE
    path.write_text("previous")

    def fail(_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        evaluate_lengths(runs / "ar", [1], per_position=False, passkey=False, device="cpu")
    assert path.read_text() == "previous"
    assert not [p for p in (runs / "ar").iterdir() if p.name.endswith(".tmp")]


def test_report_section_has_a_row_per_run_and_its_plots():
    def result(bpb: float) -> dict:
        rows = [{"multiple": m, "tokens": 32 * m, "windows": 8 // m, "bpb": bpb * m,
                 "buckets": [[s, s + 16, bpb] for s in range(0, 32 * m, 16)],
                 "passkey": {"accuracy": 0.5, "bits_per_digit": 2.0, "digit_bits_per_digit": 1.0, "trials": 4}}
                for m in (1, 2)]
        return {"trained_seq_len": 32, "step": 7, "scored_tokens": 256, "split": "val", "bound": False,
                "probe": False, "lengths": rows}

    markdown, images = length_report_section([("a", result(1.0)), ("b", result(1.5))], "Length")
    assert markdown.startswith("## Length")
    assert "| a | 7 | 1.000 | 2.000 | 50% / 2.00 / 1.00 | 50% / 2.00 / 1.00 |" in markdown
    assert "| b | 7 | 1.500 | 3.000 |" in markdown
    assert set(images) == {"length_bpb.png", "length_positions.png", "length_passkey.png"}
    assert all(png.startswith(b"\x89PNG") for png in images.values())
    assert all(f"]({name})" in markdown for name in images)


def test_passkey_bits_of_a_uniform_model_are_chance():
    """Uniform logits over the 256 bytes: 8 bits per digit over the vocabulary, log2(10) among the digits, and
    greedy picks byte 0, never the key."""
    import contextlib
    from types import SimpleNamespace

    uniform = SimpleNamespace(logits=lambda model, tokens, documents=None: torch.zeros(*tokens.shape, 256))
    one_byte_each = SimpleNamespace(token_bytes=torch.ones(256), objective=uniform)
    one_byte_each.bytes_per_target = lambda targets: Model.bytes_per_target(one_byte_each, targets)
    run = SimpleNamespace(model=one_byte_each,
                          corpus=SimpleNamespace(tokenizer=ByteTokenizer()), device=torch.device("cpu"),
                          autocast=contextlib.nullcontext)
    data = np.frombuffer(b"to be or not to be " * 20, dtype=np.uint8)
    scores = length.passkey_scores(run, data, 128, 3)
    assert scores == {"accuracy": 0.0, "bits_per_digit": pytest.approx(8.0),
                      "digit_bits_per_digit": pytest.approx(math.log2(10)), "trials": 3}
