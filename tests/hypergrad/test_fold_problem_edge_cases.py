"""Regression tests of a QA pass on the fold problems and closed-form ridge
(``skbilevel.hypergrad._penalized``, ``skbilevel.hypergrad._closed_form``).

Each test fails on the code before its fix; the numbers in the docstrings are
the ones measured there.
"""

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import LogisticFolds, RidgeFolds, RidgeLOO

DT = torch.float64


def _data(n=20, p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = X[:, 0] + 0.5 * torch.randn(n, generator=g, dtype=DT)
    train = torch.ones(2, n, dtype=DT)
    train[0, : n // 2] = 0
    train[1, n // 2 :] = 0
    return X, y, train


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad):
    """A NaN or infinite training or sample weight passed the checks (not
    negative, positive sum): RidgeFolds and RidgeLOO returned a NaN value and
    NaN hypergradients, silently."""
    X, y, train = _data()
    weights = train.clone()
    weights[0, 15] = bad
    with pytest.raises(ValueError, match="train_weights must be finite"):
        RidgeFolds(X, y, weights, 1 - train)
    val = 1 - train
    val[0, 3] = bad
    with pytest.raises(ValueError, match="val_weights must be finite"):
        RidgeFolds(X, y, train, val)
    with pytest.raises(ValueError, match="train_weights must be finite"):
        LogisticFolds(X, (y > 0).long(), 2, weights, 1 - train)
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        RidgeLOO(X, y, sample_weight=weights[0] + 1)
