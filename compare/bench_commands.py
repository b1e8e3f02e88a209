"""`archlab bench trainer | packing | decode | inference | prepare | KERNEL`: the benchmark commands' handlers (the
parser is compare/cli.py's). Each imports what it runs, so `archlab --help` starts without torch."""
from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from archlab.train.errors import UserError

DEFAULT_BENCH_CONFIG = "configs/quickstart.yaml"


def cmd_bench(args) -> None:
    if args.what == "trainer":
        _bench_trainer(args)
    elif args.what == "packing":
        _bench_packing(args)
    elif args.what == "decode":
        _bench_decode(args)
    elif args.what == "inference":
        _bench_inference(args)
    elif args.what == "prepare":
        from archlab.train.prepare_bench import main as bench_prepare

        if args.config or args.overrides:
            raise UserError("archlab bench prepare takes no config or overrides")
        bench_prepare(["--out", args.out or "compare/results"])
    else:
        _bench_kernel(args)


def _bench_trainer(args) -> None:
    from archlab.kernels.common.files import atomic_write, json_text
    from archlab.train.bench import bench_trainer

    config, overrides = args.config or DEFAULT_BENCH_CONFIG, list(args.overrides)
    if "=" in config:  # `archlab bench trainer key=value`: the config was left out
        config, overrides = DEFAULT_BENCH_CONFIG, [config, *overrides]
    repeats = 6 if args.repeats is None else args.repeats
    result = bench_trainer(config, overrides, steps=args.steps, repeats=repeats)
    if args.out:
        atomic_write(Path(args.out), json_text(result))
    print(json.dumps(result))


def _bench_packing(args) -> None:
    from archlab.kernels.common.files import atomic_write, json_text
    from archlab.kernels.common.provenance import git_commit
    from archlab.kernels.common.files import slug
    from archlab.train.bench import SPEECHES, bench_packing

    config, overrides = args.config or "configs/quickstart.yaml", list(args.overrides)
    if "=" in config:
        config, overrides = "configs/quickstart.yaml", [config, *overrides]
    repeats = 6 if args.repeats is None else args.repeats
    result = bench_packing(config, overrides, separator=SPEECHES, steps=args.steps, repeats=repeats)
    result |= {"commit": git_commit() or "unknown", "date": datetime.date.today().isoformat()}
    name = f"packing-{slug(result['device'])}-{result['date']}-{result['commit']}.json"
    out = Path(args.out or "compare/results") / name
    atomic_write(out, json_text(result))
    print(json.dumps(result))
    print(f"wrote {out}")


def _bench_decode(args) -> None:
    from archlab.compare.decode_bench import bench_decode, load_runs, to_markdown, write_results

    if not args.config or not args.overrides:
        raise UserError("archlab bench decode takes run directories: masked_diffusion and/or block_diffusion runs "
                        "and one autoregressive run (it scores the samples)")
    samplers, ar = load_runs([args.config, *args.overrides], args.device, n_tokens=args.tokens,
                             prompt_len=args.prompt_len)
    result = bench_decode(samplers, ar, n_tokens=args.tokens, samples=args.samples, prompt_len=args.prompt_len,
                          steps=args.denoising_steps)
    json_path, md_path, png_path = write_results(result, Path(args.out or "compare/results"))
    print(to_markdown(result, png_path.name))
    print(f"wrote {json_path}, {md_path} and {png_path}")


def _bench_inference(args) -> None:
    from archlab.compare.inference_bench import BATCH_SIZES, CONTEXTS, REPEATS, bench_runs, write_results
    from archlab.compare.inference_plots import to_markdown

    if not args.config:
        raise UserError("archlab bench inference takes one or more run directories")
    result = bench_runs([args.config, *args.overrides], contexts=args.contexts or CONTEXTS,
                        batch_sizes=args.batch_sizes or BATCH_SIZES, n_tokens=args.new_tokens,
                        repeats=REPEATS if args.repeats is None else args.repeats, device=args.device)
    json_path, md_path, png_path = write_results(result, Path(args.out or "compare/results"))
    print(to_markdown(result, png_path.name))
    print(f"wrote {json_path}, {md_path} and {png_path}")


def int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bench_kernel(args) -> None:
    import torch

    from archlab.kernels.registry import kernel_benches

    bench = kernel_benches().get(args.what)
    if bench is None:
        raise UserError(f"unknown benchmark {args.what!r}; available: trainer, packing, decode, inference, prepare, "
                        f"{', '.join(kernel_benches())}")
    if args.config or args.overrides:
        raise UserError(f"archlab bench {args.what} takes no config or overrides")
    if bench.needs_cuda and not torch.cuda.is_available():
        print(f"archlab bench {args.what} needs a CUDA GPU and this machine has none: nothing measured")
        return
    from archlab.kernels.bench import to_markdown, write_results

    result = bench.load()()
    json_path, md_path = write_results(result, Path(args.out or "compare/results"))
    print(to_markdown(result))
    print(f"wrote {json_path} and {md_path}")
