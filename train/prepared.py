"""Reading a folder written by `archlab data prepare`: each split's token shards as one memory-mapped sequence.

`PreparedDataset.open` checks the manifest and that every shard is there with its recorded size (cheap);
`verify` (and `archlab data verify DIR`) also checks every file's sha256. Nothing is loaded whole: tokens stay in
np.memmap's, and windows are gathered from them, across shard boundaries where they fall on one.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from archlab.train.data import sha256_of_file
from archlab.train.errors import DataError
from archlab.train.prepare import FORMAT, SPLITS, VERSION
from archlab.train.tokenizers import Tokenizer, load_tokenizer


class TokenSplit:
    """One split: the concatenation of its shards' tokens, with the token offsets where its documents start."""

    def __init__(self, folder: Path, name: str, record: dict, dtype: str):
        self.name, self.n_bytes, self.n_documents = name, int(record["bytes"]), int(record["documents"])
        self._folder, self._records = folder, record["shards"]
        self.shards = [np.memmap(folder / shard["tokens_file"], dtype=dtype, mode="r") for shard in self._records]
        self.offsets = np.cumsum([0] + [len(shard) for shard in self.shards])  # where each shard starts

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @functools.cached_property
    def doc_starts(self) -> np.ndarray:
        """int64, sorted: the split-wide token offset where each document starts (the first is 0)."""
        if not self._records:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.memmap(self._folder / shard["index_file"], dtype=np.int64, mode="r") + offset
                               for shard, offset in zip(self._records, self.offsets, strict=False)])

    def gather(self, starts: np.ndarray, length: int) -> torch.Tensor:
        """(len(starts), length) LongTensor: row i is tokens [starts[i], starts[i] + length) of the split."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > len(self)):
            raise ValueError(f"windows of {length} tokens from {starts.min()} to {starts.max()} do not fit in the "
                             f"{self.name} split's {len(self)} tokens")
        rows = np.empty((len(starts), length), dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, starts, side="right") - 1
        for row, (start, shard) in enumerate(zip(starts, shard_of, strict=True)):
            filled, position = 0, start - self.offsets[shard]
            while filled < length:  # more than once only for a window that crosses into the next shard
                piece = self.shards[shard][position: position + length - filled]
                rows[row, filled: filled + len(piece)] = piece
                filled, shard, position = filled + len(piece), shard + 1, 0
        return torch.from_numpy(rows)


class PreparedDataset:
    def __init__(self, folder: Path, manifest: dict, manifest_sha256: str, tokenizer: Tokenizer):
        self.folder, self.manifest, self.manifest_sha256, self.tokenizer = folder, manifest, manifest_sha256, tokenizer

    @classmethod
    def open(cls, folder: str | Path) -> PreparedDataset:
        folder = Path(folder).expanduser()
        path = folder / "manifest.json"
        if not path.is_file():
            raise DataError(f"{folder} is not a prepared dataset (no manifest.json); write one with `archlab data "
                            "prepare SRC --out DIR`, or finish an interrupted one by running its command again")
        data = path.read_bytes()
        try:
            manifest = json.loads(data)
            known = manifest.get("format") == FORMAT and manifest.get("version") == VERSION
        except (ValueError, AttributeError):
            known = False
        if not known:
            raise DataError(f"{path} is not a version {VERSION} archlab prepared-dataset manifest; prepare the data "
                            "again with this archlab")
        for shard, kind in _files(manifest):
            file = folder / shard[f"{kind}_file"]
            if not file.is_file():
                raise DataError(f"{file} is missing from the prepared dataset; restore it, or delete manifest.json and "
                                "rerun the prepare command to rebuild what is missing")
            if file.stat().st_size != shard[f"{kind}_size"]:
                raise DataError(f"{file} has {file.stat().st_size:,} bytes, not the {shard[f'{kind}_size']:,} its "
                                "manifest records (truncated?); delete manifest.json and rerun the prepare command")
        tokenizer = load_tokenizer(manifest["tokenizer"]["spec"], root=folder)
        return cls(folder, manifest, hashlib.sha256(data).hexdigest(), tokenizer)

    def verify(self) -> None:
        """Every shard and index file against its recorded sha256 (reads them all)."""
        for shard, kind in _files(self.manifest):
            file = self.folder / shard[f"{kind}_file"]
            if sha256_of_file(file) != shard[f"{kind}_sha256"]:
                raise DataError(f"{file} does not match the sha256 in its manifest (damaged); delete manifest.json "
                                "and that file, then rerun the prepare command to rebuild it")

    def split(self, name: str) -> TokenSplit:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use {', '.join(SPLITS)}")
        record = self.manifest["splits"][name]
        if record["tokens"] == 0:
            advice = "prepare it from more text" if name == "train" else f"prepare it with --{name}-fraction above 0"
            raise DataError(f"the {name} split of {self.folder} is empty; {advice}")
        return TokenSplit(self.folder, name, record, self.manifest["dtype"])


def _files(manifest: dict):
    for record in manifest["splits"].values():
        for shard in record["shards"]:
            yield shard, "tokens"
            yield shard, "index"
