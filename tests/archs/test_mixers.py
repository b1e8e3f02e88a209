"""Every registered mixer passes the shared mixer checks; the layer pattern grammar; the stack's accounting."""
import pytest

from archlab.archs.config import ModelConfig
from archlab.archs.layers.mixer import MIXERS
from archlab.archs.pattern import compact, expand_layers, stack_name
from archlab.archs.registry import build_model

from .mixer_conformance import check_mixer


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_registered_mixer_conforms(name):
    check_mixer(name)


@pytest.mark.parametrize("pattern,n_layers,expected", [
    ("attention", 3, ["attention"] * 3),
    ("transformer", 2, ["attention"] * 2),
    ("mamba*3,attention", 9, ["mamba"] * 3 + ["attention"]),
    ("(mamba*2,attention)*2", 1, ["mamba", "mamba", "attention"] * 2),
    (" ( mamba * 2 , attention ) * 2 ", 1, ["mamba", "mamba", "attention"] * 2),
    (["mamba", "attention"], 7, ["mamba", "attention"]),
    ("((mamba,attention)*2,mamba)*2", 1, ["mamba", "attention", "mamba", "attention", "mamba"] * 2),
])
def test_patterns_expand(pattern, n_layers, expected):
    assert expand_layers(pattern, n_layers) == expected


@pytest.mark.parametrize("pattern,message", [
    ("", "is empty"), ("mamba*", "unexpected"), ("mamba,,attention", "where a mixer name"),
    ("(mamba", "not closed"), ("mamba)", "unexpected"), ("mamba*0", "at least 1"), ("mamba;attention", "unexpected"),
    ("mamba*2,atention", "did you mean 'attention'"), ("gru", "unknown mixer 'gru'"), ([], "must hold mixer names"),
])
def test_bad_patterns_are_one_line_errors(pattern, message):
    with pytest.raises(ValueError, match=message):
        expand_layers(pattern, 2)


def test_compact_and_stack_names():
    names = ["mamba", "mamba", "attention", "mamba"]
    assert compact(names) == "mamba*2,attention,mamba" and expand_layers(compact(names), 1) == names
    assert [stack_name(n) for n in (["attention"] * 2, ["mamba"], names)] == ["transformer", "mamba", "hybrid"]


def test_state_bytes_grow_with_length_for_attention_only():
    cfg = ModelConfig(layers="mamba,attention", d_model=32, attention={"n_heads": 2})
    attention, mamba = build_model(cfg).backbone.blocks[1], build_model(cfg).backbone.blocks[0]
    assert attention.state_bytes(1, 200) == 2 * attention.state_bytes(1, 100) == 2 * 2 * 100 * 32 * 2  # bf16 K, V
    assert mamba.state_bytes(1, 200) == mamba.state_bytes(1, 100) == 64 * 3 * 2 + 64 * 16 * 4


def test_a_bidirectional_model_refuses_a_causal_only_mixer(monkeypatch):
    monkeypatch.setattr(MIXERS["attention"], "bidirectional", "no")
    with pytest.raises(ValueError, match="mixer attention runs causally only"):
        ModelConfig(objective="masked_diffusion")
    assert ModelConfig(objective="autoregressive").runs_causally


def test_dump_holds_the_sections_of_used_mixers_only():
    dumped = ModelConfig(layers="mamba*2,attention").model_dump()
    assert {"mamba", "attention"} <= set(dumped) and "mixers" not in dumped
    assert "attention" not in ModelConfig(layers="mamba").model_dump()
    assert ModelConfig.model_validate(dumped) == ModelConfig(layers="mamba*2,attention")
