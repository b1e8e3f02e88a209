"""Reference entropies of held-out bytes under byte n-gram statistics of the train split.

They are the floor lines of the bits-per-byte scale: a model (or a probe on a model's features) that knows only
byte frequencies reaches the unigram figure, one that knows only the previous byte the bigram figure. Both score
the same bytes the next-byte objectives score: batch[:, 1:] of each (B, L + 1) window, the bigram conditioning on
batch[:, :-1].

With another tokenizer (a prepared dataset) the unigram counts its tokens and divides the bits by the scored tokens'
UTF-8 bytes, as the objectives do; packed documents batches score only the tokens the objectives score.

Smoothing, so that a byte unseen in train costs finite bits: unigram p(b) = (c(b) + 1/2) / (N + V / 2), add-half
over the V token values (256 bytes); bigram p(b | a) = (c(a, b) + p(b)) / (c(a) + 1), a Dirichlet prior of total
weight 1 centred on the unigram. On tinyshakespeare the choice moves either figure by less than 0.01 bits.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from archlab.archs.model import IGNORE, split_documents

BYTE_VALUES = 256
CHUNK = 1 << 24  # bytes counted at a time: counting converts to int64, 8x the chunk's size in memory


class ByteNgrams:
    """`train`: the train split, an ndarray of byte ids or a prepared TokenSplit (read through its `gather`)."""

    def __init__(self, train, vocab_size: int = BYTE_VALUES, token_bytes: np.ndarray | None = None):
        if len(train) < 2:
            raise ValueError("the train split needs at least 2 bytes for n-gram statistics")
        self.train = train
        counts = sum(np.bincount(_chunk(train, start, CHUNK), minlength=vocab_size)
                     for start in range(0, len(train), CHUNK)).astype(np.float64)
        self.unigram = (counts + 0.5) / (counts.sum() + 0.5 * vocab_size)
        self.token_bytes = np.ones(vocab_size) if token_bytes is None else np.asarray(token_bytes, dtype=np.float64)

    @functools.cached_property
    def bigram(self) -> np.ndarray:
        """(256, 256) p(next | previous); counted on first use (a pass over the train split, chunk by chunk)."""
        pairs = np.zeros(BYTE_VALUES ** 2, dtype=np.int64)
        for start in range(0, len(self.train) - 1, CHUNK):  # chunks overlap by one byte: every pair counted once
            chunk = np.asarray(self.train[start:start + CHUNK + 1]).astype(np.int64)
            pairs += np.bincount(chunk[:-1] * BYTE_VALUES + chunk[1:], minlength=BYTE_VALUES ** 2)
        pairs = pairs.reshape(BYTE_VALUES, BYTE_VALUES).astype(np.float64)
        return (pairs + self.unigram) / (pairs.sum(axis=1, keepdims=True) + 1.0)

    def unigram_bits(self, ids: np.ndarray) -> float:
        """Mean bits of the byte ids under the unigram distribution."""
        return float(-np.log(self.unigram[np.asarray(ids)]).mean() / math.log(2))

    def unigram_bpb(self, batches: Sequence[torch.Tensor]) -> float:
        """Bits per byte of the batches' scored next tokens under the unigram distribution."""
        scored = np.concatenate([_scored_targets(batch) for batch in batches])
        bits = -np.log(self.unigram[scored]).sum() / math.log(2)
        return float(bits / max(self.token_bytes[scored].sum(), 1))

    def bigram_bpb(self, batches: Sequence[torch.Tensor]) -> float:  # byte batches only (the linear probe's)
        """Mean bits of the batches' next bytes given the byte before each, under the bigram distribution."""
        previous = np.concatenate([batch[:, :-1].reshape(-1).numpy() for batch in batches])
        scored = np.concatenate([batch[:, 1:].reshape(-1).numpy() for batch in batches])
        return float(-np.log(self.bigram[previous, scored]).mean() / math.log(2))


def _chunk(train, start: int, size: int) -> np.ndarray:
    """train[start : start + size] as an ndarray of ids (a TokenSplit is read through its gather)."""
    if isinstance(train, np.ndarray):
        return np.asarray(train[start:start + size])
    return train.gather(np.array([start]), min(size, len(train) - start))[0].numpy()


def _scored_targets(batch: torch.Tensor) -> np.ndarray:
    """The next tokens an objective scores: batch[:, 1:], less those of another document than their input."""
    _, targets, _ = split_documents(batch)
    targets = targets.reshape(-1).numpy()
    return targets[targets != IGNORE]
