"""`archlab train | eval | sample | model | compare | report | data | bench | doctor | compile-matrix` — the command
line (`archlab data fetch | prepare | verify`).

User errors (bad config, data, checkpoint, arguments) print one line `error: ...` and exit with code 2;
`--debug` shows the traceback instead. It lives in compare/, the top layer, because it dispatches to every
layer below; the handlers import what they run, so `archlab --help` starts without torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from archlab.compare.bench_commands import DEFAULT_BENCH_CONFIG, cmd_bench, int_list
from archlab.train.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit code 2, like every other user error
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def cmd_train(args) -> None:
    if args.nproc > 1:  # the same command under torchrun, one process per device
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}", "-m",
                  "archlab.compare.cli", "train", args.config, *args.overrides, *(["--resume"] if args.resume else [])]
        os.execv(sys.executable, launch)
    from archlab.train import distributed
    from archlab.train.config import load_config
    from archlab.train.trainer import Trainer

    overrides = list(args.overrides) + (["run.resume=true"] if args.resume else [])
    cfg = load_config(args.config, overrides)
    trainer = Trainer(cfg)
    main = trainer.world.is_main  # the other ranks train and stay quiet
    n_params = trainer.model.num_parameters()
    if main:
        print(f"{cfg.model.stack_name} + {cfg.model.objective}: {n_params / 1e6:.2f}M parameters, "
              f"{trainer.flops_per_step / trainer.tokens_per_step / 1e6:.1f} MFLOP/token (train), device "
              f"{trainer.device}" + (f" x {trainer.world.size} processes" if trainer.world.distributed else "")
              + f", run dir {cfg.run.dir}" + (f", resuming from {trainer.resume_from}" if trainer.resume_from else ""))
        if trainer.step >= cfg.train.max_steps:
            print(f"{cfg.run.dir} finished at step {trainer.step}: scoring and sampling its last checkpoint again")
    final = trainer.train()
    if main and cfg.sample.tokens and trainer.sharded:  # sampling would need every rank's shards
        print(f"(no end-of-run sample with train.parallel=fsdp: run `archlab sample {cfg.run.dir}`)")
    elif main and cfg.sample.tokens:
        text = trainer.sample_text(cfg.sample.prompt, cfg.sample.tokens, temperature=cfg.sample.temperature,
                                   top_k=cfg.sample.top_k, seed=cfg.train.seed, **cfg.sample.options())
        (Path(cfg.run.dir) / "sample.txt").write_text(text)
        print(f"--- sample ({cfg.sample.tokens} bytes, temperature {cfg.sample.temperature}) ---\n{text}\n---")
    if main:
        print(json.dumps(trainer.write_summary(final)))
    distributed.stop(trainer.world)


def cmd_eval(args) -> None:
    from archlab.train.loading import load_run

    if (args.mlp or args.baseline) and not args.linear_probe:
        raise UserError("--mlp and --baseline go with --linear-probe; add it")
    if (args.per_position or args.passkey or args.passkey_trials is not None) and not args.lengths:
        raise UserError("--per-position, --passkey and --passkey-trials go with --lengths; add e.g. --lengths 1x,2x,4x")
    if args.lengths:
        from archlab.compare.length import evaluate_lengths, parse_lengths

        if args.linear_probe:
            raise UserError("--lengths and --linear-probe are separate evaluations; run them one at a time")
        if args.passkey_trials is not None and not args.passkey:
            raise UserError("--passkey-trials goes with --passkey; add it")
        trials = 20 if args.passkey_trials is None else args.passkey_trials
        result, path = evaluate_lengths(args.run_dir, parse_lengths(args.lengths), per_position=args.per_position,
                                        passkey=args.passkey, trials=trials, device=args.device,
                                        checkpoint=args.checkpoint, split=args.split, whole_split=args.all)
        print(json.dumps(result))
        print(f"wrote {path}", file=sys.stderr)
        return
    if args.linear_probe:
        from archlab.train.linear_probe import probe_run

        result, path = probe_run(args.run_dir, baseline=args.baseline, mlp=args.mlp, device=args.device,
                                 checkpoint=args.checkpoint, split=args.split, whole_split=args.all)
        print(json.dumps(result))
        print(f"wrote {path}", file=sys.stderr)
        return
    run = load_run(args.run_dir, args.device, checkpoint=args.checkpoint)
    metrics = run.evaluate(run.eval_windows(args.split, whole_split=args.all))
    print(json.dumps({"step": run.step, "checkpoint": str(run.checkpoint),
                      **{f"{args.split}_{k}": v for k, v in metrics.items()}}))


def cmd_sample(args) -> None:
    from archlab.train.config import SampleConfig, validate_config
    from archlab.train.loading import load_run

    wanted = validate_config({"prompt": args.prompt, "tokens": args.tokens, "temperature": args.temperature,
                              "top_k": args.top_k, "steps": args.steps, "strategy": args.strategy,
                              "block_size": args.block_size}, source="archlab sample", section=SampleConfig)
    run = load_run(args.run_dir, args.device, purpose="sample from")
    objective, trained = run.model.objective, run.cfg.model.objective
    if not objective.can_sample(run.cfg.model):
        raise UserError(f"this {trained} run cannot generate text (see its model settings)")
    unused = sorted(set(wanted.options()) - set(objective.sample_options))
    if unused:
        raise UserError(f"--{unused[0].replace('_', '-')} does not apply to objective {trained}; leave it out")
    seq_len, prompt_len = run.cfg.data.seq_len, len(wanted.prompt.encode())
    if objective.samples_within_context and prompt_len + wanted.tokens > seq_len:
        raise UserError(f"a {trained} run samples prompt and continuation in one window of "
                        f"data.seq_len={seq_len} bytes: the prompt ({prompt_len}) + --tokens ({wanted.tokens}) does "
                        "not fit; lower --tokens")
    print(run.sample_text(wanted.prompt, wanted.tokens, temperature=wanted.temperature, top_k=wanted.top_k,
                          seed=args.seed, **wanted.options()))


def cmd_model(args) -> None:
    from archlab.archs.registry import build_model
    from archlab.archs.summary import describe_stack
    from archlab.kernels.common.markdown import table
    from archlab.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    rows = describe_stack(build_model(cfg.model), cfg.data.seq_len)
    columns = {"layer": "layer", "mixer": "mixer", "params": "parameters",
               "flops_per_token": f"forward FLOPs/token (L={cfg.data.seq_len})",
               "state_bytes": f"decoding state bytes/sequence (L={cfg.data.seq_len}, bf16)"}
    shown = [{key: f"{value:,}" if isinstance(value, int) else value for key, value in row.items()} for row in rows]
    print(f"model.layers: {cfg.model.layers!r} ({cfg.model.stack_name}, {cfg.model.n_layers} blocks), "
          f"d_model {cfg.model.d_model}, objective {cfg.model.objective}")
    print("\n".join(table([columns[key] for key in columns], [[row[key] for key in columns] for row in shown])))


def cmd_data_fetch(args) -> None:
    from archlab.train.fetch import fetch_corpus

    fetch_corpus(args.name, url=args.url, dest=Path(args.dest) if args.dest else None)


def cmd_data_prepare(args) -> None:
    from archlab.train.prepare import prepare_dataset

    out = prepare_dataset(args.sources, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                          text_field=args.text_field, split_on=args.split_on, max_doc_chars=args.max_doc_chars,
                          val_fraction=args.val_fraction,
                          test_fraction=args.test_fraction, workers=args.workers, shard_tokens=args.shard_tokens)
    manifest = json.loads((out / "manifest.json").read_text())
    counts = ", ".join(f"{name} {split['tokens']:,} tokens / {split['documents']:,} documents"
                       for name, split in manifest["splits"].items() if split["documents"])
    print(f"{out}: {counts} ({manifest['dtype']}, tokenizer {manifest['tokenizer']['spec']})")


def cmd_data_verify(args) -> None:
    from archlab.train.prepared import PreparedDataset

    dataset = PreparedDataset.open(args.dir)
    dataset.verify()
    print(f"{dataset.folder}: every shard matches its manifest (manifest sha256 {dataset.manifest_sha256})")


def cmd_compare(args) -> None:
    from archlab.compare.runner import describe_plan, run_study

    if args.dry_run:
        print(describe_plan(args.study), end="")
        return
    run_study(args.study, args.out, resume=args.resume)


def cmd_report(args) -> None:
    from archlab.compare.report import write_report

    for kind, path in write_report(Path(args.out_dir)).items():
        print(f"{kind}: {path}")


def cmd_doctor(args) -> None:
    from archlab.kernels.doctor import report

    try:
        text = report(run_checks=not args.no_checks)
    except ValueError as err:  # e.g. a bad ARCHLAB_SELF_CHECK
        raise UserError(str(err)) from None
    print(text, end="")


def cmd_compile_matrix(args) -> None:
    import importlib.util
    import os
    import time

    if importlib.util.find_spec("triton") is None:
        raise UserError("archlab compile-matrix needs triton (pip install triton; Linux x86-64)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise UserError("archlab compile-matrix compiles kernels, which interpreted ones are not: unset "
                        "TRITON_INTERPRET")
    from archlab.kernels import compile_matrix
    from archlab.kernels.common.provenance import git_commit

    targets = tuple(args.targets or compile_matrix.TARGETS)
    start = time.perf_counter()
    try:
        rows = compile_matrix.compile_matrix(targets, jobs=args.jobs)
    except ValueError as err:  # an unknown target
        raise UserError(str(err)) from None
    meta = {"command": "archlab compile-matrix", "triton": compile_matrix.triton.__version__,
            "ptxas": compile_matrix.ptxas_version(), "commit": git_commit() or "unknown",
            "targets": list(targets), "compiles": len(rows), "seconds": round(time.perf_counter() - start, 1)}
    json_path, md_path = compile_matrix.write_results(rows, meta, Path(args.out))
    print(f"compiled {len(rows)} kernel configs for {len(targets)} targets in {meta['seconds']} s; wrote "
          f"{json_path} and {md_path}")


class _BenchHelp(argparse.Action):
    """`archlab bench --help`, listing the kernel ops' benchmarks from their registry (kernels/registry.py). It is
    read only when asked for: importing the kernels (torch) would slow every other command down by seconds."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show this help message and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from archlab.kernels.registry import kernel_benches

        parser.epilog = "kernel benchmarks: " + "; ".join(f"`{bench.name}` ({bench.summary})"
                                                          for bench in kernel_benches().values())
        parser.print_help()
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="archlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides such as train.max_steps=200")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.dir")
    train.add_argument("--nproc", type=int, default=1, help="processes (GPUs) on this machine: runs the same command "
                                                             "under torchrun (DDP); default 1")
    train.set_defaults(handler=cmd_train)

    evaluate = sub.add_parser("eval", help="score a run's checkpoint; prints JSON with val_bpb")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--split", choices=["val", "test"], default="val")
    evaluate.add_argument("--all", action="store_true", help="score the whole split, not train.eval_tokens")
    evaluate.add_argument("--checkpoint", help="a checkpoint directory (default: the latest)")
    evaluate.add_argument("--device", choices=["auto", "cpu", "cuda"])
    evaluate.add_argument("--linear-probe", action="store_true",
                          help="train fresh byte probes on the frozen features (and on the run's step-0 encoder), "
                               "early-stopped on held-out train windows; writes RUN/linear_probe.json "
                               "(autoregressive and jepa runs)")
    evaluate.add_argument("--mlp", action="store_true", help="--linear-probe: also an MLP probe")
    evaluate.add_argument("--baseline", help="--linear-probe: another run whose features are probed the same way, "
                                             "e.g. the autoregressive arm of a study")
    evaluate.add_argument("--lengths", metavar="1x,2x,...",
                          help="length extrapolation: bits per byte of the same tokens in windows of these multiples "
                               "of the trained data.seq_len; writes RUN/length_eval.json and .png")
    evaluate.add_argument("--per-position", action="store_true",
                          help="--lengths: also bits per byte in buckets of seq_len/2 positions (autoregressive runs)")
    evaluate.add_argument("--passkey", action="store_true",
                          help="--lengths: also passkey retrieval at each length (autoregressive runs)")
    evaluate.add_argument("--passkey-trials", type=int, help="--passkey: sequences per length (default 20)")
    evaluate.set_defaults(handler=cmd_eval)

    model = sub.add_parser("model", help="print the stack a config builds: per block its mixer, parameters, "
                                         "FLOPs per token and decoding state bytes at data.seq_len; then totals")
    model.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    model.add_argument("overrides", nargs="*", help="dotted overrides such as model.layers=mamba*3,attention")
    model.set_defaults(handler=cmd_model)

    sample = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
    sample.add_argument("run_dir")
    sample.add_argument("--prompt", default="\n")
    sample.add_argument("--tokens", type=int, default=200, help="bytes to generate")
    sample.add_argument("--temperature", type=float, default=0.8)
    sample.add_argument("--top-k", type=int, default=None)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--steps", type=int, help="masked_diffusion, block_diffusion: denoising steps (default: one "
                                                  "per byte)")
    sample.add_argument("--strategy", help="masked_diffusion: ancestral (default), confidence or block; "
                                           "block_diffusion, within each block: ancestral (default) or confidence")
    sample.add_argument("--block-size", type=int, help="masked_diffusion, --strategy block: bytes per block")
    sample.add_argument("--device", choices=["auto", "cpu", "cuda"])
    sample.set_defaults(handler=cmd_sample)

    compare = sub.add_parser("compare", help="run a head-to-head study (configs/studies/*.yaml) and write its report")
    compare.add_argument("study", help="study YAML, e.g. configs/studies/quick.yaml")
    compare.add_argument("--out", help="output directory (default runs/studies/<study name>)")
    compare.add_argument("--resume", action="store_true", help="continue a study: finished runs are skipped, "
                                                               "interrupted ones resume from their checkpoint")
    compare.add_argument("--dry-run", action="store_true", help="print the planned runs (sizes, steps) and stop")
    compare.set_defaults(handler=cmd_compare)

    report = sub.add_parser("report", help="(re)write report.md, results.csv and plots of a study directory")
    report.add_argument("out_dir", help="a study's output directory (holds study.json)")
    report.set_defaults(handler=cmd_report)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_sub.add_parser("fetch", help="download enwik8 or text8 (needs a network) and verify it")
    fetch.add_argument("name", help="enwik8 or text8")
    fetch.add_argument("--url", help="download from here instead of the canonical URL (file:// works)")
    fetch.add_argument("--dest", help="folder to write into (default: $ARCHLAB_DATA or ~/.cache/archlab/data)")
    fetch.set_defaults(handler=cmd_data_fetch)
    prepare = data_sub.add_parser("prepare", help="tokenize text, JSONL, parquet or datasets folders into token "
                                                  "shards + document index + manifest (parallel, resumable)")
    prepare.add_argument("sources", nargs="+", metavar="SRC", help="source files or save_to_disk folders, in order")
    prepare.add_argument("--out", required=True, help="the dataset folder to write (rerun to resume)")
    chosen = prepare.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--tokenizer", help="bytes, tiktoken:<name> or hf:<path to tokenizer.json>")
    chosen.add_argument("--train-tokenizer", type=int, metavar="VOCAB",
                        help="train a byte-level BPE of this vocabulary on the train split first, saved in --out")
    prepare.add_argument("--text-field", default="text", help="JSONL field / parquet or arrow column (default text)")
    prepare.add_argument("--split-on", metavar="REGEX", help="plain text: a line matching this starts a new document "
                                                            "(default: one document per file)")
    prepare.add_argument("--max-doc-chars", type=int, metavar="N", help="plain text: a document reaching N characters "
                                                                        "ends at the next line (e.g. a long book)")
    prepare.add_argument("--val-fraction", type=float, default=0.05, help="share of documents in val (default 0.05)")
    prepare.add_argument("--test-fraction", type=float, default=0.0, help="share of documents in test (default 0)")
    prepare.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    prepare.add_argument("--shard-tokens", type=int, default=100_000_000,
                         help="tokens per shard group, about (default 100M)")
    prepare.set_defaults(handler=cmd_data_prepare)
    verify = data_sub.add_parser("verify", help="check every shard of a prepared dataset against its sha256")
    verify.add_argument("dir", help="a folder written by archlab data prepare")
    verify.set_defaults(handler=cmd_data_verify)

    bench = sub.add_parser("bench", add_help=False,
                           help="benchmarks: `trainer` (trainer overhead vs a bare loop), `packing` (trainer "
                                "tokens/s on packed documents vs stream windows), "
                                "`decode RUN [RUN ...]` (masked and block diffusion runs vs one autoregressive "
                                "run: tokens/s vs generative bpb), `inference RUN [RUN ...]` (prefill, "
                                "decode tokens/s, cache and peak memory against context length and batch size), "
                                "`prepare` (archlab data prepare on "
                                "refdocs: MB/s per core, peak RSS), and one per kernel op (listed by "
                                "`archlab bench --help`)")
    bench.add_argument("-h", "--help", action=_BenchHelp)
    bench.add_argument("what", help="trainer, packing, decode, inference, prepare, or a kernel benchmark listed "
                                    "below")
    bench.add_argument("config", nargs="?", help=f"trainer: the model's config (default {DEFAULT_BENCH_CONFIG}); "
                                                 "decode, inference: a run directory")
    bench.add_argument("overrides", nargs="*", help="trainer: dotted overrides; decode, inference: more run "
                                                    "directories")
    bench.add_argument("--steps", type=int, default=50, help="trainer, packing: steps per timed chunk")
    bench.add_argument("--repeats", type=int, help="trainer, packing: timed chunks of each, interleaved (default 6); "
                                                   "inference: timed calls per setting after a warm-up (default 3)")
    bench.add_argument("--tokens", type=int, default=96, help="decode: bytes generated after each prompt")
    bench.add_argument("--samples", type=int, default=8, help="decode: prompts, sampled together as one batch")
    bench.add_argument("--prompt-len", type=int, default=32, help="decode: prompt bytes (val-split windows)")
    bench.add_argument("--denoising-steps", type=int_list, help="decode: denoising step counts, comma-separated "
                                                               "(default 8,16,32,64 and --tokens)")
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], help="decode, inference: where to load the runs")
    bench.add_argument("--contexts", type=int_list, help="inference: context lengths in tokens, comma-separated "
                                                          "(default 128,512,1024,2048,4096)")
    bench.add_argument("--batch-sizes", type=int_list, help="inference: batch sizes, comma-separated (default 1,8)")
    bench.add_argument("--new-tokens", type=int, default=16, help="inference: tokens generated per setting")
    bench.add_argument("--out", help="trainer: also write the JSON here; kernels and prepare: folder for JSON + "
                                     "Markdown; decode, inference: folder for JSON + Markdown + PNG "
                                     "(default compare/results)")
    bench.set_defaults(handler=cmd_bench)

    doctor = sub.add_parser("doctor", help="what runs here: versions, GPU, per kernel op the usable backends, "
                                           "self-check verdicts and what `auto` picks and why")
    doctor.add_argument("--no-checks", action="store_true", help="report cached self-check verdicts only; run none")
    doctor.set_defaults(handler=cmd_doctor)

    matrix = sub.add_parser("compile-matrix", help="compile every Triton kernel in every autotune config for GPU "
                                                   "targets (no GPU needed); registers, spills, shared memory")
    matrix.add_argument("--out", default="compare/results", help="folder for JSON + Markdown (default: %(default)s)")
    matrix.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: cores)")
    matrix.add_argument("--targets", type=int, nargs="+", help="compute capabilities, e.g. 80 90 (default: sm_80, "
                                                                "86, 89, 90, 100, 120)")
    matrix.set_defaults(handler=cmd_compile_matrix)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
