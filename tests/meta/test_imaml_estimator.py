"""MetaLearner*(method="imaml"): warnings only for a broken regime, with numbers."""

import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from skbilevel.meta import MetaLearnerRegressor


def _data(n=80, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, 5)
    return X, 0.1 * (X @ rng.randn(5) + 0.1 * rng.randn(n))


def test_default_imaml_on_a_small_mlp_fits_without_warnings():
    # A few CG steps and an occasional indefinite I + H/lam are the method, not
    # failures: they go to the record, not to warnings.
    X, y = _data()
    est = MetaLearnerRegressor(method="imaml", max_iter=30, meta_batch_size=8,
                               module__hidden_layer_sizes=(20, 20), random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X, y)
    assert [str(w.message) for w in caught] == []
    info = est.hypergradient_info_
    assert 1 <= info["linear_solve_iterations"] <= 5
    assert info["extra"]["fit_n_tasks"] == 30 * 8
    assert info["extra"]["fit_cg_negative_curvature"] <= 30 * 8 / 2


def test_imaml_warns_once_when_most_systems_are_indefinite():
    # lam far below the loss's negative curvature: the proximal problem is not convex
    X, y = _data()
    est = MetaLearnerRegressor(method="imaml", max_iter=10, meta_batch_size=4,
                               method_params={"lam": 1e-3},
                               module__hidden_layer_sizes=(20, 20), random_state=0)
    match = r"not positive definite in \d+ of 40 tasks"
    with pytest.warns(ConvergenceWarning, match=match):
        est.fit(X, y)
    extra = est.hypergradient_info_["extra"]
    assert extra["fit_cg_negative_curvature"] > 20 and np.isfinite(est.history_).all()


def test_default_imaml_classifier_learns_new_classes_well_above_chance():
    # The cross-entropy's curvature grows as phi trains; 5 steps of inner_lr=0.1 left
    # the proximal problem 59% unsolved and the fit drifted to chance. The iMAML
    # default of 20 inner steps adapts a 4-way task from 5 shots.
    from sklearn.datasets import load_digits

    from skbilevel.meta import MetaLearnerClassifier

    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    train = y < 6
    est = MetaLearnerClassifier(method="imaml", n_way=4, k_shot=5, n_query=5,
                                meta_batch_size=8, max_iter=20, random_state=0)
    est.fit(X[train], y[train])
    assert est._method().inner_steps == 20
    assert MetaLearnerClassifier()._method().inner_steps == 5
    rng = np.random.RandomState(0)
    Xte, yte = X[~train], y[~train]
    scores = []
    for _ in range(5):
        sup, qry = [], []
        for c in (6, 7, 8, 9):
            idx = rng.permutation(np.flatnonzero(yte == c))
            sup.extend(idx[:5])
            qry.extend(idx[5:20])
        scores.append(est.adapt(Xte[sup], yte[sup]).score(Xte[qry], yte[qry]))
    assert np.mean(scores) > 0.65  # chance 0.25; 0.58 with 5 inner steps, 0.52 at lam=5
