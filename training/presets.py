"""Model size presets.

Parameters of the encoder (see :mod:`training.encoder`), with vocabulary size V, value tokens
V_val, width d, FFN width f, L layers and n_bins output classes::

    N = V·d + V_val·d                      (gene + value embeddings)
      + L·(4·d² + 4·d + 2·d·f + f + d + 4·d)  (q,k,v,o with biases; FFN; two LayerNorms)
      + 2·d + d² + d + 2·d + d·n_bins + n_bins   (final LN; head: dense + LN + projection)

With f = 4d the per-layer term is ≈ 12·d². Named sizes are counted with a nominal corpus
vocabulary of ``NOMINAL_VOCAB`` genes (the size of a human Ensembl gene vocabulary as used by
CELLxGENE-scale corpora); the ``tiny`` preset is sized for a CPU demo, not for its name.
"""

from __future__ import annotations

NOMINAL_VOCAB = 60_000

PRESETS: dict[str, dict] = {
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, d_ff=512),
    "160m": dict(n_layers=16, d_model=768, n_heads=12, d_ff=3072),
    "400m": dict(n_layers=28, d_model=1024, n_heads=16, d_ff=4096),
    "600m": dict(n_layers=26, d_model=1280, n_heads=20, d_ff=5120),
    "1.4b": dict(n_layers=26, d_model=2048, n_heads=16, d_ff=8192),
}

# Nominal size of each preset in parameters (None: not sized by name).
NOMINAL_PARAMS = {"tiny": None, "160m": 160e6, "400m": 400e6, "600m": 600e6, "1.4b": 1.4e9}


def preset(name: str) -> dict:
    """Architecture fields of a named preset (a copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
