"""The length evaluation's figures (compare/length.py), as PNG bytes: one run's (a line per length) and a
report's (a line per run). A dotted vertical line marks the trained length wherever the x axis is in tokens."""
from __future__ import annotations

import math

from archlab.kernels.common.plotting import png_bytes, pyplot

CHANCE_BITS = math.log2(10)  # bits per digit of a uniform guess


def _midpoints(buckets: list) -> tuple[list[float], list[float]]:
    return [(start + end) / 2 for start, end, _ in buckets], [bpb for _, _, bpb in buckets]


def _metric_label(result: dict) -> str:
    flag = " (upper bound)" if result["bound"] else " (probe)" if result["probe"] else ""
    return f"{result['split']} bits per byte{flag}"


def _trained_line(ax, seq_len: int) -> None:
    ax.axvline(seq_len, color="grey", linestyle=":", linewidth=1.2, label=f"trained length ({seq_len})")


def _passkey_axes(axes, lines: list[tuple[str, list[int], list[dict]]]) -> None:
    """Accuracy, bits per key digit and the same bits among the ten digits only, vs sequence length, on three axes;
    `lines`: (label, tokens, passkey results)."""
    accuracy, bits, digit_bits = axes
    ticks = sorted({n for _, tokens, _ in lines for n in tokens})
    for index, (label, tokens, scores) in enumerate(lines):
        style = {"color": f"C{index % 10}", "marker": "o", "markersize": 4, "label": label}
        accuracy.plot(tokens, [s["accuracy"] for s in scores], **style)
        bits.plot(tokens, [s["bits_per_digit"] for s in scores], **style)
        if all(s.get("digit_bits_per_digit") is not None for s in scores):
            digit_bits.plot(tokens, [s["digit_bits_per_digit"] for s in scores], **style)
    for ax in (bits, digit_bits):
        ax.axhline(CHANCE_BITS, color="black", linestyle="--", linewidth=1, label="chance (log2 10)")
    accuracy.set_ylim(-0.03, 1.03)
    accuracy.set_ylabel("greedy exact match")
    bits.set_ylabel("bits per key digit")
    digit_bits.set_ylabel("bits per key digit, among the 10 digits")
    accuracy.set_title("passkey: accuracy")
    bits.set_title("bits per key digit (whole vocabulary)")
    digit_bits.set_title("bits per key digit, choice among digits")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("sequence length (tokens)")
        ax.grid(True, which="both", alpha=0.3)


def run_figure(result: dict) -> bytes:
    """One run: bpb vs position, a line per length (or bpb vs length without buckets); passkey beside it."""
    plt = pyplot()
    rows = result["lengths"]
    has_passkey = "passkey" in rows[0]
    fig = plt.figure(figsize=(15, 8.4) if has_passkey else (8, 4.2))
    grid = fig.add_gridspec(2 if has_passkey else 1, 3)
    ax = fig.add_subplot(grid[0, :])  # the position curve across the top, the passkey panels below
    if "buckets" in rows[0]:
        for index, row in enumerate(rows):
            x, y = _midpoints(row["buckets"])
            ax.plot(x, y, color=f"C{index % 10}", marker="o", markersize=3, label=f"{row['multiple']}x windows")
        ax.set_xlabel("position in the window (tokens; bucket midpoints)")
    else:
        ax.plot([row["tokens"] for row in rows], [row["bpb"] for row in rows], marker="o", color="C0")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("window length (tokens)")
    _trained_line(ax, result["trained_seq_len"])
    ax.set_ylabel(_metric_label(result))
    ax.set_title(f"{result['layers']} + {result['objective']}, step {result['step']}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    if has_passkey:
        below = [fig.add_subplot(grid[1, column]) for column in range(3)]
        _passkey_axes(below, [("passkey", [row["tokens"] for row in rows], [row["passkey"] for row in rows])])
        below[0].set_title(f"passkey: accuracy ({rows[0]['passkey']['trials']} trials per length)")
        below[2].legend()
    return png_bytes(fig)


def _legend_outside(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


def summary_plot(results: list[tuple[str, dict]], title: str) -> bytes:
    """Overall bpb vs window length, a line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for index, (label, result) in enumerate(results):
        rows = result["lengths"]
        ax.plot([row["multiple"] for row in rows], [row["bpb"] for row in rows], color=f"C{index % 10}", marker="o",
                markersize=4, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({row["multiple"] for _, result in results for row in result["lengths"]}))
    ax.set_xticklabels([f"{tick}x" for tick in ax.get_xticks()])
    ax.set_xlabel("window length (multiple of the trained length)")
    ax.set_ylabel(_metric_label(results[0][1]))
    ax.set_title(f"{title}\nbits per byte of the same tokens at each window length", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    return png_bytes(fig)


def positions_plot(results: list[tuple[str, dict]], title: str) -> bytes:
    """bpb vs position at each run's longest length, a line per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for index, (label, result) in enumerate(results):
        longest = result["lengths"][-1]
        if "buckets" in longest:
            x, y = _midpoints(longest["buckets"])
            ax.plot(x, y, color=f"C{index % 10}", marker="o", markersize=3, label=f"{label} ({longest['multiple']}x)")
    for seq_len in sorted({result["trained_seq_len"] for _, result in results}):
        _trained_line(ax, seq_len)
    ax.set_xlabel("position in the window (tokens; bucket midpoints)")
    ax.set_ylabel(_metric_label(results[0][1]))
    ax.set_title(f"{title}\nbits per byte by position in the longest windows", fontsize=10)
    ax.grid(True, alpha=0.3)
    _legend_outside(ax)
    return png_bytes(fig)


def passkey_plot(results: list[tuple[str, dict]], title: str) -> bytes:
    """Passkey accuracy and bits per digit vs length, a line per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.2))
    lines = [(label, [row["tokens"] for row in result["lengths"] if "passkey" in row],
              [row["passkey"] for row in result["lengths"] if "passkey" in row]) for label, result in results]
    _passkey_axes(axes, lines)
    fig.suptitle(f"{title}: passkey retrieval")
    _legend_outside(axes[2])
    return png_bytes(fig)
