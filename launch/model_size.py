"""Model shape and parameter counts of a training preset, from a meta-device build of the real encoder.

``n_tokens`` of the embedding table comes from ``CellTokenizer`` over a vocabulary of
``training.presets.NOMINAL_VOCAB`` genes (what a CELLxGENE-scale corpus uses), so the counts match
what the trainer would build for that corpus; no memory is allocated (``device="meta"``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSize:
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    n_params: int            # all parameters (embeddings included): what ZeRO stores
    n_params_nonemb: int     # what the 6·N matmul term counts
    batch_size: int          # preset micro-batch (cells per GPU) at the preset's context
    context: int             # preset context length
    zero_stage: int
    activation_checkpointing: bool | int
    n_params_head: int = 0   # the masked-expression head's (part of n_params_nonemb; runs on masked tokens only)
    mask_ratio: float = 0.15  # the preset's run.mask_ratio


def model_size(name: str, vocab: int | None = None, overrides: tuple[str, ...] | list[str] = ()) -> ModelSize:
    """Shape and counts of ``training/configs/<name>.yaml`` (its model preset, after dotted ``overrides``) with a
    ``vocab``-gene table."""
    import torch  # noqa: F401 (meta device)

    from data_prep.tokenize import CellTokenizer
    from launch.configs import resolve_config
    from training.config import load_config
    from training.encoder import build_model
    from training.metrics import head_params
    from training.presets import NOMINAL_VOCAB

    cfg = load_config(resolve_config(name), list(overrides))
    tok = CellTokenizer(vocab or NOMINAL_VOCAB, cfg.data.context_length, cfg.data.n_bins, cfg.run.seed)
    mcfg = dataclasses.replace(cfg.model, n_tokens=tok.n_tokens, n_bins=cfg.data.n_bins)
    model = build_model(mcfg, device="meta")
    return ModelSize(name=Path(name).stem if name.endswith((".yaml", ".yml")) else name, n_layers=mcfg.n_layers, d_model=mcfg.d_model, n_heads=mcfg.n_heads,
                     d_ff=mcfg.d_ff, n_params=model.num_params(), n_params_nonemb=model.num_params(non_embedding=True),
                     batch_size=cfg.data.batch_size, context=cfg.data.context_length, zero_stage=cfg.run.zero_stage,
                     activation_checkpointing=mcfg.activation_checkpointing, n_params_head=head_params(model),
                     mask_ratio=cfg.run.mask_ratio)


def flops_per_cell(m: ModelSize, tokens_per_cell: float) -> float:
    """Training FLOPs of one cell of ``s`` tokens: ``(6·(N − N_head) + 6·N_head·r + 12·L·d·s)·s`` with r the
    masked fraction of its tokens, ``round(mask_ratio·(s − 1))/s`` (``training.metrics.flops_per_token``,
    ``training.masking``)."""
    from training.metrics import flops_per_token

    r = max(1, round(m.mask_ratio * (tokens_per_cell - 1))) / tokens_per_cell
    return flops_per_token(m.n_params_nonemb, m.n_layers, m.d_model, tokens_per_cell, m.n_params_head, r) * tokens_per_cell
