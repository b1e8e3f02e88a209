"""Document boundaries inside packed rows: what every mixer needs to keep documents apart.

A training row may hold the end of one document, whole documents and the start of another (data.packing:
documents). `Documents(seq_idx)` wraps the document id of each position, (B, L); a position starts a new
document where its id differs from the previous position's (mamba_ssm's and causal-conv1d's `seq_idx`). From it
come what each kind of mixer takes, computed once per batch, outside any compiled region:
  - `seq_idx` itself (int32): attention masks across documents, the causal conv and the Mamba-1 scan reset on it;
  - `positions` (B, L): each position's offset inside its document, so RoPE restarts per document;
  - `cu_seqlens` (int32, over the B * L positions flattened): the packed-sequence form the SSD and gated delta
    ops take (a row start is always a sequence start), with `pack` / `unpack` to go to and from batch 1;
  - `reversed`: the same boundaries for a layer that scans the flipped rows (a bidirectional Mamba).
"""
from __future__ import annotations

from functools import cached_property

import torch
from einops import rearrange
from torch import Tensor


class Documents:
    """Per-row document ids (B, L) of a packed batch; see the module docstring."""

    def __init__(self, seq_idx: Tensor):
        if not isinstance(seq_idx, Tensor) or seq_idx.ndim != 2 or seq_idx.dtype not in (torch.int32, torch.int64):
            got = f"{getattr(seq_idx, 'dtype', type(seq_idx).__name__)} {tuple(getattr(seq_idx, 'shape', ()))}"
            raise TypeError(f"Documents takes seq_idx, int32 or int64 (batch, length) document ids, not {got}")
        self.seq_idx = seq_idx.to(torch.int32)
        self.starts = torch.ones_like(self.seq_idx, dtype=torch.bool)  # where a document starts
        self.starts[:, 1:] = self.seq_idx[:, 1:] != self.seq_idx[:, :-1]

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], device: torch.device | str | None = None) -> "Documents":
        """Rows made of documents of these lengths (each row's lengths sum to the same L)."""
        rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
        return cls(torch.stack(rows).to(device=device, dtype=torch.int32))

    @property
    def shape(self) -> torch.Size:
        return self.seq_idx.shape

    @cached_property
    def positions(self) -> Tensor:
        """(B, L) int64: each position's offset from the start of its document."""
        index = torch.arange(self.shape[1], device=self.seq_idx.device).expand(self.shape)
        start_of_own = torch.cummax(torch.where(self.starts, index, 0), dim=1).values
        return index - start_of_own

    @cached_property
    def cu_seqlens(self) -> Tensor:
        """int32 (n + 1,): cumulative lengths of the n documents of all rows flattened (rows cut documents)."""
        flat_starts = torch.nonzero(self.starts.flatten()).flatten()
        end = torch.tensor([self.starts.numel()], device=flat_starts.device)
        return torch.cat([flat_starts, end]).to(torch.int32)

    @cached_property
    def reversed(self) -> "Documents":
        """The boundaries of the flipped rows (what a reversed scan sees)."""
        return Documents(self.seq_idx.flip(1))

    def check_matches(self, x: Tensor, where: str) -> None:
        """x (B, L, ...) has the batch and length these documents describe."""
        if tuple(x.shape[:2]) != tuple(self.shape):
            raise ValueError(f"{where}: documents describe (batch, length) {tuple(self.shape)} but the input is "
                             f"{tuple(x.shape[:2])}; build Documents from this batch's seq_idx")

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """(B, L, ...) -> (1, B * L, ...): the rows one after another, as cu_seqlens counts them."""
        return rearrange(x, "b l ... -> 1 (b l) ...")

    def unpack(self, x: Tensor) -> Tensor:
        """(1, B * L, ...) -> (B, L, ...)."""
        return rearrange(x, "1 (b l) ... -> b l ...", b=self.shape[0])
