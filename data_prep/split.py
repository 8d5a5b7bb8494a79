"""Deterministic train / val / test assignment by dataset, donor or cell.

Groups (datasets, or donors keyed ``dataset/donor`` so equal donor names in two datasets stay
distinct) are put in a seeded random order (``numpy.random.default_rng(seed).permutation`` of the
sorted group names); walking that order, a group goes to ``test`` while test holds fewer than
``test_frac·N`` cells, then to ``val`` while val holds fewer than ``val_frac·N``, else ``train``.
A whole group lands in one split, so no donor (or dataset) leaks across splits.

Fallback to cells: grouping needs at least one group per non-empty split. When there are too few
groups (e.g. one dataset, or a file without a donor column such as PBMC 3k) the split falls back to
a seeded per-cell split, and the manifest records ``effective: "cell"`` with the reason.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "val", "test")
SPLIT_BY = ("dataset", "donor", "cell")


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
            "test_frac": test_frac}
    rng = np.random.default_rng(seed)
    if split_by != "cell":
        if group_names is None:
            names, inverse, sizes = np.unique(np.asarray(groups, dtype=str), return_inverse=True, return_counts=True)
        else:  # codes into sorted names: only the groups that occur, in the same (sorted) order
            used, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
            names = np.asarray(group_names)[used]
        needed = 1 + (val_frac > 0) + (test_frac > 0)
        if len(names) >= needed:
            order = rng.permutation(len(names))
            code_of_group = np.zeros(len(names), dtype=np.int8)
            filled = {1: 0, 2: 0}
            targets = {2: test_frac * n, 1: val_frac * n}
            for g in order:
                for code in (2, 1):
                    if filled[code] < targets[code]:
                        code_of_group[g] = code
                        filled[code] += sizes[g]
                        break
            if (code_of_group == 0).any():
                codes = code_of_group[inverse]
                info["groups"] = {s: sorted(names[code_of_group == c].tolist()) for c, s in enumerate(SPLITS)}
                return codes, _counts(codes, info)
        info["effective"] = "cell"
        info["fallback_reason"] = (f"only {len(names)} {split_by} group(s): too few for separate "
                                   "train/val/test groups, so cells are split at random")
    u = rng.random(n)
    codes = np.where(u < test_frac, 2, np.where(u < test_frac + val_frac, 1, 0)).astype(np.int8)
    return codes, _counts(codes, info)


def _counts(codes: np.ndarray, info: dict) -> dict:
    info["n_cells"] = {s: int((codes == c).sum()) for c, s in enumerate(SPLITS)}
    return info
