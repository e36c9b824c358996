import math

import pytest
import torch

from skbilevel.hypergrad import DivergenceWarning, minimize_newton, minimize_outer


def _quadratic(target):
    return lambda p: ((p - target) ** 2).sum()


def test_converges_on_quadratic_and_records_history():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    res = minimize_outer(_quadratic(target), x, optimizer="sgd", learning_rate=0.25,
                         max_iter=500, tol=1e-9)
    torch.testing.assert_close(x.detach(), target, atol=1e-8, rtol=0)
    assert res.converged and res.stop_reason == "tol"
    assert len(res.history) == res.n_iter
    assert res.history[0] > res.history[-1]


def test_tree_phi_and_info_passthrough():
    from skbilevel.hypergrad import HypergradientInfo

    phi = {"a": torch.ones(2, requires_grad=True), "b": torch.ones((), requires_grad=True)}

    def obj(p):
        return (p["a"] ** 2).sum() + p["b"] ** 2, HypergradientInfo(strategy="test")

    res = minimize_outer(obj, phi, learning_rate=0.1, max_iter=5)
    assert res.info.strategy == "test"
    assert res.n_iter == 5 and res.stop_reason == "max_iter"


def test_divergence_warns_and_keeps_last_finite_state():
    x = torch.tensor([1.0], requires_grad=True)
    calls = {"n": 0}

    def obj(p):
        calls["n"] += 1
        return (p ** 2).sum() * (float("nan") if calls["n"] == 3 else 1.0)

    with pytest.warns(DivergenceWarning, match="not finite"):
        res = minimize_outer(obj, x, optimizer="sgd", learning_rate=0.1, max_iter=10,
                             restore_best=False)
    assert res.stop_reason == "diverged" and res.n_iter == 2
    assert torch.isfinite(x).all()
    # the last iterate whose loss was finite: 1.0 -> 0.8 (the step to 0.64 gave NaN)
    assert math.isclose(float(x.detach()), 0.8, rel_tol=1e-6)


def test_callback_stops_and_projection_applies():
    x = torch.tensor([5.0], requires_grad=True)
    seen = []

    def cb(state):
        seen.append(state.iteration)
        return state.iteration == 3

    def clamp(leaves):
        leaves[0].clamp_(min=4.0)

    res = minimize_outer(_quadratic(torch.tensor([0.0])), x, optimizer="sgd",
                         learning_rate=0.4, max_iter=50, callbacks=[cb], projection=clamp,
                         restore_best=False)
    assert seen == [1, 2, 3] and res.stop_reason == "callback"
    assert float(x.detach()) == 4.0


def test_bad_arguments():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="require grad"):
        minimize_outer(lambda p: p.sum(), x)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        minimize_outer(lambda p: p.sum(), x.requires_grad_(), optimizer="nope")


def test_verbose_progress_bar_runs(capsys):
    x = torch.zeros(1, requires_grad=True)
    minimize_outer(_quadratic(torch.ones(1)), x, max_iter=3, verbose=1)


def test_early_stopping_false_runs_max_iter_and_keeps_last_iterate():
    # Loss and gradient are exactly zero from the start: both criteria would stop at once.
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_quadratic(torch.tensor([1.0], dtype=torch.float64)), x,
                         max_iter=7, tol=1e-3, early_stopping=False)
    assert res.n_iter == 7 and len(res.history) == 7
    assert res.stop_reason == "max_iter" and not res.converged


@pytest.mark.parametrize("restore_best, expected", [(None, 9.0), (False, 9.0), (True, 0.0)])
def test_early_stopping_false_restores_best_only_when_asked(restore_best, expected):
    # A step too long: 0 -> 3 -> -3 -> 9, losses 1, 4, 16; the best iterate is the first.
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_quadratic(torch.tensor([1.0], dtype=torch.float64)), x,
                         optimizer="sgd", learning_rate=1.5, max_iter=3,
                         early_stopping=False, restore_best=restore_best)
    assert res.history == [1.0, 4.0, 16.0] and res.best_loss == 1.0
    assert float(x.detach()) == expected


def test_early_stopping_false_still_stops_on_callback_and_divergence():
    x = torch.tensor([5.0], requires_grad=True)
    res = minimize_outer(_quadratic(torch.tensor([0.0])), x, max_iter=50,
                         early_stopping=False, callbacks=[lambda s: s.iteration == 4])
    assert res.n_iter == 4 and res.stop_reason == "callback"
    calls = {"n": 0}

    def obj(p):
        calls["n"] += 1
        return (p ** 2).sum() * (float("inf") if calls["n"] == 3 else 1.0)

    with pytest.warns(DivergenceWarning):
        res = minimize_outer(obj, x, max_iter=50, early_stopping=False)
    assert res.stop_reason == "diverged" and res.n_iter == 2


def test_grad_tol_separates_gradient_and_stall_criteria():
    target = torch.tensor([1.0], dtype=torch.float64)
    # grad_tol=None: tol serves both criteria (as before grad_tol existed)
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_quadratic(target), x, optimizer="sgd", learning_rate=0.25,
                         max_iter=500, tol=1e-3, n_iter_no_change=500)
    assert res.stop_reason == "tol" and res.grad_norms[-1] <= 1e-3
    n_shared = res.n_iter
    # a tighter gradient threshold: the same loss tolerance, more iterations
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_quadratic(target), x, optimizer="sgd", learning_rate=0.25,
                         max_iter=500, tol=1e-3, grad_tol=1e-9, n_iter_no_change=500)
    assert res.stop_reason == "tol" and res.grad_norms[-1] <= 1e-9
    assert res.n_iter > n_shared
    # grad_tol=0: only the stall criterion (relative tol) stops the loop, here on
    # a loss that levels off at 1 while its gradient is still far from 1e-3
    x = torch.tensor([0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(lambda p: _quadratic(target)(p) + 1.0, x, optimizer="sgd",
                         learning_rate=0.25, max_iter=500, tol=1e-3, grad_tol=0.0,
                         n_iter_no_change=3)
    assert res.stop_reason == "tol" and res.grad_norms[-1] > 1e-3
    assert res.history[-1] >= min(res.history[:-3]) * (1 - 1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"early_stopping": "yes"}, "early_stopping must be True or False"),
        ({"early_stopping": None}, "early_stopping must be True or False"),
        ({"grad_tol": -1e-3}, "grad_tol must be None or a finite number >= 0"),
        ({"grad_tol": float("nan")}, "grad_tol must be None or a finite number >= 0"),
        ({"grad_tol": "1e-3"}, "grad_tol must be None or a finite number >= 0"),
        ({"grad_tol": True}, "grad_tol must be None or a finite number >= 0"),
    ],
)
def test_bad_stopping_options(kwargs, match):
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        minimize_outer(lambda p: p.sum(), x, **kwargs)


def _rosenbrock(p):
    return (p[0] - 1.0) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def test_lbfgs_solves_rosenbrock_where_adam_stalls():
    x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_rosenbrock, x, optimizer="lbfgs", learning_rate=1.0,
                         max_iter=200, tol=1e-12)
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    assert res.stop_reason == "tol" and res.n_iter < 60
    # an accepted line-search point is reused: about one evaluation per iteration
    assert res.n_iter <= res.n_eval <= 2 * res.n_iter + 5
    assert len(res.history) == len(res.grad_norms) == res.n_iter
    y = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    adam = minimize_outer(_rosenbrock, y, optimizer="adam", learning_rate=0.05,
                          max_iter=200, tol=1e-12)
    assert adam.best_loss > 1e3 * res.best_loss


def test_lbfgs_tree_phi_info_callbacks_and_projection():
    from skbilevel.hypergrad import HypergradientInfo

    phi = {"a": torch.zeros(2, dtype=torch.float64, requires_grad=True),
           "b": torch.zeros((), dtype=torch.float64, requires_grad=True)}
    target = torch.tensor([2.0, -3.0], dtype=torch.float64)

    def obj(p):
        loss = ((p["a"] - target) ** 2).sum() + (p["b"] - 1.0) ** 2
        return loss, HypergradientInfo(strategy="test")

    seen = []

    def clamp(leaves):
        leaves[0].clamp_(min=-1.0)

    res = minimize_outer(obj, phi, optimizer="lbfgs", learning_rate=1.0, max_iter=50,
                         tol=1e-12, callbacks=[lambda s: seen.append(s.loss)],
                         projection=clamp)
    assert res.info is not None and res.info.strategy == "test"
    assert seen == res.history
    torch.testing.assert_close(phi["a"].detach(), torch.tensor([2.0, -1.0], dtype=torch.float64))
    assert math.isclose(float(phi["b"].detach()), 1.0, abs_tol=1e-8)


def test_lbfgs_stops_cleanly_when_no_decrease_exists():
    # a function flat to rounding: the line search finds no decrease
    x = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(lambda p: (p * 0.0).sum() + 1.0 + 1e-300 * p.sum(), x,
                         optimizer="lbfgs", learning_rate=1.0, max_iter=20, tol=0.0)
    assert res.stop_reason in ("line_search", "tol")
    assert torch.isfinite(x).all()


def test_torch_lbfgs_is_refused_with_a_pointer():
    x = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="optimizer='lbfgs'"):
        minimize_outer(lambda p: (p ** 2).sum(), x, optimizer=torch.optim.LBFGS([x]))


def _stretched_quadratic(p):
    # badly scaled, coupled, minimum (3, -2) outside the box used below
    q = torch.stack([p[0] - 3.0, p[1] + 2.0])
    H = torch.tensor([[10.0, 3.0], [3.0, 1.0]], dtype=p.dtype)
    return q @ H @ q


def _box_answer():
    # p[0] held at its upper bound 1: the minimum in p[1] is -2 - 3 (1 - 3) = 4,
    # outside [-5, 3], so p[1] = 3 as well
    return torch.tensor([1.0, 3.0], dtype=torch.float64)


def test_lbfgs_bounds_reach_a_corner_without_stalling():
    calls = []

    def obj(p):
        calls.append(p.detach().clone())
        return _stretched_quadratic(p)

    x = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(obj, x, optimizer="lbfgs", learning_rate=1.0, max_iter=100,
                         tol=1e-12, grad_tol=0.0,
                         bounds=(torch.tensor([-5.0, -5.0]), torch.tensor([1.0, 3.0])))
    torch.testing.assert_close(x.detach(), _box_answer())
    assert res.stop_reason == "tol" and res.converged
    # the projected gradient is zero at the corner (the raw one is not)
    assert res.grad_norms[-1] == 0.0
    assert all(bool(((c >= torch.tensor([-5.0, -5.0])) & (c <= torch.tensor([1.0, 3.0]))).all())
               for c in calls), "an evaluation left the box"
    assert res.n_eval <= 15


def test_lbfgs_bounds_face_then_interior_coordinate():
    # only p[0] is bounded (p[0] <= 1): p[1] then solves 3 (p0 - 3) + (p1 + 2) = 0
    x = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(_stretched_quadratic, x, optimizer="lbfgs", learning_rate=1.0,
                         max_iter=100, tol=1e-12, grad_tol=1e-10, bounds=(None, torch.tensor([1.0, math.inf])))
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 4.0], dtype=torch.float64))
    assert res.stop_reason == "tol" and res.n_eval <= 20


def test_lbfgs_bound_reached_along_a_valley_is_held():
    # a long valley whose floor runs out of the box through p[0]'s lower bound
    # (the hetero seed-2 adaptive stage): once near the bound, a step that would
    # cross it stops on it, and the bound then holds p[0]. Projected trials past
    # the bound took 10-evaluation searches for steps of 1e-6 instead.
    def valley(p):
        return 1e-4 * (p[0] + 0.5 * p[1]) ** 2 + (p[1] - 0.3 * p[0] - 1.0) ** 2 + 0.01 * p[0]

    lo = torch.tensor([-14.0, -10.0], dtype=torch.float64)
    hi = torch.tensor([14.0, 10.0], dtype=torch.float64)
    x = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(valley, x, optimizer="lbfgs", learning_rate=0.1, max_iter=100,
                         tol=1e-5, grad_tol=0.0, n_iter_no_change=2, bounds=(lo, hi))
    # p[0] on its bound, p[1] at its minimum there: 1e-4 (-14 + p1 / 2) + 2 (p1 + 3.2) = 0
    p0, p1 = x.detach().tolist()
    assert p0 == -14.0
    assert p1 == pytest.approx((1.4e-3 - 6.4) / 2.00005, abs=1e-5)
    assert res.n_eval <= 20  # 69 evaluations, ending at p[1] = -3.374, before


def test_lbfgs_stops_when_a_step_would_gain_less_than_rounding():
    # an optimum where the gradient is rounding noise: the loop stops on "tol"
    # instead of spending whole line searches on it
    x = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(lambda p: 1.0 + ((p - 1.0) ** 2).sum(), x, optimizer="lbfgs",
                         learning_rate=1.0, max_iter=100, tol=0.0, grad_tol=0.0,
                         n_iter_no_change=100)
    assert float(x.detach()) == pytest.approx(1.0, abs=1e-7)
    assert res.stop_reason == "tol" and res.n_eval <= 10


def test_first_order_bounds_clamp_and_start_inside():
    x = torch.tensor([5.0, 0.0], dtype=torch.float64, requires_grad=True)
    minimize_outer(_stretched_quadratic, x, optimizer="adam", learning_rate=0.05,
                   max_iter=3000, tol=1e-14, n_iter_no_change=50,
                   bounds=(-5.0, torch.tensor([1.0, 3.0])))
    torch.testing.assert_close(x.detach(), _box_answer(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(2,), (2, 1), (1, 2)])
def test_lbfgs_bounds_with_any_leaf_shape_and_several_leaves(shape):
    # the L-BFGS stepper handed the loop one flat gradient, which it projects leaf
    # by leaf: a (2, 1) leaf broadcast it to (2, 2) (wrong grad_norms: 4.0 at the
    # optimum instead of 0), and several leaves crashed
    target = torch.tensor([3.0, 0.5], dtype=torch.float64).reshape(shape)
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    res = minimize_outer(lambda p: ((p - target) ** 2).sum(), x, optimizer="lbfgs",
                         bounds=(None, 1.0), tol=1e-12)
    torch.testing.assert_close(x.detach(), target.clamp(max=1.0))
    assert res.grad_norms[-1] == 0.0
    phi = {"a": torch.zeros(2, dtype=torch.float64, requires_grad=True),
           "b": torch.zeros(1, dtype=torch.float64, requires_grad=True)}
    res = minimize_outer(
        lambda d: ((d["a"] - 3) ** 2).sum() + ((d["b"] + 3) ** 2).sum(), phi,
        optimizer="lbfgs", bounds=(-1.0, 1.0), tol=1e-12,
    )
    torch.testing.assert_close(phi["a"].detach(), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(phi["b"].detach(), -torch.ones(1, dtype=torch.float64))
    assert res.grad_norms[-1] == 0.0


@pytest.mark.parametrize("bounds, match", [
    ((1.0,), "pair"),
    ((torch.zeros(3), None), "shaped like phi"),
    ((1.0, 0.0), "lower bound must be <="),
])
def test_bad_bounds(bounds, match):
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        minimize_outer(_stretched_quadratic, x, optimizer="lbfgs", bounds=bounds)


def test_lbfgs_spends_little_on_steps_below_the_stall_threshold():
    # an inexact hypergradient (off by a fixed 1e-5, as after an inner solve to
    # tolerance): near the optimum its direction climbs, and a full line search
    # would bisect towards zero on it
    H = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    bias = torch.tensor([1e-5, -2e-5], dtype=torch.float64)

    def obj(p):
        with torch.no_grad():
            q = p - 1.0
            value = 1.0 + q @ H @ q
            grad = 2 * H @ q + bias
        return value + (grad * (p - p.detach())).sum()

    x = torch.tensor([0.3, -0.4], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(obj, x, optimizer="lbfgs", learning_rate=1.0, max_iter=100,
                         tol=1e-6, grad_tol=0.0, n_iter_no_change=3)
    q = x.detach() - 1.0
    assert float(q @ H @ q) < 1e-6  # the objective to tol (1 + ...) = 1e-6 relative
    assert res.n_eval <= 15  # 27 with 10-evaluation line searches throughout


def test_lbfgs_stops_once_a_step_could_only_stall():
    # the quasi-Newton model predicts a gain below a tenth of the stall threshold:
    # the loop stops there instead of running n_iter_no_change stalled iterations
    H = torch.diag(torch.tensor([1.0, 3.0, 10.0, 30.0, 100.0], dtype=torch.float64))
    f = lambda p: 1.0 + 0.5 * (p - 1.0) @ H @ (p - 1.0)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    res = minimize_outer(f, x, optimizer="lbfgs", learning_rate=1.0, max_iter=100,
                         tol=1e-4, grad_tol=0.0, n_iter_no_change=5)
    assert res.stop_reason == "tol"
    assert float(f(x.detach())) - 1.0 < 1e-4  # within the tolerance of the optimum
    assert res.n_eval <= 15  # 20 when the stalls ran out (18 iterations)


def _autograd_vgh(f):
    """``x -> (value, grad, hessian)`` of a torch function, for minimize_newton."""

    def fun(x):
        x = x.detach().requires_grad_(True)
        value = f(x)
        (grad,) = torch.autograd.grad(value, x, create_graph=True)
        hess = torch.stack([torch.autograd.grad(gi, x, retain_graph=True)[0] for gi in grad])
        return float(value.detach()), grad.detach(), hess.detach()

    return fun


def test_newton_checks_its_bounds_and_what_fun_returns():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    def fq(x):
        return float(0.5 * x @ A @ x - x.sum()), A @ x - 1.0, A

    x0 = torch.zeros(2, dtype=torch.float64)
    # crossed bounds were taken as given (x = [1, 1], "converged")
    with pytest.raises(ValueError, match="lower bound must be <="):
        minimize_newton(fq, x0, bounds=(torch.ones(2), -torch.ones(2)))
    # a None side failed in torch ("Could not infer dtype of NoneType")
    x, _ = minimize_newton(fq, x0, bounds=(None, torch.tensor([0.1, 10.0])))
    torch.testing.assert_close(x, torch.tensor([0.1, 0.45], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        minimize_newton(fq, x0, bounds=(float("nan"), 1.0))
    # no Hessian: an IndexError before
    with pytest.raises(ValueError, match=r"\(value, grad, hessian\).*got 2 values"):
        minimize_newton(lambda x: (float((x ** 2).sum()), 2 * x), x0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(optimizer="lbfgs", learning_rate=0.0), "learning_rate=0.0 must be > 0"),
    (dict(optimizer="lbfgs", learning_rate=-1.0), "must be > 0"),
    (dict(max_iter=-1), "max_iter must be an integer >= 0"),
    (dict(tol=-1.0), "tol must be a finite number >= 0"),
    (dict(bounds=(float("nan"), 1.0)), "NaN"),
])
def test_minimize_outer_rejects_bad_settings(kwargs, match):
    # these ran: lbfgs returned 'line_search' without moving, NaN bounds clamped
    # phi to NaN ('diverged'), a negative max_iter or tol was taken as given
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        minimize_outer(_quadratic(1.0), x, **kwargs)


def test_newton_on_a_curved_valley_and_in_a_box():
    # Rosenbrock: Newton (shifted where the Hessian is indefinite) reaches the
    # minimum in far fewer evaluations than L-BFGS needs
    def rosen(p):
        return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

    x0 = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    x, res = minimize_newton(_autograd_vgh(rosen), x0, tol=1e-12, max_iter=200)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert res.converged and res.n_eval < 40
    y = x0.clone().requires_grad_(True)
    ref = minimize_outer(rosen, y, optimizer="lbfgs", learning_rate=0.1, max_iter=200,
                         tol=1e-12, grad_tol=1e-10)
    assert res.n_eval < ref.n_eval
    # the box: the valley's end is cut by p[0] <= 0.5; p[1] then sits at 0.25
    lo = torch.tensor([-2.0, -2.0], dtype=torch.float64)
    hi = torch.tensor([0.5, 2.0], dtype=torch.float64)
    x, res = minimize_newton(_autograd_vgh(rosen), x0, bounds=(lo, hi), tol=1e-12)
    torch.testing.assert_close(x, torch.tensor([0.5, 0.25], dtype=torch.float64), atol=1e-6, rtol=0)
    assert res.stop_reason == "tol"


def test_newton_gain_tol_stops_where_the_next_step_would_gain_less():
    # near a minimum Newton's predicted gain -g^T d / 2 is the gain: with
    # gain_tol=tol the last, sub-tol step is not evaluated
    def fun(p):  # a non-quadratic bowl with its minimum value 1 at (1, -2)
        return 1.0 + (p[0] - 1) ** 2 + 0.5 * (p[1] + 2) ** 2 + 0.1 * (p[0] - 1) ** 4

    x0 = torch.tensor([3.0, 1.0], dtype=torch.float64)
    tol = 1e-4
    x_ref, ref = minimize_newton(_autograd_vgh(fun), x0, tol=tol)
    x_fast, fast = minimize_newton(_autograd_vgh(fun), x0, tol=tol, gain_tol=tol)
    assert ref.converged and fast.converged
    assert fast.n_eval < ref.n_eval
    # what the skipped steps would have gained is below tol
    assert 0 <= (fast.best_loss - ref.best_loss) / fast.best_loss < tol
    # gain_tol=0 stops only at the rounding of the value
    _, exact = minimize_newton(_autograd_vgh(fun), x0, tol=tol, gain_tol=0.0)
    assert exact.n_eval >= ref.n_eval
    for bad in (-1.0, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="gain_tol must be None or a finite"):
            minimize_newton(_autograd_vgh(fun), x0, gain_tol=bad)


def test_newton_stops_on_a_callback_and_keeps_the_best_point():
    seen = []
    fun = _autograd_vgh(lambda p: ((p - 3.0) ** 4).sum())
    x, res = minimize_newton(fun, torch.zeros(2, dtype=torch.float64),
                             callbacks=[lambda s: seen.append(s.loss) or s.iteration == 2])
    assert res.stop_reason == "callback" and res.n_iter == 2 and len(seen) == 2
    assert res.best_loss == min(res.history) == pytest.approx(float(((x - 3.0) ** 4).sum()))


def test_newton_warns_and_stops_on_a_non_finite_start():
    def fun(x):
        return float("nan"), torch.zeros_like(x), torch.eye(len(x), dtype=x.dtype)

    with pytest.warns(DivergenceWarning, match="not finite"):
        x, res = minimize_newton(fun, torch.ones(2, dtype=torch.float64))
    assert res.stop_reason == "diverged" and x.tolist() == [1.0, 1.0]


def test_lbfgs_line_search_does_not_narrow_below_a_hundredth_of_its_step():
    # an outer value is known only to its inner solve's tolerance: a start
    # evaluated luckily low leaves no point on the line with sufficient decrease,
    # and the zoom then converged on the start (16 evaluations here; the outer
    # stepper's min_width=0.01 stops it after 4)
    from skbilevel.hypergrad._solvers import _strong_wolfe

    class Line:
        n = 0

        def value_and_grad(self, x):
            self.n += 1
            return float(((x - 1.0) ** 2).sum()), 2.0 * (x - 1.0)

    x, d = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    counts = []
    for width in (0.0, 0.01):
        line = Line()
        *_, ok = _strong_wolfe(line, x, d, -1.0, -2.0, 1.0, max_evals=25, min_width=width)
        assert not ok
        counts.append(line.n)
    assert counts[1] <= 5 < counts[0]
    # an honest start: the same first step either way
    line = Line()
    t, f, _, ok = _strong_wolfe(line, x, d, 1.0, -2.0, 1.0, max_evals=25, min_width=0.01)
    assert ok and t == 1.0 and line.n == 1


def test_minimize_outer_names_bad_arguments():
    x = lambda: torch.zeros(2, dtype=torch.float64, requires_grad=True)  # noqa: E731
    f = lambda p: ((p - 1.0) ** 2).sum()  # noqa: E731
    # learning_rate=0 with a torch optimizer: no step, then stop_reason 'tol' after
    # n_iter_no_change iterations, as if converged
    for opt in ("adam", "sgd", torch.optim.Adam):
        with pytest.raises(ValueError, match="learning_rate=0 must be > 0"):
            minimize_outer(f, x(), optimizer=opt, learning_rate=0)
    # n_iter_no_change <= 0 stopped after one iteration as converged
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_iter_no_change must be an integer >= 1"):
            minimize_outer(f, x(), n_iter_no_change=bad)
    # a float loss: "'float' object has no attribute 'backward'"; a vector one:
    # "grad can be implicitly created only for scalar outputs"
    with pytest.raises(ValueError, match="must return a scalar tensor.*got float"):
        minimize_outer(lambda p: 1.0, x())
    with pytest.raises(ValueError, match=r"must return a scalar tensor.*shape \(2,\)"):
        minimize_outer(lambda p: p ** 2, x())
    with pytest.raises(ValueError, match="does not depend on phi"):
        minimize_outer(lambda p: f(p).detach(), x())
    # bare "'NoneType' / 'int' object is not callable", "'function' object is not iterable"
    with pytest.raises(TypeError, match="objective must be a callable"):
        minimize_outer(None, x())
    with pytest.raises(TypeError, match="projection must be None or a callable"):
        minimize_outer(f, x(), projection=3)
    with pytest.raises(TypeError, match=r"a single function: pass \[callback\]"):
        minimize_outer(f, x(), callbacks=lambda state: False)
    with pytest.raises(TypeError, match="phi must be a torch tensor"):
        minimize_outer(f, 0.0)
    # a generator of callbacks is still read (once)
    seen = []
    minimize_outer(f, x(), max_iter=3, callbacks=(cb for cb in [seen.append]))
    assert len(seen) == 3


@pytest.mark.parametrize("optimizer, lr", [("sgd", 5.0), ("adam", 50.0)])
def test_a_loss_rising_at_every_step_is_divergence_not_convergence(optimizer, lr):
    """SGD at learning_rate=5 on a quadratic: the loss went 4, 324, ..., 1.7e8
    (Adam at 50: 4, 2304, 149, 504, 1320) and the result said
    stop_reason='tol', converged=True, without a warning (the rises counted
    as stalls)."""
    x = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    with pytest.warns(DivergenceWarning, match="stayed above .* against a best of"):
        res = minimize_outer(lambda p: ((p - 1) ** 2).sum(), x, optimizer=optimizer,
                             learning_rate=lr, max_iter=2000)
    assert res.stop_reason == "diverged" and not res.converged
    assert float(x) == 3.0  # the best iterate, the start
    # a loss that settles (a plateau above its best) still stops on tol
    y = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    res = minimize_outer(lambda p: ((p - 1) ** 2).sum(), y, optimizer="sgd", learning_rate=0.1,
                         max_iter=2000)
    assert res.stop_reason == "tol" and res.converged


def _newton_quadratic():
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    def fun(x):
        return float(0.5 * x @ A @ x - x.sum()), A @ x - 1.0, A

    return A, fun


def test_newton_checks_x0_and_the_shapes_and_types_fun_returns():
    """minimize_newton took a (3, 3) Hessian for x of shape (2,) silently (its
    top-left block); a 1-D Hessian or a gradient of length 3 raised a raw
    IndexError, a float32 gradient "linalg.solve: Expected A and B to have the
    same dtype", a numpy x0 "'numpy.ndarray' object has no attribute 'detach'",
    an integer x0 a TypeError from torch.finfo, a 0-d or (2, 1) x0 a matmul
    RuntimeError, a NaN x0 ran fun(NaN) and stopped as 'diverged'."""
    from skbilevel.hypergrad import HypergradientInfo

    A, fq = _newton_quadratic()
    x0 = torch.zeros(2, dtype=torch.float64)
    cases = [
        (lambda x: (fq(x)[0], fq(x)[1], torch.eye(3, dtype=x.dtype)),
         ValueError, r"Hessian must have shape \(2, 2\).*got shape \(3, 3\)"),
        (lambda x: (fq(x)[0], fq(x)[1], torch.ones(2, dtype=x.dtype)),
         ValueError, r"Hessian must have shape \(2, 2\).*got shape \(2,\)"),
        (lambda x: (fq(x)[0], torch.ones(3, dtype=x.dtype), A),
         ValueError, r"gradient must have shape \(2,\).*got shape \(3,\)"),
        (lambda x: (fq(x)[0], fq(x)[1].numpy(), A), TypeError, "gradient must be a torch tensor"),
        (lambda x: (fq(x)[0], fq(x)[1], A.to(torch.complex128)), TypeError, "must be a real"),
        (lambda x: (x, fq(x)[1], A), ValueError, r"value .* must be a real number.*shape \(2,\)"),
        (lambda x: (*fq(x), 1), TypeError, "fourth output must be a HypergradientInfo"),
    ]
    for fun, error, match in cases:
        with pytest.raises(error, match=match):
            minimize_newton(fun, x0)
    for bad, error, match in [
        (x0.numpy(), TypeError, "x0 must be a torch tensor.*ndarray"),
        (torch.zeros(2, dtype=torch.long), TypeError, "x0 must be a floating-point tensor"),
        (torch.zeros((), dtype=torch.float64), ValueError, r"x0 must have shape \(m,\)"),
        (torch.zeros(2, 1, dtype=torch.float64), ValueError, r"got shape \(2, 1\)"),
        (torch.full((2,), float("nan"), dtype=torch.float64), ValueError, "x0 must be finite"),
    ]:
        with pytest.raises(error, match=match):
            minimize_newton(fq, bad)
    # a float32 gradient and Hessian are cast to x0's dtype: the Newton answer
    expected = torch.tensor([0.2, 0.4], dtype=torch.float64)
    x, res = minimize_newton(lambda x: (fq(x)[0], fq(x)[1].float(), A.float()), x0)
    assert x.dtype == torch.float64 and res.converged
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    # and a one-element tensor value, a HypergradientInfo fourth output are fine
    info = HypergradientInfo(strategy="test")
    x, res = minimize_newton(lambda x: (torch.tensor([fq(x)[0]]), fq(x)[1], A, info), x0)
    torch.testing.assert_close(x, expected)
    assert res.info is info


def test_newton_warns_and_takes_gradient_steps_on_a_non_finite_hessian():
    """An all-NaN Hessian on a 2-D quadratic silently gave 27 gradient steps
    ending at [0.2011, 0.4007] (the answer is [0.2, 0.4]), stop_reason='tol',
    converged=True, with no warning. Now a HypergradientWarning names the
    Hessian (once); a Hessian that is NaN at one point only costs one gradient
    step there, Newton steps resume."""
    from skbilevel.hypergrad import HypergradientWarning

    A, fq = _newton_quadratic()
    x0 = torch.zeros(2, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        with pytest.warns(HypergradientWarning,
                          match="Hessian returned by fun is not finite") as rec:
            x, res = minimize_newton(lambda x: (fq(x)[0], fq(x)[1], A * bad), x0)
        assert sum("Hessian" in str(w.message) for w in rec) == 1  # once per call
        assert torch.isfinite(x).all() and res.history[-1] < res.history[0]
    calls = []

    def sometimes_nan(x):
        calls.append(1)
        return fq(x)[0], fq(x)[1], A * float("nan") if len(calls) == 1 else A

    with pytest.warns(HypergradientWarning, match="took a gradient step"):
        x, res = minimize_newton(sometimes_nan, x0, tol=1e-12)
    torch.testing.assert_close(x, torch.tensor([0.2, 0.4], dtype=torch.float64))
    assert res.converged and res.n_iter <= 4


def test_objective_info_must_be_a_hypergradient_info_or_none():
    """minimize_outer with an objective returning (loss, 1) failed after the
    backward pass with "AttributeError: 'int' object has no attribute
    'extra'"; a 3-tuple with "too many values to unpack (expected 2)". None
    was (and is) accepted as 'no record'."""
    f = lambda p: ((p - 1.0) ** 2).sum()  # noqa: E731
    for optimizer in ("sgd", "lbfgs"):
        x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
        with pytest.raises(TypeError,
                           match="info of type int: info must be a HypergradientInfo .* or None"):
            minimize_outer(lambda p: (f(p), 1), x, optimizer=optimizer)
        with pytest.raises(ValueError, match="loss or \\(loss, info\\); got a tuple of 3"):
            minimize_outer(lambda p: (f(p), None, None), x, optimizer=optimizer)
        res = minimize_outer(lambda p: (f(p), None), x, optimizer=optimizer,
                             learning_rate=0.25, max_iter=200, tol=1e-10)
        assert res.converged and res.info is None
        torch.testing.assert_close(x.detach(), torch.ones(2, dtype=torch.float64))
