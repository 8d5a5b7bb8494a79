"""Multi-head self-attention on the packed varlen layout, with a sigmoid or a softmax core.

Tokens of B cells are concatenated: x ``[T, d]`` with ``cu_seqlens`` int32 ``[B+1]``; a token
attends only to tokens of its own cell (bidirectional, no positions: a cell is a set).

* ``sigmoid``: ``out_i = Σ_j sigmoid(q_i·k_j/√D + b)·v_j`` with ``b = −log(n_cell)`` by default,
  computed by ``sigattn.sigmoid_attention_varlen`` (C++ on CPU, Triton on CUDA).
* ``softmax``: ``out_i = Σ_j softmax_j(q_i·k_j/√D)·v_j`` by the best PyTorch kernel for the layout:
  on CUDA ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention on ``cu_seqlens``, no padding
  compute), else padding to ``[B, max_seqlen]`` + ``scaled_dot_product_attention`` with a
  key-padding mask (the same maths; padded query rows are dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cell index, position in cell) of each packed token."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths, output_size=total)
    pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[:-1].long()[seq]
    return seq, pos


def pad_cells(x: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, n_cells: int, max_seqlen: int) -> torch.Tensor:
    """Packed ``[T, H, D]`` (cell ``seq``, position ``pos`` per token) → ``[B, H, L, D]``, zeros past each cell."""
    out = x.new_zeros(n_cells, max_seqlen, *x.shape[1:])
    out[seq, pos] = x
    return out.transpose(1, 2)


def softmax_attention_padded(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Softmax attention per cell via pad → SDPA(key-padding mask) → unpad; q/k/v ``[T, H, D]``."""
    B = cu_seqlens.numel() - 1
    seq, pos = segment_ids(cu_seqlens, q.shape[0])

    def pad(x):
        return pad_cells(x, seq, pos, B, max_seqlen)

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    key_valid = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=key_valid[:, None, None, :])
    return out.transpose(1, 2)[seq, pos]               # [T, H, D]


def softmax_attention_varlen(q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """Softmax attention on the packed layout with the fastest available PyTorch kernel."""
    if q.is_cuda:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        if varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
            return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    return softmax_attention_padded(q, k, v, cu_seqlens, max_seqlen)


class Attention(nn.Module):
    """Fused-QKV multi-head attention over packed cells; ``kind`` picks the sigmoid or softmax core."""

    def __init__(self, d_model: int, n_heads: int, kind: str = "sigmoid", sigmoid_bias="log_n"):
        super().__init__()
        if kind not in ("sigmoid", "softmax"):
            raise ValueError(f"attention kind must be 'sigmoid' or 'softmax', got {kind!r}")
        self.n_heads, self.head_dim, self.kind, self.sigmoid_bias = n_heads, d_model // n_heads, kind, sigmoid_bias
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.context_parallel = None    # set by training.parallel.apply_context_parallel: wraps core()

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv(x).view(T, 3, self.n_heads, self.head_dim)
        if self.context_parallel is None:
            o = self.core(*qkv.unbind(1), cu_seqlens, max_seqlen)
        else:                                                   # one exchange for q, k and v
            o = self.context_parallel(qkv, cu_seqlens, max_seqlen)
        return self.out(o.reshape(T, -1))

    def core(self, q, k, v, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        """Attention of packed q/k/v ``[T, H, D]`` within each cell of ``cu_seqlens`` → ``[T, H, D]``."""
        if self.kind == "sigmoid":
            from sigattn import sigmoid_attention_varlen
            o = sigmoid_attention_varlen(q, k, v, cu_seqlens, max_seqlen, bias=self.sigmoid_bias)
        else:
            o = softmax_attention_varlen(q, k, v, cu_seqlens, max_seqlen)
        return o
