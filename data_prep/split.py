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
    All cells at once; :class:`SplitPlan` gives the same codes block by block.
    """
    groups = np.asarray(groups)
    sizes = None
    if split_by != "cell":
        if group_names is None:
            group_names, groups = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        sizes = np.bincount(groups.ravel(), minlength=len(group_names))
    plan = SplitPlan(len(groups), sizes, group_names, split_by=split_by, val_frac=val_frac, test_frac=test_frac,
                     seed=seed, stacklevel=3)
    codes = plan.codes(groups)
    return codes, plan.info()


class SplitPlan:
    """The split of ``n`` cells, decided from group sizes alone; codes handed out block by block.

    ``group_sizes``: cells per group code (codes into the sorted, unique ``group_names``; zero-size
    groups are ignored), None for ``split_by="cell"``. :meth:`codes` of consecutive blocks of cells
    (group codes per cell, in corpus order) equals :func:`assign_splits` of all cells at once: the
    random per-cell split (``split_by="cell"`` or the fallback) draws the same stream block by block.
    So a build holds one dataset's codes at a time, not one per corpus cell.
    """

    def __init__(self, n: int, group_sizes: np.ndarray | None, group_names: np.ndarray | None, *, split_by: str,
                 val_frac: float, test_frac: float, seed: int, stacklevel: int = 2):
        if split_by not in SPLIT_BY:
            raise ValueError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
        if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
            raise ValueError(f"need 0 ≤ val_frac, test_frac and val_frac + test_frac < 1, got {val_frac}, {test_frac}")
        self.n, self.val_frac, self.test_frac = n, val_frac, test_frac
        self._info = {"requested": split_by, "effective": split_by, "seed": seed, "val_frac": val_frac,
                      "test_frac": test_frac, "algorithm": ALGORITHM}
        self._rng = np.random.default_rng(seed)
        self._code_of_group = None  # per group code (all of group_names); None: random per cell
        self._n_cells = np.zeros(len(SPLITS), np.int64)
        if split_by == "cell":
            return
        sizes = np.asarray(group_sizes)
        used = np.flatnonzero(sizes > 0)
        names, sizes = np.asarray(group_names)[used], sizes[used]
        needed = 1 + (val_frac > 0) + (test_frac > 0)
        if len(names) < needed:
            problem = (f"only {len(names)} {split_by} group(s) for {needed} non-empty splits")
        else:
            code_of_group, problem = _group_split(sizes, self._rng.permutation(len(names)), n, val_frac, test_frac,
                                                  split_by)
        if problem is None:
            self._code_of_group = np.zeros(len(group_names), np.int8)
            self._code_of_group[used] = code_of_group
            self._info["groups"] = {s: sorted(names[code_of_group == c].tolist()) for c, s in enumerate(SPLITS)}
            return
        self._info["effective"] = "cell"
        self._info["fallback_reason"] = (f"no {split_by}-level split: {problem}; cells are split at random instead, "
                                         f"so {split_by}s straddle train/val/test")
        warnings.warn(self._info["fallback_reason"], GroupSplitWarning, stacklevel=stacklevel)

    def codes(self, groups: np.ndarray) -> np.ndarray:
        """int8 split codes of the next block of cells (``groups``: their group codes; only the length
        counts for a per-cell split)."""
        if self._code_of_group is not None:
            codes = self._code_of_group[np.asarray(groups)]
        else:
            u = self._rng.random(len(groups))
            codes = np.where(u < self.test_frac, 2, np.where(u < self.test_frac + self.val_frac, 1, 0)).astype(np.int8)
        self._n_cells += np.bincount(codes.ravel(), minlength=len(SPLITS))
        return codes

    def info(self) -> dict:
        """The manifest record, with cells per split of the blocks handed out so far."""
        return {**self._info, "n_cells": {s: int(self._n_cells[c]) for c, s in enumerate(SPLITS)}}


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
