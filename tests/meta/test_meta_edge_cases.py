import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from skbilevel.meta import MetaLearnerClassifier, MetaLearnerRegressor
from skbilevel.utils._modules import MLP

_KW = dict(k_shot=2, n_query=2, meta_batch_size=2, max_iter=2, random_state=0)


def _data():
    X = np.random.RandomState(0).randn(60, 3)
    return X, (X[:, 0] > 0).astype(int)


def test_failed_refit_keeps_the_previous_fit_whole():
    # classes_ and n_features_in_ were replaced before the fit failed: the old
    # model then predicted the new labels ('b' for what it fitted as 1), and on
    # a refit with 2 features every predict on the old 3 failed
    X, y = _data()
    meta = MetaLearnerClassifier("linear", **_KW).fit(X, y)
    pred, proba = meta.predict(X), meta.predict_proba(X)
    meta.set_params(module=torch.nn.Linear(5, 2))
    with pytest.raises(ValueError, match="input features"):
        meta.fit(X[:, :2], np.where(y, "b", "a"))
    assert meta.classes_.tolist() == [0, 1] and meta.n_features_in_ == 3
    np.testing.assert_array_equal(meta.predict(X), pred)
    np.testing.assert_array_equal(meta.predict_proba(X), proba)


@pytest.mark.parametrize("Est", [MetaLearnerClassifier, MetaLearnerRegressor])
def test_failed_first_fit_leaves_the_estimator_unfitted(Est):
    # it counted as fitted (classes_ / n_features_in_ were set), and predict
    # failed with AttributeError: no attribute '_fit_state'
    X, y = _data()
    meta = Est(torch.nn.Linear(5, 2), **_KW)
    with pytest.raises(ValueError, match="input features"):
        meta.fit(X, y)
    assert not hasattr(meta, "n_features_in_")
    with pytest.raises(NotFittedError):
        meta.predict(X)


def test_failed_adapted_refit_keeps_its_previous_task():
    # the support set's classes_ were stored before the n_way check failed, so
    # the adapted model labelled its predictions with the rejected classes
    X, y = _data()
    meta = MetaLearnerClassifier("linear", **_KW).fit(X, y)
    task = meta.adapt(X[:4], ["a", "b", "a", "b"])
    pred = task.predict(X)
    with pytest.raises(ValueError, match="2-way"):
        task.fit(X[:6], ["x", "y", "z", "x", "y", "z"])
    assert task.classes_.tolist() == ["a", "b"]
    np.testing.assert_array_equal(task.predict(X), pred)


@pytest.mark.parametrize("module, width", [("linear", 50), ("mlp", 40), (MLP, 50)])
def test_r2d2_linear_backbone_keeps_every_feature(module, width):
    # module='linear' (and the MLP class at its default of no hidden layer) took
    # the 'mlp' default of (40, 40) hidden units for R2D2's feature width: a
    # 50 -> 40 linear bottleneck before the ridge head (digits, 64 features:
    # 4-way 1-shot accuracy 0.68 against 0.73 with all 64)
    rng = np.random.RandomState(0)
    X = rng.randn(40, 50)
    y = np.repeat([0, 1], 20)
    meta = MetaLearnerClassifier(module, method="r2d2", **_KW).fit(X, y)
    assert meta.module_(torch.zeros(1, 50, dtype=torch.float32)).shape == (1, width)


def test_r2d2_adapts_to_more_classes_than_n_way_as_its_predict_does():
    # predict adapted R2D2's ridge head to all 6 training classes of a 2-way
    # fit, but adapt(X, y) on the same data raised 'The support set has 6
    # classes but the meta-learner was trained on 2-way tasks'
    rng = np.random.RandomState(0)
    X = rng.randn(90, 3)
    y = np.repeat(np.arange(6), 15)
    X[:, 0] += y
    meta = MetaLearnerClassifier("linear", method="r2d2", n_way=2, **_KW).fit(X, y)
    task = meta.adapt(X, y)
    np.testing.assert_array_equal(task.predict_proba(X), meta.predict_proba(X))
    maml = MetaLearnerClassifier("linear", n_way=2, **_KW).fit(X, y)
    with pytest.raises(ValueError, match="6 classes but the meta-learner was trained "
                       "on 2-way tasks"):
        maml.adapt(X, y)


def test_meta_training_far_worse_than_a_guess_warns():
    # inner steps that diverge left the fit finite and silent: raw digits at
    # inner_lr=0.5 ended with query losses of 2.2e4 (log 4 = 1.39 for a guess),
    # and new tasks were adapted at chance (0.25)
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    rng = np.random.RandomState(0)
    centers = 3 * rng.randn(6, 8)
    X = 3 * np.concatenate([c + rng.randn(12, 8) for c in centers])
    y = np.repeat(np.arange(6), 12)
    kw = dict(n_way=3, k_shot=2, n_query=2, meta_batch_size=4, max_iter=10, random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"did not learn to adapt: the query loss "
                      r"after adaptation averaged .* times that of a uniform guess over 3 "
                      r"classes \(1.1\). Standardize X; lower inner_lr \(now 0.5\) where "
                      r"the inner steps overshoot, or raise max_iter \(now 10\)"):
        MetaLearnerClassifier(inner_lr=0.5, **kw).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        MetaLearnerClassifier(inner_lr=0.1, **kw).fit(X, y)
        Xs, ys = np.random.RandomState(1).randn(40, 1), np.repeat(np.arange(4), 10)
        MetaLearnerRegressor(**_KW).fit(Xs, np.sin(Xs[:, 0]) + ys, groups=ys)


@pytest.mark.parametrize("Est", [MetaLearnerClassifier, MetaLearnerRegressor])
def test_non_callable_callback_is_a_value_error(Est):
    # the core's TypeError came out of fit, where SampleReweighter and
    # DatasetDistiller raise a ValueError for the same parameter
    X, y = _data()
    with pytest.raises(ValueError, match="callbacks must be callables cb\\(state\\); "
                       "got 1 of type int"):
        Est(callbacks=[1], **_KW).fit(X, y)


def test_skorch_net_as_backbone_is_refused_with_the_way_to_its_module():
    # the message printed the whole net and offered 'a skorch NeuralNet', the
    # very thing it refused; a module name was offered one too
    skorch = pytest.importorskip("skorch")
    X, y = _data()
    net = skorch.NeuralNetClassifier(MLP, module__hidden_layer_sizes=(4,))
    with pytest.raises(ValueError, match=r"module is a skorch NeuralNetClassifier, which "
                       r"this estimator does not take: .*net.module \(a class"):
        MetaLearnerClassifier(net, **_KW).fit(X, y)
    with pytest.raises(ValueError, match=r"not a built-in model; use one of \['linear', "
                       r"'mlp'\], a torch.nn.Module class or instance\.$"):
        MetaLearnerClassifier("cnn", **_KW).fit(X, y)


def test_non_finite_predictions_say_which_samples_and_scale():
    # X far beyond the training data's scale made the outputs overflow, and the
    # message blamed 'very large parameters' found by the adaptation (they were
    # checked finite and small when adapted), without saying which samples
    X, y = _data()
    meta = MetaLearnerClassifier(**_KW).fit(X, y)
    X_new = X[:4].copy()
    X_new[1] = 1.7e308
    with pytest.raises(ValueError, match=r"outputs on 1 of 4 samples are not finite .* "
                       r"reach \|x\| = 1.7e\+308, and the adapted parameters \|w\| = "
                       r"0\.\d+\. Scale X as in fit"):
        meta.predict(X_new)


def _regression_data():
    X = np.random.RandomState(0).randn(60, 3)
    return X, X @ np.array([1.0, 2.0, 3.0])


@pytest.mark.parametrize("Est", [MetaLearnerClassifier, MetaLearnerRegressor])
def test_misspelled_keyword_survives_clone_and_fails_every_fold(Est):
    """A misspelled keyword is a parameter: clone keeps it, every fit rejects it.

    Before the fix it was kept only in a private ``_bad_kwargs`` that
    ``get_params`` did not return: ``Est(max_iters=2).fit`` raised, but
    ``clone`` dropped the typo, so ``cross_val_score`` ran both folds with it
    silently ignored (regressor scores 0.016 and 0.106, no error).
    """
    from sklearn.base import clone
    from sklearn.model_selection import cross_val_score

    X, y = _regression_data() if Est is MetaLearnerRegressor else _data()
    meta = Est(max_iters=2, max_iter=1, k_shot=2, n_query=2, meta_batch_size=2)
    assert meta.get_params()["max_iters"] == 2
    assert clone(meta).get_params()["max_iters"] == 2
    assert "max_iters=2" in repr(meta)
    message = (r"unexpected keyword argument\(s\) \['max_iters'\] \(did you mean "
               r"max_iter\?\); only module__\* keywords")
    with pytest.raises(TypeError, match=message):
        clone(meta).fit(X, y)
    with pytest.raises(TypeError, match=message):
        cross_val_score(meta, X, y, cv=2, error_score="raise")
    with pytest.raises(ValueError, match=r"(?s)All the 2 fits failed.*" + message):
        cross_val_score(meta, X, y, cv=2)
    # a name it was not given is rejected by set_params at once (scikit-learn's
    # message); one it was given can be changed, and fit still rejects it
    with pytest.raises(ValueError, match="Invalid parameter 'max_iters'"):
        Est().set_params(max_iters=3)
    assert meta.set_params(max_iters=3).get_params()["max_iters"] == 3
    # module__* keywords are parameters as before
    meta = Est(module__hidden_layer_sizes=(4,), max_iter=1, k_shot=2, n_query=2,
               meta_batch_size=2, random_state=0)
    fitted = clone(meta).fit(X, y)
    assert fitted.get_params()["module__hidden_layer_sizes"] == (4,)
    assert fitted.meta_params_["layers.0.weight"].shape == (4, 3)
    # kept aside, not as an attribute: a keyword named like a fitted attribute
    # does not make an unfitted estimator look fitted
    with pytest.raises(NotFittedError):
        Est(n_iter_=3).predict(X)


@pytest.mark.parametrize("Est", [MetaLearnerClassifier, MetaLearnerRegressor])
@pytest.mark.parametrize("params, example", [
    ({"inner_lr": 5.0}, "inner_lr=5.0"),
    ({"inner_steps": 3}, "inner_steps=3"),
    ({"inner_steps": 3, "inner_lr": 0.5, "lam": 2.0}, "inner_lr=0.5, inner_steps=3"),
])
def test_method_params_that_the_estimator_sets_itself_are_a_value_error(
        Est, params, example):
    """``inner_lr`` / ``inner_steps`` in ``method_params`` name the parameters to set.

    Before the fix the estimator passed them to the method a second time:
    ``TypeError: skbilevel.hypergrad._meta.get_meta_method() got multiple
    values for keyword argument 'inner_lr'``.
    """
    X, y = _regression_data() if Est is MetaLearnerRegressor else _data()
    meta = Est(method="imaml", method_params=params, **_KW)
    name = Est.__name__
    with pytest.raises(ValueError, match=(
            rf"method_params sets .* which {name} passes to the method itself: set "
            rf"(it|them) on the estimator, e.g. {name}\({example}\), not in method_params")):
        meta.fit(X, y)


_GROUPS = np.repeat(np.arange(6), 10)


@pytest.mark.parametrize("groups, match", [
    (np.array(["a", *_GROUPS[1:]], dtype=object),
     r"a mix of int and str \(sample 0: 'a', sample 1: np.int64\(0\)\)"),
    ([*_GROUPS[:-1].tolist(), None],
     r"groups has no task id \(None\) for 1 sample\(s\), the first at index 59"),
    (np.array([None, *_GROUPS[1:]], dtype=object),
     r"groups has no task id \(None\) for 1 sample\(s\), the first at index 0"),
    (np.where(_GROUPS == 2, np.nan, _GROUPS),
     r"groups has no task id \(NaN\) for 10 sample\(s\), the first at index 20"),
    (np.array([*_GROUPS[:-1], np.nan], dtype=object),
     r"groups has no task id \(NaN\) for 1 sample\(s\), the first at index 59"),
])
def test_groups_of_mixed_types_or_missing_ids_are_a_value_error(groups, match):
    """``groups`` must be task ids of one kind, none of them missing.

    Before the fix they reached ``np.unique``: a string among integers raised
    numpy's ``UFuncTypeError: ufunc 'less' did not contain a loop with
    signature matching types``, a None ``TypeError: '<' not supported
    between instances of 'int' and 'NoneType'``; 10 samples with a NaN id
    were fitted as a task named nan, and one NaN in an object array failed
    with "task nan has 1 sample".
    """
    X, y = _regression_data()
    meta = MetaLearnerRegressor(max_iter=2, k_shot=2, n_query=2)
    with pytest.raises(ValueError, match=match):
        meta.fit(X, y, groups=groups)
    with pytest.raises(ValueError, match=match):
        MetaLearnerClassifier(**_KW).fit(*_data(), groups=groups)


def test_groups_of_one_kind_still_fit():
    """Strings, integers, and integers mixed with floats in an object array."""
    X, y = _regression_data()
    for groups in (_GROUPS.astype(str), np.array(_GROUPS, dtype=object),
                   np.array([*_GROUPS[:10].astype(float), *_GROUPS[10:]], dtype=object)):
        meta = MetaLearnerRegressor(**_KW).fit(X, y, groups=groups)
        assert meta.n_iter_ == 2
