"""Packed documents (archs/documents.py, data.packing=documents): for every mixer, both directions where it has
them, and every kernel backend, a packed batch gives each document's outputs and gradients as if it ran alone
(hypothesis over ragged lengths); the objectives score each document alone, and never across a boundary."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from archlab.archs.backbones.stack import ResidualStack
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import MIXERS
from archlab.archs.model import IGNORE, split_documents
from archlab.archs.registry import build_model
from archlab.kernels.registry import kernel_ops

from .mixer_conformance import check_documents_apart

LENGTH, D_MODEL = 12, 32
SETTINGS = {"attention": {"n_heads": 2}, "swa": {"n_heads": 2, "window": 4}, "mamba": {},
            "mamba2": {"head_dim": 8, "d_state": 8, "chunk_size": 4}, "gated_deltanet": {"n_heads": 2, "head_dim": 8}}


def backends_for(mixer: str, backend: str) -> dict[str, str]:
    """Every op of the mixer on `backend` where the op has it (numba: the scan only), else torch."""
    return {op: backend if backend in kernel_ops()[op].backends else "torch" for op in MIXERS[mixer].kernel_ops}


CASES = [(mixer, causal, backend) for mixer in SETTINGS for causal in (True, False)
         for backend in ("reference", "torch", "numba")
         if (causal or MIXERS[mixer].bidirectional != "no" and mixer != "swa")
         and (backend != "numba" or mixer == "mamba")]

ragged_rows = st.lists(st.sets(st.integers(1, LENGTH - 1), max_size=5).map(
    lambda cuts: [b - a for a, b in itertools.pairwise([0, *sorted(cuts), LENGTH])]), min_size=1, max_size=2)


def one_layer(mixer: str, causal: bool, backend: str) -> ResidualStack:
    cfg = ModelConfig(layers=mixer, n_layers=1, d_model=D_MODEL, init_std=0.2, **{mixer: SETTINGS[mixer]})
    torch.manual_seed(0)
    return ResidualStack(cfg, causal=causal, kernels=backends_for(mixer, backend))


@pytest.mark.parametrize("mixer,causal,backend", CASES)
@settings(max_examples=2, deadline=None)
@given(lengths=ragged_rows)
def test_packed_documents_run_as_if_alone(mixer, causal, backend, lengths):
    x = torch.randn(len(lengths), LENGTH, D_MODEL)
    check_documents_apart(one_layer(mixer, causal, backend), x, causal=causal, lengths=lengths,
                          name=f"{mixer} {backend} causal={causal}")


@pytest.mark.parametrize("mixer", ["attention", "swa"])
def test_packed_documents_run_as_if_alone_on_triton(mixer):
    """The mixers hand the same boundaries to every backend, and the Triton kernels' own seq_idx / cu_seqlens tests
    and conformance (tests/kernels) draw ragged packed cases against the reference; one model-level case for the
    attention kernel here (the recurrent mixers' Triton kernels take 10-55 s each in the interpreter at this level)."""
    x = torch.randn(1, LENGTH, D_MODEL)
    check_documents_apart(one_layer(mixer, True, "triton"), x, causal=True, lengths=[[5, 1, 6]],
                          name=f"{mixer} triton")


def test_documents_give_positions_boundaries_and_the_reversed_rows():
    documents = Documents.from_lengths([[2, 3, 1], [6]])
    assert documents.positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
    assert documents.cu_seqlens.tolist() == [0, 2, 5, 6, 12]
    assert documents.reversed.positions.tolist() == [[0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert documents.cu_seqlens.dtype == torch.int32
    assert Documents(torch.tensor([[7, 7, 7]])).cu_seqlens.tolist() == [0, 3]  # ids need not start at 0


def test_documents_refuse_bad_ids_and_shapes():
    with pytest.raises(TypeError, match="int32 or int64"):
        Documents(torch.zeros(2, 3))
    stack = ResidualStack(ModelConfig(layers="attention", d_model=D_MODEL, attention={"n_heads": 2}))
    with pytest.raises(ValueError, match=r"documents describe \(batch, length\) \(1, 4\)"):
        stack(torch.randn(1, 5, D_MODEL), causal=True, documents=Documents.from_lengths([[2, 2]]))
    cache = stack.new_cache(1, 8)
    with pytest.raises(ValueError, match="not decoding"):
        stack(torch.randn(1, 4, D_MODEL), causal=True, cache=cache, documents=Documents.from_lengths([[2, 2]]))


def documents_batch(tokens: torch.Tensor, lengths: list[list[int]]) -> torch.Tensor:
    """(B, 2, L + 1): the tokens and the document ids of rows of documents of these lengths."""
    return torch.stack([tokens, Documents.from_lengths(lengths).seq_idx.long()], dim=1)


def test_split_documents_ignores_targets_across_a_boundary():
    batch = documents_batch(torch.arange(6)[None], [[2, 3, 1]])
    inputs, targets, documents = split_documents(batch)
    assert inputs.tolist() == [[0, 1, 2, 3, 4]]
    assert targets.tolist() == [[1, IGNORE, 3, 4, IGNORE]]
    assert documents.seq_idx.tolist() == [[0, 0, 1, 1, 1]]


@pytest.mark.parametrize("objective", ["autoregressive", "masked_diffusion"])
def test_objectives_score_packed_documents_as_each_alone(objective):
    """AR: the summed nats of a packed row equal those of each document alone (bits per byte over its bytes);
    diffusion: its bidirectional model sees no other document, so a change in one leaves the others' logits."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(layers="attention*2", d_model=D_MODEL, objective=objective,
                                    attention={"n_heads": 2}))
    tokens = torch.randint(0, 256, (1, 13))
    lengths = [[4, 6, 3]]
    batch = documents_batch(tokens, lengths)
    if objective == "autoregressive":
        packed = model.objective.evaluate(model, batch)
        alone = [model.objective.evaluate(model, tokens[:, a:b])
                 for a, b in itertools.pairwise([0, 4, 10, 13])]
        nats = sum(metrics["bpb"] * metrics["n_bytes"] for metrics in alone) * math.log(2)
        assert packed["n_bytes"] == sum(metrics["n_bytes"] for metrics in alone) == 10
        assert packed["bpb"] * packed["n_bytes"] * math.log(2) == pytest.approx(nats, rel=1e-5)
        return
    documents = Documents.from_lengths([[4, 6, 2]])
    z = tokens[:, :-1]
    changed = z.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 256
    before, after = (model.objective.head(model, model.objective.hidden(model, seq, documents)) for seq in (z, changed))
    torch.testing.assert_close(before[:, :4], after[:, :4])
    torch.testing.assert_close(before[:, 10:], after[:, 10:])
    assert not torch.allclose(before[:, 4:10], after[:, 4:10])
