import builtins
import gzip
import hashlib
import json
import lzma
import os
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.train import data as data_module
from archlab.train.data import (
    FETCHABLE, REPO_CORPORA, ByteCorpus, WindowSampler, cache_dir, data_roots, eval_batches,
    load_bytes, resolve_data_path, split_bounds,
)
from archlab.train.errors import DataError
from archlab.train.tokenizers import ByteTokenizer
from archlab.train.fetch import BENCHMARKS

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
PAYLOAD = bytes(np.random.default_rng(0).integers(0, 256, size=10_000, dtype=np.uint8)) + "é漢🙂\n".encode()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No data roots from the environment, and a fresh cache."""
    monkeypatch.delenv("ARCHLAB_DATA", raising=False)
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def write_file(path: Path, payload: bytes) -> Path:
    """`payload` stored as `path`, compressed according to its suffix."""
    if path.suffix == ".xz":
        path.write_bytes(lzma.compress(payload))
    elif path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    elif path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("corpus.txt", payload)
    else:
        path.write_bytes(payload)
    return path


def write_raw(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path


def count_decompressions(monkeypatch) -> list:
    calls = []
    real = data_module._decompress

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(data_module, "_decompress", counting)
    return calls


# -- finding files ----------------------------------------------------------------------------------

def test_data_roots_order(env, tmp_path):
    env.setenv("ARCHLAB_DATA", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    roots = data_roots()
    assert roots[:3] == [tmp_path / "a", tmp_path / "b", REPO_CORPORA]
    shared = Path(data_module.__file__).resolve().parents[2] / "shared" / "data"
    assert roots[3:] == ([shared] if shared.is_dir() else []) + [cache_dir() / "data"]


def test_archlab_data_beats_shipped_corpus(env, tmp_path):
    assert resolve_data_path("tinyshakespeare.txt") == REPO_CORPORA / "tinyshakespeare.txt"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    write_file(second / "tinyshakespeare.txt", b"mine")
    write_file(second / "only_here.txt", b"x")
    env.setenv("ARCHLAB_DATA", f"{first}{os.pathsep}{second}")
    assert resolve_data_path("tinyshakespeare.txt") == second / "tinyshakespeare.txt"
    assert resolve_data_path("only_here.txt") == second / "only_here.txt"


def test_absolute_path_used_as_is(env, tmp_path):
    path = write_file(tmp_path / "x.txt", b"abc")
    assert resolve_data_path(str(path)) == path
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_path(tmp_path / "missing.txt")


@pytest.mark.parametrize("name, hint", [("nope.txt", "set ARCHLAB_DATA"), ("enwik8", "archlab data fetch enwik8"),
                                        ("text8", "archlab data fetch text8")])
def test_missing_file_says_where_it_looked_and_how_to_get_it(env, name, hint):
    with pytest.raises(DataError) as err:
        resolve_data_path(name)
    message = str(err.value)
    assert "\n" not in message and hint in message and "ARCHLAB_DATA" in message
    assert str(REPO_CORPORA) in message


def test_fetchable_names_match_fetch():
    assert set(FETCHABLE) == set(BENCHMARKS)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("ARCHLAB_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "archlab"


# -- load_bytes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", ["", ".xz", ".gz", ".zip"])
def test_load_bytes_plain_and_compressed(env, tmp_path, suffix):
    path = write_file(tmp_path / f"corpus.txt{suffix}", PAYLOAD)
    data = load_bytes(path, expected_sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert isinstance(data, np.memmap) and data.dtype == np.uint8 and not data.flags.writeable
    assert data.tobytes() == PAYLOAD
    if suffix:
        source_sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        cached = tmp_path / "cache" / "corpora" / f"corpus.txt-{source_sha256[:16]}.bin"
        assert Path(data.filename) == cached
        record = json.loads(cached.with_suffix(".json").read_text())
        assert record["source_sha256"] == source_sha256 and record["size"] == len(PAYLOAD)
        assert record["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name, cached.with_suffix(".json").name]


@pytest.mark.parametrize("suffix", [".xz", ".gz", ".zip"])
def test_decompressed_once_then_reused(env, tmp_path, suffix):
    path = write_file(tmp_path / f"corpus.txt{suffix}", PAYLOAD)
    calls = count_decompressions(env)
    load_bytes(path)
    assert load_bytes(path).tobytes() == PAYLOAD
    assert len(calls) == 1


def flip_a_byte(cached: Path) -> None:
    raw = bytearray(cached.read_bytes())
    raw[100] ^= 0xFF
    cached.write_bytes(raw)


@pytest.mark.parametrize("damage", [
    flip_a_byte,
    lambda cached: cached.write_bytes(cached.read_bytes()[:-1]),
    lambda cached: cached.unlink(),
    lambda cached: cached.with_suffix(".json").write_text("{not json"),
    lambda cached: cached.with_suffix(".json").unlink(),
], ids=["flipped", "truncated", "deleted", "bad-sidecar", "no-sidecar"])
def test_damaged_cache_is_rebuilt(env, tmp_path, damage):
    path = write_file(tmp_path / "corpus.txt.xz", PAYLOAD)
    calls = count_decompressions(env)
    damage(Path(load_bytes(path).filename))
    assert load_bytes(path).tobytes() == PAYLOAD
    assert len(calls) == 2


def test_changed_source_gets_a_new_cache_entry(env, tmp_path):
    path = write_file(tmp_path / "corpus.txt.gz", PAYLOAD)
    first = load_bytes(path)
    write_file(path, b"something else")
    second = load_bytes(path)
    assert second.tobytes() == b"something else" and second.filename != first.filename


@pytest.mark.parametrize("suffix", ["", ".xz"])
def test_wrong_expected_sha256(env, tmp_path, suffix):
    path = write_file(tmp_path / f"corpus.txt{suffix}", PAYLOAD)
    with pytest.raises(DataError, match="data.sha256") as err:
        load_bytes(path, expected_sha256="0" * 64)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make, match", [
    (lambda tmp: tmp / "missing.txt", "does not exist"),
    (lambda tmp: tmp, "is a directory"),
    (lambda tmp: write_file(tmp / "empty.txt", b""), "is empty"),
    (lambda tmp: write_file(tmp / "empty.txt.gz", b""), "decompresses to nothing"),
    (lambda tmp: write_raw(tmp / "noise.txt.xz", PAYLOAD), "not a valid .xz archive"),
    (lambda tmp: write_raw(tmp / "cut.txt.xz", lzma.compress(PAYLOAD)[:-20]), "not a valid .xz archive"),
    (lambda tmp: write_raw(tmp / "noise.txt.gz", PAYLOAD), "not a valid .gz archive"),
    (lambda tmp: write_raw(tmp / "cut.txt.gz", gzip.compress(PAYLOAD)[:-100]), "not a valid .gz archive"),
    (lambda tmp: write_raw(tmp / "noise.txt.zip", PAYLOAD), "not a valid .zip archive"),
], ids=["missing", "directory", "empty", "empty-gz", "noise-xz", "truncated-xz", "noise-gz", "truncated-gz",
        "noise-zip"])
def test_bad_files_raise_data_error(env, tmp_path, make, match):
    with pytest.raises(DataError, match=match) as err:
        load_bytes(make(tmp_path))
    assert "\n" not in str(err.value)
    leftovers = list((tmp_path / "cache").rglob("*.tmp"))
    assert leftovers == []


def test_zip_must_hold_exactly_one_file(env, tmp_path):
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a.txt", "a")
        zf.writestr("b.txt", "b")
    with pytest.raises(DataError, match="holds 2 files"):
        load_bytes(tmp_path / "two.zip")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_real_permissions(env, tmp_path):
    path = write_file(tmp_path / "secret.txt", PAYLOAD)
    path.chmod(0)
    with pytest.raises(DataError, match="cannot read"):
        load_bytes(path)


def test_unreadable_file(env, tmp_path):
    """As root, chmod 000 does not stop reads, so the refusal is simulated at open()."""
    path = write_file(tmp_path / "secret.txt", PAYLOAD)

    def refusing_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return builtins.open(file, *args, **kwargs)

    env.setattr(data_module, "open", refusing_open, raising=False)
    with pytest.raises(DataError, match="cannot read .*Permission denied.*permissions"):
        load_bytes(path)


def test_unwritable_cache(env, tmp_path):
    env.setenv("ARCHLAB_CACHE", str(write_file(tmp_path / "a-file", b"x")))  # a file where a folder must go
    with pytest.raises(DataError, match="ARCHLAB_CACHE"):
        load_bytes(write_file(tmp_path / "corpus.txt.gz", PAYLOAD))


# -- the shipped corpus and splits ------------------------------------------------------------------

def test_shipped_tinyshakespeare_and_nanogpt_split(env):
    corpus = ByteCorpus.open(REPO_CORPORA / "tinyshakespeare.txt", val_fraction=0.1, sha256=SHAKESPEARE_SHA256)
    assert len(corpus.data) == 1_115_394
    raw = (REPO_CORPORA / "tinyshakespeare.txt").read_bytes()
    assert corpus.train.tobytes() == raw[:1_003_854] and corpus.val.tobytes() == raw[1_003_854:]
    assert len(corpus.test) == 0


def test_standard_90_5_5_split_is_exact():
    assert split_bounds(10**8, 0.05, 0.05) == (90_000_000, 95_000_000)
    assert split_bounds(1_115_394, 0.1, 0.0) == (1_003_854, 1_115_394)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), val=st.floats(0, 0.5), test=st.floats(0, 0.49))
def test_splits_partition_the_data(n, val, test):
    data = np.arange(n, dtype=np.int64)
    corpus = ByteCorpus(Path("corpus.txt"), data, val, test)
    assert np.array_equal(np.concatenate([corpus.train, corpus.val, corpus.test]), data)
    assert len(corpus.train) == int(n * (1 - Fraction(str(val)) - Fraction(str(test))))
    assert len(corpus.test) == n - int(n * (1 - Fraction(str(test))))


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (0.5, 0.5), (0.0, 1.0), (0.1, -0.1)])
def test_bad_fractions(val, test):
    with pytest.raises(DataError, match="val_fraction"):
        ByteCorpus(Path("x"), np.zeros(100, np.uint8), val, test)


def test_split_by_name():
    corpus = ByteCorpus(Path("x.txt"), np.arange(100, dtype=np.uint8), 0.1, 0.0)
    assert corpus.split("val") is corpus.val
    with pytest.raises(DataError, match="unknown split 'dev'"):
        corpus.split("dev")
    with pytest.raises(DataError, match="test split of x.txt is empty; set data.test_fraction"):
        corpus.split("test")


def test_check_seq_len():
    corpus = ByteCorpus(Path("x.txt"), np.zeros(1000, np.uint8), 0.1, 0.0)  # train 900, val 100, test unused
    corpus.check_seq_len(99)
    with pytest.raises(DataError) as err:
        corpus.check_seq_len(100)
    assert str(err.value) == ("data.seq_len=100 needs 101 bytes but the val split of x.txt has only 100; "
                              "lower data.seq_len or use a larger data.val_fraction")
    with pytest.raises(DataError, match="the train split of x.txt has only 900"):
        ByteCorpus(Path("x.txt"), np.zeros(1000, np.uint8), 0.05, 0.05).check_seq_len(900)
    with pytest.raises(DataError, match="the test split"):
        ByteCorpus(Path("x.txt"), np.zeros(1000, np.uint8), 0.5, 0.01).check_seq_len(20)


# -- tokenizer --------------------------------------------------------------------------------------

@given(st.text())
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_tokenizer_decodes_broken_utf8():
    assert ByteTokenizer().decode([104, 105, 0xFF]) == "hi\N{REPLACEMENT CHARACTER}"
    assert ByteTokenizer.vocab_size == 256


# -- training windows -------------------------------------------------------------------------------

def positions(n: int) -> np.ndarray:
    """Data whose every value is its own position, so a window shows where it came from."""
    return np.arange(n, dtype=np.int64)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 3000), seq_len=st.integers(1, 64), batch_size=st.integers(1, 8),
       seed=st.integers(0, 2**32), rank=st.integers(0, 3), index=st.integers(0, 10**6))
def test_windows_are_contiguous_slices_in_range(n, seq_len, batch_size, seed, rank, index):
    seq_len = min(seq_len, n - 1)
    sampler = WindowSampler(positions(n), seq_len=seq_len, batch_size=batch_size, seed=seed, rank=rank, world_size=4)
    batch = sampler.batch(index)
    assert batch.dtype == torch.long and batch.shape == (batch_size, seq_len + 1) and batch.is_contiguous()
    starts = batch[:, :1]
    assert torch.equal(batch, starts + torch.arange(seq_len + 1))
    assert int(starts.min()) >= 0 and int(starts.max()) + seq_len < n


def test_windows_of_real_bytes():
    data = load_bytes(REPO_CORPORA / "tinyshakespeare.txt")
    batch = WindowSampler(data, seq_len=32, batch_size=4, seed=0).batch(0)
    raw = (REPO_CORPORA / "tinyshakespeare.txt").read_bytes()
    for row in batch.tolist():
        assert bytes(row) in raw


def make_sampler(**overrides) -> WindowSampler:
    kwargs = {"seq_len": 16, "batch_size": 4, "seed": 1337} | overrides
    return WindowSampler(positions(100_000), **kwargs)


def test_sampler_is_a_function_of_seed_and_index():
    a, b = make_sampler(), make_sampler()
    assert all(torch.equal(a.batch(i), b.batch(i)) for i in range(5))
    assert not torch.equal(make_sampler(seed=1338).batch(0), a.batch(0))
    assert not torch.equal(a.batch(0), a.batch(1))
    iterated = [next(a) for _ in range(5)]
    assert all(torch.equal(iterated[i], b.batch(i)) for i in range(5))
    assert a.next_index == 5


def test_ranks_draw_different_windows():
    batches = [make_sampler(rank=r, world_size=3).batch(7) for r in range(3)]
    assert not torch.equal(batches[0], batches[1]) and not torch.equal(batches[1], batches[2])
    with pytest.raises(DataError, match="rank 3 is outside world_size 3"):
        make_sampler(rank=3, world_size=3)


def test_resume_mid_stream():
    original = make_sampler()
    for _ in range(3):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives a round trip through a checkpoint
    assert state == {"next_index": 3, "seed": 1337, "seq_len": 16, "batch_size": 4, "rank": 0, "world_size": 1}
    resumed = make_sampler()
    resumed.load_state_dict(state)
    for _ in range(4):
        assert torch.equal(next(resumed), next(original))


@pytest.mark.parametrize("change, setting", [({"seed": 1}, "train.seed"), ({"seq_len": 8}, "data.seq_len"),
                                             ({"batch_size": 2}, "train.batch_size")])
def test_resume_with_other_settings_fails(change, setting):
    state = make_sampler(**change).state_dict()
    with pytest.raises(DataError, match=f"cannot resume the data sampler: {setting} was"):
        make_sampler().load_state_dict(state)


def test_sampler_rejects_short_data_and_negative_seed():
    with pytest.raises(DataError, match="data.seq_len=16 needs 17 bytes"):
        WindowSampler(positions(16), seq_len=16, batch_size=1, seed=0)
    with pytest.raises(DataError, match="train.seed"):
        make_sampler(seed=-1)


# -- the held-out set -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 5000), seq_len=st.integers(1, 100), batch_size=st.integers(1, 9),
       max_tokens=st.none() | st.integers(1, 5000))
def test_eval_windows(n, seq_len, batch_size, max_tokens):
    seq_len = min(seq_len, n - 1)
    if max_tokens is not None:
        max_tokens = max(max_tokens, seq_len)
    batches = eval_batches(positions(n), seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    assert all(len(b) == batch_size for b in batches[:-1]) and 1 <= len(batches[-1]) <= batch_size
    windows = torch.cat(batches)
    starts = windows[:, 0]
    assert windows.dtype == torch.long and torch.equal(windows, starts[:, None] + torch.arange(seq_len + 1))
    available = (n - 1) // seq_len  # windows that fit, tiling the split from its start
    wanted = available if max_tokens is None else min(available, max_tokens // seq_len)
    assert len(windows) == wanted and int(starts[0]) == 0 and int(windows[-1, -1]) < n
    assert torch.all(starts % seq_len == 0)
    gaps = torch.diff(starts // seq_len)
    assert torch.all(gaps >= 1)  # non-overlapping (neighbours share only their boundary byte)
    if len(gaps):
        assert int(gaps.max()) - int(gaps.min()) <= 1  # evenly spaced
        assert available - int(starts[-1] // seq_len) <= -(-available // wanted)  # reaching the end of the split
    again = eval_batches(positions(n), seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))


def test_eval_full_split_covers_every_byte():
    batches = eval_batches(positions(1001), seq_len=10, batch_size=7, max_tokens=None)
    windows = torch.cat(batches)
    assert len(windows) == 100 and torch.equal(torch.unique(windows), torch.arange(1001))
    assert [len(b) for b in batches] == [7] * 14 + [2]


def test_eval_errors():
    with pytest.raises(DataError, match="data.seq_len=10 needs 11 bytes"):
        eval_batches(positions(10), seq_len=10, batch_size=1, max_tokens=None)
    with pytest.raises(DataError, match="max_tokens=5 is below data.seq_len=10"):
        eval_batches(positions(100), seq_len=10, batch_size=1, max_tokens=5)
