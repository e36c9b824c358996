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
from ._linear_solve import *  # noqa: F401,F403
from ._solvers import *  # noqa: F401,F403
from ._implicit import *  # noqa: F401,F403
from ._steps import *  # noqa: F401,F403
from ._unrolled import *  # noqa: F401,F403
from ._closed_form import *  # noqa: F401,F403
from ._kernels import *  # noqa: F401,F403
from ._proxy import *  # noqa: F401,F403
from ._penalty import *  # noqa: F401,F403
from ._outer import *  # noqa: F401,F403
from ._meta import *  # noqa: F401,F403
from ._penalized import *  # noqa: F401,F403
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

from ._linear_solve import __all__ as _all_linear_solve
from ._solvers import __all__ as _all_solvers
from ._implicit import __all__ as _all_implicit
from ._steps import __all__ as _all_steps
from ._unrolled import __all__ as _all_unrolled
from ._closed_form import __all__ as _all_closed_form
from ._kernels import __all__ as _all_kernels
from ._proxy import __all__ as _all_proxy
from ._penalty import __all__ as _all_penalty
from ._outer import __all__ as _all_outer
from ._meta import __all__ as _all_meta
from ._penalized import __all__ as _all_penalized

__all__ += list(_all_linear_solve) + list(_all_solvers) + list(_all_implicit) + list(_all_steps) + list(_all_unrolled) + list(_all_closed_form) + list(_all_kernels) + list(_all_proxy) + list(_all_penalty) + list(_all_outer) + list(_all_meta) + list(_all_penalized)
