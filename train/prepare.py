"""`archlab data prepare`: documents -> token shards per split + a document index + a manifest, in parallel, resumable.

The document stream (sources in order, documents in order, numbered from 0) is cut into batches of about
`batch_chars` characters; worker processes tokenize batches, the main process writes their tokens in order. Each
document goes to train, val or test by a 64-bit hash of its number and its text (independent of the worker count
and of every other document). A shard group closes after the batch that brings it to `shard_tokens` tokens: it
holds one shard per split, `<split>/<group>.bin` (tokens, uint16 where the vocabulary fits, else uint32) with
`<split>/<group>.idx` (int64: the token offset in the shard where each of its documents starts). Each document is
its tokenizer's bos_id (when it has one) followed by its text's tokens; documents never cross shards.

Resuming: a finished group is recorded in `.prepare/group-<n>.json` after its shards are in place, so a killed
run keeps every finished group whose shards still match their record, and restarts at the first document after
them; the groups are the same whatever happened, so the result is byte-identical to an uninterrupted run.
manifest.json is written last. The tokenizer's file is copied in, so the folder is self-contained.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from archlab.kernels.common.files import atomic_path, atomic_write, json_text
from archlab.train.errors import DataError
from archlab.train.sources import Source, TextSplitting, check_source, documents, open_source, source_record
from archlab.train.tokenizers import Tokenizer, load_tokenizer, train_bpe_tokenizer

FORMAT, VERSION = "archlab-prepared", 1
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_TOKENS = 100_000_000
MAX_BATCH_CHARS = 1 << 20  # a worker's unit of work


def split_cuts(val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Hash thresholds: a document whose 64-bit hash is below the first is test, below the second val."""
    val, test = Fraction(str(val_fraction)), Fraction(str(test_fraction))
    return int(test * 2**64), int((test + val) * 2**64)


def split_of(position: int, data: bytes, cuts: tuple[int, int]) -> str:
    digest = hashlib.blake2b(position.to_bytes(8, "little") + data, digest_size=8).digest()
    h = int.from_bytes(digest, "little")
    return "test" if h < cuts[0] else "val" if h < cuts[1] else "train"


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


# -- workers ----------------------------------------------------------------------------------------

_worker: dict = {}


def _start_worker(tokenizer_spec: str, root: str, cuts: tuple[int, int], dtype: str) -> None:
    _worker.update(tokenizer=load_tokenizer(tokenizer_spec, root=Path(root)), cuts=cuts, dtype=dtype)


def _encode_batch(batch: list[tuple[int, str]]) -> dict:
    """Per split: the batch's tokens, each document's token count and its UTF-8 bytes; and the empty documents."""
    tokenizer: Tokenizer = _worker["tokenizer"]
    kept = [(position, text) for position, text in batch if text.strip()]
    encoded = tokenizer.encode_batch([text for _, text in kept])
    prefix = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    parts: dict[str, list] = {name: [] for name in SPLITS}
    n_bytes = dict.fromkeys(SPLITS, 0)
    for (position, text), ids in zip(kept, encoded, strict=True):
        data = text.encode("utf-8")
        name = split_of(position, data, _worker["cuts"])
        parts[name].append(prefix + ids)
        n_bytes[name] += len(data)
    splits = {}
    for name, docs in parts.items():
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        tokens = np.fromiter(itertools.chain.from_iterable(docs), dtype=_worker["dtype"], count=int(lengths.sum()))
        splits[name] = (tokens, lengths, n_bytes[name])
    return {"splits": splits, "documents": len(batch), "empty": len(batch) - len(kept),
            "chars": sum(len(text) for _, text in batch)}


# -- writing ----------------------------------------------------------------------------------------

class _HashedFile:
    """A file written under a temporary name, hashed on the way, moved onto its name by `finish`."""

    def __init__(self, path: Path):
        self.path, self.temporary = path, path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file, self.digest, self.size = open(self.temporary, "wb"), hashlib.sha256(), 0

    def write(self, array: np.ndarray) -> None:
        data = array.tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def finish(self) -> tuple[int, str]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.temporary, self.path)
        return self.size, self.digest.hexdigest()


class _Group:
    """One shard group being written: per split, a token file and an index file."""

    def __init__(self, out: Path, number: int, first_document: int):
        self.out, self.number, self.first_document = out, number, first_document
        self.next_document, self.empty, self.tokens = first_document, 0, 0
        self.files: dict[str, tuple[_HashedFile, _HashedFile]] = {}
        self.counts = {name: {"tokens": 0, "documents": 0, "bytes": 0} for name in SPLITS}

    def add(self, result: dict) -> None:
        for name, (tokens, lengths, n_bytes) in result["splits"].items():
            if len(lengths) == 0:
                continue
            if name not in self.files:
                stem = self.out / name / f"{self.number:06d}"
                self.files[name] = (_HashedFile(stem.with_suffix(".bin")), _HashedFile(stem.with_suffix(".idx")))
            token_file, index_file = self.files[name]
            counts = self.counts[name]
            starts = counts["tokens"] + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
            token_file.write(tokens)
            index_file.write(starts)
            counts["tokens"] += len(tokens)
            counts["documents"] += len(lengths)
            counts["bytes"] += n_bytes
            self.tokens += len(tokens)
        self.next_document += result["documents"]
        self.empty += result["empty"]

    def finish(self) -> dict:
        """Puts the shards in place, then the group's record (which marks it finished)."""
        shards = {}
        for name, (token_file, index_file) in self.files.items():
            tokens_size, tokens_sha256 = token_file.finish()
            index_size, index_sha256 = index_file.finish()
            shards[name] = {**self.counts[name],
                            "tokens_file": f"{name}/{token_file.path.name}", "tokens_size": tokens_size,
                            "tokens_sha256": tokens_sha256, "index_file": f"{name}/{index_file.path.name}",
                            "index_size": index_size, "index_sha256": index_sha256}
        record = {"group": self.number, "first_document": self.first_document, "next_document": self.next_document,
                  "empty_documents": self.empty, "shards": shards}
        atomic_write(_group_record(self.out, self.number), json_text(record))
        return record


def _group_record(out: Path, number: int) -> Path:
    return out / ".prepare" / f"group-{number:06d}.json"


def _file_matches(path: Path, size: int, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == sha256


def _finished_groups(out: Path) -> list[dict]:
    """The records of the finished groups whose shards are intact, in order; the rest (records and shards) go."""
    records = []
    while (path := _group_record(out, len(records))).is_file():
        record = json.loads(path.read_text())
        intact = all(_file_matches(out / shard[f"{kind}_file"], shard[f"{kind}_size"], shard[f"{kind}_sha256"])
                     for shard in record["shards"].values() for kind in ("tokens", "index"))
        if not intact:
            break
        records.append(record)
    for stale in (out / ".prepare").glob("group-*.json"):
        if int(stale.stem.split("-")[1]) >= len(records):
            stale.unlink()
    for name in SPLITS:
        for shard in (out / name).glob("*") if (out / name).is_dir() else ():
            if not shard.name.startswith(".") and int(shard.stem) >= len(records):
                shard.unlink()
    return records


# -- the command ------------------------------------------------------------------------------------

def _document_stream(sources: Sequence[Source], text_field: str, split_on) -> Iterator[str]:
    for source in sources:
        yield from documents(source, text_field, split_on)


def _batches(docs: Iterator[str], start: int, batch_chars: int) -> Iterator[list[tuple[int, str]]]:
    """Documents from number `start` on, in batches that close once they hold batch_chars characters."""
    batch, chars = [], 0
    for position, text in enumerate(docs):
        if position < start:
            continue
        batch.append((position, text))
        chars += len(text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _check_arguments(tokenizer, train_tokenizer, val_fraction, test_fraction, workers, shard_tokens, split_on,
                     max_doc_chars) -> TextSplitting:
    if (tokenizer is None) == (train_tokenizer is None):
        raise DataError("pass exactly one of --tokenizer SPEC and --train-tokenizer VOCAB")
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be >= 0 with a sum "
                        "below 1")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens must be at least 1, got {shard_tokens}")
    if max_doc_chars is not None and max_doc_chars < 1:
        raise DataError(f"--max-doc-chars must be at least 1, got {max_doc_chars}")
    try:
        return TextSplitting(re.compile(split_on) if split_on is not None else None, max_doc_chars)
    except re.error as err:
        raise DataError(f"--split-on {split_on!r} is not a valid regular expression ({err})") from None


def _holds(path: Path, wanted: dict) -> bool:
    """Whether the JSON file at `path` has `wanted`'s keys with the same values (an unreadable one has not)."""
    try:
        found = json.loads(path.read_text())
        return {key: found.get(key) for key in wanted} == wanted
    except (ValueError, AttributeError):
        return False


def _check_out_dir(out: Path, wanted: dict) -> bool:
    """True when `out` already holds this exact dataset; False when it is new, empty or a partial run of it."""
    manifest, settings = out / "manifest.json", out / ".prepare" / "settings.json"
    if manifest.is_file():
        if not _holds(manifest, wanted):
            raise DataError(f"{out} already holds a different prepared dataset (its manifest.json differs in sources "
                            "or settings); choose another --out or delete that folder")
        return True
    if settings.is_file():
        if not _holds(settings, wanted):
            raise DataError(f"{out} holds an unfinished prepare with other sources or settings; rerun that command "
                            "to finish it, or choose another --out")
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"--out {out} exists and is not an empty folder or a prepared dataset; choose a new folder")
    return False


def prepare_dataset(sources: Sequence[str | Path], out: str | Path, *, tokenizer: str | None = None,
                    train_tokenizer: int | None = None, text_field: str = "text", split_on: str | None = None,
                    max_doc_chars: int | None = None,
                    val_fraction: float = 0.05, test_fraction: float = 0.0, workers: int | None = None,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> Path:
    """Prepare `sources` into the folder `out` (see the module's docstring); returns `out`. Every check on the
    arguments, sources and tokenizer runs before anything is written."""
    out = Path(out).expanduser().resolve()
    pattern = _check_arguments(tokenizer, train_tokenizer, val_fraction, test_fraction, workers, shard_tokens,
                               split_on, max_doc_chars)
    if not sources:
        raise DataError("archlab data prepare needs at least one source file")
    opened = [open_source(path) for path in sources]
    given = load_tokenizer(tokenizer) if tokenizer is not None else None
    total_chars = sum(check_source(source, text_field, pattern) for source in opened)
    settings = {"text_field": text_field, "split_on": split_on, "max_doc_chars": max_doc_chars,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction, "shard_tokens": shard_tokens,
                "batch_chars": min(MAX_BATCH_CHARS, shard_tokens), "split_rule": "blake2b-64(document number, text)"}
    wanted = {"format": FORMAT, "version": VERSION, "sources": [source_record(s) for s in opened],
              "settings": settings,
              "tokenizer_source": given.identity if given else {"trained_bpe_vocab_size": train_tokenizer}}
    if _check_out_dir(out, wanted):
        print(f"{out} already holds this dataset; nothing to do")
        return out

    cuts = split_cuts(val_fraction, test_fraction)
    atomic_write(out / ".prepare" / "settings.json", json_text(wanted))
    local_spec, tok = _tokenizer_in(out, given, train_tokenizer, opened, text_field, pattern, cuts)
    dtype = token_dtype(tok.vocab_size)
    records = _finished_groups(out)
    start = records[-1]["next_document"] if records else 0
    docs = _batches(_document_stream(opened, text_field, pattern), start, settings["batch_chars"])
    done_chars = sum(map(len, itertools.islice(_document_stream(opened, text_field, pattern), start)))
    workers = workers or os.cpu_count() or 1
    with tqdm(total=total_chars, initial=done_chars, unit="char", unit_scale=True, desc="prepare",
              disable=not progress) as bar:
        for record in _write_groups(out, _encoded(docs, workers, (local_spec, str(out), cuts, dtype)),
                                          len(records), start, shard_tokens, bar):
            records.append(record)
    manifest = _manifest(wanted, local_spec, tok, dtype, records)
    empty = manifest["documents"]["empty_skipped"]
    if empty:
        print(f"warning: skipped {empty:,} empty documents", file=sys.stderr)
    atomic_write(out / "manifest.json", json_text(manifest))
    return out


def _tokenizer_in(out: Path, given: Tokenizer | None, train_vocab: int | None, sources, text_field, pattern, cuts):
    """The tokenizer's spec inside `out` and the tokenizer, copying or training its file there."""
    if given is None:
        path = out / "tokenizer.json"
        if not path.is_file():  # a resumed run keeps the tokenizer it trained
            train_docs = (text for position, text in enumerate(_document_stream(sources, text_field, pattern))
                          if text.strip() and split_of(position, text.encode("utf-8"), cuts) == "train")
            train_bpe_tokenizer(train_docs, train_vocab, path)
        return "hf:tokenizer.json", load_tokenizer("hf:tokenizer.json", root=out)
    kind, _, rest = given.spec.partition(":")
    if kind == "bytes":
        return "bytes", given
    name = "tokenizer.json" if kind == "hf" else f"{rest}.tiktoken"
    with atomic_path(out / name) as temporary:
        shutil.copyfile(given.path, temporary)
    local_spec = "hf:tokenizer.json" if kind == "hf" else given.spec
    return local_spec, load_tokenizer(local_spec, root=out)


def _encoded(batches: Iterator[list], workers: int, worker_args: tuple) -> Iterator[dict]:
    """The batches' encodings in order, from `workers` processes with at most 2 batches each in flight."""
    if workers == 1:
        _start_worker(*worker_args)
        yield from map(_encode_batch, batches)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with _tokenizers_threads_off(), context.Pool(workers, initializer=_start_worker, initargs=worker_args) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@contextlib.contextmanager
def _tokenizers_threads_off():
    """Workers encode on one thread each: `tokenizers` reads this when it forks (and else warns that a fork after
    its threads ran turns them off)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _write_groups(out: Path, results: Iterator[dict], number: int, start: int, shard_tokens: int, bar):
    """The records of the groups written from `results`, numbered from `number`."""
    group = _Group(out, number, start)
    for result in results:
        group.add(result)
        bar.update(result["chars"])
        if group.tokens >= shard_tokens:
            yield group.finish()
            group = _Group(out, group.number + 1, group.next_document)
    if group.next_document > group.first_document:
        yield group.finish()


def _manifest(wanted: dict, local_spec: str, tok: Tokenizer, dtype: str, records: list[dict]) -> dict:
    splits = {}
    for name in SPLITS:
        shards = [{"group": r["group"], **r["shards"][name]} for r in records if name in r["shards"]]
        splits[name] = {key: sum(s[key] for s in shards) for key in ("tokens", "documents", "bytes")}
        splits[name]["shards"] = shards
    documents = records[-1]["next_document"] if records else 0
    return {**wanted, "tokenizer": {"spec": local_spec, "identity": tok.identity, "vocab_size": tok.vocab_size,
                                    "bos_id": tok.bos_id},
            "dtype": dtype, "documents": {"total": documents,
                                          "empty_skipped": sum(r["empty_documents"] for r in records)},
            "splits": splits}
