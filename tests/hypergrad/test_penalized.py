"""Fold-batched penalized models: closed forms, LOO and hypergradients vs references."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression, Ridge

from skbilevel.hypergrad import (
    LogisticFolds,
    NewtonCG,
    RidgeFolds,
    RidgeLOO,
    adaptive_penalty_basis,
    attach_gradient,
    penalty_per_feature,
)
from skbilevel.hypergrad._sparse import to_csr

DT = torch.float64


def _data(n=30, p=5, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, p) * rng.uniform(0.5, 2.0, p) + rng.randn(p)
    y = X @ rng.randn(p) + 0.5 * rng.randn(n) + 1.0
    sw = rng.uniform(0.2, 2.0, n)
    return X, y, sw


def _ridge_per_feature(X, y, alpha, sw, fit_intercept=True):
    """Per-feature ridge via sklearn: rescale column j by 1/sqrt(alpha_j)."""
    s = 1.0 / np.sqrt(alpha)
    est = Ridge(alpha=1.0, fit_intercept=fit_intercept, solver="cholesky").fit(
        X * s, y, sample_weight=sw
    )
    return est.coef_ * s, est.intercept_


def _folds(n, k=3, seed=0):
    idx = np.random.RandomState(seed).permutation(n)
    T = np.ones((k, n))
    for f, chunk in enumerate(np.array_split(idx, k)):
        T[f, chunk] = 0.0
    return T


@pytest.mark.parametrize("method", ["primal", "dual"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_folds_matches_sklearn(method, fit_intercept):
    X, y, sw = _data()
    T = _folds(len(y)) * sw
    alpha = np.exp(np.linspace(-2, 2, X.shape[1]))
    folds = RidgeFolds(
        torch.tensor(X),
        torch.tensor(y),
        torch.tensor(T),
        fit_intercept=fit_intercept,
        method=method,
    )
    coef = folds.closed_form(torch.tensor(np.log(alpha)))
    b = folds.intercepts(coef)
    for k in range(T.shape[0]):
        m = T[k] > 0
        ref_w, ref_b = _ridge_per_feature(X[m], y[m], alpha, T[k][m], fit_intercept)
        np.testing.assert_allclose(coef[k].numpy(), ref_w, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(float(b[k]), ref_b, rtol=1e-9, atol=1e-11)


def _fd(fun, phi, eps=1e-6):
    g = torch.zeros_like(phi)
    for j in range(phi.numel()):
        e = torch.zeros_like(phi)
        e[j] = eps
        g[j] = (fun(phi + e) - fun(phi - e)) / (2 * eps)
    return g


@pytest.mark.parametrize("strategy", ["closed_form", "cg", "dense"])
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_hypergradient_vs_finite_differences(strategy, method):
    X, y, sw = _data(n=24, p=6)
    T = _folds(len(y)) * sw
    V = (T == 0) * sw
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    folds = RidgeFolds(
        torch.tensor(X),
        torch.tensor(y),
        torch.tensor(T),
        torch.tensor(V),
        groups=groups,
        method=method,
    )
    phi = torch.tensor([0.3, -1.0, 1.5], dtype=DT)
    value, grad, info, _ = folds.value_and_grad(phi, hypergradient=strategy)

    def fun(p):
        with torch.no_grad():
            return folds.validation_loss(folds.closed_form(p))

    torch.testing.assert_close(value, fun(phi))
    torch.testing.assert_close(grad, _fd(fun, phi), rtol=1e-6, atol=1e-9)
    assert info.strategy == strategy
    assert info.inner_grad_norm < 1e-8


def _brute_force_loo(X, y, alpha, sw, fit_intercept):
    n = len(y)
    err = np.empty(n)
    for i in range(n):
        m = np.arange(n) != i
        w, b = _ridge_per_feature(X[m], y[m], alpha, sw[m], fit_intercept)
        err[i] = (y[i] - X[i] @ w - b) ** 2
    return (sw * err).sum() / sw.sum()


@pytest.mark.parametrize("method", ["primal", "dual"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_loo_is_exact(method, fit_intercept):
    X, y, sw = _data(n=15, p=6)
    alpha = np.exp(np.linspace(-1, 2, 6))
    loo = RidgeLOO(
        torch.tensor(X),
        torch.tensor(y),
        torch.tensor(sw),
        fit_intercept=fit_intercept,
        method=method,
    )
    ours = float(loo(torch.tensor(np.log(alpha))))
    np.testing.assert_allclose(
        ours, _brute_force_loo(X, y, alpha, sw, fit_intercept), rtol=1e-9
    )


def _stable_loo(X, y, alpha, sw, fit_intercept):
    """Brute-force leave-one-out error from backward-stable refits: each ridge
    as the least-squares problem [Xs A^(-1/2); I] u = [ys; 0] (QR), accurate
    whatever the spread of the penalties."""
    n, p = X.shape
    err = np.empty(n)
    for i in range(n):
        m = np.arange(n) != i
        s = sw[m]
        x_off = s @ X[m] / s.sum() if fit_intercept else np.zeros(p)
        y_off = s @ y[m] / s.sum() if fit_intercept else 0.0
        Xs = (X[m] - x_off) * np.sqrt(s)[:, None] / np.sqrt(alpha)
        rhs = np.r_[(y[m] - y_off) * np.sqrt(s), np.zeros(p)]
        u = np.linalg.lstsq(np.vstack([Xs, np.eye(p)]), rhs, rcond=None)[0]
        err[i] = (y[i] - y_off - (X[i] - x_off) @ (u / np.sqrt(alpha))) ** 2
    return (sw * err).sum() / sw.sum()


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("decades", [3, 9, 12])
def test_ridge_loo_dual_with_penalties_over_many_decades(decades, fit_intercept):
    # near interpolation 1 - H_ii is tiny; with an intercept the dual form took it
    # as M_ii - q_i^2, a difference of two terms near 1/n: at +-9 decades 4.5
    # times the exact error (with sample weights), at +-12 all of it lost
    rng = np.random.RandomState(1)
    n, p = 40, 120
    X = rng.randn(n, p) * 3 + 1
    y = X[:, :5] @ rng.randn(5) + 0.1 * rng.randn(n) + 2
    sw = rng.uniform(0.2, 3, n)
    sw[[0, 7]] = 0.0  # zero weights too, the first row's among them
    phi = np.linspace(-decades, decades, p) * np.log(10)
    rng.shuffle(phi)
    ref = _stable_loo(X, y, np.exp(phi), sw, fit_intercept)
    args = torch.tensor(X), torch.tensor(y), torch.tensor(sw)
    loo = RidgeLOO(*args, fit_intercept=fit_intercept, method="dual")
    np.testing.assert_allclose(float(loo(torch.tensor(phi))), ref, rtol=1e-6)
    # float32 data: the dual form computes in float64 all the same
    loo32 = RidgeLOO(*(a.float() for a in args), fit_intercept=fit_intercept)
    np.testing.assert_allclose(float(loo32(torch.tensor(phi).float())), ref, rtol=1e-5)
    # its gradient agrees with the primal form's (which matched finite
    # differences of the refits above to 3e-9; at +-12 decades the primal form
    # is itself 3e-8 off an mpmath reference, and the dual 1e-15: see the
    # next tests). Autograd through the dual form's explicit inverse had been
    # 2e-3 off the primal form's at +-12 decades and 2e-6 at +-9
    primal = RidgeLOO(*args, fit_intercept=fit_intercept, method="primal")
    g = loo.value_and_grad(torch.tensor(phi))[1]
    gp = primal.value_and_grad(torch.tensor(phi))[1]
    tol = 1e-8 if decades == 3 else 1e-6
    torch.testing.assert_close(g, gp, rtol=0, atol=tol * float(gp.abs().max()))


def test_ridge_loo_dual_refuses_a_second_derivative():
    X, y, _ = _data(8, 12)
    loo = RidgeLOO(torch.tensor(X), torch.tensor(y), method="dual")
    phi = torch.zeros(12, dtype=DT, requires_grad=True)
    with pytest.raises(RuntimeError, match="differentiable once.*method='primal'"):
        torch.autograd.grad(loo(phi), phi, create_graph=True)
    # the primal form has them
    primal = RidgeLOO(torch.tensor(X), torch.tensor(y), method="primal")
    (g,) = torch.autograd.grad(primal(phi), phi, create_graph=True)
    assert torch.autograd.grad(g.sum(), phi)[0].shape == (12,)


def _loo_mpmath(X, y, sw, phi, dps=60):
    """The weighted leave-one-out error (intercept fitted) in ``dps`` digits:
    the primal hat matrix of the centred, ``sqrt(s)``-scaled rows."""
    mpmath = pytest.importorskip("mpmath")
    n, p = X.shape
    with mpmath.workdps(dps):
        s = [mpmath.mpf(float(v)) for v in sw]
        S = mpmath.fsum(s)
        xbar = [mpmath.fsum(s[i] * X[i, j] for i in range(n)) / S for j in range(p)]
        ybar = mpmath.fsum(s[i] * y[i] for i in range(n)) / S
        Xm, ym = mpmath.matrix(n, p), mpmath.matrix(n, 1)
        for i in range(n):
            ym[i] = mpmath.sqrt(s[i]) * (y[i] - ybar)
            for j in range(p):
                Xm[i, j] = mpmath.sqrt(s[i]) * (X[i, j] - xbar[j])
        G = Xm.T * Xm + mpmath.diag([mpmath.exp(f) for f in phi])
        H = Xm * mpmath.inverse(G) * Xm.T
        r = ym - H * ym
        return mpmath.fsum(
            (r[i] / (1 - H[i, i] - s[i] / S)) ** 2 for i in range(n)
        ) / S


def test_ridge_loo_dual_to_the_last_digits():
    # penalties over +-12 decades, far below and far above their features'
    # squared norms: the dual form's value and gradient (from the sorted QR
    # factor) against mpmath, along the smallest penalties' coordinates too.
    # The explicit inverse it replaced was 1e-9 off in the value and 5e-9 in
    # the gradient here (1.5e-5 and 1.4e-5 on 25 x 50)
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.RandomState(1)
    n, p = 12, 30
    X = rng.randn(n, p) * 3 + 1
    y = X[:, :3] @ rng.randn(3) + 0.1 * rng.randn(n) + 2
    sw = rng.uniform(0.2, 3, n)
    sw[4] = 0.0
    phi = np.linspace(-12, 12, p) * np.log(10)
    rng.shuffle(phi)
    loo = RidgeLOO(torch.tensor(X), torch.tensor(y), torch.tensor(sw), method="dual")
    value, grad, _ = loo.value_and_grad(torch.tensor(phi))
    with mpmath.workdps(60):
        ph = [mpmath.mpf(float(f)) for f in phi]
        Xm = np.array([[mpmath.mpf(float(v)) for v in row] for row in X], dtype=object)
        ym = [mpmath.mpf(float(v)) for v in y]
        ref = float(_loo_mpmath(Xm, ym, sw, ph))
        np.testing.assert_allclose(float(value), ref, rtol=1e-13)
        h = mpmath.mpf("1e-25")
        smallest = np.eye(p)[np.argsort(phi)[:3]]
        for d in (np.sign(phi) * (phi < -5), rng.randn(p), *smallest):
            up = _loo_mpmath(Xm, ym, sw, [a + h * float(b) for a, b in zip(ph, d)])
            down = _loo_mpmath(Xm, ym, sw, [a - h * float(b) for a, b in zip(ph, d)])
            slope = float((up - down) / (2 * h))
            err = abs(float(grad @ torch.tensor(d)) - slope)
            assert err <= 1e-13 * float(grad.norm()) * np.linalg.norm(d)


@pytest.mark.parametrize("shape", [(20, 4), (8, 12)])
def test_ridge_loo_gradient_vs_finite_differences(shape):
    X, y, sw = _data(*shape)
    loo = RidgeLOO(torch.tensor(X), torch.tensor(y), torch.tensor(sw))
    phi = torch.linspace(-1, 1, shape[1], dtype=DT)
    value, grad, info = loo.value_and_grad(phi)
    fd = _fd(lambda p: loo(p).detach(), phi, eps=1e-5)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6 * float(fd.abs().max()))
    assert info.extra["objective"] == "leave_one_out"


def test_ridge_loo_groups_and_curve():
    X, y, _ = _data(n=25, p=4)
    groups = torch.tensor([0, 1, 1, 0])
    loo = RidgeLOO(torch.tensor(X), torch.tensor(y), groups=groups)
    full = RidgeLOO(torch.tensor(X), torch.tensor(y))
    phi = torch.tensor([0.5, -0.5], dtype=DT)
    torch.testing.assert_close(loo(phi), full(phi[groups]))
    curve = loo.validation_curve([-1.0, 0.0])
    torch.testing.assert_close(curve[1], loo(torch.zeros(2, dtype=DT)))
    with pytest.raises(ValueError, match="one log-penalty per group"):
        loo(torch.zeros(3, dtype=DT))


def _class_data(n=80, p=4, n_classes=2, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, p)
    W = rng.randn(p, n_classes) * 2
    y = np.argmax(X @ W + rng.gumbel(size=(n, n_classes)), axis=1)
    return X, y


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_folds_matches_sklearn(n_classes):
    X, y = _class_data(n_classes=n_classes)
    T = _folds(len(y), k=2)
    folds = LogisticFolds(torch.tensor(X), torch.tensor(y), n_classes, torch.tensor(T))
    alpha = 2.0
    theta, res = folds.solve(torch.full((4,), np.log(alpha), dtype=DT))
    assert res.converged
    for k in range(2):
        m = T[k] > 0
        ref = LogisticRegression(C=1 / alpha, tol=1e-12, max_iter=10000).fit(X[m], y[m])
        proba = torch.softmax(folds.logits(theta)[:, k], -1) if n_classes > 2 else None
        if n_classes == 2:
            np.testing.assert_allclose(
                theta["coef"][:, k, 0].numpy(), ref.coef_[0], rtol=1e-5
            )
            np.testing.assert_allclose(
                float(theta["intercept"][k, 0]), ref.intercept_[0], rtol=1e-5
            )
        else:
            np.testing.assert_allclose(
                proba.numpy(), ref.predict_proba(X), rtol=1e-5, atol=1e-8
            )


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_hypergradient_vs_finite_differences(n_classes):
    X, y = _class_data(n=60, p=3, n_classes=n_classes)
    T = _folds(len(y), k=2)
    V = 1.0 - T
    folds = LogisticFolds(
        torch.tensor(X), torch.tensor(y), n_classes, torch.tensor(T), torch.tensor(V)
    )
    phi = torch.tensor([0.0, 1.0, -0.5], dtype=DT)
    value, grad, info, _ = folds.value_and_grad(
        phi, solver=folds.default_solver(tol=1e-12)
    )
    ref = LogisticFolds(
        torch.tensor(X), torch.tensor(y), n_classes, torch.tensor(T), torch.tensor(V)
    )
    solver = ref.default_solver(tol=1e-12)

    def fun(p):
        theta, _ = ref.solve(p, solver)
        with torch.no_grad():
            return ref.validation_loss(theta)

    torch.testing.assert_close(grad, _fd(fun, phi, eps=1e-4), rtol=1e-5, atol=1e-6)
    assert info.strategy == "cg" and info.linear_solve_converged
    _, grad_dense, _, _ = folds.value_and_grad(phi, hypergradient="dense")
    torch.testing.assert_close(grad, grad_dense, rtol=1e-6, atol=1e-10)


def test_logistic_validation_curve_warm_path():
    X, y = _class_data()
    T = _folds(len(y), k=2)
    folds = LogisticFolds(
        torch.tensor(X), torch.tensor(y), 2, torch.tensor(T), torch.tensor(1.0 - T)
    )
    curve = folds.validation_curve([-2.0, 0.0, 2.0])
    assert curve.shape == (3,) and bool(torch.isfinite(curve).all())
    # the warm path (with its first-order predictor) gives the cold solutions' values
    solver = NewtonCG(tol=1e-10)
    for la, value in zip([-2.0, 0.0, 2.0], curve):
        cold = folds.reparametrized(groups=torch.zeros(X.shape[1], dtype=torch.long))
        theta, _ = cold.solve(torch.full((1,), la, dtype=DT), solver, init=cold.init_theta())
        assert float(folds.validation_loss(theta)) == pytest.approx(float(value), rel=1e-6)
    # the predictor is first-order accurate along the path
    shared = folds.reparametrized(groups=torch.zeros(X.shape[1], dtype=torch.long))
    phi0, phi1 = torch.full((1,), 0.0, dtype=DT), torch.full((1,), -0.1, dtype=DT)
    theta0, _ = shared.solve(phi0, solver, init=shared.init_theta())
    theta1, _ = shared.solve(phi1, solver, init=shared.init_theta())
    gap = lambda t: float(sum((t[k] - theta1[k]).norm() ** 2 for k in t)) ** 0.5
    # with the last Gram matrix, formed at theta1's solve: still a better start
    assert gap(shared._path_predictor(theta0, phi0, phi1)) < 0.2 * gap(theta0)
    # with the one at theta0 (as along a curve: the last solve was at phi0)
    shared.hessian_preconditioner(theta0, phi0, exact=True)
    assert gap(shared._path_predictor(theta0, phi0, phi1)) < 0.05 * gap(theta0)


def test_logistic_preconditioner_reuses_its_gram_while_the_weights_barely_move(monkeypatch):
    X, y = _class_data(n=120, p=5)
    T = _folds(len(y), k=3)
    folds = LogisticFolds(
        torch.tensor(X), torch.tensor(y), 2, torch.tensor(T), torch.tensor(1.0 - T)
    )
    phi = torch.zeros(5, dtype=DT)
    theta, _ = folds.solve(phi, NewtonCG(tol=1e-10))
    formed = []
    gram = LogisticFolds._weighted_gram
    monkeypatch.setattr(
        LogisticFolds,
        "_weighted_gram",
        lambda self, w, exact=True: formed.append(1) or gram(self, w, exact),
    )
    near = {k: v * 1.001 for k, v in theta.items()}  # weights move by far less than 10%
    folds.hessian_preconditioner(theta, phi, exact=True)
    reused = folds.hessian_preconditioner(near, phi)
    exact = folds.hessian_preconditioner(near, phi, exact=True)
    assert len(formed) == 2  # the near point reuses the Gram matrix; exact=True does not
    folds.hessian_preconditioner(folds.init_theta(), phi)  # all weights 1/4: far
    assert len(formed) == 3
    # the reused inverse is close to the exact one, and exact is exact
    r = folds.hvp(near, phi, {k: torch.ones_like(v) for k, v in near.items()})
    for k, v in exact(r).items():
        torch.testing.assert_close(v, torch.ones_like(v), rtol=1e-10, atol=1e-10)
        assert float((reused(r)[k] - v).norm() / v.norm()) < 0.05


def test_logistic_preconditioner_gram_in_hvp_dtype_unless_exact():
    # a reused preconditioner's Gram matrix is formed in the products'
    # precision; the exact one (value_grad_hessian's) stays in X's
    X, y = _class_data(n=120, p=5)
    T = torch.tensor(_folds(len(y), k=3))
    args = (torch.tensor(X), torch.tensor(y), 2, T, 1.0 - T)
    low = LogisticFolds(*args, hvp_dtype=torch.float32)
    ref = LogisticFolds(*args)
    phi = torch.linspace(-1.0, 1.0, 5, dtype=DT)
    theta, _ = ref.solve(phi, NewtonCG(tol=1e-10))
    w = ref._curvature(theta)[1][:, 0, :]
    ref.hessian_preconditioner(theta, phi)  # builds _X_aug
    low.hessian_preconditioner(theta, phi)
    exact64 = ref._weighted_gram(w)
    assert low._weighted_gram(w, exact=False).dtype == torch.float32
    assert ref._weighted_gram(w, exact=False).dtype == DT
    # not below float32
    half = LogisticFolds(*args, hvp_dtype=torch.bfloat16)
    half.hessian_preconditioner(theta, phi)
    assert half._weighted_gram(w, exact=False).dtype == DT
    torch.testing.assert_close(low._weighted_gram(w), exact64, rtol=0, atol=0)
    torch.testing.assert_close(
        low._weighted_gram(w, exact=False).to(DT), exact64, rtol=1e-5, atol=1e-6
    )
    # the preconditioner (not the answer) changes: the same solution to tolerance
    solution, info = low.solve(phi, NewtonCG(tol=1e-10))
    assert info.converged
    for k in theta:
        torch.testing.assert_close(solution[k], theta[k], rtol=1e-8, atol=1e-9)
    inv = low.hessian_preconditioner(theta, phi, exact=True)
    r = ref.hvp(theta, phi, {k: torch.ones_like(v) for k, v in theta.items()})
    for v in inv(r).values():
        torch.testing.assert_close(v, torch.ones_like(v), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_all_rows_is_the_problem_on_all_rows(fit_intercept, method):
    X, y, sw = (torch.tensor(a) for a in _data(n=30, p=5 if method == "primal" else 40))
    T = torch.tensor(_folds(30, k=3)) * sw
    folds = RidgeFolds(X, y, T, sw - T, fit_intercept=fit_intercept, method=method)
    phi = torch.linspace(-1.0, 1.0, X.shape[1], dtype=DT)
    full = folds.all_rows(sw)
    fresh = RidgeFolds(X, y, sw, fit_intercept=fit_intercept, method=method)
    torch.testing.assert_close(full.closed_form(phi), fresh.closed_form(phi), rtol=1e-10, atol=1e-12)
    theta = full.closed_form(phi)
    torch.testing.assert_close(full.intercepts(theta), fresh.intercepts(theta), rtol=1e-10, atol=1e-12)
    if method == "primal":  # the folds' all-rows Gram matrix, reused
        assert full.gram[0].data_ptr() == folds._all_rows[3].data_ptr()
    # other weights: built anew, still right
    other = folds.all_rows(torch.ones(30, dtype=DT))
    ref = RidgeFolds(X, y, torch.ones(30, dtype=DT), fit_intercept=fit_intercept, method=method)
    torch.testing.assert_close(other.closed_form(phi), ref.closed_form(phi), rtol=1e-10, atol=1e-12)


def test_attach_gradient_and_penalty():
    phi = torch.zeros(3, dtype=DT, requires_grad=True)
    out = attach_gradient(
        torch.tensor(2.0, dtype=DT), torch.tensor([1.0, 2.0, 3.0], dtype=DT), phi
    )
    (out * 2).backward()
    assert float(out.detach()) == 2.0
    assert phi.grad.tolist() == [2.0, 4.0, 6.0]
    a = penalty_per_feature(torch.tensor([0.0, 1.0], dtype=DT), torch.tensor([1, 0]))
    torch.testing.assert_close(a, torch.tensor([np.e, 1.0], dtype=DT))


def test_bad_inputs_raise():
    X = torch.randn(10, 3, dtype=DT)
    y = torch.randn(10, dtype=DT)
    with pytest.raises(ValueError, match="shape"):
        RidgeFolds(X, y, torch.ones(2, 9, dtype=DT))
    with pytest.raises(ValueError, match="non-negative"):
        RidgeFolds(X, y, -torch.ones(10, dtype=DT))
    with pytest.raises(ValueError, match="groups"):
        RidgeFolds(X, y, torch.ones(10, dtype=DT), groups=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        LogisticFolds(X, torch.full((10,), 3), 2, torch.ones(10, dtype=DT))
    with pytest.raises(ValueError, match="at least 2"):
        LogisticFolds(X, torch.zeros(10), 1, torch.ones(10, dtype=DT))


# ------------------------------------------------------------- preconditioning


def _scaled_logistic(n_classes, fit_intercept, n=120, p=24, k=2, seed=1):
    """Features and penalties spanning decades: a badly scaled inner Hessian."""
    X, y = _class_data(n=n, p=p, n_classes=n_classes, seed=seed)
    X = X * np.logspace(-1.5, 1.5, p)
    T = _folds(n, k=k, seed=seed) * np.random.RandomState(seed).uniform(0.5, 2.0, n)
    folds = LogisticFolds(
        torch.tensor(X), torch.tensor(y), n_classes, torch.tensor(T),
        torch.tensor(1.0 - (T > 0)), groups=torch.arange(p) % 4,
        fit_intercept=fit_intercept,
    )
    phi = torch.tensor([-4.0, -1.0, 2.0, 5.0], dtype=DT)
    return folds, phi


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_hessian_diagonal_is_exact(n_classes, fit_intercept):
    from skbilevel.hypergrad._tree import tree_to_vector, vector_to_tree

    folds, phi = _scaled_logistic(n_classes, fit_intercept)
    g = torch.Generator().manual_seed(0)
    like = folds.init_theta()
    # small logits: torch's softplus is linear beyond 20, where autograd sees no
    # curvature while the exact one is ~exp(-20)
    x = 0.01 * torch.randn(tree_to_vector(like).numel(), generator=g, dtype=DT)
    H = torch.autograd.functional.hessian(
        lambda v: folds(vector_to_tree(v, like), phi), x
    )
    diag = folds.hessian_diagonal(vector_to_tree(x, like), phi)
    assert sorted(diag) == sorted(like)
    assert all(diag[key].shape == like[key].shape for key in like)
    torch.testing.assert_close(
        tree_to_vector(diag), H.diagonal(), rtol=0, atol=1e-12
    )
    assert bool((tree_to_vector(diag) > 0).all())
    with pytest.raises(ValueError, match="one log-penalty per group"):
        folds.hessian_diagonal(like, phi[:2])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_logistic_preconditioned_hypergradient_same_value_fewer_iterations(n_classes):
    from skbilevel.hypergrad import ImplicitCG, NewtonCG

    folds, phi = _scaled_logistic(n_classes, True)
    solver = NewtonCG(tol=1e-11)
    out = {}
    for precondition in (False, True):
        folds.theta_ = None
        strategy = ImplicitCG(tol=1e-11, precondition=precondition)
        out[precondition] = folds.value_and_grad(phi, strategy, solver=solver)
        assert out[precondition][2].extra["preconditioned"] is precondition
        assert out[precondition][2].linear_solve_converged
    (v0, g0, i0, _), (v1, g1, i1, _) = out[False], out[True]
    torch.testing.assert_close(g1, g0, rtol=0, atol=1e-8)
    torch.testing.assert_close(v1, v0, rtol=0, atol=1e-10)
    assert 2 * i1.linear_solve_iterations < i0.linear_solve_iterations
    # NewtonCG found the diagonal too: fewer products for the inner solve
    plain, pre = [], []
    for precondition, sink in ((False, plain), (True, pre)):
        folds.theta_ = None
        _, res = folds.solve(phi, NewtonCG(tol=1e-11, precondition=precondition))
        sink.append(res)
    assert plain[0].converged and pre[0].converged
    assert pre[0].n_hvp < plain[0].n_hvp


# --------------------------------------------------------------------------
# Penalty models: basis, offsets, adaptive basis; fast paths vs reference
# --------------------------------------------------------------------------


def test_adaptive_penalty_basis_groups_centring_and_zero_pilot():
    from skbilevel.hypergrad import adaptive_penalty_basis

    coef = torch.tensor([[2.0, 2.0, 1.0, 0.0], [1.0, -1.0, 3.0, 0.5]], dtype=DT)
    groups = torch.tensor([0, 0, 1, 2])
    B = adaptive_penalty_basis(coef, groups, eps=1e-3)
    assert B.shape == (2, 4, 2)
    torch.testing.assert_close(B[..., 0], torch.ones(2, 4, dtype=DT))
    # features of a group share a column value; a zero pilot gives a finite penalty
    assert bool((B[:, 0, 1] == B[:, 1, 1]).all()) and bool(torch.isfinite(B).all())
    # reference: per-group mean squared coefficient, normalized, u-weighted centring
    for k in range(2):
        sq = coef[k] ** 2
        per = torch.stack([sq[:2].mean(), sq[2], sq[3]])
        u = per / per.mean()
        lu = torch.log(u + 1e-3)
        ref = -(lu - (u * lu).sum() / u.sum())
        torch.testing.assert_close(B[k, :, 1], ref[groups])
    # one pilot vector -> (p, 2)
    assert adaptive_penalty_basis(coef[0]).shape == (4, 2)
    # an all-zero pilot (constant y): every penalty exp(a), no NaN
    B0 = adaptive_penalty_basis(torch.zeros(2, 4, dtype=DT))
    torch.testing.assert_close(B0[..., 1], torch.zeros(2, 4, dtype=DT))


def _reference_coef(folds, X, y, T, alpha, fit_intercept=True):
    """Per-fold ridge via sklearn with per-fold penalties alpha (K, p)."""
    out = []
    for k in range(T.shape[0]):
        m = T[k] > 0
        w, _ = _ridge_per_feature(X[m], y[m], alpha[k], T[k][m], fit_intercept)
        out.append(w)
    return np.stack(out)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_basis_and_offset_match_sklearn_and_fd(method):
    X, y, sw = _data(n=24, p=6)
    T = _folds(len(y)) * sw
    V = (T == 0) * sw
    rng = np.random.RandomState(3)
    basis = torch.tensor(rng.randn(3, 6, 2))
    offset = torch.tensor(rng.randn(3, 6) * 0.5)
    folds = RidgeFolds(
        torch.tensor(X), torch.tensor(y), torch.tensor(T), torch.tensor(V), method=method
    ).reparametrized(basis=basis, log_offset=offset)
    assert folds.n_groups == 2
    phi = torch.tensor([0.2, 0.7], dtype=DT)
    alpha = (basis @ phi + offset).exp()
    coef = folds.closed_form(phi)
    np.testing.assert_allclose(
        coef.numpy(), _reference_coef(folds, X, y, T, alpha.numpy()), rtol=1e-9, atol=1e-11
    )
    value, grad, _, _ = folds.value_and_grad(phi)

    def fun(p):
        with torch.no_grad():
            return folds.validation_loss(folds.closed_form(p))

    torch.testing.assert_close(grad, _fd(fun, phi), rtol=1e-6, atol=1e-9)
    # groups plus a per-fold offset
    g = folds.reparametrized(groups=torch.tensor([0, 0, 1, 1, 2, 2]), log_offset=offset)
    phi3 = torch.tensor([0.1, -0.4, 0.9], dtype=DT)
    torch.testing.assert_close(g._alpha(phi3), (phi3[g.groups] + offset).exp())
    with pytest.raises(ValueError, match="basis column"):
        folds.closed_form(phi3)
    with pytest.raises(ValueError, match="basis must have shape"):
        folds.reparametrized(basis=torch.ones(2, 6, 2, dtype=DT))
    with pytest.raises(ValueError, match="log_offset must have shape"):
        folds.reparametrized(log_offset=torch.ones(5, dtype=DT))


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_cholesky_solve_gradient_matches_lu_autograd(method):
    """The custom Cholesky backward equals autograd through an LU solve."""
    X, y, sw = _data(n=20, p=7) if method == "primal" else _data(n=8, p=15)
    T = torch.tensor(_folds(len(y)) * sw)
    folds = RidgeFolds(torch.tensor(X), torch.tensor(y), T, method=method)
    alpha = torch.exp(torch.linspace(-2, 2, X.shape[1], dtype=DT)).expand(3, -1)
    alpha = alpha.clone().requires_grad_(True)
    g = torch.randn(3, X.shape[1], dtype=DT, generator=torch.Generator().manual_seed(0))
    (grad_fast,) = torch.autograd.grad((folds.coef(alpha) * g).sum(), alpha)
    if method == "primal":
        ref = torch.linalg.solve(folds.gram + torch.diag_embed(alpha), folds.rhs[..., None])[..., 0]
    else:
        XA = folds.Xs / alpha[:, None, :]
        eye = torch.eye(folds.Xs.shape[1], dtype=DT)
        ref = (XA.mT @ torch.linalg.solve(XA @ folds.Xs.mT + eye, folds.ys[..., None]))[..., 0]
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), alpha)
    torch.testing.assert_close(folds.coef(alpha), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("layout", ["kfold", "shuffle", "general"])
def test_fold_grams_match_direct_computation(fit_intercept, layout):
    # kfold: the left-out parts partition the rows (all-rows Gram = their sum);
    # shuffle: common weights, overlapping left-out parts; general: neither
    from skbilevel.hypergrad._penalized import _fold_grams

    rng = np.random.RandomState(0)
    n, p = 40, 5
    X = torch.tensor(rng.randn(n, p) + 1e3)  # large means: no digits lost
    y = torch.tensor(rng.randn(n) - 50.0)
    sw = torch.tensor(rng.uniform(0.5, 2.0, n))
    T = torch.tensor(_folds(n, k=4)) * sw
    if layout == "general":
        T = T * torch.tensor(rng.uniform(0.5, 1.5, (4, n)))
    elif layout == "shuffle":
        T = torch.tensor(rng.uniform(size=(4, n)) > 0.3) * sw
    t_sum = T.sum(1)
    mx = (T @ X) / t_sum[:, None] if fit_intercept else torch.zeros(4, p, dtype=DT)
    my = (T @ y) / t_sum if fit_intercept else torch.zeros(4, dtype=DT)
    gram, rhs, _ = _fold_grams(X, y, T, mx, my, center=fit_intercept)
    for k in range(4):
        Xc, yc = X - mx[k], y - my[k]
        torch.testing.assert_close(gram[k], (Xc * T[k][:, None]).T @ Xc, rtol=1e-9, atol=1e-6)
        torch.testing.assert_close(rhs[k], (Xc * T[k][:, None]).T @ yc, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_hessian_diagonal_is_exact_and_preconditions_cg(method):
    import warnings

    from skbilevel.hypergrad import ImplicitCG

    X, y, sw = _data(n=24, p=6) if method == "primal" else _data(n=8, p=15)
    T = _folds(len(y)) * sw
    V = (T == 0) * sw
    p = X.shape[1]
    folds = RidgeFolds(
        torch.tensor(X), torch.tensor(y), torch.tensor(T), torch.tensor(V), method=method
    )
    # penalties over 12 decades, as the adaptive model produces
    phi = torch.linspace(-14.0, 14.0, p, dtype=DT)
    theta = folds.closed_form(phi).detach()
    H = torch.autograd.functional.hessian(lambda t: folds.inner_loss(t, phi), theta)
    H = H.reshape(theta.numel(), theta.numel())
    torch.testing.assert_close(
        folds.hessian_diagonal(theta, phi).reshape(-1), torch.diagonal(H), rtol=1e-12, atol=0
    )
    _, ref, _, _ = folds.value_and_grad(phi)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, grad, info, _ = folds.value_and_grad(phi, hypergradient=ImplicitCG(tol=1e-10))
    assert info.extra["preconditioned"]
    torch.testing.assert_close(grad, ref, rtol=1e-6, atol=1e-12)


def _three_ridge_folds(n_features, seed, method):
    """3 folds of 10 rows out of 30, three relevant features."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(30, n_features, generator=g, dtype=torch.float64)
    y = X[:, :3].sum(1) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    T = torch.ones(3, 30, dtype=torch.float64)
    for k in range(3):
        T[k, 10 * k:10 * (k + 1)] = 0
    return RidgeFolds(X, y, T, val_weights=1 - T, method=method)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_validation_curve_matches_the_solves(method):
    # the dual curve diagonalizes Xs Xs^T once; the values are those of coef()
    folds = _three_ridge_folds(45, 3, method)
    X = folds.X
    grid = [-6.0, -1.0, 0.5, 4.0]
    curve = folds.validation_curve(grid)
    ref = [folds.validation_loss(folds.coef(X.new_full((45,), math.exp(la)))) for la in grid]
    torch.testing.assert_close(curve, torch.stack(ref), rtol=1e-9, atol=0)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_validation_curve_along_a_penalty_model(method):
    # with phi, the curve shifts the model's log-penalties (here an adaptive
    # basis, one per fold): the values of the solves at the shifted point
    folds = _three_ridge_folds(45, 3, method)
    g = torch.Generator().manual_seed(3)
    basis = adaptive_penalty_basis(torch.randn(3, 45, generator=g, dtype=torch.float64))
    model = folds.reparametrized(basis=basis)
    phi = torch.tensor([0.3, 1.5], dtype=torch.float64)
    shifts = [-4.0, 0.0, 2.5]
    curve = model.validation_curve(shifts, phi=phi)
    ref = [
        model.validation_loss(model.closed_form(phi + torch.tensor([s, 0.0], dtype=phi.dtype)))
        for s in shifts
    ]
    torch.testing.assert_close(curve, torch.stack(ref), rtol=1e-9, atol=0)


def test_implicit_cg_at_the_rounding_floor_is_judged_in_the_energy_norm():
    import warnings

    from skbilevel.hypergrad import ImplicitCG

    # dual folds with penalties over 20 decades: rounding leaves a plain relative
    # residual of about 4e-9 whatever CG does (it stagnates), while the error in
    # the Hessian's energy norm (the preconditioner's norm, with the folds' exact
    # inverse) is about 1e-12: converged, no warning, the closed form's gradient
    folds = _three_ridge_folds(120, 1, "dual")
    phi = torch.linspace(-20.0, 25.0, 120, dtype=DT)
    value, grad, _, _ = folds.value_and_grad(phi)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v_cg, g_cg, info, _ = folds.value_and_grad(phi, hypergradient=ImplicitCG(tol=1e-10))
    assert info.linear_solve_residual > 1e-10
    torch.testing.assert_close(v_cg, value, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_cg, grad, rtol=1e-6, atol=1e-9 * float(grad.abs().max()))


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_exact_preconditioner_makes_cg_direct(method):
    from skbilevel.hypergrad import ImplicitCG

    # penalties spanning 16 decades: with the folds' exact inverse Hessian, the
    # implicit CG takes one or two products and matches the closed form
    folds = _three_ridge_folds(20, 1, method)
    phi = torch.linspace(-12.0, 25.0, 20, dtype=torch.float64)
    value, grad, _, _ = folds.value_and_grad(phi)
    v_cg, g_cg, info, _ = folds.value_and_grad(phi, hypergradient=ImplicitCG(tol=1e-8))
    assert info.linear_solve_iterations <= 2
    torch.testing.assert_close(v_cg, value, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_cg, grad, rtol=1e-6, atol=1e-12 * float(grad.abs().max()))


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_loss_and_grad_match_autograd(method):
    # the closed-form inner gradient (the health record's check) and its graph
    # in phi (the implicit strategies' mixed term) agree with autograd
    X, y, sw = _data(n=30, p=40 if method == "dual" else 5)
    T = torch.tensor(_folds(30)) * torch.tensor(sw)
    folds = RidgeFolds(torch.tensor(X), torch.tensor(y), T, method=method)
    p = X.shape[1]
    phi = torch.linspace(-1.0, 1.0, p, dtype=DT, requires_grad=True)
    theta = torch.randn(3, p, dtype=DT, generator=torch.Generator().manual_seed(0))
    value, grad = folds.loss_and_grad(theta, phi)
    leaf = theta.clone().requires_grad_(True)
    ref_value = folds.inner_loss(leaf, phi)
    (ref_grad,) = torch.autograd.grad(ref_value, leaf, create_graph=True)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-10)
    v = torch.randn(3, p, dtype=DT, generator=torch.Generator().manual_seed(1))
    (mixed,) = torch.autograd.grad((grad * v).sum(), phi)
    (ref_mixed,) = torch.autograd.grad((ref_grad * v).sum(), phi)
    torch.testing.assert_close(mixed, ref_mixed, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("batched", [False, True])
def test_ridge_folds_validation_loss_and_its_gradient(
    batched, numpy, monkeypatch, one_torch_thread
):
    # the one-node validation loss against the residuals written out (with the
    # intercepts), for one or several coefficient vectors per fold; through
    # numpy (CPU) or torch (the GPU path)
    from skbilevel.hypergrad import _penalized

    if not numpy:
        monkeypatch.setattr(_penalized, "_use_numpy", lambda *tensors: False)
    X, y, sw = _data(n=30, p=5)
    T = torch.tensor(_folds(30)) * torch.tensor(sw)
    V = (T == 0) * torch.tensor(sw)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    folds = RidgeFolds(Xt, yt, T, val_weights=V)
    shape = (3, 4, 5) if batched else (3, 5)
    theta = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    theta.requires_grad_(True)
    loss = folds.validation_loss(theta)
    ref = 0.0
    b = folds.intercepts(theta)
    for k in range(3):
        resid = yt - (theta[k] @ Xt.T) - b[k][..., None]
        ref = ref + (V[k] * resid * resid).sum(-1) / V[k].sum()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    g = torch.linspace(0.5, 1.5, 4, dtype=DT) if batched else torch.tensor(1.0, dtype=DT)
    (grad,) = torch.autograd.grad((loss * g).sum(), theta)
    (ref_grad,) = torch.autograd.grad((ref * g).sum(), theta)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_value_grad_hessian_matches_finite_differences(method):
    # the adaptive model's two parameters and a per-feature model
    X, y, sw = _data(n=30, p=40 if method == "dual" else 6)
    T = torch.tensor(_folds(30)) * torch.tensor(sw)
    folds = RidgeFolds(torch.tensor(X), torch.tensor(y), T, val_weights=(T == 0) * 1.0,
                       method=method)
    p = X.shape[1]
    pilot = folds.closed_form(torch.zeros(p, dtype=DT)).detach()
    for problem, phi in [
        (folds.reparametrized(basis=adaptive_penalty_basis(pilot)), torch.tensor([0.3, 0.8], dtype=DT)),
        (folds, torch.linspace(-1.0, 1.0, p, dtype=DT)),
    ]:
        value, grad, hess = problem.value_grad_hessian(phi)
        ref_value, ref_grad = problem.value_and_grad(phi)[:2]
        torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        m, h = phi.numel(), 1e-5
        fd = torch.stack([
            (problem.value_and_grad(phi + h * e)[1] - problem.value_and_grad(phi - h * e)[1]) / (2 * h)
            for e in torch.eye(m, dtype=DT)
        ], 1)
        torch.testing.assert_close(hess, fd, rtol=1e-6, atol=1e-8)


def test_ridge_folds_refuse_a_second_derivative():
    # a double backward through the first-order solves is an error, not a
    # partial (silently wrong) second derivative
    X, y, sw = _data(n=30, p=5)
    T = torch.tensor(_folds(30))
    folds = RidgeFolds(torch.tensor(X), torch.tensor(y), T, val_weights=1 - T)
    phi = torch.zeros(5, dtype=DT, requires_grad=True)
    loss = folds.validation_loss(folds.closed_form(phi))
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, phi, create_graph=True)


def _binary_folds(n, p, noise, seed, fit_intercept):
    """Binary LogisticFolds on ``n x p`` Gaussian rows, the class of
    ``x_0 - x_1 + noise`` (in :func:`_folds`' folds, validated on the rest)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT)
    y = (X[:, 0] - X[:, 1] + noise * torch.randn(n, generator=g, dtype=DT) > 0).long()
    T = torch.tensor(_folds(n))
    return LogisticFolds(X, y, 2, T, 1 - T, fit_intercept=fit_intercept)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_logistic_value_grad_hessian_matches_finite_differences(fit_intercept):
    # binary: the logistic loss's third derivative enters the Hessian
    from skbilevel.hypergrad import ImplicitCG

    n, p = 120, 6
    folds = _binary_folds(n, p, noise=0.5, seed=0, fit_intercept=fit_intercept)
    X, y, T = folds.X, folds.y, folds.train_weights
    solver = NewtonCG(tol=1e-12, max_iter=100)
    coef = folds.solve(torch.zeros(p, dtype=DT), solver)[0]["coef"][:, :, 0].T
    for problem, phi in [
        (folds.reparametrized(basis=adaptive_penalty_basis(coef)), torch.tensor([0.3, 0.8], dtype=DT)),
        (folds, torch.linspace(-1.0, 1.0, p, dtype=DT)),
    ]:
        def vg(q):
            return problem.value_and_grad(q, hypergradient=ImplicitCG(tol=1e-12), solver=solver)[:2]

        value, grad, hess = problem.value_grad_hessian(phi, solver)
        ref_value, ref_grad = vg(phi)
        torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)
        h = 1e-5
        fd = torch.stack(
            [(vg(phi + h * e)[1] - vg(phi - h * e)[1]) / (2 * h) for e in torch.eye(len(phi), dtype=DT)], 1
        )
        torch.testing.assert_close(hess, fd, rtol=1e-5, atol=1e-8)
    multi = LogisticFolds(X, y % 2 + (X[:, 2] > 1).long(), 3, T, 1 - T)
    with pytest.raises(NotImplementedError, match="binary"):
        multi.value_grad_hessian(torch.zeros(p, dtype=DT))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_logistic_folds_values_of_loose_solves_do_not_depend_on_the_warm_start(fit_intercept):
    # a loose solve ends wherever its start leads; the validation loss there moves
    # with it. value_and_grad and value_grad_hessian give it at the exact
    # solutions to first order (HypergradientInfo.value_correction)
    p = 8
    folds = _binary_folds(150, p, noise=0.8, seed=1, fit_intercept=fit_intercept)
    phi = torch.linspace(-1.0, 1.0, p, dtype=DT)
    exact = float(folds.value_and_grad(phi, solver=NewtonCG(tol=1e-12))[0])
    loose = NewtonCG(tol=1e-3, min_iter=1)
    raw, corrected, newton = [], [], []
    for shift in (-2.0, 2.0):
        start = folds.solve(phi + shift, NewtonCG(tol=1e-12))[0]
        folds.theta_ = start
        value, _, info, theta = folds.value_and_grad(phi, solver=loose)
        assert info.value_correction is not None
        raw.append(float(folds.validation_loss(theta)) - exact)
        corrected.append(float(value) - exact)
        folds.theta_ = start
        newton.append(float(folds.value_grad_hessian(phi, loose)[0]) - exact)
    assert max(map(abs, raw)) > 1e-6
    assert max(map(abs, corrected)) < max(map(abs, raw)) / 20
    assert max(map(abs, newton)) < max(map(abs, raw)) / 20


def test_logistic_weighted_gram_uses_the_training_rows_only():
    X, y = _class_data(n=60, p=4)
    T = torch.tensor(_folds(len(y), k=3))
    folds = LogisticFolds(torch.tensor(X), torch.tensor(y), 2, T, 1.0 - T)
    phi = torch.zeros(4, dtype=DT)
    folds.hessian_preconditioner(folds.init_theta(), phi)  # builds X_aug
    w = T * torch.rand(T.shape, generator=torch.Generator().manual_seed(0), dtype=DT)
    Xa = torch.cat([torch.tensor(X), torch.ones(len(y), 1, dtype=DT)], dim=1)
    expected = torch.einsum("ni,kn,nj->kij", Xa, w, Xa)
    torch.testing.assert_close(folds._weighted_gram(w), expected, rtol=1e-12, atol=1e-12)


def test_fold_losses_sum_to_the_validation_loss():
    X, y = _class_data(n=60, p=4)
    T = torch.tensor(_folds(len(y), k=3))
    folds = LogisticFolds(torch.tensor(X), torch.tensor(y), 2, T, 1.0 - T)
    theta, _ = folds.solve(torch.zeros(4, dtype=DT), NewtonCG(tol=1e-10))
    per_fold = folds.fold_losses(theta)
    assert per_fold.shape == (3,)
    torch.testing.assert_close(per_fold.sum(), folds.validation_loss(theta))
    Xr, yr, sw = (torch.tensor(a) for a in _data(n=30, p=5))
    Tr = torch.tensor(_folds(30, k=3))
    ridge = RidgeFolds(Xr, yr, Tr, val_weights=1.0 - Tr)
    w = ridge.closed_form(torch.zeros(5, dtype=DT))
    per_fold = ridge.fold_losses(w)
    assert per_fold.shape == (3,)
    torch.testing.assert_close(per_fold.sum(), ridge.validation_loss(w).detach())


def _sparse_data(n=40, p=6, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.randn(n, p) * rng.uniform(0.5, 2.0, p) + rng.uniform(-1.0, 1.0, p)
    X[rng.rand(n, p) < 0.6] = 0.0
    y = X @ rng.randn(p) + 0.3 * rng.randn(n) + 2.0
    return torch.tensor(X), torch.tensor(y), torch.tensor(rng.uniform(0.2, 2.0, n))


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("layout", ["kfold", "shuffle", "general"])
def test_sparse_fold_grams_match_the_dense_ones(fit_intercept, layout):
    from skbilevel.hypergrad._penalized import _fold_grams

    X, y, sw = _sparse_data()
    rng = np.random.RandomState(1)
    T = torch.tensor(_folds(40, k=4)) * sw
    if layout == "general":
        T = T * torch.tensor(rng.uniform(0.5, 1.5, (4, 40)))
    elif layout == "shuffle":
        T = torch.tensor(rng.uniform(size=(4, 40)) > 0.3) * sw
    t_sum = T.sum(1)
    mx = (T @ X) / t_sum[:, None] if fit_intercept else torch.zeros(4, 6, dtype=DT)
    my = (T @ y) / t_sum if fit_intercept else torch.zeros(4, dtype=DT)
    dense = _fold_grams(X, y, T, mx, my, center=fit_intercept)
    sparse = _fold_grams(to_csr(X), y, T, mx, my, center=fit_intercept)
    for a, b in zip(sparse[:2], dense[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert (sparse[2] is None) == (dense[2] is None)
    if dense[2] is not None:  # the all-rows problem, centred at the common centre
        for a, b in zip(sparse[2], dense[2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("layout", ["kfold", "general"])
@pytest.mark.parametrize("method", ["primal", "dual"])
def test_ridge_folds_on_sparse_x_match_the_dense_folds(
    method, layout, fit_intercept, numpy, monkeypatch, one_torch_thread
):
    # everything the estimator asks of the folds, with X a CSR tensor (kept
    # sparse in the primal form), against the same folds on the dense X;
    # through scipy (CPU) or torch's sparse products (the GPU path)
    from skbilevel.hypergrad import _closed_form, _penalized

    if not numpy:
        monkeypatch.setattr(_penalized, "_use_numpy", lambda *tensors: False)
        monkeypatch.setattr(_closed_form, "_use_numpy", lambda *tensors: False)
    X, y, sw = _sparse_data(p=6 if method == "primal" else 60)
    T = torch.tensor(_folds(40, k=4)) * sw
    if layout == "general":
        T = T * torch.tensor(np.random.RandomState(2).uniform(0.5, 1.5, (4, 40)))
    V = (T == 0) * sw
    kw = dict(val_weights=V, fit_intercept=fit_intercept)
    dense = RidgeFolds(X, y, T, **kw)
    sparse = RidgeFolds(to_csr(X), y, T, **kw)
    assert sparse.method == dense.method == method
    assert sparse.X.layout == torch.sparse_csr
    phi = torch.linspace(-1.0, 1.0, X.shape[1], dtype=DT)
    for a, b in zip(sparse.value_and_grad(phi)[:2], dense.value_and_grad(phi)[:2]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(sparse.value_grad_hessian(phi), dense.value_grad_hessian(phi)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    coef = dense.closed_form(phi)
    torch.testing.assert_close(sparse.closed_form(phi), coef, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sparse.fold_losses(coef), dense.fold_losses(coef))
    torch.testing.assert_close(
        sparse.validation_curve([-2.0, 0.0, 3.0], phi=phi),
        dense.validation_curve([-2.0, 0.0, 3.0], phi=phi),
    )
    torch.testing.assert_close(
        sparse.predict(coef, to_csr(X)), dense.predict(coef, X), rtol=1e-9, atol=1e-12
    )
    a = sparse.all_rows(sw)
    b = dense.all_rows(sw)
    torch.testing.assert_close(a.closed_form(phi), b.closed_form(phi), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.intercepts(a.closed_form(phi)), b.intercepts(b.closed_form(phi)))
    # the inner problem's pieces (the implicit strategies' and the health record's)
    theta = coef + 0.1
    for x, z in zip(sparse.loss_and_grad(theta, phi), dense.loss_and_grad(theta, phi)):
        torch.testing.assert_close(x, z, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sparse.inner_loss(theta, phi), dense.inner_loss(theta, phi))
    torch.testing.assert_close(
        sparse.hessian_diagonal(theta, phi), dense.hessian_diagonal(theta, phi)
    )
    r = torch.randn(coef.shape, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        sparse.hessian_preconditioner(theta, phi)(r), dense.hessian_preconditioner(theta, phi)(r)
    )
    for strategy in ("cg", "dense"):
        torch.testing.assert_close(
            sparse.value_and_grad(phi, hypergradient=strategy)[1],
            dense.value_and_grad(phi, hypergradient=strategy)[1],
            rtol=1e-7,
            atol=1e-10,
        )




@pytest.mark.parametrize("sparse", [False, True])
def test_ridge_folds_dual_in_float32_with_penalties_over_many_decades(sparse):
    # penalties from 1e-7 to 1e12 (an adaptive model near interpolation): in
    # float32 the kernel I + Xs A^-1 Xs^T lost its identity to entries of 1e7
    # and the Woodbury inverse cancelled two huge terms (validation loss 72.3
    # against 0.309); the dual form factors and inverts in float64
    rng = np.random.RandomState(0)
    X = rng.randn(40, 90)
    X[rng.rand(40, 90) < 0.6] = 0.0
    y = X[:, 0] * 2 + X[:, 2] + 0.2 * rng.randn(40)
    T = torch.tensor(_folds(40, k=5))
    log_a = torch.tensor(np.linspace(-7.5, 12.0, 90) * np.log(10.0))
    log_a[[0, 2]] = -7.5 * np.log(10.0)
    out = {}
    for dt in (torch.float64, torch.float32):
        Xt = torch.tensor(X, dtype=dt)
        folds = RidgeFolds(to_csr(Xt) if sparse else Xt, torch.tensor(y, dtype=dt), T.to(dt), (1 - T).to(dt))
        assert folds.method == "dual"
        value, grad, _, coef = folds.value_and_grad(log_a.to(dt))
        r = torch.ones_like(coef)
        inv = folds.hessian_preconditioner(coef, log_a.to(dt))(r)
        curve = folds.validation_curve([0.0, 1.0], phi=log_a.to(dt))
        out[dt] = (value, grad, coef, inv, curve)
        assert all(t.dtype == dt for t in out[dt])
    for a, b in zip(out[torch.float32], out[torch.float64]):
        scale = float(b.abs().max())
        assert float((a.double() - b).abs().max()) <= 2e-3 * scale


def test_logistic_penalty_cache_follows_phi_and_the_penalty_model():
    # _penalty reuses its last result for the same phi (no graph): an in-place
    # change of phi, another penalty model or a phi in the graph recomputes it
    X, y = _class_data(n=40, p=3)
    T = _folds(len(y), k=2)
    folds = LogisticFolds(torch.tensor(X), torch.tensor(y), 2, torch.tensor(T))
    phi = torch.zeros(3, dtype=DT)
    first = folds._penalty(phi)
    assert folds._penalty(phi.detach()) is first
    phi += 1.0
    torch.testing.assert_close(folds._penalty(phi), torch.full((3, 2), math.e, dtype=DT))
    # a copy with another penalty model starts with the original's cache
    grouped = folds.reparametrized(groups=torch.tensor([0, 0, 1]))
    two = torch.tensor([0.0, 1.0], dtype=DT)
    torch.testing.assert_close(grouped._penalty(two)[:, 0], torch.tensor([1.0, 1.0, math.e], dtype=DT))
    regrouped = grouped.reparametrized(groups=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(regrouped._penalty(two)[:, 0], torch.tensor([1.0, math.e, math.e], dtype=DT))
    leaf = torch.zeros(3, dtype=DT, requires_grad=True)
    out = folds._penalty(leaf)
    assert out.requires_grad and folds._penalty(leaf) is not out
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.full((3,), 2.0, dtype=DT))


def test_logistic_fold_losses_at_reuses_the_solution_at_the_same_penalties(monkeypatch):
    # the classifier's one-standard-error rule solved every fold again at a point
    # a descent had just evaluated, and at the shared penalty its curve chose
    X, y = _class_data(n=60, p=3)
    T = _folds(len(y), k=3)
    folds = LogisticFolds(torch.tensor(X), torch.tensor(y), 2, torch.tensor(T), torch.tensor(1.0 - T))
    solves = []
    original = LogisticFolds.solve

    def counted(self, phi, solver=None, init=None):
        solves.append(phi.clone())
        return original(self, phi, solver, init)

    monkeypatch.setattr(LogisticFolds, "solve", counted)
    phi = torch.tensor([0.5, -0.2, 1.0], dtype=DT)
    _, _, _, theta = folds.value_and_grad(phi)
    assert torch.equal(folds.fold_losses_at(phi.clone()), folds.fold_losses(theta))
    assert not solves
    # other penalties: a solve
    other = phi + 0.1
    folds.fold_losses_at(other)
    assert len(solves) == 1
    # after a curve, its best point, asked for in the per-feature model
    curve = folds.validation_curve([-2.0, 0.0, 2.0])
    best = [-2.0, 0.0, 2.0][int(torch.argmin(curve))]
    n_solves = len(solves)
    losses = folds.fold_losses_at(torch.full((3,), best, dtype=DT))
    assert len(solves) == n_solves
    assert float(losses.sum()) == pytest.approx(float(curve.min()), rel=1e-14)
