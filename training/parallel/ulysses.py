"""Context-parallel attention over packed cells: Ulysses all-to-all (DeepSpeed ``DistributedAttention``).

Rank r of a CP group of P holds tokens ``[r·t, (r+1)·t)`` of the padded packed stream (see
:mod:`training.parallel.sharding`) and their q, k, v ``[t, H, D]``. One all-to-all per tensor turns
"my tokens, all heads" into "all tokens, my H/P heads" (``[P·t, H/P, D]``); the *unchanged* varlen
attention core (``sigattn.sigmoid_attention_varlen`` or the softmax path) then runs on whole cells with
the full ``cu_seqlens``; a last all-to-all brings the output back to ``[t, H, D]``. Because every head
sees every token of every cell:

* no partial outputs need merging: neither the sigmoid sum over key blocks nor softmax's log-sum-exp;
* the sigmoid bias ``b = −log n`` uses each cell's full length by construction;
* cells of any length, including cells shorter than P or spanning shards, need nothing special.

The exchange and its autograd (the backward is the inverse all-to-all) are DeepSpeed's
``deepspeed.sequence.layer.DistributedAttention`` on ``[t, 1, H, D]`` (sequence-first, batch 1 — the
packed stream). Costs per layer and rank: 4 all-to-alls of ``t·d·(P−1)/P`` elements forward, 4 backward.
Limits: P must divide ``n_heads`` (P ≤ H); a ring (K/V blocks passed around with P2P) would lift that and
can overlap transfers with compute, but needs separate q/k lengths in the varlen op and, for softmax, an
LSE merge — see docs/context_parallel.md. ``torch.distributed.tensor.experimental.context_parallel`` is a
ring for ``aten`` SDPA (flash/efficient/cudnn) and flex-attention only: it cannot run our custom op nor
per-cell ``cu_seqlens``.
"""

from __future__ import annotations

import torch
from torch import nn


class UlyssesVarlen(nn.Module):
    """``core(q, k, v, cu_seqlens, max_seqlen)`` on the whole packed stream, fed by local q/k/v ``[t, H, D]``."""

    def __init__(self, core, group):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.core = core
        # scatter heads (dim 2), gather tokens (dim 0) of [t, 1, H, D]; the output goes the other way.
        self.exchange = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=0)

    def _local(self, q, k, v, cu_seqlens, max_seqlen):
        return self.core(q.squeeze(1), k.squeeze(1), v.squeeze(1), cu_seqlens, max_seqlen).unsqueeze(1)

    # Under run.compile the exchange stays eager between two compiled regions of the block (Dynamo cannot trace
    # DeepSpeed's all-to-all autograd Function; training.compile compiles CP blocks without fullgraph).
    @torch.compiler.disable
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                max_seqlen: int) -> torch.Tensor:
        return self.exchange(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1, None,
                             cu_seqlens, max_seqlen).squeeze(1)


def apply_context_parallel(model: nn.Module, group) -> nn.Module:
    """Make every :class:`training.attention.Attention` of ``model`` attend across ``group`` (in place)."""
    import torch.distributed as dist

    from training.attention import Attention

    P = dist.get_world_size(group)
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            if m.n_heads % P:
                raise ValueError(f"context-parallel degree {P} does not divide n_heads={m.n_heads}")
            m.context_parallel = UlyssesVarlen(m.core, group)
            n += 1
    if n == 0:
        raise ValueError("apply_context_parallel: the model has no training.attention.Attention layer")
    return model
