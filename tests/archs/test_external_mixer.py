"""A mixer from outside the package (tests/archs/token_shift.py, the README example) registers itself, then trains
from a config through the same trainer, decodes with its state, reports in `archlab model`, and passes the shared
mixer checks, with no file inside archlab edited."""
import importlib
import math
import sys

import pytest
import torch

from archlab.archs.layers.mixer import MIXERS
from archlab.train.config import load_config
from archlab.train.run_log import read_metrics
from archlab.train.trainer import Trainer

from ..train.conftest import TINY
from .mixer_conformance import check_mixer


@pytest.fixture
def token_shift():
    """Registers the example for one test, then takes it out again (other tests see the shipped mixers only)."""
    MIXERS.pop("token_shift", None)  # a reload defines the class anew
    module = sys.modules.get("tests.archs.token_shift")
    importlib.reload(module) if module else importlib.import_module("tests.archs.token_shift")
    yield MIXERS["token_shift"]
    MIXERS.pop("token_shift")


def test_it_passes_the_mixer_checks(token_shift):
    check_mixer("token_shift", {"mix_init": 0.3})


def test_it_trains_and_decodes_from_a_config(token_shift, tmp_path):
    overrides = [f"run.dir={tmp_path}", "model.layers=token_shift,attention", "model.token_shift.mix_init=0.3",
                 "train.max_steps=8", "train.warmup_steps=2", "train.lr=1e-2", "train.eval_tokens=256"]
    trainer = Trainer(load_config(TINY, overrides))
    trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert (tmp_path / "config.yaml").read_text().count("mix_init: 0.3") == 1
    model = trainer.model.eval()
    assert type(model.backbone.blocks[0].mixer) is token_shift
    prompt = torch.randint(0, 256, (1, 5))
    out = model.objective.sample(model, prompt, 6, temperature=0)  # through the KV cache and its state
    with torch.no_grad():
        for q in range(5, 11):
            assert torch.equal(out[:, q], model.objective.logits(model, out[:, :q])[:, -1].argmax(-1)), q


def test_it_cannot_run_bidirectionally(token_shift):
    with pytest.raises(Exception, match="mixer token_shift runs causally only"):
        load_config(TINY, ["model.layers=token_shift", "model.objective=masked_diffusion"])
