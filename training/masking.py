"""Masked-expression objective: which genes are hidden, reproducibly.

Per cell with n genes (the CLS token is never masked), exactly ``k = max(1, round(ratio·n))``
genes are masked, chosen uniformly without replacement. The draw uses a generator seeded from
``(seed, step, rank)`` only — not from global RNG state — so a resumed run masks the same genes
at the same step. Masked genes keep their gene token and lose their value (value id → MASK); the
model predicts the expression bin (see :mod:`training.encoder`).
"""

from __future__ import annotations

import numpy as np
import torch


def mask_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, step, rank)."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def choose_masked(cu_seqlens: torch.Tensor, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Bool ``[T]``: True at masked gene positions (never at a cell's first, CLS, position)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must lie in (0, 1), got {ratio}")
    cu = cu_seqlens.cpu().tolist()
    masked = torch.zeros(cu[-1], dtype=torch.bool)
    for start, end in zip(cu[:-1], cu[1:]):
        n_genes = end - start - 1
        if n_genes <= 0:
            continue
        k = max(1, round(ratio * n_genes))
        masked[start + 1 + torch.randperm(n_genes, generator=generator)[:k]] = True
    return masked
