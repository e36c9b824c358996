"""Few-shot meta-learning estimators (MAML, FOMAML, Reptile, ANIL, Meta-SGD, iMAML, R2D2)."""

from ._meta_learner import (
    AdaptedClassifier,
    AdaptedRegressor,
    MetaLearnerClassifier,
    MetaLearnerRegressor,
)

__all__ = [
    "AdaptedClassifier",
    "AdaptedRegressor",
    "MetaLearnerClassifier",
    "MetaLearnerRegressor",
]
