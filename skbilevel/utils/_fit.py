"""The outer-loop step of ``fit``, shared by the estimators that learn by hypergradient."""

import functools

import numpy as np

from ..hypergrad import minimize_outer
from ._torch import core_warnings_as_sklearn

__all__ = ["fit_outer", "keep_state_on_error"]


def keep_state_on_error(fit):
    """Decorate ``fit`` so that a call that raises leaves the estimator as it was.

    The attributes are those of before the call: a fitted estimator keeps
    its previous fit, whole (not the new ``classes_`` or ``n_features_in_``
    beside the old model), and an unfitted one stays unfitted. Attributes
    are reassigned by a fit, not modified in place, so the previous values
    are kept by reference.

    Examples
    --------
    >>> from sklearn.base import BaseEstimator
    >>> from skbilevel.utils._fit import keep_state_on_error
    >>> class Est(BaseEstimator):
    ...     @keep_state_on_error
    ...     def fit(self, X, y):
    ...         self.classes_ = sorted(set(y))
    ...         if len(self.classes_) < 2:
    ...             raise ValueError("needs 2 classes")
    ...         return self
    >>> est = Est().fit([[0], [1]], [0, 1])
    >>> try:
    ...     est.fit([[0], [1]], ["a", "a"])
    ... except ValueError:
    ...     pass
    >>> est.classes_
    [0, 1]
    """

    @functools.wraps(fit)
    def wrapper(estimator, *args, **kwargs):
        saved = dict(vars(estimator))
        try:
            return fit(estimator, *args, **kwargs)
        except BaseException:
            vars(estimator).clear()
            vars(estimator).update(saved)
            raise

    return wrapper


def fit_outer(estimator, objective, phi, **options):
    """Run :func:`~skbilevel.hypergrad.minimize_outer` for ``estimator``; store its diagnostics.

    Adam on ``phi`` with the estimator's ``learning_rate``, ``max_iter``,
    ``verbose`` and ``callbacks``, labelled with the estimator's class name;
    ``options`` override these and pass anything else (``early_stopping``,
    ``restore_best``, ``projection``, ...) to ``minimize_outer`` unchanged. The
    core's warnings come out as scikit-learn ``ConvergenceWarning``.

    Parameters
    ----------
    estimator : BaseEstimator
        Has ``learning_rate``, ``max_iter``, ``verbose`` and ``callbacks``
        (unless ``options`` gives them). Receives ``n_iter_``, ``history_``
        (outer loss per iteration) and ``hypergradient_info_`` (a dict).
    objective : callable
        ``objective(phi) -> loss`` or ``-> (loss, info)``.
    phi : tensor or tree of tensors
        Outer variables, updated in place.
    **options
        Keyword arguments of :func:`~skbilevel.hypergrad.minimize_outer`.

    Returns
    -------
    OuterResult

    Examples
    --------
    >>> import torch
    >>> from sklearn.base import BaseEstimator
    >>> from skbilevel.utils._fit import fit_outer
    >>> class Est(BaseEstimator):
    ...     def __init__(self, learning_rate=0.1, max_iter=5, verbose=0, callbacks=None):
    ...         self.learning_rate, self.max_iter = learning_rate, max_iter
    ...         self.verbose, self.callbacks = verbose, callbacks
    >>> est, x = Est(), torch.zeros(2, requires_grad=True)
    >>> res = fit_outer(est, lambda p: ((p - 1) ** 2).sum(), x, early_stopping=False)
    >>> est.n_iter_, est.history_.shape, res.stop_reason
    (5, (5,), 'max_iter')
    """
    kwargs = {
        "optimizer": "adam",
        "learning_rate": estimator.learning_rate,
        "max_iter": estimator.max_iter,
        "callbacks": estimator.callbacks,
        "verbose": estimator.verbose,
        "desc": type(estimator).__name__,
    }
    kwargs.update(options)
    with core_warnings_as_sklearn():
        result = minimize_outer(objective, phi, **kwargs)
    estimator.n_iter_ = int(result.n_iter)
    estimator.history_ = np.asarray(result.history, dtype=float)
    estimator.hypergradient_info_ = result.info.as_dict() if result.info is not None else {}
    return result
