"""The training loop: one for every backbone x objective.

Config -> validated inputs (nothing written yet) -> seeded model, optimizer, sampler -> loop with gradient
accumulation, autocast, clipping, lr schedule, periodic eval and atomic checkpoints -> final eval, sample,
summary. Resume restores weights, optimizer, RNG and data position so the loss curve continues exactly.
"""
from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from archlab.archs.registry import build_model
from archlab.archs.summary import decoding_state_bytes
from archlab.kernels.common import schedule
from archlab.kernels.common.files import atomic_write, json_text
from archlab.train import checkpoint as ckpt
from archlab.train import distributed
from archlab.train.config import RESUMABLE_CHANGES, Config, config_differences, dump_config, load_config
from archlab.train.data import WindowSampler
from archlab.train.errors import CheckpointError, ConfigError, UserError
from archlab.train.flops import peak_flops, training_flops_per_token
from archlab.train.loading import (autocast, autocast_dtype, byte_weighted_sums, check_kernel_backends, eval_windows,
                                   open_run_corpus, resolve_device, sample_text, unigram_reference)
from archlab.train.run_log import MetricsLog, check_wandb_mode, start_wandb


class TrainingDiverged(UserError):
    pass


# What a run writes into its directory; a directory holding only these (and no checkpoint) is a run that
# died before its first checkpoint, which run.resume=auto may start over.
RUN_ARTIFACTS = {"config.yaml", "metrics.jsonl", "checkpoints", "wandb", "sample.txt", "summary.json"}


def initial_model(cfg: Config):
    """The model a run starts from (its step-0 weights): built right after seeding the RNG with train.seed."""
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, kernels=cfg.kernels.model_dump())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by tensors on a GPU; on CPU the process's peak resident set
    (all of this process's work, so run one training per process for a per-run figure, as compare does)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def lr_at(step: int, cfg) -> float:
    """The lr of `step` under the train config `cfg` (the schedule itself: kernels/common/schedule.py)."""
    return schedule.lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                          schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool) -> list[dict]:
    """Weight decay on matrices only: never on norms and biases, on embeddings only when asked, never on
    parameters a layer marks `_no_weight_decay` (mamba_ssm's marker: Mamba's A_log, D and dt bias)."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        is_matrix = param.ndim >= 2 and (decay_embeddings or id(param) not in embedding_params)
        (decay if is_matrix and not getattr(param, "_no_weight_decay", False) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: Config, *, checkpoint: Path | None = None):
        """Validates everything (device, data, run directory, checkpoint) before anything is written.

        `checkpoint` picks a checkpoint to load instead of the latest one (implies resuming).
        """
        self.cfg = cfg
        t = cfg.train
        self.world = distributed.world_from_env()  # rank 0 of 1 unless launched by torchrun
        distributed.check_batch(self.world, t.batch_size, t.micro_batch_size)
        self.device = distributed.device_for(self.world, resolve_device(t.device))
        self.run_dir = Path(cfg.run.dir)
        self.corpus = open_run_corpus(cfg)  # sets model.vocab_size and data.identity, which a resume must match
        self.resume_from = self._resume_point()
        if checkpoint is not None:
            if not (Path(checkpoint) / "meta.json").exists():
                raise CheckpointError(f"{checkpoint} is not a checkpoint directory (no meta.json)")
            self.resume_from = Path(checkpoint)
        check_wandb_mode(cfg.run.wandb)

        model = initial_model(cfg)
        model.set_token_bytes(self.corpus.tokenizer.token_bytes)
        check_kernel_backends(model, cfg, self.device)
        self.model = model.to(self.device)
        # weights load into the plain model, before FSDP2 may shard it
        saved_state = self._restore_weights(self.resume_from) if self.resume_from is not None else None
        distributed.start(self.world, self.device)
        if self.world.distributed:  # same weights everywhere; each rank then draws its own masks and noise
            torch.manual_seed(t.seed + self.world.rank)
        self.autocast_dtype = autocast_dtype(cfg, self.device)
        self.loss_module = distributed.wrap(self.model, self.world, self.device, t.parallel, self.autocast_dtype)
        self.sharded = distributed.is_sharded(self.loss_module)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, t.weight_decay, t.decay_embeddings),
                                           lr=t.lr, betas=(t.beta1, t.beta2), fused=self.device.type == "cuda")
        separate = {id(p) for p in self.model.objective.separately_clipped_parameters()}
        self.clip_groups = [group for group in (
            [p for p in self.model.parameters() if p.requires_grad and id(p) not in separate],
            [p for p in self.model.parameters() if id(p) in separate]) if group]
        self.sampler = WindowSampler(self.corpus.train, seq_len=cfg.data.seq_len, batch_size=t.batch_size, seed=t.seed,
                                     doc_starts=self.corpus.doc_starts.get("train"))
        self.eval_set = eval_windows(self.corpus, cfg)
        # the eval tokens' bits per byte under the train split's token frequencies, every eval's reference figure
        self.unigram = unigram_reference(self.corpus)
        self.eval_unigram_bpb = self.unigram.unigram_bpb(self.eval_set)
        self.precision_name = "bf16" if self.autocast_dtype == torch.bfloat16 else "fp32"
        self.tokens_per_step = t.batch_size * cfg.data.seq_len
        self.flops_per_step = training_flops_per_token(self.model, cfg.data.seq_len) * self.tokens_per_step
        device_peak = peak_flops(self.device)  # None where unknown (CPU): no MFU then
        self.peak_flops = device_peak * self.world.size if device_peak else None
        self.step = self.tokens = self.flops = 0
        self.train_seconds = 0.0
        self.eval_warning: str | None = None
        if saved_state is not None:
            self._restore(saved_state)
        if t.compile:
            for module in (self.model, *self.model.objective.modules_to_compile()):
                module.compile()

    # -- set-up -------------------------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        """The checkpoint to continue from, or None for a fresh start; refuses anything that would overwrite."""
        run_dir, mode = self.run_dir, self.cfg.run.resume
        if run_dir.exists() and not run_dir.is_dir():
            raise UserError(f"run.dir {run_dir} is a file; point run.dir at a directory")
        contents = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None and mode is True:
            hint = " (its run stopped before the first checkpoint: run.resume=auto starts it over)" if contents else ""
            raise CheckpointError(f"nothing to resume: {run_dir} has no checkpoint{hint}; start without --resume")
        # A run killed before its first checkpoint left only its own records: auto may start it over.
        restartable = latest is None and mode == "auto" and contents <= RUN_ARTIFACTS
        would_overwrite = mode is False or (latest is None and not restartable)
        if contents and would_overwrite:
            raise UserError(f"run.dir {run_dir} is not empty; pass --resume to continue that run "
                            "or choose a new run.dir")
        if contents and "config.yaml" in contents:
            self._check_same_config(run_dir / "config.yaml")
        return latest

    def _check_same_config(self, saved: Path) -> None:
        differences = config_differences(load_config(saved, saved=True), self.cfg)
        changed = [k for k in differences if k not in RESUMABLE_CHANGES]
        if changed:
            raise ConfigError(f"cannot resume {self.run_dir} with a different config ({', '.join(changed[:4])} "
                              "changed); resume with the same settings or start a new run.dir")

    def _restore_weights(self, path: Path) -> dict:
        return ckpt.load_checkpoint(path, self.model, self.cfg.model.model_dump(mode="json"))

    def _restore(self, state: dict) -> None:
        if self.sharded:
            distributed.load_optimizer(self.loss_module, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the saved groups carry the old device's `fused` flag
            group["fused"] = self.device.type == "cuda"
        self.saved_precision = state["precision"]
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng_torch"] if not self.world.distributed else state["rng_ranks"][self.world.rank])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.step, self.tokens, self.flops = state["step"], state["tokens"], state["flops"]
        self.train_seconds = state["train_seconds"]

    def _save(self) -> Path | None:
        """Every rank takes part (their RNG states are gathered); rank 0 writes."""
        rng_ranks = distributed.gather(torch.get_rng_state(), self.world)
        weights, optimizer_state = (distributed.full_state(self.loss_module, self.optimizer) if self.sharded
                                    else (None, self.optimizer.state_dict()))
        if not self.world.is_main:
            distributed.barrier(self.world)
            return None
        state = {
            "optimizer": optimizer_state, "sampler": self.sampler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "step": self.step, "tokens": self.tokens, "flops": self.flops, "train_seconds": self.train_seconds,
            "precision": self.precision_name, **({"rng_ranks": rng_ranks} if self.world.distributed else {}),
        }
        path = ckpt.save_checkpoint(self.run_dir, self.step, self.model, state,
                                    self.cfg.model.model_dump(mode="json"), self.cfg.train.keep_last, weights)
        distributed.barrier(self.world)
        return path

    def autocast(self):
        return autocast(self.autocast_dtype, self.device)

    # -- the loop -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: list[torch.Tensor] | None = None) -> dict[str, float]:
        """Byte-weighted mean of the objective's metrics over the fixed held-out batches (split over ranks), plus
        `unigram_bpb`: the batches' next bytes scored by the train split's byte frequencies, the figure a model
        that knows nothing but those frequencies reaches."""
        self.model.eval()
        batches = self.eval_set if batches is None else batches

        def score(batch: torch.Tensor) -> dict:
            with self.autocast():
                return self.loss_module(batch.to(self.device), evaluate=True) if self.sharded else \
                    self.model.objective.evaluate(self.model, batch.to(self.device))

        # sharded weights are gathered in collective forwards, which every rank must run alike: each rank
        # scores every batch then (the same figures); replicated weights let ranks split the batches
        mine = batches if self.sharded else batches[self.world.rank::self.world.size]
        totals, weight = byte_weighted_sums(score, mine)
        self.model.train()
        if self.world.distributed and not self.sharded:
            totals, weight = distributed.sum_over_ranks(totals, weight, self.world)
        unigram = self.eval_unigram_bpb if batches is self.eval_set else self.unigram.unigram_bpb(batches)
        return {key: value / weight for key, value in totals.items()} | {"unigram_bpb": unigram}

    def train_step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a global batch; returns (mean loss, grad norm) as tensors."""
        t = self.cfg.train
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        local = distributed.local_rows(batch, self.world).to(self.device, non_blocking=True)
        micros = local.split(t.micro_batch_size or local.shape[0])
        for index, micro in enumerate(micros):
            with distributed.sync_gradients(self.loss_module, index == len(micros) - 1):
                with self.autocast():
                    loss, _ = self.loss_module(micro)
                (loss / len(micros)).backward()
            total += loss.detach() / len(micros)
        total = distributed.mean_over_ranks(total, self.world)
        # Each group is clipped on its own; the first (the model) gives the grad_norm that is logged.
        norms = torch.stack([distributed.local_value(torch.nn.utils.clip_grad_norm_(
            group, t.grad_clip if t.grad_clip > 0 else math.inf)) for group in self.clip_groups])
        grad_norm = norms[0]
        # Checked every step (one host sync on GPU, microseconds against a step) so that a bad step never
        # reaches the weights and the run stops at the step that failed.
        if not (torch.isfinite(total) and torch.isfinite(norms).all()):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged("loss" if not torch.isfinite(total) else "gradient norm", total)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.objective.after_optimizer_step(self.model, self.step, t.max_steps)
        self.step += 1
        self.tokens += self.tokens_per_step
        self.flops += self.flops_per_step
        return total, grad_norm

    def _diverged(self, what: str, loss: torch.Tensor) -> TrainingDiverged:
        last = ckpt.latest_checkpoint(self.run_dir)
        where = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
        return TrainingDiverged(f"training stopped: {what} became {loss.item() if what == 'loss' else 'non-finite'} "
                                f"at step {self.step + 1}; {where}. Resuming would replay the same steps: "
                                "start a new run.dir with a lower train.lr or more train.warmup_steps")

    def train(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to `train.max_steps` (or `until_step`), evaluating, logging and checkpointing on the way."""
        cfg, t = self.cfg, self.cfg.train
        stop = min(until_step or t.max_steps, t.max_steps)
        out_of_time = t.max_seconds is not None and self.train_seconds >= t.max_seconds
        if self.step >= stop or out_of_time:  # e.g. the quickstart run a second time: nothing to train or rewrite
            return self.evaluate()
        if self.resume_from is not None and self.saved_precision != self.precision_name:
            raise ConfigError(f"{self.resume_from} was trained in {self.saved_precision} and would continue in "
                              f"{self.precision_name} on {self.device.type}; resume on the same kind of device "
                              "(train.device) so the run stays one run")
        main = self.world.is_main  # only rank 0 writes records, wandb and the progress bar
        if main:
            self._prepare_run_dir()
        wandb_run = start_wandb(cfg.run.wandb, cfg.run.wandb_project, self.run_dir, cfg.to_dict()) if main else None
        log = MetricsLog(self.run_dir / "metrics.jsonl" if main else None, wandb_run)
        # a resumed run (or a second train() call) keeps the records up to where it stands
        log.truncate_after(self.step if self.resume_from is not None or self.step > 0 else -1)
        bar = tqdm(total=t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (cfg.run.progress and main), mininterval=1.0)
        last_eval: dict[str, float] = {}
        try:
            if self.step == 0:
                if main and self.corpus.has_documents:
                    bar.write(f"data: {self.corpus.describe_documents('train', cfg.data.seq_len)}")
                last_eval = self._eval_and_log(log, bar)
            # The clock runs only while training: eval and checkpoint time stay out of tokens/s and MFU.
            clock, rate_steps, rate_seconds = time.perf_counter(), 0, 0.0
            while self.step < stop:
                loss, grad_norm = self.train_step(next(self.sampler))
                rate_steps += 1
                bar.update(1)
                out_of_time = t.max_seconds is not None and distributed.any_rank(
                    self.train_seconds + time.perf_counter() - clock >= t.max_seconds, self.world)
                last = self.step == t.max_steps or out_of_time
                do_log = self.step % t.log_every == 0 or last
                do_eval = self.step % t.eval_every == 0 or last
                do_save = self.step % t.checkpoint_every == 0 or last
                if out_of_time:
                    stop = self.step
                if not (do_log or do_eval or do_save):
                    continue
                loss_value = loss.item()
                now = time.perf_counter()
                rate_seconds += now - clock
                self.train_seconds += now - clock
                if do_log:
                    self._log_train(log, bar, loss_value, grad_norm.item(), rate_steps / rate_seconds, last_eval)
                    rate_steps, rate_seconds = 0, 0.0
                if do_eval:
                    last_eval = self._eval_and_log(log, bar)
                if do_save:
                    self._save()
                clock = time.perf_counter()
            self.train_seconds += time.perf_counter() - clock
        finally:
            bar.close()
            log.close()
        return last_eval

    def _log_train(self, log: MetricsLog, bar: tqdm, loss: float, grad_norm: float, steps_per_s: float,
                   last_eval: dict[str, float]) -> None:
        tokens_per_s = steps_per_s * self.tokens_per_step
        record = {"loss": loss, "lr": lr_at(self.step - 1, self.cfg.train), "grad_norm": grad_norm,
                  "tokens": self.tokens, "flops": self.flops, "tokens_per_s": tokens_per_s}
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if self.peak_flops:
            record["mfu"] = steps_per_s * self.flops_per_step / self.peak_flops
            postfix["mfu"] = f"{record['mfu']:.1%}"
        postfix |= self._eval_postfix(last_eval)
        bar.set_postfix(postfix, refresh=False)
        log.write("train", self.step, **record)

    def _eval_postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        """The quality figure (marked when it comes from a probe), the objective's monitors, a collapse flag."""
        if not metrics:
            return {}
        objective = self.model.objective
        quality = objective.quality_metric
        label = f"val_{quality}" + (" (probe)" if metrics.get("probe") and "probe" not in quality else "")
        shown = {label: f"{metrics[quality]:.4f}"}
        shown |= {key: f"{metrics[key]:.3g}" for key in objective.progress_metrics}
        return shown | ({"WARNING": self.eval_warning} if self.eval_warning else {})

    def _eval_and_log(self, log: MetricsLog, bar: tqdm) -> dict[str, float]:
        metrics = self.evaluate()
        # before warmup ends a probe or head is still finding its feet: "no information" would be noise then
        trained = self.step >= max(1, self.cfg.train.warmup_steps)
        warnings = self.model.objective.health_warnings(metrics, trained=trained)
        self.eval_warning = warnings[0].split(":")[0] if warnings else None  # the bar's flag until the next eval
        log.write("eval", self.step, tokens=self.tokens, flops=self.flops,
                  **{f"val_{k}": v for k, v in metrics.items()}, **({"warnings": warnings} if warnings else {}))
        shown = ", ".join(f"{key} {value}" for key, value in self._eval_postfix(metrics).items() if key != "WARNING")
        for line in [f"step {self.step}: {shown}", *(f"warning: step {self.step}: {w}" for w in warnings)]:
            if self.world.is_main:  # tqdm.write prints even from a disabled bar
                bar.write(line)
        bar.set_postfix(self._eval_postfix(metrics), refresh=False)
        return metrics

    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        target = self.run_dir / "config.yaml"
        if self.resume_from is None or not target.exists():
            atomic_write(target, dump_config(self.cfg))

    # -- after training -----------------------------------------------------------------------------
    def sample_text(self, prompt: str, n_tokens: int, *, temperature: float, top_k: int | None, seed: int,
                    **options) -> str:
        """`options`: the objective's own sampler settings (Objective.sample_options), e.g. diffusion steps."""
        return sample_text(self.model, self.cfg, self.device, self.autocast_dtype, prompt, n_tokens,
                           temperature=temperature, top_k=top_k, seed=seed, tokenizer=self.corpus.tokenizer, **options)

    def write_summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        summary = {
            "run_dir": str(self.run_dir), "step": self.step, "val_bpb": final_eval.get("bpb"),
            "probe": bool(final_eval.get("probe")), "val": final_eval,
            "tokens": self.tokens, "train_flops": self.flops, "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.tokens / self.train_seconds) if self.train_seconds else None,
            "params": self.model.num_parameters(), "backbone": self.cfg.model.stack_name,
            "objective": self.cfg.model.objective, "device": str(self.device), "processes": self.world.size,
            "stopped_by": "max_steps" if self.step >= self.cfg.train.max_steps else "max_seconds",
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            **decoding_state_bytes(self.model, self.cfg.data.seq_len, dtype=self.autocast_dtype or torch.float32),
        }
        atomic_write(self.run_dir / "summary.json", json_text(summary, indent=None))
        return summary
