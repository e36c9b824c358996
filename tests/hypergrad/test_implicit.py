"""Implicit-differentiation strategies checked against exact hypergradients.

Ridge with one log-penalty per feature has a closed-form hypergradient:
with A = X^T X + diag(e^phi), w* = A^{-1} X^T y and a validation loss F(w),

    dF/dphi = -e^phi * w* * (A^{-1} grad_w F(w*)).

Logistic regression is checked against central finite differences of the
outer loss, re-solving the inner problem tightly at each perturbed phi.
"""

import math
import pathlib
import re
import warnings

import pytest
import torch

from skbilevel.hypergrad import (
    LBFGS,
    ClosedFormSolver,
    GradientDescent,
    ImplicitCG,
    ImplicitDense,
    ImplicitIdentity,
    ImplicitNeumann,
    InnerSolveWarning,
    LinearSolveWarning,
    NewtonCG,
    argmin,
    get_strategy,
)

DT = torch.float64


def _rel(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# --------------------------------------------------------------------------- ridge


def _ridge_data(n=30, d=5, n_val=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = X @ w_true + 0.3 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n_val, d, generator=g, dtype=DT)
    yv = Xv @ w_true + 0.3 * torch.randn(n_val, generator=g, dtype=DT)
    phi0 = torch.linspace(-1.0, 1.5, d, dtype=DT)
    return X, y, Xv, yv, phi0


def _ridge_inner(X, y):
    def inner(w, phi):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (phi.exp() * w**2).sum()

    return inner


class RidgeSolver(ClosedFormSolver):
    """Exact inner solver for the ridge problem (a closed form)."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def closed_form(self, phi):
        A = self.X.T @ self.X + torch.diag(phi.exp())
        return torch.linalg.solve(A, self.X.T @ self.y)


def _ridge_exact(X, y, Xv, yv, phi):
    """Hand-derived hypergradient of F(w) = 0.5 ||Xv w - yv||^2 / n_val."""
    A = X.T @ X + torch.diag(phi.exp())
    w = torch.linalg.solve(A, X.T @ y)
    grad_F = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    return -phi.exp() * w * torch.linalg.solve(A, grad_F)


def _ridge_hypergrad(strategy, solver=None, data=None):
    X, y, Xv, yv, phi0 = data if data is not None else _ridge_data()
    phi = phi0.clone().requires_grad_(True)
    w, info = argmin(
        _ridge_inner(X, y), phi, torch.zeros(X.shape[1], dtype=DT),
        hypergradient=strategy, solver=solver,
    )
    (0.5 * ((Xv @ w - yv) ** 2).mean()).backward()
    return phi.grad.detach(), info


@pytest.mark.parametrize("strategy", [ImplicitDense(), ImplicitCG()])
def test_ridge_exact_solver_matches_closed_form(strategy):
    X, y, Xv, yv, phi0 = data = _ridge_data()
    exact = _ridge_exact(X, y, Xv, yv, phi0)
    grad, info = _ridge_hypergrad(strategy, RidgeSolver(X, y), data)
    assert _rel(grad, exact) < 1e-8
    assert info.linear_solve_converged is True
    assert info.fallback is None


def test_ridge_cg_with_lbfgs_inner_solver():
    X, y, Xv, yv, phi0 = data = _ridge_data()
    grad, info = _ridge_hypergrad(ImplicitCG(), LBFGS(tol=1e-12), data)
    assert info.inner_converged and info.inner_grad_norm <= 1e-12
    assert _rel(grad, _ridge_exact(X, y, Xv, yv, phi0)) < 1e-8


def test_ridge_neumann_with_enough_terms():
    X, y, Xv, yv, phi0 = data = _ridge_data()
    exact = _ridge_exact(X, y, Xv, yv, phi0)
    # Default step 1 / lambda_max(H) from power iteration.
    grad, info = _ridge_hypergrad(ImplicitNeumann(n_terms=500), RidgeSolver(X, y), data)
    assert _rel(grad, exact) < 1e-4
    assert info.linear_solve_residual < 1e-4 and info.linear_solve_converged
    lam_max = float(torch.linalg.eigvalsh(X.T @ X + torch.diag(phi0.exp())).max())
    assert info.extra["lambda_max_estimate"] == pytest.approx(lam_max, rel=1e-3)
    # An explicit step below 2 / lambda_max converges too; more terms, smaller error.
    few, _ = _ridge_hypergrad(ImplicitNeumann(n_terms=20, step=1.0 / lam_max), RidgeSolver(X, y), data)
    many, _ = _ridge_hypergrad(ImplicitNeumann(n_terms=400, step=1.0 / lam_max), RidgeSolver(X, y), data)
    assert _rel(many, exact) < 1e-4 < _rel(few, exact)


def test_ridge_identity_is_a_finite_first_order_approximation():
    # The identity strategy replaces H^{-1} g by step * g with step = |g|^2 / g^T H g
    # (one CG step): biased, but a descent-aligned direction on this problem.
    X, y, Xv, yv, phi0 = data = _ridge_data()
    exact = _ridge_exact(X, y, Xv, yv, phi0)
    grad, info = _ridge_hypergrad(ImplicitIdentity(), RidgeSolver(X, y), data)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert float(grad @ exact) > 0  # positive cosine with the exact hypergradient
    assert info.linear_solve_converged is None
    assert 0 < info.linear_solve_residual < 1
    assert info.n_hvp == 2  # one H g for the step, one mixed product
    # A fixed step costs only the mixed product; its residual is not computed.
    grad_fixed, info_fixed = _ridge_hypergrad(ImplicitIdentity(step=0.01), RidgeSolver(X, y), data)
    assert torch.isfinite(grad_fixed).all() and math.isnan(info_fixed.linear_solve_residual)
    assert info_fixed.n_hvp == 1


def test_health_record_fields_are_filled():
    grad, info = _ridge_hypergrad(ImplicitCG(), LBFGS())
    d = info.as_dict()
    assert d["strategy"] == "cg"
    assert d["inner_iterations"] > 0 and d["inner_converged"] is True
    assert d["inner_grad_norm"] <= 1e-10
    assert d["linear_solve_iterations"] > 0
    assert d["linear_solve_residual"] <= 1e-10 and d["linear_solve_converged"] is True
    # K CG iterations, one true-residual check, one mixed product.
    assert d["n_hvp"] == d["linear_solve_iterations"] + 2
    assert d["n_grad"] > d["inner_iterations"]
    assert d["fallback"] is None


# ------------------------------------------ inner convergence: one rule, by ||grad||

IMPLICIT = [ImplicitCG, ImplicitNeumann, ImplicitIdentity, ImplicitDense]
IMPLICIT_IDS = ["cg", "neumann", "identity", "dense"]


def _gd(n_steps):
    X, y, _, _, phi0 = _ridge_data()
    lipschitz = float(torch.linalg.eigvalsh(X.T @ X + torch.diag(phi0.exp())).max())
    return GradientDescent(lr=1.0 / lipschitz, n_steps=n_steps)


@pytest.mark.parametrize("cls", IMPLICIT, ids=IMPLICIT_IDS)
def test_fixed_step_solver_far_from_optimum_is_not_converged_and_warns(cls):
    """5 gradient steps: not an optimum, whatever the step solver ran."""
    match = r"inner gradient norm \d\.\d+e[+-]\d+ > tol 1\.0e-10"
    with pytest.warns(InnerSolveWarning, match=match):
        _, info = _ridge_hypergrad(cls(), _gd(5))
    assert info.inner_converged is False
    assert info.inner_grad_norm > 1.0 and info.inner_iterations == 5
    assert info.extra["inner_tol"] == 1e-10


@pytest.mark.parametrize("cls", IMPLICIT, ids=IMPLICIT_IDS)
def test_fixed_step_solver_at_optimum_is_converged(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("error", InnerSolveWarning)
        _, info = _ridge_hypergrad(cls(), _gd(3000))
    assert info.inner_converged is True and info.inner_grad_norm <= 1e-10


def test_inner_tol_overrides_the_solver_tolerance():
    X, y, Xv, yv, phi0 = data = _ridge_data()
    _, loose = _ridge_hypergrad(ImplicitCG(inner_tol=1.0), _gd(10), data)
    assert loose.inner_converged and 1e-10 < loose.inner_grad_norm <= 1.0
    assert loose.extra["inner_tol"] == 1.0
    # LBFGS met its own tolerance, not the stricter one of the strategy: one warning.
    with pytest.warns(InnerSolveWarning, match="'dense' hypergradient assumes") as rec:
        _, strict = _ridge_hypergrad(ImplicitDense(inner_tol=1e-30), LBFGS(), data)
    assert len(rec) == 1 and strict.inner_converged is False
    # LBFGS stopped early and warned itself; the strategy does not warn again.
    with pytest.warns(InnerSolveWarning, match="LBFGS stopped") as rec:
        _, early = _ridge_hypergrad(ImplicitCG(), LBFGS(max_iter=1), data)
    assert len(rec) == 1 and early.inner_converged is False
    # A closed form is exact by construction: no tolerance applies.
    _, exact = _ridge_hypergrad(ImplicitCG(), RidgeSolver(X, y), data)
    assert exact.inner_converged is True and "inner_tol" not in exact.extra
    with pytest.raises(ValueError, match="inner_tol"):
        _ridge_hypergrad(ImplicitCG(inner_tol=-1.0), LBFGS(), data)


def test_solvers_report_the_tolerance_they_judged_by():
    fun = _ridge_inner(*_ridge_data()[:2])
    w0 = torch.zeros(5, dtype=DT)
    for solver, tol in [(LBFGS(tol=1e-8), 1e-8), (NewtonCG(), 1e-10), (_gd(5), 1e-10)]:
        _, res = solver.solve(lambda w: fun(w, torch.zeros(5, dtype=DT)), w0)
        assert res.tol == tol
        assert res.converged == (res.grad_norm <= tol)
    phi = torch.zeros(5, dtype=DT)
    _, res = _gd(5).solve(lambda w: fun(w.double(), phi).float(), w0.float())
    assert res.tol == 1e-5 and res.converged is False


def test_warm_start_reduces_cg_iterations():
    # d = 40 with a well-conditioned Hessian: CG needs far fewer than d iterations.
    X, y, Xv, yv, phi0 = _ridge_data(n=200, d=40)
    strategy = ImplicitCG(warm_start=True)
    iterations = []
    for shift in (0.0, 1e-4):
        phi = (phi0 + shift).requires_grad_(True)
        w, info = argmin(_ridge_inner(X, y), phi, torch.zeros(40, dtype=DT),
                         hypergradient=strategy, solver=RidgeSolver(X, y))
        (0.5 * ((Xv @ w - yv) ** 2).mean()).backward()
        iterations.append(info.linear_solve_iterations)
        exact = _ridge_exact(X, y, Xv, yv, phi.detach())
        assert _rel(phi.grad, exact) < 1e-8
    assert info.extra["warm_started"] is True
    assert iterations[1] < iterations[0]


# ----------------------------------------------------------------- logistic regression


def _logistic_problem(n=80, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.randn(d, generator=g, dtype=DT)
    y = torch.where(torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ w_true), 1.0, -1.0).to(DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT)
    yv = torch.where(torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(Xv @ w_true), 1.0, -1.0).to(DT)

    def inner(w, phi):
        return torch.nn.functional.softplus(-y * (X @ w)).sum() + 0.5 * (phi.exp() * w**2).sum()

    def outer(w):
        return torch.nn.functional.softplus(-yv * (Xv @ w)).mean()

    phi0 = torch.linspace(-1.0, 1.0, d, dtype=DT)
    return inner, outer, phi0, d


def _logistic_hypergrad(strategy, solver=None):
    inner, outer, phi0, d = _logistic_problem()
    phi = phi0.clone().requires_grad_(True)
    w, info = argmin(inner, phi, torch.zeros(d, dtype=DT), hypergradient=strategy,
                     solver=solver or NewtonCG(tol=1e-12))
    outer(w).backward()
    return phi.grad.detach(), info


def test_logistic_cg_matches_dense_and_finite_differences():
    inner, outer, phi0, d = _logistic_problem()
    cg, info = _logistic_hypergrad(ImplicitCG())
    dense, _ = _logistic_hypergrad(ImplicitDense())
    assert info.linear_solve_converged
    assert _rel(cg, dense) < 1e-8

    solver = NewtonCG(tol=1e-13)

    def F(phi):
        w, _ = solver.solve(lambda w: inner(w, phi), torch.zeros(d, dtype=DT))
        return float(outer(w))

    h = 1e-4
    fd = torch.stack([
        torch.tensor((F(phi0 + h * e) - F(phi0 - h * e)) / (2 * h), dtype=DT)
        for e in torch.eye(d, dtype=DT)
    ])
    assert _rel(cg, fd) < 1e-5


def _logistic_value_and_correction(strategy, tol):
    """The outer value at a loosely solved logistic problem (LBFGS from zero,
    gradient norm ``tol``), its exact value, and the health record."""
    inner, outer, phi0, d = _logistic_problem()
    phi = phi0.clone().requires_grad_(True)
    w, info = argmin(inner, phi, torch.zeros(d, dtype=DT), hypergradient=strategy,
                     solver=LBFGS(tol=tol))
    value = outer(w)
    value.backward()
    w_star, _ = NewtonCG(tol=1e-13).solve(lambda w: inner(w, phi0), torch.zeros(d, dtype=DT))
    return float(value.detach()), float(outer(w_star)), info


@pytest.mark.parametrize("strategy", [ImplicitCG(), ImplicitDense()])
@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_value_correction_removes_the_first_order_error_of_a_loose_solve(strategy, tol):
    value, exact, info = _logistic_value_and_correction(strategy, tol)
    assert info.inner_grad_norm > 1e-5  # the solve really is loose
    raw_error = abs(value - exact)
    assert raw_error > 1e-7
    # second order in the inner gradient: at least 20 times smaller here
    assert abs(value + info.value_correction - exact) < raw_error / 20


def test_value_correction_only_from_an_accurate_linear_solve_of_an_iterative_solve():
    # identity's "solve" is a scaled b, not H^-1 b: no correction from it
    _, _, info = _logistic_value_and_correction(ImplicitIdentity(), 1e-3)
    assert info.linear_solve_residual > 0.1 and info.value_correction is None
    # a closed-form inner solution is exact: nothing to correct (its gradient is rounding)
    X, y, Xv, yv, phi0 = data = _ridge_data()
    _, info = _ridge_hypergrad(ImplicitCG(), RidgeSolver(X, y), data)
    assert info.linear_solve_converged and info.value_correction is None
    # forward only (phi without grad): no backward pass, no correction
    inner, outer, phi0, d = _logistic_problem()
    _, info = argmin(inner, phi0, torch.zeros(d, dtype=DT), hypergradient="cg")
    assert info.value_correction is None


# ------------------------------------------------------------- failures and warnings


class SaddleSolver(ClosedFormSolver):
    """theta* = A^{-1} phi, the stationary point of 0.5 theta^T A theta - phi^T theta."""

    def __init__(self, A):
        self.A = A

    def closed_form(self, phi):
        return torch.linalg.solve(self.A, phi)


def _saddle(strategy):
    A = torch.diag(torch.tensor([3.0, -1.0, 2.0, -0.5], dtype=DT))
    A = A + 0.1 * torch.ones(4, 4, dtype=DT)

    def inner(theta, phi):
        return 0.5 * theta @ A @ theta - phi @ theta

    phi = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=DT, requires_grad=True)
    theta, info = argmin(inner, phi, torch.zeros(4, dtype=DT), hypergradient=strategy,
                         solver=SaddleSolver(A))
    (theta**2).sum().backward()
    exact = 2 * torch.linalg.solve(A.T, torch.linalg.solve(A, phi.detach()))
    return phi.grad, info, exact


def test_cg_on_indefinite_hessian_warns_with_residual_and_stays_finite():
    with pytest.warns(LinearSolveWarning, match=r"relative residual \d\.\d+e[+-]\d+") as record:
        grad, info, exact = _saddle(ImplicitCG())
    assert "curvature" in str(record[0].message)
    assert info.linear_solve_converged is False
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert info.linear_solve_residual > 1e-10


def test_cg_dense_fallback_recovers_exact_gradient_on_indefinite_hessian():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a successful fallback does not warn
        grad, info, exact = _saddle(ImplicitCG(fallback="dense"))
    assert info.fallback.startswith("cg -> dense")
    assert info.linear_solve_converged is True
    assert _rel(grad, exact) < 1e-10
    # The dense strategy itself records that Cholesky failed.
    grad, info, exact = _saddle(ImplicitDense(method="cholesky"))
    assert "used LU" in info.fallback and _rel(grad, exact) < 1e-10


def test_cg_maxiter_too_small_on_ill_conditioned_system_warns():
    X, y, Xv, yv, _ = data = _ridge_data(d=8)
    X = X * torch.logspace(0, 3, 8, dtype=DT)  # condition number ~1e6
    phi0 = torch.zeros(8, dtype=DT)
    data = (X, y, Xv, yv, phi0)
    with pytest.warns(LinearSolveWarning, match="after 2 iterations") as record:
        grad, info = _ridge_hypergrad(ImplicitCG(maxiter=2), RidgeSolver(X, y), data)
    message = str(record[0].message)
    assert f"{info.linear_solve_residual:.3e}" in message
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert info.linear_solve_converged is False and info.linear_solve_iterations == 2


def test_neumann_divergence_warns_with_numbers():
    with pytest.warns(LinearSolveWarning, match=r"diverges: .* = \d\.\d+e\+\d+ > 1"):
        grad, info = _ridge_hypergrad(ImplicitNeumann(n_terms=30, step=1.0))
    assert info.linear_solve_converged is False
    assert torch.isfinite(grad).all()


def test_neumann_tol_not_reached_warns():
    X, y, *_ = data = _ridge_data()
    with pytest.warns(LinearSolveWarning, match="Neumann linear solve did not converge"):
        _ridge_hypergrad(ImplicitNeumann(n_terms=3, tol=1e-8), RidgeSolver(X, y), data)


# ------------------------------------------------------------------ shapes and trees


def test_scalar_theta_and_scalar_phi():
    # f = 0.5 (theta - 1)^2 + 0.5 e^phi theta^2  =>  theta* = 1 / (1 + e^phi).
    def inner(theta, phi):
        return 0.5 * (theta - 1.0) ** 2 + 0.5 * phi.exp() * theta**2

    for strategy in ("cg", "dense", "neumann", "identity"):
        phi = torch.tensor(0.3, dtype=DT, requires_grad=True)
        theta, info = argmin(inner, phi, torch.tensor(0.0, dtype=DT), hypergradient=strategy)
        assert theta.shape == ()
        theta.backward()
        e = math.exp(0.3)
        exact = -e / (1 + e) ** 2
        assert float(phi.grad) == pytest.approx(exact, rel=1e-8), strategy


def test_tree_theta_and_tree_phi():
    X, y, Xv, yv, phi0 = _ridge_data()
    d = X.shape[1]

    def inner(params, hyper):
        pred = hyper["X"] @ params["w"] + params["b"]
        return 0.5 * ((pred - y) ** 2).sum() + 0.5 * (hyper["log_alpha"].exp() * params["w"] ** 2).sum()

    def hypergrad(strategy):
        log_alpha = phi0.clone().requires_grad_(True)
        hyper = {"log_alpha": log_alpha, "X": X}  # X does not require grad
        init = {"w": torch.zeros(d, dtype=DT), "b": torch.zeros((), dtype=DT)}
        params, info = argmin(inner, hyper, init, hypergradient=strategy, solver=LBFGS(tol=1e-12))
        assert set(params) == {"w", "b"} and params["b"].shape == ()
        (0.5 * ((Xv @ params["w"] + params["b"] - yv) ** 2).mean()).backward()
        return log_alpha.grad

    # Exact: the intercept is an unpenalized extra column of ones.
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=DT)], dim=1)
    A = Xa.T @ Xa + torch.diag(torch.cat([phi0.exp(), torch.zeros(1, dtype=DT)]))
    wa = torch.linalg.solve(A, Xa.T @ y)
    Xva = torch.cat([Xv, torch.ones(len(Xv), 1, dtype=DT)], dim=1)
    u = torch.linalg.solve(A, Xva.T @ (Xva @ wa - yv) / len(Xv))
    exact = -phi0.exp() * wa[:d] * u[:d]
    assert _rel(hypergrad("cg"), exact) < 1e-8
    assert _rel(hypergrad("dense"), exact) < 1e-8


def test_zero_outer_gradient_gives_zero_linear_solve():
    X, y, Xv, yv, phi0 = _ridge_data()
    phi = phi0.clone().requires_grad_(True)
    w, info = argmin(_ridge_inner(X, y), phi, torch.zeros(5, dtype=DT), hypergradient="cg")
    (0.0 * w.sum() + phi.sum()).backward()  # b = 0 for the linear solve
    assert torch.equal(phi.grad, torch.ones(5, dtype=DT))
    assert info.linear_solve_iterations == 0 and info.linear_solve_converged is True


def test_phi_leaf_unused_by_inner_loss_gets_only_its_direct_gradient():
    X, y, Xv, yv, phi0 = _ridge_data()
    log_alpha = phi0.clone().requires_grad_(True)
    shift = torch.tensor(0.5, dtype=DT, requires_grad=True)  # used by the outer loss only
    w, info = argmin(lambda w, h: _ridge_inner(X, y)(w, h["log_alpha"]),
                     {"log_alpha": log_alpha, "shift": shift},
                     torch.zeros(5, dtype=DT), hypergradient="cg")
    (0.5 * ((Xv @ w + shift - yv) ** 2).mean()).backward()
    expected = float((Xv @ w.detach() + 0.5 - yv).mean())
    assert float(shift.grad) == pytest.approx(expected, rel=1e-10)
    assert torch.isfinite(log_alpha.grad).all()


def test_phi_without_grad_returns_plain_tensor():
    X, y, _, _, phi0 = _ridge_data()
    w, info = argmin(_ridge_inner(X, y), phi0, torch.zeros(5, dtype=DT), hypergradient="cg")
    assert not w.requires_grad and info.inner_converged


def test_float32_runs_with_dtype_default_tolerances():
    X, y, Xv, yv, phi0 = (t.float() for t in _ridge_data())
    X, y = X / 5, y / 5  # O(1) scale so float32 tolerances are reachable
    phi = phi0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w, info = argmin(_ridge_inner(X, y), phi, torch.zeros(5), hypergradient="cg")
        (0.5 * ((Xv @ w - yv) ** 2).mean()).backward()
    assert w.dtype == torch.float32 and phi.grad.dtype == torch.float32
    exact = _ridge_exact(X.double(), y.double(), Xv.double(), yv.double(), phi0.double())
    assert _rel(phi.grad.double(), exact) < 1e-3


def test_strategies_registered_with_family():
    for name, cls in [("cg", ImplicitCG), ("neumann", ImplicitNeumann),
                      ("identity", ImplicitIdentity), ("dense", ImplicitDense)]:
        strategy = get_strategy(name)
        assert isinstance(strategy, cls) and strategy.name == name
        assert strategy.family == "implicit"
        assert isinstance(strategy.default_solver(), LBFGS)
    assert "ImplicitCG(tol=1e-06" in repr(ImplicitCG(tol=1e-6))


def test_hypergrad_package_does_not_import_sklearn():
    package = pathlib.Path(__file__).resolve().parents[2] / "skbilevel" / "hypergrad"
    pattern = re.compile(r"^\s*(import|from)\s+sklearn\b", re.MULTILINE)
    offenders = [p.name for p in sorted(package.glob("*.py")) if pattern.search(p.read_text())]
    assert offenders == []


class _ScaledRidge:
    """Ridge on badly scaled features, with the diagonal of its Hessian."""

    def __init__(self, n=60, p=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.X = torch.randn(n, p, generator=g, dtype=torch.float64) * torch.logspace(
            -2, 2, p, dtype=torch.float64
        )
        self.y = torch.randn(n, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, w, phi):
        return 0.5 * ((self.X @ w - self.y) ** 2).sum() + 0.5 * (phi.exp() * w * w).sum()

    def hessian_diagonal(self, w, phi):
        self.calls += 1
        return (self.X * self.X).sum(0) + phi.exp()


def test_cg_and_newton_precondition_with_the_inner_loss_diagonal():
    from skbilevel.hypergrad import NewtonCG

    inner = _ScaledRidge()
    grads, infos = {}, {}
    for precondition in (False, True):
        phi = torch.linspace(-3.0, 3.0, 40, dtype=torch.float64).requires_grad_(True)
        w, info = argmin(
            inner, phi, torch.zeros(40, dtype=torch.float64),
            hypergradient=ImplicitCG(tol=1e-12, precondition=precondition),
            solver=NewtonCG(
                tol=1e-10, cg_maxiter=500, precondition=precondition
            ),
        )
        (w * w).sum().backward()
        grads[precondition], infos[precondition] = phi.grad, info
        assert info.extra["preconditioned"] is precondition
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-8, atol=1e-10)
    assert 2 * infos[True].linear_solve_iterations < infos[False].linear_solve_iterations
    # NewtonCG finds the diagonal through argmin's closure
    assert infos[True].inner_converged and infos[False].inner_converged
    assert 2 * infos[True].n_hvp < infos[False].n_hvp


def test_cg_without_a_diagonal_is_not_preconditioned():
    X = torch.randn(10, 3, dtype=torch.float64)
    phi = torch.zeros((), dtype=torch.float64, requires_grad=True)
    w, info = argmin(
        lambda w, la: 0.5 * ((X @ w - 1.0) ** 2).sum() + 0.5 * la.exp() * (w * w).sum(),
        phi, torch.zeros(3, dtype=torch.float64),
    )
    w.sum().backward()
    assert info.extra["preconditioned"] is False


@pytest.mark.parametrize("strategy", ["cg", "dense", "neumann", "identity"])
def test_a_phi_leaf_the_inner_gradient_ignores_gets_a_zero_gradient(strategy):
    # phi["b"] enters the inner loss only as a constant: its indirect term is
    # zero, but phi["b"].grad stayed None after backward (phi["b"].grad.norm()
    # failed), unlike the other strategies
    phi = {
        "a": torch.tensor(0.5, dtype=torch.float64, requires_grad=True),
        "b": torch.tensor(0.3, dtype=torch.float64, requires_grad=True),
    }

    def inner(w, p):
        return ((w[:2] - p["a"]) ** 2).sum() + (w[2] - 1) ** 2 + p["b"] ** 2

    w, _ = argmin(inner, phi, torch.zeros(3, dtype=torch.float64), hypergradient=strategy)
    (w**2).sum().backward()
    assert float(phi["a"].grad) == pytest.approx(2.0, rel=1e-6)
    assert phi["b"].grad is not None and float(phi["b"].grad) == 0.0


def test_cg_drops_an_indefinite_problem_preconditioner():
    """RidgeFolds' Woodbury inverse can lose its definiteness in rounding
    (penalties over 20 decades); solve_cg then raised 'The preconditioner is
    not positive definite' and the whole fit failed. The implicit strategy
    now runs CG without it (recorded in info.extra)."""
    from skbilevel.hypergrad import RidgeFolds

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = X[:, 0] + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    train = torch.ones(2, 30, dtype=torch.float64)
    train[0, :15] = 0
    train[1, 15:] = 0
    folds = RidgeFolds(X, y, train, 1 - train)
    phi = torch.zeros(4, dtype=torch.float64)
    exact = folds.value_and_grad(phi)
    folds.hessian_preconditioner = lambda theta, phi: (lambda r: -r)
    value, grad, info, _ = folds.value_and_grad(phi, hypergradient="cg")
    torch.testing.assert_close(grad, exact[1], rtol=1e-6, atol=1e-10)
    assert "not positive definite" in info.extra["preconditioner_dropped"]
    # ... for the problem's Jacobi diagonal (it ran unpreconditioned before)
    assert info.extra["preconditioned"] is True
    folds.hessian_diagonal = None  # without one either: no preconditioner
    value, grad, info, _ = folds.value_and_grad(phi, hypergradient="cg")
    torch.testing.assert_close(grad, exact[1], rtol=1e-6, atol=1e-10)
    assert info.extra["preconditioned"] is False


@pytest.mark.parametrize(
    "lr, n_steps, match",
    [
        # finite but diverged: the step size, not more steps, is the remedy
        (
            1.0,
            50,
            r"comes from diverging inner steps: over 50 steps of GradientDescent.*"
            r"gradient norm from 1\.732e\+01 to 8\.9\d\de\+48.*"
            r"Lower the solver's lr=1",
        ),
        # not finite: the solver's own warning only (there were two)
        (1.0, 400, r"GradientDescent: the iterates diverged: not finite after 400"),
        # converging, not converged: run longer
        (0.05, 30, r"assumes an inner optimum.*1\.613e-08 > tol 1\.0e-10 after 30 "
                   r"iterations.*run the inner solver longer"),
    ],
)
def test_implicit_strategy_tells_diverging_steps_from_short_ones(lr, n_steps, match):
    def inner(theta, phi):  # curvature 10: gradient descent diverges beyond lr=0.2
        return 5.0 * ((theta - phi) ** 2).sum()

    phi = torch.ones(3, dtype=DT, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = argmin(
            inner,
            phi,
            torch.zeros(3, dtype=DT),
            hypergradient=ImplicitCG(),
            solver=GradientDescent(lr=lr, n_steps=n_steps),
        )
    assert not info.inner_converged
    assert len(caught) == 1 and caught[0].category is InnerSolveWarning
    assert re.search(match, str(caught[0].message))
