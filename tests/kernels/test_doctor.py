"""`archlab doctor` says what runs here, exit 0, whatever is missing (triton, CUDA, peers)."""
import importlib.util

import torch

from archlab.kernels import doctor, self_check
from archlab.kernels.backend import auto_choice, numba_missing
from archlab.kernels.registry import kernel_ops

from ..train.test_cli import run_cli


def test_doctor_on_this_machine(capsys):
    code, out, err = run_cli(capsys, "doctor")
    assert code == 0 and err == ""
    assert out.startswith("python ") and f"torch {torch.__version__}" in out
    for name, op in kernel_ops().items():
        assert f"\n{name}: {op.backends[0]} (" in out
    if not torch.cuda.is_available():
        assert "no CUDA device: everything runs on the CPU" in out and "peer (needs CUDA)" in out
        for name in kernel_ops():
            backend, why = auto_choice(name, torch.device("cpu"), torch.float32)
            assert f"\n  auto in float32: {backend} ({why})\n" in out
        numba = "torch" if numba_missing() else "numba"
        assert ("numba (usable)" in out) == (numba == "numba")
        assert f"auto in float32: {numba} (" in out.split("\nselective_scan: ")[1].split("\ncausal_conv1d")[0]


def test_doctor_without_triton(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else
                        real_find_spec(name, *a))
    text = doctor.report(run_checks=False)
    assert "triton not installed" in text and text.count("triton (triton not installed)") == \
        sum("triton" in op.backends for op in kernel_ops().values())


def test_doctor_shows_verdicts_where_checks_run(monkeypatch):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "always")
    monkeypatch.setattr(self_check, "verdict", lambda op, device, dtype: self_check.Verdict(
        dtype == torch.float32, "case 2 of 4: output 0: 3 of 9 values off" if dtype != torch.float32 else
        "4 cases match the reference", 1.25))
    lines = doctor.op_lines("causal_conv1d", torch.device("cpu"), run_checks=True)
    assert lines[1] == "  self-check bfloat16: FAILED (case 2 of 4: output 0: 3 of 9 values off; ran in 1.2 s)"
    assert lines[2] == "  self-check float32: passed (4 cases match the reference; ran in 1.2 s)"


def test_a_bad_self_check_mode_is_one_error_line(capsys, monkeypatch):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "bogus")
    code, out, err = run_cli(capsys, "doctor")
    assert code == 2 and out == "" and err == "error: ARCHLAB_SELF_CHECK='bogus'; choose from auto, always, off\n"
