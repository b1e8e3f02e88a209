"""Next-token prediction: cross-entropy on batch[:, 1:] given batch[:, :-1] (within each packed document); bits
per byte over the scored tokens' UTF-8 bytes; KV-cached sampling."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from archlab.archs.config import ModelConfig
from archlab.archs.model import IGNORE, Model, Objective, inference, next_byte_features, split_documents


class AutoregressiveObjective(Objective):
    requires_causal = True
    probe_task = "next byte"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        # tied: the head is model.embedding.weight, read at call time so it is stored once in checkpoints
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=cfg.init_std)

    def head_weight(self, model: Model) -> Tensor:
        return model.embedding.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, model: Model, tokens: Tensor, cache=None, documents=None) -> Tensor:
        """tokens (B, L) -> float32 logits (B, L, vocab) for the token after each position."""
        return self.project(model, model(tokens, cache=cache, documents=documents))

    def project(self, model: Model, hidden: Tensor) -> Tensor:
        """hidden states (..., d) -> float32 next-token logits (..., vocab)."""
        # float32 even under autocast: a bf16 softmax over the vocabulary loses too much precision
        with torch.autocast(hidden.device.type, enabled=False):
            return F.linear(hidden.float(), self.head_weight(model).float())

    def _nats(self, model: Model, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(summed cross-entropy in nats, tokens scored, their UTF-8 bytes): 0-dim tensors, no host sync."""
        inputs, targets, documents = split_documents(batch)
        logits = self.logits(model, inputs, documents=documents)
        nats = F.cross_entropy(rearrange(logits, "b l v -> (b l) v"), rearrange(targets, "b l -> (b l)"),
                               ignore_index=IGNORE, reduction="sum")
        return nats, (targets != IGNORE).sum(), model.bytes_of(targets)

    def loss(self, model: Model, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean next-token cross-entropy in nats; metrics (detached, no host sync) also give bits per byte."""
        nats, n_tokens, n_bytes = self._nats(model, batch)
        loss = nats / n_tokens.clamp(min=1)
        return loss, {"loss": loss.detach(), "bpb": nats.detach() / (math.log(2) * n_bytes.clamp(min=1))}

    @torch.no_grad()
    def evaluate(self, model: Model, batch: Tensor) -> dict[str, float]:
        nats, n_tokens, n_bytes = (value.item() for value in self._nats(model, batch))
        return {"loss": nats / max(n_tokens, 1), "bpb": nats / (math.log(2) * max(n_bytes, 1)), "n_bytes": n_bytes}

    def head_flops_per_token(self, d_model: int) -> int:
        return 2 * d_model * self.vocab_size

    def probe_features(self, model: Model, batch: Tensor) -> tuple[Tensor, Tensor]:
        """The hidden states the LM head reads, and the next bytes."""
        return next_byte_features(model, batch)

    def sample(self, model: Model, prompt: Tensor, n_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None,
               context_len: int | None = None) -> Tensor:
        return sample_autoregressively(self, model, prompt, n_tokens, temperature=temperature, top_k=top_k,
                                       generator=generator, context_len=context_len)


def sample_autoregressively(objective: Objective, model: Model, prompt: Tensor, n_tokens: int, *,
                            temperature: float = 1.0, top_k: int | None = None,
                            generator: torch.Generator | None = None, context_len: int | None = None) -> Tensor:
    """Continues prompt (B, P) by n_tokens bytes drawn from `objective.logits(model, tokens, cache)`;
    returns (B, P + n_tokens).

    The prompt is run once into a KV cache, then each new byte costs one single-position step.
    temperature 0 is greedy; top_k keeps only the k most likely bytes; a seeded generator makes it
    reproducible. `context_len` (e.g. the training seq_len) bounds what the model attends to, since
    positions beyond the trained length are out of distribution: when the cache is full it is rebuilt
    from the last context_len // 2 bytes. Runs in eval mode and restores the previous mode afterwards.
    """
    objective.check_sample_args(prompt, n_tokens, temperature, top_k, context_len)
    window = context_len or prompt.shape[1] + n_tokens
    with inference(model):
        tokens, cache = prompt, None
        step_input = prompt[:, -window:]
        for _ in range(n_tokens):
            if cache is None or cache[0].length + step_input.shape[1] > window:
                if cache is not None:
                    step_input = tokens[:, -max(1, window // 2):]
                cache = model.backbone.new_cache(prompt.shape[0], window, device=prompt.device)
            next_logits = objective.logits(model, step_input, cache=cache)[:, -1]
            step_input = objective.draw_tokens(next_logits, temperature, top_k, generator)
            tokens = torch.cat([tokens, step_input], dim=1)
        return tokens
