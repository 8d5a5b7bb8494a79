import numpy as np
import pytest

from data_prep.split import assign_splits


def test_groups_never_straddle_and_fractions_roughly_met(rng):
    n_groups = int(rng.integers(20, 60))
    groups = np.array([f"donor{g}" for g in rng.integers(0, n_groups, 5000)])
    codes, info = assign_splits(groups, split_by="donor", val_frac=0.1, test_frac=0.2, seed=1)
    for g in np.unique(groups):
        assert len(np.unique(codes[groups == g])) == 1
    n = info["n_cells"]
    assert n["test"] >= 0.2 * 5000 and n["val"] >= 0.1 * 5000 and n["train"] > 0.5 * 5000
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
    codes, info = assign_splits(np.array(["only"] * 1000), split_by="donor", val_frac=0.1, test_frac=0.1, seed=0)
    assert info["effective"] == "cell" and "1 donor group" in info["fallback_reason"]
    assert 50 < (codes == 1).sum() < 150 and 50 < (codes == 2).sum() < 150


def test_bad_fractions():
    with pytest.raises(ValueError, match="val_frac"):
        assign_splits(np.array(["a"]), split_by="cell", val_frac=0.6, test_frac=0.5, seed=0)
    with pytest.raises(ValueError, match="split_by"):
        assign_splits(np.array(["a"]), split_by="tissue", val_frac=0.1, test_frac=0.1, seed=0)



def test_codes_with_group_names_give_the_same_split_as_names(rng):
    """Integer codes into sorted names (the build's memory-light path) split exactly like per-cell names."""
    names = np.array(sorted({f"ds{rng.integers(3)}/donor{rng.integers(40)}" for _ in range(60)}), dtype=object)
    codes = rng.integers(0, len(names), 5000)
    codes = codes[np.isin(codes, rng.choice(len(names), len(names) - 3, replace=False))]  # some names unused
    seed = int(rng.integers(1000))
    a, ia = assign_splits(names[codes], split_by="donor", val_frac=0.1, test_frac=0.15, seed=seed)
    b, ib = assign_splits(codes, split_by="donor", val_frac=0.1, test_frac=0.15, seed=seed, group_names=names)
    assert np.array_equal(a, b) and ia == ib and set(ia["groups"]["test"]) <= set(names)
