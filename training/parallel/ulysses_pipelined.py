"""Ulysses attention with the all-to-alls hidden behind the attention kernel: C head chunks in a pipeline.

The plain exchange (:class:`training.parallel.ulysses.UlyssesVarlen`) runs all-to-all → attention → all-to-all,
each waiting for the last: the transfers sit on the step's critical path (3–26 % of step time on 4 GPUs,
docs/context_parallel.md). Attention is independent per head, so the H heads are cut into C chunks of ``H/C``
heads (``P·C`` must divide ``H``); chunk c runs its own Ulysses exchange, and the exchanges are issued
asynchronously (``async_op=True``: NCCL runs them on its own stream, ``wait()`` only orders the compute
stream after them — no host sync):

    forward:   send qkv₀ … qkv_{C−1}  │ wait qkv_c → o_c = core(q_c, k_c, v_c) → send o_c │ … │ wait o_*
    backward:  send do₀ … do_{C−1}    │ wait do_c → (dq, dk, dv)_c = ∂core_cᵀ·do_c → send │ … │ wait dqkv_*

so chunk c's attention overlaps chunk c+1's input and chunk c−1's output transfer; only the first input and the
last output transfer stay exposed (≈ 1/C of the plain exchange's). Chunk c's exchange: rank p's tokens
``[t, 3, H/C, D]`` → heads ``[c·H/C + r·H/(C·P), … + H/(C·P))`` of all ``P·t`` tokens on rank r (and the
inverse for the output), so every head still sees whole cells and the result equals the plain exchange's
exactly. Bytes sent are the plain exchange's; the price is C× the collective launches and C smaller attention
launches per layer.

Why our own: DeepSpeed's ``DistributedAttention`` overlaps only its separate q/k/v exchanges with each other
(``sp_stream``), not with the attention kernel, and PyTorch's ``context_parallel`` is a ring for ``aten`` SDPA.
The autograd of one chunk is the core's own (a sub-graph built in forward, differentiated in backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _heads_to_tokens(x: torch.Tensor, P: int) -> torch.Tensor:
    """Send buffer ``[P, t, …, h/P, D]`` of ``x [t, …, h, D]``: part p holds the heads rank p will own."""
    *lead, h, D = x.shape
    x = x.reshape(*lead, P, h // P, D)
    return x.movedim(-3, 0).contiguous()


def _tokens_to_heads(buf: torch.Tensor) -> torch.Tensor:
    """Received ``[P, t, …, h/P, D]`` (part p = rank p's tokens) → ``[P·t, …, h/P, D]`` in token order."""
    return buf.reshape(-1, *buf.shape[2:])


def _send(buf: torch.Tensor, group):
    out = torch.empty_like(buf)
    return out, dist.all_to_all_single(out, buf, group=group, async_op=True)


def _back_to_heads(buf: torch.Tensor, P: int) -> torch.Tensor:
    """Received ``[P, t, …, h/P, D]`` (part p = my tokens' heads from rank p) → ``[t, …, P·h/P, D]``."""
    return buf.movedim(0, -3).flatten(-3, -2)


def _pipelined_forward(qkv, cu_seqlens, max_seqlen, core, group, chunks: int, keep_graphs: bool):
    """The forward pipeline; with ``keep_graphs`` each chunk's core runs on a leaf copy of its input under grad
    mode and ``(input, output)`` is kept for the backward."""
    P = dist.get_world_size(group)
    t = qkv.shape[0]
    inputs = [_send(_heads_to_tokens(x, P), group) for x in qkv.chunk(chunks, dim=2)]   # all issued first
    graphs, outputs = [], []
    for buf, work in inputs:
        work.wait()
        x = _tokens_to_heads(buf)                                           # [P·t, 3, H/(C·P), D]
        if keep_graphs:
            x = x.detach().requires_grad_()
        with torch.set_grad_enabled(keep_graphs):
            o = core(*x.unbind(1), cu_seqlens, max_seqlen)                  # [P·t, H/(C·P), D]
        graphs.append((x, o))
        outputs.append(_send(o.detach().reshape(P, t, *o.shape[1:]), group))
    out = []
    for buf, work in outputs:
        work.wait()
        out.append(_back_to_heads(buf, P))                                 # [t, H/C, D]
    return torch.cat(out, dim=1), (graphs if keep_graphs else None)


class _Pipelined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, core, group, chunks):
        out, ctx.graphs = _pipelined_forward(qkv, cu_seqlens, max_seqlen, core, group, chunks, keep_graphs=True)
        ctx.group, ctx.P, ctx.t = group, dist.get_world_size(group), qkv.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        P, t, group = ctx.P, ctx.t, ctx.group
        grads = [_send(_heads_to_tokens(g, P), group) for g in grad.chunk(len(ctx.graphs), dim=1)]
        sends = []
        for (x, o), (buf, work) in zip(ctx.graphs, grads):
            work.wait()
            (dx,) = torch.autograd.grad(o, x, _tokens_to_heads(buf))       # [P·t, 3, H/(C·P), D]
            sends.append(_send(dx.reshape(P, t, *dx.shape[1:]), group))
        ctx.graphs = None
        dqkv = []
        for buf, work in sends:
            work.wait()
            dqkv.append(_back_to_heads(buf, P))                            # [t, 3, H/C, D]
        return torch.cat(dqkv, dim=2), None, None, None, None, None


class UlyssesPipelined(nn.Module):
    """``core(q, k, v, cu_seqlens, max_seqlen)`` on the whole packed stream in ``chunks`` head chunks whose
    all-to-alls overlap the other chunks' attention; fed by the local ``qkv [t, 3, H, D]`` → ``[t, H, D]``."""

    def __init__(self, core, group, chunks: int):
        super().__init__()
        if chunks < 2:
            raise ValueError(f"UlyssesPipelined needs chunks >= 2, got {chunks} (chunks=1 is UlyssesVarlen)")
        self.core, self.group, self.chunks = core, group, chunks

    @torch.compiler.disable
    def forward(self, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        P, H = dist.get_world_size(self.group), qkv.shape[2]
        if H % (P * self.chunks):
            raise ValueError(f"context-parallel degree {P} × {self.chunks} chunks does not divide n_heads={H}")
        if not (torch.is_grad_enabled() and qkv.requires_grad):         # evaluation: no sub-graphs kept
            return _pipelined_forward(qkv, cu_seqlens, max_seqlen, self.core, self.group, self.chunks, False)[0]
        return _Pipelined.apply(qkv, cu_seqlens, max_seqlen, self.core, self.group, self.chunks)
