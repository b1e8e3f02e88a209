"""Reference entropies: hand-computed values on tiny texts, the smoothing, and the order unigram >= bigram."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from archlab.train.ngram import ByteNgrams
from archlab.train.trainer import Trainer


def windows(text: bytes, length: int) -> list[torch.Tensor]:
    data = torch.tensor(list(text))
    rows = [data[i:i + length + 1] for i in range(0, len(data) - length, length)]
    return [torch.stack(rows)]


def test_unigram_by_hand():
    train = np.frombuffer(b"aab", dtype=np.uint8)
    ngrams = ByteNgrams(train)
    total = 3 + 0.5 * 256
    assert ngrams.unigram[ord("a")] == pytest.approx(2.5 / total)
    assert ngrams.unigram[ord("z")] == pytest.approx(0.5 / total)  # unseen: smoothed, finite
    assert ngrams.unigram.sum() == pytest.approx(1.0)
    batch = [torch.tensor([[ord("b"), ord("a"), ord("b")]])]  # scored: the next bytes "a", "b"
    expected = -(math.log2(2.5 / total) + math.log2(1.5 / total)) / 2
    assert ngrams.unigram_bpb(batch) == pytest.approx(expected)


def test_bigram_by_hand_and_rows_sum_to_one():
    train = np.frombuffer(b"abab", dtype=np.uint8)
    ngrams = ByteNgrams(train)
    assert ngrams.bigram.sum(axis=1) == pytest.approx(np.ones(256))
    p_uni_b = ngrams.unigram[ord("b")]
    # "a" was followed by "b" twice: (2 + p(b)) / (2 + 1)
    assert ngrams.bigram[ord("a"), ord("b")] == pytest.approx((2 + p_uni_b) / 3)
    # never seen as a previous byte: the unigram itself
    assert ngrams.bigram[ord("z")] == pytest.approx(ngrams.unigram)
    batch = [torch.tensor([[ord("a"), ord("b")]])]
    assert ngrams.bigram_bpb(batch) == pytest.approx(-math.log2((2 + p_uni_b) / 3))


def test_structured_text_has_a_lower_bigram_than_unigram_entropy():
    text = b"the cat sat on the mat and the rat ate the hat " * 40
    ngrams = ByteNgrams(np.frombuffer(text, dtype=np.uint8))
    held_out = windows(text[:400], 32)
    unigram, bigram = ngrams.unigram_bpb(held_out), ngrams.bigram_bpb(held_out)
    assert 0 < bigram < unigram < 8


def test_counting_in_chunks_counts_every_byte_and_pair_once(monkeypatch):
    from archlab.train import ngram

    text = np.frombuffer(b"abracadabra, said the cat; " * 7, dtype=np.uint8)
    whole = ByteNgrams(text)
    monkeypatch.setattr(ngram, "CHUNK", 5)  # chunk edges fall inside words
    chunked = ByteNgrams(text)
    np.testing.assert_allclose(chunked.unigram, whole.unigram)
    np.testing.assert_allclose(chunked.bigram, whole.bigram)


def test_too_little_data_is_refused():
    with pytest.raises(ValueError, match="at least 2 bytes"):
        ByteNgrams(np.zeros(1, dtype=np.uint8))


def test_trainer_reports_the_unigram_entropy_of_its_eval_bytes(tiny_config):
    """Checked against a count written out here: Counter over the train split, add-half over 256 byte values."""
    trainer = Trainer(tiny_config())
    counts = Counter(bytes(np.asarray(trainer.corpus.train)))
    total = len(trainer.corpus.train) + 128
    scored = [int(b) for batch in trainer.eval_set for b in batch[:, 1:].flatten()]
    expected = -sum(math.log2((counts[b] + 0.5) / total) for b in scored) / len(scored)
    assert trainer.evaluate()["unigram_bpb"] == pytest.approx(expected, rel=1e-9)
    assert 4 < expected < 5.5  # English text: ~4.8 bits per byte
