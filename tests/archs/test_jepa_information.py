"""A next_latent JEPA must learn something a linear probe can read: its online probe ends well below the unigram
entropy of the eval bytes, by a margin that a probe on the same encoder's untrained (step-0) features also beats.

Before targets were instance-normalised, the quick study's JEPA probe sat at the unigram entropy (4.83 bpb) from
its first eval on: the encoder collapsed onto slow, sequence-level features. The LayerNorm-target ablation below
reproduces that behaviour at CI size and must miss the margin, so this test would have failed then.
Measured on a 2-core CPU (online probe / unigram - probe): instance targets 3.55 / 1.27 bits; LayerNorm targets
4.72 / 0.10; the step-0 encoder under a short linear-probe protocol 3.71 / 1.11. The margin of 0.8 bits sits
between them.
"""
import pytest
import torch

from archlab.train import linear_probe
from archlab.train.config import load_config
from archlab.train.trainer import Trainer, initial_model

from ..train.conftest import ROOT

MARGIN = 0.8  # bits below the unigram entropy
SETTINGS = ["model.objective=jepa", "model.jepa.offsets=[1,4,16]", "model.d_model=64", "model.n_layers=2",
            "model.attention.n_heads=2", "data.seq_len=64", "train.batch_size=16", "train.max_steps=200",
            "train.warmup_steps=20", "train.eval_every=100", "train.eval_tokens=8192", "train.checkpoint_every=1000",
            "train.device=cpu", "sample.tokens=0", "run.wandb=disabled", "run.progress=false"]
SHORT_PROTOCOL = linear_probe.Protocol(pool_tokens=2**15, held_out_tokens=4096, batch_tokens=512, check_every=50,
                                       patience=2, max_steps=600)


def train_jepa(tmp_path, target_norm):
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"run.dir={tmp_path / target_norm}", *SETTINGS, f"model.jepa.target_norm={target_norm}"])
    trainer = Trainer(cfg)
    return trainer, trainer.train()


@pytest.mark.slow
def test_jepa_probe_beats_the_unigram_entropy_like_a_random_encoder_and_layernorm_targets_do_not(tmp_path):
    trainer, final = train_jepa(tmp_path, "instance")
    unigram = final["unigram_bpb"]
    start = linear_probe.Encoder("random init", "step 0", 0, initial_model(trainer.cfg), torch.device("cpu"))
    windows = linear_probe.probe_windows(trainer.corpus.train, trainer.eval_set, trainer.cfg.data.seq_len,
                                         SHORT_PROTOCOL)
    random_encoder = linear_probe.evaluate_encoder(start, windows, ("linear",), SHORT_PROTOCOL)[0]["linear"]["val_bpb"]
    assert random_encoder < unigram - MARGIN, "the margin is out of a random encoder's reach: the test means nothing"
    assert final["bpb"] < unigram - MARGIN, (final["bpb"], unigram)
    assert trainer.model.objective.health_warnings(final) == []

    _, ablation = train_jepa(tmp_path, "layer")  # today's behaviour before the fix
    assert ablation["bpb"] > unigram - MARGIN, (ablation["bpb"], unigram)
