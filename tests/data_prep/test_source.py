import numpy as np
import pytest

from data_prep.source import COUNT_TOL, as_counts, count_problem


@pytest.mark.parametrize("values, expect", [
    (np.array([1.0, 2.0, 3.0], np.float32), [1, 2, 3]),
    (np.array([-0.0, 7.0]), [0, 7]),
    (np.array([1 + COUNT_TOL / 2, 2 - COUNT_TOL / 2]), [1, 2]),  # within tolerance: rounded
    (np.array([1, 2**31 - 1], np.int64), [1, 2**31 - 1]),
    (np.array([3, 4], np.uint16), [3, 4]),
    (np.zeros(0, np.float32), []),
])
def test_as_counts_accepts_and_converts(values, expect):
    out, problem = as_counts(values)
    assert problem is None and out.dtype == np.int32 and out.tolist() == expect


@pytest.mark.parametrize("values, msg", [
    (np.array([1.0, np.nan]), "NaN"),
    (np.array([1.0, np.inf]), "infinite"),
    (np.array([1.0, -2.0]), "negative"),
    (np.array([-1, 2], np.int32), "negative"),
    (np.array([1.5]), "non-integer"),
    (np.array([3e9]), "int32 range"),
    (np.array([2**40], np.int64), "int32 range"),
])
def test_as_counts_refuses_with_reason(values, msg):
    out, problem = as_counts(values)
    assert out is None and msg in problem


def test_as_counts_agrees_with_count_problem_on_random_values(rng):
    """The fast path must accept exactly what count_problem accepts, and round the same way."""
    for _ in range(50):
        v = rng.integers(0, 1000, 200).astype(np.float64)
        kind = rng.integers(0, 4)
        if kind == 1:
            v[rng.integers(200)] += rng.uniform(-2 * COUNT_TOL, 2 * COUNT_TOL)
        elif kind == 2:
            v[rng.integers(200)] = -rng.uniform(0.5, 5)
        elif kind == 3:
            v[rng.integers(200)] = np.nan
        out, problem = as_counts(v)
        assert (problem is None) == (count_problem(v) is None)
        if problem is None:
            assert np.array_equal(out, np.rint(v).astype(np.int32))
