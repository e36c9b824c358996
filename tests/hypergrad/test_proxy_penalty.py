"""Proxy (BestResponse, EvoGrad) and penalty (BOME) strategies on ridge.

Ridge has one log-penalty per feature.

The exact hypergradient is known in closed form: with
``A = X^T X / n + diag(e^phi)`` and ``w* = A^{-1} X^T y / n``,
``dF/dphi = -e^phi * w* * (A^{-1} grad_w F)``. These strategies are
approximations, so the checks are a cosine similarity >= 0.9 with the exact
hypergradient, and an outer loop that reaches the exact optimum's outer loss
within 1%.
"""

import warnings

import pytest
import torch

from skbilevel.hypergrad import (
    BOME,
    BestResponse,
    ClosedFormSolver,
    EvoGrad,
    HypergradientWarning,
    InnerSolveWarning,
    StepSolver,
    argmin,
    get_strategy,
    minimize_outer,
)

DT = torch.float64
N_TRAIN, N_FEAT, N_VAL = 60, 5, 40
PHI_BOX = (-6.0, 6.0)


def _make_problem():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(N_TRAIN, N_FEAT, dtype=DT, generator=gen)
    w_true = torch.tensor([2.0, 1.0, 0.5, 0.0, 0.0], dtype=DT)
    y = X @ w_true + torch.randn(N_TRAIN, dtype=DT, generator=gen)
    Xv = torch.randn(N_VAL, N_FEAT, dtype=DT, generator=gen)
    yv = Xv @ w_true + torch.randn(N_VAL, dtype=DT, generator=gen)
    return X, y, Xv, yv


X, Y, XV, YV = _make_problem()


def inner_loss(w, phi):
    return 0.5 * ((X @ w - Y) ** 2).mean() + 0.5 * (phi.exp() * w**2).sum()


def outer_loss(w):
    return 0.5 * ((XV @ w - YV) ** 2).mean()


def solve_ridge(phi):
    A = X.T @ X / N_TRAIN + torch.diag(phi.exp())
    return torch.linalg.solve(A, X.T @ Y / N_TRAIN)


def exact_hypergradient(phi):
    phi = phi.detach()
    A = X.T @ X / N_TRAIN + torch.diag(phi.exp())
    w = torch.linalg.solve(A, X.T @ Y / N_TRAIN)
    grad_w = XV.T @ (XV @ w - YV) / N_VAL
    return -phi.exp() * w * torch.linalg.solve(A, grad_w)


class Ridge(ClosedFormSolver):
    """Exact inner solver (used without a graph by the proxy strategies)."""

    def closed_form(self, phi):
        return solve_ridge(phi)


class GradientSteps(StepSolver):
    """Plain gradient descent steps (BOME's T-step ``theta_hat_T``)."""

    def __init__(self, n_steps=10, lr=0.5):
        super().__init__(n_steps)
        self.lr = lr

    def step(self, fun, theta, state, create_graph=False):
        (g,) = torch.autograd.grad(fun(theta), theta, create_graph=create_graph)
        return theta - self.lr * g, state


def _argmin(phi, strategy, solver=None, init=None):
    init = torch.zeros(N_FEAT, dtype=DT) if init is None else init
    return argmin(inner_loss, phi, init, hypergradient=strategy, solver=solver)


def _evograd(n_samples, sigma=0.1, temperature=0.01, random_state=0):
    return EvoGrad(n_samples=n_samples, sigma=sigma, temperature=temperature,
                   random_state=random_state)


def _cosine(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _clamp(leaves):
    for leaf in leaves:
        leaf.clamp_(*PHI_BOX)


def test_exact_hypergradient_formula_matches_autograd():
    phi = torch.linspace(-2, 1, N_FEAT, dtype=DT).requires_grad_()
    outer_loss(solve_ridge(phi)).backward()
    torch.testing.assert_close(phi.grad, exact_hypergradient(phi), rtol=1e-10, atol=0)


PHI_TEST = torch.full((N_FEAT,), -2.0, dtype=DT)


@pytest.mark.parametrize(
    "strategy, solver",
    [
        (BestResponse(random_state=0), Ridge()),
        (EvoGrad(n_samples=256, sigma=0.1, temperature=0.01, random_state=0), Ridge()),
    ],
    ids=["best_response", "evograd"],
)
def test_proxy_cosine_with_exact(strategy, solver):
    phi = PHI_TEST.clone().requires_grad_()
    w, info = _argmin(phi, strategy, solver)
    outer_loss(w).backward()
    assert _cosine(phi.grad, exact_hypergradient(phi)) >= 0.9
    # health record
    assert info.strategy == strategy.name
    assert info.inner_grad_norm is not None and info.inner_grad_norm < 1e-10
    assert info.inner_converged is True
    assert info.n_grad > 0 and info.n_hvp == 0
    assert strategy.family == "proxy"


def test_best_response_is_near_exact_with_full_rank_fit():
    """n_samples = phi.numel() with central differences: O(sigma^2) from exact."""
    phi = PHI_TEST.clone().requires_grad_()
    strategy = BestResponse(n_samples=N_FEAT, sigma=0.01, random_state=0)
    w, info = _argmin(phi, strategy, Ridge())
    w_star = solve_ridge(PHI_TEST)
    torch.testing.assert_close(w.detach(), w_star, rtol=1e-12, atol=1e-12)
    outer_loss(w).backward()
    exact = exact_hypergradient(phi)
    assert float((phi.grad - exact).norm() / exact.norm()) < 1e-5
    assert info.extra["fit_residual"] < 1e-10  # interpolating fit
    assert info.extra["n_solves"] == 1 + 2 * N_FEAT
    assert 0 < info.extra["nonlinearity"] < 0.1


def test_best_response_overdetermined_fit_reports_residual_and_refits():
    phi = PHI_TEST.clone().requires_grad_()
    strategy = BestResponse(
        n_samples=3 * N_FEAT, sigma=0.5, antithetic=False, refit_every=2, random_state=0
    )
    w, info = _argmin(phi, strategy, Ridge())
    # a linear model cannot fit 15 solutions at sigma=0.5 exactly
    assert info.extra["refit"] and info.extra["fit_residual"] > 1e-6
    assert info.extra["nonlinearity"] is None
    w, info2 = _argmin(phi, strategy, Ridge(), w.detach())
    assert not info2.extra["refit"] and "n_solves" not in info2.extra
    outer_loss(w).backward()
    assert _cosine(phi.grad, exact_hypergradient(phi)) >= 0.9


def test_best_response_tree_phi_and_theta():
    """Dicts of tensors for phi and theta go through the flat fit unchanged."""
    phi = {
        "a": PHI_TEST[:2].clone().requires_grad_(),
        "b": PHI_TEST[2:].clone().requires_grad_(),
    }

    def inner(theta, p):
        w = torch.cat([theta["u"], theta["v"]])
        return inner_loss(w, torch.cat([p["a"], p["b"]]))

    class TreeRidge(ClosedFormSolver):
        def closed_form(self, p):
            w = solve_ridge(torch.cat([p["a"], p["b"]]))
            return {"u": w[:3], "v": w[3:]}

    init = {"u": torch.zeros(3, dtype=DT), "v": torch.zeros(2, dtype=DT)}
    theta, info = argmin(
        inner, phi, init, hypergradient=BestResponse(random_state=0), solver=TreeRidge()
    )
    outer_loss(torch.cat([theta["u"], theta["v"]])).backward()
    grad = torch.cat([phi["a"].grad, phi["b"].grad])
    assert _cosine(grad, exact_hypergradient(PHI_TEST)) > 0.999


def test_evograd_reports_effective_sample_size_and_warns_on_collapse():
    phi = PHI_TEST.clone().requires_grad_()
    w, info = argmin(
        inner_loss, phi, torch.zeros(N_FEAT, dtype=DT),
        hypergradient=_evograd(64),
        solver=Ridge(),
    )
    assert 1 < info.extra["effective_sample_size"] <= 64
    assert info.extra["n_samples"] == 64
    with pytest.warns(HypergradientWarning, match="effective sample size"):
        argmin(
            inner_loss, phi, torch.zeros(N_FEAT, dtype=DT),
            hypergradient=_evograd(16, sigma=3.0, temperature=1e-4),
            solver=Ridge(),
        )


def test_evograd_is_deterministic_with_seed():
    grads = []
    for _ in range(2):
        phi = PHI_TEST.clone().requires_grad_()
        strategy = EvoGrad(n_samples=32, sigma=0.1, temperature=0.01, random_state=3)
        w, _ = _argmin(phi, strategy, Ridge())
        outer_loss(w).backward()
        grads.append(phi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "solver", [Ridge(), GradientSteps(n_steps=10, lr=0.5)], ids=["exact", "gd10"]
)
def test_bome_direction_aligns_with_exact_once_theta_settles(solver):
    """At fixed phi BOME's iterate settles; lambda grad_phi q lines up with dF/dphi."""
    bome = BOME(step_size=0.2)
    phi = PHI_TEST.clone().requires_grad_()
    first = None
    for _ in range(60):
        phi.grad = None
        w, info = _argmin(phi, bome, solver)
        outer_loss(w).backward()
        first = info if first is None else first
    assert first.extra["lambda"] == 0.0  # from theta = 0, far from the inner optimum
    assert _cosine(phi.grad, exact_hypergradient(phi)) >= 0.9
    assert info.extra["lambda"] > 0 and info.extra["q"] >= 0
    assert info.inner_grad_norm is not None and info.n_grad > 0 and info.n_hvp == 0
    assert bome.family == "penalty"
    # the iterate lives on the strategy; a reset starts again from init
    assert bome.theta_ is not None
    bome.reset()
    assert bome.theta_ is None


def test_bome_step_and_lambda_follow_the_formula():
    """One call: phi.grad = lambda grad_phi q; theta -= xi (g + lambda grad_theta q)."""
    bome = BOME(eta=0.5, step_size=0.1)
    solver = Ridge()
    phi = PHI_TEST.clone().requires_grad_()
    w_star = solve_ridge(PHI_TEST)
    g_star = XV.T @ (XV @ w_star - YV) / N_VAL
    # off the inner optimum, downhill in F
    theta0 = w_star - 0.05 * g_star / g_star.norm()
    w, info = argmin(inner_loss, phi, theta0, hypergradient=bome, solver=solver)
    torch.testing.assert_close(w.detach(), theta0)
    outer_loss(w).backward()
    # reference computed by hand
    th = theta0.clone().requires_grad_()
    ph = PHI_TEST.clone().requires_grad_()
    q = inner_loss(th, ph) - inner_loss(solve_ridge(PHI_TEST), ph)
    gq_t, gq_p = torch.autograd.grad(q, (th, ph))
    (g,) = torch.autograd.grad(outer_loss(th), th)
    sq = (gq_t**2).sum() + (gq_p**2).sum()
    lam = max(float((0.5 * sq - g @ gq_t) / sq), 0.0)
    assert lam > 0
    torch.testing.assert_close(info.extra["lambda"], lam)
    torch.testing.assert_close(phi.grad, lam * gq_p)
    torch.testing.assert_close(bome.theta_, theta0 - 0.1 * (g + lam * gq_t))


# --------------------------------------------------------------------------- outer loop
@pytest.fixture(scope="module")
def exact_optimum():
    phi = torch.zeros(N_FEAT, dtype=DT, requires_grad=True)
    res = minimize_outer(
        lambda p: outer_loss(solve_ridge(p)), phi, learning_rate=0.1, max_iter=400,
        tol=1e-12, n_iter_no_change=50, projection=_clamp,
    )
    return float(outer_loss(solve_ridge(phi.detach()))), res


def _run(strategy, solver, restore_best=True, max_iter=150):
    phi = torch.zeros(N_FEAT, dtype=DT, requires_grad=True)
    warm = {"w": torch.zeros(N_FEAT, dtype=DT)}

    def objective(p):
        w, info = argmin(
            inner_loss, p, warm["w"], hypergradient=strategy, solver=solver
        )
        warm["w"] = w.detach()
        return outer_loss(w), info

    # no early stopping: BOME's first directions are exactly zero (lambda = 0
    # until its theta iterate leaves the inner optimum), which the driver would
    # otherwise take for convergence
    res = minimize_outer(
        objective, phi, learning_rate=0.1, max_iter=max_iter, early_stopping=False,
        projection=_clamp, restore_best=restore_best,
    )
    return float(outer_loss(solve_ridge(phi.detach()))), res


@pytest.mark.parametrize(
    "make",
    [
        lambda: (BestResponse(random_state=0), Ridge(), True),
        lambda: (_evograd(128), Ridge(), True),
        # exact value function q = f - min f (BOME with an exact inner solver): plain
        # gradient steps with a fixed step diverge where phi makes f stiff (e^phi ~ 30)
        lambda: (BOME(step_size=0.2), Ridge(), False),
    ],
    ids=["best_response", "evograd", "bome"],
)
def test_outer_loop_reaches_exact_optimum(make, exact_optimum):
    best, _ = exact_optimum
    start = float(outer_loss(solve_ridge(torch.zeros(N_FEAT, dtype=DT))))
    assert start > 1.05 * best  # the test is not trivial
    strategy, solver, restore_best = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        reached, res = _run(strategy, solver, restore_best=restore_best)
    assert reached <= 1.01 * best, (reached, best)
    assert res.info is not None and res.info.strategy == strategy.name


def test_registered_names_and_bad_parameters():
    assert isinstance(get_strategy("best_response"), BestResponse)
    assert isinstance(get_strategy("evograd"), EvoGrad)
    assert isinstance(get_strategy("bome"), BOME)
    phi = PHI_TEST.clone().requires_grad_()
    init = torch.zeros(N_FEAT, dtype=DT)
    with pytest.raises(ValueError, match="sigma"):
        argmin(inner_loss, phi, init, hypergradient=EvoGrad(sigma=-1.0), solver=Ridge())
    with pytest.raises(ValueError, match="n_samples"):
        _argmin(phi, BestResponse(n_samples=0), Ridge())
    with pytest.raises(ValueError, match="eta"):
        argmin(inner_loss, phi, init, hypergradient=BOME(eta=0.0), solver=Ridge())


def test_float32_and_finite():
    """Works in float32 too (device/dtype follow the inputs)."""
    phi = PHI_TEST.float().requires_grad_()

    def inner32(w, p):
        return inner_loss(w.double(), p.double()).float()

    class Ridge32(ClosedFormSolver):
        def closed_form(self, p):
            return solve_ridge(p.double()).float()

    for strategy in (BestResponse(random_state=0), _evograd(64)):
        phi.grad = None
        w, _ = argmin(
            inner32, phi, torch.zeros(N_FEAT), hypergradient=strategy, solver=Ridge32()
        )
        assert w.dtype == torch.float32
        outer_loss(w.double()).backward()
        assert phi.grad.dtype == torch.float32 and torch.isfinite(phi.grad).all()
        assert _cosine(phi.grad.double(), exact_hypergradient(PHI_TEST)) > 0.8


def test_default_solvers():
    """Proxies default to LBFGS (solved to tolerance); BOME to 10 gradient steps."""
    for strategy in (BestResponse(random_state=0), _evograd(256)):
        phi = PHI_TEST.clone().requires_grad_()
        w, info = _argmin(phi, strategy)
        outer_loss(w).backward()
        assert _cosine(phi.grad, exact_hypergradient(phi)) >= 0.9
        assert info.inner_converged and info.n_grad > info.inner_iterations
    bome = BOME(step_size=0.2)
    assert type(bome.default_solver()).__name__ == "GradientDescent"
    phi = PHI_TEST.clone().requires_grad_()
    for _ in range(60):
        phi.grad = None
        w, info = _argmin(phi, bome)
        outer_loss(w).backward()
    # 10 steps + the solver's final gradient norm + the two gradients of q
    assert info.inner_iterations == 10 and info.n_grad == 10 + 1 + 2
    # 10 steps of lr 0.1 leave theta_hat_T short of the inner optimum: a rougher q
    assert _cosine(phi.grad, exact_hypergradient(phi)) >= 0.8


# ------------------------------------------------------- EvoGrad's default temperature
def _evograd_cosines(make, seeds=range(10)):
    cosines = []
    for seed in seeds:
        phi = PHI_TEST.clone().requires_grad_()
        w, _ = _argmin(phi, make(seed), Ridge())
        outer_loss(w).backward()
        cosines.append(_cosine(phi.grad, exact_hypergradient(phi)))
    return cosines


def test_evograd_default_beats_the_old_fixed_temperature():
    """Defaults, 32 samples: mean cosine 0.82 before (temperature=0.01, i.i.d.).

    Now 0.93 (adaptive temperature, orthogonal draws).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", HypergradientWarning)
        new = _evograd_cosines(lambda s: EvoGrad(random_state=s))
    old = _evograd_cosines(
        lambda s: EvoGrad(temperature=0.01, orthogonal=False, random_state=s)
    )
    assert sum(new) / len(new) >= 0.9 and min(new) >= 0.85, new
    assert sum(new) / len(new) >= sum(old) / len(old) + 0.08, (new, old)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_evograd_default_temperature_follows_the_loss_scale(scale):
    """Scaling f scales the temperature: same weights and hypergradient, no collapse."""

    def scaled(w, p):
        return scale * inner_loss(w, p)

    grads, infos = [], []
    for loss in (inner_loss, scaled):
        phi = PHI_TEST.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error", HypergradientWarning)
            w, info = argmin(
                loss, phi, torch.zeros(N_FEAT, dtype=DT),
                hypergradient=EvoGrad(random_state=0), solver=Ridge(),
            )
        outer_loss(w).backward()
        grads.append(phi.grad)
        infos.append(info)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=0)
    t0, t1 = infos[0].extra["temperature"], infos[1].extra["temperature"]
    assert t0 == infos[0].extra["loss_std"]  # temperature_scale=1
    torch.testing.assert_close(t1 / t0, scale, rtol=1e-6, atol=0)
    ess = infos[1].extra["effective_sample_size"]
    torch.testing.assert_close(ess, infos[0].extra["effective_sample_size"])
    assert 32 / 4 < ess < 32


def test_evograd_fixed_temperature_collapses_where_the_default_does_not():
    """The old default (temperature=0.01) on a sum-reduced, 1e4-times larger loss."""

    def big(w, p):
        return 1e4 * inner_loss(w, p)

    phi = PHI_TEST.clone().requires_grad_()
    with pytest.warns(HypergradientWarning, match="raise temperature or lower sigma"):
        _, info = argmin(
            big, phi, torch.zeros(N_FEAT, dtype=DT),
            hypergradient=EvoGrad(temperature=0.01, random_state=0), solver=Ridge(),
        )
    assert info.extra["temperature"] == 0.01
    assert info.extra["effective_sample_size"] < 3


def test_evograd_warns_on_collapse_and_on_rounding_with_adaptive_temperature():
    phi = PHI_TEST.clone().requires_grad_()
    init = torch.zeros(N_FEAT, dtype=DT)
    sharp = EvoGrad(temperature_scale=0.05, random_state=0)
    with pytest.warns(HypergradientWarning, match="raise temperature_scale"):
        _, info = argmin(inner_loss, phi, init, hypergradient=sharp, solver=Ridge())
    assert info.extra["effective_sample_size"] < 3
    tiny = EvoGrad(sigma=1e-12, random_state=0)
    with pytest.warns(HypergradientWarning, match="differ only by rounding"):
        argmin(inner_loss, phi, init, hypergradient=tiny, solver=Ridge())
    for bad in (EvoGrad(temperature_scale=0.0), EvoGrad(temperature=-1.0)):
        with pytest.raises(ValueError, match="temperature"):
            argmin(inner_loss, phi, init, hypergradient=bad, solver=Ridge())


def test_evograd_orthogonal_draws():
    """Rows orthogonal in blocks of dim(theta), Gaussian lengths, tree layout kept."""
    strategy = EvoGrad(random_state=0)
    leaves = [torch.zeros(2, 2, dtype=DT), torch.zeros(3, dtype=DT)]  # dim 7
    eps = strategy._orthogonal_draws(10, leaves)
    assert [tuple(e.shape) for e in eps] == [(10, 2, 2), (10, 3)]
    flat = torch.cat([e.reshape(10, -1) for e in eps], dim=1)
    for block in (flat[:7], flat[7:]):
        gram = block @ block.T
        off = gram - torch.diag(torch.diagonal(gram))
        assert float(off.abs().max()) < 1e-10 * float(gram.abs().max())
    norms = flat.norm(dim=1)
    assert float(norms.std()) > 0  # chi-distributed, not fixed
    again = EvoGrad(random_state=0)._orthogonal_draws(10, leaves)
    for a, b in zip(eps, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bome_warns_when_its_inner_solver_goes_uphill():
    # steps far too long for the curvature (~1.5): theta_hat's objective grew to
    # ~1e30, q was hugely negative and the direction ~1e30, with no warning
    phi = torch.zeros(N_FEAT, dtype=DT, requires_grad=True)
    with pytest.warns(InnerSolveWarning, match="raised the inner objective from .* "
                      "value-function gap q = -.* Lower the solver's lr"):
        w, info = _argmin(phi, BOME(), solver=GradientSteps(n_steps=10, lr=5.0))
    assert info.inner_converged is False and info.extra["q"] < 0
    # a stable solver: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _argmin(phi, BOME(), solver=GradientSteps(n_steps=10, lr=0.5))


def test_evograd_rejects_a_single_antithetic_pair():
    # n_samples=1 or 2 with antithetic=True: hypergradients of -3e8 to -6e10 (the
    # exact one is of order 1), no warning
    phi = torch.zeros(N_FEAT, dtype=DT, requires_grad=True)
    for n in (1, 2):
        with pytest.raises(ValueError, match="single antithetic pair.*n_samples >= 3"):
            _argmin(phi, EvoGrad(n_samples=n, random_state=0))
    _argmin(phi, EvoGrad(n_samples=2, antithetic=False, random_state=0))
    _argmin(phi, EvoGrad(n_samples=3, random_state=0))


def test_proxy_settings_must_be_finite_and_refit_every_an_integer():
    phi = torch.zeros(N_FEAT, dtype=DT, requires_grad=True)
    # sigma=inf passed the positivity check; refit_every=0 / 1.5 were read as 1
    for strategy, match in (
        (EvoGrad(sigma=float("inf")), "sigma must be a positive finite number"),
        (BestResponse(sigma=float("inf")), "sigma must be a positive finite number"),
        (BestResponse(refit_every=0), "refit_every must be a positive integer"),
        (BestResponse(refit_every=1.5), "refit_every must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=match):
            _argmin(phi, strategy)
