"""Differentiable step solvers: same trajectory as torch.optim, differentiable
in theta, state and tensor hyperparameters, and strict about their inputs."""

import warnings

import pytest
import torch

from skbilevel.hypergrad import (
    LBFGS,
    Adam,
    GradientDescent,
    GradientStepSolver,
    InnerSolveWarning,
    Momentum,
    NewtonCG,
    SolveResult,
    StepSolver,
)

DT = torch.float64


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 3, generator=g, dtype=DT)
    y = torch.randn(20, generator=g, dtype=DT)

    def loss(p):
        return ((X @ p["w"] + p["b"] - y) ** 2).mean() + 0.1 * (p["w"] ** 4).sum()

    theta0 = {"w": torch.randn(3, generator=g, dtype=DT), "b": torch.zeros(1, dtype=DT)}
    return loss, theta0


@pytest.mark.parametrize(
    "ours, optim_cls, kwargs",
    [
        (GradientDescent(lr=0.05, n_steps=9), torch.optim.SGD, dict(lr=0.05)),
        (Momentum(lr=0.05, momentum=0.7, n_steps=9), torch.optim.SGD, dict(lr=0.05, momentum=0.7)),
        (
            Momentum(lr=0.05, momentum=0.7, nesterov=True, n_steps=9),
            torch.optim.SGD,
            dict(lr=0.05, momentum=0.7, nesterov=True),
        ),
        (Adam(lr=0.05, betas=(0.8, 0.99), eps=1e-6, n_steps=9), torch.optim.Adam,
         dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6)),
    ],
    ids=["gd", "momentum", "nesterov", "adam"],
)
def test_trajectory_matches_torch_optim(ours, optim_cls, kwargs):
    loss, theta0 = problem()
    theta, result = ours.solve(loss, theta0)
    params = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    opt = optim_cls(list(params.values()), **kwargs)
    for _ in range(9):
        opt.zero_grad()
        loss(params).backward()
        opt.step()
    for k in params:
        assert torch.allclose(theta[k], params[k].detach(), rtol=1e-13, atol=1e-15)
    assert isinstance(result, SolveResult) and result.n_iter == 9
    assert result.n_grad == 10  # 9 steps and the final gradient norm
    assert result.grad_norm > 0
    assert not any(t.requires_grad for t in theta.values())


def test_step_is_differentiable_in_theta_and_lr():
    loss, theta0 = problem()
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    solver = GradientDescent(lr=lr, n_steps=1)
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    new, state = solver.step(loss, theta, None, create_graph=True)
    assert state is None
    (d_lr,) = torch.autograd.grad(new["w"].sum(), lr, retain_graph=True)
    (g,) = torch.autograd.grad(loss(theta), theta["w"], retain_graph=True)
    assert torch.allclose(d_lr, -g.sum())
    # second order: d(sum theta'_w)/d theta_w = 1 - lr * H 1
    (jac,) = torch.autograd.grad(new["w"].sum(), theta["w"])
    (gw,) = torch.autograd.grad(loss(theta), theta["w"], create_graph=True)
    (h1,) = torch.autograd.grad(gw.sum(), theta["w"])
    assert torch.allclose(jac, 1 - 0.1 * h1, rtol=1e-12)


def test_first_order_step_keeps_theta_graph_but_not_gradient_graph():
    loss, theta0 = problem()
    theta = {k: v.clone().requires_grad_(True) for k, v in theta0.items()}
    new, _ = GradientDescent(lr=0.1).step(loss, theta, None, create_graph=False)
    (jac,) = torch.autograd.grad(new["w"].sum(), theta["w"])
    assert torch.equal(jac, torch.ones(3, dtype=DT))  # identity: gradient is a constant


def test_theta_without_grad_is_accepted_with_create_graph():
    loss, theta0 = problem()
    phi = torch.tensor(0.5, dtype=DT, requires_grad=True)
    new, _ = GradientDescent(lr=0.1).step(lambda p: phi * loss(p), theta0, None, create_graph=True)
    assert new["w"].requires_grad  # through phi
    assert not theta0["w"].requires_grad  # the caller's tensor is untouched


def test_per_parameter_learning_rates():
    theta = {"a": torch.zeros(2, dtype=DT), "b": torch.zeros(3, dtype=DT)}
    lin = lambda p: -(p["a"].sum() + p["b"].sum())  # noqa: E731  gradient -1 everywhere
    lr_b = torch.tensor([0.1, 0.2, 0.3], dtype=DT)
    new, _ = GradientDescent(lr={"b": lr_b, "a": 0.5}).step(lin, theta, None)  # key order free
    assert torch.equal(new["a"], torch.full((2,), 0.5, dtype=DT))
    assert torch.equal(new["b"], lr_b)
    pair = [torch.zeros(1), torch.zeros(1)]
    new, _ = GradientDescent(lr=[0.5, 2.0]).step(lambda p: -(p[0] + p[1]).sum(), pair, None)
    assert new[0].item() == 0.5 and new[1].item() == 2.0
    with pytest.raises(ValueError, match="keys of theta"):
        GradientDescent(lr={"a": 0.1}).step(lin, theta, None)
    with pytest.raises(ValueError, match="structure of theta"):
        GradientDescent(lr=[0.1, 0.2]).step(lambda t: t.sum(), torch.zeros(2), None)


def test_adam_zero_gradient_coordinate_keeps_hypergradient_finite():
    # b never enters the loss: v = 0 there, and a plain sqrt would give NaN
    X = torch.randn(10, 2, dtype=DT)
    phi = torch.tensor(0.3, dtype=DT, requires_grad=True)
    solver = Adam(lr=0.1, n_steps=5)
    theta = {"w": torch.ones(2, dtype=DT), "b": torch.ones(1, dtype=DT)}
    state = solver.init_state(theta)
    fun = lambda p: phi.exp() * ((X @ p["w"]) ** 2).mean()  # noqa: E731
    for _ in range(5):
        theta, state = solver.step(fun, theta, state, create_graph=True)
    (theta["w"].sum() + theta["b"].sum()).backward()
    assert torch.isfinite(phi.grad) and phi.grad != 0
    assert torch.equal(theta["b"].detach(), torch.ones(1, dtype=DT))
    assert state["step"].item() == 5


def test_dtype_and_state_follow_theta():
    theta = torch.zeros(3, dtype=torch.float32)
    for solver in (GradientDescent(), Momentum(), Adam()):
        out, res = solver.solve(lambda t: ((t - 1) ** 2).sum(), theta)
        assert out.dtype == torch.float32
        state = solver.init_state(theta)
        if state is not None:
            for leaf in (state.get("momentum_buffer"), state.get("step"), state.get("exp_avg")):
                if leaf is not None:
                    assert leaf.dtype == torch.float32


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GradientDescent(lr=-0.1), "lr"),
        (lambda: GradientDescent(lr=float("nan")), "lr"),
        (lambda: GradientDescent(lr="0.1"), "lr"),
        (lambda: GradientDescent(lr={"a": 0.0}), "lr"),
        (lambda: GradientDescent(lr=torch.tensor(1)), "floating"),
        (lambda: GradientDescent(n_steps=-1), "n_steps"),
        (lambda: GradientDescent(n_steps=2.0), "n_steps"),
        (lambda: GradientDescent(n_steps=True), "n_steps"),
        (lambda: Momentum(momentum=1.0), "momentum"),
        (lambda: Adam(betas=(0.9,)), "betas"),
        (lambda: Adam(betas=(0.9, 1.5)), "betas"),
        (lambda: Adam(eps=-1.0), "eps"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_non_scalar_inner_loss_is_rejected():
    with pytest.raises(ValueError, match="scalar"):
        GradientDescent().step(lambda t: t * 2, torch.zeros(3), None)


def test_unused_parameter_gets_zero_gradient():
    theta = {"used": torch.ones(2), "unused": torch.ones(2)}
    fun = lambda p: (p["used"] ** 2).sum()  # noqa: E731
    new, _ = GradientDescent(lr=0.5).step(fun, theta, None, create_graph=True)
    assert torch.equal(new["unused"].detach(), torch.ones(2))


def test_custom_update_rule():
    class Halving(GradientStepSolver):
        def update(self, theta, grad, state):
            return theta - 0.5 * grad, state

    theta, res = Halving(n_steps=3).solve(lambda t: (t**2).sum(), torch.ones(2))
    assert torch.equal(theta, torch.zeros(2))  # grad 2t: t - t = 0 after one step
    assert isinstance(Halving(), StepSolver)


def test_a_tensor_hyperparameter_must_broadcast_to_every_leaf():
    theta = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}

    def f(t):
        return ((t["a"] - 1) ** 2).sum() + ((t["b"] + 1) ** 2).sum()

    # a (4,) learning rate: torch's "The size of tensor a (4) must match ..." mid-step
    with pytest.raises(ValueError, match=r"lr given as a tensor of shape \(4,\) must be broadcastable"):
        GradientDescent(lr=torch.ones(4, dtype=torch.float64), n_steps=2).solve(f, theta)
    # per-leaf tensors shaped like their leaf, and 0-d tensors, stay fine
    lr = {"a": torch.full((2,), 0.1, dtype=torch.float64), "b": torch.tensor(0.1, dtype=torch.float64)}
    _, res = GradientDescent(lr=lr, n_steps=200).solve(f, theta)
    assert res.grad_norm < 1e-8


# ---------------------------------------- non-finite starts and results, dtypes

FIXED_STEP = [GradientDescent(lr=0.1, n_steps=5), Momentum(n_steps=5), Adam(n_steps=5)]
FIXED_STEP_IDS = ["gd", "momentum", "adam"]


def _quadratic(w):
    return ((w - 1.0) ** 2).sum()


@pytest.mark.parametrize("solver", FIXED_STEP, ids=FIXED_STEP_IDS)
@pytest.mark.parametrize(
    "fun, theta0, match",
    [
        (_quadratic, torch.tensor([float("nan"), 0.0], dtype=DT), "theta0 has non-finite"),
        (lambda w: _quadratic(w) * float("nan"), torch.zeros(2, dtype=DT),
         r"not finite at the starting point \(value nan"),
    ],
    ids=["nan-theta0", "nan-loss"],
)
def test_fixed_step_solve_refuses_a_non_finite_start(solver, fun, theta0, match):
    """Before: theta=[nan, 0.67] (GD, NaN theta0) or [nan, nan] (NaN loss) came
    back with message 'ran the fixed number of steps (5)' and no warning, while
    LBFGS and NewtonCG raised this ValueError."""
    with pytest.raises(ValueError, match=match):
        solver.solve(fun, theta0)


def test_diverging_fixed_step_solve_warns_and_says_so():
    """Before: GradientDescent(lr=10, n_steps=500) on a quadratic of curvature
    2 returned theta=[nan, nan], message 'ran the fixed number of steps (500)',
    and no warning."""
    solver = GradientDescent(lr=10.0, n_steps=500)
    with pytest.warns(InnerSolveWarning, match=r"diverged.*lower the solver's lr \(now 10\)") as rec:
        theta, res = solver.solve(_quadratic, torch.zeros(2, dtype=DT))
    assert len(rec) == 1 and rec[0].filename == __file__  # points at the solve call
    assert not torch.isfinite(theta).any()
    assert res.converged is False and "diverged" in res.message
    assert "2.828e+00 at the start" in res.message
    assert res.n_iter == 500 and res.n_grad == 502  # + the start, examined on failure


@pytest.mark.parametrize("solver", FIXED_STEP, ids=FIXED_STEP_IDS)
def test_fixed_step_solve_on_a_valid_problem_is_silent_and_unchanged(solver):
    """The end-of-run finiteness check adds no warning and keeps the message."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theta, res = solver.solve(_quadratic, torch.zeros(2, dtype=DT))
    assert torch.isfinite(theta).all()
    assert res.message == "ran the fixed number of steps (5)" and res.n_grad == 6


@pytest.mark.parametrize("solver", FIXED_STEP + [LBFGS(), NewtonCG()],
                         ids=FIXED_STEP_IDS + ["lbfgs", "newton"])
def test_integer_theta0_is_refused_with_the_fix(solver):
    """Before: every solver raised torch's RuntimeError 'only Tensors of floating
    point dtype can require gradients'."""
    with pytest.raises(ValueError, match=r"theta0 must hold real floating-point.*torch.int64"):
        solver.solve(_quadratic, {"w": torch.zeros(2, dtype=torch.long)})


@pytest.mark.parametrize("solver", FIXED_STEP + [LBFGS(), NewtonCG()],
                         ids=FIXED_STEP_IDS + ["lbfgs", "newton"])
def test_loss_independent_of_theta_has_zero_gradient(solver):
    """Before: GradientDescent, Momentum and Adam raised torch's RuntimeError
    'element 0 of tensors does not require grad and does not have a grad_fn'
    (in the step, then in the final gradient norm); LBFGS and NewtonCG
    already returned theta0 with a zero gradient."""
    theta0 = torch.tensor([0.5, -2.0], dtype=DT)
    theta, res = solver.solve(lambda w: torch.tensor(1.0, dtype=DT), theta0)
    assert torch.equal(theta, theta0)
    assert res.grad_norm == 0.0 and res.converged


def test_step_of_a_loss_independent_of_theta_is_zero_with_a_graph_too():
    """Before: the step itself raised 'element 0 of tensors does not require
    grad' (create_graph=True, as the unrolled strategies call it)."""
    theta = torch.ones(2, dtype=DT)
    new, _ = GradientDescent(lr=0.5).step(
        lambda w: torch.tensor(3.0, dtype=DT), theta, None, create_graph=True
    )
    assert torch.equal(new.detach(), theta)
