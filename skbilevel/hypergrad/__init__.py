"""Hypergradient solver core (torch only; no scikit-learn in this package).

:func:`argmin` returns the inner solution ``theta*(phi)`` as an autograd
tensor whose backward pass is supplied by a strategy object: unrolled
(reverse, forward, truncated, first-order, DARTS), implicit (CG, Neumann,
identity, dense), closed form, proxy (best-response, EvoGrad) or penalty
(BOME). Every call returns a :class:`HypergradientInfo` health record.
"""

from ._base import (
    ClosedFormSolver,
    HypergradientInfo,
    HypergradientStrategy,
    HypergradientWarning,
    InnerSolver,
    InnerSolveWarning,
    LinearSolveWarning,
    SolveResult,
    StepSolver,
    argmin,
    available_strategies,
    get_strategy,
    register_strategy,
)
from ._tree import (
    tree_detach,
    tree_dot,
    tree_flatten,
    tree_map,
    tree_to_vector,
    tree_unflatten,
    vector_to_tree,
)

__all__ = [
    "ClosedFormSolver",
    "HypergradientInfo",
    "HypergradientStrategy",
    "HypergradientWarning",
    "InnerSolver",
    "InnerSolveWarning",
    "LinearSolveWarning",
    "SolveResult",
    "StepSolver",
    "argmin",
    "available_strategies",
    "get_strategy",
    "register_strategy",
    "tree_detach",
    "tree_dot",
    "tree_flatten",
    "tree_map",
    "tree_to_vector",
    "tree_unflatten",
    "vector_to_tree",
]
