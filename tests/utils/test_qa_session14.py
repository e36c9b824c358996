import numpy as np
import pytest
from sklearn.base import BaseEstimator

from skbilevel.utils._fit import keep_state_on_error


class _Est(BaseEstimator):
    @keep_state_on_error
    def fit(self, X, fail=False):
        self.n_features_in_ = len(X[0])
        if fail:
            raise KeyboardInterrupt
        self.coef_ = np.ones(self.n_features_in_)
        return self


def test_keep_state_on_error_restores_attributes_on_any_exception():
    est = _Est().fit([[0.0, 1.0]])
    coef = est.coef_
    with pytest.raises(KeyboardInterrupt):
        est.fit([[0.0, 1.0, 2.0]], fail=True)
    assert est.n_features_in_ == 2 and est.coef_ is coef
    fresh = _Est()
    with pytest.raises(KeyboardInterrupt):
        fresh.fit([[0.0]], fail=True)
    assert vars(fresh) == {}
