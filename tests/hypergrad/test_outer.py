import math

import pytest
import torch

from skbilevel.hypergrad import DivergenceWarning, minimize_outer


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
