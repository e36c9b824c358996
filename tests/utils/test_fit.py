import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning

from skbilevel.hypergrad import HypergradientInfo
from skbilevel.utils._fit import fit_outer
from skbilevel.utils._modules import load_parameters


class _Est(BaseEstimator):
    def __init__(self, learning_rate=0.1, max_iter=4, verbose=0, callbacks=None):
        self.learning_rate = learning_rate
        self.max_iter = max_iter
        self.verbose = verbose
        self.callbacks = callbacks


def test_fit_outer_uses_estimator_parameters_and_stores_diagnostics():
    seen = []
    est = _Est(callbacks=[lambda s: seen.append(s.iteration)])
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)

    def obj(p):
        return ((p - 1) ** 2).sum(), HypergradientInfo(strategy="test")

    res = fit_outer(est, obj, x, early_stopping=False)
    assert seen == [1, 2, 3, 4] and res.stop_reason == "max_iter"
    assert est.n_iter_ == 4 and isinstance(est.n_iter_, int)
    np.testing.assert_array_equal(est.history_, res.history)
    assert est.hypergradient_info_["strategy"] == "test"
    # four Adam steps of about learning_rate each, towards 1
    assert 0.3 < float(x.detach()[0]) < 0.5


def test_fit_outer_options_override_and_warnings_become_sklearn():
    est = _Est(max_iter=50)
    x = torch.tensor([1.0], requires_grad=True)
    calls = {"n": 0}

    def obj(p):
        calls["n"] += 1
        return (p ** 2).sum() * (float("nan") if calls["n"] == 3 else 1.0)

    with pytest.warns(ConvergenceWarning, match="not finite"):
        res = fit_outer(est, obj, x, optimizer="sgd", learning_rate=0.1, max_iter=10)
    assert res.stop_reason == "diverged" and est.n_iter_ == 2
    assert est.hypergradient_info_ == {}


def test_load_parameters_casts_and_keeps_unnamed():
    lin = torch.nn.Linear(3, 2)
    bias = lin.bias.detach().clone()
    w = torch.arange(6, dtype=torch.float64).reshape(2, 3).requires_grad_(True)
    out = load_parameters(lin, {"weight": w * 2})
    assert out is lin and lin.weight.dtype == torch.float32
    torch.testing.assert_close(lin.weight.detach(), (2 * w).float().detach())
    assert torch.equal(lin.bias.detach(), bias)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_parameters(lin, {"nope": w})
