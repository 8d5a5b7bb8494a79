"""Deterministic train / val / test assignment by dataset, donor or cell.

Groups (datasets, or donors keyed ``dataset/donor`` so equal donor names in two datasets stay
distinct) are visited in a seeded random order (``numpy.random.default_rng(seed).permutation`` of
the sorted group names). With targets ``T_test = test_frac·N`` and ``T_val = val_frac·N`` cells, a
group of ``s`` cells goes to the held-out split that lacks most (largest ``(T − filled)/T``; test
first on a tie) provided it brings that split closer to its target, ``|filled + s − T| < |filled − T|``
(else to the other held-out split on the same condition), otherwise to ``train``. So each held-out
split ends with ``0 < filled < 2·T`` cells, a group larger than twice a target (one huge dataset)
never leaves train for it, and train keeps at least ``N·(1 − 2·(val_frac + test_frac))``. A whole
group lands in one split, so no donor (or dataset) leaks across splits.

When no group split exists — fewer groups than non-empty splits (one dataset; a file without a
donor column such as PBMC 3k), or a held-out split that no group fits (every remaining group is more
than twice its target) — cells are split at random instead: the manifest records
``effective: "cell"`` and ``fallback_reason`` with the cause, and a warning says that groups then
straddle the splits.
"""

from __future__ import annotations

import warnings

import numpy as np

SPLITS = ("train", "val", "test")
SPLIT_BY = ("dataset", "donor", "cell")
ALGORITHM = 2   # 2: held-out splits filled near their targets (1: filled in random order, any group size)


class GroupSplitWarning(UserWarning):
    """A dataset/donor split was asked for but is impossible: cells were split at random."""


def assign_splits(groups: np.ndarray, *, split_by: str, val_frac: float, test_frac: float,
                  seed: int, group_names: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Split code per cell (0 train, 1 val, 2 test) and a manifest record.

    ``groups``: one group label (str) per cell; ignored for ``split_by="cell"``. Or, with
    ``group_names`` (sorted, unique), one integer code per cell into them: the same split as the
    names per cell, without a string per cell (a 130M-cell corpus would hold ~10 GB of them).
    """
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"need 0 ≤ val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
    n = len(groups)
    info = {"requested": split_by, "effective": split_by, "seed": seed, "val_frac": val_frac,
            "test_frac": test_frac, "algorithm": ALGORITHM}
    rng = np.random.default_rng(seed)
    if split_by != "cell":
        if group_names is None:
            names, inverse, sizes = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
        else:  # codes into sorted names: only the groups that occur, in the same (sorted) order
            used, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
            names = np.asarray(group_names)[used]
        needed = 1 + (val_frac > 0) + (test_frac > 0)
        if len(names) < needed:
            problem = (f"only {len(names)} {split_by} group(s) for {needed} non-empty splits")
        else:
            code_of_group, problem = _group_split(sizes, rng.permutation(len(names)), n, val_frac, test_frac, split_by)
        if problem is None:
            codes = code_of_group[inverse]
            info["groups"] = {s: sorted(names[code_of_group == c].tolist()) for c, s in enumerate(SPLITS)}
            return codes, _counts(codes, info)
        info["effective"] = "cell"
        info["fallback_reason"] = (f"no {split_by}-level split: {problem}; cells are split at random instead, "
                                   f"so {split_by}s straddle train/val/test")
        warnings.warn(info["fallback_reason"], GroupSplitWarning, stacklevel=2)
    u = rng.random(n)
    codes = np.where(u < test_frac, 2, np.where(u < test_frac + val_frac, 1, 0)).astype(np.int8)
    return codes, _counts(codes, info)


def _group_split(sizes: np.ndarray, order: np.ndarray, n: int, val_frac: float, test_frac: float,
                 split_by: str) -> tuple[np.ndarray, str | None]:
    """Split code per group (see the module docstring), and None or the reason no group split exists."""
    target = {2: test_frac * n, 1: val_frac * n}
    filled = {2: 0, 1: 0}
    held_out = [c for c in (2, 1) if target[c] > 0]
    code_of_group = np.zeros(len(sizes), dtype=np.int8)
    for g in order:
        s = int(sizes[g])
        for c in sorted(held_out, key=lambda c: filled[c] / target[c]):      # stable: test first on a tie
            if abs(filled[c] + s - target[c]) < abs(filled[c] - target[c]):
                code_of_group[g] = c
                filled[c] += s
                break
    for c in held_out:
        if filled[c] == 0:
            left = sizes[code_of_group == 0]
            return code_of_group, (f"no {split_by} fits {SPLITS[c]} (target {target[c]:,.0f} cells = "
                                   f"{(test_frac, val_frac)[2 - c]:g} of {n:,}; a group may hold at most twice that, "
                                   f"the smallest one left holds {int(left.min()) if len(left) else 0:,})")
    if not (code_of_group == 0).any():
        return code_of_group, "every group went to val or test (fractions too large for the group sizes)"
    return code_of_group, None


def _counts(codes: np.ndarray, info: dict) -> dict:
    info["n_cells"] = {s: int((codes == c).sum()) for c, s in enumerate(SPLITS)}
    return info
