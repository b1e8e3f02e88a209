"""configs/archs/: every preset builds, and the parameter count its first comment states is the one it has."""
import re
from pathlib import Path

import pytest
import yaml

from archlab.archs.config import ModelConfig
from archlab.archs.registry import build_model

PRESETS = sorted((Path(__file__).parents[2] / "configs" / "archs").glob("*.yaml"))


def test_presets_are_found():
    assert {"transformer-tiny.yaml", "mamba2-tiny.yaml", "mamba2-mlp-tiny.yaml"} <= {p.name for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_builds_with_the_parameter_count_it_states(preset):
    text = preset.read_text()
    stated = re.search(r"~(\d+\.(\d+))M parameters", text)
    assert stated, f"{preset.name}: its comment should say `~X.XXM parameters`"
    params = build_model(ModelConfig(**yaml.safe_load(text)["model"])).num_parameters()
    assert round(params / 1e6, len(stated.group(2))) == float(stated.group(1)), params
