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


def test_rms_of_float32_data_is_computed_in_float64():
    # float32 input compared its max with 1e150, which overflowed to inf in the
    # cast (a RuntimeWarning on every float32 DatasetDistiller fit), and squared
    # values beyond 1.8e19 to inf: the scale of [3e20, -4e20] was inf, that of
    # [3e-30, -4e-30] was 0
    import warnings

    from skbilevel.utils._stats import _rms

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        big = _rms(np.float32([3e20, -4e20]))
        small = _rms(np.float32([3e-30, -4e-30]))
        cols = _rms(np.float32([[1.0, 3e20], [-1.0, -4e20]]), axis=0)
    np.testing.assert_allclose([big, small], [np.sqrt(12.5) * 1e20, np.sqrt(12.5) * 1e-30],
                               rtol=1e-6)
    np.testing.assert_allclose(cols, [1.0, np.sqrt(12.5) * 1e20], rtol=1e-6)
