"""The self-check a Triton kernel passes before its first use on a device (kernels/self_check.py), run end to end
in Triton's interpreter: every shipped kernel passes; an injected fault is caught; `auto` then falls back with one
warning line and an explicit `triton` fails with one error line; verdicts are cached and never trusted when stale."""
import json

import pytest
import torch

import archlab.kernels.causal_conv1d.triton as conv_triton
import archlab.kernels.backend as backend_module
from archlab.kernels import self_check
from archlab.kernels.backend import auto_choice, resolve_backend
from archlab.kernels.causal_conv1d import causal_conv1d
from archlab.kernels.registry import kernel_ops

from ..train.conftest import TINY
from ..train.test_cli import run_cli

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter path; a GPU checks itself")


@pytest.fixture(autouse=True)
def fresh_verdicts(tmp_path, monkeypatch):
    monkeypatch.setenv(self_check.CACHE_VARIABLE, str(tmp_path / "cache"))
    self_check.forget()
    backend_module.forget_choices()
    yield
    self_check.forget()
    backend_module.forget_choices()


@pytest.fixture
def broken_conv(monkeypatch):
    """Our conv kernel with a fault injected: its forward output is off by 1% (backward untouched)."""
    real = conv_triton.causal_conv1d_fwd
    monkeypatch.setattr(conv_triton, "causal_conv1d_fwd", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)


@pytest.mark.parametrize("op_name", [name for name, op in kernel_ops().items() if "triton" in op.backends])
def test_every_triton_kernel_passes_its_self_check(op_name):
    verdict = self_check.run_self_check(kernel_ops()[op_name], CPU, torch.float32)
    assert verdict.passed, verdict.detail
    assert verdict.detail.endswith("cases match the reference")


@pytest.mark.parametrize("caller", ["no_grad", "inference_mode", "bf16 autocast"])
def test_the_check_ignores_the_callers_grad_and_autocast_modes(caller):
    """A first kernel call from sampling or an autocast forward still checks with gradients, in float32."""
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
               "bf16 autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[caller]
    with context:
        verdict = self_check.run_self_check(kernel_ops()["causal_conv1d"], CPU, torch.float32)
    assert verdict.passed, verdict.detail


def test_an_injected_fault_fails_the_check(broken_conv):
    verdict = self_check.run_self_check(kernel_ops()["causal_conv1d"], CPU, torch.float32)
    assert not verdict.passed
    assert verdict.detail.startswith("case 1 of 6: output 0: ") and "values off" in verdict.detail


def test_a_kernel_that_raises_fails_the_check(monkeypatch):
    def no_launch(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory\nmore detail")

    monkeypatch.setattr(conv_triton, "causal_conv1d_fwd", no_launch)
    verdict = self_check.run_self_check(kernel_ops()["causal_conv1d"], CPU, torch.float32)
    assert not verdict.passed and verdict.detail == "case 1 of 6: RuntimeError: out of resource: shared memory"


def pretend_cuda(monkeypatch):
    """A CUDA device name for `auto` while the check itself runs the real kernel on the CPU interpreter."""
    cuda = torch.device("cuda")
    real_verdict = self_check.verdict
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(self_check, "device_description",
                        lambda device: {"device": "NVIDIA H100 80GB HBM3", "capability": "sm_90"})
    monkeypatch.setattr(self_check, "verdict", lambda op, device, dtype: real_verdict(op, CPU, dtype))
    return cuda


def test_auto_falls_back_with_one_warning(broken_conv, monkeypatch, capsys):
    cuda = pretend_cuda(monkeypatch)
    backend, why = auto_choice("causal_conv1d", cuda, torch.float32)
    assert backend == "torch"
    assert "peer skipped: causal_conv1d is not installed" in why and "triton skipped: failed its self-check" in why
    backend_module.forget_choices()
    assert resolve_backend("causal_conv1d", "auto", cuda, torch.float32) == "torch"  # said once, not per call
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: kernels.causal_conv1d: our Triton kernel failed its self-check on NVIDIA "
                               "H100 80GB HBM3 (sm_90) in float32 (case 1 of 6: output 0: ")
    assert lines[0].endswith("; auto uses torch instead")


def test_auto_takes_a_kernel_that_passes(monkeypatch, capsys):
    cuda = pretend_cuda(monkeypatch)
    assert auto_choice("causal_conv1d", cuda, torch.float32)[0] == "triton"
    assert auto_choice("attention", cuda, torch.float32) == ("torch", "torch: the op's default order on CUDA")
    measured = "conv1d-h100.json: ours >= every rival on H100 in float32 (worst ratio 1.10)"
    lookups = []
    monkeypatch.setattr(backend_module, "triton_measured_fast",
                        lambda op, device_name, dtype: lookups.append(op.name) or measured)
    backend_module.forget_choices()  # auto decides once per process; this is a new measurement
    assert auto_choice("causal_conv1d", cuda, torch.float32) == ("triton", f"triton: {measured}")  # now first
    assert resolve_backend("causal_conv1d", "auto", cuda, torch.float32) == "triton"
    assert lookups == ["causal_conv1d"]  # decided once, not at every kernel call
    assert capsys.readouterr().err == ""


def test_explicit_triton_fails_in_one_line(broken_conv, monkeypatch):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "always")
    x, weight = torch.randn(1, 3, 8), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"^our Triton kernel for causal_conv1d failed its self-check on cpu "
                                         r"\(Triton interpreter\) in float32 \(case 1 of 6: ") as info:
        causal_conv1d(x, weight, backend="triton")
    assert "\n" not in str(info.value) and str(info.value).endswith("use kernels.causal_conv1d=auto (it falls back) "
                                                                   "or torch")


def test_train_with_a_broken_explicit_kernel_writes_nothing(broken_conv, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "always")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", TINY, f"run.dir={run_dir}", "model.layers=mamba",
                             "kernels.causal_conv1d=triton")
    assert code == 2 and out == ""
    assert err.startswith("error: kernels.causal_conv1d: our Triton kernel for causal_conv1d failed its self-check "
                          "on cpu (Triton interpreter) in float32") and \
        err.count("\n") == 1
    assert not run_dir.exists()


def test_verdicts_are_cached_on_disk_and_stale_ones_ignored(monkeypatch):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "always")
    op = kernel_ops()["causal_conv1d"]
    first = self_check.verdict("causal_conv1d", CPU, torch.float32)
    assert first.passed and not first.cached
    files = list(self_check.cache_dir().glob("causal_conv1d-float32-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["key"] == self_check.cache_key(op, CPU, torch.float32)
    assert set(stored["key"]) == {"op", "dtype", "device", "capability", "triton", "torch", "source"}

    runs = []
    real_run = self_check.run_self_check
    monkeypatch.setattr(self_check, "run_self_check", lambda *args: runs.append(args) or real_run(*args))
    self_check.forget()  # a new process: the verdict comes from disk, nothing runs
    assert self_check.verdict("causal_conv1d", CPU, torch.float32).cached and not runs

    for stale in ("not json {", json.dumps({**stored, "key": {**stored["key"], "triton": "0.0"}}),
                  json.dumps({"key": stored["key"]})):
        files[0].write_text(stale)
        self_check.forget()
        again = self_check.verdict("causal_conv1d", CPU, torch.float32)
        assert again.passed and not again.cached  # ran again...
        assert json.loads(files[0].read_text())["key"] == stored["key"]  # ...and rewrote the file
    assert len(runs) == 3


def test_the_key_follows_the_kernel_source(tmp_path, monkeypatch):
    op = kernel_ops()["causal_conv1d"]
    before = self_check.source_hash(op)
    assert before == self_check.source_hash(op)
    monkeypatch.setattr(self_check.Path, "read_bytes", lambda path: b"edited")
    assert self_check.source_hash(op) != before


def test_a_bad_mode_is_one_line(monkeypatch):
    monkeypatch.setenv(self_check.MODE_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match="^ARCHLAB_SELF_CHECK='sometimes'; choose from auto, always, off$"):
        self_check.applies(CPU)
    monkeypatch.setenv(self_check.MODE_VARIABLE, "off")
    assert not self_check.applies(torch.device("cuda"))
