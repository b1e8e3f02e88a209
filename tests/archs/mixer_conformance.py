"""The checks every registered sequence mixer must pass (archs/layers/mixer.py), shipped or a researcher's own:

- causal: a later position never changes an earlier output;
- decoding: a prefill then chunks and single positions through its state equal the full forward;
- documents: rows of packed documents (archs/documents.py) give each document's outputs and gradients as if it ran
  alone;
- accounting: flops_per_token and state_bytes are positive integers, and state_bytes is what its decoding state
  really holds (tensors' bytes) after the positions it was given;
- the stack builds it from config settings, marks its residual writes, and trains (gradients reach its weights).
"""
from __future__ import annotations

import itertools

import torch

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import MIXERS

D_MODEL, LENGTH = 32, 11


def tensor_bytes(state) -> int:
    return sum(value.numel() * value.element_size() for value in vars(state).values() if torch.is_tensor(value))


def check_mixer(name: str, settings: dict | None = None) -> None:
    mixer_class = MIXERS[name]
    cfg = ModelConfig(layers=f"{name}*2", d_model=D_MODEL, init_std=0.2, **{name: settings or {}})
    torch.manual_seed(0)
    stack = ResidualStack(cfg, causal=True, kernels={op: "torch" for op in mixer_class.kernel_ops})
    mixer = stack.blocks[0].mixer
    assert isinstance(mixer, mixer_class)
    x = torch.randn(2, LENGTH, D_MODEL, requires_grad=True)

    full = stack(x, causal=True)
    changed = x.detach().clone()
    changed[:, 6] += 1.0
    assert torch.equal(stack(changed, causal=True)[:, :6], full[:, :6]), f"{name}: a later input reached the past"

    cache = stack.new_cache(2, LENGTH, dtype=torch.float32)
    cuts = [0, 4, 7, *range(8, LENGTH + 1)]
    with torch.no_grad():
        pieces = [stack(x[:, a:b], causal=True, cache=cache) for a, b in itertools.pairwise(cuts)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.detach(), rtol=1e-4, atol=1e-5,
                               msg=lambda m: f"{name}: decoding differs from the full forward: {m}")
    assert all(state.length == LENGTH for state in cache)

    check_documents_apart(stack, x.detach(), causal=True, lengths=[[3, 1, 7], [LENGTH]], name=name)

    flops = mixer.flops_per_token(LENGTH, causal=True)
    assert isinstance(flops, int) and flops > 0
    state_bytes = mixer.state_bytes(2, LENGTH, dtype=torch.float32)
    assert isinstance(state_bytes, int) and state_bytes > 0
    filled = mixer.new_state(2, LENGTH, dtype=torch.float32, device="cpu")
    mixer(x[:, :LENGTH].detach(), causal=True, state=filled)
    assert tensor_bytes(filled) >= state_bytes, f"{name}: state_bytes counts more than its state holds"

    assert any(getattr(m, "writes_residual", False) for m in mixer.modules()), f"{name} marks no residual write"
    full.square().mean().backward()
    trained = [p for p in mixer.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained), \
        f"{name}: a parameter gets no gradient"


def check_documents_apart(stack, x: torch.Tensor, *, causal: bool, lengths: list[list[int]], name: str,
                          rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Packed rows of documents of these lengths give the outputs, and the gradients (inputs and weights) of a
    weighted sum of them, that each document run alone gives."""
    documents = Documents.from_lengths(lengths)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    packed_x = x.clone().requires_grad_()
    packed = stack(packed_x, causal=causal, documents=documents)
    packed_grads = torch.autograd.grad((packed * weights).sum(), [packed_x, *stack.parameters()], allow_unused=True)
    alone_x = x.clone().requires_grad_()
    rows = []
    for row, row_lengths in enumerate(lengths):
        bounds = [0, *itertools.accumulate(row_lengths)]
        rows.append(torch.cat([stack(alone_x[row:row + 1, a:b], causal=causal) for a, b in itertools.pairwise(bounds)],
                              dim=1))
    alone = torch.cat(rows)
    alone_grads = torch.autograd.grad((alone * weights).sum(), [alone_x, *stack.parameters()], allow_unused=True)
    torch.testing.assert_close(packed, alone, rtol=rtol, atol=atol,
                               msg=lambda m: f"{name}: packed documents differ from documents alone: {m}")
    for packed_grad, alone_grad in zip(packed_grads, alone_grads, strict=True):
        if alone_grad is None:
            assert packed_grad is None or not packed_grad.any()
            continue
        torch.testing.assert_close(packed_grad, alone_grad, rtol=rtol, atol=atol * 10,
                                   msg=lambda m: f"{name}: packed gradients differ from documents alone: {m}")
