import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from skbilevel.reweighting import SampleReweighter, SampleReweighterRegressor


def _data(n=80):
    rng = np.random.RandomState(0)
    X = rng.randn(n, 3)
    trusted = np.zeros(n, bool)
    trusted[:10] = True
    return X, (X[:, 0] > 0).astype(int), trusted


def test_failed_refit_keeps_the_previous_fit_whole():
    # classes_ and n_features_in_ were replaced before the trusted mask was
    # checked: classes_ named the rejected labels beside the old model, and
    # predict on the old 3 features raised
    X, y, trusted = _data()
    clf = SampleReweighter(max_iter=3, random_state=0).fit(X, y, trusted=trusted)
    proba, weights = clf.predict_proba(X), clf.sample_weight_
    with pytest.raises(ValueError, match="Every sample is marked trusted"):
        clf.fit(X[:, :2], np.where(y, "b", "a"), trusted=np.ones(len(y), bool))
    assert clf.classes_.tolist() == [0, 1] and clf.n_features_in_ == 3
    assert clf.sample_weight_ is weights
    np.testing.assert_array_equal(clf.predict_proba(X), proba)


def test_failed_first_fit_leaves_the_estimator_unfitted():
    X, y, _ = _data()
    reg = SampleReweighterRegressor(max_iter=3)
    with pytest.raises(ValueError, match="no True entry"):
        reg.fit(X, X[:, 0], trusted=np.zeros(len(y), bool))
    with pytest.raises(NotFittedError):
        reg.predict(X)


@pytest.mark.parametrize("Est", [SampleReweighter, SampleReweighterRegressor])
def test_zero_sample_weight_on_every_untrusted_sample_is_an_error(Est):
    # the fit ran silently: the weighted inner loss was 0, the weights kept their
    # initial values (0.36-0.40 with the weight net) and the refit used the 10
    # trusted samples alone
    X, y, trusted = _data()
    with pytest.raises(ValueError, match=r"All 70 training \(non-trusted\) samples have "
                       r"zero sample_weight.* positive for 10 of the 80"):
        Est(max_iter=2).fit(X, y, trusted=trusted, sample_weight=trusted.astype(float))
    with pytest.raises(ValueError, match="All 10 trusted samples have zero"):
        Est(max_iter=2).fit(X, y, trusted=trusted, sample_weight=(~trusted).astype(float))


def test_class_without_trusted_samples_warns_with_counts():
    # silent: on 3 blobs (600 samples) with no trusted sample of class 2,
    # per_sample weights of class 2 fell to 0.04 (0.57 for the others; 0.36 when
    # it is trusted too) and the refitted model's recall of class 2 to 0.25
    # (0.72 when trusted)
    import warnings

    from sklearn.datasets import make_blobs

    X, y = make_blobs(90, centers=3, random_state=0)
    labels = np.array(["a", "b", "c"])[y]
    trusted = np.zeros(90, bool)
    trusted[np.flatnonzero(y != 2)[:10]] = True
    with pytest.warns(UserWarning, match=r"Classes \['c'\] have training samples "
                      r"\('c': 30\) but no trusted sample"):
        SampleReweighter(max_iter=2).fit(X, labels, trusted=trusted)
    trusted[np.flatnonzero(y == 2)[0]] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        SampleReweighter(max_iter=2).fit(X, labels, trusted=trusted)
    # a trusted sample of zero sample_weight does not count
    weight = np.where(y == 2, 0.0, 1.0)
    weight[np.flatnonzero((y == 2) & ~trusted)[:5]] = 1.0
    with pytest.warns(UserWarning, match=r"\('c': 5\)"):
        SampleReweighter(max_iter=2).fit(X, labels, trusted=trusted, sample_weight=weight)


@pytest.mark.parametrize("final_estimator", [None, "joint"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_predict_proba_rows_sum_to_one_in_float64(final_estimator, dtype):
    # the softmax ran in the module's dtype: rows summed to 1 within 1.2e-7
    # (float32) or 2e-3 (bfloat16), and sklearn's log_loss warned 'The y_prob
    # values do not sum to one'
    import warnings

    from sklearn.metrics import log_loss

    X, _, trusted = _data(120)
    y = np.random.RandomState(1).randint(0, 3, 120)
    trusted[::6] = True
    clf = SampleReweighter(max_iter=3, random_state=0, final_estimator=final_estimator,
                           dtype=dtype).fit(X, y, trusted=trusted)
    proba = clf.predict_proba(X)
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        log_loss(y, proba)


@pytest.mark.parametrize("final_estimator", [None, "joint"])
def test_zero_weight_targets_do_not_set_the_regression_scale(final_estimator):
    # the targets' scale counted samples of zero sample_weight: 5 of them at 1e6
    # made it 1.5e5 (2.4 without them), the others' standardized targets 1e-5,
    # and the joint model scored R^2 = -353021 (0.86 without those rows); the
    # refitted one 0.9939 (0.9984)
    rng = np.random.RandomState(0)
    X = rng.randn(105, 3)
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.randn(105)
    y[100:] = 1e6
    weight = np.r_[np.ones(100), np.zeros(5)]
    trusted = np.zeros(105, bool)
    trusted[:10] = True
    kw = dict(max_iter=20, random_state=0, final_estimator=final_estimator)
    ref = SampleReweighterRegressor(**kw).fit(X[:100], y[:100], trusted=trusted[:100])
    reg = SampleReweighterRegressor(**kw).fit(X, y, trusted=trusted, sample_weight=weight)
    np.testing.assert_allclose(reg.predict(X[:100]), ref.predict(X[:100]), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("final_estimator", [None, "joint"])
def test_predict_on_inputs_beyond_the_model_dtype_raises(final_estimator):
    # fit refused X beyond float32's range, but predict cast it to inf: NaN
    # probabilities and class 0 for every such row, silently
    X, y, trusted = _data()
    clf = SampleReweighter(max_iter=2, random_state=0, final_estimator=final_estimator)
    clf.fit(X, y, trusted=trusted)
    big = X[:3] * 1e40
    for method in ("predict", "predict_proba", "decision_function"):
        with pytest.raises(ValueError, match="up to .*e\\+40, beyond the range of float32"):
            getattr(clf, method)(big)
    with pytest.raises(ValueError, match="beyond the range of float32"):
        clf.weigh(big, y[:3])
    # a float64 final estimator predicts them
    from sklearn.linear_model import LogisticRegression

    clf.set_params(final_estimator=LogisticRegression()).fit(X, y, trusted=trusted)
    assert clf.predict(big).shape == (3,)


def test_weight_net_label_on_the_regressor_is_an_error():
    # it was silently ignored: the regressor has no labels to feed the network
    X, _, trusted = _data()
    with pytest.raises(ValueError, match="weight_net_label=True .* has no classes"):
        SampleReweighterRegressor(weight_net_label=True, max_iter=2).fit(
            X, X[:, 0], trusted=trusted)


def test_unknown_module_name_still_offers_a_skorch_net():
    X, y, trusted = _data()
    with pytest.raises(ValueError, match="or a skorch NeuralNet"):
        SampleReweighter("cnn", max_iter=2).fit(X, y, trusted=trusted)


def test_batches_of_one_normalized_sample_are_an_error():
    # a batch of one normalized weight is w / w = 1: no gradient reached the
    # weights, and fit returned them at their start (every per_sample weight
    # exactly 0.5 on 80 samples with 30% flipped labels)
    X, y, trusted = _data()
    with pytest.raises(ValueError, match="batch_size=1 with normalize_weights=True"):
        SampleReweighter(method="per_sample", batch_size=1, max_iter=2).fit(
            X, y, trusted=trusted)
    clf = SampleReweighter(method="per_sample", batch_size=1, normalize_weights=False,
                           max_iter=20, random_state=0).fit(X, y, trusted=trusted)
    assert clf.sample_weight_[~trusted].std() > 0


@pytest.mark.parametrize("scale", [1e-30, 1e-40, 1e50, 1e300])
def test_uniform_sample_weights_of_any_scale_fit_as_ones(scale):
    """The weights went to the float32 computation as given: uniform weights of
    1e-30 left the model at its start (the normalizing sum under its floor:
    regressor R^2 7e-6, against 1.0 with weights of 1), 1e-40 (below float32)
    stopped the fit as 'diverged' with probabilities of 0.5, and 1e50
    overflowed ('the inner objective is not finite'). Only their ratios
    count: the fit must be that of unit weights."""
    X, y, _ = _data(40)
    reg_y = X @ np.array([1.0, 2.0, 3.0])
    w = np.full(len(y), scale)
    for Est, target in ((SampleReweighterRegressor, reg_y), (SampleReweighter, y)):
        plain = Est(max_iter=3, random_state=0).fit(X, target)
        scaled = Est(max_iter=3, random_state=0).fit(X, target, sample_weight=w)
        np.testing.assert_allclose(scaled.predict(X), plain.predict(X), rtol=1e-6)
        np.testing.assert_allclose(scaled.sample_weight_, plain.sample_weight_, rtol=1e-6)


@pytest.mark.parametrize(
    "Est, wrong, kind",
    [(SampleReweighter, "Ridge", "regressor"), (SampleReweighterRegressor, "LogisticRegression",
                                                 "classifier")],
)
def test_final_estimator_of_the_other_kind_is_an_error(Est, wrong, kind):
    """A Ridge refitted as SampleReweighter's final estimator made predict
    return its continuous outputs (1.05, 1.47) as labels, and score fail in
    scikit-learn's metrics."""
    import sklearn.linear_model
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, _ = _data(40)
    for final in (getattr(sklearn.linear_model, wrong)(),
                  make_pipeline(StandardScaler(), getattr(sklearn.linear_model, wrong)())):
        with pytest.raises(ValueError, match=f"is a {kind}, and {Est.__name__}"):
            Est(final_estimator=final, max_iter=3, random_state=0).fit(X, y)


def test_refit_far_from_its_fit_warns():
    """On features of 1e16 the final L-BFGS refit (run with its warnings off)
    stopped at 100 iterations with a gradient norm of 3e28 and the model
    scored a training R^2 of -4.7e27, silently."""
    from sklearn.exceptions import ConvergenceWarning

    X, _, _ = _data(40)
    y = X @ np.array([1.0, 2.0, 3.0])
    with pytest.warns(ConvergenceWarning, match=r"Refitting the inner model.*gradient norm.*"
                      r"Scale X"):
        SampleReweighterRegressor(max_iter=3, random_state=0, dtype="float64").fit(X * 1e16, y)


def test_unknown_keyword_ending_in_underscore_is_a_parameter_not_a_fitted_attribute():
    """SampleReweighter(max_iter_=3) stored max_iter_ as an attribute:
    check_is_fitted took the unfitted estimator as fitted, get_params and
    clone dropped it, and fit did not reject it (names ending in "_" were
    skipped)."""
    import sklearn.base
    from sklearn.utils.validation import check_is_fitted

    est = SampleReweighter(max_iter_=3, max_iter=2)
    with pytest.raises(NotFittedError):
        check_is_fitted(est)
    clone = sklearn.base.clone(est)
    assert clone.get_params()["max_iter_"] == 3
    X, y, _ = _data(40)
    with pytest.raises(ValueError, match=r"Unknown parameters \['max_iter_'\] \(did you mean max_iter\?\)"):
        clone.fit(X, y)
    clone.set_params(max_iter_=4)  # given to __init__: settable, still rejected
    assert clone.get_params()["max_iter_"] == 4
