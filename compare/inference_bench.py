"""`archlab bench inference RUN [RUN ...]`: what generating costs each run against context length and batch size.

A context C is the number of positions in the sequence when the last new token is produced: a run prefills
C - n_tokens random token ids, then generates n_tokens, so its decoding state ends up holding C positions.
- cache-decoding runs (autoregressive; JEPA next_latent, which samples through the same KV-cached loop): the
  sampler's pieces (backbone.new_cache, objective.logits(model, tokens, cache=), objective.draw_tokens, greedy)
  time the prefill (one forward over the prompt, filling the cache) and the decode (one single-position step per
  new token);
- masked diffusion: no cache, each denoising step re-runs the whole sequence; block diffusion: a KV cache its
  sampler keeps (not walked here), each step runs one block: objective.sample at each step count of
  decode_bench.step_grid (ancestral), timed as one call, reported per generated token;
- memory: `cache_bytes`, the bytes of the distinct storages the decoding state's tensors hold after prefill +
  decode (walked, not computed), beside `state_bytes`, the mixers' analytic count (archs/layers/mixer.py);
  `decode_peak_bytes`, the peak of bytes allocated while decoding (from the end of the prefill: the cache and each
  step's transients) and `peak_bytes`, over prefill + decode (the prefill's activations grow with the context for
  every mixer), both above what was allocated before the prefill (the weights): torch.cuda.max_memory_allocated on
  CUDA; on the CPU the allocation events of PyTorch's CPU allocator recorded by torch.profiler (profile_memory),
  summed in time order (memory that libraries allocate outside PyTorch's allocator, e.g. oneDNN scratch space, is
  not in it). Diffusion has no prefill: both are the peak of one sample call.
Each setting runs once untimed (warm-up; memory is measured there), then `repeats` timed times: medians.
"""
from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from archlab.archs.backbones.stack import activation_dtype
from archlab.archs.model import inference
from archlab.archs.registry import OBJECTIVES
from archlab.archs.summary import decoding_state_bytes
from archlab.compare.decode_bench import step_grid
from archlab.compare.inference_plots import plot, to_markdown
from archlab.kernels.bench import environment, error_note, markdown_table, write_results_with_plot
from archlab.kernels.common.files import atomic_write_all, json_text
from archlab.kernels.common.timing import synchronize, timed
from archlab.train.config import run_config
from archlab.train.errors import UserError
from archlab.train.loading import LoadedRun, load_run

INFERENCE_FILE = "inference.json"  # a run's own measurement (measure_run_inference), beside its summary.json
CONTEXTS = (128, 512, 1024, 2048, 4096)
BATCH_SIZES = (1, 8)
NEW_TOKENS = 16
REPEATS = 3
SEED = 0
COLUMNS = ["run", "decoding", "steps", "context", "batch_size", "prefill_ms", "decode_ms_per_token",
           "decode_tokens_per_s", "cache_bytes", "state_bytes", "decode_peak_bytes", "peak_bytes"]


# -- memory -----------------------------------------------------------------------------------------

def cache_bytes(cache: Any) -> int:
    """Bytes of the distinct storages held by the tensors in `cache` (lists, tuples, dicts and objects' attributes
    walked), so views of one buffer count once."""
    storages: dict[tuple, int] = {}

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[(value.device, storage.data_ptr())] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif hasattr(value, "__dict__"):
            for item in vars(value).values():
                walk(item)

    walk(cache)
    return sum(storages.values())


class PeakMemory:
    """`with PeakMemory(device) as peak:` sets `peak.bytes`, the peak of bytes allocated inside the block above what
    was allocated when it began, and `peak.after_mark`, the same peak from the moment `peak.mark()` was called (the
    decode phase after a prefill: the cache it holds, and each step's transients), or None without a mark. See
    the module's docstring for what each device counts."""

    MARK = "archlab: inference bench mark"

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.after_mark = device, 0, None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.before_mark = torch.cuda.memory_allocated(self.device), None
        else:
            from torch.profiler import ProfilerActivity, profile

            self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self.profile.__enter__()
        return self

    def mark(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.before_mark = torch.cuda.max_memory_allocated(self.device) - self.start
            torch.cuda.reset_peak_memory_stats(self.device)  # its peak restarts at what is allocated now
        else:
            from torch.profiler import record_function

            with record_function(self.MARK):  # an event on the profiler's clock: where the mark falls
                pass

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - self.start
            self.bytes = peak if self.before_mark is None else max(peak, self.before_mark)
            self.after_mark = None if self.before_mark is None else peak
            return
        self.profile.__exit__(*exc)
        events = self.profile.profiler.kineto_results.events()
        marks = [event.start_ns() for event in events if event.name() == self.MARK]
        memory = sorted((event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]"
                        and event.device_type() == torch.autograd.DeviceType.CPU)
        level = 0
        for start_ns, nbytes in memory:  # frees of blocks allocated before the block began are not recorded
            if marks and self.after_mark is None and start_ns >= marks[0]:
                self.after_mark = level
            level += nbytes
            self.bytes = max(self.bytes, level)
            if self.after_mark is not None:
                self.after_mark = max(self.after_mark, level)
        if marks and self.after_mark is None:
            self.after_mark = level


# -- one setting ------------------------------------------------------------------------------------

def decode_with_cache(model, prompt: torch.Tensor, n_tokens: int, after_prefill: Callable[[], None] | None = None,
                      ) -> tuple[list, torch.Tensor, torch.Tensor, float, float]:
    """The AR sampler's two phases, timed apart: prefill prompt (B, P) into a fresh cache for P + n_tokens
    positions, (call after_prefill,) then n_tokens greedy single-position steps. Returns (cache, the new tokens
    (B, n_tokens), the logits after the last of them, prefill seconds, decode seconds)."""
    objective, device = model.objective, prompt.device
    cache = model.backbone.new_cache(prompt.shape[0], prompt.shape[1] + n_tokens, device=device)
    # the last position's logits, copied: a view would keep the prompt's (B, P, vocab) logits alive while decoding
    logits, prefill_s = timed(lambda: objective.logits(model, prompt, cache=cache)[:, -1].clone(), device)
    if after_prefill is not None:
        after_prefill()

    def decode() -> tuple[torch.Tensor, torch.Tensor]:
        tokens, next_logits = [], logits
        for _ in range(n_tokens):
            tokens.append(objective.draw_tokens(next_logits, 0.0, None, None))
            next_logits = objective.logits(model, tokens[-1], cache=cache)[:, -1]
        return torch.cat(tokens, dim=1), next_logits

    (tokens, last), decode_s = timed(decode, device)
    return cache, tokens, last, prefill_s, decode_s


def measure_cache_decoding(run: LoadedRun, context: int, batch_size: int, n_tokens: int, repeats: int) -> dict:
    model, device = run.model, run.device
    prompt = random_prompt(run, batch_size, context - n_tokens)
    with inference(model), run.autocast():
        with PeakMemory(device) as peak:
            cache, *_ = decode_with_cache(model, prompt, n_tokens, after_prefill=peak.mark)
        measured_cache = cache_bytes(cache)
        dtype = activation_dtype(model.backbone.norm.weight, device)  # what new_cache made the state in
        del cache
        times = [decode_with_cache(model, prompt, n_tokens)[3:] for _ in range(repeats)]
    prefill_s = statistics.median(t[0] for t in times)
    decode_s = statistics.median(t[1] for t in times)
    return {"decoding": "cache", "steps": None, "prefill_ms": round(prefill_s * 1e3, 3),
            "decode_ms_per_token": round(decode_s * 1e3 / n_tokens, 3),
            "decode_tokens_per_s": round(batch_size * n_tokens / decode_s, 2), "cache_bytes": measured_cache,
            "state_bytes": model.backbone.state_bytes(batch_size, context, dtype=dtype), "peak_bytes": peak.bytes,
            "decode_peak_bytes": peak.after_mark}


def random_prompt(run: LoadedRun, batch_size: int, length: int) -> torch.Tensor:
    """(batch_size, length) token ids of the run's tokenizer, the same every call: cost does not depend on them."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, run.corpus.tokenizer.vocab_size, (batch_size, length), generator=generator).to(run.device)


def measure_diffusion(run: LoadedRun, context: int, batch_size: int, n_tokens: int, steps: int,
                      repeats: int) -> dict:
    model, device = run.model, run.device
    prompt = random_prompt(run, batch_size, context - n_tokens)

    def call() -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(SEED)
        with run.autocast():  # context_len None: beyond the trained length too, for its cost
            return model.objective.sample(model, prompt, n_tokens, temperature=1.0, generator=generator,
                                          steps=steps, strategy="ancestral")

    with PeakMemory(device) as peak:
        call()
    seconds = statistics.median(timed(call, device)[1] for _ in range(repeats))
    return {"decoding": "diffusion", "steps": steps, "prefill_ms": None,
            "decode_ms_per_token": round(seconds * 1e3 / n_tokens, 3),
            "decode_tokens_per_s": round(batch_size * n_tokens / seconds, 2), "cache_bytes": None,
            "state_bytes": _sampler_cache_bytes(run, batch_size, context), "peak_bytes": peak.bytes,
            "decode_peak_bytes": peak.bytes}


def _sampler_cache_bytes(run: LoadedRun, batch_size: int, context: int) -> int | None:
    """What a denoising sampler caches at this context (archs/summary.py decides which models keep a decoding
    state): block diffusion's KV cache of the finished blocks, in the dtype its cache is made in; None for masked
    diffusion, which caches nothing."""
    with run.autocast():
        dtype = activation_dtype(run.model.backbone.norm.weight, run.device)
    per_sequence = decoding_state_bytes(run.model, context, dtype=dtype)["state_bytes"]
    return None if per_sequence is None else batch_size * per_sequence


# -- runs -------------------------------------------------------------------------------------------

def decoding_of(cfg) -> str | None:
    """How a run's objective generates: "diffusion" (a denoising sampler that takes `steps`: masked or block
    diffusion), "cache" (the KV-cached AR loop), or None (it cannot)."""
    if "steps" in OBJECTIVES[cfg.model.objective].sample_options:
        return "diffusion"
    return "cache" if OBJECTIVES[cfg.model.objective].can_sample(cfg.model) else None


def check_settings(contexts: Sequence[int], batch_sizes: Sequence[int], n_tokens: int, repeats: int) -> None:
    if n_tokens < 1 or repeats < 1:
        raise UserError(f"--new-tokens and --repeats must be >= 1, got {n_tokens} and {repeats}")
    if not contexts or not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be >= 1 and both lists non-empty, got contexts {list(contexts)} and "
                        f"batch sizes {list(batch_sizes)}")
    if min(contexts) <= n_tokens:
        raise UserError(f"every context must exceed --new-tokens={n_tokens} (it holds the prompt and the new "
                        f"tokens), got {min(contexts)}; raise the context or lower --new-tokens")


def check_runs(run_dirs: Sequence[str], contexts: Sequence[int], device: str | None) -> tuple[list[str], list[dict]]:
    """(run dirs that can generate, skipped [{dir, reason}]), from their configs alone; one-line UserErrors for
    contexts an objective refuses, and when no run can generate."""
    usable, skipped = [], []
    for run_dir in run_dirs:
        cfg = run_config(run_dir, device, need_checkpoint="measure inference from")
        if decoding_of(cfg) is None:
            skipped.append({"dir": str(run_dir), "reason": f"model.objective={cfg.model.objective} cannot generate "
                                                           "text with these settings"})
            continue
        for context in contexts:
            try:
                OBJECTIVES[cfg.model.objective].check_seq_len(cfg.model, context)
            except ValueError as err:
                raise UserError(f"{run_dir}: context {context}: {err}") from None
        usable.append(str(run_dir))
    if not usable:
        raise UserError(f"none of the runs can generate ({'; '.join(s['reason'] for s in skipped)}); give an "
                        "autoregressive, masked_diffusion, block_diffusion or next_latent jepa run")
    return usable, skipped


def load_runs(run_dirs: Sequence[str], device: str | None) -> list[LoadedRun]:
    """The runs at their latest checkpoints; refuses runs of different tokenizers (their tokens/s differ in what
    a token is)."""
    runs = [load_run(run_dir, device, purpose="measure inference from") for run_dir in run_dirs]
    specs = {run.corpus.tokenizer.spec for run in runs}
    if len(specs) > 1:
        raise UserError(f"the runs use different tokenizers ({', '.join(sorted(specs))}): tokens/s are not "
                        "comparable; compare runs of one tokenizer at a time")
    return runs


def run_name(run: LoadedRun) -> str:
    return Path(run.cfg.run.dir).name


def bench_inference(runs: Sequence[LoadedRun], *, contexts: Sequence[int] = CONTEXTS,
                    batch_sizes: Sequence[int] = BATCH_SIZES, n_tokens: int = NEW_TOKENS, repeats: int = REPEATS,
                    skipped: Sequence[dict] = ()) -> dict[str, Any]:
    """The result dict (kernels/bench conventions): one row per run x context x batch size (x diffusion steps).
    A setting that fails (e.g. out of memory) keeps its row with an `error`."""
    check_settings(contexts, batch_sizes, n_tokens, repeats)
    load_before = os.getloadavg()
    rows = []
    for run in runs:
        kind = decoding_of(run.cfg)
        for context in sorted(contexts):
            for batch_size in sorted(batch_sizes):
                key = {"run": run_name(run), "context": context, "batch_size": batch_size}
                settings = step_grid(n_tokens) if kind == "diffusion" else [None]
                for steps in settings:
                    try:
                        if steps is None:
                            row = measure_cache_decoding(run, context, batch_size, n_tokens, repeats)
                        else:
                            row = measure_diffusion(run, context, batch_size, n_tokens, steps, repeats)
                    except (RuntimeError, ValueError) as err:  # out of memory, a shape a kernel rejects
                        row = {"decoding": kind, "steps": steps, "error": error_note(err)}
                    rows.append({**key, **row})
                    print(f"bench inference: {key['run']}, context {context}, batch {batch_size}"
                          + ("" if steps is None else f", {steps} steps"), file=sys.stderr, flush=True)
    device = runs[0].device
    dtype = runs[0].autocast_dtype or torch.float32
    return {
        "benchmark": "inference", "title": "Inference cost: prefill, decode and memory against context length",
        **environment(device, dtype), "threads": torch.get_num_threads(),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "runs": [{"run": run_name(run), "dir": str(run.cfg.run.dir), "objective": run.cfg.model.objective,
                  "layers": run.cfg.model.layers, "decoding": decoding_of(run.cfg),
                  "tokenizer": run.corpus.tokenizer.spec, "trained_seq_len": run.cfg.data.seq_len,
                  "parameters": run.model.num_parameters(), "step": run.step} for run in runs],
        "skipped": list(skipped), "contexts": sorted(contexts), "batch_sizes": sorted(batch_sizes),
        "n_tokens": n_tokens, "repeats": repeats, "seed": SEED,
        "peak_memory_measure": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                                "torch.profiler CPU allocator events (profile_memory)"),
        "notes": [
            f"context C = positions held when the last new token is produced: a prompt of C - {n_tokens} random "
            f"token ids, then {n_tokens} new tokens (greedy for cache decoding).",
            "prefill_ms: one forward over the prompt filling a fresh cache; decode_ms_per_token: one single-position "
            "step from that cache; decode_tokens_per_s = batch x new tokens / decode seconds. Diffusion: one "
            "sample call (ancestral, `steps` network evals over the whole sequence) / new tokens, no prefill.",
            "cache_bytes: distinct storages of the decoding state's tensors after prefill + decode (measured); "
            "state_bytes: the mixers' analytic count at C; decode_peak_bytes / peak_bytes: peak allocated above "
            "the weights while decoding / over prefill + decode (the warm-up call).",
            (f"medians of {repeats} timed calls" if repeats > 1 else "one timed call") + " after one untimed "
            "call; contexts beyond a run's trained length time and size the model there, its outputs are out of "
            "distribution.",
        ],
        "columns": COLUMNS, "rows": rows,
    }


# -- output -----------------------------------------------------------------------------------------

def write_results(result: dict, out_dir: Path) -> tuple[Path, Path, Path]:
    """inference-<device>-<date>-<commit>.json, .md and .png under out_dir, written atomically all three together."""
    return write_results_with_plot(result, out_dir, plot, to_markdown)


def bench_runs(run_dirs: Sequence[str], *, contexts: Sequence[int] = CONTEXTS,
               batch_sizes: Sequence[int] = BATCH_SIZES, n_tokens: int = NEW_TOKENS, repeats: int = REPEATS,
               device: str | None = None) -> dict[str, Any]:
    """Every check, then `bench_inference` on the runs that can generate (the others skipped with a note)."""
    check_settings(contexts, batch_sizes, n_tokens, repeats)
    usable, skipped = check_runs(run_dirs, contexts, device)
    return bench_inference(load_runs(usable, device), contexts=contexts, batch_sizes=batch_sizes,
                           n_tokens=n_tokens, repeats=repeats, skipped=skipped)


def measure_run_inference(run_dir: str | Path, *, contexts: Sequence[int] = CONTEXTS, batch_size: int = 1,
                          new_tokens: int = NEW_TOKENS, device: str | None = None,
                          repeats: int = REPEATS) -> tuple[dict, Path]:
    """One run's result, written to run_dir/INFERENCE_FILE (for a study's report); a run that cannot generate
    (`decoding_of(cfg)` is None) is a UserError."""
    result = bench_runs([str(run_dir)], contexts=contexts, batch_sizes=[batch_size], n_tokens=new_tokens,
                        repeats=repeats, device=device)
    failed = [row for row in result["rows"] if "error" in row]
    if failed:  # nothing saved: a study retries it on --resume
        raise UserError(f"{run_dir}: inference at context {failed[0]['context']} failed ({failed[0]['error']})")
    path = Path(run_dir) / INFERENCE_FILE
    atomic_write_all({path: json_text(result)})
    return result, path


def inference_cost(result: dict) -> dict[str, dict]:
    """Per run, the costs a quality-vs-inference-cost Pareto front reads, at the largest context measured and the
    smallest batch: decode ms per token, decode tokens/s, prefill ms, decoding state bytes (measured; 0 for
    diffusion, which keeps none), peak bytes while decoding and over prefill + decode. Diffusion: its largest
    step count (one token per step)."""
    context, batch_size = max(result["contexts"]), min(result["batch_sizes"])
    costs = {}
    for row in result["rows"]:
        if (row["context"], row["batch_size"]) != (context, batch_size) or "error" in row:
            continue
        if row["run"] in costs and (row["steps"] or 0) <= (costs[row["run"]]["steps"] or 0):
            continue
        costs[row["run"]] = {"context": context, "batch_size": batch_size, "steps": row["steps"],
                             "decode_ms_per_token": row["decode_ms_per_token"],
                             "decode_tokens_per_s": row["decode_tokens_per_s"], "prefill_ms": row["prefill_ms"],
                             "state_bytes": row["cache_bytes"] or 0, "decode_peak_bytes": row["decode_peak_bytes"],
                             "peak_bytes": row["peak_bytes"]}
    return costs


def inference_section(results: Sequence[dict]) -> str:
    """A report's Markdown table of `inference_cost` over several results (e.g. each run's INFERENCE_FILE)."""
    columns = ["run", "context", "batch_size", "steps", "decode_ms_per_token", "decode_tokens_per_s", "prefill_ms",
               "state_bytes", "decode_peak_bytes", "peak_bytes"]
    rows = [{"run": run, **cost} for result in results for run, cost in inference_cost(result).items()]
    devices = ", ".join(sorted({f"{result['device']} ({result['date']}, commit {result['commit']})"
                                for result in results}))
    return "\n".join([f"Inference cost at the largest context measured, smallest batch — {devices}:", "",
                      *markdown_table(columns, rows, first_metric="decode_ms_per_token")]) + "\n"
