"""Context-parallel attention over packed cells: Ulysses all-to-all (DeepSpeed's sequence all-to-all).

Rank r of a CP group of P holds tokens ``[r·t, (r+1)·t)`` of the padded packed stream (see
:mod:`training.parallel.sharding`) and their fused projections ``qkv [t, 3, H, D]``. One all-to-all turns "my
tokens, all heads" into "all tokens, my H/P heads" for q, k and v at once (``[P·t, 3, H/P, D]``: the q/k/v axis
rides along as DeepSpeed's batch axis); the *unchanged* varlen attention core (``sigattn.sigmoid_attention_varlen``
or the softmax path) then runs on whole cells with the full ``cu_seqlens``; a second all-to-all brings the output
back to ``[t, H, D]``. Because every head sees every token of every cell:

* no partial outputs need merging: neither the sigmoid sum over key blocks nor softmax's log-sum-exp;
* the sigmoid bias ``b = −log n`` uses each cell's full length by construction;
* cells of any length, including cells shorter than P or spanning shards, need nothing special.

The exchange and its autograd (the backward is the inverse all-to-all) are DeepSpeed's ``_SeqAllToAll``, the
function its ``DistributedAttention`` applies once per q, k and v: on the fused tensor it is one collective
instead of three (same bytes, a third of the launches and latencies; DeepSpeed's own source leaves "merge three
alltoall calls into one" as a TODO). Costs per layer and rank: 2 all-to-alls forward (``3·t·d·(P−1)/P`` and
``t·d·(P−1)/P`` elements), 2 backward. This exchange needs P | ``n_heads``; P ∤ H (uneven heads) and head chunks
overlapping the transfers go through :mod:`training.parallel.ulysses_pipelined`. P > H needs a ring (K/V blocks
passed around with P2P: separate q/k lengths in the varlen op and, for softmax, an LSE merge) — see
docs/context_parallel.md.
``torch.distributed.tensor.experimental.context_parallel`` is a ring for ``aten`` SDPA (flash/efficient/cudnn) and
flex-attention only: it cannot run our custom op nor per-cell ``cu_seqlens``.
"""

from __future__ import annotations

import torch
from torch import nn


class UlyssesVarlen(nn.Module):
    """``core(q, k, v, cu_seqlens, max_seqlen)`` on the whole packed stream, fed by the local ``qkv [t, 3, H, D]``."""

    def __init__(self, core, group):
        super().__init__()
        from deepspeed.sequence.layer import _SeqAllToAll

        self.core, self.group, self._exchange = core, group, _SeqAllToAll.apply

    # Under run.compile the exchange stays eager between two compiled regions of the block (Dynamo cannot trace
    # DeepSpeed's all-to-all autograd Function; training.compile compiles CP blocks without fullgraph).
    @torch.compiler.disable
    def forward(self, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        # [t, 3, H, D], seq-first with q/k/v as the batch axis: scatter heads (2), gather tokens (0)
        x = self._exchange(self.group, qkv, 2, 0, 1)                 # [P·t, 3, H/P, D]
        q, k, v = x.unbind(1)
        o = self.core(q, k, v, cu_seqlens, max_seqlen)               # [P·t, H/P, D]
        return self._exchange(self.group, o.unsqueeze(1), 0, 2, 1).squeeze(1)   # [t, H, D]


def exchange_for(n_heads: int, P: int, chunks: int = 1, exchange: str = "auto") -> str:
    """The all-to-all ``parallel.context_parallel_exchange`` resolves to: "deepspeed" (DeepSpeed's, which needs
    P | n_heads and one chunk; what ``auto`` takes where it applies) or "ours" (:mod:`.ulysses_pipelined`)."""
    if exchange != "auto":
        return exchange
    return "deepspeed" if chunks == 1 and n_heads % P == 0 else "ours"


def apply_context_parallel(model: nn.Module, group, chunks: int = 1, exchange: str = "auto") -> nn.Module:
    """Make every :class:`training.attention.Attention` of ``model`` attend across ``group`` (in place): with
    ``exchange="auto"`` DeepSpeed's exchange when P divides n_heads and ``chunks`` is 1, else ours
    (:mod:`training.parallel.ulysses_pipelined`: ``chunks`` > 1 pipelines it, P ∤ n_heads splits the heads
    unevenly); ``"deepspeed"`` / ``"ours"`` force one (``parallel.context_parallel_exchange``)."""
    import torch.distributed as dist

    from training.attention import Attention
    from training.config import check_heads
    from training.parallel.ulysses_pipelined import UlyssesPipelined

    P = dist.get_world_size(group)
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            check_heads(m.n_heads, P, chunks, exchange)
            ds = exchange_for(m.n_heads, P, chunks, exchange) == "deepspeed"
            m.context_parallel = UlyssesVarlen(m.core, group) if ds else UlyssesPipelined(m.core, group, chunks)
            n += 1
    if n == 0:
        raise ValueError("apply_context_parallel: the model has no training.attention.Attention layer")
    return model
