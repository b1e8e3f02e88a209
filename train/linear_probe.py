"""Linear evaluation (`archlab eval RUN --linear-probe`): fresh byte probes on frozen features, beside baselines.

An online probe trained alongside a moving encoder can lag it or be mis-trained; this measures what a run's
representations hold once training is over, under one fixed protocol, next to the same protocol on baselines:

- Features: the objective's `probe_features` (its `probe_task`: the next byte for causal encoders, the hidden
  bytes for JEPA masked_span) of the encoder in eval mode, without gradient, in float32 (autocast off, so a
  bf16 GPU run and a CPU run probe the same features), then whitened with the mean and covariance of the probe's
  training features (ZCA, eigenvalues floored at 1e-6 of their mean). The best linear probe is the same for any
  invertible linear map of the features, so whitening changes nothing it can reach, only how fast Adam gets
  there: an encoder that keeps what the probe needs in directions of tiny variance (a JEPA that collapsed onto
  slow features did, at ~1% of it) is not under-rated for being badly conditioned. MAE standardises each
  dimension before its linear probe for the same reason; whitening also undoes correlations between dimensions.
- Data: the train split is cut in two. `pool_tokens` bytes of windows drawn (seeded) from its first 95% give the
  probe's training features, computed once; consecutive windows from its last 5% (up to `held_out_tokens` bytes)
  are held out for early stopping and the choice of lr. The score is on the run's own eval windows (by default
  the val split's train.eval_tokens bytes, where its online figures were measured).
- Probe: linear (d -> 256, with bias) or, optionally, an MLP (d -> d -> 256, GELU); weights N(0, 0.02), bias 0.
- Training: AdamW (betas 0.9/0.95, no weight decay), lr decaying to 0 on a cosine over `max_steps`,
  `batch_tokens` feature rows per step, shuffled each epoch of the pool. For each lr of the grid: stop once the
  held-out loss has not improved for `patience` checks (one every `check_every` steps) or at `max_steps`, and keep
  the weights of the best check. The lr with the lowest held-out loss gives the reported bpb.

What to expect of it: a fresh probe does not quite reach the read-out a model trained jointly with its encoder.
On the 1000-step autoregressive quickstart (its own head: 2.2475 val bpb) the linear probe reaches 2.29. Part of
that is the finite pool (a 33k-parameter probe fitted on 2^20 bytes: ~d/2N = 0.02 bits; with 2^18 bytes the
probe reached 2.31); the head was fitted with its encoder on four times as many bytes. Compare encoders probed
under this protocol with each other, not with a model's own bpb.

Baselines, same protocol on the same bytes: the run's encoder at initialisation (its step-0 weights, rebuilt from
train.seed: "what did training add?"), and optionally another run's encoder trained on the same data, e.g. the
autoregressive arm of a study at equal training FLOPs. The unigram and bigram entropies of the scored bytes
(train/ngram.py) are the floor lines.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.archs.model import Model
from archlab.kernels.common.files import atomic_write, json_text
from archlab.train.data import WindowSampler, eval_batches
from archlab.train.errors import UserError
from archlab.train.loading import load_run
from archlab.train.ngram import ByteNgrams
from archlab.train.trainer import initial_model

RESULT_FILE = "linear_probe.json"
PROBE_KINDS = ("linear", "mlp")
# A baseline must have been trained on the same bytes, split the same way, in windows as long
SAME_DATA = ("path", "sha256", "val_fraction", "test_fraction", "seq_len")


@dataclasses.dataclass(frozen=True)
class Protocol:
    lrs: tuple[float, ...] = (3e-3, 1e-2)
    pool_tokens: int = 2**20
    held_out_fraction: float = 0.05
    held_out_tokens: int = 32768
    batch_tokens: int = 2048
    check_every: int = 100
    patience: int = 3
    max_steps: int = 3000
    whitening_floor: float = 1e-6
    seed: int = 0

    def __post_init__(self):
        if not self.lrs or min(self.lrs) <= 0:
            raise ValueError(f"the probe protocol needs positive lrs, got {self.lrs}")
        counts = {"pool_tokens": self.pool_tokens, "held_out_tokens": self.held_out_tokens,
                  "batch_tokens": self.batch_tokens, "check_every": self.check_every, "patience": self.patience,
                  "max_steps": self.max_steps}
        if min(counts.values()) < 1 or not 0 < self.held_out_fraction < 1:
            raise ValueError(f"the probe protocol's counts must be >= 1 and held_out_fraction in (0, 1): {self}")


PROTOCOL = Protocol()  # what `archlab eval --linear-probe` and studies run


@dataclasses.dataclass
class Encoder:
    """A frozen encoder to probe: its model, the run and step it came from, and where it runs."""
    name: str
    run_dir: str
    step: int
    model: Model
    device: torch.device

    @property
    def source(self) -> str:
        return f"{self.run_dir} at step {self.step}"


def check_probeable(model: Model, what: str) -> str:
    """The model's probe task; a one-line UserError when its objective has no representation to probe."""
    task = model.objective.probe_task
    if task is None:
        raise UserError(f"{what} is a {type(model.objective).__name__} run: it has no fixed representation to "
                        "probe (--linear-probe works on autoregressive and jepa runs)")
    return task


@torch.no_grad()
def encoder_features(encoder: Encoder, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """(features (N, d) float32, byte ids (N,)) of every batch, on the encoder's device, autocast off."""
    encoder.model.eval()
    features, targets = [], []
    for batch in batches:
        with torch.autocast(encoder.device.type, enabled=False):
            x, y = encoder.model.objective.probe_features(encoder.model, batch.to(encoder.device))
        features.append(x.float())
        targets.append(y)
    return torch.cat(features), torch.cat(targets)


def whitening(features: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """(mean (d,), W (d, d)) such that (features - mean) @ W has identity covariance: W = V diag((lambda + floor *
    mean lambda)^-1/2) V^T from the eigendecomposition of the covariance (in float64: it may be ill-conditioned)."""
    centred = (features - features.mean(dim=0)).double()
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / len(features))
    eigenvalues = eigenvalues.clamp_min(0)
    scale = (eigenvalues + floor * eigenvalues.mean()).clamp_min(1e-30).rsqrt()  # all-zero features stay zero
    return features.mean(dim=0), ((vectors * scale) @ vectors.T).float()


def new_probe(kind: str, d: int, seed: int) -> nn.Module:
    """A fresh probe initialised from its own generator (the global RNG is left alone)."""
    generator = torch.Generator().manual_seed(seed)
    widths = [(d, 256)] if kind == "linear" else [(d, d), (d, 256)]
    layers = [nn.utils.skip_init(nn.Linear, fan_in, fan_out) for fan_in, fan_out in widths]
    for layer in layers:
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * 0.02)
            layer.bias.zero_()
    return nn.Sequential(layers[0]) if kind == "linear" else nn.Sequential(layers[0], nn.GELU(), layers[1])


@torch.no_grad()
def probe_bpb(probe: nn.Module, features: Tensor, targets: Tensor, chunk: int = 65536) -> float:
    """Mean cross-entropy of the probe on (features, targets), in bits."""
    total = sum(F.cross_entropy(probe(features[i:i + chunk]), targets[i:i + chunk], reduction="sum").item()
                for i in range(0, len(targets), chunk))
    return total / len(targets) / math.log(2)


def fit_probe(kind: str, pool: tuple[Tensor, Tensor], held_out: tuple[Tensor, Tensor], lr: float,
              protocol: Protocol) -> dict[str, Any]:
    """One lr of the grid: train with early stopping on the held-out features; the best check's probe."""
    features, targets = pool
    probe = new_probe(kind, features.shape[1], protocol.seed).to(features.device)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = torch.Generator().manual_seed(protocol.seed)
    best = {"held_out_bpb": probe_bpb(probe, *held_out), "step": 0, "state": copy.deepcopy(probe.state_dict())}
    permutation, cursor, since_best = torch.randperm(len(targets), generator=order), 0, 0
    for step in range(1, protocol.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / protocol.max_steps))
        if cursor + protocol.batch_tokens > len(targets):
            permutation, cursor = torch.randperm(len(targets), generator=order), 0
        rows = permutation[cursor:cursor + protocol.batch_tokens].to(features.device)
        cursor += protocol.batch_tokens
        loss = F.cross_entropy(probe(features[rows]), targets[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % protocol.check_every:
            continue
        held_out_bpb = probe_bpb(probe, *held_out)
        if held_out_bpb < best["held_out_bpb"]:
            best, since_best = {"held_out_bpb": held_out_bpb, "step": step,
                                "state": copy.deepcopy(probe.state_dict())}, 0
        else:
            since_best += 1
            if since_best >= protocol.patience:
                break
    probe.load_state_dict(best.pop("state"))
    return best | {"lr": lr, "steps_run": step, "probe": probe}


def evaluate_encoder(encoder: Encoder, windows: dict[str, list[Tensor]], kinds: tuple[str, ...],
                     protocol: Protocol) -> tuple[dict[str, Any], Tensor]:
    """Every probe kind on one encoder: the best lr by held-out loss and its score on the eval windows; and the
    scored byte ids."""
    data = {part: encoder_features(encoder, batches) for part, batches in windows.items()}
    mean, whitener = whitening(data["pool"][0], protocol.whitening_floor)
    data = {part: ((x - mean) @ whitener, y) for part, (x, y) in data.items()}
    result: dict[str, Any] = {"name": encoder.name, "run_dir": encoder.run_dir, "step": encoder.step,
                              "feature_dim": data["pool"][0].shape[1], "scored_bytes": len(data["eval"][1])}
    for kind in kinds:
        fits = [fit_probe(kind, data["pool"], data["held_out"], lr, protocol) for lr in protocol.lrs]
        chosen = min(fits, key=lambda fit: fit["held_out_bpb"])
        result[kind] = {"val_bpb": probe_bpb(chosen["probe"], *data["eval"]), "lr": chosen["lr"],
                        "best_step": chosen["step"], "held_out_bpb": chosen["held_out_bpb"],
                        "grid": [{key: fit[key] for key in ("lr", "held_out_bpb", "step", "steps_run")}
                                 for fit in fits]}
    return result, data["eval"][1].cpu()


def probe_windows(train: np.ndarray, eval_set: list[Tensor], seq_len: int, protocol: Protocol) -> dict[str, list]:
    """The windows of the protocol: the probe's training pool, the held-out tail of train, and the eval windows."""
    cut = int(len(train) * (1 - protocol.held_out_fraction))
    if cut < seq_len + 1 or len(train) - cut < seq_len + 1:
        raise UserError(f"the train split ({len(train)} bytes) is too small to hold out "
                        f"{protocol.held_out_fraction:.0%} for the probe with windows of {seq_len + 1} bytes; "
                        "use a larger corpus")
    batch_size = max(1, protocol.batch_tokens // seq_len)
    sampler = WindowSampler(train[:cut], seq_len=seq_len, batch_size=batch_size, seed=protocol.seed)
    pool = [sampler.batch(i) for i in range(max(1, protocol.pool_tokens // (batch_size * seq_len)))]
    held_out = eval_batches(train[cut:], seq_len=seq_len, batch_size=batch_size, max_tokens=protocol.held_out_tokens)
    return {"pool": pool, "held_out": held_out, "eval": eval_set}


def linear_evaluation(run: Encoder, baselines: list[Encoder], train: np.ndarray, eval_set: list[Tensor], *,
                      seq_len: int, mlp: bool = False, protocol: Protocol | None = None) -> dict[str, Any]:
    """The protocol (default PROTOCOL) on the run's encoder and each baseline; entropies of the scored bytes;
    nothing written."""
    protocol = protocol or PROTOCOL
    task = check_probeable(run.model, run.run_dir)
    for baseline in baselines:
        other = check_probeable(baseline.model, baseline.run_dir)
        if other != task:
            raise UserError(f"baseline {baseline.run_dir} probes the {other}, {run.run_dir} the {task}: give a "
                            "baseline whose objective probes the same thing")
    windows = probe_windows(train, eval_set, seq_len, protocol)
    kinds = PROBE_KINDS if mlp else PROBE_KINDS[:1]
    results = [evaluate_encoder(encoder, windows, kinds, protocol) for encoder in (run, *baselines)]
    ngrams = ByteNgrams(train)
    entropies = {"unigram_bpb": ngrams.unigram_bits(results[0][1].numpy())}
    if task == "next byte":  # a masked-byte probe may not see the byte before: no bigram floor for it
        entropies["bigram_bpb"] = ngrams.bigram_bpb(eval_set)
    return {"task": task, "protocol": dataclasses.asdict(protocol), "kinds": list(kinds), "entropies": entropies,
            "encoders": [result for result, _ in results]}


def write_result(run_dir: Path, result: dict[str, Any]) -> Path:
    return atomic_write(Path(run_dir) / RESULT_FILE, json_text(result))


def probe_run(run_dir: str | Path, *, baseline: str | Path | None = None, mlp: bool = False,
              device: str | None = None, checkpoint: str | Path | None = None, split: str = "val",
              whole_split: bool = False) -> tuple[dict[str, Any], Path]:
    """`archlab eval RUN --linear-probe`: the protocol on the run's latest (or given) checkpoint, its step-0
    encoder and, if given, a baseline run's latest checkpoint, scored on the run's eval windows of `split`; the
    result is also written to RUN/linear_probe.json. Bad input is a one-line UserError before any probe trains."""
    run_dir = str(run_dir)
    loaded = load_run(run_dir, device, checkpoint=checkpoint, purpose="probe")
    cfg = loaded.cfg
    if loaded.corpus.tokenizer.spec != "bytes" or loaded.corpus.has_documents:
        raise UserError(f"the linear probe reads one stream of bytes, but {run_dir} trained on "
                        f"{loaded.corpus.tokenizer.spec} tokens or packed documents; probe a byte-stream run "
                        "(data.packing=stream on a text file)")
    run = Encoder("trained", run_dir, loaded.step, loaded.model, loaded.device)
    with torch.random.fork_rng(devices=[]):  # rebuilding the step-0 weights reseeds the RNG: not the caller's
        start_model = initial_model(cfg)
    encoders = [Encoder("random init", run_dir, 0, start_model.to(loaded.device), loaded.device)]
    if baseline is not None:
        other = load_run(baseline, device, purpose="use as a probe baseline")
        differing = [key for key in SAME_DATA if getattr(other.cfg.data, key) != getattr(cfg.data, key)]
        if differing:
            raise UserError(f"baseline {baseline} was trained on other data than {run_dir} (data.{differing[0]} "
                            "differs); give a baseline trained on the same corpus, splits and seq_len")
        encoders.append(Encoder("baseline", str(baseline), other.step, other.model, other.device))
    batches = loaded.eval_windows(split, whole_split=whole_split)
    result = linear_evaluation(run, encoders, loaded.corpus.train, batches, seq_len=cfg.data.seq_len, mlp=mlp)
    result |= {"run": run_dir, "step": loaded.step, "split": split}
    return result, write_result(Path(run_dir), result)
