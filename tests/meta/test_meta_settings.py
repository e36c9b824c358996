"""MetaLearnerClassifier / MetaLearnerRegressor: edge settings and bad modules."""

import numpy as np
import pytest

from skbilevel.meta import MetaLearnerClassifier, MetaLearnerRegressor


def _line(n=40, seed=0):
    X = np.random.RandomState(seed).randn(n, 2)
    return X, X[:, 0]


@pytest.mark.parametrize("Est", [MetaLearnerRegressor, MetaLearnerClassifier])
def test_imaml_with_zero_inner_steps_fits_and_predicts(Est):
    # With no inner step, vmap hands back phi broadcast along the task axis; the
    # Hessian-vector products must not write into that shared memory.
    X, y = _line()
    if Est is MetaLearnerClassifier:
        y = (y > 0).astype(int)
    est = Est("linear", method="imaml", inner_steps=0, k_shot=2, n_query=2,
              meta_batch_size=2, max_iter=2, random_state=0).fit(X, y)
    assert est.n_iter_ == 2
    assert np.isfinite(est.predict(X[:3]).astype(float)).all()


@pytest.mark.parametrize("lam", [0.0, -1.0])
def test_imaml_rejects_non_positive_lam(lam):
    X, y = _line()
    est = MetaLearnerRegressor(method="imaml", method_params={"lam": lam}, max_iter=1)
    with pytest.raises(ValueError, match="lam must be > 0"):
        est.fit(X, y)


@pytest.mark.parametrize("params", [{"alpha": 0.0}, {"alpha": -1.0}, {"scale": 0.0},
                                    {"scale": -2.0}])
def test_r2d2_rejects_non_positive_alpha_and_scale(params):
    X, y = _line()
    name = next(iter(params))
    est = MetaLearnerClassifier(method="r2d2", method_params=params, max_iter=1)
    with pytest.raises(ValueError, match=f"{name} must be > 0"):
        est.fit(X, (y > 0).astype(int))
