"""Byte-level data: find a corpus, memory-map it, split it, and cut it into training and eval windows.

Every corpus is a flat file of bytes (the tokenizer is the identity on UTF-8 bytes, 256 symbols). A file is
found under the data roots (`data_roots()`), memory-mapped read-only, and split contiguously:
train = the first (1 - val - test) of the bytes, then val, then test. Compressed files (.xz, .gz, .zip)
are decompressed once into the cache and memory-mapped from there.

Training windows come from `WindowSampler`: batch i is a pure function of (seed, rank, i), so resuming
needs nothing but the next batch index. Scoring uses `eval_batches`: the same fixed, non-overlapping
windows for every architecture.
"""
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import zipfile
import zlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from archlab.kernels.common.files import atomic_output
from archlab.train.errors import DataError

REPO_CORPORA = Path(__file__).parent / "corpora"
FETCHABLE = ("enwik8", "text8")  # what `archlab data fetch` can download (train/fetch.py)
COMPRESSED_SUFFIXES = (".xz", ".gz", ".zip")
CHUNK = 1 << 20


# -- finding files ----------------------------------------------------------------------------------

def data_roots() -> list[Path]:
    """Folders searched for relative data paths, in order: $ARCHLAB_DATA, the shipped corpora, ../shared/data,
    and the cache's data/ folder (where `archlab data fetch` puts what it downloads by default)."""
    roots = [Path(p).expanduser() for p in os.environ.get("ARCHLAB_DATA", "").split(os.pathsep) if p]
    roots.append(REPO_CORPORA)
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if shared.is_dir():
        roots.append(shared)
    roots.append(cache_dir() / "data")
    return roots


def _how_to_get(name: str) -> str:
    if Path(name).name in FETCHABLE:
        return (f"get it with `archlab data fetch {Path(name).name}` (needs a network), or set ARCHLAB_DATA "
                "to a folder that holds it")
    return f"put it in one of them or set ARCHLAB_DATA to the folder that holds it (several: join with {os.pathsep!r})"


def resolve_data_path(path: str | Path) -> Path:
    """An absolute path as is; a relative one under the first data root that has it, else in the cwd."""
    path = Path(path).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise DataError(f"data file {path} does not exist; fix data.path or {_how_to_get(str(path))}")
        return path
    roots = data_roots()
    for root in roots:
        if (root / path).exists():
            return root / path
    if path.exists():  # last, a path relative to where the command runs
        return path.resolve()
    raise DataError(f"data file {str(path)!r} is not in any data root ({', '.join(map(str, roots))}); "
                    f"{_how_to_get(str(path))}")


def cache_dir() -> Path:
    return Path(os.environ.get("ARCHLAB_CACHE") or Path.home() / ".cache" / "archlab").expanduser()


# -- reading bytes ----------------------------------------------------------------------------------

def sha256_of_file(path: Path) -> str:
    """Streamed, so a large archive is never held in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist; fix data.path or {_how_to_get(str(path))}")
    if path.is_dir():
        raise DataError(f"data path {path} is a directory; data.path must name a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise DataError(f"cannot read data file {path} ({err.strerror or err}); fix its permissions "
                        "or point data.path at a readable copy") from None
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty; point data.path at a file with text in it")


@contextlib.contextmanager
def _open_archive(path: Path):
    """A binary stream of the decompressed bytes."""
    if path.suffix == ".xz":
        with lzma.open(path, "rb") as stream:
            yield stream
    elif path.suffix == ".gz":
        with gzip.open(path, "rb") as stream:
            yield stream
    else:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) != 1:
                raise DataError(f"{path} holds {len(members)} files, not one; unzip it and set data.path "
                                "to the file you mean")
            with archive.open(members[0]) as stream:
                yield stream


def _decompress(path: Path, out_path: Path) -> dict:
    """Decompress `path` into `out_path` atomically; return the size and sha256 of what was written."""
    digest, size = hashlib.sha256(), 0
    try:
        with _open_archive(path) as src, atomic_output(out_path) as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except (lzma.LZMAError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error, EOFError) as err:
        _remove_empty_cache_folders(out_path.parent)
        raise DataError(f"{path} is not a valid {path.suffix} archive ({err}); re-download it or "
                        "decompress it yourself and point data.path at the result") from None
    if size == 0:  # nothing to train on: keep no cache entry for it
        out_path.unlink()
        _remove_empty_cache_folders(out_path.parent)
        raise DataError(f"{path} decompresses to nothing; point data.path at a file with text in it")
    return {"size": size, "sha256": digest.hexdigest()}


def _remove_empty_cache_folders(folder: Path) -> None:
    """A failed first decompression leaves no empty cache folders (corpora/, then the cache root) behind."""
    for empty in (folder, folder.parent):
        with contextlib.suppress(OSError):
            empty.rmdir()


def _cached_decompression(path: Path) -> tuple[Path, str]:
    """The decompressed copy of `path` in the cache (built if missing or stale) and its sha256."""
    source_sha256 = sha256_of_file(path)
    name = path.name[: -len(path.suffix)]
    cached = cache_dir() / "corpora" / f"{name}-{source_sha256[:16]}.bin"
    sidecar = cached.with_suffix(".json")
    try:
        record = json.loads(sidecar.read_text())
        if (record["source_sha256"] == source_sha256 and cached.stat().st_size == record["size"]
                and sha256_of_file(cached) == record["sha256"]):
            return cached, record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no cache yet, or a broken one: rebuild it
    try:
        record = {"source": str(path), "source_sha256": source_sha256, **_decompress(path, cached)}
        with atomic_output(sidecar) as out:
            out.write(json.dumps(record, indent=1).encode())
    except OSError as err:
        raise DataError(f"cannot decompress {path} into {cached.parent} ({err.strerror or err}); free some disk "
                        "space or set ARCHLAB_CACHE to a writable folder") from None
    return cached, record["sha256"]


def load_bytes(path: Path, expected_sha256: str | None = None) -> np.ndarray:
    """The file's bytes as a read-only uint8 memmap; compressed files are decompressed once into the cache."""
    path = Path(path)
    _check_readable_file(path)
    if path.suffix in COMPRESSED_SUFFIXES:
        path, actual_sha256 = _cached_decompression(path)
    else:
        actual_sha256 = sha256_of_file(path) if expected_sha256 else None
    if expected_sha256 and actual_sha256 != expected_sha256.strip().lower():
        raise DataError(f"{path} has sha256 {actual_sha256} but data.sha256 is {expected_sha256}; "
                        "the file is damaged or a different version: replace it, or fix data.sha256")
    return np.memmap(path, dtype=np.uint8, mode="r")


# -- splits -----------------------------------------------------------------------------------------

def split_bounds(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(end of train, end of val). Fractions count as the decimals written (0.05 is exactly 1/20), so
    90/5/5 of 10**8 bytes is exactly 90M/5M/5M and 0.1 gives nanoGPT's int(n * 0.9)."""
    val, test = Fraction(str(val_fraction)), Fraction(str(test_fraction))
    return int(n * (1 - val - test)), int(n * (1 - test))


class ByteCorpus:
    """A byte file split contiguously into train, val and test (views of one memmap)."""

    def __init__(self, path: Path, data: np.ndarray, val_fraction: float, test_fraction: float):
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be >= 0 "
                            "with a sum below 1; fix data.val_fraction / data.test_fraction")
        self.path, self.data = Path(path), data
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        train_end, val_end = split_bounds(len(data), val_fraction, test_fraction)
        self.train, self.val, self.test = data[:train_end], data[train_end:val_end], data[val_end:]

    @classmethod
    def open(cls, path, *, val_fraction: float = 0.1, test_fraction: float = 0.0,
             sha256: str | None = None) -> "ByteCorpus":
        return cls(Path(path), load_bytes(Path(path), sha256), val_fraction, test_fraction)

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; use train, val or test")
        data = getattr(self, name)
        if len(data) == 0:
            raise DataError(f"the {name} split of {self.path.name} is empty; set data.{name}_fraction above 0")
        return data

    def check_seq_len(self, seq_len: int) -> None:
        """Each split in use must hold at least one window of seq_len + 1 bytes."""
        used = {"train": self.train}
        if self.val_fraction > 0:
            used["val"] = self.val
        if self.test_fraction > 0:
            used["test"] = self.test
        for name, data in used.items():
            if len(data) < seq_len + 1:
                more = "a larger data file" if name == "train" else f"a larger data.{name}_fraction"
                raise DataError(f"data.seq_len={seq_len} needs {seq_len + 1} bytes but the {name} split of "
                                f"{self.path.name} has only {len(data)}; lower data.seq_len or use {more}")


# -- windows ----------------------------------------------------------------------------------------

def gather_windows(data, starts: np.ndarray, length: int, doc_starts: np.ndarray | None = None) -> torch.Tensor:
    """(len(starts), length) LongTensor of data[s : s + length], with one fancy index on the memmap (or the
    split's own `gather`, a prepared dataset's shards). With doc_starts (sorted offsets where documents start), a
    documents batch (len(starts), 2, length): the tokens and each token's document number."""
    positions = np.add.outer(starts, np.arange(length))
    if isinstance(data, np.ndarray):
        rows = torch.from_numpy(np.asarray(data[positions])).long()
    else:
        rows = data.gather(np.asarray(starts, dtype=np.int64), length)
    if doc_starts is None:
        return rows
    document = torch.from_numpy(np.searchsorted(doc_starts, positions, side="right").astype(np.int64))
    return torch.stack([rows, document], dim=1)


# -- training windows -------------------------------------------------------------------------------

class WindowSampler:
    """Random windows of seq_len + 1 bytes; batch i depends only on (seed, rank, i), so it resumes exactly.

    Each rank seeds its own generator with its rank, so ranks draw independent windows.
    """

    def __init__(self, data: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, doc_starts: np.ndarray | None = None):
        if len(data) < seq_len + 1:
            raise DataError(f"data.seq_len={seq_len} needs {seq_len + 1} bytes but the training data has only "
                            f"{len(data)}; lower data.seq_len or use a larger data file")
        if seed < 0:
            raise DataError(f"the data seed must be >= 0, got {seed}; set train.seed to a non-negative integer")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}; launch with torchrun")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.doc_starts = doc_starts  # packing: a window keeps whole and cut documents apart by their numbers
        self.next_index = 0

    def batch(self, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.rank, index])
        starts = rng.integers(0, len(self.data) - self.seq_len, size=self.batch_size)
        return gather_windows(self.data, starts, self.seq_len + 1, self.doc_starts)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        batch = self.batch(self.next_index)
        self.next_index += 1
        return batch

    def state_dict(self) -> dict:
        return {"next_index": self.next_index, "seed": self.seed, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restores the position. Rank and world size are not checked: ranks advance in lockstep, so one
        rank's state resumes them all, and resuming on another world size is allowed (a different stream)."""
        settings = {"seed": "train.seed", "seq_len": "data.seq_len", "batch_size": "train.batch_size"}
        changed = [f"{setting} was {state.get(key)}, now {getattr(self, key)}"
                   for key, setting in settings.items() if state.get(key) != getattr(self, key)]
        if changed:
            raise DataError(f"cannot resume the data sampler: {'; '.join(changed)}; resume with the saved "
                            "settings or start a new run.dir")
        if "next_index" not in state:
            raise DataError("the saved sampler state has no next_index; the checkpoint was not written by archlab")
        self.next_index = int(state["next_index"])


# -- the held-out set -------------------------------------------------------------------------------

def eval_batches(data: np.ndarray, *, seq_len: int, batch_size: int, max_tokens: int | None,
                 doc_starts: np.ndarray | None = None) -> list[torch.Tensor]:
    """The fixed held-out windows every architecture is scored on, in batches (the last may be smaller).

    Window j is data[j * seq_len : j * seq_len + seq_len + 1], so windows tile the split and each byte is
    predicted once (with doc_starts, documents batches: each document's first token is then context only).
    With max_tokens, at most max_tokens // seq_len windows, evenly spaced over the whole
    split so the score represents all of it.
    """
    n_windows = (len(data) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"data.seq_len={seq_len} needs {seq_len + 1} bytes but the eval split has only "
                        f"{len(data)}; lower data.seq_len or raise the split's fraction")
    chosen = np.arange(n_windows)
    if max_tokens is not None:
        keep = max_tokens // seq_len
        if keep < 1:
            raise DataError(f"eval max_tokens={max_tokens} is below data.seq_len={seq_len}, so no window fits; "
                            "raise train.eval_tokens or lower data.seq_len")
        if keep < n_windows:
            chosen = np.arange(keep) * n_windows // keep
    windows = gather_windows(data, chosen * seq_len, seq_len + 1, doc_starts)
    return list(windows.split(batch_size))
