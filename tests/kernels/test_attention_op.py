"""The Triton kernels as archlab's attention backend: custom op, autograd, torch.compile, a model training.

On CPU these run the real kernels under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
"""
import pytest
import torch

from archlab.kernels.attention import attention, attention_reference, flash_attention

pytest.importorskip("triton")


def _qkv(batch=1, heads=4, kv_heads=2, len_q=19, len_k=19, head_dim=32, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(batch, heads, len_q, head_dim, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, kv_heads, len_k, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("causal", [True, False])
def test_triton_backend_matches_reference_with_gradients(causal):
    q, k, v = _qkv()
    out = attention(q, k, v, causal=causal, backend="triton")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    expected = attention_reference(q, k, v, causal=causal)[0]
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [0, 3], ids=["full", "window3"])
def test_custom_op_passes_opcheck(window):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch agree with the real kernel."""
    q, k, v = _qkv(len_q=9, len_k=9, head_dim=16)
    torch.library.opcheck(flash_attention, (q, k, v), {"causal": True, "scale": 0.25, "window": window})


def test_lse_is_returned_but_not_differentiable():
    q, k, v = _qkv(len_q=5, len_k=7, head_dim=16)
    out, lse = flash_attention(q, k, v, causal=True, scale=16 ** -0.5)
    torch.testing.assert_close(lse, attention_reference(q, k, v, causal=True)[1], atol=1e-5, rtol=1e-5)
    assert out.requires_grad and not lse.requires_grad


def test_compiles_without_graph_breaks():
    q, k, v = _qkv(len_q=8, len_k=8, head_dim=16)

    def loss(q, k, v):
        return attention(q, k, v, causal=True, backend="triton").sin().sum()

    compiled = torch.compile(loss, fullgraph=True)  # fullgraph: a graph break is an error
    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for got, want in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_transformer_trains_on_the_triton_kernel(tmp_path):
    """The tiny config, a few steps on CPU under the interpreter, follows the SDPA backend's loss curve."""
    from archlab.train.config import load_config
    from archlab.train.run_log import read_metrics
    from archlab.train.trainer import Trainer

    from ..train.conftest import TINY

    curves = {}
    for backend in ("triton", "torch"):
        run_dir = tmp_path / backend
        overrides = [f"run.dir={run_dir}", f"kernels.attention={backend}", "train.max_steps=4",
                     "train.warmup_steps=1", "train.eval_tokens=256", "model.n_layers=1"]
        Trainer(load_config(TINY, overrides)).train()
        curves[backend] = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert curves["triton"] == pytest.approx(curves["torch"], abs=1e-4)


def test_head_dims_the_kernel_lacks(monkeypatch):
    """auto falls back to SDPA for a head dim the kernel is not compiled for; an explicit triton says so."""
    import archlab.kernels.attention as attention_module

    q, k, v = _qkv(len_q=4, len_k=4, head_dim=24)
    # as on CUDA
    monkeypatch.setattr(attention_module, "resolve_backend", lambda op, requested, device, dtype: "triton")
    torch.testing.assert_close(attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True)[0])
    with pytest.raises(ValueError, match=r"triton backend takes head_dim in \(16, 32, 64, 128\), got 24"):
        attention(q, k, v, causal=True, backend="triton")


def test_auto_uses_sdpa_where_the_kernel_is_the_wrong_tool(monkeypatch):
    """As on CUDA: fp32 inputs and decoding-sized queries go to SDPA, half-precision prefill to Triton."""
    import archlab.kernels.attention as attention_module

    calls = []
    monkeypatch.setattr(attention_module, "resolve_backend", lambda op, requested, device, dtype: "triton")
    monkeypatch.setattr(attention_module, "flash_attention", lambda *a, **kw: calls.append("triton") or (a[0], None))
    monkeypatch.setattr(attention_module, "_sdpa", lambda *a, **kw: calls.append("sdpa") or a[0])
    q, k, v = _qkv(len_q=16, len_k=16)
    attention(q, k, v, causal=True)                                        # fp32
    attention(*(t.detach().bfloat16() for t in (q, k, v)), causal=True)   # bf16, 16 queries
    attention(*(t.detach().bfloat16() for t in _qkv(len_q=1, len_k=16)), causal=True)  # bf16 decode step
    attention(q, k, v, causal=True, backend="triton")                      # explicit: always ours
    assert calls == ["sdpa", "triton", "sdpa", "triton"]


def test_empty_inputs_and_double_backward_are_clear_errors():
    with pytest.raises(ValueError, match="empty inputs"):
        attention(*_qkv(len_q=0, len_k=0), causal=False)
    q, k, v = _qkv(len_q=4, len_k=4, head_dim=16)
    out = attention(q, k, v, causal=True, backend="triton")
    (grad_q,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="no second derivative"):
        grad_q.sum().backward()
