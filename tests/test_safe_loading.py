"""Nothing archlab loads can run code: no pickle, no torch.load without weights_only, no unsafe yaml, no eval."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for top in ("archs", "kernels", "train", "compare") for p in (ROOT / top).rglob("*.py"))
FORBIDDEN = {
    "pickle": re.compile(r"^\s*(import pickle|from pickle )|\bpickle\.loads?\(", re.M),
    "unsafe yaml": re.compile(r"\byaml\.(load|unsafe_load|full_load)\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_executing_loaders(path):
    text = path.read_text()
    for what, pattern in FORBIDDEN.items():
        assert not pattern.search(text), f"{what} in {path.relative_to(ROOT)}"
    for call in re.finditer(r"torch\.load\(([^()]*(\([^()]*\))?)*\)", text):
        assert "weights_only=True" in call.group(0), f"torch.load without weights_only=True: {call.group(0)}"


def test_scanner_catches_unsafe_calls():
    assert FORBIDDEN["eval/exec"].search("x = eval(s)")
    assert not FORBIDDEN["eval/exec"].search("model.eval()")
    assert FORBIDDEN["unsafe yaml"].search("yaml.load(f)")
