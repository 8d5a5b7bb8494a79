"""Bidirectional pre-LN transformer encoder over a cell's genes.

Input per token t: ``h_t = E_gene[input_id_t] + E_value[value_t]`` — the gene identity plus a
learned embedding of its expression bin. Values are binned per cell (scGPT / Tahoe-x1 style, see
``data_prep.tokenize``) rather than fed as continuous counts: bins are invariant to sequencing
depth and to the heavy tail of raw counts, and make the masked objective a well-posed
classification. No positional encoding: a cell is a set of genes.

Blocks (pre-LN): ``x += Attn(LN(x))``; ``x += W₂·GELU(W₁·LN(x))``; then a final LN.

Objective (masked expression modelling): masked genes get value id MASK; the head
``W_o·LN(GELU(W_h·x_t))`` gives logits over the ``n_bins`` expression bins and the loss is
``mean_{t masked} CE(logits_t, bin_t − 1)`` — computed only on masked genes. Bins are ordinal, but
cross-entropy over bins avoids a regression target whose scale changes with the cell's depth.

Cell embedding: the CLS token's final state (``embedding: cls``) or the mean over the cell's gene
tokens (``embedding: mean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.attention import Attention, segment_ids
from training.config import ModelConfig


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention, cfg.sigmoid_bias)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ff1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.ff2 = nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x, cu_seqlens, max_seqlen: int):
        x = x + self.attn(self.ln1(x), cu_seqlens, max_seqlen)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class SingleCellEncoder(nn.Module):
    """Encoder + masked-expression head. ``cfg.n_tokens``/``cfg.n_bins`` come from the tokenizer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.n_tokens is None or cfg.n_bins is None:
            raise ValueError("ModelConfig.n_tokens and n_bins must be set (from the tokenizer) to build the model")
        self.cfg = cfg
        d = cfg.d_model
        # Value ids follow data_prep.tokenize: 0 pad, 1..n_bins bins, n_bins+1 CLS, n_bins+2 MASK.
        self.value_mask_id = cfg.n_bins + 2
        self.gene_emb = nn.Embedding(cfg.n_tokens, d)
        self.value_emb = nn.Embedding(cfg.n_bins + 3, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head_dense = nn.Linear(d, d)
        self.head_ln = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head_out = nn.Linear(d, cfg.n_bins)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.gene_emb.weight.numel() + self.value_emb.weight.numel()
        return n

    def encode(self, input_ids, values, cu_seqlens, max_seqlen: int) -> torch.Tensor:
        """Final hidden states ``[T, d]`` of packed cells."""
        x = self.gene_emb(input_ids) + self.value_emb(values)
        every = int(self.cfg.activation_checkpointing)      # 0: none, 1: every block, k: blocks 0, k, 2k, …
        for i, block in enumerate(self.blocks):
            if every and i % every == 0 and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, cu_seqlens, max_seqlen)
        return self.ln_f(x)

    def forward(self, batch: dict, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-expression loss on the ``masked`` positions → (loss, n_masked: int).

        ``masked``: bool ``[T]``, or the int64 indices of the masked tokens. Indices keep the step free of host
        syncs (a bool mask on a GPU is turned into indices by a sync) and CUDA-graph capturable."""
        idx = masked.nonzero().squeeze(1) if masked.dtype == torch.bool else masked
        values = batch["values"]
        h = self.encode(batch["input_ids"], values.index_fill(0, idx, self.value_mask_id),
                        batch["cu_seqlens"], int(batch["max_seqlen"]))
        logits = self.head_out(self.head_ln(F.gelu(self.head_dense(h.index_select(0, idx)))))
        target = values.index_select(0, idx) - 1
        if "loss_denominator" in batch:   # context parallel: this rank's share Σ_shard CE / M (training.parallel)
            return F.cross_entropy(logits.float(), target, reduction="sum") / batch["loss_denominator"], idx.numel()
        return F.cross_entropy(logits.float(), target), idx.numel()

    @torch.no_grad()
    def embed(self, batch: dict, pooling: str | None = None) -> torch.Tensor:
        """Cell embeddings ``[B, d]``, no masking: the CLS state (``pooling="cls"``) or the mean over the cell's gene
        tokens (``"mean"``); ``None``: the config's ``embedding``."""
        pooling = pooling or self.cfg.embedding
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
        cu = batch["cu_seqlens"]
        h = self.encode(batch["input_ids"], batch["values"], cu, int(batch["max_seqlen"]))
        if pooling == "cls":
            return h[cu[:-1].long()]
        seq, pos = segment_ids(cu, h.shape[0])
        genes = pos > 0
        B = cu.numel() - 1
        sums = h.new_zeros(B, h.shape[1]).index_add_(0, seq[genes], h[genes])
        counts = torch.bincount(seq[genes], minlength=B).clamp(min=1).to(h.dtype)
        return sums / counts[:, None]


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> SingleCellEncoder:
    """Construct the encoder (``device='meta'`` counts parameters without allocating memory)."""
    with torch.device(device or "cpu"):
        return SingleCellEncoder(cfg)
