"""Balanced context-parallel shards of a packed micro-batch.

A DP rank's micro-batch is a packed stream of ``T`` tokens (cells back to back, ``cu_seqlens``). With
context-parallel degree P the stream is padded to ``T_pad = P·⌈T/P⌉`` and rank ``r`` of the CP group holds
tokens ``[r·t, (r+1)·t)`` with ``t = T_pad/P``: every rank has exactly the same number of tokens whatever
the cells' lengths (a cell may span ranks; a cell shorter than P tokens simply lies in one or two shards).

The ``T_pad − T < P`` pad tokens form one extra *pad cell* appended to ``cu_seqlens``: attention is
per cell, so they never see a real token nor are seen by one; they are never masked, so the loss and
every gradient are exactly those of the unpadded batch (the pad cell's outputs get gradient 0).

Loss: each CP rank sees only its shard of the masked tokens, so the micro-batch loss
``L = (1/M)·Σ_{masked} CE`` (M masked tokens in the whole micro-batch) is split as ``L = Σ_r L_r`` with
``L_r = (1/M)·Σ_{masked ∈ shard r} CE``; ``loss_denominator = M`` travels in the batch for that
(a shard with no masked token contributes 0, not NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from data_prep.tokenize import PAD_ID, VALUE_PAD


@dataclass(frozen=True)
class CPShard:
    """Where rank ``rank`` of a CP group of ``degree`` cuts a packed stream of ``total`` tokens."""

    total: int                    # T, real tokens
    degree: int                   # P
    rank: int

    @property
    def padded(self) -> int:      # T_pad, a multiple of P
        return -(-self.total // self.degree) * self.degree

    @property
    def pad(self) -> int:
        return self.padded - self.total

    @property
    def local(self) -> int:       # t = T_pad / P, the same on every rank
        return self.padded // self.degree

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def stop(self) -> int:
        return self.start + self.local

    def cu_seqlens(self, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Boundaries of the padded stream: the real cells, then the pad cell (when there is padding)."""
        if not self.pad:
            return cu_seqlens
        return torch.cat([cu_seqlens, cu_seqlens.new_tensor([self.padded])])

    def slice(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """This rank's ``t`` rows of the padded stream ``x`` (``[T, ...]``; pad rows are ``fill``)."""
        if self.pad:
            x = torch.cat([x, x.new_full((self.pad, *x.shape[1:]), fill)])
        return x[self.start:self.stop]


def shard_batch(batch: dict, masked: torch.Tensor, degree: int, rank: int) -> tuple[dict, torch.Tensor]:
    """(batch, masked) of CP rank ``rank``: local token rows, the padded stream's ``cu_seqlens``/``max_seqlen``
    and ``loss_denominator`` (masked tokens of the whole micro-batch). Host-side, before the copy to device."""
    if degree < 1 or not 0 <= rank < degree:
        raise ValueError(f"context-parallel rank {rank} outside a group of {degree}")
    cu = batch["cu_seqlens"]
    total = batch["input_ids"].shape[0]
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] = {int(cu[-1])} != {total} packed tokens")
    s = CPShard(total, degree, rank)
    out = dict(batch)
    out["input_ids"] = s.slice(batch["input_ids"], PAD_ID)
    out["values"] = s.slice(batch["values"], VALUE_PAD)
    out["cu_seqlens"] = s.cu_seqlens(cu)
    out["max_seqlen"] = max(int(batch["max_seqlen"]), s.pad)
    out["loss_denominator"] = masked.sum()
    return out, s.slice(masked, False)
