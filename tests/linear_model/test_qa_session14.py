"""QA session 14: regression tests of linear_model defects (one per fix)."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_regression
from sklearn.exceptions import ConvergenceWarning

from skbilevel.linear_model import HyperL2Regressor


def test_float_alpha_init_starts_the_shared_search_with_per_feature_penalties():
    # alpha_init=2.0 with penalty="per_feature" kept 2.0 as it was: the search
    # from it had one evaluation (the bracketing steps count in max_iter), no
    # gamma beat it, and the fit returned alphas_ == 2.0 at a CV loss of 109
    # against 31.4 for the scanned shared penalty
    X, y = make_regression(60, 6, noise=5, random_state=0)
    scanned = HyperL2Regressor(penalty="scalar", random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = HyperL2Regressor(alpha_init=2.0, random_state=0).fit(X, y)
    assert model.shared_alpha_ == pytest.approx(scanned.shared_alpha_, rel=0.05)
    assert model.cv_loss_ <= scanned.cv_loss_ * (1 + 1e-6)
    # cut short by max_iter, it says so
    with pytest.warns(ConvergenceWarning, match="shared penalty's search stopped"):
        HyperL2Regressor(alpha_init=2.0, max_iter=2, random_state=0).fit(X, y)
