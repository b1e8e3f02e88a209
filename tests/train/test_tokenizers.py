"""Tokenizers from local files (train/tokenizers.py): exact byte counts per token, tiktoken's twin of a trained BPE,
and one-line errors for a missing or bad tokenizer."""
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.train.errors import DataError
from archlab.train.tokenizers import TiktokenTokenizer, load_tokenizer
from tests.train.tokenizer_helpers import NON_ASCII, real_text, single_byte_tokenizer, tiny_bpe


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return tiny_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_trained_bpe_has_bos_and_round_trips(bpe):
    assert bpe.vocab_size == 400 and bpe.bos_id == 0 and bpe.token_bytes[0] == 0
    text = real_text(5000)
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert len(ids) < 0.7 * len(text.encode())  # it learned merges
    assert bpe.identity["sha256"] and bpe.identity["spec"].startswith("hf:")


def test_tiktoken_twin_encodes_like_tokenizers(bpe):
    """The fast path (tiktoken built from the BPE's ranks) gives the tokens `tokenizers` gives, on real prose, code
    and non-ASCII text, document by document."""
    assert bpe.fast is not None
    text = real_text(300_000)
    docs = [text[i: i + 3000] for i in range(0, len(text), 3000)]
    slow = [e.ids for e in bpe.model.encode_batch(docs, add_special_tokens=False)]
    assert bpe.encode_batch(docs) == slow


@settings(max_examples=10, deadline=None)
@given(st.text(min_size=0, max_size=60))
def test_token_bytes_sum_to_the_utf8_bytes(bpe, text):
    text = text + NON_ASCII
    for tokenizer in (bpe, load_tokenizer("bytes")):
        ids = tokenizer.encode(text)
        assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_on_real_text(bpe):
    text = real_text(50_000)
    assert int(bpe.token_bytes[bpe.encode(text)].sum()) == len(text.encode("utf-8"))


def test_hf_tokenizer_without_the_fast_path_counts_bytes_too(tmp_path, bpe):
    """A tokenizer.json with a normalizer is encoded by `tokenizers` itself; token_bytes stay exact."""
    import json

    config = json.loads(bpe.path.read_text())
    config["normalizer"] = {"type": "NFC"}
    path = tmp_path / "nfc.json"
    path.write_text(json.dumps(config))
    slow = load_tokenizer(f"hf:{path}")
    assert slow.fast is None
    text = real_text(20_000)
    assert slow.encode(text) == bpe.encode(text)  # the text is NFC already
    assert int(slow.token_bytes[slow.encode(text)].sum()) == len(text.encode("utf-8"))


def test_added_plain_tokens_count_their_text(tmp_path, bpe):
    from tokenizers import Tokenizer as HFModel

    model = HFModel.from_file(str(bpe.path))
    model.add_tokens(["hello wörld"])
    model.save(str(tmp_path / "added.json"))
    added = load_tokenizer(f"hf:{tmp_path / 'added.json'}")
    text = "say hello wörld twice: hello wörld" + NON_ASCII
    ids = added.encode(text)
    assert added.vocab_size - 1 in ids and added.token_bytes[added.vocab_size - 1] == len("hello wörld".encode())
    assert int(added.token_bytes[ids].sum()) == len(text.encode())


def test_single_byte_tokenizer_is_the_byte_tokenizer(tmp_path):
    single = single_byte_tokenizer(tmp_path / "bytes.json")
    byte = load_tokenizer("bytes")
    text = real_text(20_000)
    assert single.vocab_size == 256 and single.bos_id is None
    assert single.encode(text) == byte.encode(text)
    assert np.array_equal(single.token_bytes, byte.token_bytes)
    assert single.decode(byte.encode(text)) == text == byte.decode(byte.encode(text))


def test_tiktoken_from_a_local_ranks_file(tmp_path, monkeypatch, bpe):
    """A `tiktoken:<name>` encoding is built from `tokenizers/<name>.tiktoken` in a data root (here: the tiny BPE's
    ranks under a test name registered with their sha256), and encodes like the BPE it was written from."""
    import base64
    import hashlib

    from archlab.train import tokenizers

    ranks = bpe.fast._mergeable_ranks
    lines = b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items())
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "tiny.tiktoken").write_bytes(lines)
    monkeypatch.setenv("ARCHLAB_DATA", str(tmp_path))
    monkeypatch.setitem(tokenizers.TIKTOKEN_ENCODINGS, "tiny", (tokenizers.R50K_PATTERN, {"<|endoftext|>": 400}, "tiny",
                                                                hashlib.sha256(lines).hexdigest()))
    tiny = load_tokenizer("tiktoken:tiny")
    text = real_text(20_000)
    assert tiny.vocab_size == 401 and tiny.bos_id == 400 and tiny.token_bytes[400] == 0
    assert tiny.encode(text) == bpe.encode(text) and tiny.decode(tiny.encode(text)) == text
    assert int(tiny.token_bytes[tiny.encode(text)].sum()) == len(text.encode())
    assert tiny.identity == {"spec": "tiktoken:tiny", "sha256": hashlib.sha256(lines).hexdigest()}


def test_relative_hf_path_resolves_under_the_data_roots(tmp_path, monkeypatch, bpe):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "t.json").write_bytes(bpe.path.read_bytes())
    monkeypatch.setenv("ARCHLAB_DATA", str(tmp_path))
    assert load_tokenizer("hf:tok/t.json").identity["sha256"] == bpe.identity["sha256"]


@pytest.mark.parametrize("spec, message", [
    ("tiktoken:cl100k_base", "needs the file cl100k_base.tiktoken in one of"),
    ("tiktoken:nope", "unknown tiktoken encoding 'nope'"),
    ("hf:nowhere/tokenizer.json", "is not in any data root"),
    ("sentencepiece:x", "unknown tokenizer 'sentencepiece:x'"),
])
def test_missing_or_unknown_tokenizer_is_one_line(spec, message, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_DATA", str(tmp_path))
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=message) as err:
        load_tokenizer(spec)
    assert "\n" not in str(err.value)
    if spec.startswith("tiktoken:cl100k"):
        assert "cl100k_base.tiktoken and save it there" in str(err.value)


def test_damaged_tokenizer_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_DATA", str(tmp_path))
    (tmp_path / "tokenizers").mkdir()
    (tmp_path / "tokenizers" / "gpt2.tiktoken").write_text("not ranks\n")
    with pytest.raises(DataError, match="not gpt2's"):
        load_tokenizer("tiktoken:gpt2")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="is not a valid tokenizer.json"):
        load_tokenizer("hf:bad.json")


def test_vocabulary_beyond_uint32_is_refused(tmp_path):
    with pytest.raises(DataError, match="more than uint32"):
        TiktokenTokenizer("tiktoken:huge", {}, tmp_path, SimpleNamespace(n_vocab=2**32 + 1), None)
