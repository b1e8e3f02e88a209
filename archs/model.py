"""The common interface: Model = byte embedding + backbone + objective.

The trainer sees only `Model`: it calls `objective.loss` / `objective.evaluate` / `objective.sample`
and the `after_optimizer_step` hook, and never branches on architecture names.
Batches are LongTensors of token ids, shape (B, seq_len + 1): each objective decides how to use them
(autoregressive: inputs = batch[:, :-1], targets = batch[:, 1:]). A batch of packed documents (data.packing:
documents) is (B, 2, seq_len + 1): the token ids and each token's document id stacked, so that splitting rows
(micro-batches, ranks) and moving to a device treat it as one tensor; `split_documents` takes it apart.
Bits per byte divide nats by the UTF-8 bytes of the scored tokens, `Model.token_bytes` (all ones for bytes), so
runs with any tokenizer are on one scale.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn


from archlab.archs.block_layout import BlockLayout
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents

IGNORE = -100  # a target cross-entropy skips (F.cross_entropy's ignore_index): see split_documents


class Backbone(nn.Module):
    """Maps embedded tokens (B, L, d) to hidden states (B, L, d)."""

    d_model: int
    #: the kernel ops (kernels/backend.py) it runs, whose configured backends must work on the device
    kernel_ops: tuple[str, ...] = ()

    def forward(self, x: Tensor, *, causal: bool, cache=None, documents: Documents | None = None,
                layout: BlockLayout | None = None) -> Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def flops_per_token(self, seq_len: int, *, causal: bool) -> int:  # pragma: no cover - interface
        """Forward FLOPs per token of the backbone (matmuls + attention/scan), analytic."""
        raise NotImplementedError


class Objective(nn.Module):
    """Owns output heads, masking, the loss, evaluation and sampling."""

    #: whether the backbone must run causally (None: either works)
    requires_causal: bool | None = None
    #: sampler settings beyond temperature/top_k that `sample` takes (the config's sample.<name> keys)
    sample_options: tuple[str, ...] = ()
    #: whether prompt + sample must fit in the trained context (no sliding window, e.g. diffusion)
    samples_within_context: bool = False
    #: the eval metric that states the model's quality (progress bar, eval lines); "bpb" unless there is none
    quality_metric: str = "bpb"
    #: whether quality_metric comes from a probe on frozen features (JEPA) / is an upper bound (diffusion's NELBO)
    quality_is_probe: bool = False
    quality_is_bound: bool = False
    #: further eval metrics the progress bar shows (e.g. JEPA's collapse monitors)
    progress_metrics: tuple[str, ...] = ()
    #: whether its sampler keeps a decoding state (a KV cache) though the backbone runs bidirectionally (block
    #: diffusion caches its finished blocks); a causal backbone always does
    caches_while_sampling: bool = False
    #: whether it reads only one stream of bytes (no packed documents, no other tokenizer)
    byte_streams_only: bool = False
    #: what a fresh probe on this objective's frozen representations predicts (`probe_features`): "next byte",
    #: "masked byte", or None where there is no fixed representation to probe
    probe_task: str | None = None

    # -- questions about a config, asked before anything is built -----------------------------------
    @classmethod
    def causality(cls, cfg: ModelConfig) -> bool | None:
        """Whether the backbone must run causally for this config (None: either works)."""
        return cls.requires_causal

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        """Raises ValueError (one line) for settings of this objective that cannot work together."""

    @classmethod
    def check_seq_len(cls, cfg: ModelConfig, seq_len: int) -> None:
        """Raises ValueError when training windows of seq_len bytes cannot work with this config."""

    @classmethod
    def check_kernels(cls, cfg: ModelConfig, kernels: Mapping[str, str]) -> None:
        """Raises ValueError (one line) when a chosen kernel backend (op -> name) cannot run this objective."""

    @classmethod
    def can_sample(cls, cfg: ModelConfig) -> bool:
        """Whether `sample` can generate text for this config."""
        return True

    # -- hooks ----------------------------------------------------------------------------------------
    def attach(self, model: "Model", *, kernels: Mapping[str, str] | None) -> None:
        """Called once by build_model: builds objective-owned modules that depend on the model (e.g. a
        target encoder copied from it, a predictor on the same kernels). Default: nothing."""

    def after_optimizer_step(self, model: "Model", step: int, max_steps: int) -> None:
        """Called after optimizer step `step` (0-based) of `max_steps`, e.g. to update an EMA target encoder."""

    def training_flops_per_token(self, model: "Model", seq_len: int) -> int:
        """Training FLOPs per token: forward + backward (2x forward) of the model; objectives that run more
        (a target encoder, a predictor) add theirs."""
        return 3 * model.flops_per_token(seq_len)

    def separately_clipped_parameters(self) -> list[nn.Parameter]:
        """Parameters trained on their own loss whose gradient never meets the model's (e.g. a probe on
        stop-gradient features): the trainer clips them apart, so they never scale the model's update."""
        return []

    def modules_to_compile(self) -> list[nn.Module]:
        """Objective-owned networks run outside Model.forward (a target encoder, a predictor): train.compile
        compiles them too."""
        return []

    def health_warnings(self, metrics: dict[str, float], *, trained: bool = True) -> list[str]:
        """One-line warnings about eval metrics (e.g. representation collapse); the trainer shows and logs them.
        `trained` is False until warmup ends (the trainer's call), when an untrained probe is no sign of anything.
        The trainer adds `unigram_bpb` to the metrics: the eval bytes' cross-entropy under the train split's byte
        frequencies."""
        return []

    def probe_features(self, model: "Model", batch: Tensor) -> tuple[Tensor, Tensor]:
        """(features (N, d), byte ids (N,)) for linear evaluation (train/linear_probe.py): the representations a
        fresh probe reads, detached, and the bytes it must predict from them (the `probe_task`)."""
        raise NotImplementedError(f"{type(self).__name__} has no representation to probe")

    def loss(self, model: "Model", batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover
        """Scalar training loss and metrics as detached 0-dim tensors (read them only when logging)."""
        raise NotImplementedError

    def evaluate(self, model: "Model", batch: Tensor) -> dict[str, float]:  # pragma: no cover
        """Metrics for one batch; must include `quality_metric` (`bpb`, bits per byte, unless the objective has
        no next-byte figure) and `n_bytes` (its weight)."""
        raise NotImplementedError

    def sample(self, model: "Model", prompt: Tensor, n_tokens: int, **kwargs) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def head_flops_per_token(self, d_model: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def check_sample_args(self, prompt: Tensor, n_tokens: int, temperature: float, top_k: int | None,
                          context_len: int | None, *, empty_prompt_ok: bool = False) -> None:
        """The argument checks every sampler shares (one-line errors); prompt ids index `vocab_size` bytes."""
        if not isinstance(prompt, Tensor) or prompt.dtype != torch.long or prompt.ndim != 2:
            raise TypeError("prompt must be a LongTensor of byte ids, shape (batch, length)")
        if prompt.shape[0] == 0 or (prompt.shape[1] == 0 and not empty_prompt_ok):
            raise ValueError(f"prompt must be non-empty, got shape {tuple(prompt.shape)}; give at least one byte")
        if prompt.numel() and (prompt.min() < 0 or prompt.max() >= self.vocab_size):
            raise ValueError(f"prompt ids must lie in [0, {self.vocab_size}); encode the text as bytes")
        if n_tokens < 0:
            raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.vocab_size} or None, got {top_k}")
        if context_len is not None and context_len < 1:
            raise ValueError(f"context_len must be >= 1 or None, got {context_len}")

    @staticmethod
    def draw_tokens(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
        """logits (B, vocab) -> ids (B, 1): greedy at temperature 0, else a draw from the top-k softmax."""
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        if top_k is not None:
            kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator)


class Model(nn.Module):
    """Byte embedding -> backbone -> hidden states; the objective turns them into losses and samples."""

    def __init__(self, cfg: ModelConfig, embedding: nn.Embedding, backbone: Backbone, objective: Objective):
        super().__init__()
        self.causal = cfg.runs_causally  # build_model built the backbone for this too
        self.embedding = embedding
        self.backbone = backbone
        self.objective = objective
        # UTF-8 bytes of each token (0 for special tokens); set from the tokenizer (set_token_bytes), not saved
        self.register_buffer("token_bytes", torch.ones(cfg.vocab_size), persistent=False)

    def set_token_bytes(self, token_bytes) -> None:
        """The tokenizer's UTF-8 byte count of each token id, (vocab_size,)."""
        values = torch.as_tensor(token_bytes, dtype=torch.float32)
        if values.shape != self.token_bytes.shape:
            raise ValueError(f"the tokenizer has {values.numel()} tokens but the model was built for "
                             f"{self.token_bytes.numel()}; set model.vocab_size from the tokenizer")
        self.token_bytes.copy_(values)

    def bytes_per_target(self, targets: Tensor) -> Tensor:
        """The UTF-8 bytes of each target id, IGNORE positions counting 0 (float, the shape of `targets`)."""
        return self.token_bytes[targets.clamp(min=0)] * (targets != IGNORE)

    def bytes_of(self, targets: Tensor) -> Tensor:
        """The UTF-8 bytes of the target ids, IGNORE positions counting 0 (a 0-dim float tensor, no host sync)."""
        return self.bytes_per_target(targets).sum()

    def forward(self, tokens: Tensor, cache=None, documents: Documents | None = None,
                layout: BlockLayout | None = None) -> Tensor:
        """tokens (B, L) byte ids -> hidden states (B, L, d). `cache` comes from backbone.new_cache; `documents`
        (archs/documents.py) keeps the documents packed in each row apart; a block `layout` (archs/block_layout.py)
        runs a block-causal stack block by block (block diffusion).

        Objectives that put their own vectors in place of some bytes (a mask embedding) pass the embedded
        sequence (B, L, d) instead: they still go through forward, so torch.compile and wrappers see them."""
        embedded = tokens if tokens.is_floating_point() else self.embedding(tokens)
        return self.backbone(embedded, causal=self.causal, cache=cache, documents=documents, layout=layout)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token, backbone + output head (training costs about 3x this)."""
        return (self.backbone.flops_per_token(seq_len, causal=self.causal)
                + self.objective.head_flops_per_token(self.backbone.d_model))

    def kernel_ops(self) -> set[str]:
        """Every kernel op some backbone in the model runs (an objective's predictor included)."""
        return {op for module in self.modules() if isinstance(module, Backbone) for op in module.kernel_ops}

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct trained parameters (a tied head is counted once; a frozen EMA copy is not counted);
        optionally without the embedding table."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total - self.embedding.weight.numel() if exclude_embeddings else total


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd for the block (sampling, scoring); the module's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def batch_seeded_generator(tokens: Tensor, salt: int) -> torch.Generator:
    """A CPU generator seeded by a checksum of `tokens` and a salt: the same eval batch always gets the same
    random draws (masks, noise levels), whatever the global RNG state or device; different batches differ."""
    return torch.Generator().manual_seed(zlib.crc32(tokens.to(torch.uint8).cpu().numpy().tobytes()) ^ salt)


def next_byte_features(model: Model, batch: Tensor) -> tuple[Tensor, Tensor]:
    """A causal model's hidden state at every scored position (N, d) and the token after each (N,)."""
    inputs, next_tokens, documents = split_documents(batch)
    scored = next_tokens != IGNORE
    return model(inputs, documents=documents).detach()[scored], next_tokens[scored]


def split_batch(batch: Tensor) -> tuple[Tensor, Tensor]:
    """A batch (B, L + 1) of token ids (or a documents batch, whose ids it drops) -> (inputs batch[:, :-1],
    next tokens batch[:, 1:]), each (B, L)."""
    tokens = batch_tokens(batch)
    return tokens[:, :-1], tokens[:, 1:]


def batch_tokens(batch: Tensor) -> Tensor:
    """The token ids (B, L + 1) of a batch or a documents batch (B, 2, L + 1)."""
    if batch.ndim not in (2, 3) or batch.shape[-1] < 2 or (batch.ndim == 3 and batch.shape[1] != 2):
        raise ValueError("batch must be (B, L + 1) token ids, or (B, 2, L + 1) token and document ids, with L >= 1; "
                         f"got shape {tuple(batch.shape)}")
    return batch if batch.ndim == 2 else batch[:, 0]


def split_documents(batch: Tensor) -> tuple[Tensor, Tensor, Documents | None]:
    """(inputs (B, L), next tokens (B, L), the inputs' Documents or None for a plain batch). A next token from
    another document than its input position is IGNORE: nothing in a document predicts the next one's first token."""
    inputs, targets = split_batch(batch)
    if batch.ndim == 2:
        return inputs, targets, None
    seq_idx = batch[:, 1]
    crossing = seq_idx[:, 1:] != seq_idx[:, :-1]
    return inputs, targets.masked_fill(crossing, IGNORE), Documents(seq_idx[:, :-1])


def documents_of_sequence(batch: Tensor) -> Documents | None:
    """The Documents of batch[..., :-1], the sequence a bidirectional objective scores, or None."""
    return None if batch.ndim == 2 else Documents(batch[:, 1, :-1])
