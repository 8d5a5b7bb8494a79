"""Recipes that reproduce the sigmoid-attention paper's three claims with sigattn (issue 17).

``python -m training.reproduce stability|quality|speed [--scale demo|gpu|cluster] --out DIR``

- :mod:`~training.reproduce.stability` — same model, data, seed and hyper-parameters, only the attention
  changed, no gradient clipping, over a learning-rate ladder; per arm: diverged or not, first non-finite /
  gradient-norm-spike step, largest gradient norm, attention logit and activation.
- :mod:`~training.reproduce.quality` — ≥ 5 seeds per attention on real datasets: masked validation loss over
  fixed masking patterns and scIB bio-conservation on held-out cells, mean ± 95 % CI, paired difference.
- :mod:`~training.reproduce.speed` — sigmoid vs softmax training tokens/s per context, and the projected
  GPU-hours of the paper's table.

Each writes ``DIR/summary.json``, PNG plots and ``DIR/report.md``.
"""
