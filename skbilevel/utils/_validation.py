"""Checks of the estimators' inputs that scikit-learn's validation leaves to them."""

import numbers

import numpy as np

__all__ = [
    "check_callbacks",
    "check_hidden_layer_sizes",
    "check_numeric_target",
    "check_splits",
]


def check_splits(splitter, X, y=None, **split_params):
    """The ``(train, validation)`` index pairs of ``splitter`` on ``X``, checked.

    A cross-validation splitter, or an iterable of index pairs wrapped by
    :func:`sklearn.model_selection.check_cv`, may yield anything: each pair
    is checked here, so a bad one is a clear error instead of an indexing
    failure inside numpy or torch. Boolean masks of length ``n_samples``
    are taken as the indices of their true entries.

    Parameters
    ----------
    splitter : object with ``split(X, y)``
        A scikit-learn splitter (for example from ``check_cv``).
    X : array-like or sparse matrix of shape (n_samples, n_features)
    y : array-like of shape (n_samples,), optional
    **split_params : dict
        Passed on to ``splitter.split``: ``groups`` for a group splitter
        such as :class:`~sklearn.model_selection.GroupKFold`.

    Returns
    -------
    list of tuple of ndarray
        Integer index arrays ``(train, validation)``, one pair per split.

    Raises
    ------
    ValueError
        When the splitter yields no split, or a split whose training or
        validation part is empty, not one-dimensional integer indices, or
        out of ``[0, n_samples)``; or when it needs ``groups`` and got none
        (the message says how an estimator's ``fit`` takes them).

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import KFold, check_cv
    >>> from skbilevel.utils import check_splits
    >>> X = np.zeros((6, 2))
    >>> [len(v) for _, v in check_splits(KFold(3), X)]
    [2, 2, 2]
    >>> check_splits(check_cv([(np.arange(4), np.arange(4, 8))]), X)
    Traceback (most recent call last):
    ...
    ValueError: Split 0 has validation indices out of range: [4, 7] for n_samples=6.
    """
    n = X.shape[0]
    try:
        pairs = list(splitter.split(X, y, **split_params))
    except ValueError as err:
        if "groups" not in str(err) or split_params.get("groups") is not None:
            raise
        # a group splitter without groups: scikit-learn's message does not say
        # how an estimator that takes the splitter as cv gets them
        raise ValueError(
            f"{err} The splitter {splitter!r} needs groups: pass them to the "
            "estimator's fit, fit(X, y, groups=groups). Inside a meta-estimator "
            "(GridSearchCV, cross_validate), enable metadata routing "
            "(sklearn.set_config(enable_metadata_routing=True)) and pass the groups "
            "to the meta-estimator, which routes them to this estimator's fit too."
        ) from err
    splits = []
    for k, pair in enumerate(pairs):
        checked = []
        for part, name in zip(pair, ("training", "validation")):
            part = np.asarray(part)
            if part.dtype == bool and part.shape == (n,):
                part = np.flatnonzero(part)
            if part.ndim != 1 or (part.size and part.dtype.kind not in "iu"):
                raise ValueError(
                    f"Split {k} has {name} indices of shape {part.shape} and dtype "
                    f"{part.dtype}; a split must be a pair of 1-D integer index arrays "
                    "(or boolean masks of length n_samples)."
                )
            if part.size == 0:
                raise ValueError(
                    f"Split {k} has an empty {name} part; use fewer folds, or a "
                    "validation_fraction closer to 0.5."
                )
            if part.min() < 0 or part.max() >= n:
                raise ValueError(
                    f"Split {k} has {name} indices out of range: [{part.min()}, "
                    f"{part.max()}] for n_samples={n}."
                )
            checked.append(part.astype(np.intp, copy=False))
        splits.append(tuple(checked))
    if not splits:
        raise ValueError(
            "The cross-validation splitter produced no split; pass cv as a number of "
            "folds, a splitter, or a non-empty iterable of (train, validation) indices."
        )
    return splits


def check_numeric_target(y, estimator):
    """Raise a ``ValueError`` unless the regression target ``y`` is numeric.

    scikit-learn's ``validate_data(..., y_numeric=True)`` converts an
    object array but leaves strings as they are, which torch then cannot
    convert.

    Parameters
    ----------
    y : ndarray
        The target after ``validate_data``.
    estimator : str
        The estimator's name, for the message.

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.utils import check_numeric_target
    >>> check_numeric_target(np.array([0.5, 1.0]), "Ridge")
    >>> check_numeric_target(np.array(["a", "b"]), "Ridge")
    Traceback (most recent call last):
    ...
    ValueError: Ridge fits a numeric target; y has dtype <U1. Encode class labels ...
    """
    if y.dtype.kind not in "fiub":
        raise ValueError(
            f"{estimator} fits a numeric target; y has dtype {y.dtype}. Encode class "
            "labels as numbers, or use a classifier."
        )


def check_callbacks(callbacks):
    """Raise a ``ValueError`` for a callback that is not callable.

    Checked before an outer loop starts: the core calls them only after its
    first iteration.

    Examples
    --------
    >>> from skbilevel.utils._validation import check_callbacks
    >>> check_callbacks([print])
    >>> check_callbacks([1])
    Traceback (most recent call last):
    ...
    ValueError: callbacks must be callables cb(state); got 1 of type int.
    """
    bad = [cb for cb in callbacks or () if not callable(cb)]
    if bad:
        raise ValueError(
            f"callbacks must be callables cb(state); got {bad[0]!r} of type "
            f"{type(bad[0]).__name__}."
        )


def check_hidden_layer_sizes(sizes, name):
    """Raise a ``ValueError`` unless ``sizes`` lists integers >= 1 (units per layer).

    ``name`` is the parameter's name, for the message.

    Examples
    --------
    >>> from skbilevel.utils._validation import check_hidden_layer_sizes
    >>> check_hidden_layer_sizes((64, 64), "hidden_layer_sizes")
    >>> check_hidden_layer_sizes((0,), "hidden_layer_sizes")
    Traceback (most recent call last):
    ...
    ValueError: hidden_layer_sizes must be a tuple of integers >= 1, ... got (0,).
    """
    ok = isinstance(sizes, (tuple, list)) and all(
        isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1
        for h in sizes
    )
    if not ok:
        raise ValueError(
            f"{name} must be a tuple of integers >= 1, the units of each hidden "
            f"layer, e.g. (100,) or (64, 64); got {sizes!r}."
        )
