"""A run's text: its splits as token streams, where documents start in each, and the tokenizer that made them.

Two sources, chosen by data.path:
  - a text file (train/data.py's ByteCorpus): bytes, split contiguously; documents start where a line matches
    data.separator (a regex), or the file is one stream;
  - a prepared directory (`archlab data prepare`, train/prepared.py): token shards of any tokenizer, split by
    document, with a document index. Its manifest's sha256 is the run's data identity (data.identity), so a resume
    on changed data is refused. data.prepare builds it first when missing (one command from raw text to a run).

Rows: with data.packing=documents and known boundaries, every window carries its tokens' document ids and becomes
a (B, 2, L + 1) documents batch (archs/model.py); otherwise (B, L + 1) as before.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from archlab.train.data import ByteCorpus, cache_dir, resolve_data_path
from archlab.train.errors import DataError
from archlab.train.tokenizers import ByteTokenizer

MANIFEST = "manifest.json"


@dataclass
class Corpus:
    """What the trainer reads: splits (ndarrays of byte ids, or prepared TokenSplits), their document starts (None
    where the text has no boundaries, or packing is off), the tokenizer, and the data's identity."""

    name: str
    splits: dict  # split name -> ndarray or TokenSplit (both hold len(); prepared ones gather, arrays index)
    doc_starts: dict  # split name -> np.ndarray of document start offsets, or None
    tokenizer: object
    identity: str | None = None  # sha256 of a prepared dataset's manifest

    def split(self, name: str):
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; use train, val or test")
        data = self.splits.get(name)
        if data is None or len(data) == 0:
            raise DataError(f"the {name} split of {self.name} is empty; set data.{name}_fraction above 0 (or prepare "
                            "the dataset with one)")
        return data

    @property
    def train(self):
        return self.split("train")

    @property
    def has_documents(self) -> bool:
        return any(starts is not None for starts in self.doc_starts.values())

    def check_seq_len(self, seq_len: int, splits: tuple[str, ...]) -> None:
        for name in splits:
            if len(self.split(name)) < seq_len + 1:
                raise DataError(f"data.seq_len={seq_len} needs {seq_len + 1} tokens but the {name} split of "
                                f"{self.name} has only {len(self.split(name))}; lower data.seq_len or use more data")

    def describe_documents(self, split: str, seq_len: int) -> str:
        """One line on a split's documents: how many, and how many are longer than a window (each of those is
        split across rows: its later pieces start without its beginning)."""
        starts = self.doc_starts[split]
        lengths = np.diff(np.append(starts, len(self.split(split))))
        long = int((lengths > seq_len + 1).sum())
        return (f"{len(starts):,} {split} documents packed into rows of {seq_len + 1} tokens (median "
                f"{int(np.median(lengths)):,} tokens); {long:,} longer than a row are split across rows")


def separator_starts(data: np.ndarray, separator: str) -> np.ndarray:
    """Offsets where a document starts in a byte split: 0, and the start of each line `separator` matches in."""
    try:
        pattern = re.compile(separator.encode(), re.MULTILINE)
    except re.error as err:
        raise DataError(f"data.separator {separator!r} is not a valid regex ({err}); fix it") from None
    text = bytes(data)
    starts = [text.rfind(b"\n", 0, match.start()) + 1 for match in pattern.finditer(text)]  # the match's line
    return np.unique(np.asarray([0, *starts], dtype=np.int64))


def open_corpus(cfg) -> Corpus:
    """The run's corpus (cfg: train.config.Config); one DataError line for anything missing or inconsistent."""
    data = cfg.data
    path = prepared_path(cfg)
    if path is not None:
        return _open_prepared(path, cfg)
    if data.tokenizer not in (None, "bytes"):
        raise DataError(f"data.tokenizer={data.tokenizer} needs a prepared dataset: run `archlab data prepare "
                        f"{data.path} --tokenizer {data.tokenizer} --out DIR` and set data.path=DIR, or add a "
                        "data.prepare section")
    corpus = ByteCorpus.open(resolve_data_path(data.path), val_fraction=data.val_fraction,
                             test_fraction=data.test_fraction, sha256=data.sha256)
    splits = {"train": corpus.train, "val": corpus.val, "test": corpus.test}
    documents = data.separator is not None and data.packing == "documents"
    doc_starts = {name: separator_starts(split, data.separator) if documents and len(split) else None
                  for name, split in splits.items()}
    used = ("train", "val") + (("test",) if data.test_fraction > 0 else ())
    result = Corpus(corpus.path.name, splits, doc_starts, ByteTokenizer())
    result.check_seq_len(data.seq_len, used)
    return result


def prepared_path(cfg) -> Path | None:
    """The prepared dataset directory of the config (built now from data.prepare if it is missing), or None when
    data.path is a text file."""
    data = cfg.data
    if data.prepare is not None:
        out = Path(data.path).expanduser()
        out = out if out.is_absolute() else cache_dir() / "datasets" / out
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (out / MANIFEST).exists():
            raise DataError(f"{out} is not prepared yet, and every process of a torchrun launch would prepare it at "
                            "once; run `archlab data prepare` (or this config in one process) first")
        from archlab.train.prepare import prepare_dataset

        spec = data.prepare  # prepares, resumes an unfinished prepare, or checks that out holds this very dataset
        prepare_dataset([resolve_data_path(source) for source in spec.sources], out, tokenizer=spec.tokenizer,
                        train_tokenizer=spec.train_tokenizer, split_on=spec.split_on, max_doc_chars=spec.max_doc_chars,
                        val_fraction=data.val_fraction, test_fraction=data.test_fraction)
        return out
    path = resolve_data_path(data.path)
    return path if path.is_dir() and (path / MANIFEST).exists() else None


def _open_prepared(path: Path, cfg) -> Corpus:
    from archlab.train.prepared import PreparedDataset

    if cfg.data.separator is not None:
        raise DataError(f"data.separator is for text files; {path} is a prepared dataset with its own documents: "
                        "remove data.separator (prepare with --split-on to cut documents differently)")
    dataset = PreparedDataset.open(path)
    tokenizer = dataset.tokenizer
    if cfg.data.tokenizer is not None and cfg.data.tokenizer != tokenizer.spec and cfg.data.tokenizer != "dataset":
        raise DataError(f"data.tokenizer={cfg.data.tokenizer} but {path} was prepared with {tokenizer.spec}; remove "
                        "data.tokenizer (a prepared dataset brings its own) or prepare the data again")
    splits = {name: dataset.split(name) for name in ("train", "val", "test") if _has_split(dataset, name)}
    documents = cfg.data.packing == "documents"
    doc_starts = {name: split.doc_starts if documents else None for name, split in splits.items()}
    used = tuple(splits)
    corpus = Corpus(path.name, splits, doc_starts, tokenizer, identity=dataset.manifest_sha256)
    corpus.check_seq_len(cfg.data.seq_len, ("train", "val") if "val" in used else ("train",))
    return corpus


def _has_split(dataset, name: str) -> bool:
    try:
        return len(dataset.split(name)) > 0
    except DataError:
        return False
