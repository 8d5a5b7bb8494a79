"""Seed statistics: mean ± 95 % Student-t confidence interval, and the paired difference of two arms.

For values x_1…x_n (one per seed) the interval is ``x̄ ± t_{0.975, n−1} · s / √n`` with s the sample
standard deviation (ddof = 1). The paired difference of arms A and B over the same seeds is the same
interval on d_i = A_i − B_i, which removes the seed-to-seed variation both arms share (data order,
masking and initialisation are seeded identically); its two-sided p-value is the paired t-test's.
With n = 1 the interval is undefined (``None``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci(values, level: float = 0.95) -> dict:
    """``{"mean", "ci_low", "ci_high", "half_width", "sd", "n"}`` of the finite ``values``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "half_width": None, "sd": None, "n": 0}
    mean = float(x.mean())
    if x.size < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "half_width": None, "sd": None, "n": 1}
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * sd / math.sqrt(x.size))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "half_width": half, "sd": sd,
            "n": int(x.size)}


def paired_difference(a: dict, b: dict, level: float = 0.95) -> dict:
    """Mean ± CI of ``a[seed] − b[seed]`` over the seeds both have, plus the paired t-test p-value."""
    seeds = sorted(set(a) & set(b), key=str)
    d = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    out = mean_ci(d, level) | {"seeds": [str(s) for s in seeds]}
    out["p_value"] = (float(stats.ttest_1samp(d, 0.0).pvalue)
                      if len(d) >= 2 and np.std(d) > 0 else None)
    return out


def fmt_ci(s: dict, spec: str = ".3f") -> str:
    """``0.412 ± 0.031`` (or the mean alone for n = 1, ``–`` for no value)."""
    if s.get("mean") is None:
        return "–"
    if s.get("half_width") is None:
        return format(s["mean"], spec)
    return f"{format(s['mean'], spec)} ± {format(s['half_width'], spec.lstrip('+'))}"
