"""Masked diffusion LM (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025): absorbing-state noise over bytes.

Forward process: at time t in [0, 1] each byte is replaced by the mask token (id 256, one past the bytes)
independently with probability 1 - alpha_t. The network sees the partly masked sequence bidirectionally and
predicts the bytes; the loss is the continuous-time NELBO

    E_t [ w(t) sum_{i masked} -log p(x_i | z_t) ],   w(t) = -alpha'_t / (1 - alpha_t)   (1/t for log-linear),

per byte, in nats. The sequence scored is batch[:, :-1] (seq_len bytes, the positions the model is trained and
sampled at; the AR objective scores as many bytes). The head is the byte head (256 classes, tied to the embedding
by default), so the mask is never predicted and, in sampling, bytes already unmasked are carried over unchanged:
MDLM's SUBS parameterisation. The model's embedding has no row for the mask, so this objective owns a learned
`mask_embedding` and embeds the noised sequence itself.

t is drawn low-discrepancy (t_i = (u + i / B) mod 1) and mapped to [eps, 1] with eps = 1e-3 as in MDLM: the
estimate is then (1 / (1 - eps)) * the integral over [eps, 1] instead of over [0, 1], which for a loss that does
not fall as t grows still bounds the NLL from above (evaluate reports `bound: 1.0`).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.model import (
    Model,
    Objective,
    batch_seeded_generator,
    documents_of_sequence,
    inference,
    split_batch,
)

EPS = 1e-3  # smallest diffusion time drawn
EVAL_SEED = 20240607  # mixed with a checksum of the eval batch: the same batch always gets the same (t, mask) draws
STRATEGIES = ("ancestral", "confidence", "block")


class MaskedDiffusionObjective(Objective):
    requires_causal = False
    sample_options = ("steps", "strategy", "block_size")
    strategies = STRATEGIES  # what `sample(strategy=...)` takes
    samples_within_context = True  # the whole sequence is denoised at once
    quality_is_bound = True  # val bpb is the NELBO

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size  # the bytes the head predicts
        self.mask_id = cfg.vocab_size  # absorbing state: one past the bytes
        self.schedule = cfg.noise_schedule
        self.eval_draws = cfg.diffusion_eval_draws
        self.mask_embedding = nn.Parameter(torch.empty(cfg.d_model))
        nn.init.normal_(self.mask_embedding, mean=0.0, std=cfg.init_std)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)
        #: what the last `sample` call did: strategy, steps taken, network evaluations (decode benchmarks read it)
        self.last_sample_stats: dict = {}

    # -- noise schedule -----------------------------------------------------------------------------
    def mask_prob(self, t: Tensor) -> Tensor:
        """1 - alpha_t, the probability that a byte is masked at time t (cosine in a form exact near t = 0)."""
        if self.schedule == "log_linear":
            return t
        return 2 * torch.sin(math.pi * t / 4) ** 2  # 1 - cos(pi t / 2)

    def alpha(self, t: Tensor) -> Tensor:
        return 1 - self.mask_prob(t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """w(t) = -alpha'_t / (1 - alpha_t): 1 / t (log-linear); (pi/2) sin(pi t/2) / (1 - cos(pi t/2)) =
        (pi/2) / tan(pi t / 4) (cosine)."""
        if self.schedule == "log_linear":
            return 1 / t
        return (math.pi / 2) / torch.tan(math.pi * t / 4)

    def _mask_prob_float(self, t: float) -> float:
        return t if self.schedule == "log_linear" else 2 * math.sin(math.pi * t / 4) ** 2

    @staticmethod
    def draw_times(n: int, *, generator: torch.Generator | None = None, device=None, low: float = EPS,
                   high: float = 1.0) -> Tensor:
        """n low-discrepancy times in [low, high] (default [eps, 1]): t_i = (u + i / n) mod 1, one uniform u,
        mapped to [low, high]."""
        u = torch.rand((), generator=generator, device=device)
        t = (u + torch.arange(n, device=u.device) / n) % 1
        return low + (high - low) * t

    def training_times(self, n: int, device) -> Tensor:
        """The n noise levels a training step draws (block diffusion clips their range)."""
        return self.draw_times(n, device=device)

    def blocks_in(self, seq_len: int) -> int:
        """Noise levels drawn per row of seq_len positions: one here; block diffusion draws one per block."""
        return 1

    @staticmethod
    def per_position(t: Tensor, seq_len: int) -> Tensor:
        """t (B, n_blocks), one time per block of seq_len // n_blocks positions -> (B, seq_len)."""
        return t.repeat_interleave(seq_len // t.shape[1], dim=1)

    # -- network ------------------------------------------------------------------------------------
    def head_weight(self, model: Model) -> Tensor:
        return model.embedding.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, model: Model, z: Tensor) -> Tensor:
        """z (B, L) ids in [0, 256] -> (B, L, d): byte embeddings, the mask embedding where z is the mask."""
        x = model.embedding(z.clamp(max=self.vocab_size - 1))
        return torch.where((z == self.mask_id).unsqueeze(-1), self.mask_embedding.to(x.dtype), x)

    def hidden(self, model: Model, z: Tensor, documents: Documents | None = None) -> Tensor:
        return model(self.embed(model, z), documents=documents)

    def head(self, model: Model, hidden: Tensor) -> Tensor:
        # float32 even under autocast: a bf16 softmax over the vocabulary loses too much precision
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.head_weight(model).float())

    def logits(self, model: Model, z: Tensor) -> Tensor:
        """z (B, L) partly masked ids -> float32 logits (B, L, 256) over the clean byte at each position."""
        return self.head(model, self.hidden(model, z))

    def denoiser_hidden(self, model: Model, z: Tensor, x: Tensor, documents: Documents | None) -> Tensor:
        """Hidden states (B, L, d) of the noised sequence z in training; x is the clean one (block diffusion
        reads it too)."""
        return self.hidden(model, z, documents)

    # -- loss and evaluation ------------------------------------------------------------------------
    @staticmethod
    def _sequence(batch: Tensor) -> tuple[Tensor, Documents | None]:
        """The scored sequence batch[:, :-1] and, for packed documents, its Documents (each one denoised alone)."""
        return split_batch(batch)[0], documents_of_sequence(batch)

    def weighted_nll(self, model: Model, x: Tensor, t: Tensor, mask: Tensor,
                     documents: Documents | None = None) -> Tensor:
        """sum over masked positions (b, i) of w(t_bi) * -log p(x_bi | z_t), t (B, L) each position's time: the head
        runs on masked ones only."""
        z = x.masked_fill(mask, self.mask_id)
        logits = self.head(model, self.denoiser_hidden(model, z, x, documents)[mask])
        nll = F.cross_entropy(logits, x[mask], reduction="none")
        return (self.loss_weight(t[mask]) * nll).sum()

    def loss(self, model: Model, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """NELBO per token in nats (one (t, mask) draw per row, or per block, t stratified across them all; global
        RNG); the bpb metric divides the same sum by the tokens' UTF-8 bytes."""
        x, documents = self._sequence(batch)
        n_blocks = self.blocks_in(x.shape[1])
        t = self.per_position(self.training_times(x.shape[0] * n_blocks, x.device).view(-1, n_blocks), x.shape[1])
        mask = torch.rand(x.shape, device=x.device) < self.mask_prob(t)
        nats = self.weighted_nll(model, x, t, mask, documents)
        loss = nats / x.numel()
        metrics = {"loss": loss.detach(), "bpb": nats.detach() / (math.log(2) * model.bytes_of(x).clamp(min=1)),
                   "masked_fraction": mask.float().mean()}
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model: Model, batch: Tensor) -> dict[str, float]:
        """NELBO per byte averaged over `diffusion_eval_draws` (t, mask) draws, an upper bound on the NLL.

        The draws come from a CPU generator seeded by EVAL_SEED and a checksum of the batch: the same batch
        gives the same figure on every run and device, whatever the global RNG state, and different batches
        get independent draws. The times are stratified over all rows x draws.
        """
        x, documents = self._sequence(batch)
        generator = batch_seeded_generator(x, EVAL_SEED)
        draws, n_blocks = self.eval_draws, self.blocks_in(x.shape[1])
        times = self.draw_times(x.shape[0] * n_blocks * draws, generator=generator).view(-1, n_blocks, draws)
        total = 0.0
        for d in range(draws):
            t = self.per_position(times[..., d], x.shape[1])
            mask = torch.rand(x.shape, generator=generator) < self.mask_prob(t)
            total += self.weighted_nll(model, x, t.to(x.device), mask.to(x.device), documents).item()
        n_bytes = max(model.bytes_of(x).item(), 1)
        return {"loss": total / (draws * x.numel()), "bpb": total / (draws * math.log(2) * n_bytes), "n_bytes": n_bytes,
                "bound": 1.0}

    def head_flops_per_token(self, d_model: int) -> int:
        return 2 * d_model * self.vocab_size

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, model: Model, prompt: Tensor, n_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None, context_len: int | None = None,
               steps: int | None = None, strategy: str = "ancestral", block_size: int | None = None) -> Tensor:
        """Generates n_tokens bytes after prompt (B, P) by denoising; returns (B, P + n_tokens) byte ids.

        The prompt is never masked; the generated span starts fully masked and the whole sequence is seen
        bidirectionally, so P + n_tokens must fit in `context_len` (the trained seq_len) when given.
        steps (default n_tokens) denoising steps, strategy:
          ancestral   MDLM: from t = 1 to 0 in `steps` equal steps; going from t to s each masked byte is
                      unmasked with probability (alpha_s - alpha_t) / (1 - alpha_t) and drawn from the model;
                      a step that unmasks nothing leaves the input unchanged, so the next reuses its logits.
          confidence  LLaDA low-confidence remasking: each step draws every masked byte and keeps the
                      ceil(masked / steps left) the model is most confident in (probability of the byte drawn).
          block       semi-autoregressive: blocks of block_size bytes left to right, each decoded by confidence
                      in max(1, steps * block_size // n_tokens) steps while later blocks stay masked.
        temperature 0 is greedy, top_k keeps the k most likely bytes; a seeded generator makes it reproducible.
        Sets `last_sample_stats` (strategy, steps taken, network_evals). Runs in eval mode, restoring the mode.
        """
        steps = max(n_tokens, 1) if steps is None else steps
        self._check_sample_args(prompt, n_tokens, temperature, top_k, context_len, steps, strategy, block_size)
        batch, prompt_len = prompt.shape
        self.last_sample_stats = {"strategy": strategy, "steps": 0, "network_evals": 0}
        if n_tokens == 0:
            return prompt.clone()
        with inference(model):
            z = torch.cat([prompt, prompt.new_full((batch, n_tokens), self.mask_id)], dim=1)
            draw = dict(temperature=temperature, top_k=top_k, generator=generator)
            logits_of = partial(self.logits, model)
            if strategy == "ancestral":
                self._ancestral(logits_of, z, steps, **draw)
            elif strategy == "confidence":
                self._confidence(logits_of, z, prompt_len, z.shape[1], steps, **draw)
            else:
                per_block = max(1, steps * block_size // n_tokens)
                for start in range(prompt_len, z.shape[1], block_size):
                    self._confidence(logits_of, z, start, start + block_size, per_block, **draw)
            return z

    def _ancestral(self, logits_of: Callable[[Tensor], Tensor], z: Tensor, steps: int, **draw) -> None:
        """Unmasks z in place from t = 1 to 0 in `steps` steps; logits_of(z) runs the network."""
        logits = None
        stats = self.last_sample_stats
        unmasked_per_step = stats.setdefault("unmasked_per_step", [])  # bytes unmasked per step, summed over the batch
        for j in range(steps):
            masked = z == self.mask_id
            if not masked.any():
                break
            t, s = 1 - j / steps, 1 - (j + 1) / steps
            mask_t, mask_s = self._mask_prob_float(t), self._mask_prob_float(s)
            p_unmask = 1.0 if j == steps - 1 else (mask_t - mask_s) / mask_t
            stats["steps"] += 1
            if logits is None:  # the input changed since the last network call (or there was none)
                logits = logits_of(z)
                stats["network_evals"] += 1
            unmask = masked & (torch.rand(z.shape, generator=draw["generator"], device=z.device) < p_unmask)
            count = int(unmask.sum())
            unmasked_per_step.append(count)
            if count:
                z[unmask] = self._draw(logits[unmask], **draw)[0]
                logits = None

    def _confidence(self, logits_of: Callable[[Tensor], Tensor], z: Tensor, start: int, stop: int, steps: int,
                    **draw) -> None:
        """Unmasks positions start..stop-1 of z in `steps` steps, the most confident first; other masks stay;
        logits_of(z) runs the network."""
        stats = self.last_sample_stats
        window = torch.zeros_like(z, dtype=torch.bool)
        window[:, start:stop] = True
        for j in range(steps):
            masked = (z == self.mask_id) & window
            left = int(masked[0].sum())  # every row commits as many per step, so all rows have this many
            if left == 0:
                break
            stats["steps"] += 1
            stats["network_evals"] += 1
            logits = logits_of(z)
            tokens, confidence = self._draw(logits[masked], **draw)  # row-major: (B * left,)
            positions = masked.nonzero()[:, 1].view(z.shape[0], left)
            keep = confidence.view(z.shape[0], left).topk(-(-left // (steps - j)), dim=1).indices
            z.scatter_(1, positions.gather(1, keep), tokens.view(z.shape[0], left).gather(1, keep))

    @staticmethod
    def _draw(logits: Tensor, *, temperature: float, top_k: int | None, generator) -> tuple[Tensor, Tensor]:
        """logits (K, 256) -> (bytes (K,), the model's probability of each: the confidence LLaDA ranks by)."""
        choice = Objective.draw_tokens(logits, temperature, top_k, generator)
        return choice[:, 0], torch.softmax(logits, dim=-1).gather(-1, choice)[:, 0]

    def _check_sample_args(self, prompt: Tensor, n_tokens: int, temperature: float, top_k: int | None,
                           context_len: int | None, steps: int, strategy: str, block_size: int | None) -> None:
        self.check_sample_args(prompt, n_tokens, temperature, top_k, context_len, empty_prompt_ok=True)
        if context_len is not None and prompt.shape[1] + n_tokens > context_len:
            raise ValueError(f"prompt ({prompt.shape[1]} bytes) + n_tokens ({n_tokens}) exceeds context_len "
                             f"{context_len}: diffusion denoises the whole sequence at once; shorten the prompt "
                             "or generate fewer bytes")
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (or None = one per generated byte), got {steps}")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
        if strategy != "block" and block_size is not None:
            raise ValueError(f"block_size is for strategy='block', not {strategy!r}; remove it")
        if strategy == "block":
            if block_size is None or block_size < 1:
                raise ValueError(f"strategy='block' needs block_size >= 1 dividing n_tokens, got {block_size}")
            if n_tokens % block_size:
                raise ValueError(f"block_size={block_size} must divide n_tokens={n_tokens}")
