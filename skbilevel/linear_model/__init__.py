"""Linear models whose regularization is fitted by hypergradient descent."""

from ._bilevel_ridge import *  # noqa: F401,F403
from ._bilevel_ridge import __all__ as _all_ridge
from ._hyper_l2 import *  # noqa: F401,F403
from ._hyper_l2 import __all__ as _all_l2

__all__ = list(_all_ridge) + list(_all_l2)
