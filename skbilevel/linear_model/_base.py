"""Helpers shared by the linear estimators (no differentiation here)."""

import copy
import math
import numbers
import os
import sys
import warnings

import numpy as np
import scipy.sparse as sp
import sklearn.base
import torch
from sklearn import get_config
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.metadata_routing import (
    MetadataRouter,
    MethodMapping,
    process_routing,
)

from ..hypergrad import HypergradientStrategy, available_strategies, get_strategy
from ..hypergrad._checks import _did_you_mean


def _offsets(X, y, sw, fit_intercept):
    """``X`` and ``y`` less their ``sw``-weighted means, computed in float64
    before the data are cast to the fit's dtype, and the means
    (``x_offset``, ``y_offset``; zeros without an intercept). With an
    intercept a shift of the data changes nothing but the intercept, yet
    uncentred data lose the fit: in float32 ``y + 1e8`` is rounded to
    multiples of 8, and a logistic fit on ``X + 1e6`` (float64) pairs each
    coefficient with the intercept in a Hessian its inner solver cannot
    handle. Only the features whose mean exceeds their standard deviation
    are centred (the others are left bit for bit as given: the fit is the
    same, up to rounding and the solvers' tolerances). In sparse ``X`` such a
    column is more than half filled already (a mean above the standard
    deviation needs a density above 1/2), and is stored filled in: a
    numeric column such as a year beside one-hot blocks (a float32
    logistic fit of it took 19 ConvergenceWarnings). ``y`` is ``None`` for
    a classifier; a 2-D ``y`` has one offset per target."""
    x_offset = np.zeros(X.shape[1])
    y_offset = 0.0
    if not fit_intercept:
        return X, y, x_offset, y_offset
    total = float(np.sum(sw))
    if sp.issparse(X):
        Xr = X.tocsr()
        mean = np.asarray(sw @ Xr, dtype=np.float64).reshape(-1) / total
        with np.errstate(over="ignore", invalid="ignore"):
            second = np.asarray(sw @ Xr.multiply(Xr), dtype=np.float64).reshape(-1) / total
            var = np.maximum(second - mean * mean, 0.0)
    else:
        mean = np.average(X, axis=0, weights=sw).astype(np.float64)
        with np.errstate(over="ignore"):  # out-of-range X: _check_magnitudes says so
            var = np.average((X - mean) ** 2, axis=0, weights=sw)
    shifted = np.abs(mean) > np.sqrt(var)
    if shifted.any():
        x_offset = np.where(shifted, mean, 0.0)
        if sp.issparse(X):
            # the shifted columns filled in: every row less the offsets
            fill = sp.csr_matrix(np.ones((X.shape[0], 1))) @ sp.csr_matrix(x_offset[None])
            X = sp.csr_matrix(sp.csr_matrix(Xr, dtype=np.float64) - fill)
        else:
            X = np.asarray(X, dtype=np.float64) - x_offset
    if y is not None:
        y_offset = np.average(y, axis=0, weights=sw)  # a float, or (n_targets,)
        y_offset = float(y_offset) if np.ndim(y_offset) == 0 else y_offset
        y = np.asarray(y, dtype=np.float64) - y_offset
    return X, y, x_offset, y_offset


def _own_strategy(hypergradient):
    """The fit's own strategy: :func:`~skbilevel.hypergrad.get_strategy` of a
    name, and a deep copy of an instance. Strategies keep state between
    calls (``ImplicitCG(warm_start=True)`` its last solution, the proxy
    strategies their generator and their fit), so the estimator's parameter
    served every fit: fit changed it, and a second fit of the same estimator
    started where the first stopped (HyperL2Classifier on breast_cancer with
    ``ImplicitCG(warm_start=True, tol=1e-2)``: penalties 0.2% apart). One
    copy per fold batch also keeps threads (``n_jobs``) from sharing one."""
    if isinstance(hypergradient, HypergradientStrategy):
        return copy.deepcopy(hypergradient)
    return get_strategy(hypergradient)


def _refuse_unrolled(strategy, hypergradient, name):
    """A ``ValueError`` for an unrolled ``strategy`` given to an estimator whose
    ridge problems are solved exactly (they failed in the core, telling the
    user to pass a ``solver=GradientDescent(...)`` the estimator does not
    take)."""
    if strategy.family != "unrolled":
        return
    exact = [n for n in available_strategies() if get_strategy(n).family != "unrolled"]
    raise ValueError(
        f"hypergradient={hypergradient!r} is of the 'unrolled' family, which "
        "differentiates through the steps of an iterative inner solver, but "
        f"{name} solves ridge exactly. Use 'closed_form', 'cg', 'dense' or another "
        f"of {exact} ('closed_form' is exact)."
    )


def _out_of_range(X, dtype, headroom=1.0, floor=1.0):
    """Each feature's largest ``|value|``, and whether its sum of squares
    (times ``headroom``) overflows ``dtype`` or its square (over ``floor``)
    underflows (see :func:`_check_magnitudes` in ``_hyper_l2``)."""
    finfo = np.finfo(np.float32 if dtype == torch.float32 else np.float64)
    n = max(X.shape[0], 1)
    if sp.issparse(X):
        col_max = np.asarray(abs(X).max(axis=0).todense()).reshape(-1)
    else:
        # (no |X| temporary: a copy of X)
        col_max = np.maximum(X.max(axis=0), -X.min(axis=0))
    col_max = col_max.astype(np.float64)
    with np.errstate(over="ignore", under="ignore"):
        big = col_max * col_max * n * headroom > finfo.max
        small = (col_max > 0) & (col_max * col_max < finfo.tiny * floor)
    return col_max, big, small


def _check_positive_weights(sw, name, dtype=None):
    """Refuse fewer than two samples of positive weight ``sw``: no validation
    error can be measured. (HyperL2Regressor with ``cv="loo"`` and one shared
    penalty returned the grid's end, ``1e-7`` times the feature scale, without
    a word; BilevelRidgeCV's leave-one-out error was 0/0, ``best_score_ =
    -inf`` at ``alpha_ = 1e-6``, after RuntimeWarnings and a
    ConvergenceWarning with a NaN slope.)

    With the torch ``dtype`` of the fit, also refuse weights whose sum, or
    whose smallest positive value, is within a factor ``1e6`` of the dtype's
    range: the folds' weighted sums overflow or the weights underflow. (In
    float32, uniform weights of 1e37 gave NaN coefficients; 1e33 'the inner
    objective is not finite', 1e-40 'the right-hand side of the linear solve
    is not finite' or an R^2 of .934 against .975; float64 holds 1e-300 to
    1e300.)"""
    k = int(np.count_nonzero(sw > 0))
    if k < 2:
        raise ValueError(
            f"{name} needs at least 2 samples with a positive sample_weight to "
            f"measure a validation error; got {k} of {len(sw)}."
        )
    if dtype is None:
        return
    finfo = torch.finfo(dtype)
    total, smallest = float(sw.sum()), float(sw[sw > 0].min())
    if not (total < finfo.max / 1e6 and smallest > finfo.tiny * 1e6):
        raise ValueError(
            f"{name}: sample_weight (positive values from {smallest:.3g}, sum "
            f"{total:.3g}) is too {'large' if total >= finfo.max / 1e6 else 'small'} "
            f"for the sums of a {str(dtype).replace('torch.', '')} fit. Divide it by "
            "its largest value (the fitted penalties scale with it), or use "
            "dtype='float64'."
        )


def _check_fold_weights(splits, sw, name, remedy):
    """Refuse a fold whose training or validation samples have no weight
    ``sw``: an unweighted refit or a 0/0 validation error. The message names
    the fold and the part; ``remedy`` says what to do."""
    for i, (train, test) in enumerate(splits):
        for part, idx in (("training", train), ("validation", test)):
            if not float(np.sum(sw[idx])) > 0:
                raise ValueError(
                    f"{name}: sample_weight sums to zero on the {part} samples of "
                    f"fold {i} (of {len(splits)}), so its {part} error is undefined. "
                    f"{remedy}"
                )


#: where the frames a warning should not point at live: this package, and
#: scikit-learn's fit wrapper (_fit_context, in sklearn/base.py)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_SKLEARN_BASE = os.path.abspath(sklearn.base.__file__)


def _user_stacklevel():
    """The ``stacklevel`` at which the caller's ``warnings.warn`` points at the
    first frame outside this package and scikit-learn's fit wrapper: the
    user's ``fit`` call (or the scikit-learn utility that made it, such as
    ``cross_val_score``), however deep in the fit the warning arises. Fixed
    stacklevels pointed inside the package (HyperL2's stage and search
    warnings at ``_hyper_l2.py``, at a depth that differs between them)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not (path.startswith(_PACKAGE_DIR) or path == _SKLEARN_BASE):
            break
        frame, level = frame.f_back, level + 1
    return level


#: targets whose root mean square lies in [2^-20, 2^20] are fitted as given
_TARGET_RANGE = 20


def _target_scale(y, down=True):
    """A power of two near the root mean square of the target ``y`` when it
    lies outside ``[2^-20, 2^20]`` (``down=False``: only below), else 1.0.

    The fits divide ``y`` by it and multiply the coefficients (and squared
    errors) back. By a power of two this is exact (bit for bit, unless
    values leave the normal range), so only the extremes change: the
    validation curves are sums of squared residuals, which underflowed for
    small targets and overflowed in intermediate products for large ones in
    float32 (``y * 1e-20``: BilevelRidgeCV's alpha_ 1.0 for 0.92,
    HyperL2Regressor's predictions 0.027 off, with 'value inf' warnings;
    ``y * 1e-25`` or ``y * 1e15``: HyperL2Regressor 0.52 off; float64 from
    ``y * 1e-160``: alpha_ the grid's end, 1e-6, for 0.93)."""
    from ..utils._stats import _rms

    rms = float(_rms(np.asarray(y, dtype=np.float64)))
    if not (rms > 0 and math.isfinite(rms)):
        return 1.0
    k = round(math.log2(rms))
    if -_TARGET_RANGE <= k <= (_TARGET_RANGE if down else math.inf):
        return 1.0
    return math.ldexp(1.0, k)


def _warn_unlocated(
    res, name, search, max_iter, tol, remedy="max_iter or tol", unit=1.0
):
    """scikit-learn's ``ConvergenceWarning`` when the search ``res`` of
    :func:`~skbilevel.hypergrad.minimize_log_alpha` (the fit's answer)
    stopped at ``max_iter`` before locating ``log(alpha)`` to ``tol``;
    ``search`` names it, ``remedy`` the parameters to raise, and the alpha
    it names is ``unit`` times the search's. It points at the user's call
    (:func:`_user_stacklevel`)."""
    if bool(np.all(res.converged)):
        return
    alphas = ", ".join(f"{math.exp(float(x)) * unit:.6g}" for x in np.ravel(res.x))
    warnings.warn(
        f"{name}: {search} stopped after max_iter={max_iter} refinements before "
        f"log(alpha) was located to tol={tol:g} (|d objective / d log(alpha)| = "
        f"{float(np.max(np.abs(res.grad))):.3e}); the best alpha found, {alphas}, is "
        f"kept. Raise {remedy}.",
        ConvergenceWarning,
        stacklevel=_user_stacklevel(),
    )


class _CVRoutingMixin:
    """``get_metadata_routing`` for the cross-validated estimators, which
    define ``_splitter()``: their own ``fit`` consumes ``sample_weight``, and
    ``fit``'s other metadata (``groups``) goes to the splitter's ``split``, as
    for scikit-learn's ``LassoCV``."""

    def get_metadata_routing(self):
        """How ``fit``'s metadata is routed: ``groups`` to the ``cv`` splitter.

        See scikit-learn's metadata routing user guide; routing is used
        only when enabled with
        ``sklearn.set_config(enable_metadata_routing=True)``.

        Returns
        -------
        routing : sklearn.utils.metadata_routing.MetadataRouter

        Examples
        --------
        >>> from sklearn.model_selection import GroupKFold
        >>> from skbilevel.linear_model import HyperL2Regressor
        >>> router = HyperL2Regressor(cv=GroupKFold(3)).get_metadata_routing()
        >>> router.consumes("fit", ["groups"])
        {'groups'}
        """
        return (
            MetadataRouter(owner=type(self).__name__)
            .add_self_request(self)
            .add(
                splitter=self._splitter(),
                method_mapping=MethodMapping().add(caller="fit", callee="split"),
            )
        )


def _split_params(estimator, params, sample_weight):
    """The keyword arguments of the splitter's ``split`` from ``fit``'s ``**params``.

    With metadata routing enabled (``sklearn.set_config(
    enable_metadata_routing=True)``), scikit-learn's routing through
    ``estimator.get_metadata_routing()``. Without it, as ``GridSearchCV``:
    ``groups`` only, and only when ``estimator.cv`` is the user's own
    splitter (an object or iterable, with no ``validation_fraction``): the
    estimator's K-fold, leave-one-out or holdout split would ignore them,
    so they are refused rather than dropped.
    """
    cv, fraction = estimator.cv, getattr(estimator, "validation_fraction", None)
    own = cv is None or isinstance(cv, (numbers.Integral, str))
    grouped = fraction is None and not own
    name = type(estimator).__name__
    if get_config().get("enable_metadata_routing", False):
        routed = process_routing(
            estimator, "fit", sample_weight=sample_weight, **params
        )
        return dict(routed.splitter.split)
    extra = sorted(set(params) - {"groups"})
    if extra:
        hint = _did_you_mean(extra, ["sample_weight", "groups"])
        raise ValueError(
            f"{name}.fit got unexpected keyword arguments {extra}{hint}. Without metadata "
            "routing it takes X, y, sample_weight and groups (for a group splitter "
            "passed as cv); other metadata for cv's splitter needs "
            "sklearn.set_config(enable_metadata_routing=True)."
        )
    groups = params.get("groups")
    if groups is None:
        return {}
    if not grouped:
        raise ValueError(
            f"{name}.fit got groups, but its validation split does not use them ("
            + (f"cv={cv!r}" if fraction is None else f"validation_fraction={fraction!r}")
            + "). Pass a group splitter, e.g. cv=GroupKFold(5), or leave groups out."
        )
    return {"groups": groups}
