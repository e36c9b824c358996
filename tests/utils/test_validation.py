"""check_splits and check_numeric_target: clear errors for what scikit-learn lets through."""

import numpy as np
import pytest
from sklearn.model_selection import KFold, check_cv

from skbilevel.utils import check_numeric_target, check_splits

X = np.zeros((10, 2))


def test_check_splits_returns_integer_pairs_and_takes_masks():
    splits = check_splits(KFold(5), X)
    assert len(splits) == 5 and all(len(v) == 2 for _, v in splits)
    mask = np.arange(10) < 7
    ((train, val),) = check_splits(check_cv([(mask, ~mask)]), X)
    np.testing.assert_array_equal(train, np.arange(7))
    np.testing.assert_array_equal(val, np.arange(7, 10))
    assert train.dtype == np.intp


@pytest.mark.parametrize(
    "cv, match",
    [
        ([], "produced no split"),
        ([(np.arange(5), np.arange(0))], "empty validation part"),
        ([(np.arange(5), np.arange(5, 11))], r"out of range: \[5, 10\] for n_samples=10"),
        ([(np.arange(-1, 5), np.arange(5, 10))], "training indices out of range"),
        ([(np.arange(5) + 0.5, np.arange(5, 10))], "1-D integer index arrays"),
        ([(np.zeros((2, 2), dtype=int), np.arange(5, 10))], "shape"),
        ([(np.arange(5), np.ones(5, dtype=bool))], "integer index arrays"),  # mask too short
    ],
)
def test_check_splits_rejects_bad_splits(cv, match):
    with pytest.raises(ValueError, match=match):
        check_splits(check_cv(cv), X)


def test_check_numeric_target():
    for y in (np.arange(3), np.array([0.5, 1.0]), np.array([True, False])):
        check_numeric_target(y, "Est")
    with pytest.raises(ValueError, match="Est fits a numeric target; y has dtype <U"):
        check_numeric_target(np.array(["a", "b"]), "Est")
