"""MetaLearnerClassifier / MetaLearnerRegressor: contract, adaptation, bad input."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks

from skbilevel.meta import (
    AdaptedClassifier,
    AdaptedRegressor,
    MetaLearnerClassifier,
    MetaLearnerRegressor,
)

_UNSCALED_REASON = (
    "the check's X is centred at 100 and not scaled; gradient adaptation with "
    "inner_lr=0.01 diverges on it, and fit says so with a ValueError instead of "
    "returning infinite predictions"
)


def _expected_failed_checks(estimator):
    # (check_do_not_raise_errors_in_init_or_set_params passes: the literal name
    # 'kwargs' it gives __init__ is a parameter that set_params can change)
    failed = {}
    if isinstance(estimator, MetaLearnerRegressor) and estimator.method != "r2d2":
        failed.update(dict.fromkeys(
            ["check_fit_idempotent", "check_fit_check_is_fitted",
             "check_n_features_in"],
            _UNSCALED_REASON))
    return failed


# A linear backbone adapted with enough steps fits the checks' simple data sets;
# few meta-iterations keep the checks fast.
@parametrize_with_checks(
    [
        MetaLearnerClassifier("linear", k_shot=1, n_query=1, meta_batch_size=2, max_iter=3,
                              inner_steps=20, inner_lr=0.5, random_state=0),
        MetaLearnerRegressor("linear", k_shot=1, n_query=1, meta_batch_size=2, max_iter=3,
                             inner_steps=60, inner_lr=0.01, random_state=0),
        # closed-form adaptation does not diverge on the unscaled data: every check
        MetaLearnerRegressor("linear", method="r2d2", k_shot=1, n_query=1,
                             meta_batch_size=2, max_iter=3, random_state=0),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _sinusoid_tasks(n_tasks=40, n_per_task=20, seed=0):
    rng = np.random.RandomState(seed)
    amp, phase = rng.uniform(0.1, 5, n_tasks), rng.uniform(0, np.pi, n_tasks)
    X = rng.uniform(-5, 5, (n_tasks, n_per_task, 1))
    y = amp[:, None] * np.sin(X[..., 0] - phase[:, None])
    return X.reshape(-1, 1), y.ravel(), np.repeat(np.arange(n_tasks), n_per_task)


def _blobs(n_classes=5, n_per_class=12, n_features=4, seed=0):
    rng = np.random.RandomState(seed)
    centers = 3 * rng.randn(n_classes, n_features)
    X = np.concatenate([c + rng.randn(n_per_class, n_features) for c in centers])
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "anil", "metasgd", "imaml", "r2d2"])
def test_every_method_meta_trains_on_sinusoids(method):
    X, y, groups = _sinusoid_tasks()
    meta = MetaLearnerRegressor(method=method, k_shot=5, n_query=5, inner_steps=2,
                                meta_batch_size=8, max_iter=40, learning_rate=3e-3,
                                random_state=0, module__hidden_layer_sizes=(16, 16))
    meta.fit(X, y, groups=groups)
    assert meta.n_iter_ == 40 and np.isfinite(meta.history_).all()
    # Meta-training lowers the post-adaptation query loss.
    assert meta.history_[-10:].mean() < meta.history_[:10].mean()
    task = meta.adapt(X[:5], y[:5])
    assert task.predict(X[5:20]).shape == (15,)
    assert meta.hypergradient_info_["strategy"] == method
    if method == "imaml":
        assert meta.hypergradient_info_["linear_solve_iterations"] >= 1
    if method == "metasgd":
        assert any(k.startswith("lr.") for k in meta.meta_params_)
    if method == "r2d2":
        assert "log_alpha" in meta.meta_params_


@pytest.mark.parametrize("method", ["maml", "r2d2"])
def test_episodic_classifier_adapts_to_new_classes(method):
    X, y = _blobs(n_classes=6)
    train = y < 4
    meta = MetaLearnerClassifier(method=method, n_way=2, k_shot=2, n_query=3, inner_lr=0.5,
                                 max_iter=30, random_state=0).fit(X[train], y[train])
    assert meta.n_way_ == 2
    Xn, yn = X[~train], y[~train]
    support = np.r_[0:2, 12:14]
    task = meta.adapt(Xn[support], yn[support])
    assert isinstance(task, AdaptedClassifier)
    np.testing.assert_array_equal(task.classes_, [4, 5])
    proba = task.predict_proba(Xn)
    assert proba.shape == (24, 2) and np.allclose(proba.sum(1), 1)
    assert task.score(Xn, yn) > 0.8
    # String labels of an unseen task.
    task = meta.adapt(Xn[support], np.array(["x", "x", "y", "y"]))
    assert set(task.predict(Xn)) <= {"x", "y"}


def test_predict_is_adaptation_on_the_training_set():
    X, y = _blobs(n_classes=3)
    meta = MetaLearnerClassifier(k_shot=2, n_query=2, max_iter=5, random_state=0).fit(X, y)
    np.testing.assert_allclose(meta.predict_proba(X), meta.adapt(X, y).predict_proba(X))
    Xr, yr, groups = _sinusoid_tasks(n_tasks=5)
    reg = MetaLearnerRegressor(k_shot=5, n_query=5, max_iter=5, random_state=0).fit(Xr, yr, groups=groups)
    np.testing.assert_allclose(reg.predict(Xr), reg.adapt(Xr, yr).predict(Xr))


def test_adapt_leaves_meta_learner_unchanged_and_adapted_clones_stay_fitted():
    X, y = _blobs(n_classes=3)
    meta = MetaLearnerClassifier(k_shot=2, n_query=2, max_iter=5, random_state=0).fit(X, y)
    before = {k: v.clone() for k, v in meta.meta_params_.items()}
    task = meta.adapt(X[::4], y[::4])
    assert all(torch.equal(before[k], meta.meta_params_[k]) for k in before)
    again = clone(task).fit(X[::4], y[::4])  # the frozen meta-learner survives clone
    np.testing.assert_allclose(again.predict_proba(X), task.predict_proba(X))
    assert task.meta_learner.estimator is meta


def test_pickle_round_trip_adapts_after_loading():
    X, y, groups = _sinusoid_tasks(n_tasks=10)
    meta = MetaLearnerRegressor(method="metasgd", k_shot=5, n_query=5, max_iter=10, device="cpu",
                                random_state=0).fit(X, y, groups=groups)
    loaded = pickle.loads(pickle.dumps(meta))
    assert all(v.device.type == "cpu" for v in loaded.meta_params_.values())
    np.testing.assert_allclose(loaded.adapt(X[:5], y[:5]).predict(X), meta.adapt(X[:5], y[:5]).predict(X))
    Xc, yc = _blobs(n_classes=3)
    clf = MetaLearnerClassifier(method="r2d2", k_shot=2, n_query=2, max_iter=5, random_state=0).fit(Xc, yc)
    task = pickle.loads(pickle.dumps(clf.adapt(Xc[::3], yc[::3])))
    np.testing.assert_allclose(task.predict_proba(Xc), clf.adapt(Xc[::3], yc[::3]).predict_proba(Xc))


def test_grouped_classification_uses_global_labels():
    X, y = _blobs(n_classes=3, n_per_class=20)
    groups = np.tile(np.arange(4), 15)
    meta = MetaLearnerClassifier(k_shot=4, n_query=4, max_iter=5, random_state=0)
    meta.fit(X, y, groups=groups)
    task = meta.adapt(X[:10], y[:10])  # support from class 0 only
    np.testing.assert_array_equal(task.classes_, [0, 1, 2])
    with pytest.raises(ValueError, match=r"Support labels \[7\] are not among the classes"):
        meta.adapt(X[:3], [0, 1, 7])


def test_module_params_follow_skorch_convention():
    meta = MetaLearnerRegressor(module__hidden_layer_sizes=(8,), max_iter=2, k_shot=2, n_query=2)
    assert meta.get_params()["module__hidden_layer_sizes"] == (8,)
    assert clone(meta).module__hidden_layer_sizes == (8,)
    meta.set_params(module__hidden_layer_sizes=(3,))
    X, y, groups = _sinusoid_tasks(n_tasks=3)
    meta.fit(X, y, groups=groups)
    assert meta.meta_params_["layers.0.weight"].shape == (3, 1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        MetaLearnerRegressor(hidden=3).fit(X, y)


def test_callbacks_stop_and_see_state():
    seen = []

    def stop_at_3(state):
        seen.append(state.loss)
        return state.iteration >= 3

    X, y = _blobs(n_classes=3)
    meta = MetaLearnerClassifier(k_shot=2, n_query=2, max_iter=50, callbacks=[stop_at_3],
                                 random_state=0).fit(X, y)
    assert meta.n_iter_ == 3 and len(seen) == 3 and len(meta.history_) == 3


def test_fit_is_reproducible_with_random_state():
    X, y, groups = _sinusoid_tasks(n_tasks=6)
    kw = dict(k_shot=5, n_query=5, max_iter=5, random_state=3)
    a = MetaLearnerRegressor(**kw).fit(X, y, groups=groups)
    b = MetaLearnerRegressor(**kw).fit(X, y, groups=groups)
    assert all(torch.equal(a.meta_params_[k], b.meta_params_[k]) for k in a.meta_params_)


# -- bad input ---------------------------------------------------------------


def test_task_with_fewer_samples_than_k_shot_plus_n_query():
    X, y, groups = _sinusoid_tasks(n_tasks=4, n_per_task=10)
    X, y, groups = np.r_[X, X[:3]], np.r_[y, y[:3]], np.r_[groups, [99] * 3]  # task 99: 3 samples
    with pytest.raises(ValueError, match=r"k_shot \+ n_query = 5 \+ 5 = 10 samples per task; task 99 has 3"):
        MetaLearnerRegressor(k_shot=5, n_query=5, max_iter=2).fit(X, y, groups=groups)
    Xc, yc = _blobs(n_classes=3, n_per_class=6)
    with pytest.raises(ValueError, match="per class; class 0 has 6 samples"):
        MetaLearnerClassifier(k_shot=5, n_query=5, max_iter=2).fit(Xc, yc)


def test_fewer_classes_than_n_way():
    X, y = _blobs(n_classes=3)
    with pytest.raises(ValueError, match="n_way=5 but y has only 3 classes"):
        MetaLearnerClassifier(n_way=5, k_shot=2, n_query=2, max_iter=2).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes"):
        MetaLearnerClassifier(k_shot=2, n_query=2).fit(X, np.zeros(len(X)))


def test_support_set_with_more_classes_than_n_way_and_unpredictable_meta():
    X, y = _blobs(n_classes=4)
    meta = MetaLearnerClassifier(n_way=2, k_shot=2, n_query=2, max_iter=3, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="support set has 3 classes .* 2-way tasks"):
        meta.adapt(X[::2], y[::2] % 3)
    with pytest.raises(ValueError, match="meta-trained for 2-way tasks .* 4 classes"):
        meta.predict(X)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_rejected(bad):
    X, y, groups = _sinusoid_tasks(n_tasks=3)
    Xb = X.copy()
    Xb[4, 0] = bad
    with pytest.raises(ValueError, match="Input X contains"):
        MetaLearnerRegressor(k_shot=5, n_query=5).fit(Xb, y, groups=groups)
    yb = y.copy()
    yb[2] = bad
    with pytest.raises(ValueError, match="Input y contains"):
        MetaLearnerRegressor(k_shot=5, n_query=5).fit(X, yb, groups=groups)
    meta = MetaLearnerRegressor(k_shot=5, n_query=5, max_iter=2).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="Input X contains"):
        meta.adapt(Xb[:5], y[:5])
    with pytest.raises(ValueError, match="Input y contains"):
        meta.adapt(X[:5], yb[:5])


def test_bad_groups_and_feature_mismatch():
    X, y, groups = _sinusoid_tasks(n_tasks=3)
    with pytest.raises(ValueError, match="one task id per sample"):
        MetaLearnerRegressor(k_shot=5, n_query=5).fit(X, y, groups=groups[:-1])
    meta = MetaLearnerRegressor(k_shot=5, n_query=5, max_iter=2).fit(X, y, groups=groups)
    with pytest.raises(ValueError, match="features"):
        meta.adapt(np.ones((5, 2)), y[:5])


def test_diverging_adaptation_is_a_clear_error():
    X, y, groups = _sinusoid_tasks(n_tasks=3)
    with pytest.raises(ValueError, match="diverged"), pytest.warns(Warning):
        MetaLearnerRegressor("linear", k_shot=5, n_query=5, inner_lr=1e3, inner_steps=40,
                             max_iter=2).fit(1e3 * X, y, groups=groups)


def test_adapted_estimator_needs_a_fitted_meta_learner():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        AdaptedRegressor(FrozenEstimator(MetaLearnerRegressor())).fit(np.ones((3, 1)), np.ones(3))
    with pytest.raises(ValueError, match="must be a fitted MetaLearnerClassifier"):
        AdaptedClassifier(MetaLearnerRegressor()).fit(np.ones((3, 1)), [0, 1, 0])


def test_zero_step_adaptation_is_the_meta_initialization_held_by_module_():
    X, y, groups = _sinusoid_tasks(n_tasks=6)
    meta = MetaLearnerRegressor(k_shot=5, n_query=5, max_iter=5, random_state=0).fit(X, y, groups=groups)
    for name, value in meta.module_.state_dict().items():
        assert torch.equal(value, meta.meta_params_[name])
    with torch.no_grad():
        init = meta.module_(torch.as_tensor(X[:7], dtype=torch.float32)).numpy().ravel()
    np.testing.assert_allclose(meta.adapt(X[:5], y[:5], inner_steps=0).predict(X[:7]), init, rtol=1e-5)
