"""`archlab bench trainer`: steps/s of the full trainer against a bare PyTorch loop on the same model.
`archlab bench packing`: the trainer's tokens/s on packed documents against the same run on stream windows.

The bare loop is the least a training loop can do (forward, backward, AdamW step, zero_grad on one fixed
batch). The trainer adds data sampling, gradient accumulation bookkeeping, clipping, the lr schedule,
the NaN guard, metric logging and the progress bar. Chunks of both are interleaved so that drift in the
machine's speed hits both alike; the medians are compared.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from archlab.kernels.common.timing import timed
from archlab.kernels.hardware import device_name, peak_flops
from archlab.train.config import load_config
from archlab.train.trainer import Trainer


def bench_trainer(config: str, overrides: list[str], *, steps: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        total = (repeats + 1) * steps
        cfg = load_config(config, list(overrides) + [
            f"run.dir={Path(tmp) / 'run'}", "run.wandb=disabled", "run.resume=false",
            f"train.max_steps={10 * total}", f"train.eval_every={10 * total}", f"train.checkpoint_every={10 * total}",
            "train.eval_tokens=" + str(1024 * 8)])
        trainer = Trainer(cfg)
        model, device = trainer.model, trainer.device
        bare_optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
        batch = trainer.sampler.batch(0).to(device)

        def bare_steps() -> None:
            for _ in range(steps):
                with trainer.autocast():
                    loss, _ = model.objective.loss(model, batch)
                loss.backward()
                bare_optimizer.step()
                bare_optimizer.zero_grad(set_to_none=True)

        def bare_chunk() -> float:
            return steps / timed(bare_steps, device)[1]

        def trainer_chunk() -> float:
            return steps / timed(lambda: trainer.train(until_step=trainer.step + steps), device)[1]

        trainer_chunk(), bare_chunk()  # warm-up (and the trainer's step-0 eval)
        trainer_rates, bare_rates = [], []
        for repeat in range(repeats):  # alternate which goes first, so neither always runs on a warmer machine
            for chunk in (trainer_chunk, bare_chunk) if repeat % 2 == 0 else (bare_chunk, trainer_chunk):
                (trainer_rates if chunk is trainer_chunk else bare_rates).append(chunk())

    trainer_sps, bare_sps = statistics.median(trainer_rates), statistics.median(bare_rates)
    result = {
        "benchmark": "trainer", "config": config, "overrides": list(overrides), "device": device_name(device),
        "torch": torch.__version__, "params": model.num_parameters(), "tokens_per_step": trainer.tokens_per_step,
        "steps_per_chunk": steps, "repeats": repeats,
        "trainer_steps_per_s": round(trainer_sps, 3), "bare_steps_per_s": round(bare_sps, 3),
        "trainer_tokens_per_s": round(trainer_sps * trainer.tokens_per_step),
        "overhead_pct": round(100 * (bare_sps / trainer_sps - 1), 2),
    }
    peak = peak_flops(device)
    if peak:
        result["mfu"] = round(trainer_sps * trainer.flops_per_step / peak, 4)
    return result



# tinyshakespeare's speeches: a speaker's line ("First Citizen:") starts a document, about 300 bytes each
SPEECHES = r"^[A-Z][A-Za-z' ]*:$"


def bench_packing(config: str, overrides: list[str], *, separator: str, steps: int, repeats: int) -> dict:
    """Trainer tokens/s with data.packing=documents (documents start where a line matches `separator`) against
    data.packing=stream on the same config: chunks of `steps` steps, interleaved, medians compared."""
    with tempfile.TemporaryDirectory() as tmp:
        total = (repeats + 1) * steps
        common = list(overrides) + [
            "run.wandb=disabled", "run.resume=false", f"train.max_steps={10 * total}",
            f"train.eval_every={10 * total}", f"train.checkpoint_every={10 * total}", "train.eval_tokens=8192",
            f"data.separator={separator}"]
        trainers = {packing: Trainer(load_config(config, common + [f"data.packing={packing}",
                                                                   f"run.dir={Path(tmp) / packing}"]))
                    for packing in ("stream", "documents")}
        device = trainers["stream"].device
        first = trainers["documents"].sampler.batch(0)
        cut = (first[:, 1, 1:] != first[:, 1, :-1]).sum().item() / first.shape[0]

        def chunk(trainer: Trainer) -> float:
            return steps * trainer.tokens_per_step / timed(lambda: trainer.train(until_step=trainer.step + steps),
                                                           device)[1]

        rates: dict[str, list[float]] = {packing: [] for packing in trainers}
        for trainer in trainers.values():
            chunk(trainer)  # warm-up (and the step-0 eval)
        for repeat in range(repeats):  # alternate which goes first
            order = list(trainers) if repeat % 2 == 0 else list(reversed(trainers))
            for packing in order:
                rates[packing].append(chunk(trainers[packing]))
    stream, documents = (statistics.median(rates[p]) for p in ("stream", "documents"))
    # each repeat's two chunks ran back to back: their ratio is what drift in the machine's speed disturbs least
    paired = statistics.median(d / s for s, d in zip(rates["stream"], rates["documents"], strict=True))
    return {
        "benchmark": "packing", "config": config, "overrides": list(overrides), "separator": separator,
        "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seq_len": trainers["stream"].cfg.data.seq_len, "batch_size": trainers["stream"].cfg.train.batch_size,
        "boundaries_per_row": round(cut, 2), "steps_per_chunk": steps, "repeats": repeats,
        "stream_tokens_per_s": round(stream), "documents_tokens_per_s": round(documents),
        "packing_cost_pct": round(100 * (1 - documents / stream), 2),
        "paired_packing_cost_pct": round(100 * (1 - paired), 2),
        "stream_rates": [round(r) for r in rates["stream"]], "documents_rates": [round(r) for r in rates["documents"]],
    }
