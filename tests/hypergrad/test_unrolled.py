"""Unrolled hypergradient strategies checked against exact answers.

Ridge with one log-penalty per feature has a closed-form implicit
hypergradient; reverse and forward mode must agree with each other to
rounding and approach it as T grows. Non-quadratic problems (an MLP with
weight decay, MAML) are checked against central finite differences of the
unrolled map itself.
"""

import warnings

import pytest
import torch

from skbilevel.hypergrad import (
    Adam,
    FiniteDifferenceDARTS,
    FirstOrder,
    GradientDescent,
    InnerSolveWarning,
    Momentum,
    OneStepLookahead,
    StepSolver,
    TruncatedReverse,
    UnrolledForward,
    UnrolledReverse,
    argmin,
    available_strategies,
    get_strategy,
)

DT = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- ridge


def ridge_problem(n=30, d=4, seed=0):
    """Ridge with one log-penalty per feature; condition number about 8.5, so
    gradient descent needs a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 0.6, 0.3, 0.15], dtype=DT)
    X = torch.randn(n, d, generator=g, dtype=DT) * scale
    y = X @ torch.randn(d, generator=g, dtype=DT) + 0.3 * torch.randn(n, generator=g, dtype=DT)
    Xv = torch.randn(n, d, generator=g, dtype=DT) * scale
    yv = Xv @ torch.randn(d, generator=g, dtype=DT)
    phi0 = torch.linspace(-5.0, -2.0, d, dtype=DT)

    def inner(w, phi):
        return 0.5 * ((X @ w - y) ** 2).mean() + 0.5 * (phi.exp() * w**2).sum()

    def outer(w):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    A = X.T @ X / n + torch.diag(phi0.exp())
    w_star = torch.linalg.solve(A, X.T @ y / n)
    grad_F = Xv.T @ (Xv @ w_star - yv) / n
    exact = -phi0.exp() * w_star * torch.linalg.solve(A, grad_F)
    lr = 1.0 / float(torch.linalg.eigvalsh(A).max())
    return inner, outer, phi0, exact, lr


def hypergrad(inner, outer, phi0, strategy, solver, init=None):
    phi = phi0.clone().requires_grad_(True)
    w0 = torch.zeros(phi0.shape[0], dtype=DT) if init is None else init(phi)
    w, info = argmin(inner, phi, w0, hypergradient=strategy, solver=solver)
    outer(w).backward()
    return phi.grad.clone(), w.detach(), info


def test_registered_names():
    names = set(available_strategies())
    assert {"reverse", "truncated", "forward", "first_order", "darts", "lookahead"} <= names
    assert isinstance(get_strategy("lookahead"), OneStepLookahead)
    assert get_strategy("lookahead").n_steps == 1
    for name in ("reverse", "truncated", "forward", "first_order", "darts", "lookahead"):
        s = get_strategy(name)
        assert s.family == "unrolled" and s.solver_kind == "step"
        assert isinstance(s.default_solver(), GradientDescent)


def test_ridge_reverse_forward_agree_and_converge_to_exact():
    inner, outer, phi0, exact, lr = ridge_problem()
    errors = []
    for T in (10, 100, 1000):
        solver = GradientDescent(lr=lr, n_steps=T)
        g_rev, _, info_r = hypergrad(inner, outer, phi0, "reverse", solver)
        g_fwd, _, info_f = hypergrad(inner, outer, phi0, "forward", solver)
        assert rel(g_fwd, g_rev) < 1e-10
        assert info_r.inner_iterations == info_f.inner_iterations == T
        assert info_f.n_hvp == T * (phi0.numel() + 1)  # m batched jvps + one vjp per step
        assert info_r.n_hvp == T  # counted when backward ran
        assert info_f.extra["method"] == "double_vjp" and info_f.fallback is None
        errors.append(rel(g_rev, exact))
    assert errors[0] > errors[1] > errors[2]
    # forward mode keeps no step graph: theta_T hangs directly off phi (memory flat in T)
    phi = phi0.clone().requires_grad_(True)
    w, _ = argmin(inner, phi, torch.zeros(4, dtype=DT), hypergradient="forward",
                  solver=GradientDescent(lr=lr, n_steps=5))
    nodes = [fn for fn, _ in w.grad_fn.next_functions if fn is not None]
    assert [type(fn).__name__ for fn in nodes] == ["AccumulateGrad"]
    assert errors[2] < 1e-6
    assert info_r.inner_grad_norm < 1e-8


@pytest.mark.parametrize(
    "solver",
    [
        Momentum(lr=0.2, momentum=0.8, n_steps=40),
        Momentum(lr=0.2, momentum=0.8, n_steps=40, nesterov=True),
        Adam(lr=0.05, n_steps=40),
    ],
    ids=["momentum", "nesterov", "adam"],
)
def test_ridge_reverse_forward_agree_with_state(solver):
    inner, outer, phi0, _, _ = ridge_problem()
    g_rev, w_rev, _ = hypergrad(inner, outer, phi0, "reverse", solver)
    g_fwd, w_fwd, _ = hypergrad(inner, outer, phi0, "forward", solver)
    assert torch.allclose(w_rev, w_fwd, rtol=0, atol=1e-14)
    assert rel(g_fwd, g_rev) < 1e-10


@pytest.mark.parametrize("method", ["jvp", "dual"])
def test_forward_methods_agree(method):
    inner, outer, phi0, _, _ = ridge_problem()
    solver = Adam(lr=0.05, n_steps=10)
    g_ref, _, _ = hypergrad(inner, outer, phi0, "reverse", solver)
    g, _, info = hypergrad(inner, outer, phi0, UnrolledForward(method=method), solver)
    assert info.extra["method"] == method and info.fallback is None
    assert info.n_hvp == 10 * phi0.numel()
    assert rel(g, g_ref) < 1e-10


def test_forward_unbatched_fallback_is_recorded(monkeypatch):
    inner, outer, phi0, _, lr = ridge_problem()
    solver = Momentum(lr=0.5 * lr, momentum=0.5, n_steps=10)
    g_ref, _, _ = hypergrad(inner, outer, phi0, "forward", solver)
    original = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented for aten::something")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    g, _, info = hypergrad(inner, outer, phi0, "forward", solver)
    assert "one direction at a time" in info.fallback and "Batching rule" in info.fallback
    assert rel(g, g_ref) < 1e-10


def test_forward_works_with_any_step_solver():
    class PlainGD(StepSolver):
        """A user step solver without an ``update`` method."""

        def __init__(self, lr, n_steps):
            super().__init__(n_steps)
            self.lr = lr

        def step(self, fun, theta, state, create_graph=False):
            (g,) = torch.autograd.grad(fun(theta), theta, create_graph=create_graph)
            return theta - self.lr * g, state

    inner, outer, phi0, _, lr = ridge_problem()
    g_ref, _, _ = hypergrad(inner, outer, phi0, "forward", GradientDescent(lr=lr, n_steps=20))

    def init(phi):  # PlainGD needs a theta that requires grad
        return torch.zeros(phi.shape[0], dtype=DT, requires_grad=True)

    g, _, info = hypergrad(inner, outer, phi0, "forward", PlainGD(lr, 20), init=init)
    assert info.fallback is None and info.extra["method"] == "double_vjp"
    assert rel(g, g_ref) < 1e-10
    strategy = UnrolledForward(method="jvp")
    g, _, info = hypergrad(inner, outer, phi0, strategy, PlainGD(lr, 20), init=init)
    assert "not a GradientStepSolver" in info.fallback and info.extra["method"] == "double_vjp"
    assert rel(g, g_ref) < 1e-10
    strategy = UnrolledForward(method="dual")
    g, _, info = hypergrad(inner, outer, phi0, strategy, PlainGD(lr, 20), init=init)
    assert rel(g, g_ref) < 1e-10


def test_forward_jvp_falls_back_when_loss_is_not_vmappable():
    inner, outer, phi0, _, lr = ridge_problem()

    class Square(torch.autograd.Function):
        """An old-style custom function: torch.func transforms refuse it."""

        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    def inner_item(w, phi):
        return inner(w, phi) + 1e-3 * Square.apply(w).sum()

    inner_ref = lambda w, phi: inner(w, phi) + 1e-3 * (w * w).sum()  # noqa: E731

    solver = GradientDescent(lr=lr, n_steps=20)
    g_ref, _, _ = hypergrad(inner_ref, outer, phi0, "reverse", solver)
    g, _, info = hypergrad(inner_item, outer, phi0, UnrolledForward(method="jvp"), solver)
    assert info.fallback is not None and "torch.func" in info.fallback
    assert info.extra["method"] == "double_vjp"
    assert rel(g, g_ref) < 1e-10


def test_unrolled_strategies_reject_non_step_solver():
    class Other:  # an inner solver, but not one made of steps
        def solve(self, fun, theta0, phi=None):
            raise AssertionError("not reached")

    inner, _, phi0, _, _ = ridge_problem()
    for name in ("reverse", "forward", "first_order", "truncated"):
        with pytest.raises(ValueError, match="StepSolver"):
            argmin(inner, phi0, torch.zeros(4, dtype=DT), hypergradient=name, solver=Other())
    with pytest.raises(ValueError, match="GradientDescent"):
        argmin(inner, phi0, torch.zeros(4, dtype=DT), hypergradient="darts", solver=Adam())
    with pytest.raises(ValueError, match="truncate"):
        UnrolledReverse(truncate=-1)
    with pytest.raises(ValueError, match="n_steps"):
        UnrolledForward(n_steps=1.5)


# ----------------------------------------------------------------------------- MLP


def mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 3, generator=g, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    Xv = torch.randn(16, 3, generator=g, dtype=DT)
    yv = torch.sin(Xv.sum(1, keepdim=True))
    params = {
        "W1": 0.5 * torch.randn(3, 8, generator=g, dtype=DT),
        "b1": torch.zeros(8, dtype=DT),
        "W2": 0.5 * torch.randn(8, 1, generator=g, dtype=DT),
        "b2": torch.zeros(1, dtype=DT),
    }

    def net(p, x):
        return torch.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]

    def outer(p):
        return ((net(p, Xv) - yv) ** 2).mean()

    def make_inner(decay):
        def inner(p, phi):
            data = ((net(p, X) - y) ** 2).mean()
            return data + 0.5 * sum(decay(phi, k) * (p[k] ** 2).sum() for k in p)

        return inner

    return params, net, outer, make_inner


def central_fd(fun, phi0, h=1e-5):
    flat = phi0.reshape(-1)
    out = torch.empty_like(flat)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        plus, minus = (flat + e).reshape(phi0.shape), (flat - e).reshape(phi0.shape)
        out[i] = (fun(plus) - fun(minus)) / (2 * h)
    return out.reshape(phi0.shape)


@pytest.mark.parametrize("per_layer", [False, True], ids=["scalar", "per_layer"])
def test_mlp_weight_decay_reverse_forward_fd(per_layer):
    params, _, outer, make_inner = mlp_problem()
    if per_layer:
        keys = list(params)
        inner = make_inner(lambda phi, k: phi[keys.index(k) // 2].exp())
        phi0 = torch.tensor([-2.0, -1.0], dtype=DT)
    else:
        inner = make_inner(lambda phi, k: phi.exp())
        phi0 = torch.tensor(-2.0, dtype=DT)
    solver = GradientDescent(lr=0.2, n_steps=20)

    def value(phi):
        with torch.no_grad():
            theta, _ = solver.solve(lambda p: inner(p, phi), params)
            return float(outer(theta))

    grads = {}
    for name in ("reverse", "forward"):
        phi = phi0.clone().requires_grad_(True)
        theta, _ = argmin(inner, phi, params, hypergradient=name, solver=solver)
        outer(theta).backward()
        grads[name] = phi.grad.clone()
    fd = central_fd(value, phi0)
    assert rel(grads["forward"], grads["reverse"]) < 1e-10
    assert rel(grads["reverse"], fd) < 1e-6


# ----------------------------------------------------------------------------- MAML


def maml_problem(seed=1):
    g = torch.Generator().manual_seed(seed)
    Xs = torch.randn(10, 3, generator=g, dtype=DT)  # support set
    ys = torch.sin(Xs[:, 0])
    Xq = torch.randn(10, 3, generator=g, dtype=DT)  # query set
    yq = torch.sin(Xq[:, 0])
    phi0 = {"w": 0.3 * torch.randn(3, generator=g, dtype=DT), "c": torch.tensor(0.1, dtype=DT)}

    def model(p, x):
        return torch.tanh(x @ p["w"]) + p["c"]

    def inner(p, phi):  # the task loss; phi enters only through init
        return ((model(p, Xs) - ys) ** 2).mean()

    def outer(p):
        return ((model(p, Xq) - yq) ** 2).mean()

    return phi0, inner, outer


def maml_grad(strategy, solver, init_map=None):
    phi0, inner, outer = maml_problem()
    phi = {k: v.clone().requires_grad_(True) for k, v in phi0.items()}
    init = phi if init_map is None else init_map(phi)
    theta, info = argmin(inner, phi, init, hypergradient=strategy, solver=solver)
    outer(theta).backward()
    return torch.cat([phi["w"].grad, phi["c"].grad.reshape(1)]), theta, info


def maml_fd(solver):
    phi0, inner, outer = maml_problem()

    def value(flat):
        with torch.no_grad():
            p = {"w": flat[:3], "c": flat[3]}
            theta, _ = solver.solve(lambda t: inner(t, None), p)
            return float(outer(theta))

    return central_fd(value, torch.cat([phi0["w"], phi0["c"].reshape(1)]))


@pytest.mark.parametrize(
    "solver", [GradientDescent(lr=0.3, n_steps=5), Adam(lr=0.05, n_steps=5)], ids=["gd", "adam"]
)
def test_maml_reverse_forward_fd(solver):
    g_rev, _, _ = maml_grad("reverse", solver)
    g_fwd, _, _ = maml_grad("forward", solver)
    assert rel(g_fwd, g_rev) < 1e-10
    assert rel(g_rev, maml_fd(solver)) < 1e-7


def test_forward_with_nonlinear_init_map():
    solver = Momentum(lr=0.2, momentum=0.5, n_steps=5)

    def init_map(phi):  # init = g(phi), Z_0 = dg/dphi is a full Jacobian
        return {"w": torch.tanh(phi["w"]) * phi["c"], "c": phi["w"].sum() ** 2}

    g_rev, _, _ = maml_grad("reverse", solver, init_map)
    g_fwd, _, _ = maml_grad("forward", solver, init_map)
    assert rel(g_fwd, g_rev) < 1e-10


def test_maml_first_order_is_outer_gradient_at_theta_T():
    solver = GradientDescent(lr=0.3, n_steps=5)
    g_fo, theta, info = maml_grad("first_order", solver)
    _, _, outer = maml_problem()
    # hand computation: FOMAML meta-gradient = grad of F at the adapted theta_T
    p = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    gw, gc = torch.autograd.grad(outer(p), [p["w"], p["c"]])
    assert torch.allclose(g_fo, torch.cat([gw, gc.reshape(1)]), rtol=1e-14, atol=1e-15)
    assert info.n_hvp == 0 and info.inner_iterations == 5
    # and theta_T is the same point the full unrolled loop reaches
    _, theta_rev, _ = maml_grad("reverse", solver)
    assert torch.allclose(theta["w"], theta_rev["w"].detach(), rtol=0, atol=1e-15)


def test_maml_truncation():
    T = 6
    solver = GradientDescent(lr=0.3, n_steps=T)
    g_full, _, _ = maml_grad("reverse", solver)
    g_k_eq_t, _, info = maml_grad(TruncatedReverse(truncate=T), solver)
    assert torch.equal(g_full, g_k_eq_t)
    assert info.extra["truncate"] == T
    g_k2, _, info2 = maml_grad(UnrolledReverse(truncate=2), solver)
    assert info2.extra["truncate"] == 2 and info2.inner_iterations == T
    assert rel(g_k2, g_full) > 1e-3
    # K = 0: only the identity link to init is left, which is first-order MAML
    g_k0, _, _ = maml_grad(TruncatedReverse(truncate=0), solver)
    g_fo, _, _ = maml_grad("first_order", solver)
    assert torch.allclose(g_k0, g_fo, rtol=1e-13, atol=1e-15)


def test_truncated_keeps_only_k_steps_of_graph():
    inner, outer, phi0, _, lr = ridge_problem()
    solver = GradientDescent(lr=lr, n_steps=12)

    def saved_tensors(strategy):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        phi = phi0.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            argmin(inner, phi, torch.zeros(4, dtype=DT), hypergradient=strategy, solver=solver)
        return count[0]

    counts = {k: saved_tensors(TruncatedReverse(truncate=k)) for k in (2, 4, 12)}
    per_step = (counts[4] - counts[2]) / 2
    assert per_step > 0
    assert counts[12] == counts[2] + 10 * per_step  # linear in K, nothing from the cut steps
    assert saved_tensors(UnrolledReverse()) == counts[12]


# ----------------------------------------------------------------------------- learned lr


def test_learned_lr_reverse_forward_fd():
    inner, outer, phi0, _, lr = ridge_problem()
    T = 30

    def run(strategy, lr_value):
        lr_t = torch.tensor(lr_value, dtype=DT, requires_grad=True)
        phi = phi0.clone().requires_grad_(True)
        w, _ = argmin(inner, phi, torch.zeros(4, dtype=DT), hypergradient=strategy,
                      solver=GradientDescent(lr=lr_t, n_steps=T))
        loss = outer(w)
        loss.backward()
        return lr_t.grad.item(), phi.grad.clone(), loss.item()

    lr0 = 0.5 * lr
    g_rev, phig_rev, _ = run("reverse", lr0)
    g_fwd, phig_fwd, _ = run("forward", lr0)
    h = 1e-6
    fd = (run("reverse", lr0 + h)[2] - run("reverse", lr0 - h)[2]) / (2 * h)
    assert abs(g_fwd - g_rev) <= 1e-10 * abs(g_rev)
    assert abs(g_rev - fd) <= 1e-6 * abs(fd)
    assert rel(phig_fwd, phig_rev) < 1e-10


def test_per_parameter_lr_tree_meta_sgd():
    params, _, outer, make_inner = mlp_problem()
    inner = make_inner(lambda phi, k: 0.01)
    lrs0 = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    T = 8

    def run(strategy, lrs):
        lrs = {k: v.clone().requires_grad_(True) for k, v in lrs.items()}
        theta, _ = argmin(inner, {}, params, hypergradient=strategy,
                          solver=GradientDescent(lr=lrs, n_steps=T))
        loss = outer(theta)
        loss.backward()
        return torch.cat([lrs[k].grad.reshape(-1) for k in lrs]), loss.item()

    g_rev, _ = run("reverse", lrs0)
    g_fwd, _ = run("forward", lrs0)
    assert rel(g_fwd, g_rev) < 1e-10
    # finite differences along a few coordinates of b2 and W1
    h = 1e-6
    flat_index = {"W1": 5, "b2": 0}
    offsets = {"W1": 0, "b1": 24, "W2": 32, "b2": 40}
    for key, i in flat_index.items():
        plus = {k: v.clone() for k, v in lrs0.items()}
        minus = {k: v.clone() for k, v in lrs0.items()}
        plus[key].view(-1)[i] += h
        minus[key].view(-1)[i] -= h
        fd = (run("first_order", plus)[1] - run("first_order", minus)[1]) / (2 * h)
        assert abs(g_rev[offsets[key] + i] - fd) <= 1e-6 * abs(fd) + 1e-12


# ----------------------------------------------------------------------------- DARTS / look-ahead


def test_darts_matches_exact_one_step_hypergradient():
    inner, outer, phi0, _, lr = ridge_problem()
    xi = 0.5 * lr
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, generator=g, dtype=DT)  # current weights, not zero

    def outer_direct(w, phi):  # an outer loss with a direct phi term too
        return outer(w) + 0.1 * (phi**2).sum()

    def run(strategy):
        phi = phi0.clone().requires_grad_(True)
        w, info = argmin(inner, phi, w0, hypergradient=strategy, solver=GradientDescent(lr=xi))
        outer_direct(w, phi).backward()
        return phi.grad.clone(), w.detach(), info

    g_darts, w1, info = run("darts")
    g_look, w1_look, _ = run("lookahead")
    # hand computation of the exact one-step unrolled hypergradient:
    # w' = w0 - xi * (grad_data(w0) + e^phi * w0), and since d^2 f/(dphi dw) = diag(e^phi w0),
    # dF/dphi = 0.2 phi - xi * e^phi * w0 * grad F(w')
    w0r = w0.clone().requires_grad_(True)
    (g_inner,) = torch.autograd.grad(inner(w0r, phi0), w0r)
    w1_hand = w0 - xi * g_inner
    wq = w1_hand.clone().requires_grad_(True)
    (gF,) = torch.autograd.grad(outer(wq), wq)
    hand = 0.2 * phi0 - xi * phi0.exp() * w0 * gF
    assert torch.allclose(w1, w1_hand, rtol=0, atol=1e-15)
    assert torch.allclose(w1_look, w1_hand, rtol=0, atol=1e-15)
    assert rel(g_look, hand) < 1e-12
    # grad_phi f is quadratic in w here, so the central difference is exact up to rounding
    assert rel(g_darts, hand) < 1e-4
    assert info.n_hvp == 0 and info.inner_iterations == 1
    assert info.extra["fd_epsilon"] > 0 and info.n_grad >= 4


def test_darts_finite_difference_on_non_quadratic_problem():
    params, _, outer, make_inner = mlp_problem()
    inner = make_inner(lambda phi, k: phi.exp())
    phi0 = torch.tensor(-1.0, dtype=DT)

    def run(strategy):
        phi = phi0.clone().requires_grad_(True)
        theta, _ = argmin(inner, phi, params, hypergradient=strategy,
                          solver=GradientDescent(lr=0.2))
        outer(theta).backward()
        return phi.grad.clone()

    g_look, g_darts = run("lookahead"), run(FiniteDifferenceDARTS(epsilon=1e-3))
    assert rel(g_darts, g_look) < 1e-4


def test_lookahead_is_one_step_reverse_for_sample_weights():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=DT)
    y = torch.randn(12, generator=g, dtype=DT)
    Xv, yv = X[:4], y[:4]
    theta = torch.randn(3, generator=g, dtype=DT)
    lr = 0.1

    def inner(w, eps):
        return (eps * (X @ w - y) ** 2).mean()

    weights = torch.full((12,), 0.5, dtype=DT, requires_grad=True)
    w, info = argmin(inner, weights, theta, hypergradient="lookahead",
                     solver=GradientDescent(lr=lr, n_steps=50))
    assert info.inner_iterations == 1  # n_steps of the solver is overridden
    ((Xv @ w - yv) ** 2).mean().backward()
    # Ren et al. 2018: d/d eps_i = -lr * <grad l_i(theta), grad F(theta')> (per-sample
    # gradient of the mean-weighted loss)
    wq = w.detach().requires_grad_(True)
    (gF,) = torch.autograd.grad(((Xv @ wq - yv) ** 2).mean(), wq)
    per_sample = 2 * (X @ theta - y)[:, None] * X / 12
    assert torch.allclose(weights.grad, -lr * per_sample @ gF, rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["reverse", "forward", "first_order", "darts"])
def test_cuda_float32(strategy):
    inner, outer, phi0, _, lr = ridge_problem()
    X = torch.randn(20, 4, device="cuda")
    y = torch.randn(20, device="cuda")
    phi = torch.zeros(4, device="cuda", requires_grad=True)
    w, info = argmin(lambda w, p: ((X @ w - y) ** 2).mean() + (p.exp() * w**2).sum(), phi,
                     torch.zeros(4, device="cuda"), hypergradient=strategy,
                     solver=GradientDescent(lr=0.1, n_steps=5))
    (w**2).sum().backward()
    assert phi.grad.device.type == "cuda" and phi.grad.dtype == torch.float32
    assert torch.isfinite(phi.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda c: UnrolledReverse(check_inner=c),
        lambda c: TruncatedReverse(truncate=5, check_inner=c),
        lambda c: OneStepLookahead(check_inner=c),
        lambda c: UnrolledForward(check_inner=c),
        lambda c: FirstOrder(check_inner=c),
        lambda c: FiniteDifferenceDARTS(check_inner=c),
    ],
    ids=["reverse", "truncated", "lookahead", "forward", "first_order", "darts"],
)
def test_check_inner_false_skips_only_the_health_gradient(make):
    inner, outer, phi0, _, lr = ridge_problem()
    solver = GradientDescent(lr=lr, n_steps=20)
    g_on, w_on, info_on = hypergrad(inner, outer, phi0, make(True), solver)
    g_off, w_off, info_off = hypergrad(inner, outer, phi0, make(False), solver)
    torch.testing.assert_close(g_off, g_on, rtol=0, atol=0)
    torch.testing.assert_close(w_off, w_on, rtol=0, atol=0)
    assert info_on.inner_grad_norm is not None and info_on.inner_grad_norm > 0
    assert info_off.inner_grad_norm is None
    assert info_off.n_grad == info_on.n_grad - 1
    assert info_off.inner_iterations == info_on.inner_iterations


def test_check_inner_must_be_bool():
    for cls in (UnrolledReverse, UnrolledForward, FirstOrder, FiniteDifferenceDARTS):
        with pytest.raises(ValueError, match="check_inner"):
            cls(check_inner="no")
    assert get_strategy("reverse", check_inner=False).check_inner is False


@pytest.mark.parametrize("name", ["reverse", "truncated", "forward", "first_order"])
def test_finite_but_diverging_steps_warn_with_numbers(name):
    # lr twice the stability limit: finite iterates whose gradient norm reached
    # ~1e9 and a hypergradient of ~1e17, with no warning and inner_converged False
    inner, outer, phi0, exact, lr = ridge_problem()
    solver = GradientDescent(lr=2.2 * lr, n_steps=60)
    with pytest.warns(InnerSolveWarning, match="diverging inner steps: over 60 steps of "
                      "GradientDescent, the inner objective rose from .* Lower the solver's lr"):
        _, w, info = hypergrad(inner, outer, phi0, name, solver)
    assert bool(torch.isfinite(w).all())
    assert info.inner_converged is False and info.extra["diverged"] is True
    # a stable run: no warning, no flag
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, _, info = hypergrad(inner, outer, phi0, name, GradientDescent(lr=lr, n_steps=60))
    assert "diverged" not in info.extra
