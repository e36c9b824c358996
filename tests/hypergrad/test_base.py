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


def test_bad_arguments_name_themselves():
    X = torch.randn(10, 3, dtype=torch.float64)
    w0 = torch.zeros(3, dtype=torch.float64)
    phi = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)

    def inner(w, p):
        return 0.5 * ((X @ w) ** 2).sum() + 0.5 * p.exp() * (w**2).sum()

    # "Expected a torch.Tensor or a dict, tuple or list of tensors, got float."
    # named neither phi nor init
    with pytest.raises(TypeError, match="phi must be a torch tensor.*got float"):
        argmin(inner, 0.0, w0)
    with pytest.raises(TypeError, match="init must be a torch tensor.*got list holding a float"):
        argmin(inner, phi, [0.0, 0.0, 0.0])
    # "'NoneType' object is not callable" from inside a solver
    with pytest.raises(TypeError, match="inner_loss must be a callable"):
        argmin(None, phi, w0)
    # a float objective: AttributeError "'float' object has no attribute 'numel'"
    for strategy in ("cg", "dense", "best_response"):
        with pytest.raises(ValueError, match="scalar tensor; got float"):
            argmin(lambda w, p: 1.0, phi, w0, hypergradient=strategy)
    # step_size=inf was accepted (a NaN iterate after one call); check_inner="no" too
    with pytest.raises(ValueError, match="step_size must be a positive finite number"):
        argmin(inner, phi, w0, hypergradient=get_strategy("bome", step_size=float("inf")))
    with pytest.raises(ValueError, match="check_inner must be True or False"):
        get_strategy("closed_form", check_inner="no")


def test_tree_helpers_reject_mismatched_trees():
    from skbilevel.hypergrad import (
        tree_dot, tree_flatten, tree_map, tree_to_vector, tree_unflatten, vector_to_tree,
    )

    a = {"w": torch.ones(2, 3), "b": (torch.zeros(2), torch.ones(()))}
    # a tree with fewer leaves: zip-truncated to a partial inner product (6.0), silently
    with pytest.raises(ValueError, match="tree_dot: the trees must have the same structure"):
        tree_dot(a, {"w": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="tree_dot"):
        tree_dot(torch.ones(3), torch.ones(2))
    with pytest.raises(ValueError, match="tree_map: the trees have 3 and 1 leaves"):
        tree_map(torch.add, a, {"w": torch.ones(2, 3)})
    # a short or 2-D vector: torch's "shape '[2, 3]' is invalid for input of size 5"
    for bad in (torch.arange(5.0), torch.arange(9.0).reshape(3, 3)):
        with pytest.raises(ValueError, match="pass a 1-D tensor of length 9"):
            vector_to_tree(bad, a)
    with pytest.raises(ValueError, match="needs 1 leaf; got 0"):
        tree_unflatten(tree_flatten(torch.ones(2))[1], [])
    with pytest.raises(ValueError, match="no tensors"):
        tree_to_vector({})
    assert float(tree_dot(a, a)) == 7.0
    assert torch.equal(tree_to_vector(vector_to_tree(torch.arange(9.0), a)), torch.arange(9.0))


def test_register_strategy_does_not_replace_another_class():
    from skbilevel.hypergrad import register_strategy

    class MyCG(HypergradientStrategy):
        name = "my_cg"

    # registering "cg" again silently replaced the library's CG for everyone
    with pytest.raises(ValueError, match="'cg' is taken by skbilevel.hypergrad._implicit"):
        register_strategy("cg")(MyCG)
    assert type(get_strategy("cg")).__name__ == "ImplicitCG"
    with pytest.raises(TypeError, match="HypergradientStrategy subclasses"):
        register_strategy("not_a_strategy")(object)
    with pytest.raises(ValueError, match="non-empty strings"):
        register_strategy("")
    # a new name works, and the same class may register again (a reload)
    register_strategy("test_my_cg")(MyCG)
    register_strategy("test_my_cg")(MyCG)
    try:
        assert isinstance(get_strategy("test_my_cg"), MyCG)
    finally:
        from skbilevel.hypergrad import _base

        _base._REGISTRY.pop("test_my_cg", None)
