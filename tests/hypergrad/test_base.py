"""The contract in _base: argmin, the strategy registry, tree handling."""

import pytest
import torch

from skbilevel.hypergrad import (
    GradientDescent,
    HypergradientStrategy,
    argmin,
    available_strategies,
    get_strategy,
)


def _ridge(n=30, p=4):
    X = torch.randn(n, p, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64)

    def inner(w, log_alpha):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (log_alpha.exp() * w**2).sum()

    return X, y, inner


def test_every_family_is_registered():
    names = set(available_strategies())
    assert {"reverse", "forward", "truncated", "first_order", "darts"} <= names
    assert {"cg", "neumann", "identity", "dense", "closed_form"} <= names
    assert {"best_response", "evograd", "bome"} <= names
    families = {get_strategy(name).family for name in names}
    assert families == {"unrolled", "implicit", "closed_form", "proxy", "penalty"}


def test_get_strategy_errors_and_passthrough():
    with pytest.raises(ValueError, match="Unknown hypergradient strategy 'nope'"):
        get_strategy("nope")
    strategy = get_strategy("cg", tol=1e-6)
    assert get_strategy(strategy) is strategy
    with pytest.raises(ValueError, match="constructor arguments"):
        get_strategy(strategy, tol=1.0)
    assert isinstance(get_strategy(type(strategy)), HypergradientStrategy)


def test_integer_phi_is_rejected_with_a_fix():
    _, _, inner = _ridge()
    with pytest.raises(ValueError, match="floating-point.*double"):
        argmin(inner, torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.float64))


def test_first_order_drops_the_indirect_term_without_breaking_backward():
    # phi enters only the inner problem: the first-order hypergradient is zero by
    # definition, and backward must still work (not raise inside autograd).
    X, y, inner = _ridge()
    phi = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    w, info = argmin(inner, phi, torch.zeros(4, dtype=torch.float64),
                     hypergradient="first_order", solver=GradientDescent(lr=0.01, n_steps=5))
    ((X @ w - y) ** 2).mean().backward()
    assert torch.equal(phi.grad, torch.zeros(4, dtype=torch.float64))
    assert info.extra["theta_independent_of_phi"] is True
