"""`archlab data fetch` against small fake archives served from file:// URLs: no test touches the network."""
import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from archlab.train import fetch as fetch_module
from archlab.train.errors import DataError
from archlab.train.fetch import BENCHMARKS, default_dest, fetch_corpus

TEXT = b"anarchism originated as a term of abuse first used against early working class radicals " * 40


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.delenv("ARCHLAB_DATA", raising=False)
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def fake_zip(path: Path, member: str = "text8", payload: bytes = TEXT) -> str:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
    return path.as_uri()


def expected(payload: bytes = TEXT, **checksums) -> fetch_module.Benchmark:
    checksums = checksums or {"sha256": hashlib.sha256(payload).hexdigest(), "md5": hashlib.md5(payload).hexdigest()}
    return dataclasses.replace(BENCHMARKS["text8"], size=len(payload), checksums=checksums)


def test_benchmarks_are_the_canonical_files():
    assert BENCHMARKS["enwik8"].url == "http://mattmahoney.net/dc/enwik8.zip"
    assert BENCHMARKS["text8"].url == "http://mattmahoney.net/dc/text8.zip"
    assert BENCHMARKS["enwik8"].checksums == {"md5": "a1fa5ffddb56f4953e226637dabbb36a"}
    assert all(spec.size == 10**8 and spec.member == name for name, spec in BENCHMARKS.items())
    assert all(set(spec.checksums) <= hashlib.algorithms_guaranteed for spec in BENCHMARKS.values())


def test_fetch_writes_verified_file_then_skips(env, tmp_path, capsys):
    url, dest = fake_zip(tmp_path / "text8.zip"), tmp_path / "data"
    path = fetch_corpus("text8", url=url, dest=dest, progress=False, expected=expected())
    assert path == dest / "text8" and path.read_bytes() == TEXT
    assert path.stat().st_mode & 0o777 == 0o644  # readable by everyone, like any downloaded file
    assert sorted(os.listdir(dest)) == ["text8"]  # the zip and temp files are gone
    out = capsys.readouterr().out
    assert "data.val_fraction=0.05 data.test_fraction=0.05" in out and f"ARCHLAB_DATA={dest}" in out

    def no_network(*args, **kwargs):
        raise AssertionError("a valid file must not be downloaded again")

    env.setattr(fetch_module, "_download", no_network)
    env.setenv("ARCHLAB_DATA", str(dest))
    assert fetch_corpus("text8", url=url, dest=dest, progress=False, expected=expected()) == path
    out = capsys.readouterr().out
    assert "already there and verified" in out and "set ARCHLAB_DATA" not in out


def test_invalid_existing_file_is_replaced(env, tmp_path, capsys):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "text8").write_bytes(b"half a download")
    path = fetch_corpus("text8", url=fake_zip(tmp_path / "t.zip"), dest=dest, progress=False, expected=expected())
    assert path.read_bytes() == TEXT and "downloading it again" in capsys.readouterr().out


@pytest.mark.parametrize("spec, match", [
    (expected(md5="0" * 32), "has md5 "),
    (expected(sha256="f" * 64), "has sha256 "),
    (dataclasses.replace(expected(), size=10**8), "has 3,520 bytes, not 100,000,000"),
], ids=["md5", "sha256", "size"])
def test_mismatch_leaves_nothing_behind(env, tmp_path, spec, match):
    dest = tmp_path / "data"
    with pytest.raises(DataError, match=match) as err:
        fetch_corpus("text8", url=fake_zip(tmp_path / "text8.zip"), dest=dest, progress=False, expected=spec)
    assert "\n" not in str(err.value) and "nothing was kept" in str(err.value)
    assert os.listdir(dest) == []


def test_unknown_name(env):
    with pytest.raises(DataError, match="unknown corpus 'enwik9'; archlab data fetch knows enwik8, text8"):
        fetch_corpus("enwik9", progress=False)


def test_download_failure(env, tmp_path):
    url = (tmp_path / "nowhere.zip").as_uri()
    with pytest.raises(DataError, match=f"could not download {url}: .*; check your network or pass --url"):
        fetch_corpus("text8", url=url, dest=tmp_path / "data", progress=False)
    with pytest.raises(DataError, match="could not download"):
        fetch_corpus("text8", url="htp:/typo", dest=tmp_path / "data", progress=False)
    assert os.listdir(tmp_path / "data") == []


def test_bad_archives(env, tmp_path):
    noise = tmp_path / "noise.zip"
    noise.write_bytes(TEXT)
    with pytest.raises(DataError, match="is not a valid zip"):
        fetch_corpus("text8", url=noise.as_uri(), dest=tmp_path / "data", progress=False, expected=expected())
    wrong = fake_zip(tmp_path / "wrong.zip", member="enwik8")
    with pytest.raises(DataError, match="has no file named text8 inside"):
        fetch_corpus("text8", url=wrong, dest=tmp_path / "data", progress=False, expected=expected())
    assert os.listdir(tmp_path / "data") == []


def test_default_destination(env, tmp_path):
    assert default_dest() == tmp_path / "cache" / "data"
    env.setenv("ARCHLAB_DATA", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert default_dest() == tmp_path / "a"
    path = fetch_corpus("text8", url=fake_zip(tmp_path / "t.zip"), progress=False, expected=expected())
    assert path == tmp_path / "a" / "text8"


def test_fetched_file_resolves_and_splits_90_5_5(env, tmp_path):
    from archlab.train.data import ByteCorpus, resolve_data_path

    dest = tmp_path / "data"
    fetch_corpus("text8", url=fake_zip(tmp_path / "t.zip"), dest=dest, progress=False, expected=expected())
    env.setenv("ARCHLAB_DATA", str(dest))
    corpus = ByteCorpus.open(resolve_data_path("text8"), val_fraction=0.05, test_fraction=0.05,
                             sha256=hashlib.sha256(TEXT).hexdigest())
    assert (len(corpus.train), len(corpus.val), len(corpus.test)) == (3168, 176, 176)
