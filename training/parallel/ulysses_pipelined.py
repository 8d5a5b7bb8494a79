"""Ulysses attention of our own: the all-to-alls hidden behind the attention kernel (C head chunks in a
pipeline), and any P ≤ H (an uneven head split where P does not divide H).

The plain exchange (:class:`training.parallel.ulysses.UlyssesVarlen`) runs all-to-all → attention → all-to-all,
each waiting for the last: the transfers sit on the step's critical path (3–26 % of step time on 4 GPUs,
docs/context_parallel.md). Attention is independent per head, so the H heads are cut into C chunks of ``H/C``
heads (C must divide H); chunk c runs its own Ulysses exchange, and the exchanges are issued
asynchronously (``async_op=True``: NCCL runs them on its own stream, ``wait()`` only orders the compute
stream after them — no host sync):

    forward:   send qkv₀ … qkv_{C−1}  │ wait qkv_c → o_c = core(q_c, k_c, v_c) → send o_c │ … │ wait o_*
    backward:  send do₀ … do_{C−1}    │ wait do_c → (dq, dk, dv)_c = ∂core_cᵀ·do_c → send │ … │ wait dqkv_*

so chunk c's attention overlaps chunk c+1's input and chunk c−1's output transfer; only the first input and the
last output transfer stay exposed (≈ 1/C of the plain exchange's). Chunk c's exchange: every rank's tokens
``[t, 3, H/C, D]`` → rank r gets its ``h_r`` heads of the chunk for all ``P·t`` tokens (and the inverse for the
output), so every head still sees whole cells and the result equals the plain exchange's exactly. Bytes sent are
the plain exchange's; the price is C× the collective launches and C smaller attention launches per layer.

**Uneven heads** (:func:`head_split`): with ``h = H/C`` heads per chunk and P ∤ h, the first ``h mod P`` ranks
take ``⌈h/P⌉`` heads, the rest ``⌊h/P⌋`` (``all_to_all_single`` with per-rank split sizes; P ≤ h, so every rank
has a head). It lifts Ulysses' "P divides H" — 160m (12 heads) on one 8-GPU node: CP = 8 with 2 or 1 heads per
rank — at the price of balance: the ranks with ``⌈h/P⌉`` heads set the pace, attention runs at
``h / (P·⌈h/P⌉)`` of the even split's efficiency (12 heads on 8 ranks: 0.75); the rest of the layer is unaffected.
C = 1 is this exchange without the pipeline (what the trainer uses when P ∤ H and no chunks are asked for).

Why our own: DeepSpeed's ``DistributedAttention`` overlaps only its separate q/k/v exchanges with each other
(``sp_stream``), not with the attention kernel, and PyTorch's ``context_parallel`` is a ring for ``aten`` SDPA.
The autograd of one chunk is the core's own (a sub-graph built in forward, differentiated in backward).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from training.config import check_heads


def head_split(h: int, P: int) -> list[int]:
    """Heads per rank when ``h`` heads go over P ranks: the first ``h mod P`` ranks take one more (DeepSpeed's
    uneven-head rule); rank r owns heads ``[Σ_{p<r} h_p, Σ_{p≤r} h_p)``."""
    return [h // P + (r < h % P) for r in range(P)]


def head_balance(h: int, P: int) -> float:
    """Attention's speed under an uneven split relative to an even one, ``h / (P·⌈h/P⌉)``: the ranks with the most
    heads set the pace (1.0 where P divides h; 12 heads on 8 ranks: 0.75)."""
    return h / (P * -(-h // P))


def _scatter_heads(x: torch.Tensor, split: list[int], group):
    """Start the exchange ``x [t, …, h, D]`` (my tokens, all heads) → ``[P·t, …, h_me, D]`` (all tokens, my heads).
    Returns (receive buffer, work, finish) — ``finish(buf)`` shapes the buffer once ``work`` is done."""
    P, me = len(split), dist.get_rank(group)
    t, mid, D = x.shape[0], x.shape[1:-2], x.shape[-1]
    per_head = t * math.prod(mid) * D
    send = x.new_empty(x.numel())                        # rank p's heads, contiguous, in rank order
    if len(set(split)) == 1:                              # even: one copy kernel
        send.view(P, t, *mid, split[0], D).copy_(x.unflatten(-2, (P, split[0])).movedim(-3, 0))
    else:                                                 # uneven: one copy per rank
        off = 0
        for piece in x.split(split, dim=-2):
            send[off:off + piece.numel()].view(piece.shape).copy_(piece)
            off += piece.numel()
    recv = x.new_empty(P * per_head * split[me])
    work = dist.all_to_all_single(recv, send, [per_head * split[me]] * P, [per_head * h for h in split], group=group,
                                  async_op=True)
    return recv, work, lambda buf: buf.view(P * t, *mid, split[me], D)


def _gather_heads(y: torch.Tensor, split: list[int], group):
    """Start the inverse exchange ``y [P·t, …, h_me, D]`` → ``[t, …, h, D]``; (buffer, work, finish) as above."""
    P, me = len(split), dist.get_rank(group)
    t, mid, D = y.shape[0] // P, y.shape[1:-2], y.shape[-1]
    per_head = t * math.prod(mid) * D
    send = y.contiguous().view(-1)                        # rows p·t … (p+1)·t are rank p's tokens
    recv = y.new_empty(per_head * sum(split))
    work = dist.all_to_all_single(recv, send, [per_head * h for h in split], [per_head * split[me]] * P, group=group,
                                  async_op=True)

    def finish(buf):
        parts = buf.split([per_head * h for h in split])
        return torch.cat([p.view(t, *mid, h, D) for p, h in zip(parts, split)], dim=-2)
    return recv, work, finish


def _pipelined_forward(qkv, cu_seqlens, max_seqlen, core, group, chunks: int, keep_graphs: bool):
    """The forward pipeline; with ``keep_graphs`` each chunk's core runs on a leaf copy of its input under grad
    mode and ``(input, output)`` is kept for the backward."""
    P = dist.get_world_size(group)
    parts = qkv.chunk(chunks, dim=2)                                       # C × [t, 3, H/C, D]
    split = head_split(parts[0].shape[2], P)
    inputs = [_scatter_heads(x, split, group) for x in parts]              # all issued before any compute
    graphs, outputs = [], []
    for buf, work, finish in inputs:
        work.wait()
        x = finish(buf)                                                    # [P·t, 3, h_me, D]
        if keep_graphs:
            x = x.detach().requires_grad_()
        with torch.set_grad_enabled(keep_graphs):
            o = core(*x.unbind(1), cu_seqlens, max_seqlen)                 # [P·t, h_me, D]
        graphs.append((x, o))
        outputs.append(_gather_heads(o.detach(), split, group))
    out = []
    for buf, work, finish in outputs:
        work.wait()
        out.append(finish(buf))                                            # [t, H/C, D]
    return torch.cat(out, dim=1), (graphs if keep_graphs else None), split


class _Pipelined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, core, group, chunks):
        out, ctx.graphs, ctx.split = _pipelined_forward(qkv, cu_seqlens, max_seqlen, core, group, chunks, True)
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, grad):
        group, split = ctx.group, ctx.split
        grads = [_scatter_heads(g, split, group) for g in grad.chunk(len(ctx.graphs), dim=1)]
        sends = []
        for (x, o), (buf, work, finish) in zip(ctx.graphs, grads):
            work.wait()
            (dx,) = torch.autograd.grad(o, x, finish(buf))                 # [P·t, 3, h_me, D]
            sends.append(_gather_heads(dx, split, group))
        ctx.graphs = None
        dqkv = []
        for buf, work, finish in sends:
            work.wait()
            dqkv.append(finish(buf))                                       # [t, 3, H/C, D]
        return torch.cat(dqkv, dim=2), None, None, None, None, None


class UlyssesPipelined(nn.Module):
    """``core(q, k, v, cu_seqlens, max_seqlen)`` on the whole packed stream in ``chunks`` head chunks whose
    all-to-alls overlap the other chunks' attention; fed by the local ``qkv [t, 3, H, D]`` → ``[t, H, D]``."""

    def __init__(self, core, group, chunks: int = 1):
        super().__init__()
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.core, self.group, self.chunks = core, group, chunks

    @torch.compiler.disable
    def forward(self, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        check_heads(qkv.shape[2], dist.get_world_size(self.group), self.chunks)
        if not (torch.is_grad_enabled() and qkv.requires_grad):         # evaluation: no sub-graphs kept
            return _pipelined_forward(qkv, cu_seqlens, max_seqlen, self.core, self.group, self.chunks, False)[0]
        return _Pipelined.apply(qkv, cu_seqlens, max_seqlen, self.core, self.group, self.chunks)
