"""`archlab eval RUN --lengths 1x,2x,4x,8x [--per-position] [--passkey]`: how a run holds up past its trained length.

Length extrapolation, as fla's evals/ppl.py: at each multiple m of the run's data.seq_len, the same first T tokens
of the eval split (T = train.eval_tokens, or the whole split with --all, rounded down to a multiple of the longest
window) are cut into windows of m * seq_len tokens and each window is scored by one forward pass over all of it (no
cache, no sliding). Every length scores exactly the same target tokens, so the bpb differ only by how much context
each position sees and how far its position lies past the trained length. --per-position adds bits per byte in
buckets of seq_len / 2 positions (fla's bucket_size): the curve past the trained length is where extrapolation
fails. Only an autoregressive run scores each position by itself; other objectives give the overall figure at each
length (diffusion: its NELBO bound over the longer window, a JEPA: its probe) and refuse --per-position.

Passkey retrieval (autoregressive runs only): a random 5-digit key in a sentence hidden at a random depth of real
eval-split text, and at the end a question whose answer is the key; the whole sequence is m * seq_len + 1 tokens.
Scored teacher-forced in one forward pass: greedy exact match (every key token the argmax; the same as greedy
decoding, which can only go on right while every token before was right) and bits per key digit (chance:
log2(10) = 3.32). Pieces are encoded apart with the run's tokenizer and the filler is the split's own tokens, so a
BPE run works too; its key may be fewer tokens than digits, and bits are still divided by the 5 digits.

The result goes to RUN/length_eval.json (and RUN/length_eval.png), written atomically after all scoring.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from archlab.archs.model import IGNORE, split_documents
from archlab.archs.objectives.autoregressive import AutoregressiveObjective
from archlab.compare.length_plots import passkey_plot, positions_plot, run_figure, summary_plot
from archlab.kernels.common.files import atomic_write_all, json_text
from archlab.kernels.common.markdown import table
from archlab.train.data import gather_windows
from archlab.train.errors import UserError
from archlab.train.loading import LoadedRun, byte_weighted_sums, load_run

LENGTH_FILE = "length_eval.json"
LENGTH_PLOT = "length_eval.png"
BATCH_TOKENS = 16_384  # tokens per forward pass: windows are batched up to this (memory on a CPU)
KEY_DIGITS = 5
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = " What is the pass key? The pass key is "
PASSKEY_SEED = 20240101


def parse_lengths(text: str) -> list[int]:
    """"1x,2x,4x,8x" -> [1, 2, 4, 8]: whole multiples of the trained length, each once, in increasing order."""
    multiples = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([1-9][0-9]*)x\s*", part)
        if match is None:
            raise UserError(f"--lengths {text!r}: {part.strip() or 'an empty entry'!r} is not a multiple of the "
                            "trained length; write whole multiples like 1x,2x,4x,8x")
        multiples.append(int(match.group(1)))
    if len(set(multiples)) != len(multiples):
        raise UserError(f"--lengths {text!r} names a length twice; give each once")
    return sorted(multiples)


def evaluate_lengths(run_dir: str | Path, multiples: list[int], *, per_position: bool = True, passkey: bool = True,
                     trials: int = 20, device: str | None = None, checkpoint: str | Path | None = None,
                     split: str = "val", whole_split: bool = False) -> tuple[dict[str, Any], Path]:
    """Scores the run at each multiple of its data.seq_len and writes RUN/length_eval.json (+ .png); returns the
    result and the JSON's path. Bad input is a one-line UserError before any scoring and before anything is written."""
    multiples = sorted(set(multiples))
    if not multiples or multiples[0] < 1:
        raise UserError(f"lengths must be whole multiples >= 1 of the trained length, got {multiples}; give --lengths "
                        "such as 1x,2x,4x,8x")
    if passkey and trials < 1:
        raise UserError(f"--passkey-trials must be >= 1, got {trials}")
    run = load_run(run_dir, device, checkpoint=checkpoint)
    seq_len, data = run.cfg.data.seq_len, run.corpus.split(split)
    causal_lm = isinstance(run.model.objective, AutoregressiveObjective)
    objective = run.cfg.model.objective
    if per_position and not causal_lm:
        raise UserError(f"per-position bits need an autoregressive run ({run_dir} is {objective}, which scores a "
                        "window as a whole); leave out --per-position")
    if passkey and not causal_lm:
        raise UserError(f"passkey retrieval needs an autoregressive run ({run_dir} is {objective}); leave out "
                        "--passkey")
    lengths = [m * seq_len for m in multiples]
    for length in lengths:
        try:
            run.model.objective.check_seq_len(run.cfg.model, length)
        except ValueError as err:
            raise UserError(f"length {length // seq_len}x ({length} tokens): {err}") from None
    if len(data) < lengths[-1] + 1:
        longest = (len(data) - 1) // seq_len
        raise UserError(f"the {split} split has {len(data):,} tokens: a window of {lengths[-1]:,} ({multiples[-1]}x) "
                        f"needs {lengths[-1] + 1:,}; " + (f"the longest that fits is {longest}x" if longest >= 1 else
                                                          "not even 1x fits: evaluate another split"))
    if passkey and passkey_overhead(run) >= lengths[0]:
        raise UserError(f"the passkey sentence and question take {passkey_overhead(run)} tokens, more than a "
                        f"{multiples[0]}x window ({lengths[0]} tokens) holds; ask for longer lengths")
    budget = len(data) - 1 if whole_split else max(run.cfg.train.eval_tokens, lengths[-1])
    n_tokens = min(budget, len(data) - 1) // lengths[-1] * lengths[-1]
    bucket = max(1, seq_len // 2)

    started, rows = time.perf_counter(), []
    for multiple, length in zip(multiples, lengths, strict=True):
        began = time.perf_counter()
        windows = gather_windows(data, np.arange(0, n_tokens, length), length + 1,
                                 run.corpus.doc_starts.get(split))
        row: dict[str, Any] = {"multiple": multiple, "tokens": length, "windows": len(windows)}
        if causal_lm:
            nats, n_bytes = position_sums(run, windows)
            row["bpb"] = bits_per_byte(nats.sum(), n_bytes.sum())
            if per_position:
                row["buckets"] = [[start, min(start + bucket, length),
                                   bits_per_byte(nats[start:start + bucket].sum(), n_bytes[start:start + bucket].sum())]
                                  for start in range(0, length, bucket)]
        else:
            row["bpb"] = whole_window_bpb(run, windows)
        if passkey:
            row["passkey"] = passkey_scores(run, data, length, trials)
        row["seconds"] = round(time.perf_counter() - began, 2)
        rows.append(row)

    result = {"run": str(run_dir), "objective": objective, "layers": run.cfg.model.layers,
              "metric": run.model.objective.quality_metric, "bound": run.model.objective.quality_is_bound,
              "probe": run.model.objective.quality_is_probe, "tokenizer": run.corpus.tokenizer.spec, "split": split,
              "checkpoint": str(run.checkpoint), "step": run.step, "trained_seq_len": seq_len,
              "scored_tokens": n_tokens, "bucket_tokens": bucket if per_position else None,
              "passkey_digits": KEY_DIGITS if passkey else None, "lengths": rows,
              "device": str(run.device), "seconds": round(time.perf_counter() - started, 2)}
    path = Path(run_dir) / LENGTH_FILE
    atomic_write_all({path: json_text(result), Path(run_dir) / LENGTH_PLOT: run_figure(result)})
    return result, path


def bits_per_byte(nats: float | torch.Tensor, n_bytes: float | torch.Tensor) -> float:
    return float(nats) / (math.log(2) * max(float(n_bytes), 1.0))


def batches_of(windows: torch.Tensor) -> list[torch.Tensor]:
    return list(windows.split(max(1, BATCH_TOKENS // windows.shape[-1])))


@torch.no_grad()
def token_nats(run: LoadedRun, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A causal LM over the whole of each row, no cache: (next-token nats (B, L), their bytes (B, L), logits)."""
    inputs, targets, documents = split_documents(batch.to(run.device))
    with run.autocast():
        logits = run.model.objective.logits(run.model, inputs, documents=documents)
    nats = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    n_bytes = run.model.bytes_per_target(targets)
    return nats, n_bytes, logits


def position_sums(run: LoadedRun, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nats and bytes summed over windows at each target position (L,), float64 on the CPU."""
    nats_sum = torch.zeros(windows.shape[-1] - 1, dtype=torch.float64)
    bytes_sum = torch.zeros_like(nats_sum)
    for batch in batches_of(windows):
        nats, n_bytes, _ = token_nats(run, batch)
        nats_sum += nats.double().sum(0).cpu()
        bytes_sum += n_bytes.double().sum(0).cpu()
    return nats_sum, bytes_sum


@torch.no_grad()
def whole_window_bpb(run: LoadedRun, windows: torch.Tensor) -> float:
    """The objective's own quality metric over the windows, byte-weighted as `archlab eval` reports it."""
    def score(batch: torch.Tensor) -> dict:
        with run.autocast():
            return run.model.objective.evaluate(run.model, batch.to(run.device))

    totals, weight = byte_weighted_sums(score, batches_of(windows))
    return totals[run.model.objective.quality_metric] / weight


# -- passkey retrieval -------------------------------------------------------------------------------

def passkey_overhead(run: LoadedRun) -> int:
    """Tokens the sentence, question and key take (the rest of a passkey sequence is filler)."""
    encode, key = run.corpus.tokenizer.encode, "0" * KEY_DIGITS
    return len(encode(NEEDLE.format(key=key))) + len(encode(QUESTION)) + len(encode(key))


def passkey_sequence(encode, data, total: int, rng: np.random.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """One trial: `total` token ids of filler (a random stretch of `data`, the split's tokens) with the key's
    sentence at a random depth, then the question and the key last. Also where each piece sits."""
    key = "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
    needle, question, key_ids = encode(NEEDLE.format(key=key)), encode(QUESTION), encode(key)
    n_filler = total - len(needle) - len(question) - len(key_ids)
    start = int(rng.integers(0, len(data) - n_filler + 1))
    filler = gather_windows(data, np.array([start]), n_filler)[0].tolist()
    depth = float(rng.random())
    cut = round(depth * n_filler)
    ids = filler[:cut] + needle + filler[cut:] + question + key_ids
    return torch.tensor(ids, dtype=torch.long), {"key": key, "depth": depth, "needle_start": cut,
                                                 "needle_tokens": len(needle), "key_tokens": len(key_ids)}


@torch.no_grad()
def passkey_scores(run: LoadedRun, data, length: int, trials: int) -> dict[str, Any]:
    """Greedy exact-match accuracy and mean bits per key digit over `trials` sequences of length + 1 tokens (the
    same seeds, hence keys and depths, at every length). `digit_bits_per_digit`: the same bits with the model's
    choice restricted to the ten digits (chance: exactly log2 10), which isolates recall from how unlikely the
    model finds a digit there at all; None where the tokenizer does not give each digit its own token."""
    encode = run.corpus.tokenizer.encode
    digit_ids = [encode(str(digit)) for digit in range(10)]
    digits = torch.tensor([ids[0] for ids in digit_ids]) if all(len(ids) == 1 for ids in digit_ids) else None
    sequences, infos = zip(*(passkey_sequence(encode, data, length + 1, np.random.default_rng(PASSKEY_SEED + trial))
                             for trial in range(trials)), strict=True)
    if any(info["key_tokens"] != KEY_DIGITS for info in infos):
        digits = None  # some key's digits were merged into fewer tokens
    rows, per_batch = torch.stack(sequences), max(1, BATCH_TOKENS // length)
    hits, bits, digit_bits = 0, 0.0, 0.0
    for first in range(0, trials, per_batch):
        batch = rows[first:first + per_batch]
        nats, _, logits = token_nats(run, batch)
        for row, info in enumerate(infos[first:first + per_batch]):
            # the key's tokens end the row: the targets of its last key_tokens positions
            key = batch[row, -info["key_tokens"]:].to(logits.device)
            key_logits = logits[row, -info["key_tokens"]:]
            hits += bool((key_logits.argmax(-1) == key).all())
            bits += float(nats[row, -info["key_tokens"]:].sum()) / math.log(2) / KEY_DIGITS
            if digits is not None:
                among_digits = key_logits[:, digits.to(logits.device)].log_softmax(-1)
                picked = (key[:, None] == digits.to(key.device)).float().argmax(-1)
                digit_bits -= float(among_digits.gather(1, picked[:, None]).sum()) / math.log(2) / KEY_DIGITS
    return {"accuracy": hits / trials, "bits_per_digit": bits / trials,
            "digit_bits_per_digit": digit_bits / trials if digits is not None else None, "trials": trials}


# -- report section ----------------------------------------------------------------------------------

def length_report_section(results: list[tuple[str, dict]], title: str) -> tuple[str, dict[str, bytes]]:
    """Markdown for a report (a table: per run its bpb and passkey at each length) and its PNGs by file name:
    bpb vs length, bpb vs position at the longest length, and passkey accuracy / bits vs length, a line per run."""
    multiples = sorted({row["multiple"] for _, result in results for row in result["lengths"]})
    seq_lens = sorted({result["trained_seq_len"] for _, result in results})
    has_passkey = any("passkey" in row for _, result in results for row in result["lengths"])
    has_buckets = any("buckets" in row for _, result in results for row in result["lengths"])
    columns = ["run", "step", *[f"bpb {m}x" for m in multiples]]
    if has_passkey:
        columns += [f"passkey {m}x" for m in multiples]
    body = []
    for label, result in results:
        by_multiple = {row["multiple"]: row for row in result["lengths"]}
        cells = [label, result["step"]] + [f"{by_multiple[m]['bpb']:.3f}" if m in by_multiple else "–"
                                           for m in multiples]
        if has_passkey:
            cells += [_passkey_cell(by_multiple.get(m, {}).get("passkey")) for m in multiples]
        body.append(cells)
    images = {"length_bpb.png": summary_plot(results, title)}
    if has_buckets:
        images["length_positions.png"] = positions_plot(results, title)
    if has_passkey:
        images["length_passkey.png"] = passkey_plot(results, title)
    first = results[0][1]
    lines = [f"## {title}", "",
             f"Each run scored at multiples of its trained length ({', '.join(map(str, seq_lens))} tokens) on the "
             f"same first {first['scored_tokens']:,} tokens of its {first['split']} split, one forward pass per "
             "window (`archlab eval RUN --lengths ... --per-position --passkey`; method in compare/length.py). "
             + ("Passkey: accuracy (greedy exact match) / bits per key digit / the same bits among the ten digits "
                f"only (chance 3.32), {_passkey_trials(results)} trials per length. " if has_passkey else ""),
             "", *table(columns, body), ""]
    lines += [f"![{name}]({name})" for name in images] + [""]
    return "\n".join(lines), images


def _passkey_trials(results: list[tuple[str, dict]]) -> int:
    return next(row["passkey"]["trials"] for _, result in results for row in result["lengths"] if "passkey" in row)


def _passkey_cell(passkey: dict | None) -> str:
    if passkey is None:
        return "–"
    among_digits = passkey.get("digit_bits_per_digit")
    return (f"{passkey['accuracy']:.0%} / {passkey['bits_per_digit']:.2f}"
            + ("" if among_digits is None else f" / {among_digits:.2f}"))


def main(argv: list[str] | None = None) -> None:
    """`python -m archlab.compare.length OUT RUN...`: the report section of runs already evaluated (each holds
    length_eval.json), written to OUT/report.md with its PNGs, and each run's JSON and its own figure."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--title", default="Length extrapolation and passkey retrieval")
    args = parser.parse_args(argv)
    missing = [run for run in args.runs if not (Path(run) / LENGTH_FILE).is_file()]
    if missing:
        parser.error(f"{missing[0]} has no {LENGTH_FILE}; run `archlab eval {missing[0]} --lengths ...` first")
    results = [(Path(run).name, json.loads((Path(run) / LENGTH_FILE).read_text())) for run in args.runs]
    markdown, images = length_report_section(results, args.title)
    out = Path(args.out)
    files = {out / "report.md": markdown, **{out / name: data for name, data in images.items()}}
    for label, result in results:
        files |= {out / f"{label}.json": json_text(result), out / f"{label}.png": run_figure(result)}
    atomic_write_all(files)
    print(markdown)


if __name__ == "__main__":
    main()
