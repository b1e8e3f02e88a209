"""`archlab bench inference`'s report: the Markdown page and the four-panel plot of a result
(compare/inference_bench.py)."""
from __future__ import annotations

from archlab.kernels.bench import markdown_table
from archlab.kernels.common.plotting import png_bytes, pyplot


def to_markdown(result: dict, plot_name: str | None = None) -> str:
    runs = ", ".join(f"{r['run']} ({r['layers']}, {r['objective']}, {r['decoding']})" for r in result["runs"])
    lines = [f"# {result['title']} — {result['device']}, {result['date']}", "",
             f"{result['dtype']}, torch {result['torch']}, {result['threads']} threads, commit {result['commit']}; "
             f"load average before {result['load_average']['before']}, after {result['load_average']['after']}.",
             f"Runs: {runs}.", *(f"- skipped {s['dir']}: {s['reason']}" for s in result["skipped"]),
             f"- peak memory: {result['peak_memory_measure']}.", *(f"- {note}" for note in result["notes"]), "",
             *markdown_table(result["columns"], result["rows"], first_metric="prefill_ms")]
    if plot_name:
        lines += ["", f"![inference cost vs context]({plot_name})"]
    return "\n".join(lines) + "\n"


PANELS = [  # (y key, y label, the decoding the panel applies to: None for all)
    ("cache_bytes", "decoding state bytes (measured)", "cache"),
    ("decode_tokens_per_s", "decode tokens/s", None),
    ("prefill_ms", "prefill latency (ms)", "cache"),
    ("decode_peak_bytes", "peak bytes allocated while decoding (above the weights)", None),
]


def plot(result: dict) -> bytes:
    """PNG of four log-log panels against context, one line per run and batch size (diffusion: per step count
    too): decoding state bytes, decode tokens/s, prefill latency, peak memory."""
    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = pyplot().subplot_mosaic([[0, 1, "legend"], [2, 3, "legend"]], figsize=(15, 8.5),
                                         width_ratios=[1, 1, 0.4])
    colors = {name: f"C{i}" for i, name in enumerate(r["run"] for r in result["runs"])}
    for panel, (y_key, y_label, decoding) in enumerate(PANELS):
        ax = axes[panel]
        shown = [r for r in rows if r[y_key] is not None and decoding in (None, r["decoding"])]
        for run, batch_size, steps in dict.fromkeys((r["run"], r["batch_size"], r["steps"]) for r in shown):
            points = sorted((r["context"], r[y_key]) for r in shown
                            if (r["run"], r["batch_size"], r["steps"]) == (run, batch_size, steps))
            label = f"{run}, batch {batch_size}" + ("" if steps is None else f", {steps} steps")
            first_batch = batch_size == min(result["batch_sizes"])
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o" if first_batch else "s", color=colors[run],
                    linestyle="-" if first_batch else "--", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["contexts"], [str(context) for context in result["contexts"]])
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_title(y_label + ("" if decoding is None else " — cache-decoding runs"))
        ax.grid(True, which="both", alpha=0.3)
    axes["legend"].axis("off")  # the decode panel has a line for every run and batch size
    axes["legend"].legend(*axes[1].get_legend_handles_labels(), fontsize=8, loc="center left")
    fig.suptitle(f"Inference cost vs context (log-log; solid: batch {min(result['batch_sizes'])}, dashed: larger) — "
                 f"{result['device']}, {result['dtype']}, {result['date']}, commit {result['commit']}", fontsize=10)
    return png_bytes(fig)
