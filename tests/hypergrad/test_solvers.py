"""Inner solvers to a tolerance: LBFGS and NewtonCG on logistic regression."""

import pytest
import torch

from skbilevel.hypergrad import LBFGS, InnerSolveWarning, NewtonCG, SolveResult, solve_cg

DT = torch.float64


def _logistic(n=150, d=8, seed=0, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = 2 * torch.randn(d, generator=g, dtype=DT)
    y = torch.where(torch.rand(n, generator=g, dtype=DT) < torch.sigmoid(X @ w_true), 1.0, -1.0)
    X, y = X.to(dtype), y.to(dtype)

    def fun(params):
        margin = y * (X @ params["w"] + params["b"])
        return torch.nn.functional.softplus(-margin).sum() + 0.05 * (params["w"] ** 2).sum()

    init = {"w": torch.zeros(d, dtype=dtype), "b": torch.zeros((), dtype=dtype)}
    return fun, init


def _grad_norm(fun, params):
    params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(fun(params), list(params.values()))
    return float(torch.sqrt(sum((g**2).sum() for g in grads)))


@pytest.mark.parametrize("solver", [LBFGS(), NewtonCG(), LBFGS(tol=1e-12), NewtonCG(tol=1e-12)])
def test_solvers_reach_tolerance_on_logistic_regression(solver):
    fun, init = _logistic()
    tol = solver.tol or 1e-10
    params, res = solver.solve(fun, init)
    assert isinstance(res, SolveResult)
    assert set(params) == {"w", "b"} and params["b"].shape == ()
    assert res.converged and res.grad_norm <= tol
    assert _grad_norm(fun, params) == pytest.approx(res.grad_norm, rel=1e-3, abs=1e-13)
    assert res.n_iter > 0 and res.n_grad >= res.n_iter
    assert not any(t.requires_grad for t in params.values())


def test_lbfgs_and_newton_agree():
    fun, init = _logistic()
    a, _ = LBFGS(tol=1e-12).solve(fun, init)
    b, _ = NewtonCG(tol=1e-12).solve(fun, init)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("solver", [LBFGS(max_iter=3), NewtonCG(max_iter=1)])
def test_solvers_warn_when_max_iter_too_small(solver):
    fun, init = _logistic()
    with pytest.warns(InnerSolveWarning, match=r"inner gradient norm \d\.\d+e[+-]\d+ > tol"):
        params, res = solver.solve(fun, init)
    assert not res.converged and res.n_iter == solver.max_iter
    assert torch.isfinite(params["w"]).all()


def test_solvers_silent_with_warn_false():
    import warnings

    fun, init = _logistic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, res = LBFGS(max_iter=2, warn=False).solve(fun, init)
    assert not res.converged


@pytest.mark.parametrize("Solver", [LBFGS, NewtonCG])
def test_min_iter_moves_a_start_that_already_meets_the_tolerance(Solver):
    # a warm start from a nearby problem's solution: within a loose tol already
    fun, init = _logistic()
    exact, _ = Solver(tol=1e-12).solve(fun, init)
    start = {k: v + 1e-4 for k, v in exact.items()}
    loose = 10 * _grad_norm(fun, start)
    same, res = Solver(tol=loose).solve(fun, start)
    assert res.n_iter == 0 and all(torch.equal(same[k], start[k]) for k in start)
    moved, res = Solver(tol=loose, min_iter=1).solve(fun, start)
    assert res.n_iter == 1 and res.converged
    assert float(fun(moved)) < float(fun(start))
    assert _grad_norm(fun, moved) < _grad_norm(fun, start)
    # a vanishing gradient: nowhere to go, no iteration
    zero_fun = lambda p: (p["w"] ** 2).sum() + (p["b"] ** 2)  # noqa: E731
    zero = {"w": torch.zeros(3, dtype=DT), "b": torch.zeros((), dtype=DT)}
    _, res = Solver(tol=1e-3, min_iter=2).solve(zero_fun, zero)
    assert res.n_iter == 0 and res.converged


def test_float32_default_tolerance():
    fun, init = _logistic(n=60, d=4, dtype=torch.float32)
    scaled = lambda p: fun(p) / 60  # noqa: E731 - O(1) gradients reachable in float32
    for solver in (LBFGS(), NewtonCG()):
        params, res = solver.solve(scaled, init)
        assert res.converged and res.grad_norm <= 1e-5
        assert params["w"].dtype == torch.float32


def test_scalar_parameter_and_non_finite_start():
    fun = lambda t: (t - 3.0) ** 2 + torch.cosh(t)  # noqa: E731
    for solver in (LBFGS(), NewtonCG()):
        t, res = solver.solve(fun, torch.tensor(0.0, dtype=DT))
        assert t.shape == () and res.converged
    with pytest.raises(ValueError, match="not finite"):
        LBFGS().solve(lambda t: torch.log(t).sum(), torch.tensor([-1.0], dtype=DT))
    with pytest.raises(ValueError, match="not finite"):
        NewtonCG().solve(lambda t: torch.log(t).sum(), torch.tensor([-1.0], dtype=DT))


def test_ill_conditioned_quadratic():
    A = torch.diag(torch.logspace(0, 4, 20, dtype=DT))
    b = torch.ones(20, dtype=DT)
    fun = lambda w: 0.5 * w @ A @ w - b @ w  # noqa: E731
    exact = torch.linalg.solve(A, b)
    for solver in (LBFGS(tol=1e-9, max_iter=2000), NewtonCG(tol=1e-9)):
        w, res = solver.solve(fun, torch.zeros(20, dtype=DT))
        assert res.converged
        assert torch.allclose(w, exact, rtol=1e-8, atol=1e-12)


class _ScaledQuadratic:
    """0.5 w^T A w - b^T w with a diagonal spanning six decades; carries its diagonal."""

    def __init__(self, n=80, seed=0, diagonal=None):
        g = torch.Generator().manual_seed(seed)
        B = torch.randn(n, n, generator=g, dtype=DT) / n
        self.A = torch.diag(torch.logspace(-2, 4, n, dtype=DT)) + B @ B.T
        self.b = torch.randn(n, generator=g, dtype=DT)
        self._diagonal = diagonal

    def __call__(self, w):
        return 0.5 * w @ self.A @ w - self.b @ w

    def hessian_diagonal(self, w):
        return self.A.diagonal() if self._diagonal is None else self._diagonal


def test_newton_cg_preconditions_with_the_objective_diagonal():
    fun = _ScaledQuadratic()
    w0 = torch.zeros(80, dtype=DT)
    w_ref = torch.linalg.solve(fun.A, fun.b)
    w_plain, plain = NewtonCG(tol=1e-9, cg_maxiter=2000).solve(lambda w: fun(w), w0)
    w_pre, pre = NewtonCG(tol=1e-9, cg_maxiter=2000).solve(fun, w0)
    w_off, off = NewtonCG(tol=1e-9, cg_maxiter=2000, precondition=False).solve(fun, w0)
    assert plain.converged and pre.converged and off.n_hvp == plain.n_hvp
    lam_min = float(torch.linalg.eigvalsh(fun.A)[0])
    for w in (w_pre, w_plain):
        assert float(torch.linalg.vector_norm(fun.A @ w - fun.b)) <= 1e-9
        # the gradient's tolerance bounds the error: ||w - w*|| <= ||g|| / lambda_min
        assert float(torch.linalg.vector_norm(w - w_ref)) <= 1e-9 / lam_min
    assert 5 * pre.n_hvp < plain.n_hvp


def test_newton_cg_solves_no_more_accurately_than_the_tolerance_needs():
    # from a point whose gradient is 4 tol, the Newton system needs a relative
    # residual of 1/8 (Eisenstat-Walker's safeguard), not sqrt(||g||) = 2e-3
    fun = _ScaledQuadratic()
    w_ref = torch.linalg.solve(fun.A, fun.b)
    g = torch.randn(80, generator=torch.Generator().manual_seed(1), dtype=DT)
    g = 4e-6 * g / torch.linalg.vector_norm(g)
    w0 = w_ref + torch.linalg.solve(fun.A, g)  # gradient g there
    w, res = NewtonCG(tol=1e-6, cg_maxiter=2000, precondition=False).solve(fun, w0)
    assert res.converged and res.n_iter == 1
    assert float(torch.linalg.vector_norm(fun.A @ w - fun.b)) <= 1e-6
    _, loose = solve_cg(lambda v: fun.A @ v, -g, tol=0.12, maxiter=2000)
    _, tight = solve_cg(lambda v: fun.A @ v, -g, tol=2e-3, maxiter=2000)
    assert res.n_hvp <= loose.n_matvec < tight.n_matvec / 1.5


def test_newton_cg_repairs_or_drops_unusable_diagonals():
    w0 = torch.zeros(80, dtype=DT)
    d = _ScaledQuadratic().A.diagonal().clone()
    d[:3] = torch.tensor([0.0, -1.0, float("nan")], dtype=DT)
    for diag in (d, torch.zeros(80, dtype=DT)):
        fun = _ScaledQuadratic(diagonal=diag)
        w, res = NewtonCG(tol=1e-9, cg_maxiter=2000).solve(fun, w0)
        assert res.converged
        torch.testing.assert_close(w, torch.linalg.solve(fun.A, fun.b))
    fun = _ScaledQuadratic(diagonal=torch.ones(79, dtype=DT))
    with pytest.raises(ValueError, match="shaped like theta"):
        NewtonCG().solve(fun, w0)


class _StiffLogistic:
    """A logistic loss with L2 penalties spanning 12 decades, with its exact
    Hessian diagonal (the protocol LogisticFolds implements)."""

    def __init__(self, with_diagonal):
        g = torch.Generator().manual_seed(0)
        self.X = torch.randn(200, 15, generator=g, dtype=torch.float64)
        self.y = (self.X[:, 0] + 0.5 * torch.randn(200, generator=g, dtype=torch.float64) > 0).to(
            torch.float64
        )
        self.alpha = torch.logspace(-4, 8, 15, dtype=torch.float64)
        if with_diagonal:
            self.hessian_diagonal = self._diagonal

    def __call__(self, w):
        z = self.X @ w
        return (torch.nn.functional.softplus(z) - self.y * z).sum() + 0.5 * (self.alpha * w * w).sum()

    def _diagonal(self, w):
        p = torch.sigmoid(self.X @ w)
        return (p * (1 - p)) @ (self.X * self.X) + self.alpha


def test_lbfgs_uses_the_hessian_diagonal_as_initial_inverse_hessian():
    w0 = torch.zeros(15, dtype=torch.float64)
    plain_w, plain = LBFGS(tol=1e-8, max_iter=5000, warn=False).solve(_StiffLogistic(False), w0)
    pre_w, pre = LBFGS(tol=1e-8, max_iter=5000).solve(_StiffLogistic(True), w0)
    assert pre.converged and pre.n_iter < 40
    assert pre.n_iter * 5 < plain.n_iter or not plain.converged
    ref, _ = NewtonCG(tol=1e-10).solve(_StiffLogistic(True), w0)
    torch.testing.assert_close(pre_w, ref, rtol=1e-6, atol=1e-9)


def test_gradient_overflow_at_the_start_names_the_precision():
    """A finite value with an overflowing gradient was blamed on a
    non-differentiable objective only ("sqrt or a norm at 0"; SampleReweighter
    on X * 1e12 in float32, where the user wrote neither)."""
    w0 = torch.ones(2, dtype=torch.float32)

    def fun(w):  # value 1e30, gradient 1e40: beyond float32
        return 1e10 * (1e20 * w).sum()

    with pytest.raises(ValueError, match=r"not differentiable there.*or its gradient overflows.*"
                       r"float64"):
        LBFGS().solve(fun, w0)
