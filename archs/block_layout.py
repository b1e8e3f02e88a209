"""Block-causal layouts (BD3-LM, Arriola et al. 2025): which keys each position reads when a model runs block by
block, and at which positions RoPE places them. Only mixers with `Mixer.block_causal` (attention) take one.

Blocks are `block_size` consecutive positions counted from 0 (position p is in block p // block_size). Two uses:

- `BlockLayout.training(seq_len, block_size)`: one pass over the noisy and the clean copy of a sequence side by
  side, [x_t, x_0], 2 * seq_len positions, both halves at positions 0 .. seq_len - 1. A noisy position reads its own
  noisy block (M_BD, block diagonal) and the clean blocks before it (M_OBC, offset block-causal); a clean position
  reads its own and the earlier clean blocks (M_BC, block-causal): the clean half is what a KV cache holds when
  sampling. With `documents` (packed rows) a position also reads only its own document, and RoPE counts from each
  document's start, as in every other mixer. Blocks stay counted from the row's start (as the noise levels are,
  one per row block), so a document that starts inside a block trains with its blocks offset, while the sampler
  starts them at its position 0: the bound holds either way (documents never read each other), the alignment
  differs. Its mask is then per row, (B, 1, 2L, 2L) booleans: 0.5 GB at B = 32, L = 2048.
- `BlockLayout.decoding(start, length, block_size, store=n)`: `length` positions from `start` after a KV cache of
  the `start` before them: block-causal (a position reads the cache and its block-mates, not later blocks). The
  first n positions are appended to the cache (clean blocks); the rest read it without changing it (a noisy block
  being denoised), so one pass can both fill the cache with a finished block and denoise the next.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from archlab.archs.documents import Documents


class BlockLayout:
    """`mask` (Lq, Lk) or (B, 1, Lq, Lk) bool, True where a query reads a key, or None (every key); `positions`
    (B or 1, Lq) the RoPE position of each query; `store`: how many leading positions a decoding pass appends to
    the cache; `start`: the positions a decoding pass expects in the cache before it (None: a pass without one)."""

    def __init__(self, mask: Tensor | None, positions: Tensor, *, store: int = 0, start: int | None = None):
        self.mask, self.positions, self.store, self.start = mask, positions, store, start

    @classmethod
    def training(cls, seq_len: int, block_size: int, *, device: torch.device | str | None = None,
                 documents: Documents | None = None) -> "BlockLayout":
        """The [x_t, x_0] layout of 2 * seq_len positions (see the module docstring)."""
        position = torch.arange(seq_len, device=device)
        both_halves = torch.cat([position, position])
        block = both_halves // block_size
        clean = torch.arange(2 * seq_len, device=device) >= seq_len
        q_block, k_block = rearrange(block, "q -> q 1"), rearrange(block, "k -> 1 k")
        q_clean, k_clean = rearrange(clean, "q -> q 1"), rearrange(clean, "k -> 1 k")
        mask = ((q_block == k_block) & (q_clean == k_clean)  # M_BD: own block, own copy
                | (~q_clean & k_clean & (k_block < q_block))  # M_OBC: a noisy block reads earlier clean blocks
                | (q_clean & k_clean & (k_block <= q_block)))  # M_BC: the clean copy, block-causal
        if documents is None:
            return cls(mask, rearrange(both_halves, "l -> 1 l"))
        seq_idx = torch.cat([documents.seq_idx, documents.seq_idx], dim=1)
        same_document = rearrange(seq_idx, "b q -> b 1 q 1") == rearrange(seq_idx, "b k -> b 1 1 k")
        return cls(mask & same_document, torch.cat([documents.positions, documents.positions], dim=1))

    @classmethod
    def decoding(cls, start: int, length: int, block_size: int, *, store: int,
                 device: torch.device | str | None = None) -> "BlockLayout":
        """`length` positions from `start`, after a cache of positions 0 .. start - 1 (see the module docstring)."""
        position = torch.arange(start, start + length, device=device)
        mask = None
        if start // block_size != (start + length - 1) // block_size:  # more than one block: block-causal
            keys = torch.arange(start + length, device=device)
            mask = rearrange(keys // block_size, "k -> 1 k") <= rearrange(position // block_size, "q -> q 1")
        return cls(mask, rearrange(position, "l -> 1 l"), store=store, start=start)

    def check_matches(self, batch_size: int, length: int, cached: int, where: str) -> None:
        """An input of (batch_size, length) after `cached` positions in a cache (0 without one) is what this
        layout describes."""
        if length != self.positions.shape[1] or self.positions.shape[0] not in (1, batch_size):
            raise ValueError(f"{where}: the block layout describes (batch, length) {tuple(self.positions.shape)} but "
                             f"the input is {(batch_size, length)}; build the layout for this input")
        if cached != (self.start or 0):
            raise ValueError(f"{where}: the block layout starts at position {self.start or 0} but the cache holds "
                             f"{cached}; build the layout from the cache's length")
