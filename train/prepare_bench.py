"""`python -m archlab.train.prepare_bench` (also `archlab bench prepare`): archlab data prepare's speed and memory.

Prepares refdocs (shared/data/refdocs.txt.xz, ~60 MB of dictionary entries and Perl/Python documentation) with a
16k byte-level BPE trained first on a sample, at 15 MB and at all ~60 MB of input, with workers = cores. Documents
are the corpus's own units: a dictionary entry, or a documentation section (SPLIT_ON). Each run is a fresh child
process, so its peak RSS is its own: the main process's, and the largest worker's (getrusage SELF and CHILDREN);
the process tree held at most main + workers x worker. Speed is input MB per second of wall time per core, and
input MB per CPU second of the whole tree (main + workers: what a shared machine does not change much). The BPE
is encoded two ways: through tiktoken built from its ranks (what prepare uses) and through `tokenizers` itself;
both must give identical shards. Also measured: each engine's encode speed alone (one thread, MB per CPU second,
no prepare around it) on the 15 MB input, the ceiling for prepare's MB per CPU second.
"""
from __future__ import annotations

import argparse
import datetime
import json
import lzma
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from archlab.kernels.common.files import atomic_write_all, json_text
from archlab.kernels.common.markdown import table
from archlab.kernels.common.provenance import git_commit, package_version
from archlab.train.data import resolve_data_path
from archlab.train.sources import Source, documents

SPLIT_ON = r"^=head[12] |^\.\. _|^[*=-]{3,}$|^\S[^\\]* \\"  # pod/rst sections and GCIDE entries ("Word \Word\, n.")
SIZES_MB = (15, 60)
VOCAB = 16384
SAMPLE_MB = 8  # the BPE's training sample: the first 8 MB
ENGINES = ("tiktoken", "tokenizers")


def _cut(corpus: Path, out: Path, n_bytes: int) -> Path:
    """The first n_bytes of the corpus, ended at a line boundary."""
    with open(corpus, "rb") as f:
        data = f.read(n_bytes)
    out.write_bytes(data[: data.rfind(b"\n") + 1] if len(data) == n_bytes else data)
    return out


def _use_engine(engine: str) -> None:
    """`tokenizers`: turn off the tiktoken twin, so hf: tokenizers encode through the library itself."""
    if engine == "tokenizers":
        from archlab.train import tokenizers

        tokenizers._tiktoken_twin = lambda *args: None


def _child(args: dict) -> dict:
    """One prepare run in this (fresh) process: wall time, token count and peak RSS."""
    from archlab.train.prepare import prepare_dataset

    _use_engine(args["engine"])
    start = time.perf_counter()
    out = prepare_dataset([args["source"]], args["out"], tokenizer=args["tokenizer"], split_on=SPLIT_ON,
                          workers=args["workers"], progress=False)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    main, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = sum(usage.ru_utime + usage.ru_stime for usage in (main, workers))
    return {"wall_s": wall, "cpu_s": cpu_s, "main_rss_mib": main.ru_maxrss / 1024,  # KiB -> MiB on Linux
            "worker_rss_mib": workers.ru_maxrss / 1024, "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
            "documents": manifest["documents"]["total"],
            "shards": {s["tokens_file"]: s["tokens_sha256"] for split in manifest["splits"].values()
                       for s in split["shards"]}}


def _run_child(args: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "archlab.train.prepare_bench", "--child", json.dumps(args)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def _encode_speed(engine: str, tokenizer_path: Path, source: Path) -> float:
    """MB per CPU second of one thread encoding the source's documents, nothing else (in a child: _use_engine)."""
    script = ("import json, sys, time; from archlab.train import prepare_bench as b;"
              f"print(json.dumps(b._encode_only({engine!r}, {str(tokenizer_path)!r}, {str(source)!r})))")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout)


def _encode_only(engine: str, tokenizer_path: str, source: str) -> float:
    import re

    from archlab.train.tokenizers import load_tokenizer

    _use_engine(engine)
    tokenizer = load_tokenizer(f"hf:{tokenizer_path}")
    docs = list(documents(Source(Path(source), "text", (Path(source),)), "text", re.compile(SPLIT_ON)))
    start = time.process_time()  # CPU time: the machine may be shared
    for i in range(0, len(docs), 256):
        tokenizer.encode_batch(docs[i: i + 256])
    return sum(len(d.encode()) for d in docs) / 1e6 / (time.process_time() - start)


def run_bench(out_dir: Path) -> tuple[Path, Path]:
    import re

    from archlab.train.tokenizers import train_bpe_tokenizer

    cores = os.cpu_count() or 1
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "refdocs.txt"
        with lzma.open(resolve_data_path("refdocs.txt.xz")) as src, open(corpus, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        sample = _cut(corpus, tmp / "sample.txt", SAMPLE_MB * 10**6)
        start = time.perf_counter()
        sample_docs = documents(Source(sample, "text", (sample,)), "text", re.compile(SPLIT_ON))
        train_bpe_tokenizer(sample_docs, VOCAB, tmp / "bpe.json")
        train_s = time.perf_counter() - start
        inputs = {mb: _cut(corpus, tmp / f"refdocs-{mb}mb.txt", mb * 10**6) for mb in SIZES_MB}
        shards = {}
        for engine in ENGINES:
            speed = _encode_speed(engine, tmp / "bpe.json", inputs[SIZES_MB[0]])
            for mb, source in inputs.items():
                run = _run_child({"engine": engine, "source": str(source), "out": str(tmp / f"out-{engine}-{mb}"),
                                  "tokenizer": f"hf:{tmp / 'bpe.json'}", "workers": cores})
                shards.setdefault(mb, []).append(run.pop("shards"))
                shutil.rmtree(tmp / f"out-{engine}-{mb}")
                input_mb = source.stat().st_size / 1e6
                rows.append({"engine": engine, "input_mb": round(input_mb, 1), "documents": run["documents"],
                             "tokens": run["tokens"], "workers": cores, "wall_s": round(run["wall_s"], 2),
                             "mb_per_s_per_core": round(input_mb / run["wall_s"] / cores, 2),
                             "cpu_s": round(run["cpu_s"], 2), "mb_per_cpu_s": round(input_mb / run["cpu_s"], 2),
                             "encode_only_mb_per_cpu_s": round(speed, 2),
                             "main_peak_rss_mib": round(run["main_rss_mib"]),
                             "worker_peak_rss_mib": round(run["worker_rss_mib"]),
                             "tree_peak_rss_bound_mib": round(run["main_rss_mib"] + cores * run["worker_rss_mib"])})
    identical = all(runs[0] == runs[1] for runs in shards.values())
    notes.append(f"BPE vocabulary {VOCAB}, trained on the first {SAMPLE_MB} MB in {train_s:.1f} s; documents split "
                 f"with --split-on {SPLIT_ON!r}; both engines wrote identical shards: {identical}.")
    notes.append(f"Load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (a shared machine).")
    result = {"benchmark": "prepare", "title": "archlab data prepare on refdocs", "commit": git_commit() or "unknown",
              "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {cores} cores",
              "python": platform.python_version(), "tokenizers": package_version("tokenizers"),
              "tiktoken": package_version("tiktoken"), "identical_shards": identical, "notes": notes, "rows": rows}
    stem = Path(out_dir) / f"prepare-cpu-{result['date']}-{result['commit']}"
    atomic_write_all({stem.with_suffix(".json"): json_text(result), stem.with_suffix(".md"): to_markdown(result)})
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def to_markdown(result: dict) -> str:
    columns = list(result["rows"][0])
    lines = [f"# {result['title']} — {result['machine']}, {result['date']}", "",
             f"commit {result['commit']}, Python {result['python']}, tokenizers {result['tokenizers']}, "
             f"tiktoken {result['tiktoken']}.", *result["notes"], "",
             *table(columns, [[row[c] for c in columns] for row in result["rows"]])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="compare/results", help="folder for the JSON + Markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    json_path, md_path = run_bench(Path(args.out))
    print(md_path.read_text(), end="")
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
