"""skbilevel: gradient-based bi-level optimization for scikit-learn.

Estimators fit hyperparameters, sample weights, synthetic training sets and
meta-learned initializations by descending on the hypergradient of a
validation loss, computed by the torch solver core :mod:`skbilevel.hypergrad`.
"""

__version__ = "0.1.0.dev0"

__all__ = ["__version__"]
