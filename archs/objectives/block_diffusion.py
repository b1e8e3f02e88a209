"""Block diffusion LM (BD3-LM, Arriola et al., ICLR 2025): autoregressive over blocks, masked diffusion within one.

The sequence (batch[:, :-1], seq_len bytes, as MDLM scores it) is cut into blocks of B = model.block_diffusion.
block_size positions. Block b is noised like MDLM with a time t_b of its own and denoised given its noisy self and
the CLEAN blocks before it, so the likelihood factorises over blocks, log p(x) = sum_b log p(x_b | x_<b), and each
factor has MDLM's bound:

    NELBO = sum_b E_{t_b} [ w(t_b) sum_{i in b masked} -log p(x_i | z_b, x_<b) ],   w(t) = -alpha'_t / (1 - alpha_t).

Training runs it for all blocks in one pass over [x_t, x_0] (2 * seq_len positions) under the block-causal mask
of archs/block_layout.py; the loss reads the noisy half only. Times are stratified over all (row, block) pairs.
Two limits (tests/archs/test_block_diffusion.py):
  - B = seq_len: one block, nothing clean before it: the clean half is never read, so it is not run, and loss,
    evaluation and draws are MDLM's exactly (same weights, same seeds, the same numbers);
  - B = 1: each byte is masked with probability t and then weighted 1/t, so in expectation the NELBO is
    sum_i -log p(x_i | x_<i): an autoregressive likelihood (the byte's own input is the mask token).
Training may clip the times to [clip_min, clip_max] (BD3-LM's clipped schedules, which cut the gradient variance
of large blocks); evaluation always integrates over [1e-3, 1] like MDLM, so val bpb is an upper bound on the NLL
(`bound: 1.0`) whatever the training clip.

Sampling goes block by block with a KV cache: each new block starts masked (holding the prompt's tail, when the
prompt ends inside it) and is denoised by MDLM's ancestral or LLaDA's confidence sampler, each step one pass over
its B positions that reads the cache without writing it. The clean positions not yet cached (the prompt's whole
blocks, then each finished block) ride along in the next block's first pass, block-causally, and are appended
there: a step costs one pass over B positions (2B when it carries a finished block), not over seq_len, and
filling the cache costs no pass of its own.
Only mixers that can run block-causally (Mixer.block_causal: attention without a window) can train this way.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from archlab.archs.block_layout import BlockLayout
from archlab.archs.config import ModelConfig
from archlab.archs.documents import Documents
from archlab.archs.layers.mixer import MIXERS
from archlab.archs.model import Model, inference
from archlab.archs.objectives.masked_diffusion import MaskedDiffusionObjective

SAMPLERS = ("ancestral", "confidence")  # within a block


class BlockDiffusionObjective(MaskedDiffusionObjective):
    sample_options = ("steps", "strategy")
    caches_while_sampling = True
    strategies = SAMPLERS

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        settings = cfg.block_diffusion
        self.block_size = settings.block_size
        self.clip = (settings.clip_min, settings.clip_max)

    # -- questions about a config -------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        able = [name for name, mixer in MIXERS.items() if mixer.block_causal]
        for name in cfg.mixers:
            if not MIXERS[name].block_causal:
                raise ValueError(f"objective block_diffusion runs each layer block-causally over a noisy and a clean "
                                 f"copy of the sequence, which mixer {name} cannot (it reads its inputs in order); "
                                 f"use mixers that can: {', '.join(able)}")

    @classmethod
    def check_seq_len(cls, cfg: ModelConfig, seq_len: int) -> None:
        block_size = cfg.block_diffusion.block_size
        if seq_len % block_size:
            raise ValueError(f"model.block_diffusion.block_size={block_size} must divide the sequence length "
                             f"{seq_len} (data.seq_len): blocks tile each sequence")

    @classmethod
    def check_kernels(cls, cfg: ModelConfig, kernels: Mapping[str, str]) -> None:
        if kernels.get("attention") == "triton":
            raise ValueError("block_diffusion needs an attention mask our Triton kernels do not take; set "
                             "kernels.attention=auto or torch")

    # -- noise and the network ----------------------------------------------------------------------
    def training_times(self, n: int, device) -> Tensor:
        low, high = self.clip
        return self.draw_times(n, device=device, low=low, high=high)

    def blocks_in(self, seq_len: int) -> int:
        if seq_len % self.block_size:
            raise ValueError(f"block_size={self.block_size} must divide the sequence length {seq_len}")
        return seq_len // self.block_size

    def denoiser_hidden(self, model: Model, z: Tensor, x: Tensor, documents: Documents | None) -> Tensor:
        """The noisy half of one pass over [z, x] under the training block layout (one block: MDLM's pass)."""
        seq_len = x.shape[1]
        if seq_len == self.block_size:
            return self.hidden(model, z, documents)
        layout = BlockLayout.training(seq_len, self.block_size, device=x.device, documents=documents)
        return model(self.embed(model, torch.cat([z, x], dim=1)), layout=layout)[:, :seq_len]

    def training_flops_per_token(self, model: Model, seq_len: int) -> int:
        """3x the forward of both halves: 2 * seq_len positions, each reading (seq_len + B) / 2 keys on average (a
        block b position reads b + 1 blocks), which costs as much as bidirectional attention over that many (linear
        in it: an odd sum averages the counts either side); the head counted once per byte, as MDLM does. One block
        runs the noisy half alone (MDLM's count). This is the useful work: SDPA with a dense boolean mask computes
        scores for all 2 * seq_len keys and discards the hidden ones."""
        if seq_len == self.block_size:
            return super().training_flops_per_token(model, seq_len)
        keys = seq_len + self.block_size
        both_halves = sum(model.backbone.flops_per_token(half, causal=False) for half in (keys // 2, (keys + 1) // 2))
        return 3 * (both_halves + self.head_flops_per_token(model.backbone.d_model))

    def logits(self, model: Model, z: Tensor) -> Tensor:
        raise NotImplementedError("block diffusion predicts a block from the clean blocks before it, not from z "
                                  "alone: use denoiser_hidden(model, z, x) or sample")

    # -- sampling -----------------------------------------------------------------------------------
    def sample(self, model: Model, prompt: Tensor, n_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, generator: torch.Generator | None = None, context_len: int | None = None,
               steps: int | None = None, strategy: str = "ancestral") -> Tensor:
        """Generates n_tokens bytes after prompt (B, P) block by block with a KV cache; returns (B, P + n_tokens).

        steps (default n_tokens) is the denoising budget of the whole span (one network pass each), split over the
        blocks being generated
        as evenly as whole steps allow (earlier blocks get the remainder); a block gets at least one, so with
        fewer steps than blocks the steps taken (`last_sample_stats["steps"]`) exceed it (`blocks_to_generate`
        says how many). strategy: `ancestral` (MDLM) or `confidence` (LLaDA) within each block. The last block is
        denoised whole and cut to n_tokens. P + n_tokens must fit in `context_len` when given. Sets
        `last_sample_stats` (strategy, steps, network_evals, blocks_to_generate). Runs in eval mode, restoring it.
        """
        steps = max(n_tokens, 1) if steps is None else steps
        if strategy not in self.strategies:
            raise ValueError(f"block_diffusion samples within a block by {' or '.join(self.strategies)}, not "
                             f"{strategy!r}")
        self._check_sample_args(prompt, n_tokens, temperature, top_k, context_len, steps, strategy, None)
        batch, prompt_len = prompt.shape
        size = self.block_size
        self.last_sample_stats = {"strategy": strategy, "steps": 0, "network_evals": 0, "block_size": size}
        if n_tokens == 0:
            return prompt.clone()
        end = -(-(prompt_len + n_tokens) // size) * size  # whole blocks
        first = prompt_len // size * size  # where the first block with something to generate starts
        n_blocks = (end - first) // size
        self.last_sample_stats["blocks_to_generate"] = n_blocks
        draw = dict(temperature=temperature, top_k=top_k, generator=generator)
        with inference(model):
            blocks = CachedBlocks(self, model, prompt[:, :first], end)
            for index, start in enumerate(range(first, end, size)):
                per_block = max(1, steps // n_blocks + (index < steps % n_blocks))
                known = prompt[:, start:start + size]
                z = torch.cat([known, known.new_full((batch, size - known.shape[1]), self.mask_id)], dim=1)
                if strategy == "ancestral":
                    self._ancestral(blocks.logits, z, per_block, **draw)
                else:
                    self._confidence(blocks.logits, z, 0, size, per_block, **draw)
                blocks.finish(z)
        return blocks.tokens[:, :prompt_len + n_tokens]


class CachedBlocks:
    """A block-by-block sampler's KV cache (room for `length` positions) and the clean tokens so far; those not yet
    cached (`pending`: the prompt's whole blocks, then the last finished block) go in with the next pass."""

    def __init__(self, objective: BlockDiffusionObjective, model: Model, clean_prefix: Tensor, length: int):
        self.objective, self.model = objective, model
        self.cache = model.backbone.new_cache(clean_prefix.shape[0], length, device=clean_prefix.device)
        self.tokens = self.pending = clean_prefix

    def logits(self, z: Tensor) -> Tensor:
        """Logits (B, block, 256) for the block z (partly masked) that follows the clean tokens; the pending ones
        are appended to the cache by this pass, z is not."""
        stored, size = self.pending.shape[1], self.objective.block_size
        layout = BlockLayout.decoding(self.cache[0].length, stored + z.shape[1], size, store=stored,
                                      device=z.device)
        hidden = self.model(self.objective.embed(self.model, torch.cat([self.pending, z], dim=1)), cache=self.cache,
                            layout=layout)
        self.pending = self.pending[:, :0]
        return self.objective.head(self.model, hidden[:, stored:])

    def finish(self, block: Tensor) -> None:
        """The block denoised last is clean now: the next pass caches it."""
        self.tokens = torch.cat([self.tokens, block], dim=1)
        self.pending = block
