"""Differentiable step solvers: same trajectory as torch.optim, differentiable
in theta, state and tensor hyperparameters, and strict about their inputs."""

import pytest
import torch

from skbilevel.hypergrad import (
    Adam,
    GradientDescent,
    GradientStepSolver,
    Momentum,
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
