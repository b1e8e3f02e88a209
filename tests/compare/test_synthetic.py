import matplotlib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model
from archlab.compare.synthetic import (BLANK, COPY_MARKER, FILLER, IGNORE, KEYS, PART_SEED_STRIDE, TRIGGERS, VALUES,
                                       SyntheticMixture, SyntheticTask, generate, mixture_train_set, parse_task,
                                       state_bytes, train_and_score)
from archlab.compare.synthetic_report import plot_accuracy_vs_state
from archlab.train.errors import UserError

matplotlib.use("Agg")

FAST = settings(max_examples=25, deadline=None)


def task(name, seq_len, n_pairs, **extra):
    return SyntheticTask(task=name, seq_len=seq_len, n_pairs=n_pairs, train_examples=8, test_examples=8, **extra)


def within(tokens: torch.Tensor, ids: range) -> bool:
    return bool(((tokens >= ids.start) & (tokens < ids.stop)).all())


def earlier_occurrences(row: torch.Tensor, t: int) -> list[int]:
    return (row[:t] == row[t]).nonzero().flatten().tolist()


@st.composite
def mqar_settings(draw):
    n_pairs = draw(st.integers(1, 12))
    seq_len = draw(st.integers(4 * n_pairs, 4 * n_pairs + 40))
    power_a = draw(st.sampled_from([0.01, 0.5, 1.0]))
    return task("mqar", seq_len, n_pairs, power_a=power_a), draw(st.integers(0, 2**31 - 1))


@FAST
@given(mqar_settings())
def test_every_mqar_query_has_exactly_one_answer_earlier(setting):
    spec, seed = setting
    inputs, targets = generate(spec, 6, seed=seed)
    n = spec.n_pairs
    assert inputs.shape == targets.shape == (6, spec.seq_len) and inputs.dtype == torch.long
    assert within(inputs, range(256))
    for row, target in zip(inputs, targets, strict=True):
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert within(keys, KEYS) and within(values, VALUES)
        assert len(set(keys.tolist())) == n and len(set(values.tolist())) == n
        scored = (target != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == n and all(t >= 2 * n for t in scored)
        assert sorted(row[scored].tolist()) == sorted(keys.tolist())  # every key queried once
        for t in scored:
            (first,) = earlier_occurrences(row, t)  # the key was seen exactly once before
            assert first < 2 * n and first % 2 == 0
            assert target[t] == row[first + 1] == row[t + 1]
        answers = {t + 1 for t in scored}
        rest = [i for i in range(2 * n, spec.seq_len) if i not in scored and i not in answers]
        assert within(row[rest], FILLER)


def test_mqar_power_law_puts_queries_near_the_pairs():
    near = task("mqar", 256, 4, power_a=0.01)
    uniform = task("mqar", 256, 4, power_a=1.0)
    mean_position = [(generate(s, 200, seed=0)[1] != IGNORE).nonzero()[:, 1].float().mean() for s in (near, uniform)]
    assert mean_position[0] < mean_position[1] - 20


@st.composite
def copy_settings(draw):
    n_pairs = draw(st.integers(1, 10))
    seq_len = draw(st.integers(2 * n_pairs + 1, 2 * n_pairs + 40))
    return task("selective_copy", seq_len, n_pairs), draw(st.integers(0, 99))


@FAST
@given(copy_settings())
def test_selective_copy_scores_the_data_tokens_in_order(setting):
    spec, seed = setting
    inputs, targets = generate(spec, 6, seed=seed)
    region = spec.seq_len - spec.n_pairs - 1
    for row, target in zip(inputs, targets, strict=True):
        noisy = row[:region]
        data = noisy[noisy != BLANK]
        assert len(data) == spec.n_pairs and within(data, VALUES)
        assert row[region] == COPY_MARKER and (row[region + 1:] == data).all()
        scored = target != IGNORE
        assert scored.nonzero().flatten().tolist() == list(range(region, spec.seq_len - 1))
        assert (target[scored] == data).all()


@st.composite
def induction_settings(draw):
    n_pairs = draw(st.integers(1, len(TRIGGERS)))
    return task("induction_heads", draw(st.integers(4 * n_pairs, 4 * n_pairs + 40)), n_pairs), draw(st.integers(0, 99))


@FAST
@given(induction_settings())
def test_induction_heads_answer_is_what_followed_the_trigger(setting):
    spec, seed = setting
    inputs, targets = generate(spec, 6, seed=seed)
    n, prefix = spec.n_pairs, spec.seq_len - 2 * spec.n_pairs
    for row, target in zip(inputs, targets, strict=True):
        is_trigger = (row >= TRIGGERS.start) & (row < TRIGGERS.stop)
        assert within(row[~is_trigger], VALUES)
        assert int(is_trigger[:prefix].sum()) == n and int(is_trigger[prefix:].sum()) == n
        scored = (target != IGNORE).nonzero().flatten().tolist()
        assert scored == list(range(prefix, spec.seq_len, 2))
        for t in scored:
            (first,) = earlier_occurrences(row, t)
            assert first < prefix - 1 and target[t] == row[first + 1] == row[t + 1]


@pytest.mark.parametrize("name", ["mqar", "selective_copy", "induction_heads"])
def test_generation_is_seeded(name):
    spec = task(name, 48, 4)
    first, again, other = (generate(spec, 16, seed=s) for s in (3, 3, 4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("fields, message", [
    (dict(task="mqar", seq_len=15, n_pairs=4), "seq_len >= 4 \\* n_pairs"),
    (dict(task="mqar", seq_len=1024, n_pairs=100), "distinct values"),
    (dict(task="selective_copy", seq_len=8, n_pairs=4), "2 \\* n_pairs \\+ 1"),
    (dict(task="induction_heads", seq_len=256, n_pairs=15), "trigger tokens"),
    (dict(task="induction_heads", seq_len=7, n_pairs=2), "seq_len >= 4 \\* n_pairs"),
    (dict(task="mqar", seq_len=32, n_pairs=0), "greater than 0"),
    (dict(task="mqar", seq_len=32, n_pairs=4, power_a=0.0), "power_a"),
    (dict(task="copy", seq_len=32, n_pairs=4), "task"),
    (dict(task="mqar", seq_len=64, n_pairs=12, vocab=10), "exceeds the 10 distinct values"),
    (dict(task="mqar", seq_len=32, n_pairs=4, vocab=97), "vocab"),
    (dict(task="mqar", seq_len=32, n_pairs=4, keys=10), "keys"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValidationError, match=message):
        SyntheticTask(train_examples=8, test_examples=8, **fields)


def test_generate_refuses_no_examples():
    with pytest.raises(ValueError, match="at least one"):
        generate(task("mqar", 32, 4), 0, seed=0)


TINY_TRANSFORMER = ModelConfig(layers="transformer", d_model=32, n_layers=2, attention={"n_heads": 2})


def test_train_and_score_learns_recall_and_is_deterministic():
    spec = SyntheticTask(task="mqar", seq_len=32, n_pairs=4, train_examples=20000, test_examples=256)
    result = train_and_score(TINY_TRANSFORMER, spec, steps=300, batch_size=32, lr=1e-2, seed=0)
    # Uniform guessing among the 96 value ids scores ~1%; naming one of the 4 values in context scores ~25%;
    # exact recall of all four takes a few thousand steps for this model (too slow for a CPU test).
    assert result["scores"][0]["accuracy"] > 0.1, result
    assert result["params"] > 0 and result["train_steps"] == 300 and result["train_seconds"] > 0
    short = dict(steps=5, batch_size=8, lr=1e-3, seed=1)
    first, again = (train_and_score(TINY_TRANSFORMER, spec, **short) for _ in range(2))
    first.pop("train_seconds"), again.pop("train_seconds")
    assert first == again


def test_train_and_score_needs_an_autoregressive_model():
    diffusion = ModelConfig(objective="masked_diffusion", d_model=32, n_layers=1, attention={"n_heads": 2})
    with pytest.raises(ValueError, match="not autoregressive"):
        train_and_score(diffusion, task("mqar", 16, 2), steps=1, batch_size=2, lr=1e-3, seed=0)


def mixture(train, test=None, **extra):
    return SyntheticMixture(task="mqar", train=[dict(seq_len=length, n_pairs=n) for length, n in train],
                            test=test and [dict(seq_len=length, n_pairs=n) for length, n in test],
                            train_examples=6, test_examples=4, **extra)


def test_mixture_train_set_pads_each_setting_to_the_longest():
    spec = mixture([(16, 2), (32, 4), (24, 6)])
    inputs, targets, setting_of = mixture_train_set(spec, seed=5)
    assert inputs.shape == targets.shape == (18, 32) and setting_of.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    for i, part in enumerate(spec.train_tasks):
        rows = slice(6 * i, 6 * i + 6)
        alone = generate(part, 6, seed=5 + i * PART_SEED_STRIDE)
        unpadded = slice(0, part.seq_len)
        assert torch.equal(inputs[rows, unpadded], alone[0]) and torch.equal(targets[rows, unpadded], alone[1])
        assert (inputs[rows, part.seq_len:] == BLANK).all() and (targets[rows, part.seq_len:] == IGNORE).all()
        assert ((targets[rows] != IGNORE).sum(dim=1) == part.n_pairs).all()  # every query scored, no padding


def test_parse_task_and_mixture_settings():
    spec = parse_task({"task": "mqar", "train": [{"seq_len": 16, "n_pairs": 2}],
                       "test": [{"seq_len": 32, "n_pairs": 4}], "train_examples": 4, "test_examples": 2})
    assert isinstance(spec, SyntheticMixture) and spec.trained_on == "L16×2"
    assert [(t.seq_len, t.n_pairs) for t in spec.test_tasks] == [(32, 4)]
    assert [(t.seq_len, t.n_pairs) for t in mixture([(16, 2)]).test_tasks] == [(16, 2)]  # test defaults to train
    assert isinstance(parse_task({"task": "mqar", "seq_len": 16, "n_pairs": 2, "train_examples": 4,
                                  "test_examples": 2}), SyntheticTask)


@pytest.mark.parametrize("train, test, message", [
    ([(16, 2), (16, 8)], None, "train setting L16×8: mqar needs seq_len >= 4 \\* n_pairs"),
    ([(16, 2)], [(64, 200)], "test setting L64×200: mqar n_pairs=200 exceeds"),
    ([], None, "at least 1 item"),
])
def test_bad_mixture_settings_are_refused_in_one_line(train, test, message):
    with pytest.raises(ValidationError, match=message) as raised:
        mixture(train, test)
    assert len(raised.value.errors()) == 1 and "\n" not in raised.value.errors()[0]["msg"]


TINY_MAMBA = ModelConfig(layers="mamba", d_model=16, n_layers=2, mamba={"d_state": 4})


def test_scores_carry_state_bytes_that_grow_with_length_for_attention_only():
    spec = mixture([(16, 2)], test=[(16, 2), (32, 2)])
    scores = train_and_score(TINY_TRANSFORMER, spec, steps=1, batch_size=4, lr=1e-3, seed=0)["scores"]
    assert [(s["seq_len"], s["n_pairs"]) for s in scores] == [(16, 2), (32, 2)]
    # a KV cache: keys and values, every position, every layer, float32
    assert [s["state_bytes"] for s in scores] == [2 * 2 * length * 32 * 4 for length in (16, 32)]
    # Mamba: conv window (d_conv - 1) and SSM state (d_state) per inner channel (expand 2 x d_model), float32
    mamba = build_model(TINY_MAMBA)
    assert state_bytes(mamba, 16) == state_bytes(mamba, 1024) == 2 * 32 * (3 + 4) * 4


def synthetic_rows(arms=(("transformer", ("attention",), 0.9), ("mamba", ("mamba",), 0.3),
                         ("hybrid", ("attention", "mamba"), 0.8)), seeds=(0, 1), noise=0.02):
    return [{"arm": arm, "mixers": list(mixers), "backbone": arm, "d_model": d, "params": d * 100, "task": "mqar",
             "trained_on": "L32×2, L64×8", "seq_len": length, "n_pairs": n, "seed": seed,
             "accuracy": min(1.0, acc * d / 64 + noise * seed),
             "state_bytes": d * (length if "attention" in mixers else 8)}
            for arm, mixers, acc in arms for d in (32, 64) for length, n in ((32, 2), (64, 8)) for seed in seeds]


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "figures" / "recall.png"
    plot_accuracy_vs_state(synthetic_rows(), path)
    image = matplotlib.pyplot.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["recall.png"]  # no temporary file left behind


def test_plot_refuses_incomplete_rows(tmp_path):
    with pytest.raises(UserError, match="no synthetic rows"):
        plot_accuracy_vs_state([], tmp_path / "a.png")
    with pytest.raises(UserError, match="state_bytes"):
        plot_accuracy_vs_state([{"arm": "x", "task": "mqar", "seq_len": 8, "n_pairs": 2, "accuracy": 1.0}],
                               tmp_path / "a.png")
    assert not list(tmp_path.iterdir())
