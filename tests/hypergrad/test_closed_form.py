"""Closed-form family of the core: ridge / kernel ridge solvers, ridge LOO, 1-D search."""

import math

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import (
    ClosedForm,
    KernelRidgeSolver,
    RidgeSolver,
    argmin,
    available_strategies,
    kernel_ridge_fit,
    minimize_log_alpha,
    ridge_coef,
    ridge_loo_curve,
    ridge_loo_decomposition,
    ridge_loo_errors,
    ridge_loo_value_and_grad,
    ridge_validation_curve,
    ridge_validation_value_and_grad,
)

DT = torch.float64


def _data(n, p, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT) + torch.rand(p, generator=g, dtype=DT)
    shape = (n,) if k is None else (n, k)
    w = torch.randn(p, *(() if k is None else (k,)), generator=g, dtype=DT)
    y = X @ w + 0.5 * torch.randn(*shape, generator=g, dtype=DT) + 2.0
    sw = torch.rand(n, generator=g, dtype=DT) + 0.5
    return X, y, sw


def _exact_per_feature_hypergrad(X, y, log_alpha, X_val, y_val):
    """d/dlog(alpha_j) of 0.5||X_val w - y_val||^2 for w = (X^T X + diag(alpha))^{-1} X^T y."""
    alpha = log_alpha.exp()
    A = X.T @ X + torch.diag(alpha)
    w = torch.linalg.solve(A, X.T @ y)
    grad_w = X_val.T @ (X_val @ w - y_val)
    # dw/dlog(alpha_j) = -A^{-1} e_j alpha_j w_j
    return -alpha * w * torch.linalg.solve(A, grad_w)


# ---------------------------------------------------------------- strategy


@pytest.mark.parametrize("shape", [(40, 6), (15, 30)])  # primal and Woodbury (p > n)
def test_closed_form_per_feature_hypergradient_is_exact(shape):
    n, p = shape
    X, y, _ = _data(n, p)
    X_val, y_val, _ = _data(25, p, seed=1)
    log_alpha = torch.linspace(-1.0, 1.0, p, dtype=DT).requires_grad_(True)
    solver = RidgeSolver(X, y, fit_intercept=False, penalty="per_feature")
    assert solver.method == "cholesky"
    theta, info = argmin(
        solver.inner_loss, log_alpha, solver.init_theta(), hypergradient="closed_form", solver=solver
    )
    (0.5 * ((X_val @ theta["coef"] - y_val) ** 2).sum()).backward()
    exact = _exact_per_feature_hypergrad(X, y, log_alpha.detach(), X_val, y_val)
    torch.testing.assert_close(log_alpha.grad, exact, rtol=1e-8, atol=1e-12)
    assert info.strategy == "closed_form" and info.inner_iterations == 1
    assert info.inner_grad_norm < 1e-8 * float(y.abs().sum())
    # central finite differences on one coordinate
    eps, j = 1e-6, 2

    def outer(la):
        w = solver.closed_form(la)["coef"]
        return float(0.5 * ((X_val @ w - y_val) ** 2).sum())

    e = torch.zeros(p, dtype=DT)
    e[j] = eps
    la = log_alpha.detach()
    fd = (outer(la + e) - outer(la - e)) / (2 * eps)
    assert fd == pytest.approx(float(exact[j]), rel=1e-5)


def test_woodbury_equals_primal_with_intercept_and_weights():
    X, y, sw = _data(12, 30, k=2)
    phi = torch.linspace(-2.0, 2.0, 30, dtype=DT)
    wood = RidgeSolver(X, y, sw, penalty="per_feature").closed_form(phi)
    alpha = phi.exp()
    xm = (sw @ X) / sw.sum()
    ym = (sw @ y) / sw.sum()
    Xc, yc = X - xm, y - ym
    A = Xc.T @ (sw[:, None] * Xc) + torch.diag(alpha)
    coef = torch.linalg.solve(A, Xc.T @ (sw[:, None] * yc))
    torch.testing.assert_close(wood["coef"], coef, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(wood["intercept"], ym - xm @ coef, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shape", [(40, 6), (15, 30)])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_eigen_cholesky_and_sklearn_ridge_agree(shape, fit_intercept):
    from sklearn.linear_model import Ridge

    X, y, sw = _data(*shape, k=3)
    phi = torch.tensor(0.7, dtype=DT)
    eig = RidgeSolver(X, y, sw, fit_intercept).closed_form(phi)
    chol = RidgeSolver(X, y, sw, fit_intercept, method="cholesky").closed_form(phi)
    ref = Ridge(alpha=math.exp(0.7), fit_intercept=fit_intercept)
    ref.fit(X.numpy(), y.numpy(), sample_weight=sw.numpy())
    for theta in (eig, chol):
        np.testing.assert_allclose(theta["coef"].numpy().T, ref.coef_, rtol=1e-9, atol=1e-11)
        if fit_intercept:
            np.testing.assert_allclose(theta["intercept"].numpy(), ref.intercept_, rtol=1e-9)


def test_per_target_and_group_penalties():
    X, y, sw = _data(30, 6, k=2)
    la = torch.tensor([-1.0, 1.5], dtype=DT)
    per_t = RidgeSolver(X, y, sw, penalty="per_target").closed_form(la)
    per_t_chol = RidgeSolver(X, y, sw, penalty="per_target", method="cholesky").closed_form(la)
    for j in range(2):
        single = RidgeSolver(X, y[:, j], sw).closed_form(la[j])
        torch.testing.assert_close(per_t["coef"][:, j], single["coef"], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(per_t_chol["coef"][:, j], single["coef"], rtol=1e-10, atol=1e-12)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    g_phi = torch.tensor([0.1, -0.5, 2.0], dtype=DT)
    grouped = RidgeSolver(X, y, sw, penalty=groups).closed_form(g_phi)
    expanded = RidgeSolver(X, y, sw, penalty="per_feature").closed_form(g_phi[groups])
    torch.testing.assert_close(grouped["coef"], expanded["coef"])
    with pytest.raises(ValueError, match="shape"):
        RidgeSolver(X, y, penalty="per_feature").closed_form(torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="method='eigen'"):
        RidgeSolver(X, y, penalty="per_feature", method="eigen")


@pytest.mark.parametrize("strategy", ["dense", "cg"])
def test_implicit_strategies_on_ridge_solver_match_closed_form(strategy):
    if strategy not in available_strategies():
        pytest.skip(f"{strategy!r} not registered")
    X, y, sw = _data(40, 5, k=2)
    X_val, y_val, sw_val = _data(20, 5, k=2, seed=3)
    for penalty, la in (("scalar", 0.4), ("per_target", [0.4, -1.0])):
        ref = ridge_validation_value_and_grad(
            RidgeSolver(X, y, sw, penalty=penalty), X_val, y_val, la, sample_weight=sw_val
        )
        out = ridge_validation_value_and_grad(
            RidgeSolver(X, y, sw, penalty=penalty), X_val, y_val, la,
            sample_weight=sw_val, hypergradient=strategy,
        )
        torch.testing.assert_close(out[0], ref[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(out[1], ref[1], rtol=1e-7, atol=1e-12)


def test_validation_curve_matches_value_and_grad():
    X, y, _ = _data(40, 5, k=2)
    X_val, y_val, _ = _data(20, 5, k=2, seed=3)
    solver = RidgeSolver(X, y)
    curve = ridge_validation_curve(solver, X_val, y_val, [0.1, 10.0])
    for i, a in enumerate([0.1, 10.0]):
        value, grad, _, _ = ridge_validation_value_and_grad(solver, X_val, y_val, math.log(a))
        assert float(value[0]) == pytest.approx(float(curve[i].mean()), rel=1e-12)
        eps = 1e-6
        vp = ridge_validation_curve(solver, X_val, y_val, [a * math.exp(eps)]).mean()
        vm = ridge_validation_curve(solver, X_val, y_val, [a * math.exp(-eps)]).mean()
        assert float(grad[0]) == pytest.approx(float((vp - vm) / (2 * eps)), rel=1e-5)


def test_closed_form_rejects_other_solvers():
    from skbilevel.hypergrad import InnerSolver

    with pytest.raises(ValueError, match="ClosedFormSolver"):
        argmin(lambda t, p: (t ** 2).sum(), torch.zeros((), dtype=DT), torch.zeros(2, dtype=DT),
               hypergradient="closed_form")
    with pytest.raises(ValueError, match="ClosedFormSolver"):
        argmin(lambda t, p: (t ** 2).sum(), torch.zeros((), dtype=DT), torch.zeros(2, dtype=DT),
               hypergradient=ClosedForm(), solver=InnerSolver())


# ---------------------------------------------------------------- ridge LOO


def _brute_force_loo(X, y, sw, alpha, fit_intercept):
    """Weighted squared LOO residuals by n refits (float64, well-conditioned alpha)."""
    n = X.shape[0]
    out = []
    for i in range(n):
        keep = torch.arange(n) != i
        theta = RidgeSolver(X[keep], y[keep], sw[keep], fit_intercept, method="cholesky")
        theta = theta.closed_form(torch.tensor(math.log(alpha), dtype=DT))
        pred = X[i] @ theta["coef"] + (theta["intercept"] if fit_intercept else 0.0)
        out.append(sw[i] * (y[i] - pred) ** 2)
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(25, 4), (12, 20)])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_loo_errors_equal_refits(shape, fit_intercept):
    X, y, sw = _data(*shape, k=2)
    decomp = ridge_loo_decomposition(X, y, sw, fit_intercept)
    assert decomp.mode == ("gram" if shape[0] <= shape[1] else "cov")
    for alpha in (0.05, 3.0):
        ours = ridge_loo_errors(decomp, torch.tensor(math.log(alpha), dtype=DT))
        torch.testing.assert_close(ours, _brute_force_loo(X, y, sw, alpha, fit_intercept), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["gram", "cov"])
def test_both_modes_agree(mode):
    X, y, sw = _data(20, 8, k=2)
    ref = ridge_loo_decomposition(X, y, sw, mode="cov")
    dec = ridge_loo_decomposition(X, y, sw, mode=mode)
    la = torch.tensor(0.3, dtype=DT)
    torch.testing.assert_close(ridge_loo_errors(dec, la), ridge_loo_errors(ref, la), rtol=1e-9, atol=1e-12)
    c1, b1 = ridge_coef(dec, la)
    c2, b2 = ridge_coef(ref, la)
    torch.testing.assert_close(c1, c2, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b1, b2, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(30, 5), (10, 25)])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_loo_hypergradient_analytic_autograd_and_fd(shape, fit_intercept):
    X, y, sw = _data(*shape, k=3)
    decomp = ridge_loo_decomposition(X, y, sw, fit_intercept)
    for la in (torch.tensor(-0.5, dtype=DT), torch.tensor([-1.0, 0.2, 1.7], dtype=DT)):
        v, g, info = ridge_loo_value_and_grad(decomp, la)
        v2, g2, _ = ridge_loo_value_and_grad(decomp, la, autograd=True)
        torch.testing.assert_close(v, v2, rtol=1e-12, atol=0)
        torch.testing.assert_close(g, g2, rtol=1e-9, atol=1e-14)
        eps = 1e-5
        vp, _, _ = ridge_loo_value_and_grad(decomp, la + eps)
        vm, _, _ = ridge_loo_value_and_grad(decomp, la - eps)
        torch.testing.assert_close(g, (vp - vm) / (2 * eps), rtol=1e-6, atol=1e-12)
        assert info.extra["objective"] == "leave_one_out"
    # the curve is the same function
    alphas = np.array([0.01, 1.0, 100.0])
    curve = ridge_loo_curve(decomp, alphas, per_target=True)
    for i, a in enumerate(alphas):
        v, _, _ = ridge_loo_value_and_grad(decomp, torch.full((3,), math.log(a), dtype=DT))
        torch.testing.assert_close(curve[i], v, rtol=1e-12, atol=0)


def test_loo_curve_chunks_and_batched_coef():
    X, y, _ = _data(30, 5, k=2)
    decomp = ridge_loo_decomposition(X, y)
    alphas = np.logspace(-3, 3, 7)
    torch.testing.assert_close(
        ridge_loo_curve(decomp, alphas, max_elements=1), ridge_loo_curve(decomp, alphas)
    )
    coefs, intercepts = ridge_coef(decomp, torch.tensor(np.log(alphas), dtype=DT)[:, None])
    for i, a in enumerate(alphas):
        c, b = ridge_coef(decomp, torch.tensor(math.log(a), dtype=DT))
        torch.testing.assert_close(coefs[i], c)
        torch.testing.assert_close(intercepts[i], b)


def test_loo_differentiable_through_errors_and_coef():
    X, y, _ = _data(20, 4)
    decomp = ridge_loo_decomposition(X, y)
    la = torch.tensor(0.1, dtype=DT, requires_grad=True)
    torch.autograd.gradcheck(lambda t: ridge_loo_errors(decomp, t).mean(), (la,))
    torch.autograd.gradcheck(lambda t: ridge_coef(decomp, t)[0].sum(), (la,))


# ---------------------------------------------------------------- kernel ridge


def test_kernel_ridge_matches_sklearn_and_gradients_reach_support():
    from sklearn.kernel_ridge import KernelRidge

    def rbf(A, B):
        return torch.exp(-0.5 * torch.cdist(A, B) ** 2)

    g = torch.Generator().manual_seed(0)
    Xs = torch.randn(8, 2, generator=g, dtype=DT)
    ys = torch.randn(8, generator=g, dtype=DT)
    Xt = torch.randn(5, 2, generator=g, dtype=DT)
    dual = kernel_ridge_fit(rbf(Xs, Xs), ys, 0.3)
    ref = KernelRidge(alpha=0.3, kernel="rbf", gamma=0.5).fit(Xs.numpy(), ys.numpy())
    np.testing.assert_allclose((rbf(Xt, Xs) @ dual).numpy(), ref.predict(Xt.numpy()), rtol=1e-10)

    solver = KernelRidgeSolver(rbf, y=ys)

    def loss(support, log_reg):
        phi = {"X": support, "log_reg": log_reg}
        theta, _ = argmin(solver.inner_loss, phi, solver.init_theta(), hypergradient="closed_form",
                          solver=solver)
        return ((solver.predict(theta, phi, Xt) - 1.0) ** 2).sum()

    support = Xs.clone().requires_grad_(True)
    log_reg = torch.tensor(-1.0, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(loss, (support, log_reg))
    # the inner objective is minimized by the closed form
    theta = solver.closed_form({"X": Xs, "log_reg": torch.tensor(-1.0, dtype=DT)}).requires_grad_(True)
    (grad,) = torch.autograd.grad(solver.inner_loss(theta, {"X": Xs, "log_reg": torch.tensor(-1.0, dtype=DT)}), theta)
    assert float(grad.norm()) < 1e-10


def test_ridge_solver_rejects_non_float_or_non_finite_data():
    X, y, _ = _data(20, 3)
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    # NaN: numpy's "Eigenvalues did not converge" (eigen) or a NaN hypergradient
    for method in ("eigen", "cholesky"):
        with pytest.raises(ValueError, match="finite"):
            RidgeSolver(Xn, y, method=method)
    with pytest.raises(ValueError, match="finite"):
        RidgeSolver(X, y * float("inf"))
    # integers: argmin's message named init, not X
    with pytest.raises(ValueError, match="floating-point.*int64"):
        RidgeSolver(X.round().long(), y)


# numpy's "overflow encountered in matmul" (and "invalid value" on inf) came
# before the ValueError
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_ridge_data_checks_weights_types_overflow_and_decomposition():
    X, y, sw = _data(20, 3)
    phi = torch.tensor(0.0, dtype=DT)
    # all-zero weights divided the weighted means by zero: "Eigenvalues did not
    # converge" (eigen), a float/double RuntimeError (cholesky, float32 weights)
    for build in (
        lambda w: ridge_loo_decomposition(X, y, w),
        lambda w: RidgeSolver(X, y, w).closed_form(phi),
        lambda w: RidgeSolver(X, y, w, method="cholesky").closed_form(phi),
    ):
        with pytest.raises(ValueError, match="sums to zero"):
            build(torch.zeros(20))
        with pytest.raises(ValueError, match="sample_weight must be finite"):
            build(torch.full((20,), float("nan"), dtype=DT))
    # float32 weights with float64 data: converted, not a dtype RuntimeError
    theta = RidgeSolver(X, y, sw.float(), method="cholesky").closed_form(phi)
    ref = RidgeSolver(X, y, sw).closed_form(phi)
    assert torch.allclose(theta["coef"], ref["coef"], rtol=1e-6)
    # NaN data in the decomposition: numpy's "Eigenvalues did not converge" before
    with pytest.raises(ValueError, match="finite"):
        ridge_loo_decomposition(X * float("nan"), y)
    with pytest.raises(ValueError, match="finite"):
        ridge_loo_decomposition(X, y * float("nan"))  # a silent NaN objective before
    # numpy arrays: AttributeError deep inside before
    with pytest.raises(TypeError, match="X must be a torch tensor"):
        RidgeSolver(X.numpy(), y)
    with pytest.raises(TypeError, match="sample_weight must be a torch tensor"):
        ridge_loo_decomposition(X, y, sw.numpy())
    # squares beyond float64: LinAlgError (X) or an infinite objective (y) before
    with pytest.raises(ValueError, match=r"X\^T X overflows float64"):
        ridge_loo_decomposition(X * 1e200, y)
    with pytest.raises(ValueError, match="sum of squares of y overflows float64"):
        ridge_loo_decomposition(X, y * 1e200)
    # the same in the Gram (n <= p) modes, with and without an intercept
    Xw = torch.randn(5, 8, dtype=DT)
    for fit_intercept in (True, False):
        with pytest.raises(ValueError, match="Gram matrix of X.* overflows float64"):
            ridge_loo_decomposition(Xw * 1e200, y[:5], fit_intercept=fit_intercept)
        Xn = Xw.clone()
        Xn[1, 2] = float("inf")
        with pytest.raises(ValueError, match="finite"):
            ridge_loo_decomposition(Xn, y[:5], fit_intercept=fit_intercept)
    # a decomposition of other data was used silently (coefficients of 5 samples)
    with pytest.raises(ValueError, match="does not describe this problem"):
        RidgeSolver(X, y, decomposition=ridge_loo_decomposition(X[:5], y[:5]))
    with pytest.raises(ValueError, match="does not describe this problem"):
        RidgeSolver(X, y, fit_intercept=False, decomposition=ridge_loo_decomposition(X, y))
    with pytest.raises(TypeError, match="RidgeDecomposition"):
        RidgeSolver(X, y, decomposition="eigen")
    # a CSR X: "can't convert SparseCsr layout tensor to numpy" (eigen) or
    # "torch.empty: Only batched sparse compressed tensors are supported" (cholesky)
    for method in ("eigen", "cholesky"):
        with pytest.raises(ValueError, match="X must be a dense tensor.*to_dense"):
            RidgeSolver(X.to_sparse_csr(), y, method=method)
    with pytest.raises(ValueError, match="X must be a dense tensor"):
        ridge_loo_decomposition(X.to_sparse_csr(), y)


def test_ridge_penalties_must_be_finite_and_shaped():
    X, y, _ = _data(20, 3)
    d = ridge_loo_decomposition(X, y)
    # NaN / inf log-alphas returned NaN values and hypergradients silently
    for bad in (float("nan"), float("inf"), float("-inf")):
        for autograd in (False, True):
            with pytest.raises(ValueError, match="log_alpha must be finite"):
                ridge_loo_value_and_grad(d, bad, autograd=autograd)
        with pytest.raises(ValueError, match="log_alpha must be finite"):
            ridge_loo_errors(d, torch.tensor(bad, dtype=DT))
        with pytest.raises(ValueError, match="phi .* must be finite"):
            RidgeSolver(X, y).closed_form(torch.tensor(bad, dtype=DT))
    # three log-alphas for one target gave three columns of coefficients
    with pytest.raises(ValueError, match="one entry per target"):
        ridge_coef(d, [0.0, 1.0, 2.0])
    coef, _ = ridge_coef(d, [[0.0], [1.0]])  # a batch of rows stays allowed
    assert coef.shape == (2, 3, 1)
    # a negative or NaN alpha gave a curve value or NaN; a 2-D or empty one a
    # bare unpacking / concatenation error
    for bad in ([-1.0, 1.0], [float("nan")]):
        with pytest.raises(ValueError, match="finite and non-negative"):
            ridge_loo_curve(d, bad)
        with pytest.raises(ValueError, match="finite and non-negative"):
            ridge_validation_curve(RidgeSolver(X, y), X, y, bad)
    for bad in ([[1.0]], []):
        with pytest.raises(ValueError, match="non-empty 1-D"):
            ridge_loo_curve(d, bad)
    # n=1 with an intercept: 0/0, a NaN objective and a RuntimeWarning
    d1 = ridge_loo_decomposition(X[:1], y[:1])
    with pytest.raises(ValueError, match="at least 2 samples"):
        ridge_loo_value_and_grad(d1, 0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ridge_loo_curve(d1, [1.0])


def test_ridge_validation_functions_check_their_data():
    X, y, sw = _data(30, 3)
    solver = RidgeSolver(X[:20], y[:20])
    Xv, yv = X[20:], y[20:]
    for fn, extra in (
        (ridge_validation_value_and_grad, (0.0,)),
        (ridge_validation_curve, ([1.0, 2.0],)),
    ):
        # torch's "size mismatch" / "size of tensor a" RuntimeErrors before
        with pytest.raises(ValueError, match="X_val has shape"):
            fn(solver, Xv[:, :2], yv, *extra)
        with pytest.raises(ValueError, match="y_val has shape"):
            fn(solver, Xv, yv[:3], *extra)
        # two validation targets against one fitted: silently broadcast before
        with pytest.raises(ValueError, match="y_val has shape"):
            fn(solver, Xv, torch.stack([yv, yv], 1), *extra)
        with pytest.raises(ValueError, match="sample_weight has shape"):
            fn(solver, Xv, yv, *extra, sample_weight=torch.ones(3, dtype=DT))
        # a NaN value / 0/0 weighted error before
        with pytest.raises(ValueError, match="finite"):
            fn(solver, Xv * float("nan"), yv, *extra)
        with pytest.raises(ValueError, match="sums to zero"):
            fn(solver, Xv, yv, *extra, sample_weight=torch.zeros(10, dtype=DT))
        with pytest.raises(TypeError, match="X_val must be a torch tensor"):
            fn(solver, Xv.numpy(), yv, *extra)
    # float32 validation data with a float64 solver: a dtype RuntimeError before
    ref = ridge_validation_value_and_grad(solver, Xv, yv, 0.0)[0]
    got = ridge_validation_value_and_grad(solver, Xv.float(), yv, 0.0)[0]
    assert torch.allclose(got, ref, rtol=1e-6)
    got = ridge_validation_curve(solver, Xv.float(), yv, [1.0])[0]
    assert torch.allclose(got, ref, rtol=1e-6)


def test_kernel_ridge_solver_precomputed_and_bad_phi():
    K = torch.eye(3, dtype=DT) * 2.0
    y = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    solver = KernelRidgeSolver(K=K, y=y)
    dual = solver.closed_form(torch.tensor(0.0, dtype=DT))
    torch.testing.assert_close(dual, y / 3.0)
    with pytest.raises(ValueError, match="Unknown phi keys"):
        solver.closed_form({"gamma": torch.tensor(1.0)})


# ---------------------------------------------------------------- 1-D search


def _bumpy(x):
    # local minima near -2.6, -0.5, 1.6, 3.7 (sin(3x) = -1), tilted by the quadratic
    f = np.sin(3.0 * x) + 0.05 * (x - 2.0) ** 2
    g = 3.0 * np.cos(3.0 * x) + 0.1 * (x - 2.0)
    return f, g


def test_search_finds_global_minimum_on_grid_and_refines():
    grid = np.linspace(-6.0, 6.0, 49)
    res = minimize_log_alpha(_bumpy, values=lambda z: _bumpy(z)[0][:, None], grid=grid, tol=1e-10)
    dense = np.linspace(-6, 6, 200001)
    assert res.x[0] == pytest.approx(dense[np.argmin(_bumpy(dense)[0])], abs=1e-4)
    assert abs(res.grad[0]) < 1e-8
    assert res.fun[0] <= _bumpy(grid)[0].min()
    assert np.all(np.diff(res.history) <= 0)
    assert res.converged.all() and res.n_iter < 15


def test_search_vectorized_boundary_and_local_start():
    def f(x):
        # coordinate 0: minimum at 1.234; coordinate 1: decreasing, minimum beyond the grid
        return np.array([(x[0] - 1.234) ** 2, np.exp(-x[1])]), np.array([2 * (x[0] - 1.234), -np.exp(-x[1])])

    grid = np.linspace(-3, 3, 13)
    values = lambda z: np.stack([(z - 1.234) ** 2, np.exp(-z)], 1)
    res = minimize_log_alpha(f, values=values, grid=grid)
    assert res.x[0] == pytest.approx(1.234, abs=1e-4)
    assert res.x[1] == 3.0  # the end of the scan, slope pointing outward
    local = minimize_log_alpha(_bumpy, x0=0.0, tol=1e-9)
    assert abs(local.grad[0]) < 1e-6  # a local minimum near the start
    assert local.x[0] == pytest.approx(-0.5, abs=0.05)  # the basin of the start


def test_search_gives_up_at_max_iter():
    res = minimize_log_alpha(_bumpy, values=lambda z: _bumpy(z)[0][:, None],
                             grid=np.linspace(-6, 6, 5), tol=1e-14, max_iter=2)
    assert res.n_iter <= 3 and not res.converged.all()
    # bracketing from x0 cut short while still stepping downhill: it reported
    # converged at x0 (HyperL2Regressor(alpha_init=1e4, max_iter=1) kept 1e4 silently)
    f = lambda x: ((x - 1.5) ** 2, 2 * (x - 1.5))  # noqa: E731
    res = minimize_log_alpha(f, x0=9.0, max_iter=1)
    assert res.x[0] == 9.0 and not res.converged[0]
    res = minimize_log_alpha(f, x0=9.0, max_iter=3)  # 8, 6, 2: not bracketed yet
    assert not res.converged[0]
    assert minimize_log_alpha(f, x0=9.0).converged[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X, y, sw = _data(50, 10, k=2)
    dec_cpu = ridge_loo_decomposition(X, y, sw)
    dec_gpu = ridge_loo_decomposition(X.cuda(), y.cuda(), sw.cuda())
    v1, g1, _ = ridge_loo_value_and_grad(dec_cpu, 0.3)
    v2, g2, _ = ridge_loo_value_and_grad(dec_gpu, 0.3)
    torch.testing.assert_close(v2.cpu(), v1, rtol=1e-9, atol=0)
    torch.testing.assert_close(g2.cpu(), g1, rtol=1e-8, atol=1e-12)
    theta = RidgeSolver(X.cuda(), y.cuda(), penalty="per_feature").closed_form(torch.zeros(10, dtype=DT, device="cuda"))
    assert theta["coef"].is_cuda


def test_torch_path_equals_numpy_path(monkeypatch, one_torch_thread):
    """The pure-torch formulas (used on GPU) agree with the CPU numpy fast path."""
    import skbilevel.hypergrad._closed_form as cf

    assert cf._use_numpy(torch.zeros(2, dtype=DT))

    X, y, sw = _data(30, 6, k=2)
    Xw, yw, sww = _data(10, 25, k=2)
    fast = [cf.ridge_loo_decomposition(X, y, sw), cf.ridge_loo_decomposition(Xw, yw, sww)]
    la = torch.tensor([0.2, -0.7], dtype=DT)
    ref = [(cf.ridge_loo_value_and_grad(d, la), cf.ridge_loo_curve(d, [0.1, 3.0], per_target=True))
           for d in fast]
    monkeypatch.setattr(cf, "_numpy_view", lambda decomp: None)
    monkeypatch.setattr(cf, "_use_numpy", lambda *t: False)
    slow = [cf.ridge_loo_decomposition(X, y, sw), cf.ridge_loo_decomposition(Xw, yw, sww)]
    for d, ((v, g, _), curve) in zip(slow, ref):
        v2, g2, _ = cf.ridge_loo_value_and_grad(d, la)
        torch.testing.assert_close(v2, v, rtol=1e-10, atol=0)
        torch.testing.assert_close(g2, g, rtol=1e-8, atol=1e-13)
        torch.testing.assert_close(cf.ridge_loo_curve(d, [0.1, 3.0], per_target=True), curve,
                                   rtol=1e-10, atol=0)


def test_ridge_coef_numpy_and_autograd_paths_agree():
    X, y, sw = _data(12, 30, k=2)
    for mode in ("gram", "cov"):
        d = ridge_loo_decomposition(X, y, sw, mode=mode)
        la = torch.tensor([0.3, -0.4], dtype=DT)
        c1, b1 = ridge_coef(d, la)
        c2, b2 = ridge_coef(d, la.clone().requires_grad_(True))
        torch.testing.assert_close(c2.detach(), c1, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b2.detach(), b1, rtol=1e-12, atol=1e-14)


def test_minimize_log_alpha_expands_beyond_the_grid_on_request():
    # the minimum at x = -9 lies below a grid over [-5, 5]: by default the grid is
    # the domain (its lower end, as a grid search); expand=True follows the slope
    def f(x):
        return np.log1p((x + 9.0) ** 2), 2 * (x + 9.0) / (1 + (x + 9.0) ** 2)

    grid = np.linspace(-5.0, 5.0, 11)
    values = lambda z: f(z)[0][:, None]
    res = minimize_log_alpha(f, values=values, grid=grid)
    assert res.x[0] == -5.0
    res = minimize_log_alpha(f, values=values, grid=grid, expand=True, tol=1e-8)
    assert abs(res.x[0] + 9.0) < 1e-6
    assert res.n_evaluations < 20
    # within the bounds only
    res = minimize_log_alpha(f, values=values, grid=grid, expand=True, bounds=(-7.0, 5.0))
    assert res.x[0] == -7.0


def _two_plateaus(x):
    # a validation curve's shape in log(alpha): a high plateau above (the mean
    # model), a lower one below (least squares), the minimum (x = -8.307) between
    s_hi = 1.0 / (1.0 + np.exp(-(x + 4.0)))
    s_lo = 1.0 / (1.0 + np.exp(x + 10.0))
    return 10.0 * s_hi + s_lo, 10.0 * s_hi * (1 - s_hi) - s_lo * (1 - s_lo)


def test_minimize_log_alpha_does_not_stop_on_a_plateau_of_a_wide_bracket():
    # from x0 = 13.8 the bracketing steps (1, 2, 4, 8, 16) overshoot onto the lower
    # plateau: a bracket 16 units wide, with a small slope at its best end and a
    # large one at the other. Secant and quadratic models over that width proposed
    # tiny steps: 106 evaluations ending at -13.85, not converged (on diabetes,
    # BilevelRidgeCV(alpha_init=1e6) stopped at alpha 3.4e-8 instead of 4.2e-3);
    # from -25, 51 evaluations. The wide bracket is now halved first
    dense = np.linspace(-20, 10, 300001)
    x_min = dense[np.argmin(_two_plateaus(dense)[0])]
    for x0 in (13.8, 6.0, -2.0, -25.0):
        res = minimize_log_alpha(_two_plateaus, x0=x0, tol=1e-8)
        assert abs(res.x[0] - x_min) < 1e-4, x0
        assert res.converged[0] and abs(res.grad[0]) < 1e-8
        assert res.n_evaluations < 20


def test_log_alpha_bracket_bisects_after_two_rejected_trials():
    # replayed from a digits classifier's shared-penalty search (loosely solved
    # inner problems: values noisy at 3e-5, slopes near zero left of the best
    # point). The secant through the best point and the far end kept proposing
    # points next to that end, each rejected and shrinking the bracket by its
    # 0.1% margin: 101 evaluations, 1.9 s. Two rejections in a row now halve it
    from skbilevel.hypergrad._closed_form import _Bracket

    b = _Bracket(-0.514516, 0.109151665, 2.843e-4)
    b.e, b.fe, b.ge = -0.533623, 0.109156482, -1.521e-4
    b.start()
    widths = [b.xb - b.e]
    for _ in range(40):
        t = b.propose(1e-3)
        if t is None:
            break
        # every trial left of the best point is worse, with a slope near zero
        b.update(t, 0.10918 + 1e-9 * (t - b.e), -8e-6, 1e-3)
        widths.append(b.xb - b.e)
    assert not b.active and b.xb - b.e < 2e-3
    assert len(widths) <= 8  # was 40 trials, each 2e-4 nearer the best point


def test_minimize_log_alpha_bounds_step_and_non_finite_objectives():
    f = lambda x: ((x - 1.5) ** 2, 2 * (x - 1.5))  # noqa: E731
    # a start outside the bounds is clamped: the answer is the bound (was 1.5)
    res = minimize_log_alpha(f, x0=5.0, bounds=(-1.0, 1.0))
    assert res.x[0] == 1.0 and res.converged[0]
    # a NaN objective is not "converged" (it stopped at once with converged=True)
    nan = lambda x: (x * np.nan, x * np.nan)  # noqa: E731
    assert not minimize_log_alpha(nan, x0=0.0).converged[0]
    # step=0 never moved and reported a slope of -3 as converged
    with pytest.raises(ValueError, match="step=0.0 must be a positive number"):
        minimize_log_alpha(f, x0=0.0, step=0.0)
    with pytest.raises(ValueError, match="lower < upper"):
        minimize_log_alpha(f, x0=0.0, bounds=(1.0, -1.0))


def test_minimize_log_alpha_rejects_bad_grids_settings_and_callables():
    f = lambda x: ((x - 1.5) ** 2, 2 * (x - 1.5))  # noqa: E731
    vals = lambda g: ((g - 1.5) ** 2)[:, None]  # noqa: E731
    grid = np.linspace(-5.0, 5.0, 11)
    # a reversed grid returned 2.0 for the minimum at 1.5
    with pytest.raises(ValueError, match="strictly increasing"):
        minimize_log_alpha(f, values=vals, grid=grid[::-1])
    # NaN entries were scanned; empty / 2-D grids failed inside numpy
    for bad in (np.r_[np.nan, grid], [], grid[:, None]):
        with pytest.raises(ValueError, match="non-empty 1-D array of finite"):
            minimize_log_alpha(f, values=vals, grid=bad)
    # a curve one point short was matched to the wrong grid points
    with pytest.raises(ValueError, match=r"values\(grid\) must return shape \(11,\)"):
        minimize_log_alpha(f, values=lambda g: vals(g)[:-1], grid=grid)
    # an extra derivative was dropped by zip
    extra = lambda x: (f(x)[0], np.r_[f(x)[1], 0.0])  # noqa: E731
    with pytest.raises(ValueError, match="one value and one derivative per coordinate"):
        minimize_log_alpha(extra, values=vals, grid=grid)
    # tol < 0 or NaN, max_iter -1 or 1.5, x0=NaN (returned NaN), x0 with a grid
    # (ignored): all taken silently before
    for kwargs in ({"tol": -1.0}, {"tol": np.nan}):
        with pytest.raises(ValueError, match="tol=.* must be a finite number >= 0"):
            minimize_log_alpha(f, x0=0.0, **kwargs)
    for max_iter in (-1, 1.5):
        with pytest.raises(ValueError, match="max_iter=.* must be an integer >= 0"):
            minimize_log_alpha(f, x0=0.0, max_iter=max_iter)
    with pytest.raises(ValueError, match="x0 must be finite"):
        minimize_log_alpha(f, x0=np.nan)
    with pytest.raises(ValueError, match="not both"):
        minimize_log_alpha(f, values=vals, grid=grid, x0=3.0)
    assert minimize_log_alpha(f, x0=0.0, tol=0.0, max_iter=np.int64(5)).x[0] == pytest.approx(1.5)


def test_log_alpha_search_max_iter_zero_is_the_grid_search():
    # max_iter=0: the best grid point as is, without a derivative evaluation;
    # at an end of the grid the slope is still needed (to search beyond it)
    calls = []

    def objective(centre):
        def f(x):
            calls.append(x)
            return (x - centre) ** 2, 2 * (x - centre)

        return f, lambda g: ((g - centre) ** 2)[:, None]

    grid = np.linspace(-5, 5, 11)
    f, values = objective(0.3)
    res = minimize_log_alpha(f, values=values, grid=grid, max_iter=0)
    assert res.x[0] == 0.0 and res.fun[0] == pytest.approx(0.09) and not calls
    assert res.n_evaluations == 0 and np.isnan(res.grad[0])
    f, values = objective(7.0)
    res = minimize_log_alpha(f, values=values, grid=grid, max_iter=0, expand=True)
    assert calls and res.x[0] > 5.0


def test_numpy_gram_and_cholesky_match_torch():
    from skbilevel.hypergrad._closed_form import _cholesky_ex, _gram

    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    G = _gram(A)
    torch.testing.assert_close(G, A.mT @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, G.mT, rtol=0, atol=0)  # symmetric by construction
    L, info = _cholesky_ex(G)
    ref, ref_info = torch.linalg.cholesky_ex(G)
    torch.testing.assert_close(L, ref, rtol=1e-12, atol=1e-12)
    assert info.shape == ref_info.shape and not bool(info.any())
    # a matrix that is not positive definite: torch's info code, not an exception
    bad = G.clone()
    bad[1, 2, 2] = -1.0
    _, info = _cholesky_ex(bad)
    assert info.tolist() == torch.linalg.cholesky_ex(bad).info.tolist()
    assert info.tolist()[0] == 0 and info.tolist()[1] > 0 and info.tolist()[2] == 0
    # the input is left alone, unless overwrite_a: then the factor is in its memory
    kept = G.clone()
    _cholesky_ex(G)
    torch.testing.assert_close(G, kept, rtol=0, atol=0)
    L, _ = _cholesky_ex(G, overwrite_a=True)
    assert L.data_ptr() == G.data_ptr()
    torch.testing.assert_close(L, ref, rtol=1e-12, atol=1e-12)
    # float32 and a transposed (non-contiguous) view
    L32, info = _cholesky_ex(kept.float().mT)
    torch.testing.assert_close(L32, ref.float(), rtol=1e-5, atol=1e-5)
    assert not bool(info.any())
    # tensors that need autograd stay in torch
    A.requires_grad_(True)
    assert _gram(A).requires_grad


def test_numpy_route_only_with_one_torch_thread():
    # torch's spinning OpenMP threads and numpy's BLAS threads would share the
    # cores (a 30x slower classifier fit on two): several torch threads keep
    # every product in torch
    import skbilevel.hypergrad._closed_form as cf

    before = torch.get_num_threads()
    x = torch.zeros(2, dtype=DT)
    try:
        torch.set_num_threads(2)
        assert not cf._use_numpy(x)
        torch.set_num_threads(1)
        assert cf._use_numpy(x)
        assert not cf._use_numpy(x.requires_grad_(True))
    finally:
        torch.set_num_threads(before)


def test_bilevel_ridge_loo_decomposition_takes_the_numpy_route_at_any_thread_count(
    monkeypatch,
):
    # its products run back to back: with torch's two threads the torch route took
    # 3.3 times RidgeCV's time on a 500 x 2000 X (numpy 1.5 times), the main demo
    # 1.4 to 1.7 times. The K-fold solvers, whose decompositions alternate with
    # torch products, keep the thread rule
    import skbilevel.hypergrad._closed_form as cf
    from skbilevel.linear_model import BilevelRidgeCV

    routes = []
    original = cf._use_numpy

    def spy(*tensors):
        routes.append(original(*tensors))
        return routes[-1]

    monkeypatch.setattr(cf, "_use_numpy", spy)
    X, y, _ = _data(40, 5)
    X, y = X.numpy(), y.numpy()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        BilevelRidgeCV().fit(X, y)
        assert routes and all(routes)  # the decomposition (and its products)
        routes.clear()
        BilevelRidgeCV(cv=3).fit(X, y)
        assert routes and not any(routes)
        routes.clear()
        with cf._numpy_route_at_any_thread_count():
            assert cf._use_numpy(torch.zeros(2, dtype=DT))
        assert not cf._use_numpy(torch.zeros(2, dtype=DT))
    finally:
        torch.set_num_threads(before)


def test_log_alpha_search_refuses_a_curve_with_no_finite_value():
    """A scanned curve that was NaN at every grid point started the secant
    steps at the grid's first point and returned x=[-4.00006] with
    converged=[True] (the minimum, from value_and_grad, is at 1.5). Now a
    ValueError naming the coordinate; a curve NaN on part of the grid is
    still searched where it is finite."""
    f = lambda x: ((x - 1.5) ** 2, 2 * (x - 1.5))  # noqa: E731
    grid = np.linspace(-5, 5, 11)
    with pytest.raises(ValueError, match=r"not finite .* at any of the 11 grid points for "
                                         r"coordinate\(s\) \[0\]"):
        minimize_log_alpha(f, values=lambda g: np.full((len(g), 1), np.nan), grid=grid)

    def two(x):
        c = np.array([1.5, -2.2])
        return (x - c) ** 2, 2 * (x - c)

    curve = lambda g: np.stack([np.full_like(g, np.nan), (g + 2.2) ** 2], 1)  # noqa: E731
    with pytest.raises(ValueError, match=r"coordinate\(s\) \[0\]"):
        minimize_log_alpha(two, values=curve, grid=grid)
    # NaN below 0 (the objective undefined there): the minimum at 1.5 is found
    partial = lambda g: np.where(g < 0, np.nan, (g - 1.5) ** 2)[:, None]  # noqa: E731
    res = minimize_log_alpha(f, values=partial, grid=grid)
    assert res.converged.all() and abs(res.x[0] - 1.5) < 1e-6
    # and a minimum on the edge of the finite part is that edge
    def edge(x):
        x = np.asarray(x, dtype=float)
        ok = x >= 0
        return np.where(ok, (x + 1) ** 2, np.nan), np.where(ok, 2 * (x + 1), np.nan)

    res = minimize_log_alpha(edge, values=lambda g: edge(g)[0][:, None], grid=grid)
    assert abs(res.x[0]) < 1e-3 and np.isfinite(res.fun).all()


def test_kernel_ridge_names_a_singular_system_and_its_fix():
    """kernel_ridge_fit(X @ X.T, y, 0.0) with X of shape (10, 3) fell back to
    LU and returned coefficients of 2.8e16 silently; an exactly singular
    K + reg*I (an all-zero K at reg=0, or K = -I at reg=1) raised torch's raw
    '_LinAlgError: torch.linalg.solve: ... singular'. Now a warning and a
    ValueError naming the cause and the fix; reg > 0 is unchanged, and so is
    the LU fallback on a well-conditioned indefinite K."""
    from skbilevel.hypergrad import HypergradientWarning

    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 3, dtype=DT, generator=g)
    y = torch.randn(10, dtype=DT, generator=g)
    K = X @ X.T
    with pytest.warns(HypergradientWarning, match=r"singular to working precision \(reg=0;.*"
                                                  r"Use reg > 0"):
        kernel_ridge_fit(K, y, 0.0)
    with pytest.warns(HypergradientWarning, match="singular to working precision"):
        kernel_ridge_fit(K.float(), y.float(), 0.0)
    with pytest.raises(ValueError,
                       match=r"K \+ reg\*I is singular \(reg=0\): K's diagonal is zero"):
        kernel_ridge_fit(torch.zeros(10, 10, dtype=DT), y, 0.0)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        kernel_ridge_fit(-torch.eye(3, dtype=DT), y[:3], 1.0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dual = kernel_ridge_fit(K, y, 1e-3)  # Cholesky: no fallback
        torch.testing.assert_close(dual, torch.linalg.solve(K + 1e-3 * torch.eye(10, dtype=DT), y))
        indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)
        dual = kernel_ridge_fit(indefinite, y[:2], 0.0)  # LU, well conditioned
        torch.testing.assert_close(dual, torch.linalg.solve(indefinite, y[:2]))


def test_kernel_ridge_solver_checks_its_test_kernel():
    """KernelRidgeSolver.predict with a K_test of the wrong width raised torch's
    'size mismatch, got input (3), mat (3x4), vec (5)', a float32 K_test
    against float64 coefficients 'addmv input tensors must have the same
    dtype'. Now a ValueError naming the expected shape; float32 is cast."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 2, dtype=DT, generator=g)
    K = X @ X.T + torch.eye(5, dtype=DT)
    solver = KernelRidgeSolver(K=K, y=torch.randn(5, dtype=DT, generator=g))
    phi = torch.tensor(0.0, dtype=DT)
    dual = solver.closed_form(phi)
    with pytest.raises(ValueError, match=r"K_test must have shape \(m, 5\).*got shape \(3, 4\)"):
        solver.predict(dual, phi, K_test=K[:3, :4])
    with pytest.raises(TypeError, match="K_test must be a torch tensor"):
        solver.predict(dual, phi, K_test=K[:3].numpy())
    pred = solver.predict(dual, phi, K_test=K[:3].float())
    assert pred.dtype == DT
    torch.testing.assert_close(pred, K[:3] @ dual, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_deflate_and_reflect_are_the_intercept_complement_and_back(as_tensor):
    # Q (the last n - 1 columns of the intercept's reflection) is orthonormal
    # and orthogonal to sqrt(s): _deflate is Q^T, _reflect is Q
    from skbilevel.hypergrad._closed_form import (
        _deflate,
        _intercept_reflection,
        _reflect,
    )

    rng = np.random.RandomState(0)
    sqrt_s = np.sqrt(rng.uniform(0.1, 3.0, 7))
    v, beta = _intercept_reflection(torch.tensor(sqrt_s) if as_tensor else sqrt_s)
    Q = _reflect(torch.eye(6, dtype=DT) if as_tensor else np.eye(6), v, beta)
    Q = np.asarray(Q)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-15)
    np.testing.assert_allclose(sqrt_s @ Q, 0.0, atol=1e-15)
    q0 = sqrt_s / np.linalg.norm(sqrt_s)
    for z in (rng.randn(7), rng.randn(7, 3)):
        zz = torch.tensor(z) if as_tensor else z
        deflated = _deflate(zz, v, beta)
        np.testing.assert_allclose(np.asarray(deflated), Q.T @ z, atol=1e-14)
        # back by Q: Q Q^T z is z less its share along sqrt(s)
        back = np.asarray(_reflect(deflated, v, beta))
        expected = z - np.outer(q0, q0 @ z).reshape(z.shape)
        np.testing.assert_allclose(back, expected, atol=1e-14)
