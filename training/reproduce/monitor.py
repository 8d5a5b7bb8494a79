"""Per-step stability signals through forward hooks: largest attention logit and largest activation.

Attached to a built model (no change to the encoder): for every attention layer, a forward hook on its
fused QKV projection reads q, k (``[T, H, D]``, packed cells) and takes

    max_attn_logit = max over layers, heads, cells c and i, j ∈ c of  q_i·k_j / √D

(the pre-bias logit, the same quantity for sigmoid and softmax; sigmoid adds b = −log n afterwards).
The cells are gathered to ``[B, max_seqlen]`` on the device (no host read of ``cu_seqlens``) and the scores
are formed block by block of queries under ``no_grad``, so the cost is one extra QKᵀ per layer (in the model's
dtype) and memory stays at ``block_elems`` scores. A forward hook on every block takes ``max_activation`` = max |x| of the
residual stream after the block. Both are kept as device scalars and read once per optimizer step by the
trainer callback (``Trainer(callbacks=[monitor])``), which writes one JSON line per step:
``step, loss, grad_norm, lr, max_attn_logit, max_activation`` to ``stability.jsonl``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from training.attention import Attention
from training.encoder import Block


def max_logit(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
              block_elems: int = 1 << 27) -> torch.Tensor:
    """Largest ``q_i·k_j/√D`` over pairs of tokens of the same cell (0-dim float32 device tensor).

    Each cell is gathered to ``[B, H, L, D]`` with its rows past the end repeating its last token, so every padded
    score duplicates a real one and no mask is needed: a block of scores is one matmul in the input dtype and one
    max (4 bytes of memory traffic per score, not the ~28 of float32 + mask). Empty cells are dropped at the end."""
    T, H, D = q.shape
    if T == 0:
        return torch.full((), -torch.inf, device=q.device, dtype=torch.float32)
    B = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    idx = torch.arange(max_seqlen, device=q.device)
    src = cu_seqlens[:-1].long()[:, None] + torch.minimum(idx[None, :], (lengths - 1).clamp(min=0)[:, None])
    src = src.clamp(0, T - 1)                                          # [B, L] token of each padded slot
    qp, kp = (x[src].transpose(1, 2) for x in (q, k))                  # [B, H, L, D]
    block = max(1, block_elems // max(1, B * H * max_seqlen))
    best = torch.full((B,), -torch.inf, device=q.device, dtype=torch.float32)
    for s0 in range(0, max_seqlen, block):
        s = torch.matmul(qp[:, :, s0:s0 + block], kp.transpose(-1, -2))   # [B, H, b, L]
        best = torch.maximum(best, s.flatten(1).amax(1).float())
    best = torch.where(lengths > 0, best, -torch.inf)
    return best.amax() / math.sqrt(D)


class StabilityMonitor:
    """Hooks on ``model`` + a trainer callback that logs the per-step stability signals to ``path``."""

    def __init__(self, model: torch.nn.Module, path: str | Path | None, *, rank: int = 0):
        self.path = Path(path) if path is not None else None
        self.rank = rank
        self.records: list[dict] = []
        self._logit: torch.Tensor | None = None
        self._act: torch.Tensor | None = None
        self._handles = []
        for m in model.modules():
            if isinstance(m, Attention):
                self._handles.append(m.register_forward_pre_hook(self._remember_cells))
                self._handles.append(m.qkv.register_forward_hook(self._qkv_hook(m)))
            elif isinstance(m, Block):
                self._handles.append(m.register_forward_hook(self._block_hook))
        if not any(isinstance(m, Attention) for m in model.modules()):
            raise ValueError("StabilityMonitor: the model has no training.attention.Attention layer")
        self._cells = None

    def _remember_cells(self, module, args):
        self._cells = (args[1], int(args[2]))                       # cu_seqlens (device), max_seqlen (int)

    def _qkv_hook(self, attn: Attention):
        def hook(module, args, out):
            cu, max_seqlen = self._cells
            with torch.no_grad():
                q, k, _ = out.detach().view(out.shape[0], 3, attn.n_heads, attn.head_dim).unbind(1)
                m = max_logit(q, k, cu, max_seqlen)
                self._logit = m if self._logit is None else torch.maximum(self._logit, m)
        return hook

    def _block_hook(self, module, args, out):
        with torch.no_grad():
            m = out.detach().abs().amax().float()
            self._act = m if self._act is None else torch.maximum(self._act, m)

    def __call__(self, trainer, record: dict) -> None:
        """Trainer callback: one record per optimizer step (the only host read of the signals)."""
        rec = {k: record.get(k) for k in ("step", "loss", "grad_norm", "lr")}
        if self._logit is not None and self._act is not None:
            both = torch.stack([self._logit.float(), self._act.float()])
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)   # over all ranks' cells
            rec["max_attn_logit"], rec["max_activation"] = both.tolist()
        else:
            rec["max_attn_logit"] = rec["max_activation"] = None
        self._logit = self._act = None
        self._write(rec)

    def nonfinite(self, step: int) -> None:
        """Record the step at which the trainer stopped on a non-finite loss or gradient norm."""
        self._logit = self._act = None
        self._write({"step": step, "loss": None, "grad_norm": None, "lr": None, "max_attn_logit": None,
                     "max_activation": None, "nonfinite": True})

    def _write(self, rec: dict) -> None:
        self.records.append(rec)
        if self.path is not None and self.rank == 0:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
