"""`archlab data prepare` and the reader (train/prepare.py, train/sources.py, train/prepared.py): every source format
gives the same shards, the split is deterministic, a killed run resumes to identical bytes, bad input is refused
before anything is written."""
import re
import json
from pathlib import Path

import numpy as np
import pytest

from archlab.compare.cli import main
from archlab.train import prepare
from archlab.train.errors import DataError
from archlab.train.prepare import prepare_dataset, split_cuts, split_of, token_dtype
from archlab.train.prepared import PreparedDataset
from archlab.train.tokenizers import train_bpe_tokenizer
from tests.train.tokenizer_helpers import NON_ASCII, real_text, tiny_bpe

DOCS = [real_text(40_000)[i: i + 700 + 37 * (i % 11)] for i in range(0, 40_000, 800)] + ["", "  \n", NON_ASCII]
SMALL = {"shard_tokens": 2000, "workers": 1, "progress": False}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return tiny_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def write_source(folder: Path, fmt: str, docs=DOCS) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    if fmt == "jsonl":
        path = folder / "docs.jsonl"
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    elif fmt == "parquet":
        path = folder / "docs.parquet"
        pq.write_table(table, path, row_group_size=7)
    else:  # what datasets.Dataset.save_to_disk writes: arrow stream files listed in state.json
        path = folder / "docs_dataset"
        path.mkdir()
        for n, part in enumerate((table.slice(0, 20), table.slice(20))):
            with pa.ipc.new_stream(path / f"data-0000{n}-of-00002.arrow", part.schema) as writer:
                writer.write_table(part)
        (path / "state.json").write_text(json.dumps({"_data_files": [{"filename": f"data-0000{n}-of-00002.arrow"}
                                                                     for n in range(2)]}))
        (path / "dataset_info.json").write_text("{}")
    return path


def shard_bytes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_format_gives_the_same_tokens(tmp_path, bpe):
    outs = {fmt: prepare_dataset([write_source(tmp_path / fmt, fmt)], tmp_path / f"out-{fmt}",
                                 tokenizer=f"hf:{bpe.path}", val_fraction=0.2, test_fraction=0.1, **SMALL)
            for fmt in ("jsonl", "parquet", "arrow")}
    shards = {fmt: {k: v for k, v in shard_bytes(out).items() if k.endswith((".bin", ".idx"))}
              for fmt, out in outs.items()}
    assert shards["jsonl"] == shards["parquet"] == shards["arrow"]
    dataset = PreparedDataset.open(outs["parquet"])
    manifest = dataset.manifest
    kept = [d for d in DOCS if d.strip()]
    assert manifest["documents"] == {"total": len(DOCS), "empty_skipped": 2}
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val", "test")) == len(kept)
    assert sum(manifest["splits"][s]["bytes"] for s in ("train", "val", "test")) == sum(len(d.encode()) for d in kept)
    assert manifest["dtype"] == "uint16" and (outs["parquet"] / "tokenizer.json").read_bytes() == bpe.path.read_bytes()
    for name in ("train", "val", "test"):
        split = dataset.split(name)
        tokens = split.gather(np.array([0]), len(split))[0].numpy()
        assert int(dataset.tokenizer.token_bytes[tokens].sum()) == split.n_bytes  # the bits-per-byte denominator
        starts = split.doc_starts
        assert starts[0] == 0 and np.all(np.diff(starts) > 0) and len(starts) == manifest["splits"][name]["documents"]
        assert np.all(tokens[starts] == bpe.bos_id)
        for start, end in zip(starts[:3], starts[1:4], strict=False):  # each document decodes back to a source document
            assert dataset.tokenizer.decode(tokens[start + 1: end].tolist()) in kept
    assert len(dataset.split("train").shards) > 2  # windows below cross shards


def test_text_split_on_and_gather_across_shards(tmp_path, bpe):
    text = "".join(f"=== doc {i}\n{d}\n" for i, d in enumerate(DOCS[:30]))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    out = prepare_dataset([tmp_path / "a.txt"], tmp_path / "out", tokenizer="bytes", split_on=r"^=== doc",
                          val_fraction=0.1, **SMALL)
    dataset = PreparedDataset.open(out)
    assert dataset.manifest["documents"]["total"] == 30 and dataset.tokenizer.bos_id is None
    train = dataset.split("train")
    everything = np.concatenate([np.asarray(s) for s in train.shards]).astype(np.int64)
    starts = np.array([0, train.offsets[1] - 3, train.offsets[2] - 1, len(train) - 50])
    windows = train.gather(starts, 50).numpy()
    assert all(np.array_equal(w, everything[s: s + 50]) for w, s in zip(windows, starts, strict=True))
    bounds = zip(train.doc_starts, train.doc_starts[1:], strict=False)
    first_docs = [bytes(everything[a:b].astype(np.uint8)).decode() for a, b in bounds]
    assert all(doc.startswith("=== doc ") for doc in first_docs)
    with pytest.raises(ValueError, match="do not fit"):
        train.gather(np.array([len(train) - 10]), 11)
    with pytest.raises(DataError, match="test split .* is empty"):
        dataset.split("test")


def test_lone_surrogates_in_jsonl_are_read_as_replacement_characters(tmp_path):
    path = write_text(tmp_path / "s.jsonl", '{"text": "a\\ud800b"}\n{"text": "ok \\ud83d\\ude00"}\n')
    train = PreparedDataset.open(prepare_dataset([path], tmp_path / "out", tokenizer="bytes", val_fraction=0,
                                                 **SMALL)).split("train")
    text = bytes(train.gather(np.array([0]), len(train))[0].numpy().astype(np.uint8)).decode()
    assert text == "a\ufffdbok \U0001f600" and train.n_bytes == len(text.encode())


def test_split_is_deterministic_across_worker_counts(tmp_path, bpe):
    source = write_source(tmp_path, "jsonl")
    one = prepare_dataset([source], tmp_path / "one", tokenizer=f"hf:{bpe.path}", **SMALL)
    two = prepare_dataset([source], tmp_path / "two", tokenizer=f"hf:{bpe.path}", **{**SMALL, "workers": 2})
    assert shard_bytes(one) == shard_bytes(two)
    cuts = split_cuts(0.05, 0.0)
    expected_val = sum(1 for n, d in enumerate(DOCS) if d.strip() and split_of(n, d.encode(), cuts) == "val")
    assert json.loads((one / "manifest.json").read_text())["splits"]["val"]["documents"] == expected_val


def test_resume_after_a_kill_gives_identical_bytes(tmp_path, bpe, monkeypatch):
    source = write_source(tmp_path, "jsonl")
    whole = prepare_dataset([source], tmp_path / "whole", tokenizer=f"hf:{bpe.path}", **SMALL)
    # a kill while the third shard group is being written
    finish, finished = prepare._Group.finish, []

    def killed_after_two(group):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(group.number)
        return finish(group)

    monkeypatch.setattr(prepare._Group, "finish", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset([source], tmp_path / "killed", tokenizer=f"hf:{bpe.path}", **SMALL)
    monkeypatch.undo()
    killed = tmp_path / "killed"
    assert not (killed / "manifest.json").exists() and (killed / "train" / "000001.bin").exists()
    prepare_dataset([source], killed, tokenizer=f"hf:{bpe.path}", **SMALL)
    assert shard_bytes(killed) == shard_bytes(whole)
    # a lost manifest and a lost shard in the middle: the shards before it are kept, the rest rebuilt
    (killed / "manifest.json").unlink()
    (killed / "train" / "000002.bin").unlink()
    kept = (killed / "train" / "000001.bin").stat().st_mtime_ns
    prepare_dataset([source], killed, tokenizer=f"hf:{bpe.path}", **SMALL)
    assert shard_bytes(killed) == shard_bytes(whole)
    assert (killed / "train" / "000001.bin").stat().st_mtime_ns == kept


def test_train_tokenizer_on_the_train_split(tmp_path):
    source = write_source(tmp_path, "jsonl")
    out = prepare_dataset([source], tmp_path / "out", train_tokenizer=300, val_fraction=0.3, **SMALL)
    cuts = split_cuts(0.3, 0.0)
    train_docs = [d for n, d in enumerate(DOCS) if d.strip() and split_of(n, d.encode(), cuts) == "train"]
    alone = train_bpe_tokenizer(train_docs, 300, tmp_path / "alone.json")
    dataset = PreparedDataset.open(out)
    assert dataset.tokenizer.identity["sha256"] == alone.identity["sha256"]
    assert dataset.manifest["tokenizer"]["spec"] == "hf:tokenizer.json" and dataset.tokenizer.vocab_size == 300


def test_uint32_tokens_for_a_large_vocabulary(tmp_path, bpe, monkeypatch):
    """uint16 holds ids up to 65535; beyond, uint32. (A 65k-token tokenizer takes seconds to load, so the
    writer and reader are run on uint32 by choosing it for the small BPE.)"""
    assert (token_dtype(2**16), token_dtype(2**16 + 1)) == ("uint16", "uint32")
    source = write_source(tmp_path, "jsonl")
    small = PreparedDataset.open(prepare_dataset([source], tmp_path / "small", tokenizer=f"hf:{bpe.path}", **SMALL))
    monkeypatch.setattr(prepare, "token_dtype", lambda vocab_size: "uint32")
    large = PreparedDataset.open(prepare_dataset([source], tmp_path / "big", tokenizer=f"hf:{bpe.path}", **SMALL))
    assert (small.manifest["dtype"], large.manifest["dtype"]) == ("uint16", "uint32")
    assert (tmp_path / "big" / "train" / "000000.bin").stat().st_size == 4 * len(large.split("train").shards[0])
    n = len(small.split("train"))
    assert np.array_equal(small.split("train").gather(np.array([0]), n), large.split("train").gather(np.array([0]), n))


def test_missing_truncated_or_damaged_shards(tmp_path, bpe):
    out = prepare_dataset([write_source(tmp_path, "jsonl")], tmp_path / "out", tokenizer=f"hf:{bpe.path}", **SMALL)
    PreparedDataset.open(out).verify()
    shard = out / "train" / "000001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match="truncated"):
        PreparedDataset.open(out)
    shard.write_bytes(data[:-2] + bytes([data[-2] ^ 1, data[-1]]))
    with pytest.raises(DataError, match="does not match the sha256"):
        PreparedDataset.open(out).verify()
    shard.unlink()
    with pytest.raises(DataError, match="is missing"):
        PreparedDataset.open(out)


def test_cli_prepare_and_verify(tmp_path, capsys):
    source = write_source(tmp_path, "jsonl")
    main(["data", "prepare", str(source), "--out", str(tmp_path / "out"), "--tokenizer", "bytes", "--workers", "1",
          "--shard-tokens", "5000", "--val-fraction", "0.1"])
    main(["data", "verify", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "train" in printed and "every shard matches" in printed
    with pytest.raises(SystemExit) as exit_:
        main(["data", "prepare", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x"), "--tokenizer", "bytes"])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1


BAD = [
    ("missing source", lambda t: [t / "nope.jsonl"], {}, "does not exist"),
    ("unknown format", lambda t: [write_text(t / "a.csv", "x,y\n")], {}, "unknown format"),
    ("invalid JSONL line", lambda t: [write_text(t / "a.jsonl", '{"text": "ok"}\n{"text": \n')], {},
     "line 2 of .* is not valid JSON"),
    ("missing text field", lambda t: [write_text(t / "a.jsonl", '{"text": "ok"}\n{"body": "x"}\n')], {},
     "line 2 of .* has no field 'text'"),
    ("parquet without the column", lambda t: [write_source(t, "parquet")], {"text_field": "body"}, "has no column"),
    ("arrow DatasetDict", lambda t: [write_text(t / "dd" / "dataset_dict.json", '{"splits": ["train"]}').parent],
     {}, "is a DatasetDict"),
    ("unknown tokenizer", lambda t: [write_source(t, "jsonl")], {"tokenizer": "wordpiece"}, "unknown tokenizer"),
    ("two tokenizers", lambda t: [write_source(t, "jsonl")], {"train_tokenizer": 300}, "exactly one of"),
    ("fractions", lambda t: [write_source(t, "jsonl")], {"val_fraction": 0.7, "test_fraction": 0.3}, "below 1"),
    ("bad split pattern", lambda t: [write_source(t, "jsonl")], {"split_on": "("}, "not a valid regular"),
]


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("sources, options, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_input_is_refused_before_writing(tmp_path, sources, options, message):
    out = tmp_path / "out"
    with pytest.raises(DataError, match=message) as err:
        prepare_dataset(sources(tmp_path / "in"), out, **{"tokenizer": "bytes", **options, **SMALL})
    assert "\n" not in str(err.value) and not out.exists()


def test_a_different_dataset_in_out_is_refused(tmp_path, bpe):
    source = write_source(tmp_path, "jsonl")
    out = prepare_dataset([source], tmp_path / "out", tokenizer="bytes", **SMALL)
    before = shard_bytes(out)
    for options in ({"tokenizer": f"hf:{bpe.path}"}, {"tokenizer": "bytes", "val_fraction": 0.2}):
        with pytest.raises(DataError, match="already holds a different prepared dataset"):
            prepare_dataset([source], out, **{**SMALL, **options})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        prepare_dataset([source], tmp_path / "other", tokenizer="bytes", **SMALL)
    assert shard_bytes(out) == before and prepare_dataset([source], out, tokenizer="bytes", **SMALL) == out


def test_max_doc_chars_cuts_a_long_text_at_line_ends(tmp_path):
    """A book without separators becomes pieces that end at the first line after max_doc_chars characters, so a
    split by document can share it out; with split_on too, both rules cut."""
    from archlab.train.sources import TextSplitting, documents, open_source

    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i:04d}\n" for i in range(10)) + "# part\n" + "tail\n")
    pieces = list(documents(open_source(path), "text", TextSplitting(None, 25)))
    assert "".join(pieces) == path.read_text()
    assert [len(piece) for piece in pieces] == [30, 30, 30, 22]  # 3 lines of 10 reach 25, then the rest
    both = list(documents(open_source(path), "text", TextSplitting(re.compile("^# part"), 25)))
    assert both[-1] == "# part\ntail\n" and len(both) == 5
