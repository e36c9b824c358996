"""HyperL2Regressor / HyperL2Classifier: contract, references, bad input."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
from sklearn.model_selection import KFold
from sklearn.utils.estimator_checks import parametrize_with_checks

from skbilevel.hypergrad import LBFGS, ImplicitCG
from skbilevel.linear_model import HyperL2Classifier, HyperL2Regressor
from skbilevel.utils._datasets import make_relevance_tiers


# small instances keep the ~60 checks fast: 3 folds, 2 outer steps, no scan
@parametrize_with_checks(
    [
        HyperL2Regressor(max_iter=2, cv=3, alpha_init=1.0),
        HyperL2Classifier(max_iter=2, cv=3, alpha_init=1.0),
    ],
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


def _hetero(n=300, p=12, seed=0):
    rng = np.random.RandomState(seed)
    w = np.zeros(p)
    w[:3] = [3.0, -2.0, 2.5]
    w[3:6] = 0.2
    X = rng.randn(n, p)
    y = X @ w + 0.5 * rng.randn(n) + 1.0
    return X, y


def test_regressor_noise_features_get_larger_penalties():
    # (18 noise features: with 6, n = 300 fits them so well that penalizing them
    # gains less than the folds' noise, and the shared penalty is kept)
    X, y = _hetero(p=24)
    model = HyperL2Regressor(random_state=0, prior_scale=None).fit(X, y)
    assert model.alphas_.shape == (24,)
    assert model.alphas_[6:].min() > model.alphas_[:3].max()
    assert model.coef_.shape == (24,) and np.isfinite(model.intercept_)
    assert model.n_iter_ == len(model.history_) - 1 or model.n_iter_ > 0
    assert model.cv_loss_ > 0
    assert model.hypergradient_info_["strategy"] == "closed_form"
    # the final model is the per-feature ridge at alphas_ on all the data
    s = 1.0 / np.sqrt(model.alphas_)
    ref = Ridge(alpha=1.0).fit(X * s, y)
    np.testing.assert_allclose(model.coef_, ref.coef_ * s, rtol=1e-8)
    np.testing.assert_allclose(model.intercept_, ref.intercept_, rtol=1e-8)


@pytest.mark.parametrize("hypergradient", ["cg", "dense"])
def test_regressor_strategies_agree_with_closed_form(hypergradient):
    X, y = _hetero(n=120, p=5)
    kw = dict(random_state=0, max_iter=8, prior_scale=None)
    ref = HyperL2Regressor(**kw).fit(X, y)
    other = HyperL2Regressor(hypergradient=hypergradient, **kw).fit(X, y)
    # L-BFGS's line search amplifies rounding-level differences along directions
    # where the CV loss is flat (penalties far below the data scale): compare the loss
    np.testing.assert_allclose(other.cv_loss_, ref.cv_loss_, rtol=1e-9)
    assert other.hypergradient_info_["strategy"] == hypergradient
    # a fixed-step optimizer follows the same path to rounding
    kw["outer_optimizer"] = "adam"
    ref = HyperL2Regressor(**kw).fit(X, y)
    other = HyperL2Regressor(hypergradient=hypergradient, **kw).fit(X, y)
    np.testing.assert_allclose(other.alphas_, ref.alphas_, rtol=1e-6)


def test_scalar_regressor_matches_ridge_cv_on_same_split():
    X, y = _hetero(n=150, p=8, seed=1)
    cv = KFold(5)
    model = HyperL2Regressor(penalty="scalar", cv=cv).fit(X, y)
    assert np.ptp(model.alphas_) == 0
    grid = np.exp(
        np.linspace(np.log(model.alphas_[0]) - 0.3, np.log(model.alphas_[0]) + 0.3, 61)
    )
    ref = RidgeCV(alphas=grid, cv=cv, scoring="neg_mean_squared_error").fit(X, y)
    np.testing.assert_allclose(model.alphas_[0], ref.alpha_, rtol=0.02)
    np.testing.assert_allclose(model.cv_loss_, -ref.best_score_, rtol=1e-6)
    try:
        from skbilevel.linear_model import BilevelRidgeCV
    except ImportError:  # pragma: no cover - sibling estimator not available
        return
    other = BilevelRidgeCV(cv=cv, tol=1e-6).fit(X, y)
    np.testing.assert_allclose(model.alphas_[0], other.alpha_, rtol=2e-3)
    np.testing.assert_allclose(model.coef_, other.coef_, rtol=1e-3, atol=1e-6)


def test_scalar_loo_matches_ridge_cv():
    X, y = _hetero(n=80, p=6, seed=2)
    model = HyperL2Regressor(penalty="scalar", cv="loo").fit(X, y)
    grid = np.exp(
        np.linspace(np.log(model.alphas_[0]) - 0.3, np.log(model.alphas_[0]) + 0.3, 61)
    )
    ref = RidgeCV(alphas=grid).fit(X, y)
    np.testing.assert_allclose(model.alphas_[0], ref.alpha_, rtol=0.02)
    np.testing.assert_allclose(model.cv_loss_, -ref.best_score_, rtol=1e-6)


def test_loo_wide_and_groups():
    rng = np.random.RandomState(0)
    X = rng.randn(30, 50)
    y = X[:, :3].sum(1) + 0.1 * rng.randn(30)
    groups = np.repeat(np.arange(5), 10)
    model = HyperL2Regressor(penalty=groups, cv="loo", max_iter=10).fit(X, y)
    for g in range(5):
        assert np.ptp(model.alphas_[groups == g]) == 0
    assert model.alphas_[0] < model.alphas_[-1]


def test_regressor_holdout_njobs_warm_start_float32():
    X, y = _hetero(n=120, p=20)
    a = HyperL2Regressor(random_state=0, max_iter=5).fit(X, y)
    b = HyperL2Regressor(random_state=0, max_iter=5, n_jobs=2).fit(X, y)
    np.testing.assert_allclose(a.alphas_, b.alphas_, rtol=1e-8)
    h = HyperL2Regressor(validation_fraction=0.3, random_state=0, max_iter=5).fit(X, y)
    assert h.alphas_.shape == (20,)
    w = HyperL2Regressor(random_state=0, max_iter=5, warm_start=True).fit(X, y)
    first = w.alphas_.copy()
    w.set_params(max_iter=1).fit(X, y)
    # no shared stage on a warm start: the descent's one iteration at most (none
    # here: from the previous answer it could not gain tol)
    assert w.n_iter_ <= 1
    assert np.abs(np.log(w.alphas_ / first)).max() < 0.5
    f = HyperL2Regressor(random_state=0, max_iter=5, dtype="float32").fit(X, y)
    assert f.score(X, y) > 0.9


def test_regressor_alpha_init_array_and_float():
    X, y = _hetero(n=100, p=4)
    m = HyperL2Regressor(alpha_init=np.full(4, 2.0), max_iter=0).fit(X, y)
    np.testing.assert_allclose(m.alphas_, 2.0)
    m = HyperL2Regressor(alpha_init=3.0, penalty="scalar", random_state=0).fit(X, y)
    assert m.alphas_[0] > 0


def test_classifier_binary_matches_logistic_regression_at_its_alphas():
    X, y = make_classification(200, 6, n_informative=3, random_state=0)
    clf = HyperL2Classifier(max_iter=10, random_state=0).fit(X, y)
    assert clf.coef_.shape == (1, 6) and clf.intercept_.shape == (1,)
    s = 1.0 / np.sqrt(clf.alphas_)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(X * s, y)
    np.testing.assert_allclose(clf.coef_, ref.coef_ * s, rtol=1e-4, atol=1e-6)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba, ref.predict_proba(X * s), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(clf.predict(X), proba.argmax(1))
    assert clf.hypergradient_info_["strategy"] == "cg"


@pytest.mark.parametrize("fmt", ["csr", "coo"])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_classifier_sparse_input_fits_the_dense_model(n_classes, fmt):
    import scipy.sparse as sp

    X, y = make_classification(
        150, 8, n_informative=4, n_classes=n_classes, n_clusters_per_class=1, random_state=0
    )
    X[np.random.RandomState(0).rand(*X.shape) < 0.6] = 0.0
    kw = dict(max_iter=5, random_state=0, solver=LBFGS(tol=1e-10, max_iter=1000))
    dense = HyperL2Classifier(**kw).fit(X, y)
    sparse = HyperL2Classifier(**kw).fit(sp.csr_matrix(X).asformat(fmt), y)
    np.testing.assert_allclose(sparse.alphas_, dense.alphas_, rtol=1e-5)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        sparse.predict_proba(sp.csr_matrix(X)), dense.predict_proba(X), rtol=1e-6, atol=1e-9
    )
    if fmt == "csr" and n_classes == 3:  # float32 too
        kw32 = dict(max_iter=5, random_state=0, dtype="float32")
        a = HyperL2Classifier(**kw32).fit(X, y)
        b = HyperL2Classifier(**kw32).fit(sp.csr_matrix(X), y)
        np.testing.assert_allclose(b.predict_proba(X), a.predict_proba(X), atol=2e-3)


def test_classifier_never_densifies_wide_sparse_data(monkeypatch):
    # 5000 features (beyond the dense Hessian blocks): every product with X is a
    # sparse one; a dense copy of X anywhere raises
    import scipy.sparse as sp

    rng = np.random.RandomState(0)
    X = sp.random(300, 5000, density=0.01, random_state=0, format="csr")
    w = np.zeros(5000)
    w[:40] = 4.0 * rng.randn(40)
    y = (X @ w + 0.1 * rng.randn(300) > 0).astype(int)

    def refuse(*args, **kwargs):
        raise AssertionError("X was densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)
    clf = HyperL2Classifier(max_iter=3, random_state=0).fit(X, y)
    assert clf.coef_.shape == (1, 5000) and np.isfinite(clf.coef_).all()
    assert clf.score(X, y) > 0.9


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo"])
@pytest.mark.parametrize("shape", [(120, 10), (60, 150)])
def test_regressor_sparse_input_fits_the_dense_model(shape, fmt):
    # (60, 150): the Woodbury form, and the sparse pilots of the adaptive stage
    import scipy.sparse as sp

    rng = np.random.RandomState(0)
    n, p = shape
    X = rng.randn(n, p) + rng.uniform(-1.0, 1.0, p)
    X[rng.rand(*X.shape) < 0.6] = 0.0
    y = X[:, :3] @ np.array([2.0, -1.0, 0.5]) + 0.3 * rng.randn(n) + 1.0
    sw = rng.uniform(0.5, 2.0, n)
    dense = HyperL2Regressor(random_state=0).fit(X, y, sample_weight=sw)
    sparse = HyperL2Regressor(random_state=0).fit(sp.csr_matrix(X).asformat(fmt), y, sample_weight=sw)
    np.testing.assert_allclose(sparse.alphas_, dense.alphas_, rtol=1e-6)
    np.testing.assert_allclose(sparse.coef_, dense.coef_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(sparse.intercept_, dense.intercept_, rtol=1e-8)
    # (a prediction near 0 agrees to rounding of the O(1) terms it sums)
    np.testing.assert_allclose(
        sparse.predict(sp.csr_matrix(X)), dense.predict(X), rtol=1e-8, atol=1e-8
    )


def test_regressor_never_densifies_one_hot_data(monkeypatch):
    # one-hot encoded categories (OneHotEncoder's sparse output) with a penalty
    # per original column: every product with X is a sparse one (a dense copy
    # of X anywhere raises)
    import scipy.sparse as sp
    from sklearn.preprocessing import OneHotEncoder

    rng = np.random.RandomState(0)
    cats = rng.randint(0, 40, size=(3000, 5))
    enc = OneHotEncoder().fit(cats)
    X = enc.transform(cats)
    effects = [rng.randn(40) * s for s in (2.0, 1.0, 0.3, 0.0, 0.0)]
    y = sum(e[cats[:, j]] for j, e in enumerate(effects)) + 0.5 * rng.randn(3000)
    groups = np.repeat(np.arange(5), [len(c) for c in enc.categories_])

    def refuse(*args, **kwargs):
        raise AssertionError("X was densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)
    reg = HyperL2Regressor(penalty=groups, random_state=0).fit(X, y)
    monkeypatch.undo()
    assert reg.score(X, y) > 0.8
    # the two pure-noise columns are penalized far more than the strong one
    assert reg.alphas_[groups == 3].min() > 10 * reg.alphas_[groups == 0].max()


def test_regressor_never_densifies_wide_sparse_data(monkeypatch):
    # a term-document-like matrix, p >> n: the Woodbury form's kernels come
    # from sparse products (a dense copy of X anywhere raises)
    import scipy.sparse as sp

    rng = np.random.RandomState(0)
    X = sp.random(200, 5000, density=0.01, random_state=0, format="csr")
    w = np.zeros(5000)
    w[np.unique(X.indices)[:30]] = 3.0 * rng.randn(30)
    y = X @ w + 0.1 * rng.randn(200)

    def refuse(*args, **kwargs):
        raise AssertionError("X was densified")

    monkeypatch.setattr(sp.csr_matrix, "toarray", refuse)
    monkeypatch.setattr(torch.Tensor, "to_dense", refuse)
    reg = HyperL2Regressor(max_iter=5, random_state=0).fit(X, y)
    monkeypatch.undo()
    assert reg.coef_.shape == (5000,) and np.isfinite(reg.coef_).all()
    assert reg.score(X, y) > 0.5


def _separable(n=120, seed=0):
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 2
    X = rng.randn(n, 3)
    X[:, 0] += np.where(y == 1, 3.0, -3.0)
    return (X - X.mean(0)) / X.std(0), y, rng


def test_classifier_shared_search_stops_at_the_grid_on_separable_data():
    # the folds' validation log-loss keeps falling as the penalty vanishes: the
    # search stops at the grid's low end, 1e-4 times the (standardized) feature
    # scale n, instead of following the diverging fit below it
    # (where the search, bounded there, once divided by an infinite bracket end:
    # a numpy RuntimeWarning)
    X, y, _ = _separable()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        clf = HyperL2Classifier(penalty="scalar", random_state=0).fit(X, y)
    assert clf.shared_alpha_ >= 1e-4 * len(y) * (1 - 1e-9)


def test_classifier_shared_search_goes_below_the_grid_for_small_scale_features():
    # the informative feature in units 100 times smaller than the others: its
    # penalty lies below the grid (relative to the mean scale), and the search
    # goes there, no further than 1e-4 times the smallest feature scale
    X, _, rng = _separable()
    X = X * np.array([1e-2, 1.0, 1.0])
    y = (X[:, 0] * 1e2 + 1.5 * rng.randn(len(X)) > 0).astype(int)
    scales = ((X - X.mean(0)) ** 2).sum(0)
    clf = HyperL2Classifier(penalty="scalar", random_state=0).fit(X, y)
    assert 1e-4 * scales.min() * (1 - 1e-9) <= clf.shared_alpha_ < 1e-4 * scales.mean()


def test_classifier_cg_and_dense_agree():
    X, y = make_classification(120, 4, n_informative=3, n_redundant=0, random_state=1)
    kw = dict(max_iter=4, random_state=0, solver=LBFGS(tol=1e-11, max_iter=1000))
    a = HyperL2Classifier(hypergradient=ImplicitCG(tol=1e-10), **kw).fit(X, y)
    b = HyperL2Classifier(hypergradient="dense", **kw).fit(X, y)
    np.testing.assert_allclose(a.alphas_, b.alphas_, rtol=1e-6)


def test_multinomial_digits_ten_classes():
    X, y = load_digits(return_X_y=True)
    X = X[:500] / 16.0
    y = y[:500]
    clf = HyperL2Classifier(max_iter=3, random_state=0, cv=3, class_weight="balanced")
    clf.fit(X, y)
    assert clf.classes_.tolist() == list(range(10))
    assert clf.coef_.shape == (10, 64) and clf.intercept_.shape == (10,)
    proba = clf.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    np.testing.assert_allclose(clf.intercept_.sum(), 0.0, atol=1e-10)
    assert clf.score(X, y) > 0.95
    assert clf.decision_function(X).shape == (500, 10)


def test_classifier_outer_searches_do_not_chase_the_folds_solver_noise(count_calls):
    # the folds are solved loosely (gradient norm 1e-3), so their raw validation
    # loss moves with the warm start by as much as an outer step gains; the
    # line searches then bisected on that noise: 53 fold evaluations on this
    # digits split (the value correction of the implicit backward pass: 14)
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from skbilevel.hypergrad import LogisticFolds

    X, y = load_digits(return_X_y=True)
    X, _, y, _ = train_test_split(X, y, test_size=0.3, random_state=2, stratify=y)
    X = StandardScaler().fit_transform(X)
    calls = count_calls(LogisticFolds, "value_and_grad")
    HyperL2Classifier(random_state=0).fit(X, y)
    assert len(calls) <= 25


def test_classifier_inner_non_convergence_warns_with_gradient_norm():
    X, y = make_classification(100, 5, random_state=0)
    clf = HyperL2Classifier(
        solver=LBFGS(max_iter=2, tol=1e-12), max_iter=1, random_state=0
    )
    with pytest.warns(ConvergenceWarning, match="gradient norm"):
        clf.fit(X, y)


def test_string_labels_and_penalty_groups():
    X, y = make_classification(120, 6, random_state=0)
    labels = np.array(["no", "yes"])[y]
    clf = HyperL2Classifier(penalty=[0, 0, 0, 1, 1, 1], max_iter=3, random_state=0).fit(
        X, labels
    )
    assert set(clf.predict(X)) <= {"no", "yes"}
    assert np.ptp(clf.alphas_[:3]) == 0 and np.ptp(clf.alphas_[3:]) == 0


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_bad_input(Est):
    rng = np.random.RandomState(0)
    X = rng.randn(30, 3)
    y = (rng.rand(30) > 0.5).astype(int)
    Xnan = X.copy()
    Xnan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        Est().fit(Xnan, y)
    Xinf = X.copy()
    Xinf[1, 1] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        Est().fit(Xinf, y)
    with pytest.raises(ValueError):
        Est().fit(X[:, 0], y)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        Est().fit(X, y[:-1])
    with pytest.raises(ValueError, match="one id per feature"):
        Est(penalty=[0, 1]).fit(X, y)
    with pytest.raises(ValueError, match="alpha_init"):
        Est(alpha_init=0.0).fit(X, y)
    with pytest.raises(ValueError, match="alpha_init"):
        Est(alpha_init=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="alpha_init"):
        Est(alpha_init=[1.0, 0.0, 1.0]).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cpu'"):
            Est(device="cuda").fit(X, y)
    with pytest.raises(ValueError, match="cv=40"):
        Est(cv=40).fit(X, y)
    # no half-precision Cholesky on CPU: not torch's NotImplementedError
    with pytest.raises(ValueError, match="'float32' or 'float64'"):
        Est(dtype="bfloat16").fit(X, y)
    # splits that failed inside numpy: none, out of range
    with pytest.raises(ValueError, match="produced no split"):
        Est(cv=[]).fit(X, y)
    with pytest.raises(ValueError, match="out of range"):
        Est(cv=[(np.arange(20), np.arange(25, 35))]).fit(X, y)
    if Est is HyperL2Regressor:  # strings reached torch.as_tensor
        with pytest.raises(ValueError, match="numeric target"):
            Est().fit(X, np.where(y == 1, "yes", "no"))


def test_classifier_single_class_and_bad_strategy():
    X = np.random.RandomState(0).randn(20, 3)
    with pytest.raises(ValueError, match="only one class"):
        HyperL2Classifier().fit(X, np.zeros(20))
    with pytest.raises(ValueError, match="implicit"):
        HyperL2Classifier(hypergradient="closed_form").fit(X, np.arange(20) % 2)


def test_regressor_loo_needs_closed_form():
    X, y = _hetero(n=40, p=3)
    with pytest.raises(ValueError, match="closed form"):
        HyperL2Regressor(penalty="scalar", cv="loo", hypergradient="cg").fit(X, y)
    # per-feature penalties solve one fold per sample: any strategy
    HyperL2Regressor(cv="loo", hypergradient="cg", max_iter=2).fit(X, y)


def test_regressor_loo_is_one_fold_per_sample_with_a_positive_weight():
    from sklearn.model_selection import LeaveOneOut

    X, y = _hetero(n=40, p=6)
    a = HyperL2Regressor(cv="loo", max_iter=5).fit(X, y)
    b = HyperL2Regressor(cv=LeaveOneOut(), max_iter=5).fit(X, y)
    np.testing.assert_allclose(a.alphas_, b.alphas_, rtol=1e-10)
    # a zero-weight sample has no fold (its validation error would weigh
    # nothing) and changes nothing: the fit is the one without it
    sw = np.ones(40)
    sw[[3, 17]] = 0.0
    c = HyperL2Regressor(cv="loo", max_iter=5).fit(X, y, sample_weight=sw)
    keep = sw > 0
    d = HyperL2Regressor(cv="loo", max_iter=5).fit(X[keep], y[keep])
    np.testing.assert_allclose(c.alphas_, d.alphas_, rtol=1e-8)
    np.testing.assert_allclose(c.coef_, d.coef_, rtol=1e-8, atol=1e-12)


def test_regressor_loo_does_not_fit_the_samples_noise():
    # a dense truth at low signal-to-noise: the per-feature penalties once
    # scored far below the shared one with cv="loo" (test R^2 -.23 against
    # .027: the hat-matrix objective had no adaptive stage, and its
    # one-standard-error check was over the residuals the penalties were
    # fitted to); with a fold per sample they stay near it
    rng = np.random.RandomState(1)
    X = rng.randn(2200, 100)
    y = X @ (0.1 * rng.randn(100)) + 2.0 * rng.randn(2200)
    X, Xt, y, yt = X[:200], X[200:], y[:200], y[200:]
    per_feature = HyperL2Regressor(cv="loo").fit(X, y).score(Xt, yt)
    shared = HyperL2Regressor(cv="loo", penalty="scalar").fit(X, y).score(Xt, yt)
    assert per_feature > shared - 0.01


def test_regressor_loo_refuses_folds_beyond_its_memory_limit(monkeypatch):
    import scipy.sparse as sp

    from skbilevel.linear_model import _hyper_l2

    monkeypatch.setattr(_hyper_l2, "_LOO_MAX_BYTES", 2**20)
    X, y = _hetero(n=60, p=6)
    HyperL2Regressor(cv="loo", max_iter=2).fit(X, y)  # 60 x (36 + 120) floats
    rng = np.random.RandomState(0)
    wide = rng.randn(60, 400)  # one fold's rows each: 60 x 60 x 400 floats
    with pytest.raises(ValueError, match=r"cv='loo'.*GiB.*integer cv"):
        HyperL2Regressor(cv="loo").fit(wide, wide[:, 0])
    # sparse rows count by their nonzeros: 60 x 4 x 240 (+ 120) floats
    HyperL2Regressor(cv="loo", max_iter=2).fit(sp.random(60, 400, density=0.01, random_state=0), y)
    # the closed form (one shared penalty) holds no fold problems
    HyperL2Regressor(cv="loo", penalty="scalar").fit(wide, wide[:, 0])


def test_regressor_fold_batches_bound_the_memory(monkeypatch):
    # leave-one-out folds split into batches of bounded precomputations: the
    # same fit as one batch
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(n=40, p=6)
    a = HyperL2Regressor(cv="loo", max_iter=5).fit(X, y)
    monkeypatch.setattr(_hyper_l2, "_FOLD_BATCH_BYTES", 8 * 2 * 36 * 7)
    assert len(HyperL2Regressor()._batches(40, 8 * 2 * 36)) == 6
    b = HyperL2Regressor(cv="loo", max_iter=5).fit(X, y)
    assert b.hypergradient_info_["extra"]["n_fold_batches"] == 6
    np.testing.assert_allclose(a.alphas_, b.alphas_, rtol=1e-8)


def test_regressor_adaptive_stage_beats_shared_penalty_on_held_out_data():
    rng = np.random.RandomState(0)
    n, p = 600, 40
    w = np.zeros(p)
    w[:5] = rng.uniform(1, 2, 5)
    w[5:15] = rng.uniform(0.05, 0.3, 10)
    X = rng.randn(2 * n, p)
    y = X @ w + 0.5 * rng.randn(2 * n)
    Xtr, ytr, Xte, yte = X[:n], y[:n], X[n:], y[n:]
    model = HyperL2Regressor(random_state=0).fit(Xtr, ytr)
    a, gamma = model.adaptive_params_
    assert 0 < gamma <= 4  # penalties fall with the pilot coefficient
    shared = HyperL2Regressor(penalty="scalar", random_state=0).fit(Xtr, ytr)
    free = HyperL2Regressor(adaptive=False, random_state=0).fit(Xtr, ytr)
    assert free.adaptive_params_ is None
    assert model.score(Xte, yte) > shared.score(Xte, yte)
    assert model.cv_loss_ < shared.cv_loss_
    # irrelevant features end up with the larger penalties
    assert np.median(model.alphas_[15:]) > 10 * np.median(model.alphas_[:5])
    # the health record is taken at the fitted penalties, inner check included
    assert model.hypergradient_info_["inner_grad_norm"] < 1e-8


def test_regressor_adaptive_stage_off_for_alpha_init_and_scalar():
    X, y = _hetero(n=80, p=20)
    m = HyperL2Regressor(alpha_init=np.full(20, 1.0), max_iter=3).fit(X, y)
    assert m.adaptive_params_ is None
    m = HyperL2Regressor(penalty="scalar").fit(X, y)
    assert m.adaptive_params_ is None
    # warm start keeps the adaptive model and refines around it
    w = HyperL2Regressor(random_state=0, max_iter=5, warm_start=True).fit(X, y)
    params = w.adaptive_params_.copy()
    w.fit(X, y)
    np.testing.assert_allclose(w.adaptive_params_, params)
    # switching the adaptive stage off changes the parametrization: a cold start,
    # the same fit as a fresh estimator's
    w.set_params(adaptive=False).fit(X, y)
    cold = HyperL2Regressor(random_state=0, max_iter=5, adaptive=False).fit(X, y)
    assert w.adaptive_params_ is None
    np.testing.assert_allclose(w.alphas_, cold.alphas_, rtol=1e-10)


def test_classifier_adaptive_stage_and_alphas_of_the_final_model():
    X, y = make_classification(
        300, 12, n_informative=3, n_redundant=0, random_state=0, shuffle=False
    )
    clf = HyperL2Classifier(random_state=0, max_iter=20).fit(X, y)
    assert clf.adaptive_params_ is not None and clf.adaptive_params_.shape == (2,)
    # noise features (the last nine) get the larger penalties
    assert np.median(clf.alphas_[3:]) > np.median(clf.alphas_[:3])
    # the final model is the per-feature logistic regression at alphas_ (C = 1 / alpha)
    s = 1.0 / np.sqrt(clf.alphas_)
    ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10000).fit(X * s, y)
    np.testing.assert_allclose(clf.coef_, ref.coef_ * s, rtol=1e-4, atol=1e-6)
    off = HyperL2Classifier(random_state=0, max_iter=20, adaptive=False).fit(X, y)
    assert off.adaptive_params_ is None
    shared = HyperL2Classifier(random_state=0, penalty="scalar").fit(X, y)
    assert clf.cv_loss_ < shared.cv_loss_


def test_classifier_stages_hand_their_inner_solutions_on(monkeypatch):
    # the adaptive descent starts its inner solves from the scan's best point,
    # and the per-feature stage from the adaptive model's: both first
    # evaluations take only the one Newton iteration every fold solve takes
    # (the inner solver's min_iter; 5 and 6 from the shared penalty's)
    from skbilevel.hypergrad import LogisticFolds

    X, y = make_classification(
        300, 15, n_informative=5, n_redundant=4, n_classes=3, random_state=3
    )
    calls = []
    solve = LogisticFolds.value_and_grad

    def record(self, phi, *args, **kwargs):
        out = solve(self, phi, *args, **kwargs)
        calls.append((phi.numel(), out[2].inner_iterations))
        return out

    monkeypatch.setattr(LogisticFolds, "value_and_grad", record)
    clf = HyperL2Classifier(random_state=0).fit(X, y)
    assert clf.adaptive_params_ is not None
    sizes = [size for size, _ in calls]
    first_adaptive, first_corrections = sizes.index(2), sizes.index(15, sizes.index(2))
    assert calls[first_adaptive][1] == 1
    assert calls[first_corrections][1] == 1


def test_regressor_adaptive_stage_takes_newton_steps(monkeypatch):
    # the folds give the exact Hessian of the two-parameter model: Newton's
    # method reaches L-BFGS's answer in fewer fold solves
    from skbilevel.hypergrad import _penalized
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(n=300, p=20)
    solves = []
    factor = _penalized._primal_factor
    monkeypatch.setattr(
        _penalized, "_primal_factor", lambda *a: solves.append(1) or factor(*a)
    )
    newton = HyperL2Regressor(random_state=0).fit(X, y)
    n_newton = len(solves)
    solves.clear()
    monkeypatch.setattr(_hyper_l2, "_NEWTON_MAX_PARAMS", 0)
    lbfgs = HyperL2Regressor(random_state=0).fit(X, y)
    assert newton.adaptive_params_ is not None
    # the same valley (its floor is flat along the level a: 0.3 apart in a,
    # 1e-6 in CV loss), at least as low, in fewer solves (32 against 40)
    np.testing.assert_allclose(newton.adaptive_params_, lbfgs.adaptive_params_, atol=0.5)
    assert newton.cv_loss_ <= lbfgs.cv_loss_ * (1 + 1e-6)
    assert n_newton < len(solves)


def test_binary_classifier_adaptive_stage_takes_newton_steps(monkeypatch, count_calls):
    # binary folds give the exact Hessian too (the multinomial ones do not)
    from skbilevel.hypergrad import LogisticFolds
    from skbilevel.linear_model import _hyper_l2

    X, y = make_classification(400, 30, n_informative=4, n_redundant=2, random_state=1)
    calls = count_calls(LogisticFolds, "value_grad_hessian")
    newton = HyperL2Classifier(random_state=0).fit(X, y)
    assert newton.adaptive_params_ is not None and calls
    monkeypatch.setattr(_hyper_l2, "_NEWTON_MAX_PARAMS", 0)
    lbfgs = HyperL2Classifier(random_state=0).fit(X, y)
    # the same CV loss; (a, gamma) lie along a flat valley, where Newton stops
    # once a step would gain less than tol (a moves by 0.6 for a gain of 2.4e-4)
    np.testing.assert_allclose(newton.cv_loss_, lbfgs.cv_loss_, rtol=2e-3)
    np.testing.assert_allclose(
        newton.adaptive_params_, lbfgs.adaptive_params_, atol=1.0
    )
    calls.clear()
    monkeypatch.setattr(_hyper_l2, "_NEWTON_MAX_PARAMS", 8)
    X3, y3 = make_classification(300, 10, n_informative=4, n_classes=3, random_state=0)
    HyperL2Classifier(random_state=0, max_iter=5).fit(X3, y3)
    assert not calls


def test_regressor_newton_stage_falls_back_to_lbfgs(monkeypatch):
    # a fold that Cholesky cannot factor in the Newton stage: L-BFGS takes over
    from skbilevel.hypergrad import RidgeFolds
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(n=300, p=20)

    def fail(self, phi):
        raise torch.linalg.LinAlgError("not positive definite")

    monkeypatch.setattr(RidgeFolds, "value_grad_hessian", fail)
    fallback = HyperL2Regressor(random_state=0).fit(X, y)
    monkeypatch.setattr(_hyper_l2, "_NEWTON_MAX_PARAMS", 0)
    lbfgs = HyperL2Regressor(random_state=0).fit(X, y)
    np.testing.assert_allclose(fallback.alphas_, lbfgs.alphas_)


def test_classifier_refines_the_shared_penalty_when_it_is_the_answer():
    # the classifier takes the shared scan's grid point as is before the later
    # stages; when none beats it, the answer is refined (iris: the grid point
    # 0.105 had a CV loss 6% above the refined 0.037)
    from sklearn.datasets import load_iris
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_iris(return_X_y=True)
    X, _, y, _ = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    X = StandardScaler().fit_transform(X)
    clf = HyperL2Classifier(random_state=0).fit(X, y)
    assert clf.adaptive_params_ is None
    shared = HyperL2Classifier(random_state=0, penalty="scalar").fit(X, y)
    np.testing.assert_allclose(clf.shared_alpha_, shared.shared_alpha_, rtol=0.05)
    np.testing.assert_allclose(clf.cv_loss_, shared.cv_loss_, rtol=1e-4)


def _standardized(n, p, seed):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, p)
    return (X - X.mean(0)) / X.std(0), rng


def test_regressor_refines_the_shared_penalty_when_it_is_the_answer():
    # before the later stages the regressor's shared search stops one step from
    # the grid's parabola; when they do not beat it (a dense truth), the answer
    # is the one-penalty search's (it was 19.6 against 17.5, CV loss 0.18% higher).
    # Standardized features: the shared penalty and the scalar one are then the
    # same model
    X, rng = _standardized(100, 60, 5)
    y = X @ rng.randn(60) + 3.0 * rng.randn(100)
    reg = HyperL2Regressor(random_state=0).fit(X, y)
    assert reg.adaptive_params_ is None
    scalar = HyperL2Regressor(random_state=0, penalty="scalar").fit(X, y)
    np.testing.assert_allclose(reg.alphas_, scalar.alphas_[0], rtol=1e-6)
    np.testing.assert_allclose(reg.cv_loss_, scalar.cv_loss_, rtol=1e-9)


def test_regressor_refines_a_shared_penalty_searched_from_a_float_alpha_init():
    # from a float alpha_init the shared search stops at 1e-2 in log(alpha)
    # before the later stages; as the answer it goes on to 1e-3 (4.962 against
    # 4.921 before)
    X, rng = _standardized(100, 60, 1)
    y = X @ rng.randn(60) + 3.0 * rng.randn(100)
    reg = HyperL2Regressor(alpha_init=1.0, random_state=0).fit(X, y)
    assert reg.adaptive_params_ is None
    scalar = HyperL2Regressor(alpha_init=1.0, random_state=0, penalty="scalar").fit(X, y)
    np.testing.assert_allclose(reg.alphas_, scalar.alphas_[0], rtol=1e-3)
    np.testing.assert_allclose(reg.cv_loss_, scalar.cv_loss_, rtol=1e-7)


def test_classifier_refines_a_shared_penalty_left_at_the_grids_end():
    # the best grid point is the grid's low end (1e-4 n, where the search stops
    # on standardized data) but the minimum lies inside, towards the next grid
    # point: when it is the answer it is refined there, not left at the end (a
    # digits split: 0.118, CV log-loss .1156, test .1138, against 0.403, .1101
    # and .1026)
    X, rng = _standardized(100, 5, 0)
    y = (X.sum(1) + 0.05 * np.sqrt(5) * rng.randn(100) > 0).astype(int)
    clf = HyperL2Classifier(random_state=0).fit(X, y)
    assert clf.adaptive_params_ is None
    scalar = HyperL2Classifier(random_state=0, penalty="scalar").fit(X, y)
    assert scalar.shared_alpha_ > 2.0 * 1e-4 * len(y)
    np.testing.assert_allclose(clf.shared_alpha_, scalar.shared_alpha_, rtol=0.05)
    np.testing.assert_allclose(clf.cv_loss_, scalar.cv_loss_, rtol=1e-4)


def test_regressor_constant_target_is_fitted_without_warnings(variance_factors):
    X = np.random.RandomState(0).randn(50, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = HyperL2Regressor().fit(X, np.full(50, 2.5))
    np.testing.assert_allclose(model.predict(X[:3]), 2.5)
    assert model.adaptive_params_ is None
    # the shared penalty, relative to each feature's variance
    np.testing.assert_allclose(
        model.alphas_, model.shared_alpha_ * variance_factors(X), rtol=1e-12
    )


def test_regressor_auto_prior_scale_depends_on_the_centre():
    X, y = _hetero(n=150, p=8)
    kw = dict(random_state=0, max_iter=10)
    auto = HyperL2Regressor(**kw).fit(X, y)
    assert auto.adaptive_params_ is not None
    np.testing.assert_allclose(
        auto.alphas_, HyperL2Regressor(prior_scale=0.2, **kw).fit(X, y).alphas_
    )
    auto = HyperL2Regressor(adaptive=False, **kw).fit(X, y)
    np.testing.assert_allclose(
        auto.alphas_,
        HyperL2Regressor(adaptive=False, prior_scale=8.0, **kw).fit(X, y).alphas_,
    )
    # fewer than ten samples per correction tighten the prior around the adaptive model
    X, y = _hetero(n=150, p=40)
    auto = HyperL2Regressor(**kw).fit(X, y)
    assert auto.adaptive_params_ is not None
    tight = HyperL2Regressor(prior_scale=0.2 * np.sqrt(150 / 400), **kw).fit(X, y)
    np.testing.assert_allclose(auto.alphas_, tight.alphas_)
    yc = (y > np.median(y)).astype(int)
    clf = HyperL2Classifier(**kw).fit(X, yc)
    ref = HyperL2Classifier(prior_scale=0.2 * np.sqrt(150 / 400), **kw).fit(X, yc)
    np.testing.assert_allclose(clf.alphas_, ref.alphas_, rtol=1e-6)


@pytest.mark.parametrize("n_jobs", [None, 2])
def test_classifier_keeps_one_hypergradient_strategy_per_fold_batch(monkeypatch, n_jobs):
    # the implicit CG's warm start follows each fold batch through the stages
    # (reparametrized copies share its training weights). Keyed by the id of
    # the batch object, a new copy could reuse a dead one's id and inherit its
    # warm start: about one fit in 30 differed by 4e-5 in the penalties
    X, y = _hetero(n=150, p=40)
    yc = (y > np.median(y)).astype(int)
    made = []
    strategy = HyperL2Classifier._strategy

    def count(self):
        made.append(strategy(self))
        return made[-1]

    monkeypatch.setattr(HyperL2Classifier, "_strategy", count)
    from skbilevel.linear_model import _hyper_l2

    monkeypatch.setattr(_hyper_l2, "cpu_count", lambda: 4)  # two threads on any machine
    model = HyperL2Classifier(random_state=0, max_iter=10, n_jobs=n_jobs).fit(X, yc)
    assert model.adaptive_params_ is not None  # three stages, two reparametrizations
    assert len(made) == (1 if n_jobs is None else 2)
    assert all(s._x_prev is not None for s in made)


@pytest.mark.parametrize("Estimator", [HyperL2Regressor, HyperL2Classifier])
def test_fitted_cv_loss_is_evaluated_while_the_fold_threads_run(monkeypatch, Estimator):
    # the fitted cv_loss_ is evaluated after the stages. At a point they never
    # evaluated (the shared penalty refined after the per-feature stages lost) it
    # needs the folds again, and the fit's thread pool used to be shut down by
    # then: "cannot schedule new futures after shutdown" (wine, n_jobs=5). A
    # forgetful memo makes every evaluation need the folds
    from skbilevel.linear_model import _hyper_l2

    remembered = _hyper_l2._FoldObjective.value_and_grad

    def forgetful(self, phi):
        self._memo.clear()
        return remembered(self, phi)

    monkeypatch.setattr(_hyper_l2._FoldObjective, "value_and_grad", forgetful)
    monkeypatch.setattr(_hyper_l2, "cpu_count", lambda: 4)  # two threads on any machine
    X, y = _hetero(n=150, p=10)
    if Estimator is HyperL2Classifier:
        y = (y > np.median(y)).astype(int)
    kw = dict(random_state=0, max_iter=5)
    threads = Estimator(n_jobs=2, **kw).fit(X, y)
    one = Estimator(**kw).fit(X, y)
    assert np.isfinite(threads.cv_loss_)
    # the batches' inner solves stop separately (the classifier's): not bitwise
    np.testing.assert_allclose(threads.cv_loss_, one.cv_loss_, rtol=1e-4)


def test_fold_threads_are_at_most_one_per_core(monkeypatch):
    # more threads than cores only queue for the interpreter lock (digits on two
    # cores: 3.1 s with five threads, 0.97 s with two)
    from skbilevel.linear_model import _hyper_l2

    monkeypatch.setattr(_hyper_l2, "cpu_count", lambda: 2)
    assert [_hyper_l2._fold_jobs(n) for n in (None, 1, 2, 5, -1)] == [1, 1, 2, 2, 2]
    assert [len(b) for b in HyperL2Classifier(n_jobs=5)._batches(5)] == [3, 2]
    assert [len(b) for b in HyperL2Regressor(n_jobs=-1)._batches(5)] == [3, 2]


def test_n_jobs_none_follows_a_joblib_context(monkeypatch):
    # n_jobs=None is 1 unless a joblib context sets n_jobs, as in scikit-learn
    # (the context was ignored: always one batch)
    from joblib import parallel_config

    from skbilevel.linear_model import _hyper_l2

    monkeypatch.setattr(_hyper_l2, "cpu_count", lambda: 2)
    with parallel_config(n_jobs=2):
        assert _hyper_l2._fold_jobs(None) == 2
        assert _hyper_l2._fold_jobs(1) == 1
        assert [len(b) for b in HyperL2Regressor()._batches(5)] == [3, 2]
    with parallel_config(backend="sequential"):
        assert _hyper_l2._fold_jobs(None) == _hyper_l2._fold_jobs(4) == 1


def test_per_feature_penalties_must_beat_the_shared_one_by_a_standard_error(
    monkeypatch, variance_factors
):
    # 6 noise features among 12, n = 300: the per-feature model lowers the 5-fold
    # loss by 1.5%, less than one standard error of the folds' paired
    # differences, so the shared penalty is kept; compared on the mean alone
    # (no per-fold losses), the per-feature model would be taken
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero()
    model = HyperL2Regressor(random_state=0).fit(X, y)
    assert model.adaptive_params_ is None
    np.testing.assert_allclose(
        model.alphas_, model.shared_alpha_ * variance_factors(X), rtol=1e-12
    )
    monkeypatch.setattr(_hyper_l2._FoldObjective, "fold_values", lambda self, phi: None)
    mean_only = HyperL2Regressor(random_state=0).fit(X, y)
    assert mean_only.adaptive_params_ is not None
    assert mean_only.cv_loss_ < model.cv_loss_
    monkeypatch.undo()
    # leave-one-out: every sample is a fold of its own, and the standard error
    # over 300 of them is small enough for the gain of pruning the noise
    # features (their penalties 1e3 times the others'; test R^2 on 20000 new
    # samples .98703 against the shared penalty's .98671)
    loo = HyperL2Regressor(cv="loo").fit(X, y)
    assert loo.adaptive_params_ is not None
    assert loo.alphas_[6:].min() > 1e3 * loo.alphas_[:3].max()
    Xt, yt = _hetero(n=20000, seed=1)
    assert loo.score(Xt, yt) > model.score(Xt, yt)


def test_regressor_skips_the_adaptive_model_when_no_gamma_helps(variance_factors):
    # every feature equally relevant: following the pilot's coefficient sizes
    # only adds noise, and so would free per-feature corrections: the shared
    # penalty is the answer
    rng = np.random.RandomState(0)
    X = rng.randn(200, 10)
    y = X @ np.ones(10) + 3 * rng.randn(200)
    model = HyperL2Regressor(random_state=0).fit(X, y)
    assert model.adaptive_params_ is None and model.adaptive_pilot_ is None
    shared = model.shared_alpha_ * variance_factors(X)
    np.testing.assert_allclose(model.alphas_, shared, rtol=1e-12)
    # adaptive=False still runs the free stage around the shared penalty (whose
    # gain, within the folds' noise, does not displace the shared penalty)
    free = HyperL2Regressor(random_state=0, adaptive=False).fit(X, y)
    assert free.n_iter_ > model.n_iter_
    np.testing.assert_allclose(free.alphas_, shared, rtol=1e-12)


def test_dense_truth_with_p_near_n_stays_level_with_ridge_cv():
    # the overfitting guard where free corrections would fit the folds' noise:
    # 300 relevant features, 200 samples (free corrections around the shared
    # penalty with tau = 8 scored .20 against RidgeCV's .67)
    rng = np.random.RandomState(0)
    n, p = 200, 300
    w = rng.uniform(1, 2, p) * rng.choice([-1, 1], p)
    X = rng.randn(n + 1000, p)
    X[:, 1::2] += 0.5 * X[:, ::2]
    y = X @ w + 2.0 * rng.randn(n + 1000)
    model = HyperL2Regressor(random_state=0).fit(X[:n], y[:n])
    ours = model.score(X[n:], y[n:])
    ridge = RidgeCV(alphas=np.logspace(-6, 6, 13)).fit(X[:n], y[:n]).score(X[n:], y[n:])
    assert ours > ridge - 0.02
    free = HyperL2Regressor(random_state=0, adaptive=False).fit(X[:n], y[:n])
    assert free.score(X[n:], y[n:]) < ours - 0.1  # what the guard prevents


@pytest.mark.parametrize("outer_optimizer", ["lbfgs", "adam"])
@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_adaptive_scan_values_match_the_hypergradient_path(Est, outer_optimizer, monkeypatch):
    # the exponent scan evaluates values only (no hypergradient): they must be
    # the losses value_and_grad gives. Before Newton's method (lbfgs: these
    # folds give the exact Hessian) it stops at the first exponent of
    # _NEWTON_GAMMA_STARTS that beats the shared penalty; before another
    # descent, once the loss rose twice
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(n=200, p=12)
    if Est is HyperL2Classifier:
        y = (y > np.median(y)).astype(int)
    seen = {}  # per scanned objective (one per candidate pilot)
    value = _hyper_l2._FoldObjective.value
    stage = _hyper_l2._HyperL2Base._adaptive_stage
    bases = []

    def record(self, phi):
        out = value(self, phi)
        full = float(self.value_and_grad(phi)[0])
        seen.setdefault(id(self), []).append((out, full, float(phi[1])))
        return out

    def record_base(self, objective, candidates, center, base, *args):
        bases.append(base)
        return stage(self, objective, candidates, center, base, *args)

    monkeypatch.setattr(_hyper_l2._FoldObjective, "value", record)
    monkeypatch.setattr(_hyper_l2._HyperL2Base, "_adaptive_stage", record_base)
    Est(random_state=0, max_iter=5, outer_optimizer=outer_optimizer).fit(X, y)
    # n > p: the ridge pilot only (the regressor adds a sparse one when p > n)
    assert len(seen) == 1 and len(bases) == 1
    # (the classifier's up to its fold solves' tolerance: value_and_grad takes
    # one more Newton step from the scan's solution)
    for scan in seen.values():
        for fast, full, _ in scan:
            assert fast == pytest.approx(full, rel=1e-3 if Est is HyperL2Classifier else 1e-12)
        losses = [s[0] for s in scan]
        gammas = [s[2] for s in scan]
        if outer_optimizer == "lbfgs":
            assert gammas == list(_hyper_l2._NEWTON_GAMMA_STARTS[: len(scan)])
            assert all(loss >= bases[0] for loss in losses[:-1])
            if len(scan) < len(_hyper_l2._NEWTON_GAMMA_STARTS):
                assert losses[-1] < bases[0]
            continue
        assert gammas == list(_hyper_l2._ADAPTIVE_GAMMA_SCAN[: len(scan)])
        rises = [b > a for a, b in zip([bases[0]] + losses, losses)]
        # no two consecutive rises before the last scanned exponent (the
        # shared penalty, gamma = 0, counts as the first point of the scan)
        assert not any(r1 and r2 for r1, r2 in zip(rises[:-1], rises[1:-1]))
        if len(scan) < len(_hyper_l2._ADAPTIVE_GAMMA_SCAN):
            assert len(scan) >= 2 and rises[-1] and rises[-2]


class RidgeFoldsStub:
    def __init__(self, method):
        self.method = method


def test_regressor_sparse_pilot_is_chosen_on_a_sparse_wide_problem():
    # 5 relevant features among 160, n = 80: the lasso-like reweighted pilot
    # validates better than the ridge one, and predicts better too
    rng = np.random.RandomState(3)
    n, p = 80, 160
    w = np.zeros(p)
    w[:5] = rng.uniform(1, 2, 5) * rng.choice([-1, 1], 5)
    X = rng.randn(n + 1000, p)
    y = X @ w + 0.5 * rng.randn(n + 1000)
    from skbilevel.linear_model import _hyper_l2

    model = HyperL2Regressor(random_state=0).fit(X[:n], y[:n])
    assert model.adaptive_pilot_ in ("lasso", "lasso_low")
    # ... which are only tried when the folds have more features than rows
    pilots = model._candidate_pilots(RidgeFoldsStub("dual"), 1.0, 10.0)
    assert pilots == {
        "ridge": (1.0, 0),
        "lasso": (1.0, 10),
        "lasso_low": (math.log(10.0) + _hyper_l2._LOG_ALPHA_FLOOR, 10),
    }
    assert set(model._candidate_pilots(RidgeFoldsStub("primal"), 1.0, 10.0)) == {"ridge"}
    # a shared level at or below the floor's: the same sparse chain twice, run once
    low = model._candidate_pilots(RidgeFoldsStub("dual"), -20.0, 10.0)
    assert set(low) == {"ridge", "lasso_low"} and low["ridge"] == (-20.0, 0)
    ridge_only = HyperL2Regressor(random_state=0)
    ridge_only._pilots = {"ridge": ("shared", 0)}
    ridge_only.fit(X[:n], y[:n])
    assert ridge_only.adaptive_pilot_ == "ridge"
    assert model.cv_loss_ < ridge_only.cv_loss_
    assert model.score(X[n:], y[n:]) > ridge_only.score(X[n:], y[n:])
    # a warm start continues around the same pilot
    pilot, loss = model.adaptive_pilot_, model.cv_loss_
    model.set_params(warm_start=True).fit(X[:n], y[:n])
    assert model.adaptive_pilot_ == pilot
    assert model.cv_loss_ <= loss * (1 + 1e-9)


def test_regressor_cg_on_a_sparse_wide_problem_does_not_warn():
    # the sparse pilot spreads the penalties over some 20 decades: the implicit
    # CG stagnates at a plain relative residual of 3e-6, the attainable accuracy,
    # and is judged in the energy norm (no warning); the hypergradient is that of
    # the closed form, so the fit is too
    rng = np.random.RandomState(3)
    n, p = 80, 160
    w = np.zeros(p)
    w[:5] = rng.uniform(1, 2, 5) * rng.choice([-1, 1], 5)
    X = rng.randn(n, p)
    y = X @ w + 0.5 * rng.randn(n)
    ref = HyperL2Regressor(random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = HyperL2Regressor(random_state=0, hypergradient="cg").fit(X, y)
    assert model.hypergradient_info_["strategy"] == "cg"
    np.testing.assert_allclose(model.cv_loss_, ref.cv_loss_, rtol=1e-8)


def test_regressor_pilots_are_compared_at_their_best_level():
    # the benchmark's wide set (10 strong and 20 weak among 400, n = 150) with
    # the folds of random_state=1: compared at the shared level, the ridge pilot
    # validated better and its descent ended at a CV loss 1.6x the sparse
    # pilots'. Rated on a grid of (a, gamma), the chosen pilot is the one
    # whose own descent validates best
    n = 150
    X, y = make_relevance_tiers(n + 2000, 400, 10, 20, random_state=1)
    X = (X - X[:n].mean(0)) / X[:n].std(0)
    model = HyperL2Regressor(random_state=1).fit(X[:n], y[:n])
    losses = {}
    for name, spec in HyperL2Regressor._pilots.items():
        single = HyperL2Regressor(random_state=1)
        single._pilots = {name: spec}
        losses[name] = single.fit(X[:n], y[:n]).cv_loss_
    assert model.adaptive_pilot_ == min(losses, key=losses.get)
    # (a single pilot starts its descent from the scan of gamma, not the grid)
    assert model.cv_loss_ == pytest.approx(min(losses.values()), rel=1e-5)
    assert losses["ridge"] > 1.3 * model.cv_loss_
    assert model.score(X[n:], y[n:]) > 0.95


def test_fold_objective_reuses_recent_evaluations(monkeypatch, count_calls):
    # a stage starting where the previous one stopped, and the final checks of
    # the best iterate, do not solve the folds again; the regressor's health
    # record still has the inner gradient norm at the fitted penalties
    from skbilevel.hypergrad import RidgeFolds
    from skbilevel.linear_model import _hyper_l2

    calls = count_calls(RidgeFolds, "value_and_grad")
    X, y = _hetero(n=120, p=6)
    kw = dict(random_state=0, adaptive=False, max_iter=5)
    model = HyperL2Regressor(**kw).fit(X, y)
    cached = len(calls)
    assert model.hypergradient_info_["inner_grad_norm"] is not None

    cached_vg = _hyper_l2._FoldObjective.value_and_grad

    def uncached(self, phi):
        self._memo.clear()
        return cached_vg(self, phi)

    monkeypatch.setattr(_hyper_l2._FoldObjective, "value_and_grad", uncached)
    calls.clear()
    ref = HyperL2Regressor(**kw).fit(X, y)
    assert cached < len(calls)
    np.testing.assert_allclose(model.alphas_, ref.alphas_, rtol=1e-12)
    assert model.cv_loss_ == ref.cv_loss_


def test_regressor_features_on_very_different_scales():
    # unstandardized features (scales 1e-3 to 1e3), each contributing alike: the
    # best shared penalty lies below the grid (which follows the mean scale), and
    # the search goes past its end instead of stopping there (R2 .66 before)
    rng = np.random.RandomState(0)
    n, p = 200, 30
    scales = np.logspace(-3, 3, p)
    X = rng.randn(n + 1000, p) * scales
    y = X @ (rng.randn(p) / scales) + 0.5 * rng.randn(n + 1000)
    ours = HyperL2Regressor(random_state=0).fit(X[:n], y[:n]).score(X[n:], y[n:])
    ridge = RidgeCV(alphas=np.logspace(-12, 12, 49)).fit(X[:n], y[:n]).score(X[n:], y[n:])
    assert ridge > 0.98 and ours > ridge - 0.005


@pytest.mark.parametrize("n_classes", [2, 4])
def test_classifier_integer_weights_fit_as_repeated_rows(n_classes):
    # a whole default fit (scan, adaptive and per-feature stages, final model):
    # integer weights give the fit of repeated rows on the same folds, to
    # rounding. With float32 products the two had rounded differently: penalties
    # 1e-7 (binary) and 8e-7 (4 classes) apart, probabilities 3e-6
    rng = np.random.RandomState(0 if n_classes == 2 else 1)
    n = 60 if n_classes == 2 else 90
    X = rng.randn(n, 8)
    if n_classes == 2:
        y = (X[:, :2] @ [1.5, -1.0] + 0.7 * rng.randn(n) > 0).astype(int)
    else:
        W = [[2.0, -1.0, 0.0, 1.0], [0.0, 1.5, -1.5, 0.5], [1.0, 0.0, 1.0, -2.0]]
        y = (X[:, :3] @ np.array(W) + 0.8 * rng.randn(n, 4)).argmax(1)
    sw = rng.randint(0, 4, n)
    fold = np.arange(n) % 3
    X_rep, y_rep, fold_rep = (np.repeat(a, sw, axis=0) for a in (X, y, fold))

    def splits(f):
        return [(np.flatnonzero(f != k), np.flatnonzero(f == k)) for k in range(3)]

    weighted = HyperL2Classifier(cv=splits(fold)).fit(X, y, sample_weight=sw)
    repeated = HyperL2Classifier(cv=splits(fold_rep)).fit(X_rep, y_rep)
    assert weighted.adaptive_params_ is not None  # every stage ran
    np.testing.assert_allclose(weighted.alphas_, repeated.alphas_, rtol=1e-9)
    np.testing.assert_allclose(
        weighted.predict_proba(X), repeated.predict_proba(X), rtol=1e-9, atol=1e-12
    )


def test_classifier_float32_products_keep_the_float64_fit(monkeypatch):
    # the default strategy's Hessian-vector products run in float32 for float64
    # data whose products with X are large enough to gain; the fit is the one
    # float64 products give
    from scipy import sparse
    from sklearn.datasets import load_wine, make_classification
    from sklearn.preprocessing import StandardScaler

    from skbilevel.hypergrad import LogisticFolds
    from skbilevel.linear_model._hyper_l2 import _LOW_PRECISION_MIN_ENTRIES

    # 700 x 30, 4 classes, 5 folds: 420,000 entries
    X, y = make_classification(
        700, 30, n_informative=12, n_classes=4, n_clusters_per_class=1, random_state=0
    )
    X = StandardScaler().fit_transform(X)
    assert 700 * 30 * 4 * 5 >= _LOW_PRECISION_MIN_ENTRIES
    fast = HyperL2Classifier(random_state=0).fit(X, y)
    seen = []
    init = LogisticFolds.__init__

    def record(self, *args, hvp_dtype=None, **kwargs):
        seen.append(hvp_dtype)
        init(self, *args, **kwargs)  # float64 products

    monkeypatch.setattr(LogisticFolds, "__init__", record)
    ref = HyperL2Classifier(random_state=0).fit(X, y)
    assert set(seen) == {torch.float32}
    np.testing.assert_allclose(fast.alphas_, ref.alphas_, rtol=1e-4)
    # (the same to the fold solves' tolerance)
    np.testing.assert_allclose(fast.predict_proba(X), ref.predict_proba(X), atol=1e-4)
    # a strategy of the user's may ask for residuals below float32's reach
    seen.clear()
    HyperL2Classifier(hypergradient=ImplicitCG(tol=1e-8), max_iter=2).fit(X, y)
    assert set(seen) == {None}
    seen.clear()
    HyperL2Classifier(dtype="float32", max_iter=2).fit(X, y)
    assert set(seen) == {None}
    # small products: float32 would save nothing (wine: 178 x 13, 3 classes, 5
    # folds, 34,710 entries), and float64 keeps weights equivalent to repeats
    seen.clear()
    Xw, yw = load_wine(return_X_y=True)
    HyperL2Classifier(max_iter=2).fit(StandardScaler().fit_transform(Xw), yw)
    assert set(seen) == {None}
    seen.clear()  # sparse X: its products stream indices as much as values
    HyperL2Classifier(max_iter=2).fit(sparse.csr_matrix(X), y)
    assert set(seen) == {None}


def test_shifted_data_fit_like_centred_data():
    # with an intercept, shifting X or y changes only the intercept. The data are
    # centred in float64 before the cast: in float32, y + 1e8 was rounded to
    # multiples of 8 (R^2 -.006 instead of .836, shared alpha 7.8e11 instead of
    # 1.6), and a logistic fit on X + 1e6 did not converge even in float64
    # (accuracy .71 instead of .825, ConvergenceWarnings)
    rng = np.random.RandomState(0)
    X = rng.randn(80, 5)
    y = X @ [1.0, 2.0, 0.0, 0.0, 0.5] + rng.randn(80)
    ref = HyperL2Regressor(random_state=0).fit(X, y)
    for kw, Xs, ys in [
        (dict(dtype="float32"), X, y + 1e8),
        (dict(dtype="float32"), X + 1e6, y),
        (dict(penalty="scalar", dtype="float32"), X, y + 1e8),
    ]:
        m = HyperL2Regressor(random_state=0, **kw).fit(Xs, ys)
        if "penalty" not in kw:
            np.testing.assert_allclose(m.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
        assert m.score(Xs, ys) > ref.score(X, y) - 1e-3
    y3 = np.digitize(X[:, 0] + X[:, 1] + 0.5 * rng.randn(80), [-1, 1])
    ref = HyperL2Classifier(random_state=0).fit(X, y3)
    for dtype, shift in [("float64", 1e6), ("float32", 1e4)]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            clf = HyperL2Classifier(random_state=0, dtype=dtype).fit(X + shift, y3)
        np.testing.assert_allclose(
            clf.predict_proba(X + shift), ref.predict_proba(X), atol=2e-3
        )


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_values_whose_squares_leave_the_dtype_are_a_value_error(Est):
    # the regressor returned R^2 = 0 without a word on X * 1e-170 and X * 1e200
    # (float64), y * 1e200 gave NaN predictions; the classifier failed in its
    # solvers ("not finite at the starting point", "math domain error")
    import scipy.sparse as sp

    rng = np.random.RandomState(0)
    X = rng.randn(60, 4)
    y = X @ [1.0, 2.0, 0.0, 0.0] + rng.randn(60)
    if Est is HyperL2Classifier:
        y = (y > 0).astype(int)
    for Xbad, dtype, word in [
        (X * 1e-170, "float64", "too small"),
        (X * 1e200, "float64", "too large"),
        (sp.csr_matrix(X * 1e200), "float64", "too large"),
        (X * 1e20, "float32", "too large"),
    ]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no overflow on the way
            with pytest.raises(ValueError, match=f"{word} to be squared.*{dtype}.*StandardScaler"):
                Est(dtype=dtype).fit(Xbad, y)
    if Est is HyperL2Regressor:
        with pytest.raises(ValueError, match="y's values .* too large.*Rescale y"):
            Est().fit(X, y * 1e200)
    else:
        for Xbad, dtype in [(X * 1e150, "float64"), (X * 1e-19, "float32")]:
            with pytest.raises(ValueError, match="to be squared"):
                Est(dtype=dtype).fit(Xbad, y)
    # well inside the range the fits are those of X (up to the solvers' tolerances)
    ref = Est(random_state=0).fit(X, y).score(X, y)
    assert Est(random_state=0).fit(X * 1e6, y).score(X * 1e6, y) == pytest.approx(ref, abs=1e-3)


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_callbacks_that_are_not_callable_are_refused_before_the_fit(Est, count_calls):
    # a TypeError "'int' object is not callable" came after the shared stage's
    # scan and the adaptive stage (the first outer iteration)
    X, y = make_classification(60, 4, random_state=0)
    calls = count_calls(Est, "_run_outer")
    with pytest.raises(ValueError, match="callbacks must be callables.*got 1 of type int"):
        Est(callbacks=[print, 1]).fit(X, y)
    assert not calls


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_a_prior_too_tight_for_the_dtype_holds_the_corrections(Est, variance_factors):
    # 1 / (2 n tau^2) underflowed to ZeroDivisionError with prior_scale=1e-200 or
    # sample weights of 1e-200 (n is their sum); now the corrections stay at the
    # centre, as a very tight prior would hold them
    X, y = make_classification(80, 4, n_informative=2, random_state=0)
    if Est is HyperL2Regressor:
        y = X @ [2.0, 1.0, 0.0, 0.0] + 0.3 * np.random.RandomState(0).randn(80)
    kw = dict(adaptive=False, random_state=0)
    tight = Est(prior_scale=1e-6, **kw).fit(X, y)
    cases = [(Est(prior_scale=1e-200, **kw), None), (Est(**kw), np.full(80, 1e-200))]
    for est, sw in cases:
        est.fit(X, y, sample_weight=sw)
        relative = est.alphas_ / variance_factors(X)
        assert np.all(np.isfinite(est.alphas_)) and np.ptp(np.log(relative)) < 1e-9
        if sw is None:
            # (the classifier's shared penalty, refined by secant steps on its
            # loose fold solves, to its _shared_tol in log(alpha): the two fits'
            # warm starts differ after the tight prior's descent)
            rtol = 1e-4 if Est is HyperL2Regressor else 2 * Est._shared_tol
            np.testing.assert_allclose(est.alphas_, tight.alphas_, rtol=rtol)


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_stage_stopped_by_max_iter_is_a_convergence_warning(Est):
    # a stage cut short by max_iter while its objective still fell was silent
    # (scikit-learn's estimators warn): the regressor's adaptive stage fell by a
    # relative .0094 in its one step, the classifier's by 6e-4 (tol 3e-4)
    rng = np.random.RandomState(0)
    if Est is HyperL2Regressor:
        X = rng.randn(200, 30)
        y = X[:, :5] @ rng.randn(5) * 2 + 0.5 * rng.randn(200)
    else:
        X, y = make_classification(200, 20, n_informative=5, random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"adaptive stage stopped at max_iter=1 .*relative"):
        Est(max_iter=1, random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        Est(random_state=0).fit(X, y)  # converges within the default budget


def test_shared_search_stopped_by_max_iter_is_a_convergence_warning():
    # penalty="scalar" (and a shared penalty kept as the answer) returned the best
    # point of a search cut short by max_iter without a word, where BilevelRidgeCV
    # warns: the classifier's slope was still 5e-3 at max_iter=1
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    with pytest.warns(ConvergenceWarning, match=r"shared penalty's search stopped after max_iter=1 "):
        HyperL2Classifier(penalty="scalar", max_iter=1, random_state=0).fit(X, y)
    rng = np.random.RandomState(0)
    Xr = rng.randn(60, 5)
    yr = Xr @ rng.randn(5) + rng.randn(60)
    with pytest.warns(ConvergenceWarning, match=r"shared penalty's search .* Raise max_iter"):
        HyperL2Regressor(penalty="scalar", alpha_init=1e4, max_iter=1).fit(Xr, yr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        HyperL2Classifier(penalty="scalar", random_state=0).fit(X, y)
        HyperL2Regressor(penalty="scalar", alpha_init=1e4).fit(Xr, yr)
        HyperL2Classifier(max_iter=0, random_state=0).fit(X, y)  # no refinement asked


@pytest.mark.parametrize(
    "penalty, word",
    [([0, None, 1, 1], "missing"), ([0, np.nan, 1, 1], "NaN"), ([0.0, 1.0, np.inf, 1.0], "inf"),
     ([{}, 1, 2, 3], "unorderable")],
)
def test_penalty_group_ids_must_be_comparable_and_finite(penalty, word):
    # NaN and inf ids were taken as groups of their own; None or a dict failed in
    # np.unique with "TypeError: '<' not supported between instances"
    rng = np.random.RandomState(0)
    X = rng.randn(30, 4)
    with pytest.raises(ValueError, match=f"penalty as group ids.*{word}"):
        HyperL2Regressor(penalty=penalty).fit(X, X[:, 0])
    with pytest.raises(ValueError, match=f"penalty as group ids.*{word}"):
        HyperL2Classifier(penalty=penalty).fit(X, X[:, 0] > 0)


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
@pytest.mark.parametrize("penalty", ["per_feature", [0, 0, 1, 1, 2]])
def test_the_fit_does_not_depend_on_the_features_units(Est, penalty):
    # the search runs on features rescaled to unit variance (a factor per
    # penalty group): a column multiplied by d gets the coefficient / d and the
    # penalty * d^2, to rounding. Standard deviations 1e-6 and 1e6 beside three
    # of 1 had made the regressor fit the small feature as irrelevant (test R^2
    # .644 against .836 standardized), behind a warning to standardize X
    rng = np.random.RandomState(0)
    X = rng.randn(80, 5)
    y = X @ [1.0, 2.0, 0.0, 0.0, 0.5] + rng.randn(80)
    if Est is HyperL2Classifier:
        y = y > 0
    per_feature = isinstance(penalty, str)
    d = np.array([1e-6, 1e6, 1.0, 1e3, 1e-3] if per_feature else [1e3, 1e3, 1, 1, 1e-2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = Est(penalty=penalty, random_state=0).fit(X, y)
        scaled = Est(penalty=penalty, random_state=0).fit(X * d, y)
    np.testing.assert_allclose(scaled.coef_ * d, ref.coef_, rtol=1e-9)
    np.testing.assert_allclose(scaled.alphas_ / d**2, ref.alphas_, rtol=1e-9)
    np.testing.assert_allclose(scaled.intercept_, ref.intercept_, rtol=1e-9, atol=1e-12)
    assert scaled.shared_alpha_ == pytest.approx(ref.shared_alpha_, rel=1e-9)


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
@pytest.mark.parametrize("dtype, scale", [("float32", 1e6), ("float32", 1e-3), ("float64", 1e12)])
def test_one_penalty_does_not_depend_on_the_overall_scale(Est, dtype, scale):
    # penalty="scalar" is the user's model (one penalty in X's units), but its
    # solves run on X divided by one common factor: the classifier's absolute
    # gradient tolerances had given 14 "NewtonCG stopped" warnings at X * 1e6 in
    # float32, and probabilities 6e-3 off at X * 1e-3
    rng = np.random.RandomState(0)
    X = rng.randn(120, 4)
    y = X @ [1.0, -1.0, 0.5, 0.0] + rng.randn(120)
    if Est is HyperL2Classifier:
        y = y > 0
    ref = Est(penalty="scalar", random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled = Est(penalty="scalar", dtype=dtype, random_state=0).fit(X * scale, y)
    rtol = 1e-3 if dtype == "float32" else 1e-6
    np.testing.assert_allclose(scaled.coef_ * scale, ref.coef_, rtol=rtol)
    np.testing.assert_allclose(scaled.alphas_ / scale**2, ref.alphas_, rtol=rtol)
    # (alphas_ computed in the fit's dtype)
    assert scaled.shared_alpha_ == pytest.approx(scaled.alphas_[0], rel=rtol)


@pytest.mark.parametrize("n_classes", [3, 4])
def test_separable_classes_do_not_drive_the_penalties_to_zero(n_classes):
    # on separable folds the validation log-loss falls as every penalty
    # vanishes: the adaptive model's level ran to the box's edge (penalties of
    # 1e-7, 29 warnings of CG on the saturated softmax's singular Hessians,
    # 2 to 6 s); it now stops where the shared search may (the grid's end)
    from sklearn.datasets import make_blobs

    X, y = make_blobs(300, 5, centers=n_classes, cluster_std=0.5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = HyperL2Classifier(random_state=0).fit(X, y)
    assert model.alphas_.min() > 1e-3
    assert model.score(X, y) == 1.0


def test_informative_features_of_small_units_are_found():
    # make_friedman1's informative features come first; with the columns in
    # units from 1e-3 to 1e3 the shared search had penalized them out (alpha
    # 7e17, test R^2 -.018, and the classifier at chance): now as unscaled
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(600, 20, noise=1.0, random_state=0)
    d = np.logspace(-3, 3, 20)
    train, test = slice(0, 420), slice(420, None)
    for Est, target in [(HyperL2Regressor, y), (HyperL2Classifier, y > np.median(y))]:
        ref = Est(random_state=0).fit(X[train], target[train])
        scaled = Est(random_state=0).fit(X[train] * d, target[train])
        assert scaled.score(X[test] * d, target[test]) == pytest.approx(
            ref.score(X[test], target[test]), abs=1e-9
        )
        # (R^2, or accuracy against chance 0.5; LogisticRegressionCV .772)
        assert ref.score(X[test], target[test]) > (0.65 if Est is HyperL2Regressor else 0.7)


@pytest.mark.parametrize("fmt", ["csr", "csc"])
def test_sparse_offset_column_is_centred_like_the_dense_one(fmt):
    # one-hot columns beside a year (2000 +- 10): the sparse float32 classifier
    # did not centre the year and its logistic solves stalled (19
    # ConvergenceWarnings, NewtonCG gradient norms up to 1.8e-2 > 1e-3); the
    # dense fit centred it and converged
    import scipy.sparse as sp

    rng = np.random.RandomState(0)
    cat = rng.randint(0, 5, 300)
    year = 2000 + 10 * rng.randn(300)
    X = np.c_[np.eye(5)[cat], year]
    y = ((cat == 2) * 2.0 - 1 + 0.15 * (year - 2000) + rng.logistic(size=300) > 0).astype(int)
    dense = HyperL2Classifier(random_state=0, dtype="float32").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        sparse = HyperL2Classifier(random_state=0, dtype="float32").fit(
            sp.csr_matrix(X).asformat(fmt), y
        )
    np.testing.assert_allclose(sparse.predict_proba(X), dense.predict_proba(X), atol=1e-3)
    # the regressor's sparse float32 fit of a year-valued target
    reg = HyperL2Regressor(random_state=0, dtype="float32").fit(sp.csr_matrix(X), year * 0.01)
    assert reg.score(X, year * 0.01) > 0.999


@pytest.mark.parametrize("Est", [HyperL2Regressor, HyperL2Classifier])
def test_fewer_than_two_positive_weights_is_a_value_error(Est):
    # cv="loo" with one shared penalty and one positive weight returned alpha = 1e-7
    # (the grid's end) silently; K folds said a fold had zero weight, not why
    rng = np.random.RandomState(0)
    X = rng.randn(20, 3)
    y = X[:, 0] + rng.randn(20)
    if Est is HyperL2Classifier:
        y = y > 0
    sw = np.r_[1.0, np.zeros(19)]
    kws = [dict(), dict(cv="loo", penalty="scalar"), dict(cv="loo")]
    for kw in kws if Est is HyperL2Regressor else kws[:1]:
        with pytest.raises(ValueError, match="at least 2 samples with a positive sample_weight.*got 1 of 20"):
            Est(**kw).fit(X, y, sample_weight=sw)


def test_regressor_cg_in_float32_does_not_ask_for_float64_residuals():
    # hypergradient="cg" asked CG for a relative residual of 1e-8 in float32 too:
    # it stagnated near 1e-7 with seven ConvergenceWarnings on a fit that matched
    # the closed form's
    rng = np.random.RandomState(0)
    X = rng.randn(200, 30)
    y = X[:, :5] @ rng.randn(5) * 2 + 0.5 * rng.randn(200)
    ref = HyperL2Regressor(random_state=0, dtype="float32").fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        cg = HyperL2Regressor(random_state=0, dtype="float32", hypergradient="cg").fit(X, y)
    np.testing.assert_allclose(cg.predict(X), ref.predict(X), rtol=1e-4, atol=1e-4)


def test_classifier_extreme_sample_weights_keep_float64_products():
    # the default's float32 Hessian-vector products under- or overflowed with
    # sample weights of 1e-200 or 1e40 (CG stopped at p^T A p = nan, "invalid
    # value encountered in matmul"); such weights now keep float64 products.
    # (A weight's scale moves the fit only through the prior's sample count.)
    X, y = make_classification(200, 10, n_informative=4, random_state=0)
    ref = HyperL2Classifier(random_state=0).fit(X, y)
    big = HyperL2Classifier(random_state=0).fit(X, y, sample_weight=np.full(200, 1e10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny = HyperL2Classifier(random_state=0).fit(X, y, sample_weight=np.full(200, 1e-200))
        huge = HyperL2Classifier(random_state=0).fit(X, y, sample_weight=np.full(200, 1e40))
    np.testing.assert_allclose(tiny.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(huge.predict_proba(X), big.predict_proba(X), atol=1e-6)


def test_regressor_scalar_loo_refuses_to_densify_sparse_x_beyond_the_limit(monkeypatch):
    # cv="loo" with one shared penalty makes sparse X dense (the hat-matrix
    # formulas): a large term-document matrix ran into toarray's MemoryError
    import scipy.sparse as sp

    from skbilevel.linear_model import _hyper_l2

    monkeypatch.setattr(_hyper_l2, "_LOO_MAX_BYTES", 2**20)
    X = sp.random(400, 400, density=0.01, random_state=0, format="csr")  # 1.2 MiB dense
    y = np.asarray(X.sum(1)).ravel()
    with pytest.raises(ValueError, match=r"make sparse X dense: 0\.00119 GiB.*400 x 400.*integer cv"):
        HyperL2Regressor(cv="loo", penalty="scalar").fit(X, y)
    HyperL2Regressor(cv="loo", penalty="scalar", dtype="float32").fit(X, y)  # 0.6 MiB
    HyperL2Regressor(penalty="scalar").fit(X, y)  # K folds stay sparse


@pytest.mark.parametrize("outer_optimizer", ["lbfgs", "adam"])
def test_adaptive_scan_skips_a_non_finite_exponent(outer_optimizer, monkeypatch):
    """A non-finite loss at the first exponent tried stayed the scan's best
    point (NaN compares false), so an exponent that beat the shared penalty
    after it was dropped and the adaptive model with it."""
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(p=24)
    value = _hyper_l2._FoldObjective.value
    first = {"lbfgs": _hyper_l2._NEWTON_GAMMA_STARTS[0], "adam": _hyper_l2._ADAPTIVE_GAMMA_SCAN[0]}

    def broken(self, phi):
        if phi.numel() == 2 and float(phi[1]) == first[outer_optimizer]:
            return float("nan")
        return value(self, phi)

    kw = dict(random_state=0, max_iter=5, outer_optimizer=outer_optimizer)
    reference = HyperL2Regressor(**kw).fit(X, y)
    assert reference.adaptive_params_ is not None
    monkeypatch.setattr(_hyper_l2._FoldObjective, "value", broken)
    est = HyperL2Regressor(**kw).fit(X, y)
    assert est.adaptive_params_ is not None
    assert np.isfinite(est.cv_loss_) and np.all(np.isfinite(est.alphas_))


def test_regressor_sparse_pilots_follow_the_folds_training_rows():
    """The sparse pilots are tried when the folds have more features than
    training rows. With n >= p but fewer rows in each fold's training part,
    the folds took the primal form (RidgeFolds compared p with all the rows),
    so only the ridge pilot ran: test R^2 .9554 against LassoCV's .9555 here
    (8 such sets: .9533 on average, below LassoCV on 7); now .9640."""
    n = 130
    X, y = make_relevance_tiers(n + 2000, 110, 8, 16, random_state=0)
    X, Xt, y, yt = X[:n], X[n:], y[:n], y[n:]
    model = HyperL2Regressor(random_state=0).fit(X, y)
    assert model.adaptive_pilot_ in ("lasso", "lasso_low")
    assert model.score(Xt, yt) > 0.96


def test_per_feature_stage_is_skipped_when_it_cannot_gain_tol(monkeypatch):
    """Around the adaptive model the prior holds nearly all of the per-feature
    objective's curvature, so |g|^2 / (4 w) bounds what the descent can gain;
    below tol it is not run (it took two L-BFGS iterations for a relative gain
    of 9e-6 on make_classification, 12% of the fit)."""
    from sklearn.datasets import load_wine

    from skbilevel.linear_model._hyper_l2 import _HyperL2Base

    skipped = []
    gain_below_tol = _HyperL2Base._gain_below_tol

    def spy(self, outer, phi, prior_weight):
        out = gain_below_tol(self, outer, phi, prior_weight)
        skipped.append(out is not None)
        return out

    X, y = make_classification(400, 20, n_informative=5, n_redundant=5, random_state=0)
    X = (X - X.mean(0)) / X.std(0)
    monkeypatch.setattr(_HyperL2Base, "_gain_below_tol", spy)
    fast = HyperL2Classifier(random_state=0).fit(X, y)
    assert skipped == [True] and fast.adaptive_pilot_ is not None
    monkeypatch.setattr(_HyperL2Base, "_gain_below_tol", lambda self, *args: None)
    full = HyperL2Classifier(random_state=0).fit(X, y)
    # the descent gains less than tol (3e-4) of the objective: the same model
    gain = (fast.cv_loss_ - full.cv_loss_) / fast.cv_loss_
    assert 0 <= gain < fast.tol
    np.testing.assert_allclose(fast.predict_proba(X), full.predict_proba(X), atol=5e-3)
    assert fast.n_iter_ < full.n_iter_
    # where the estimate is above tol the descent runs (wine: about 1e-2)
    monkeypatch.setattr(_HyperL2Base, "_gain_below_tol", spy)
    skipped.clear()
    Xw, yw = load_wine(return_X_y=True)
    HyperL2Classifier(random_state=0).fit((Xw - Xw.mean(0)) / Xw.std(0), yw)
    assert skipped == [False]


def test_fold_values_reuse_the_solutions_of_an_evaluated_point(count_calls):
    # the one-standard-error rule asks for every fold's loss at the descent's
    # best iterate and at the shared penalty, both evaluated already: the
    # regressor's folds took a factorization each for them (3% of a hetero fit).
    # value_and_grad remembers the batches' coefficients for fold_values
    from skbilevel.hypergrad import RidgeFolds
    from skbilevel.linear_model import _hyper_l2

    X, y = _hetero(n=120, p=6)
    T = torch.ones(3, 120, dtype=torch.float64)
    for k in range(3):
        T[k, 40 * k : 40 * (k + 1)] = 0
    batch = RidgeFolds(torch.tensor(X), torch.tensor(y), T, 1 - T)
    seen = []

    def fold_values(b, phi, coef):  # the regressor's, recording what it is given
        seen.append(coef is not None)
        return _hyper_l2._ridge_fold_losses(b, phi, coef)

    objective = _hyper_l2._FoldObjective(
        [batch], 3, None, lambda b, phi: b.value_and_grad(phi), None,
        fold_values=fold_values,
    )
    phi = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)
    value, _ = objective.value_and_grad(phi)
    factored = count_calls(RidgeFolds, "closed_form")
    losses = objective.fold_values(phi.clone())
    assert seen == [True] and not factored
    assert losses.sum() / 3 == pytest.approx(float(value), rel=1e-12)
    fresh = objective.fold_values(phi + 1.0)  # never evaluated: solved
    assert seen == [True, False] and len(factored) == 1
    np.testing.assert_allclose(
        fresh, batch.fold_losses(batch.closed_form(phi + 1.0)).numpy(), rtol=1e-12
    )
