import numpy as np
import pytest
import torch
from sklearn.datasets import load_iris
from sklearn.exceptions import NotFittedError

from skbilevel.distillation import DatasetDistiller


def _iris():
    X, y = load_iris(return_X_y=True)
    return X[::3], y[::3]


@pytest.mark.parametrize("method", ["kip", "unrolled"])
def test_failed_refit_keeps_the_previous_fit(method):
    # the refit cleared classes_ / dual_coef_ / network_params_ before it raised:
    # predict then failed with AttributeError ('network_params_'), or on the
    # regression fit below said the estimator had no classes
    X, y = _iris()
    dd = DatasetDistiller(n_per_class=1, method=method, max_iter=3, random_state=0)
    dd.fit(X, X[:, 0])
    pred, X_small = dd.predict(X), dd.X_distilled_
    with pytest.raises(ValueError, match="only 17 sample"):
        dd.set_params(n_per_class=30).fit(X, y)
    assert not hasattr(dd, "classes_") and dd.X_distilled_ is X_small
    np.testing.assert_array_equal(dd.predict(X), pred)
    assert dd.score(X, X[:, 0]) > -1


def test_failed_first_fit_leaves_the_estimator_unfitted():
    X, y = _iris()
    dd = DatasetDistiller(n_per_class=30, max_iter=3)
    with pytest.raises(ValueError, match="only 17 sample"):
        dd.fit(X, y)
    with pytest.raises(NotFittedError):
        dd.predict(X)


def test_float32_inputs_are_scaled_as_float64_ones():
    # the global scale of float32 X came out inf beyond |X| ~ 1e19 (float32
    # squares overflow) and fell back to 1: iris * 1e20 scored 0.85 against 0.97
    # in float64, with overflow RuntimeWarnings; every float32 fit warned
    # 'overflow encountered in cast'
    import warnings

    X, y = load_iris(return_X_y=True)
    X = X * 1e20
    kw = dict(n_per_class=2, max_iter=20, random_state=0)
    ref = DatasetDistiller(**kw).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dd = DatasetDistiller(**kw).fit(X.astype(np.float32), y)
    np.testing.assert_allclose(dd._x_scale, ref._x_scale, rtol=1e-6)
    assert dd.score(X.astype(np.float32), y) == pytest.approx(ref.score(X, y))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unrolled_predict_proba_is_float64_rows_summing_to_one(dtype):
    # float32 computations gave float32 probabilities whose rows summed to 1
    # within 1.2e-7
    X, y = _iris()
    dd = DatasetDistiller(n_per_class=2, method="unrolled", max_iter=2, dtype=dtype,
                          random_state=0).fit(X, y)
    proba = dd.predict_proba(X)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(dd.predict(X), dd.classes_[proba.argmax(axis=1)])


def test_dtype_takes_a_numpy_dtype():
    # dtype=X.dtype (np.dtype('float32')) failed parameter validation ('must be
    # an instance of str, torch.dtype, type or None'), though np.float32 passed
    # and the meta-learners and SampleReweighter take it
    X, y = _iris()
    X = X.astype(np.float32)
    dd = DatasetDistiller(n_per_class=1, max_iter=2, dtype=X.dtype, random_state=0).fit(X, y)
    ref = DatasetDistiller(n_per_class=1, max_iter=2, dtype="float32", random_state=0).fit(X, y)
    np.testing.assert_array_equal(dd.X_distilled_, ref.X_distilled_)


def test_score_takes_sample_weight():
    # score(X, y) had no sample_weight (TypeError), unlike scikit-learn's
    # classifiers and regressors, so set_score_request could not route one
    from sklearn.metrics import accuracy_score, r2_score

    X, y = _iris()
    w = np.linspace(0.0, 2.0, len(y))
    dd = DatasetDistiller(n_per_class=1, max_iter=2, random_state=0).fit(X, y)
    assert dd.score(X, y, sample_weight=w) == accuracy_score(y, dd.predict(X), sample_weight=w)
    assert hasattr(dd, "set_score_request")
    dd.fit(X, X[:, 0])
    assert dd.score(X, X[:, 0], sample_weight=w) == r2_score(X[:, 0], dd.predict(X),
                                                            sample_weight=w)


def test_whole_number_float_targets_are_regression_with_n_distilled():
    # load_diabetes's targets are floats of whole values, which type_of_target
    # calls 'multiclass': n_distilled=10 raised 'n_distilled is for regression
    # targets; for class labels set n_per_class', so such data could not be
    # distilled as regression at all
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X, y = X[::4], y[::4]
    dd = DatasetDistiller(n_distilled=5, max_iter=5, random_state=0).fit(X, y)
    assert not hasattr(dd, "classes_") and dd.X_distilled_.shape == (5, 10)
    assert dd.predict(X).dtype == np.float64 and dd.score(X, y) > 0
    # the same values shifted off whole numbers fit the same way
    ref = DatasetDistiller(n_distilled=5, max_iter=5, random_state=0).fit(X, y + 0.5)
    np.testing.assert_allclose(dd.predict(X) + 0.5, ref.predict(X), rtol=1e-6)
    # integer labels stay labels; the default n_per_class says what happened
    with pytest.raises(ValueError, match=r"class labels \(\d+ distinct int64 values\)"
                       r".*y.astype\(float\)"):
        DatasetDistiller(n_distilled=5, max_iter=2).fit(X, y.astype(int))
    with pytest.raises(ValueError, match="whole numbers, so they were taken for class "
                       "labels; for a regression target set n_distilled"):
        DatasetDistiller(max_iter=2).fit(X, y)


def test_whole_number_float_multi_targets_are_regression_with_n_distilled():
    # load_linnerud's three targets are floats of whole values:
    # 'multiclass-multioutput', which raised 'Unknown label type' even with
    # n_distilled set
    from sklearn.datasets import load_linnerud

    X, Y = load_linnerud(return_X_y=True)
    dd = DatasetDistiller(n_distilled=3, max_iter=3, random_state=0).fit(X, Y)
    assert dd.predict(X).shape == (20, 3) and dd.y_distilled_.shape == (3, 3)
    with pytest.raises(ValueError, match="whole numbers: set n_distilled"):
        DatasetDistiller(max_iter=2).fit(X, Y)


def test_targets_beyond_int64_range_fit_without_runtime_warning():
    # type_of_target's cast of y to int64 warned 'invalid value encountered in
    # cast' for targets beyond 9.2e18 (regression targets at 1e160)
    import warnings

    X, _ = _iris()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dd = DatasetDistiller(n_distilled=3, max_iter=2, random_state=0)
        dd.fit(X[:, 1:], X[:, 0] * 1e160)
    assert np.isfinite(dd.predict(X[:2, 1:])).all()


def test_fewer_distinct_samples_than_asked_warns_once_per_class_and_clearly():
    # k-means' 'Number of distinct clusters (2) found smaller than n_clusters (3).
    # Possibly due to duplicate points in X.' came out of scikit-learn, pointing
    # at its own base.py and naming no class, though the empty clusters are
    # filled: the distilled set started with copies (2 of 3 rows distinct)
    X = np.repeat(np.random.RandomState(0).randn(4, 2), 5, axis=0)
    y = np.repeat([0, 1], 10)
    for init in ("kmeans", "random"):
        with pytest.warns(UserWarning) as record:
            DatasetDistiller(n_per_class=3, init=init, max_iter=2, random_state=0).fit(X, y)
        messages = [str(w.message) for w in record]
        assert not any("distinct clusters" in m for m in messages)
        assert sum("Class 0 has 2 distinct sample(s), fewer than the 3" in m
                   for m in messages) == 1
        assert sum("Class 1 has 2 distinct" in m for m in messages) == 1


def test_non_finite_outputs_raise_instead_of_predicting_class_0():
    # a row far outside the data (|x| 1e200) made the NTK outputs NaN: predict
    # returned class 0 and predict_proba NaN, silently; the regression twin NaN
    X, y = _iris()
    X_new = X[:3].copy()
    X_new[1] *= 1e200
    dd = DatasetDistiller(n_per_class=1, max_iter=2, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match=r"outputs on 1 of 3 samples are not finite: "
                       r".*up to \d.*e\+200 standard deviations"):
        dd.predict(X_new)
    dd = DatasetDistiller(n_distilled=2, max_iter=2, random_state=0).fit(X[:, 1:], X[:, 0])
    with pytest.raises(ValueError, match="not finite"):
        dd.predict(X_new[:, 1:])
    # the RBF kernel stays finite there (exp(-inf) = 0): it still predicts
    dd = DatasetDistiller(n_per_class=1, kernel="rbf", max_iter=2, random_state=0).fit(X, y)
    assert dd.predict(X_new).shape == (3,)


def _nan_kernel(A, B):
    return (A @ B.T) * float("nan")


def _overflows_far_out(A, B):
    # finite on the first rows of the data, infinite on rows far from its mean
    far = (A**2).sum(1, keepdim=True) > 20
    return torch.exp(-torch.cdist(A, B) ** 2) + torch.where(far, float("inf"), 0.0)


@pytest.mark.parametrize(
    "kernel, init, match",
    [
        (_nan_kernel, "kmeans", r"^kernel <function _nan_kernel .* 6 of 6 Gram .* first rows"),
        (["rbf", _nan_kernel], "kmeans", r"^kernel\[1\] <function _nan_kernel"),
        ("poly", "kmeans", r"^kernel 'poly' with params \{'degree': 1000\}"),
        # non-finite only on the outlier: a synthetic sample starts there (k-means),
        # so the kernel's diagonal and with it the ridge penalty are infinite ...
        (lambda A, B: torch.exp(10 * A @ B.T), "kmeans", r"on the synthetic samples"),
        # ... or the synthetic samples are fine but the outlier in the batch is not
        (_overflows_far_out, "random", r"on the real samples against the synthetic"),
    ],
)
def test_non_finite_kernel_is_named_not_reg(kernel, init, match):
    """A kernel returning NaN or infinity made kernel_ridge_fit blame reg ('reg
    must be a finite number >= 0; got tensor(nan, ...)'; the penalty is reg times
    the kernel's mean diagonal); poly of degree 1000 too. The one infinite only
    between the outlier and the synthetic samples gave a NaN loss at the first
    step: fit stopped after 0 iterations with a ConvergenceWarning ('loss nan ...
    Lower the learning rate or check the data') and returned the initial set."""
    rng = np.random.RandomState(0)
    X = rng.randn(40, 3)
    y = (X[:, 0] > 0).astype(int)
    X[-1] = 40  # an outlier, far from the first rows that are checked up front
    params = {"degree": 1000} if kernel == "poly" else None
    dd = DatasetDistiller(n_per_class=2, max_iter=3, kernel=kernel, kernel_params=params,
                          init=init, random_state=0)
    with pytest.raises(ValueError, match=match) as info:
        dd.fit(X, y)
    assert "reg" not in str(info.value) and "must be finite there" in str(info.value)


def test_duplicate_rows_regression_warns_and_keeps_each_points_mean_target():
    """2 distinct rows x 20 copies, n_distilled=4: no warning (classification warns
    for a class with fewer distinct samples than asked), and k-means split one
    point's 20 copies into 3 clusters (18 + 1 + 1 rows), each with the mean target
    of its own share: predict there gave -0.733 where the 20 targets average
    -0.086. init='random' drew single copies, each with its own target: -0.770
    and -0.172 for means 0.220 and -0.086."""
    rng = np.random.RandomState(0)
    rng.randn(40, 3)
    X = np.repeat(rng.randn(2, 3), 20, axis=0)
    y = rng.randn(40)
    for init in ("kmeans", "random"):
        dd = DatasetDistiller(n_distilled=4, init=init, max_iter=3, random_state=0)
        with pytest.warns(UserWarning, match=r"^X has 2 distinct sample\(s\), fewer than "
                          r"the 4 synthetic samples .* at most 2 \(n_distilled\)") as rec:
            dd.fit(X, y)
        assert all(w.filename == __file__ for w in rec)  # points at the caller of fit
        np.testing.assert_allclose(
            dd.predict(X[[0, 20]]), [y[:20].mean(), y[20:].mean()], atol=1e-5
        )


@pytest.mark.parametrize("method", ["kip", "unrolled"])
def test_cpu_device_index_is_rejected(method):
    """device='cpu:7' was accepted: torch drops the CPU index."""
    X, y = _iris()
    dd = DatasetDistiller(n_per_class=1, method=method, max_iter=2, device="cpu:7")
    with pytest.raises(ValueError, match=r"device='cpu:7': the CPU has no device index"):
        dd.fit(X, y)
    assert not hasattr(dd, "X_distilled_")
