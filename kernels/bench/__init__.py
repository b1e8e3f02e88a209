"""Kernel benchmarks behind `archlab bench attention|scan|conv1d`: shared timing, ratios and reports.

Each benchmark returns a result dict: `benchmark`, `title`, `notes` (lines for the report), `columns`
(the table's columns, in order), `rows` (one dict per provider x shape x pass; a failed measurement keeps
its row with an `error`), plus the device, dtype, versions, commit and date the numbers belong to.
"""
from __future__ import annotations

import datetime
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from archlab.kernels.common.files import atomic_write_all, json_text, slug
from archlab.kernels.common.markdown import table
from archlab.kernels.common.provenance import git_commit, package_version
from archlab.kernels.hardware import device_name


def time_cuda_ms(run: Callable[[], None], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
    """Median milliseconds of `run` on the GPU (triton's do_bench: warm-up, L2 flush, CUDA events)."""
    import triton.testing

    return triton.testing.do_bench(run, warmup=25, rep=100, grad_to_none=list(grad_to_none), return_mode="median")


def time_cpu_ms(run: Callable[[], None], grad_to_none: Sequence[torch.Tensor] = (), min_run_time: float = 2.0) -> float:
    """Median milliseconds of `run` on the CPU, over as many runs as fit in `min_run_time` seconds (>= 1)."""
    from torch.utils.benchmark import Timer

    def fresh_run():
        for tensor in grad_to_none:  # as do_bench does: no gradient accumulation inside the timing
            tensor.grad = None
        run()

    fresh_run()  # warm-up: first-call allocations and lazy imports are not what we measure
    return Timer(stmt="run()", globals={"run": fresh_run}).blocked_autorange(min_run_time=min_run_time).median * 1e3


CPU_RUNS = 5


def single_thread_cpu_ms(run: Callable[[], None], grad_to_none: Sequence[torch.Tensor] = (),
                         runs: int = CPU_RUNS) -> float:
    """The least process CPU time of `run` in ms over `runs` runs (after a warm-up), with torch on one thread: what
    a call costs with a shared machine to itself, less the second thread's help."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for attempt in range(runs + 1):
            for tensor in grad_to_none:
                tensor.grad = None
            start = time.process_time()
            run()
            if attempt:  # the first run warms up
                best = min(best, time.process_time() - start)
        return best * 1e3
    finally:
        torch.set_num_threads(threads)


def time_passes(row: dict, forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                timer: Callable[..., float], passes: Sequence[str] = ("fwd", "fwd+bwd")) -> list[dict]:
    """One measured row per pass: `forward(*inputs)` alone, and with a backward of a fixed random gradient."""
    grad_out = {}

    def run(backward: bool) -> None:
        out = forward(*inputs)
        if backward:
            if "value" not in grad_out:
                grad_out["value"] = torch.randn_like(out)
            out.backward(grad_out["value"])

    return [measure({**row, "pass": name}, lambda name=name: timer(lambda: run(name == "fwd+bwd"), inputs))
            for name in passes]


def add_ratios(rows: list[dict], *, ours: Sequence[str], peers: Sequence[str], key: Sequence[str]) -> None:
    """ratio_vs_<peer> = peer ms / our ms for rows of `ours` at the same `key` columns (> 1: ours is faster)."""
    times = {(row["provider"], *(row[k] for k in key)): row.get("ms") for row in rows}
    for row in rows:
        if row["provider"] in ours and row.get("ms"):
            for peer in peers:
                peer_ms = times.get((peer, *(row[k] for k in key)))
                row[f"ratio_vs_{peer}"] = round(peer_ms / row["ms"], 3) if peer_ms else None


def add_cpu_ratios(rows: list[dict], *, ours: Sequence[str], peer: str, key: Sequence[str]) -> None:
    """cpu_ratio_vs_<peer> = the peer's cpu_ms / ours at the same `key` columns, for rows of `ours`."""
    times = {tuple(row[k] for k in key): row.get("cpu_ms") for row in rows if row["provider"] == peer}
    for row in rows:
        if row["provider"] in ours:
            peer_ms, our_ms = times.get(tuple(row[k] for k in key)), row.get("cpu_ms")
            row[f"cpu_ratio_vs_{peer}"] = round(peer_ms / our_ms, 3) if peer_ms and our_ms else None


def measure(row: dict, timing: Callable[[], float]) -> dict:
    """`row` plus its `ms`, or plus the first line of the error when the provider cannot run it."""
    try:
        return {**row, "ms": round(timing(), 4)}
    # a peer that is not installed, a shape a kernel rejects, a config that fails to compile: keep the others
    except Exception as err:  # noqa: BLE001
        return {**row, "error": error_note(err)}


def error_note(err: Exception) -> str:
    """What a failed row keeps of its error: the first line, at most 200 characters (the type's name if empty)."""
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    return {"device": device_name(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "triton": package_version("triton"), "commit": git_commit() or "unknown",
            "date": datetime.date.today().isoformat()}


def to_markdown(result: dict) -> str:
    lines = [f"# {result['title']} — {result['device']}, {result['date']}", "",
             f"{result['dtype']}, torch {result['torch']}, triton {result['triton']}, commit {result['commit']}.",
             *result.get("notes", ()), "", *markdown_table(result["columns"], result["rows"], first_metric="ms")]
    return "\n".join(lines) + "\n"


def markdown_table(columns, rows: list[dict], *, first_metric: str) -> list[str]:
    """Table lines; a row with an `error` shows it in place of its metrics, from column `first_metric` on."""
    def cells(row: dict) -> list:
        if "error" not in row:
            return [row.get(c) for c in columns]
        first = list(columns).index(first_metric)
        shown = [row.get(c) for c in columns[:first]] + [f"failed: {row['error']}"]
        return shown + [None] * (len(columns) - len(shown))

    return table(columns, [cells(row) for row in rows])


def write_results(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """Writes <benchmark>-<device>-<date>-<commit>.json and .md under out_dir; returns both paths."""
    stem = result_stem(result, out_dir)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    atomic_write_all({json_path: json_text(result), md_path: to_markdown(result)})
    return json_path, md_path


def write_results_with_plot(result: dict, out_dir: Path, plot: Callable[[dict], bytes],
                            to_markdown: Callable[[dict, str], str]) -> tuple[Path, Path, Path]:
    """<benchmark>-<device>-<date>-<commit>.json, .md (which shows the plot) and .png under out_dir, written
    atomically all three together; returns the three paths."""
    stem = result_stem(result, out_dir)
    json_path, md_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".md"), stem.with_suffix(".png")
    atomic_write_all({png_path: plot(result), json_path: json_text(result),
                      md_path: to_markdown(result, png_path.name)})
    return json_path, md_path, png_path


def result_stem(result: dict, out_dir: Path) -> Path:
    """out_dir/<benchmark>-<device>-<date>-<commit>, what a result's files are named (device as a slug)."""
    return Path(out_dir) / f"{result['benchmark']}-{slug(result['device'])}-{result['date']}-{result['commit']}"
