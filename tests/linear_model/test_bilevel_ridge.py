"""BilevelRidgeCV: numbers checked against scikit-learn's RidgeCV / Ridge / K-fold."""

import pickle
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.datasets import load_diabetes, make_regression
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.model_selection import GridSearchCV, KFold, ShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skbilevel.hypergrad import available_strategies
from skbilevel.linear_model import BilevelRidgeCV

GRID = np.logspace(-6, 6, 13)


def _datasets():
    X_d, y_d = load_diabetes(return_X_y=True)
    X_t, y_t = make_regression(300, 30, n_informative=10, noise=40.0, random_state=1)
    X_w, y_w = make_regression(80, 200, n_informative=20, noise=20.0, random_state=2)
    X_r, y_r = make_regression(
        150, 40, effective_rank=5, tail_strength=0.2, noise=1.0, random_state=3
    )
    X_m, Y_m = make_regression(120, 25, n_targets=3, noise=15.0, random_state=4)
    return {
        "diabetes": (X_d, y_d),
        "tall": (X_t, y_t),
        "wide": (X_w, y_w),
        "low_rank": (X_r, y_r),
        "multi_target": (X_m, Y_m),
    }


DATASETS = _datasets()


def _loo_mse(X, y, alpha, **kw):
    """Mean squared LOO error at alpha, computed by scikit-learn."""
    r = RidgeCV(alphas=[alpha], store_cv_results=True, **kw).fit(X, y)
    return -r.best_score_


# ---------------------------------------------------------------- contract


@parametrize_with_checks(
    [BilevelRidgeCV(), BilevelRidgeCV(cv=3, alpha_per_target=True, fit_intercept=False)]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# ---------------------------------------------------------------- LOO == RidgeCV


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(60, 8, 1), (30, 50, 1), (50, 6, 3), (25, 40, 2)])
def test_loo_error_equals_ridgecv_at_any_alpha(fit_intercept, weighted, shape):
    from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_errors

    n, p, k = shape
    rng = np.random.RandomState(n + p + k)
    X = rng.randn(n, p) + 3.0 * rng.rand(p)
    y = X @ rng.randn(p, k) + rng.randn(n, k) + 1.0
    if k == 1:
        y = y[:, 0]
    sw = rng.uniform(0.2, 3.0, n) if weighted else None
    alphas = [1e-5, 0.37, 12.0, 3e4]
    ref = RidgeCV(alphas=alphas, fit_intercept=fit_intercept, store_cv_results=True)
    ref.fit(X, y, sample_weight=sw)
    decomp = ridge_loo_decomposition(
        torch.tensor(X), torch.tensor(y), None if sw is None else torch.tensor(sw), fit_intercept
    )
    for i, alpha in enumerate(alphas):
        ours = ridge_loo_errors(decomp, torch.tensor(np.log(alpha))).numpy()
        # wide + intercept at tiny alpha: _RidgeGCV itself is only ~1e-8 accurate
        # there (see test_loo_error_exact_at_tiny_alpha); we are exact
        rtol = 1e-6 if (alpha < 1e-3 and n <= p and fit_intercept) else 1e-8
        expected = ref.cv_results_[..., i]
        np.testing.assert_allclose(ours, expected, rtol=rtol, atol=rtol * 1e-2 * expected.max())


@pytest.mark.parametrize("weighted", [False, True])
def test_loo_error_exact_at_tiny_alpha(weighted):
    """Against leave-one-out refits in 40-digit arithmetic (mpmath)."""
    mpmath = pytest.importorskip("mpmath")
    from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_errors

    mpmath.mp.dps = 40
    n, p, alpha = 10, 16, 1e-6
    rng = np.random.RandomState(7)
    X = rng.randn(n, p) + 3.0 * rng.rand(p)
    y = X @ rng.randn(p) + rng.randn(n) + 1.0
    sw = rng.uniform(0.2, 3.0, n) if weighted else np.ones(n)
    exact = []
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        s = [mpmath.mpf(sw[j]) for j in keep]
        total = sum(s)
        x_mean = [sum(s[r] * X[j, c] for r, j in enumerate(keep)) / total for c in range(p)]
        y_mean = sum(s[r] * y[j] for r, j in enumerate(keep)) / total
        Xc = mpmath.matrix(
            [[(X[j, c] - x_mean[c]) * mpmath.sqrt(s[r]) for c in range(p)] for r, j in enumerate(keep)]
        )
        yc = mpmath.matrix([(y[j] - y_mean) * mpmath.sqrt(s[r]) for r, j in enumerate(keep)])
        w = Xc.T * mpmath.lu_solve(Xc * Xc.T + alpha * mpmath.eye(n - 1), yc)
        pred = sum((X[i, c] - x_mean[c]) * w[c] for c in range(p)) + y_mean
        exact.append(float(sw[i] * (y[i] - pred) ** 2))
    decomp = ridge_loo_decomposition(
        torch.tensor(X), torch.tensor(y), torch.tensor(sw) if weighted else None
    )
    ours = ridge_loo_errors(decomp, torch.tensor(np.log(alpha))).numpy()
    np.testing.assert_allclose(ours, exact, rtol=1e-10)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_best_score_is_ridgecv_loo_at_alpha(fit_intercept, weighted):
    X, y = DATASETS["tall"]
    sw = np.random.RandomState(0).uniform(0.5, 2.0, len(y)) if weighted else None
    model = BilevelRidgeCV(fit_intercept=fit_intercept).fit(X, y, sample_weight=sw)
    ref = _loo_mse(X, y, model.alpha_, fit_intercept=fit_intercept) if sw is None else -RidgeCV(
        alphas=[model.alpha_], fit_intercept=fit_intercept
    ).fit(X, y, sample_weight=sw).best_score_
    np.testing.assert_allclose(-model.best_score_, ref, rtol=1e-8)


# ---------------------------------------------------------------- optimality


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_found_alpha_beats_ridgecv_grid(name):
    X, y = DATASETS[name]
    model = BilevelRidgeCV().fit(X, y)
    grid = RidgeCV(alphas=GRID, store_cv_results=True).fit(X, y)
    curve = grid.cv_results_.reshape(len(y), -1, len(GRID)).mean(axis=(0, 1))
    ours = _loo_mse(X, y, model.alpha_)
    assert ours <= curve.min() * (1 + 1e-12)
    assert ours <= -grid.best_score_ * (1 + 1e-12)
    # nearby alphas are no better: a stationary point, or the end of the scan where
    # the curve is flat (alpha far below the spectrum). Exact LOO from the core here:
    # sklearn's own values carry ~1e-9 noise at tiny alpha on wide X.
    from skbilevel.hypergrad import ridge_loo_curve, ridge_loo_decomposition

    decomp = ridge_loo_decomposition(torch.tensor(X), torch.tensor(y))
    near = ridge_loo_curve(decomp, model.alpha_ * np.array([1.0, 0.99, 1.01])).numpy()[:, 0]
    assert near[0] <= near[1:].min() * (1 + 1e-8)
    assert abs(model.hypergradient_info_["extra"]["grad_at_alpha"][0]) <= 1e-4 * ours  # tol=1e-4
    np.testing.assert_allclose(-model.best_score_, ours, rtol=1e-8)
    assert model.history_[-1] <= model.history_[0] + 1e-9 * abs(model.history_[0])
    assert np.all(np.diff(model.history_) <= 1e-9 * abs(model.history_[0]))


def test_alpha_per_target_beats_grid_per_target():
    X, Y = DATASETS["multi_target"]
    model = BilevelRidgeCV(alpha_per_target=True).fit(X, Y)
    assert model.alpha_.shape == (3,) and model.best_score_.shape == (3,)
    grid = RidgeCV(alphas=GRID, alpha_per_target=True).fit(X, Y)
    assert np.all(model.best_score_ >= grid.best_score_ - 1e-12 * np.abs(grid.best_score_))
    for j in range(3):
        np.testing.assert_allclose(
            -model.best_score_[j], _loo_mse(X, Y[:, j], model.alpha_[j]), rtol=1e-8
        )


def test_hypergradient_vanishes_and_matches_finite_differences():
    from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_value_and_grad

    X, y = DATASETS["diabetes"]
    model = BilevelRidgeCV(tol=1e-8).fit(X, y)
    grad = model.hypergradient_info_["extra"]["grad_at_alpha"][0]
    decomp = ridge_loo_decomposition(torch.tensor(X), torch.tensor(y))
    la, eps = np.log(model.alpha_), 1e-4
    fd = (_loo_mse(X, y, np.exp(la + eps)) - _loo_mse(X, y, np.exp(la - eps))) / (2 * eps)
    scale = abs(model.best_score_)
    assert abs(grad) < 1e-6 * scale and abs(fd) < 1e-6 * scale
    # away from the optimum: the core's derivative against sklearn finite differences
    for la in (-3.0, 2.0):
        _, g, _ = ridge_loo_value_and_grad(decomp, la)
        fd = (_loo_mse(X, y, np.exp(la + eps)) - _loo_mse(X, y, np.exp(la - eps))) / (2 * eps)
        np.testing.assert_allclose(float(g[0]), fd, rtol=1e-5)


# ---------------------------------------------------------------- final model


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("name", ["diabetes", "wide", "multi_target"])
def test_coef_equals_ridge_at_alpha(fit_intercept, name):
    X, y = DATASETS[name]
    sw = np.random.RandomState(1).uniform(0.5, 2.0, len(y))
    model = BilevelRidgeCV(fit_intercept=fit_intercept).fit(X, y, sample_weight=sw)
    ref = Ridge(alpha=model.alpha_, fit_intercept=fit_intercept).fit(X, y, sample_weight=sw)
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=1e-8, atol=1e-8 * scale)
    np.testing.assert_allclose(model.intercept_, ref.intercept_, rtol=1e-8, atol=1e-8 * scale)
    np.testing.assert_allclose(model.predict(X), ref.predict(X), rtol=1e-8, atol=1e-8 * scale)


def test_per_target_coef_equals_ridge_with_alpha_array():
    X, Y = DATASETS["multi_target"]
    model = BilevelRidgeCV(alpha_per_target=True).fit(X, Y)
    ref = Ridge(alpha=model.alpha_).fit(X, Y)
    np.testing.assert_allclose(model.coef_, ref.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(model.intercept_, ref.intercept_, rtol=1e-8, atol=1e-10)


def test_shapes_and_sparse_input():
    X, Y = DATASETS["multi_target"]
    model = BilevelRidgeCV().fit(X, Y)
    assert isinstance(model.alpha_, float) and isinstance(model.best_score_, float)
    assert model.coef_.shape == (3, 25) and model.intercept_.shape == (3,)
    assert model.predict(X).shape == (120, 3)
    one = BilevelRidgeCV().fit(X, Y[:, :1])
    # a column target gives RidgeCV's shapes (scikit-learn >= 1.5)
    assert one.coef_.shape == (25,) and one.predict(X).shape == (120,)
    dense = BilevelRidgeCV().fit(X, Y[:, 0])
    sparse = BilevelRidgeCV().fit(sp.csr_matrix(X), Y[:, 0])
    assert sparse.alpha_ == pytest.approx(dense.alpha_, rel=1e-9)
    np.testing.assert_allclose(sparse.predict(sp.csr_matrix(X)), dense.predict(X), rtol=1e-9)
    assert model.n_features_in_ == 25
    assert isinstance(model.n_iter_, int) and model.n_iter_ >= 1
    assert model.hypergradient_info_["strategy"] == "closed_form"


def test_float32_and_alpha_init_local_search():
    X, y = DATASETS["diabetes"]
    ref = BilevelRidgeCV().fit(X, y)
    f32 = BilevelRidgeCV(dtype="float32").fit(X, y)
    assert f32.coef_.dtype == np.float32
    assert f32.alpha_ == pytest.approx(ref.alpha_, rel=0.05)
    local = BilevelRidgeCV(alpha_init=1.0).fit(X, y)
    assert local.alpha_ == pytest.approx(ref.alpha_, rel=1e-3)
    # far above the optimum the bracketing steps overshoot onto the least-squares
    # plateau: the search stopped there (alpha 3.4e-8, LOO 3001.75 against 2999.77)
    far = BilevelRidgeCV(alpha_init=1e6).fit(X, y)
    assert far.alpha_ == pytest.approx(ref.alpha_, rel=1e-3)
    assert far.best_score_ == pytest.approx(ref.best_score_, rel=1e-9)


@pytest.mark.parametrize("cv", [None, 5])
def test_float32_fit_does_not_depend_on_offsets_of_the_data(cv):
    # the core centres in the fit's dtype: float32 y + 1e5 keeps 3 digits of its
    # variation and X + 1e4 loses its own. A two-target fit on both had alphas 1.5%
    # (LOO) and 175% (cv=5) off the unshifted data's, and predicted 2.1 away from
    # the float64 fit. The means are now taken in float64 first (what is left is
    # float32's rounding: 8e-4 with cv=5)
    X, y = load_diabetes(return_X_y=True)
    Y = np.c_[y, 2 * y + 7]
    ref = BilevelRidgeCV(cv=cv, alpha_per_target=True).fit(X + 1e4, Y + 1e5)
    f32 = BilevelRidgeCV(cv=cv, alpha_per_target=True, dtype="float32")
    base = clone(f32).fit(X, Y)
    f32.fit(X + 1e4, Y + 1e5)
    np.testing.assert_allclose(f32.alpha_, base.alpha_, rtol=5e-3)
    assert np.abs(f32.predict(X + 1e4) - ref.predict(X + 1e4)).max() < 0.1
    assert np.abs(f32.predict(X + 1e4) - base.predict(X) - 1e5).max() < 0.1
    # one target: intercept_ stays a float
    one = BilevelRidgeCV(cv=cv, dtype="float32").fit(X + 1e4, y + 1e5)
    assert isinstance(one.intercept_, float)


@pytest.mark.parametrize("cv", [None, 3])
def test_alpha_scales_with_the_features(cv):
    # X * s has the same curve in alpha / s^2. The scan's two ranges (RidgeCV's
    # [1e-6, 1e6] and the spectrum's) did not meet for s = 1e8 (the optimum at
    # 3e14 lay in the gap), and for s = 1e-4 the optimum lay below the grid (the
    # curve is not flat at l_min / 100): alpha_ / s^2 was 1e-10 and 0.178
    X, y = make_regression(40, 6, noise=5.0, random_state=0)
    ref = BilevelRidgeCV(cv=cv).fit(X, y)
    for s in (1e-4, 1e8):
        model = BilevelRidgeCV(cv=cv).fit(X * s, y)
        assert model.alpha_ / s**2 == pytest.approx(ref.alpha_, rel=1e-4)
        assert model.best_score_ == pytest.approx(ref.best_score_, rel=1e-9)


@pytest.mark.parametrize("cv", [None, 3])
def test_alpha_init_with_one_alpha_per_target(cv):
    # alpha_init started one search for all targets: a (1,) phi for a (2,)
    # penalty (ValueError from the core) with cv=None, a RuntimeError with cv=3
    X, Y = make_regression(40, 5, n_targets=2, noise=5.0, random_state=0)
    Y[:, 1] *= 10.0  # different noise levels: different alphas
    scan = BilevelRidgeCV(alpha_per_target=True, cv=cv).fit(X, Y)
    local = BilevelRidgeCV(alpha_init=1.0, alpha_per_target=True, cv=cv).fit(X, Y)
    assert local.alpha_.shape == (2,)
    np.testing.assert_allclose(local.alpha_, scan.alpha_, rtol=1e-3)


# ---------------------------------------------------------------- K-fold / holdout


def _kfold_mse(X, y, alpha, splits):
    errs = []
    for train, test in splits:
        pred = Ridge(alpha=alpha).fit(X[train], y[train]).predict(X[test])
        errs.append(np.mean((pred - y[test]) ** 2))
    return float(np.mean(errs))


def test_kfold_matches_sklearn_and_beats_gridsearch():
    X, y = DATASETS["diabetes"]
    model = BilevelRidgeCV(cv=5).fit(X, y)
    splits = list(KFold(5).split(X))
    ours = _kfold_mse(X, y, model.alpha_, splits)
    np.testing.assert_allclose(-model.best_score_, ours, rtol=1e-8)
    gs = GridSearchCV(Ridge(), {"alpha": GRID}, cv=5, scoring="neg_mean_squared_error")
    gs.fit(X, y)
    assert ours <= -gs.best_score_ * (1 + 1e-12)
    for factor in (0.99, 1.01):
        assert ours <= _kfold_mse(X, y, model.alpha_ * factor, splits) * (1 + 1e-12)


@pytest.mark.parametrize("strategy", ["dense", "cg"])
def test_kfold_with_implicit_strategies_agrees(strategy):
    if strategy not in available_strategies():
        pytest.skip(f"strategy {strategy!r} not available")
    X, y = DATASETS["tall"]
    ref = BilevelRidgeCV(cv=3).fit(X, y)
    model = BilevelRidgeCV(cv=3, hypergradient=strategy, n_jobs=2).fit(X, y)
    assert model.alpha_ == pytest.approx(ref.alpha_, rel=1e-3)
    assert model.hypergradient_info_["strategy"] == strategy


def test_validation_fraction_is_a_single_holdout():
    X, y = DATASETS["tall"]
    model = BilevelRidgeCV(validation_fraction=0.25, random_state=0).fit(X, y)
    splits = list(ShuffleSplit(1, test_size=0.25, random_state=0).split(X))
    np.testing.assert_allclose(-model.best_score_, _kfold_mse(X, y, model.alpha_, splits), rtol=1e-8)
    again = BilevelRidgeCV(validation_fraction=0.25, random_state=0).fit(X, y)
    assert again.alpha_ == model.alpha_


# ---------------------------------------------------------------- integration


def test_pipeline_clone_pickle():
    X, y = DATASETS["diabetes"]
    pipe = make_pipeline(StandardScaler(), BilevelRidgeCV()).fit(X, y)
    Xs = StandardScaler().fit_transform(X)
    direct = BilevelRidgeCV().fit(Xs, y)
    assert pipe[-1].alpha_ == pytest.approx(direct.alpha_, rel=1e-9)
    assert pipe.score(X, y) > 0.5
    cloned = clone(pipe[-1])
    assert not hasattr(cloned, "alpha_") and cloned.get_params() == pipe[-1].get_params()
    restored = pickle.loads(pickle.dumps(pipe))
    np.testing.assert_array_equal(restored.predict(X), pipe.predict(X))


def test_verbose_prints(capsys):
    X, y = DATASETS["diabetes"]
    BilevelRidgeCV(verbose=1).fit(X, y)
    out = capsys.readouterr().out
    assert "scanned" in out and "alpha_" in out


def test_convergence_warning_with_numbers():
    X, y = DATASETS["tall"]
    with pytest.warns(ConvergenceWarning, match=r"max_iter=1 .*tol=1e-12"):
        model = BilevelRidgeCV(max_iter=1, tol=1e-12).fit(X, y)
    # still never worse than the grid
    grid = RidgeCV(alphas=GRID).fit(X, y)
    assert model.best_score_ >= grid.best_score_


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_matches_cpu_and_pickles_to_numpy():
    X, y = DATASETS["wide"]
    cpu = BilevelRidgeCV().fit(X, y)
    gpu = BilevelRidgeCV(device="cuda").fit(X, y)
    assert gpu.alpha_ == pytest.approx(cpu.alpha_, rel=1e-6)
    assert isinstance(gpu.coef_, np.ndarray)
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad input


def test_rank_deficient_and_constant_columns_fit_silently():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 5)
    X = np.hstack([X, X[:, :2] + X[:, 2:4], np.full((40, 1), 3.0)])  # rank 5 of 8, constant col
    y = X[:, 0] - 2 * X[:, 4] + 0.1 * rng.randn(40)
    for kwargs in ({}, {"fit_intercept": False}, {"cv": 4}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = BilevelRidgeCV(**kwargs).fit(X, y)
        assert np.all(np.isfinite(model.coef_)) and np.isfinite(model.alpha_)
    wide = np.hstack([X, X])  # p > n path, duplicated columns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BilevelRidgeCV().fit(wide[:10], y[:10])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_rejected(bad):
    X, y = DATASETS["diabetes"]
    X = X.copy()
    X[3, 2] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        BilevelRidgeCV().fit(X, y)
    y2 = y.copy()
    y2[0] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        BilevelRidgeCV().fit(DATASETS["diabetes"][0], y2)


@pytest.mark.parametrize(
    "kwargs, data, match",
    [
        ({}, "mismatch", "inconsistent numbers of samples"),
        ({}, "one", "at least 2 samples"),
        ({"alpha_init": 0.0}, "ok", "alpha_init"),
        ({"alpha_init": -1.0}, "ok", "alpha_init"),
        ({"cv": 50}, "small", r"cv=50 folds need at least 50 samples.*cv=None"),
        ({"device": "cuda:99"}, "ok", "device"),
        ({"cv": 3, "validation_fraction": 0.2}, "ok", "cannot both be set"),
        ({"hypergradient": "cg"}, "ok", "needs cv"),
        ({"hypergradient": "no_such"}, "ok", "Unknown hypergradient strategy"),
        ({"dtype": "int8"}, "ok", "dtype"),
        # unrolled strategies need an iterative inner solver: it said "Pass
        # solver=GradientDescent(...)", a parameter BilevelRidgeCV does not have
        ({"hypergradient": "reverse", "cv": 3}, "ok", "solves ridge exactly"),
        ({"hypergradient": "darts", "cv": 3}, "ok", "'closed_form' is exact"),
        # these failed inside numpy or torch
        ({}, "strings", "numeric target"),
        ({"cv": []}, "ok", "produced no split"),
        ({"cv": [(np.arange(30), np.arange(430, 445))]}, "ok", "out of range"),
        # no half-precision eigendecomposition on CPU: not torch's NotImplementedError
        ({"dtype": "float16"}, "ok", "dtype='float16' is not supported here"),
    ],
)
def test_bad_input_messages(kwargs, data, match):
    X, y = DATASETS["diabetes"]
    if data == "mismatch":
        X, y = X[:10], y[:9]
    elif data == "one":
        X, y = X[:1], y[:1]
    elif data == "small":
        X, y = X[:20], y[:20]
    elif data == "strings":
        y = np.where(y > np.median(y), "high", "low")
    with pytest.raises(ValueError, match=match):
        BilevelRidgeCV(**kwargs).fit(X, y)


def test_cuda_unavailable_message():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    X, y = DATASETS["diabetes"]
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        BilevelRidgeCV(device="cuda").fit(X, y)


def test_negative_sample_weight_rejected():
    X, y = DATASETS["diabetes"]
    sw = np.ones(len(y))
    sw[0] = -1
    with pytest.raises(ValueError, match="[Nn]egative"):
        BilevelRidgeCV().fit(X, y, sample_weight=sw)


def test_predict_before_fit():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        BilevelRidgeCV().predict(np.zeros((2, 3)))


def test_folds_without_weight_name_the_fold():
    rng = np.random.RandomState(0)
    X, y = rng.randn(20, 3), rng.randn(20)
    sw = np.r_[np.zeros(10), np.ones(10)]
    # validation part of folds 0 and 1 without weight: a 0/0 error made every
    # alpha NaN, and the fit returned alpha=1e-6 with a ConvergenceWarning
    with pytest.raises(ValueError, match="validation samples of fold 0 \\(of 5\\)"):
        BilevelRidgeCV(cv=5).fit(X, y, sample_weight=sw)
    # training part of fold 0 without weight: LinAlgError 'Eigenvalues did not converge'
    with pytest.raises(ValueError, match="training samples of fold 0 \\(of 2\\)"):
        BilevelRidgeCV(cv=2).fit(X, y, sample_weight=sw[::-1])
    # shuffled folds all carry weight: the fit goes through
    BilevelRidgeCV(cv=KFold(5, shuffle=True, random_state=0)).fit(X, y, sample_weight=sw)


# numpy's "overflow encountered in matmul" (and "invalid value" on inf) came
# before the ValueError
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_data_too_large_for_the_dtype_is_a_clear_error():
    rng = np.random.RandomState(0)
    X, y = rng.randn(20, 3), rng.randn(20)
    # X * 1e200: LinAlgError 'Eigenvalues did not converge'; y * 1e200: overflow
    # warnings, then alpha=1e-6 with a ConvergenceWarning
    with pytest.raises(ValueError, match=r"X\^T X overflows float64.*Rescale"):
        BilevelRidgeCV().fit(X * 1e200, y)
    with pytest.raises(ValueError, match="sum of squares of y overflows float64"):
        BilevelRidgeCV().fit(X, y * 1e200)
    with pytest.raises(ValueError, match=r"X\^T X overflows float32"):
        BilevelRidgeCV(dtype="float32").fit(X * 1e20, y)


def test_zero_error_score_and_warning_location():
    rng = np.random.RandomState(0)
    X = rng.randn(20, 3)
    # a constant target: best_score_ was -0.0 (RidgeCV: 0.0)
    score = BilevelRidgeCV().fit(X, np.full(20, 5.0)).best_score_
    assert score == 0.0 and np.copysign(1.0, score) == 1.0
    scores = BilevelRidgeCV(alpha_per_target=True).fit(X, np.full((20, 2), 5.0)).best_score_
    assert np.all(np.copysign(1.0, scores) == 1.0)
    # the ConvergenceWarning pointed at sklearn/base.py's _fit_context wrapper
    with pytest.warns(ConvergenceWarning) as record:
        BilevelRidgeCV(max_iter=1).fit(X, rng.randn(20))
    assert record[0].filename == __file__


@pytest.mark.parametrize("cv", [5, None])
def test_float32_with_a_target_offset_finds_the_float64_alpha(cv):
    # targets near 1e5 in float32: the validation residual y - (X w + b) lost its
    # digits to the offset (~4e-3 per sample), the K-fold curve was noisy and
    # alpha_ came out 1.5% of the float64 one (17% off with an offset of 1e3)
    rng = np.random.RandomState(0)
    X = rng.randn(200, 10)
    y = X @ rng.randn(10) + rng.randn(200) + 1e5
    a32 = BilevelRidgeCV(cv=cv, dtype="float32").fit(X, y).alpha_
    a64 = BilevelRidgeCV(cv=cv).fit(X, y).alpha_
    assert abs(a32 / a64 - 1) < 0.03
