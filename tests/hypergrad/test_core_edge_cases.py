"""Regression tests of QA session 14 on the solver core (``skbilevel.hypergrad``).

Each test fails on the code before its fix; the numbers in the docstrings are
the ones measured there.
"""

import collections
import math
import warnings

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import (
    LBFGS,
    Adam,
    BOME,
    BestResponse,
    EvoGrad,
    FiniteDifferenceDARTS,
    GradientDescent,
    ImplicitCG,
    ImplicitDense,
    ImplicitIdentity,
    ImplicitNeumann,
    KernelRidgeSolver,
    NewtonCG,
    RidgeSolver,
    adaptive_penalty_basis,
    argmin,
    batched_cg,
    minimize_newton,
    minimize_outer,
    solve_cg,
)

DT = torch.float64


def _ridge_data(seed=0, n=20, p=4, n_val=10):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, dtype=DT, generator=gen)
    y = torch.randn(n, dtype=DT, generator=gen)
    Xv = torch.randn(n_val, p, dtype=DT, generator=gen)
    yv = torch.randn(n_val, dtype=DT, generator=gen)
    return X, y, Xv, yv


def _exact_ridge_hypergradient(X, y, Xv, yv, log_alpha):
    """d/d log_alpha of the validation MSE at the ridge solution, by autograd
    through the closed form."""
    la = torch.as_tensor(log_alpha, dtype=DT).detach().requires_grad_()
    A = X.T @ X + la.exp() * torch.eye(X.shape[1], dtype=DT)
    w = torch.linalg.solve(A, X.T @ y)
    (g,) = torch.autograd.grad(((Xv @ w - yv) ** 2).mean(), la)
    return g


def test_best_response_does_not_perturb_phi_leaves_without_grad():
    """Data passed in phi (a leaf that does not require grad) was perturbed with
    the penalty: 32 random directions over 81 entries, and a hypergradient of
    +0.0132 for an exact -0.0247. Only leaves requiring grad move now."""
    X, y, Xv, yv = _ridge_data()

    def inner(w, phi):
        return 0.5 * ((phi["X"] @ w - y) ** 2).sum() + 0.5 * phi["la"].exp() * (w**2).sum()

    la = torch.tensor(0.3, dtype=DT, requires_grad=True)
    theta, info = argmin(
        inner, {"la": la, "X": X}, torch.zeros(4, dtype=DT),
        hypergradient=BestResponse(random_state=0),
    )
    ((Xv @ theta - yv) ** 2).mean().backward()
    exact = _exact_ridge_hypergradient(X, y, Xv, yv, 0.3)
    assert info.extra["n_samples"] == 1
    assert torch.allclose(la.grad, exact, rtol=1e-3), (float(la.grad), float(exact))


@pytest.mark.parametrize("phi_dtype, theta_dtype", [(torch.float32, DT), (DT, torch.float32)])
def test_best_response_phi_and_theta_of_different_dtypes(phi_dtype, theta_dtype):
    """A float32 log-penalty on a float64 model failed in the fit with torch's
    'expected m1 and m2 to have the same dtype, but got: double != float' (the
    implicit, unrolled and other proxy strategies ran). The fit's products now
    run in theta's dtype; phi.grad keeps phi's dtype and theta theta's."""
    X, y, Xv, yv = _ridge_data()
    Xt, yt = X.to(theta_dtype), y.to(theta_dtype)

    def inner(w, la):
        return 0.5 * ((Xt @ w - yt) ** 2).sum() + 0.5 * la.to(theta_dtype).exp() * (w**2).sum()

    la = torch.tensor(0.3, dtype=phi_dtype, requires_grad=True)
    theta, _ = argmin(
        inner, la, torch.zeros(4, dtype=theta_dtype),
        hypergradient=BestResponse(random_state=0),
    )
    assert theta.dtype == theta_dtype
    ((Xv @ theta.double() - yv) ** 2).mean().backward()
    assert la.grad.dtype == phi_dtype
    exact = _exact_ridge_hypergradient(X, y, Xv, yv, 0.3)
    assert abs(float(la.grad) - float(exact)) <= 2e-3 * abs(float(exact))


@pytest.mark.parametrize("strategy", ["cg", "dense", "neumann"])
def test_implicit_theta_leaf_unused_by_inner_loss(strategy):
    """A theta leaf the inner loss does not use, but the outer loss does: its
    rows of H are zero and its part of b made H v = b inconsistent. CG diverged
    to a hypergradient of 1.2e151 (residual 3.4e152), the dense solve fell back
    to the pseudo-inverse and warned (residual 0.86). The leaf's mixed product is
    zero, so its part of v does not matter: the answer is the used part's,
    -0.0247, now solved to tolerance without a warning."""
    X, y, Xv, yv = _ridge_data()

    def inner(theta, la):
        w = theta["w"]
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.3, dtype=DT, requires_grad=True)
    init = {"w": torch.zeros(4, dtype=DT), "u": torch.ones(2, dtype=DT)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta, info = argmin(inner, la, init, hypergradient=strategy)
        (((Xv @ theta["w"] - yv) ** 2).mean() + (theta["u"] ** 2).sum()).backward()
    exact = _exact_ridge_hypergradient(X, y, Xv, yv, 0.3)
    assert torch.allclose(la.grad, exact, rtol=1e-8, atol=0), (float(la.grad), float(exact))
    assert info.linear_solve_converged and info.fallback is None
    assert info.extra["unused_theta_entries"] == 2


@pytest.mark.parametrize("strategy", ["cg", "dense", "neumann", "identity"])
def test_implicit_zero_outer_gradient_gives_zero_phi_grad(strategy):
    """An outer loss whose gradient in theta is exactly zero (a dead ReLU) left
    phi.grad at None after backward with the implicit strategies (so
    phi.grad.norm() failed), where reverse, forward and the proxies give 0."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.3, dtype=DT, requires_grad=True)
    theta, info = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=strategy)
    torch.relu(-theta - 100.0).sum().backward()
    assert la.grad is not None and float(la.grad) == 0.0
    assert info.linear_solve_iterations == 0 and info.linear_solve_converged


def test_adam_in_bfloat16_moves_and_matches_torch_optim():
    """Adam kept its step count in theta's dtype: in bfloat16, 0.999 rounds to 1,
    so the bias correction 1 - beta2**t was 0, v_hat infinite and the parameters
    never left 0 (torch.optim.Adam: 0.957 after 1000 steps); the count also
    stopped at 256. Now counted in float32, as torch.optim.Adam does."""
    target = torch.ones(3)

    def fun(w):
        return ((w.float() - target) ** 2).sum().to(torch.bfloat16)

    solver = Adam(lr=0.01, n_steps=1000)
    theta = torch.zeros(3, dtype=torch.bfloat16)
    state = solver.init_state(theta)
    for _ in range(1000):
        theta, state = solver.step(fun, theta, state)
    p = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.01)
    for _ in range(1000):
        opt.zero_grad()
        fun(p).backward()
        opt.step()
    assert float(state["step"]) == 1000.0
    assert theta.dtype == torch.bfloat16
    assert torch.equal(theta, p.detach()), (theta, p)
    # float64 is unchanged: the count keeps the widest dtype of the leaves
    state = Adam().init_state({"a": torch.zeros(2, dtype=DT), "b": torch.zeros(1)})
    assert state["step"].dtype == DT


def test_batched_cg_exactly_solved_row_is_not_negative_curvature():
    """A system solved exactly in one step (A = 2 I) beside one that needs more:
    its residual and direction became exactly 0, and its p^T A p = 0 at the next
    step was counted as non-positive curvature: fallback 'cg stopped on
    non-positive curvature' and '1 of 2 system(s) met non-positive curvature'
    on two positive definite systems. The solution was right; now so is the
    record."""
    A = torch.stack([
        2.0 * torch.eye(3, dtype=DT),
        torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 1.0]], dtype=DT),
    ])
    b = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], dtype=DT)
    x, result, curvature = batched_cg(lambda v: torch.einsum("bij,bj->bi", A, v), b)
    assert torch.allclose(x, torch.linalg.solve(A, b), rtol=1e-12, atol=0)
    assert result.converged and result.fallback is None
    assert curvature["rows"] == 0 and "curvature" not in result.message


def test_theta_independent_of_infinite_phi_stays_finite():
    """A theta with no path to phi gets a zero anchor to phi; it was phi * 0,
    NaN for an infinite phi: first_order with log_alpha = -inf (no penalty)
    returned theta = [nan, nan, nan, nan], silently. Now the unpenalized
    iterate, and a zero gradient for log_alpha."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(-math.inf, dtype=DT, requires_grad=True)
    solver = GradientDescent(lr=0.01, n_steps=50)
    theta, info = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient="first_order",
                         solver=solver)
    plain, _ = solver.solve(lambda w: 0.5 * ((X @ w - y) ** 2).sum(), torch.zeros(4, dtype=DT))
    assert info.extra["theta_independent_of_phi"]
    assert torch.equal(theta.detach(), plain)
    theta.sum().backward()
    assert float(la.grad) == 0.0


def test_best_response_with_an_infinite_log_penalty():
    """Per-feature log-penalties with one feature unpenalized (-inf): phi - phi0
    was NaN there, so BestResponse returned theta all NaN (and a NaN
    hypergradient). Now theta is the inner solution, the infinite entry gets a
    zero gradient and the finite ones match the 'dense' strategy's."""
    X, y, Xv, yv = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (la.exp() * w**2).sum()

    start = torch.tensor([-math.inf, 0.5, -0.3, 1.0], dtype=DT)
    grads = []
    for strategy in (BestResponse(random_state=0, sigma=1e-3), "dense"):
        la = start.clone().requires_grad_()
        theta, _ = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=strategy)
        assert torch.isfinite(theta).all()
        ((Xv @ theta - yv) ** 2).mean().backward()
        grads.append(la.grad)
    assert float(grads[0][0]) == 0.0
    assert torch.allclose(grads[0][1:], grads[1][1:], rtol=1e-4, atol=1e-10), grads


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_closed_form_not_finite_is_not_converged():
    """A closed form is exact by construction, so its records said converged
    unconditionally: RidgeSolver at log_alpha = 800 (alpha = inf in float64)
    gave inner_grad_norm nan and a NaN hypergradient with inner_converged=True
    (the 'closed_form' strategy) and SolveResult.converged=True (its solve, as
    the implicit strategies use it). Both now say False."""
    X, y, _, _ = _ridge_data(n=5, p=10)
    solver = RidgeSolver(X, y, fit_intercept=False)
    la = torch.tensor(800.0, dtype=DT, requires_grad=True)
    theta, info = argmin(solver.inner_loss, la, solver.init_theta(),
                         hypergradient="closed_form", solver=solver)
    assert math.isnan(info.inner_grad_norm) and info.inner_converged is False
    _, result = solver.solve(lambda t: solver.inner_loss(t, la.detach()), solver.init_theta(),
                             phi=la.detach())
    assert result.converged is False
    # an ordinary penalty still counts as converged
    la = torch.tensor(0.0, dtype=DT, requires_grad=True)
    _, info = argmin(solver.inner_loss, la, solver.init_theta(),
                     hypergradient="closed_form", solver=solver)
    assert info.inner_converged is True


def test_minimize_outer_refuses_an_optimizer_over_other_tensors():
    """An optimizer instance built over other tensors stepped those: phi stayed
    at 3.0 and the loop stopped after 5 iterations on 'tol', converged=True.
    Now a ValueError that says so; an optimizer over phi (and more) still runs."""
    x = torch.tensor([3.0], dtype=DT, requires_grad=True)
    other = torch.zeros(1, dtype=DT, requires_grad=True)

    def objective(p):
        return ((p - 1.0) ** 2).sum()

    with pytest.raises(ValueError, match="does not update 1 of phi's 1 leaves"):
        minimize_outer(objective, x, optimizer=torch.optim.SGD([other], lr=0.1))
    assert float(x.detach()) == 3.0
    res = minimize_outer(objective, x, optimizer=torch.optim.SGD([x, other], lr=0.25),
                         max_iter=200, tol=1e-12)
    assert res.converged and abs(float(x.detach()) - 1.0) < 1e-6


def test_adaptive_penalty_basis_with_a_group_id_no_feature_has():
    """Group ids 0 and 2 (none is 1): the empty group's 0 / 0 made the mean
    squared coefficient NaN, and with it every entry of the basis. An unused
    id is now left out: the basis equals that of the ids 0 and 1."""
    coef = torch.tensor([[2.0, 1.0, 0.5], [0.3, 0.0, 1.0]], dtype=DT)
    gap = adaptive_penalty_basis(coef, groups=torch.tensor([0, 2, 2]))
    dense = adaptive_penalty_basis(coef, groups=torch.tensor([0, 1, 1]))
    assert torch.isfinite(gap).all()
    assert torch.equal(gap, dense)


@pytest.mark.parametrize("solver", [LBFGS, NewtonCG])
def test_solvers_refuse_a_start_where_the_gradient_is_not_finite(solver):
    """sqrt(||w||^2) at w = 0: a finite value and a NaN gradient. LBFGS spent 25
    line-search evaluations and warned 'line search could not decrease the
    objective (floating-point limit?)', returning the start; NewtonCG raised
    'The right-hand side of the linear solve is not finite ... check the outer
    loss'. Both now raise a ValueError that names the gradient and the fix."""

    def fun(w):
        return torch.sqrt((w**2).sum()) + ((w - 1.0) ** 2).sum()

    with pytest.raises(ValueError, match="gradient of the inner objective is not finite"):
        solver().solve(fun, torch.zeros(3, dtype=DT))
    w, result = solver().solve(fun, torch.full((3,), 0.1, dtype=DT))
    assert result.converged


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ImplicitCG(fallback="dense", dense_max_dim=None), "dense_max_dim"),
        (lambda: ImplicitCG(fallback="Dense"), "fallback must be None or 'dense'"),
        (lambda: ImplicitDense(method="qr"), "method must be 'auto', 'cholesky' or 'lu'"),
    ],
)
def test_implicit_strategy_arguments_checked_when_built(make, match):
    """These were first read in the backward pass: dense_max_dim=None failed
    there with a TypeError "'<=' not supported between instances of 'int' and
    'NoneType'" once CG missed its tolerance; a bad fallback or dense method
    raised only at backward. Now a ValueError at construction."""
    with pytest.raises(ValueError, match=match):
        make()


def test_implicit_inner_tol_takes_numpy_numbers_not_bools():
    """inner_tol=np.float32(1e-6) was refused ('must be a non-negative number'),
    as the rest of the core accepts numpy scalars; inner_tol=True passed as a
    tolerance of 1.0. Now the first works and the second is refused."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.0, dtype=DT, requires_grad=True)
    _, info = argmin(inner, la, torch.zeros(4, dtype=DT),
                     hypergradient=ImplicitCG(inner_tol=np.float32(1e-6)))
    assert info.inner_converged and info.extra["inner_tol"] == pytest.approx(1e-6)
    with pytest.raises(ValueError, match="inner_tol"):
        argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=ImplicitCG(inner_tol=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: EvoGrad(n_samples=np.int64(16), random_state=0),
        lambda: BestResponse(n_samples=np.int64(1), random_state=0),
        lambda: BOME(eta=np.float32(0.5), step_size=np.float64(0.1)),
        lambda: FiniteDifferenceDARTS(epsilon=np.float32(0.01)),
    ],
    ids=["evograd", "best_response", "bome", "darts"],
)
def test_strategy_numbers_may_be_numpy_scalars(make):
    """n_samples=np.int64(16) ('must be a positive integer'), BOME's
    eta=np.float32(0.5) and DARTS's epsilon=np.float32(0.01) ('must be a
    positive (finite) number') were refused; they run now."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):  # a mean: BOME's default gradient steps converge on it
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.0, dtype=DT, requires_grad=True)
    theta, _ = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=make())
    theta.sum().backward()
    assert torch.isfinite(la.grad)


def test_darts_epsilon_refuses_a_bool():
    """FiniteDifferenceDARTS(epsilon=True) was taken as a perturbation of 1."""
    with pytest.raises(ValueError, match="epsilon must be a positive finite number"):
        FiniteDifferenceDARTS(epsilon=True)


def test_kernel_ridge_solver_records_its_lu_fallback():
    """KernelRidgeSolver declared last_fallback but never set it: on an
    indefinite kernel matrix the Cholesky factorization failed and an LU solve
    was used, while the 'closed_form' strategy's info.fallback read None
    (RidgeSolver records the same fallback). Now recorded, and cleared on a
    later positive definite solve."""
    y = torch.tensor([1.0, 0.0], dtype=DT)
    bad = KernelRidgeSolver(K=torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT), y=y)
    la = torch.tensor(-3.0, dtype=DT, requires_grad=True)
    dual, info = argmin(bad.inner_loss, la, bad.init_theta(), hypergradient="closed_form",
                        solver=bad)
    assert info.fallback is not None and "LU" in info.fallback
    assert info.inner_grad_norm < 1e-12
    good = KernelRidgeSolver(K=torch.eye(2, dtype=DT), y=y)
    _, info = argmin(good.inner_loss, la, good.init_theta(), hypergradient="closed_form",
                     solver=good)
    assert info.fallback is None


@pytest.mark.parametrize("strategy", ["closed_form", "cg", "evograd", "bome"])
def test_vector_inner_loss_is_a_value_error(strategy):
    """An inner loss returning one value per sample (a forgotten .sum()) failed
    deep in autograd with 'grad can be implicitly created only for scalar
    outputs' (closed_form, or an implicit strategy with a closed-form solver,
    and BOME), or in EvoGrad with "shape '[]' is invalid for input of size 20";
    the unrolled strategies and LBFGS already said 'must return a scalar
    tensor'. Now all do."""
    X, y, _, _ = _ridge_data()
    solver = RidgeSolver(X, y, fit_intercept=False)

    def per_sample(theta, la):
        w = theta["coef"]
        return 0.5 * (X @ w - y) ** 2 + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.0, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match=r"must return a scalar tensor; got Tensor with shape \(20,\)"):
        argmin(per_sample, la, solver.init_theta(), hypergradient=strategy, solver=solver)


def test_neumann_without_tol_reports_converged_by_the_default_tolerance():
    """Without tol, the Neumann record's linear_solve_converged was 'the series
    contracted' (residual < 1): 5 terms left a relative residual of 0.037
    and read converged=True. It now says whether the dtype's default tolerance
    is met: False there, True for a series summed to 1e-10."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    for n_terms, expected in ((5, False), (3000, True)):
        la = torch.tensor(0.3, dtype=DT, requires_grad=True)
        theta, info = argmin(inner, la, torch.zeros(4, dtype=DT),
                             hypergradient=ImplicitNeumann(n_terms=n_terms))
        theta.sum().backward()
        assert (info.linear_solve_residual <= 1e-10) is expected
        assert info.linear_solve_converged is expected, info.linear_solve_residual


def _quartic(x):
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=DT)
    value = float(0.5 * x @ A @ x - x.sum() + (x**4).sum())
    return value, A @ x - 1.0 + 4.0 * x**3, A + torch.diag(12.0 * x**2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"n_iter_no_change": 0}, ValueError, "n_iter_no_change must be an integer >= 1"),
        ({"callbacks": lambda state: False}, TypeError, "pass \\[callback\\]"),
        ({"c1": -1.0}, ValueError, "c1 must be a number in \\(0, 1\\)"),
    ],
)
def test_minimize_newton_checks_its_arguments(kwargs, error, match):
    """minimize_newton took n_iter_no_change=0 and stopped after one Newton step
    (x = [1.94, 1.96], the optimum is [0.21, 0.33]) reported converged; a single
    callable for callbacks failed after the first step with "'function' object
    is not iterable"; c1 was not checked. Now the checks of minimize_outer."""
    with pytest.raises(error, match=match):
        minimize_newton(_quartic, torch.full((2,), 3.0, dtype=DT), **kwargs)
    x, result = minimize_newton(_quartic, torch.full((2,), 3.0, dtype=DT))
    assert result.converged and torch.allclose(x, torch.tensor([0.2123, 0.3255], dtype=DT),
                                               atol=1e-4)


_Params = collections.namedtuple("_Params", ["w", "b"])


@pytest.mark.parametrize("strategy, solver", [
    ("cg", None), ("reverse", GradientDescent(lr=0.5, n_steps=300)),
    ("forward", GradientDescent(lr=0.5, n_steps=300)),
])
def test_namedtuple_theta_stays_a_namedtuple(strategy, solver):
    """A namedtuple theta was rebuilt as a list by the tree helpers (its type
    name is not 'tuple'), so the inner loss failed on theta.w with
    "AttributeError: 'list' object has no attribute 'w'" in every strategy.
    It now keeps its type, and the hypergradient is the dense strategy's."""
    X, y, Xv, yv = _ridge_data()

    def inner(theta, la):
        return 0.5 * ((X @ theta.w + theta.b - y) ** 2).mean() + 0.5 * la.exp() * (theta.w**2).sum()

    grads = []
    for how, how_solver in ((strategy, solver), ("dense", None)):
        la = torch.tensor(0.3, dtype=DT, requires_grad=True)
        init = _Params(torch.zeros(4, dtype=DT), torch.zeros((), dtype=DT))
        theta, _ = argmin(inner, la, init, hypergradient=how, solver=how_solver)
        assert isinstance(theta, _Params)
        ((Xv @ theta.w + theta.b - yv) ** 2).mean().backward()
        grads.append(la.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-6), grads


def test_forward_mode_with_learned_step_sizes_in_a_namedtuple():
    """Per-leaf learned step sizes given as a namedtuple (shaped like a
    namedtuple theta): the forward strategy rebuilt the solver's lr with
    type(value)(generator) and failed with "_Params.__new__() missing 1 required
    positional argument: 'b'". Now its gradients equal reverse mode's."""
    X, y, _, _ = _ridge_data()

    def inner(theta, la):
        return 0.5 * ((X @ theta.w + theta.b - y) ** 2).mean() + 0.5 * la.exp() * (theta.w**2).sum()

    grads = []
    for strategy in ("reverse", "forward"):
        la = torch.tensor(0.3, dtype=DT, requires_grad=True)
        lr = _Params(torch.tensor(0.3, dtype=DT, requires_grad=True),
                     torch.tensor(0.2, dtype=DT, requires_grad=True))
        init = _Params(torch.zeros(4, dtype=DT), torch.zeros((), dtype=DT))
        theta, _ = argmin(inner, la, init, hypergradient=strategy,
                          solver=GradientDescent(lr=lr, n_steps=20))
        (theta.w.sum() + theta.b).backward()
        grads.append(torch.stack([la.grad, lr.w.grad, lr.b.grad]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10), grads


def test_cg_warm_start_record_says_whether_the_start_was_used():
    """ImplicitCG(warm_start=True) recorded warm_started=True whenever it had a
    previous solution, also when solve_cg dropped it for being worse than the
    zero start (the next outer gradient of opposite sign: CG ran its 4
    iterations from zero). The record now follows solve_cg, which reports it
    (LinearSolveResult.warm_started)."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    strategy = ImplicitCG(warm_start=True)
    used = []
    for sign in (1.0, -1.0, -1.0):
        la = torch.tensor(0.3, dtype=DT, requires_grad=True)
        theta, info = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=strategy)
        (sign * 1000.0 * theta.sum()).backward()
        used.append(info.extra["warm_started"])
    assert used == [False, False, True]
    b = torch.ones(2, dtype=DT)
    _, result = solve_cg(lambda v: 2.0 * v, b, x0=-b)
    assert result.warm_started is False


@pytest.mark.parametrize("strategy, solver", [
    ("cg", LBFGS()), ("cg", NewtonCG()), ("dense", LBFGS()), ("evograd", LBFGS()),
    ("cg", GradientDescent(lr=0.02, n_steps=3000)),
])
def test_mixed_precision_theta_keeps_each_leaf_dtype(strategy, solver):
    """A float32 weight beside a float64 bias: LBFGS and NewtonCG iterate on
    one flat vector of the promoted dtype and returned every leaf float64, so
    'cg' gave theta['w'] in float64 and an outer loss on float32 data failed
    with 'expected m1 and m2 to have the same dtype' (where 'reverse' kept
    float32). Leaves now keep their dtypes; the implicit backward pass still
    computes in the promoted dtype (so CG meets its float64 tolerance, as
    before, also from a fixed-step solver's float32 leaf), and evograd mixes
    the dtypes without failing."""
    X, y, Xv, yv = _ridge_data()

    def inner(theta, la):
        w, b = theta["w"].double(), theta["b"]
        return 0.5 * ((X @ w + b - y) ** 2).mean() + 0.5 * la.exp() * (w**2).sum()

    init = {"w": torch.zeros(4), "b": torch.zeros((), dtype=DT)}
    la = torch.tensor(0.3, dtype=DT, requires_grad=True)
    kwargs = {"hypergradient": EvoGrad(random_state=0)} if strategy == "evograd" else {
        "hypergradient": strategy}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta, info = argmin(inner, la, init, solver=solver, **kwargs)
        assert theta["w"].dtype == torch.float32 and theta["b"].dtype == DT
        ((Xv.float() @ theta["w"] + theta["b"] - yv) ** 2).mean().backward()
    assert torch.isfinite(la.grad)
    if strategy != "evograd":
        assert info.linear_solve_converged


@pytest.mark.parametrize("strategy", [
    "neumann", ImplicitNeumann(step=0.01), "identity", ImplicitIdentity(step=0.1),
])
def test_nan_outer_gradient_is_named_by_every_implicit_strategy(strategy):
    """A NaN outer loss: 'cg' and 'dense' said the right-hand side is not finite
    (check the outer loss), but Neumann blamed the eigenvalue estimate ('pass
    ImplicitNeumann(step=...)') or a singular Hessian, and the identity a
    singular Hessian. All now raise the same ValueError."""
    X, y, _, _ = _ridge_data()

    def inner(w, la):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w**2).sum()

    la = torch.tensor(0.3, dtype=DT, requires_grad=True)
    theta, _ = argmin(inner, la, torch.zeros(4, dtype=DT), hypergradient=strategy)
    with pytest.raises(ValueError, match="right-hand side of the linear solve is not finite"):
        (theta.sum() * math.nan).backward()


@pytest.mark.parametrize("kernel", ["linear", "rbf", "poly", "ntk", "nngp"])
def test_kernel_diagonal_refuses_what_pairwise_kernel_refuses(kernel):
    # a misspelt parameter was silently ignored by kernel_diagonal
    from skbilevel.hypergrad import kernel_diagonal, pairwise_kernel

    X = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Bad parameters"):
        pairwise_kernel(X, kernel=kernel, gama=0.1)
    with pytest.raises(ValueError, match="Bad parameters"):
        kernel_diagonal(X, kernel=kernel, gama=0.1)
    torch.testing.assert_close(
        kernel_diagonal(X, kernel=kernel), pairwise_kernel(X, kernel=kernel).diagonal()
    )
