"""`scripts/gpu_check.sh`: everything GPU-side archlab can measure, in one command, on one GPU.

Steps, each a subprocess with its own log and time limit, all run whatever the others did: the environment and
self-checks (`archlab doctor`), the gpu-marked tests, the peers (installed, or installed from carried wheels or
sources in .peers/, or skipped with a note), every kernel benchmark against its peer, the gpt124m config's
trainer benchmark (tokens/s, MFU) and a head-to-head study (configs/studies/gpu-5min.yaml). Everything goes to
compare/results/gpu-<device>-<date>/, with summary.md rewritten (atomically) after every step.

`--dry-run` walks the same steps on a CPU with cheap stand-ins (the study only planned, the trainer benchmark on
the quickstart config for a few steps, peers reported, not installed), so the script is tested without a GPU.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from archlab.kernels.common.files import atomic_write, slug
from archlab.kernels.common.markdown import table
from archlab.kernels.common.provenance import git_commit

ROOT = Path(__file__).resolve().parents[1]
ARCHLAB = [sys.executable, "-m", "archlab.compare.cli"]
PEERS = {"mamba_ssm": "mamba-ssm", "causal_conv1d": "causal-conv1d", "fla": "fla-core"}  # module: package


@dataclass
class Step:
    name: str
    command: list[str]  # empty: the peers step, which decides its command when it runs (peer_step)
    timeout_s: int
    status: str = "not run"
    seconds: float = 0.0
    result: str = ""


def _gpu_steps(out: Path) -> list[Step]:
    return [
        Step("doctor", [*ARCHLAB, "doctor"], 300),
        Step("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"], 300),
        Step("peers", [], 900),  # before the benches that compare with them
        *[Step(f"bench {name}", [*ARCHLAB, "bench", name, "--out", str(out / "bench")], 240) for name in _benches()],
        Step("trainer gpt124m", [*ARCHLAB, "bench", "trainer", "configs/bench/gpt124m.yaml", "--steps", "50",
                                 "--repeats", "3", "--out", str(out / "trainer-gpt124m.json")], 300),
        Step("study gpu-5min", [*ARCHLAB, "compare", "configs/studies/gpu-5min.yaml", "--out", str(out / "study")],
             600),
    ]


def _dry_steps(out: Path) -> list[Step]:
    """The same steps at CPU cost: what differs is only the size of the work."""
    steps = _gpu_steps(out)
    cheap = {
        "trainer gpt124m": [*ARCHLAB, "bench", "trainer", "configs/quickstart.yaml", "train.device=cpu",
                            "model.d_model=32", "model.n_layers=1", "data.seq_len=32", "train.batch_size=2",
                            "train.warmup_steps=0", "--steps", "2", "--repeats", "1",
                            "--out", str(out / "trainer-gpt124m.json")],
        "study gpu-5min": [*ARCHLAB, "compare", "configs/studies/gpu-5min.yaml", "--dry-run"],  # plan, validate
        # a bench with a CPU mode would measure the CPU for minutes: its command line is walked instead
        **{f"bench {name}": [*ARCHLAB, "bench", name, "--help"] for name, bench in _benches().items()
           if not bench.needs_cuda},
    }
    for step in steps:
        step.command = cheap.get(step.name, step.command)
    return steps


def _benches() -> dict:
    from archlab.kernels.registry import kernel_benches

    return kernel_benches()


def device_slug() -> str:
    import torch

    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return slug(name)


def _result_line(log: str) -> str:
    """The last non-empty line a step printed: pytest's tally, a bench's 'wrote ...', a study's report path."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _trainer_figures(path: Path) -> str:
    result = json.loads(path.read_text())
    mfu = f", MFU {result['mfu']:.1%}" if "mfu" in result else " (no MFU: unknown peak)"
    return (f"{result['trainer_tokens_per_s']:,} tokens/s{mfu}, trainer overhead {result['overhead_pct']}% "
            f"({result['params']:,} params, {result['device']})")


def _study_figures(path: Path) -> str:
    with path.open() as table_file:
        return "; ".join(f"{row['arm']} {float(row['final']):.4f} {row['quality_metric']} in {row['train_seconds']} s"
                         for row in csv.DictReader(table_file))


# the figures a step's own files hold, in place of its last output line
FIGURES = {"trainer gpt124m": ("trainer-gpt124m.json", _trainer_figures),
           "study gpu-5min": ("study/results.csv", _study_figures)}


def run_step(step: Step, out: Path, env: dict) -> None:
    log_path = out / f"{step.name.replace(' ', '-')}.log"
    start = time.perf_counter()
    try:
        done = subprocess.run(step.command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=step.timeout_s)
        log = done.stdout + done.stderr
        step.status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired as err:
        log = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
        step.status = f"failed (over its {step.timeout_s} s limit)"
    step.seconds = time.perf_counter() - start
    step.result = _result_line(log)
    name, read = FIGURES.get(step.name, (None, None))
    if step.status == "ok" and name and (out / name).exists():
        step.result = read(out / name)
    atomic_write(log_path, f"$ {' '.join(step.command)}\n{log}")


def peer_step(step: Step, out: Path, dry_run: bool, env: dict) -> None:
    """Peers installed: nothing to do. Else scripts/build_peers.sh build with what was carried in .peers/ (it
    reuses wheels built for this GPU and torch, else builds the sources: about 9 minutes, and installs fla's wheel),
    or, with fla alone missing, its carried wheel installed; with nothing carried, a note. A dry run only says what
    it would do."""
    start = time.perf_counter()
    missing = [package for module, package in PEERS.items() if importlib.util.find_spec(module) is None]
    carried = [*(ROOT / ".peers" / "wheels").glob("*/*.whl"), *(ROOT / ".peers" / "sdist").glob("*.tar.gz")]
    if not missing:
        step.status, step.result = "ok", f"{', '.join(PEERS.values())} installed"
    elif carried:
        fla_wheels = [str(path) for path in carried if path.name.startswith("fla_core-")]
        # fla alone missing: its wheel is pure Python, nothing to build; else build (or reuse) what was carried
        command = ([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", *fla_wheels]
                   if missing == [PEERS["fla"]] and fla_wheels else ["bash", "scripts/build_peers.sh", "build"])
        if dry_run:
            step.status, step.result = "skipped (dry run)", f"would run: {' '.join(command)}"
        else:
            step.command = command
            run_step(step, out, {**env, "PYTHON": sys.executable})  # the interpreter archlab runs in
            return
    else:
        step.status = "skipped"
        step.result = (f"{', '.join(missing)} not installed and no sources in .peers/ (scripts/build_peers.sh "
                       "download, where there is a network): the benches compare with SDPA only")
    step.seconds = time.perf_counter() - start


def summary(steps: list[Step], meta: dict) -> str:
    lines = [f"# GPU check: {meta['device']}, {meta['date']}", "",
             f"`{meta['command']}` at archlab {meta['commit']}{' (dry run: CPU stand-ins)' if meta['dry_run'] else ''}."
             " Each step's full output is in its log beside this file.", ""]
    lines += table(["step", "status", "seconds", "last line of its output"],
                   [(s.name, s.status, f"{s.seconds:.0f}", s.result.replace("|", "/")) for s in steps])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="walk every step on a CPU at stand-in sizes")
    parser.add_argument("--out", help="results folder (default compare/results/gpu-<device>-<date>; a dry run: "
                                      "runs/gpu-check-dry-run)")
    args = parser.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; run `scripts/gpu_check.sh --dry-run` to walk the steps on a CPU",
              file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    default = ROOT / "runs" / "gpu-check-dry-run" if args.dry_run else \
        ROOT / "compare" / "results" / f"gpu-{device_slug()}-{date}"
    out = Path(args.out).resolve() if args.out else default
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if not args.dry_run:
        env.pop("TRITON_INTERPRET", None)  # the real kernels, compiled for this GPU
    meta = {"device": device_slug(), "date": date, "commit": git_commit() or "unknown", "dry_run": args.dry_run,
            "command": "scripts/gpu_check.sh" + (" --dry-run" if args.dry_run else "")}
    steps = _dry_steps(out) if args.dry_run else _gpu_steps(out)
    for number, step in enumerate(steps, 1):
        print(f"[{number}/{len(steps)}] {step.name}: {' '.join(step.command) or 'find or install the peers'}",
              flush=True)
        if step.command:
            run_step(step, out, env)
        else:
            peer_step(step, out, args.dry_run, env)
        print(f"    {step.status} in {step.seconds:.0f} s: {step.result}", flush=True)
        atomic_write(out / "summary.md", summary(steps[:number], meta))
    print(f"wrote {out / 'summary.md'}")
    return 0 if all(s.status == "ok" or s.status.startswith("skipped") for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
