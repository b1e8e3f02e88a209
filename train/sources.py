"""Documents from a corpus's source files, streamed: plain text, JSONL, parquet, or a Hugging Face `datasets` folder.

- plain text (.txt, .text, .md): the whole file is one document, or, with a split pattern, a new document starts at
  each line the pattern matches (re.search; that line starts the new document), and with a size, at the first line
  after a document reached it (`TextSplitting`). Bytes that are not UTF-8 are read
  as U+FFFD (one warning per file), so a byte count always matches the text that is tokenized.
- JSONL (.jsonl, .ndjson): one document per line, the text field of its JSON object; blank lines are skipped; a
  lone surrogate (an escape like \ud800 without its pair) is read as U+FFFD.
- parquet (.parquet): one document per row, the text column.
- a `datasets.Dataset.save_to_disk` folder (state.json + arrow files): one document per row, the text column,
  read with pyarrow directly (a DatasetDict folder holds one such folder per split: name the split's folder).

A missing text value (null) is an empty document. `check_source` reads a source through once, before anything is
written, so bad input is refused up front; `documents` then streams the same documents, never the whole corpus.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from archlab.train.data import CHUNK
from archlab.train.errors import DataError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
ARROW_ROWS = 1024  # rows per batch read from parquet and arrow files


@dataclass(frozen=True)
class Source:
    path: Path
    format: str  # text | jsonl | parquet | arrow
    files: tuple[Path, ...]  # the files read, in order (an arrow folder's data files; else the path itself)


def open_source(path: str | Path) -> Source:
    """The source at `path` with its format, from the suffix (a folder: a save_to_disk folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"source {path} does not exist; fix the path")
    if path.is_dir():
        return _arrow_folder(path)
    suffix = path.suffix.lower()
    for name, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", (".parquet",))):
        if suffix in suffixes:
            return Source(path, name, (path,))
    raise DataError(f"source {path} has an unknown format ({suffix or 'no suffix'}); archlab data prepare reads "
                    f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}, .parquet and datasets save_to_disk folders")


def _arrow_folder(path: Path) -> Source:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"source {path} is a DatasetDict with splits {', '.join(splits)}; pass one split's folder, "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file():
        raise DataError(f"source {path} is a folder but not a datasets save_to_disk folder (no state.json); pass "
                        "the files in it instead")
    try:
        names = [entry["filename"] for entry in json.loads((path / "state.json").read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path / 'state.json'} does not list the dataset's arrow files (_data_files); save the "
                        "dataset again with save_to_disk") from None
    missing = [name for name in names if not (path / name).is_file()]
    if missing or not names:
        raise DataError(f"source {path} lacks its arrow file {missing[0] if missing else '(none listed)'}; copy the "
                        "whole save_to_disk folder")
    return Source(path, "arrow", tuple(path / name for name in names))


def source_record(source: Source) -> dict:
    """What a manifest records of a source: its path, format, size and sha256 (over its files' bytes in order)."""
    digest, size = hashlib.sha256(), 0
    for file in source.files:
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return {"path": str(source.path.resolve()), "format": source.format, "size": size, "sha256": digest.hexdigest()}


@dataclass(frozen=True)
class TextSplitting:
    """How a plain text file is cut into documents: a new one starts at each line `split_on` matches, and once a
    document holds `max_chars` characters, at the next line (long books become pieces a split can share out)."""

    split_on: re.Pattern | None = None
    max_chars: int | None = None


def check_source(source: Source, text_field: str, split_on: TextSplitting) -> int:
    """Read the source through once: a DataError on the first bad record; else the characters of text it holds."""
    if source.format == "text":
        _warn_if_not_utf8(source.path)
    return sum(len(text) for text in documents(source, text_field, split_on))


def _warn_if_not_utf8(path: Path) -> None:
    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                print(f"warning: {path} is not valid UTF-8 (byte {offset + err.start:,}); its invalid bytes are "
                      "read as U+FFFD", file=sys.stderr)
                return
            if not chunk:
                return
            offset += len(chunk)


def documents(source: Source, text_field: str, split_on: TextSplitting) -> Iterator[str]:
    """The source's documents in order; empty ones included (the caller counts and skips them)."""
    if source.format == "text":
        yield from _text_documents(source.path, split_on)
    elif source.format == "jsonl":
        yield from _jsonl_documents(source.path, text_field)
    else:
        yield from _table_documents(source, text_field)


def _text_documents(path: Path, splitting: TextSplitting) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        if splitting.split_on is None and splitting.max_chars is None:
            yield f.read()
            return
        lines: list[str] = []
        chars = 0
        for line in f:
            starts = splitting.split_on is not None and splitting.split_on.search(line)
            if lines and (starts or splitting.max_chars is not None and chars >= splitting.max_chars):
                yield "".join(lines)
                lines, chars = [], 0
            lines.append(line)
            chars += len(line)
        if lines:
            yield "".join(lines)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise DataError(f"line {number} of {path} is not valid JSON ({err}); fix or remove it") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataError(f"line {number} of {path} has no field {text_field!r}; pass --text-field with the "
                                "field that holds the text")
            text = record[text_field]
            if text is not None and not isinstance(text, str):
                raise DataError(f"line {number} of {path}: field {text_field!r} is a {type(text).__name__}, not "
                                "text; pass --text-field with the field that holds the text")
            if b"\\ud" in line or b"\\uD" in line:  # a JSON escape may name half a surrogate pair, which is no text
                text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            yield text or ""


def _table_documents(source: Source, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    for file in source.files:
        for batch in _record_batches(source.format, file, text_field):
            column = batch.column(text_field)
            if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
                raise DataError(f"column {text_field!r} of {file} holds {column.type}, not text; pass --text-field "
                                "with the column that holds the text")
            for text in column.to_pylist():
                yield text or ""


def _record_batches(fmt: str, file: Path, text_field: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {file} needs pyarrow: pip install 'archlab[data]'") from None
    try:
        if fmt == "parquet":
            reader = pq.ParquetFile(file)
            names = reader.schema_arrow.names
            batches = reader.iter_batches(batch_size=ARROW_ROWS, columns=[text_field] if text_field in names else [])
        else:
            reader = pa.ipc.open_stream(pa.memory_map(str(file)))
            names = reader.schema.names
            batches = iter(reader)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"cannot read {file} as {fmt} ({str(err).splitlines()[0]}); the file is damaged or not "
                        f"{fmt}") from None
    if text_field not in names:
        raise DataError(f"{file} has no column {text_field!r} (it has {', '.join(names)}); pass --text-field with "
                        "the column that holds the text")
    yield from batches
