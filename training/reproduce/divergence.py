"""Did a training run diverge, and when did instability start? Read from its per-step records.

Per step t with loss ℓ_t and global gradient norm g_t (``None``/NaN/Inf where non-finite):

- ``first_nonfinite_step``: the first t whose ℓ_t or g_t is not finite (the trainer stops there under
  ``nan_policy=stop``; that step is passed as ``stopped_at``).
- ``first_grad_spike_step``: the first t with g_t > ``spike_factor`` · median(g_{t−w} … g_{t−1})
  (a running median over the previous w = ``window`` finite norms, at least ``min_history`` of them).
- ``diverged``: a non-finite loss or gradient norm, or a final loss (mean over the last 10 % of steps)
  above ``loss_factor`` × the best loss reached (the minimum of the loss's running mean over ``window``
  steps) — the paper's softmax run went from ~3 back to 10+. ``diverged_reason`` says which.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

SPIKE_FACTOR = 100.0
WINDOW = 50
MIN_HISTORY = 10
LOSS_FACTOR = 1.5


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Verdict:
    diverged: bool
    diverged_reason: str | None
    first_nonfinite_step: int | None
    first_grad_spike_step: int | None
    instability_step: int | None       # min of the two above
    steps: int                         # steps run (the last logged or the stopping step)
    max_grad_norm: float | None
    max_attn_logit: float | None
    max_activation: float | None
    first_loss: float | None
    best_loss: float | None
    final_loss: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def first_spike(grad_norms, steps, *, factor: float = SPIKE_FACTOR, window: int = WINDOW,
                min_history: int = MIN_HISTORY) -> int | None:
    """First step whose gradient norm exceeds ``factor`` × the running median of the previous ``window``."""
    history: list[float] = []
    for step, g in zip(steps, grad_norms):
        if not _finite(g):
            continue
        if len(history) >= min_history and g > factor * float(np.median(history[-window:])):
            return int(step)
        history.append(float(g))
    return None


def assess(records: list[dict], *, stopped_at: int | None = None, spike_factor: float = SPIKE_FACTOR,
           window: int = WINDOW, min_history: int = MIN_HISTORY, loss_factor: float = LOSS_FACTOR) -> Verdict:
    """The verdict for one run's records (dicts with ``step``, ``loss``, ``grad_norm``, optionally
    ``max_attn_logit`` and ``max_activation``); ``stopped_at``: the step where a non-finite value stopped it."""
    recs = sorted(records, key=lambda r: r["step"])
    steps = [int(r["step"]) for r in recs]
    nonfinite = [s for s, r in zip(steps, recs)
                 if not _finite(r.get("loss")) or not (r.get("grad_norm") is None or _finite(r.get("grad_norm")))]
    if stopped_at is not None:
        nonfinite.append(int(stopped_at))
        steps.append(int(stopped_at))
    first_nf = min(nonfinite) if nonfinite else None
    spike = first_spike([r.get("grad_norm") for r in recs], steps, factor=spike_factor, window=window,
                        min_history=min_history)

    def fmax(key):
        vals = [float(r[key]) for r in recs if _finite(r.get(key))]
        return max(vals) if vals else None

    finite = pd.Series([float(r["loss"]) for r in recs if _finite(r.get("loss"))], dtype=float)
    first = float(finite.iloc[0]) if len(finite) else None
    best = float(finite.rolling(min(window, len(finite)), min_periods=1).mean().min()) if len(finite) else None
    final = float(finite.tail(max(1, math.ceil(0.1 * len(finite)))).mean()) if len(finite) else None
    reason = None
    if first_nf is not None:
        reason = f"non-finite loss or gradient norm at step {first_nf}"
    elif final is not None and best is not None and final > loss_factor * best:
        reason = f"final loss {final:.3g} > {loss_factor:g} × best {best:.3g}"
    inst = [s for s in (first_nf, spike) if s is not None]
    return Verdict(diverged=reason is not None, diverged_reason=reason, first_nonfinite_step=first_nf,
                   first_grad_spike_step=spike, instability_step=min(inst) if inst else None,
                   steps=max(steps) if steps else 0, max_grad_norm=fmax("grad_norm"),
                   max_attn_logit=fmax("max_attn_logit"), max_activation=fmax("max_activation"),
                   first_loss=first, best_loss=best, final_loss=final)
