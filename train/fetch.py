"""`archlab data fetch enwik8|text8`: download a standard byte-level benchmark, verify it, put it in a data root.

- enwik8: the first 10**8 bytes of the English Wikipedia XML dump of 2006-03-03 (Matt Mahoney's Hutter Prize
  file), from http://mattmahoney.net/dc/enwik8.zip; checked against the md5 Mahoney publishes,
  a1fa5ffddb56f4953e226637dabbb36a.
- text8: the same dump cleaned to lowercase a-z and single spaces, first 10**8 bytes, from
  http://mattmahoney.net/dc/text8.zip. We found no checksum for it from Mahoney, so it is checked against the
  sha256 6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7, which several unrelated public
  projects pin and verify on download (e.g. a word2vec loader using torchtext's download validator).

Both are checked for their exact size too. The standard split of both is 90M / 5M / 5M bytes (train / val /
test): data.val_fraction=0.05 data.test_fraction=0.05. Only the extracted file is kept: `<dest>/<name>`,
written atomically, so a failed or damaged download leaves nothing behind.
"""
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from archlab.kernels.common.files import atomic_output
from archlab.train.data import CHUNK, cache_dir, data_roots
from archlab.train.errors import DataError


@dataclass(frozen=True)
class Benchmark:
    url: str
    member: str  # the file inside the zip
    size: int  # bytes of that file
    checksums: dict[str, str]  # hashlib algorithm -> hex digest of that file


BENCHMARKS = {
    "enwik8": Benchmark("http://mattmahoney.net/dc/enwik8.zip", "enwik8", 10**8,
                        {"md5": "a1fa5ffddb56f4953e226637dabbb36a"}),
    "text8": Benchmark("http://mattmahoney.net/dc/text8.zip", "text8", 10**8,
                       {"sha256": "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7"}),
}
SPLIT_ADVICE = "standard split 90M/5M/5M bytes: data.val_fraction=0.05 data.test_fraction=0.05"
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ValueError)


def default_dest() -> Path:
    """The first folder in $ARCHLAB_DATA, else the cache."""
    env_roots = [p for p in os.environ.get("ARCHLAB_DATA", "").split(os.pathsep) if p]
    return Path(env_roots[0]).expanduser() if env_roots else cache_dir() / "data"


def _hashers(spec: Benchmark) -> dict:
    return {name: hashlib.new(name, usedforsecurity=False) for name in spec.checksums}


def _mismatch(size: int, hashers: dict, spec: Benchmark) -> str | None:
    """What is wrong with a file of this size and these digests, or None if it is the expected one."""
    if size != spec.size:
        return f"has {size:,} bytes, not {spec.size:,}"
    for name, hasher in hashers.items():
        if hasher.hexdigest() != spec.checksums[name]:
            return f"has {name} {hasher.hexdigest()}, not {spec.checksums[name]}"
    return None


def _check_existing(path: Path, spec: Benchmark) -> str | None:
    hashers, size = _hashers(spec), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
    return _mismatch(size, hashers, spec)


def _download(url: str, out: IO[bytes], progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", disable=not progress) as bar:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
    except NETWORK_ERRORS as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"could not download {url}: {reason}; check your network or pass --url") from None


def _extract(archive: Path, url: str, spec: Benchmark, out: IO[bytes]) -> None:
    """Copy the member out of the zip into `out`, verifying it on the way."""
    hashers, size = _hashers(spec), 0
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
    except KeyError:
        raise DataError(f"{url} has no file named {spec.member} inside; pass --url to the right zip") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise DataError(f"{url} is not a valid zip ({err}); the download is damaged: try again "
                        "or pass --url to a good copy") from None
    problem = _mismatch(size, hashers, spec)
    if problem:
        raise DataError(f"the {spec.member} in {url} {problem}; the download is damaged or not the real file "
                        "(nothing was kept): try again or pass --url to a good copy")


def _advise_data_root(dest: Path, name: str) -> None:
    if dest.resolve() not in [root.resolve() for root in data_roots()]:
        print(f"set ARCHLAB_DATA={dest} so that data.path={name} finds it")


def fetch_corpus(name: str, *, url: str | None = None, dest: Path | None = None, progress: bool = True,
                 expected: Benchmark | None = None) -> Path:
    """Download and verify a benchmark into `dest/<name>`; returns that path. A valid copy already there is kept.

    `expected` replaces the built-in size and checksums (tests fetch a small fake this way).
    """
    if name not in BENCHMARKS:
        raise DataError(f"unknown corpus {name!r}; archlab data fetch knows {', '.join(BENCHMARKS)}")
    spec = expected or BENCHMARKS[name]
    url = url or spec.url
    dest = Path(dest).expanduser() if dest else default_dest()
    target = dest / name
    try:
        if target.is_file():
            problem = _check_existing(target, spec)
            if problem is None:
                print(f"{target} is already there and verified; nothing downloaded ({SPLIT_ADVICE})")
                _advise_data_root(dest, name)
                return target
            print(f"{target} {problem}; downloading it again")
        dest.mkdir(parents=True, exist_ok=True)
        # Download next to the target (same disk), into a folder that is removed whatever happens.
        with tempfile.TemporaryDirectory(dir=dest, prefix=f".{name}-download-") as tmp:
            archive = Path(tmp) / f"{name}.zip"
            print(f"downloading {url}")
            with open(archive, "wb") as out:
                _download(url, out, progress)
            with atomic_output(target) as out:
                _extract(archive, url, spec, out)
    except OSError as err:
        raise DataError(f"could not read or write {target} ({err.strerror or err}); free some disk space "
                        "or pass --dest to a writable folder") from None
    print(f"wrote {target} ({spec.size:,} bytes, {'/'.join(spec.checksums)} verified; {SPLIT_ADVICE})")
    _advise_data_root(dest, name)
    return target
