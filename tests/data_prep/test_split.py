import warnings

import numpy as np
import pytest

from data_prep.split import GroupSplitWarning, SplitPlan, assign_splits


def _groups(sizes: dict[str, int], rng) -> np.ndarray:
    g = np.concatenate([np.full(n, name, dtype=object) for name, n in sizes.items()])
    return g[rng.permutation(len(g))]


def test_groups_never_straddle_and_fractions_roughly_met(rng):
    n_groups = int(rng.integers(20, 60))
    groups = np.array([f"donor{g}" for g in rng.integers(0, n_groups, 5000)])
    codes, info = assign_splits(groups, split_by="donor", val_frac=0.1, test_frac=0.2, seed=1)
    for g in np.unique(groups):
        assert len(np.unique(codes[groups == g])) == 1
    n = info["n_cells"]
    largest = np.unique(groups, return_counts=True)[1].max()
    assert abs(n["test"] - 0.2 * 5000) <= largest and abs(n["val"] - 0.1 * 5000) <= largest
    assert sorted(sum(info["groups"].values(), [])) == sorted(np.unique(groups).tolist())


def test_deterministic_in_seed_and_order_free(rng):
    groups = np.array([f"g{g}" for g in rng.integers(0, 30, 2000)])
    a, _ = assign_splits(groups, split_by="dataset", val_frac=0.1, test_frac=0.1, seed=4)
    b, _ = assign_splits(groups, split_by="dataset", val_frac=0.1, test_frac=0.1, seed=4)
    c, _ = assign_splits(groups, split_by="dataset", val_frac=0.1, test_frac=0.1, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    perm = rng.permutation(len(groups))  # the group → split map does not depend on cell order
    d, _ = assign_splits(groups[perm], split_by="dataset", val_frac=0.1, test_frac=0.1, seed=4)
    assert np.array_equal(d, a[perm])


def test_fallback_to_cells_is_explicit():
    with pytest.warns(GroupSplitWarning, match="1 donor group.*donors straddle"):
        codes, info = assign_splits(np.array(["only"] * 1000), split_by="donor", val_frac=0.1, test_frac=0.1, seed=0)
    assert info["effective"] == "cell" and "1 donor group" in info["fallback_reason"]
    assert 50 < (codes == 1).sum() < 150 and 50 < (codes == 2).sum() < 150


def test_bad_fractions():
    with pytest.raises(ValueError, match="val_frac"):
        assign_splits(np.array(["a"]), split_by="cell", val_frac=0.6, test_frac=0.5, seed=0)
    with pytest.raises(ValueError, match="split_by"):
        assign_splits(np.array(["a"]), split_by="tissue", val_frac=0.1, test_frac=0.1, seed=0)



@pytest.mark.parametrize("seed", range(8))
def test_one_large_dataset_stays_in_train_and_held_out_splits_meet_their_targets(rng, seed):
    """Issue 20.2: 100K + 20×1K cells, 5 % each for val and test (the old split gave e.g. train 9,000 /
    val 105,000 / test 6,000 in 4 of 8 seeds)."""
    sizes = {"big": 100_000} | {f"small{i:02d}": 1_000 for i in range(20)}
    codes, info = assign_splits(_groups(sizes, rng), split_by="dataset", val_frac=0.05, test_frac=0.05, seed=seed)
    n = info["n_cells"]
    assert info["effective"] == "dataset" and "big" in info["groups"]["train"]
    assert abs(n["val"] - 6_000) <= 1_000 and abs(n["test"] - 6_000) <= 1_000, n
    assert n["train"] == 120_000 - n["val"] - n["test"] >= 106_000


@pytest.mark.parametrize("seed", range(8))
def test_few_small_groups_still_give_a_group_split(rng, seed):
    """Issue 20.2: 100K + 3×2K used to send every group to val/test and fall back to a per-cell split silently."""
    sizes = {"big": 100_000, "a": 2_000, "b": 2_000, "c": 2_000}
    codes, info = assign_splits(_groups(sizes, rng), split_by="dataset", val_frac=0.05, test_frac=0.05, seed=seed)
    assert info["effective"] == "dataset" and info["groups"]["train"] == ["big"]
    assert sorted([info["n_cells"]["val"], info["n_cells"]["test"]]) == [2_000, 4_000]


def test_impossible_group_split_says_why(rng):
    sizes = {"big": 100_000, "mid": 20_000, "a": 2_000}       # 5 % targets: a fits test, nothing fits val
    with pytest.warns(GroupSplitWarning, match=r"no dataset-level split: no dataset fits val \(target 6,100 cells"
                                               r".*smallest one left holds 20,000.*datasets straddle"):
        codes, info = assign_splits(_groups(sizes, rng), split_by="dataset", val_frac=0.05, test_frac=0.05, seed=0)
    assert info["effective"] == "cell" and "no dataset fits val" in info["fallback_reason"]
    assert abs(info["n_cells"]["val"] - 6_100) < 500 and abs(info["n_cells"]["test"] - 6_100) < 500


def test_random_groups_land_near_targets_or_fall_back_loudly(rng):
    for _ in range(100):
        sizes = {f"g{i}": int(s) + 1 for i, s in enumerate(rng.lognormal(3.5, 1.5, int(rng.integers(2, 40))))}
        val, test = (float(x) for x in rng.uniform(0, 0.3, 2))
        groups = _groups(sizes, rng)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            codes, info = assign_splits(groups, split_by="donor", val_frac=val, test_frac=test, seed=int(rng.integers(99)))
        n, total = info["n_cells"], len(groups)
        if info["effective"] == "cell":
            assert len(caught) == 1 and issubclass(caught[0].category, GroupSplitWarning)
            continue
        assert not caught
        for name, frac in (("val", val), ("test", test)):
            assert 0 < n[name] < 2 * frac * total
        assert n["train"] >= total * (1 - 2 * (val + test))
        assert len(np.unique(np.stack([groups.astype(str), codes.astype(str)]), axis=1)[0]) == len(sizes)  # no straddling


def test_codes_with_group_names_give_the_same_split_as_names(rng):
    """Integer codes into sorted names (the build's memory-light path) split exactly like per-cell names."""
    names = np.array(sorted({f"ds{rng.integers(3)}/donor{rng.integers(40)}" for _ in range(60)}), dtype=object)
    codes = rng.integers(0, len(names), 5000)
    codes = codes[np.isin(codes, rng.choice(len(names), len(names) - 3, replace=False))]  # some names unused
    seed = int(rng.integers(1000))
    a, ia = assign_splits(names[codes], split_by="donor", val_frac=0.1, test_frac=0.15, seed=seed)
    b, ib = assign_splits(codes, split_by="donor", val_frac=0.1, test_frac=0.15, seed=seed, group_names=names)
    assert np.array_equal(a, b) and ia == ib and set(ia["groups"]["test"]) <= set(names)


@pytest.mark.parametrize("case", ["donor", "cell", "fallback"])
def test_plan_in_blocks_equals_all_at_once(rng, case):
    """SplitPlan handing out codes block by block (the build: one dataset at a time) gives assign_splits' split
    of all cells at once, also when cells are split at random (the uniforms are drawn in blocks)."""
    n_groups = 2 if case == "fallback" else int(rng.integers(20, 60))  # 2 groups, 3 splits: random fallback
    names = np.array([f"ds{i % 3}/donor{i}" for i in range(n_groups)], dtype=object)
    order = np.argsort(names)
    names = names[order]
    codes = rng.integers(0, n_groups, int(rng.integers(3000, 9000)))
    split_by, seed = ("cell" if case == "cell" else "donor"), int(rng.integers(1000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GroupSplitWarning)
        a, ia = assign_splits(codes, split_by=split_by, val_frac=0.1, test_frac=0.15, seed=seed, group_names=names)
        plan = SplitPlan(len(codes), np.bincount(codes, minlength=n_groups), names, split_by=split_by,
                         val_frac=0.1, test_frac=0.15, seed=seed)
    cuts = np.sort(rng.integers(0, len(codes), int(rng.integers(1, 7))))
    b = np.concatenate([plan.codes(block) for block in np.split(codes, cuts)])
    assert np.array_equal(a, b) and plan.info() == ia
    assert ia["effective"] == ("cell" if case != "donor" else "donor") and sum(ia["n_cells"].values()) == len(codes)
