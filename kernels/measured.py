"""Where our Triton kernel is known to be fast: the committed `archlab bench <op>` results in compare/results/.

`auto` puts our kernel first on a GPU only where the newest committed benchmark of that op on that GPU family
(kernels/hardware.py's gpu_class), in that dtype, has it at least as fast as every rival it was timed against
(each `ratio_vs_<rival>` of our fwd+bwd rows >= 1). A result may name its `rivals` (other backends of the op);
then only those count: the SSD bench also times Mamba-1's scan, another op, which no backend of SSD replaces.
Without such a file, `auto` keeps the op's safe order.
"""
from __future__ import annotations

import json
from pathlib import Path

from archlab.kernels.hardware import gpu_class
from archlab.kernels.registry import KernelOp

RESULTS_DIR = Path(__file__).resolve().parents[1] / "compare" / "results"
OUR_PROVIDER = "archlab-triton"


def _results(bench: str, results_dir: Path) -> list[dict]:
    found = []
    for path in sorted(results_dir.glob(f"{bench}-*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and result.get("benchmark") == bench and isinstance(result.get("rows"), list):
            found.append({**result, "file": path.name})
    return found


def triton_measured_fast(op: KernelOp, device_name: str, dtype: str, results_dir: Path = RESULTS_DIR) -> str | None:
    """Why our Triton kernel is known to be at least as fast here (one line naming the file), or None."""
    family = gpu_class(device_name)
    if op.bench is None or family is None:
        return None
    matching = [r for r in _results(op.bench.name, results_dir)
                if gpu_class(str(r.get("device", ""))) == family and r.get("dtype") == dtype]
    if not matching:
        return None
    newest = max(matching, key=lambda r: (str(r.get("date", "")), r["file"]))
    rivals = newest.get("rivals")
    ratios = [value for row in newest["rows"] if row.get("provider") == OUR_PROVIDER and row.get("pass") == "fwd+bwd"
              for key, value in row.items() if key.startswith("ratio_vs_") and value is not None
              and (rivals is None or key.removeprefix("ratio_vs_") in rivals)]
    if not ratios or min(ratios) < 1.0:
        return None
    return f"{newest['file']}: ours >= every rival on {family} in {dtype} (worst ratio {min(ratios):.2f})"
