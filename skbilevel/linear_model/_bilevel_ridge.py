"""BilevelRidgeCV: ridge with a continuous, exactly optimized penalty."""

import math
import numbers

import numpy as np
import scipy.sparse as sp
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator, MultiOutputMixin, RegressorMixin, _fit_context
from sklearn.model_selection import LeaveOneOut, ShuffleSplit, check_cv
from sklearn.utils._param_validation import Interval
from sklearn.utils.extmath import safe_sparse_dot
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data

from ..hypergrad import (
    HypergradientStrategy,
    RidgeSolver,
    get_strategy,
    minimize_log_alpha,
    ridge_loo_curve,
    ridge_loo_decomposition,
    ridge_loo_value_and_grad,
    ridge_validation_curve,
    ridge_validation_value_and_grad,
)
from ..hypergrad._closed_form import _numpy_route_at_any_thread_count
from ..utils import (
    check_numeric_target,
    check_splits,
    core_warnings_as_sklearn,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
)
from ._base import (
    _CVRoutingMixin,
    _check_fold_weights,
    _check_positive_weights,
    _offsets,
    _out_of_range,
    _own_strategy,
    _refuse_unrolled,
    _split_params,
    _target_scale,
    _warn_unlocated,
)

__all__ = ["BilevelRidgeCV"]

_LN10 = math.log(10.0)


def _log_alpha_grid(eigvals_list, points_per_decade=4, span=(-6, 6)):
    """Log-alphas to scan: RidgeCV's decades and the range the spectrum makes relevant.

    The leave-one-out or validation curve flattens for ``alpha`` far above the
    largest eigenvalue of ``Xs^T Xs`` (the model predicts the mean) and far
    below the smallest non-zero one (least squares), so the scan covers
    ``[max(l_min / 100, l_max * 1e-12), 100 l_max]`` and ``[1e-6, 1e6]``,
    and every decade between the two when they do not overlap (features
    scaled by 1e8: the optimum at 3e14 lay in the gap between 1e6 and
    2e15), on a lattice of ``points_per_decade`` points per decade that
    contains every power of ten (hence scikit-learn's
    ``np.logspace(-6, 6, 13)``). Natural-log units. The curve is not quite
    flat at ``l_min / 100`` (one optimum lay at ``l_min / 640``): the search
    goes on beyond an end of the grid that is its best point.
    """
    # integer lattice indices (k / points_per_decade decades): exact powers of ten
    ppd = points_per_decade
    ranges = [(span[0] * ppd, span[1] * ppd)]
    for eigvals in eigvals_list:
        lam = np.asarray(eigvals, dtype=float)
        lam_max = float(lam.max()) if lam.size else 0.0
        if lam_max > 0 and math.isfinite(lam_max):
            lo = max(float(lam[lam > lam_max * 1e-12].min()) / 100.0, lam_max * 1e-12)
            ranges.append(
                (math.floor(math.log10(lo) * ppd), math.ceil(math.log10(lam_max * 100.0) * ppd))
            )
    lo = min(r[0] for r in ranges)
    hi = max(r[1] for r in ranges)
    return np.arange(lo, hi + 1, dtype=float) * (_LN10 / ppd)


def _writable(a):
    """Dense arrays that torch can wrap without warning (read-only memmaps are copied)."""
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        return np.array(a)
    return a


class BilevelRidgeCV(_CVRoutingMixin, MultiOutputMixin, RegressorMixin, BaseEstimator):
    """Ridge regression whose penalty is optimized continuously by its hypergradient.

    A drop-in replacement for ``RidgeCV(alphas=np.logspace(-6, 6, 13))``: no
    grid to choose. By default the outer objective is the exact
    leave-one-out (LOO) squared error, computed for any alpha from one
    eigendecomposition (the one scikit-learn's ``RidgeCV`` uses, chosen by
    shape). The search over ``log(alpha)`` is one-dimensional and cheap after
    that decomposition, so it scans the LOO curve on a fine grid (4 points
    per decade, covering RidgeCV's grid and the range set by the spectrum of
    ``X``), brackets the best grid point (searching beyond the grid when
    that point is an end of it), and refines it with secant steps on
    the exact hypergradient (autograd through :mod:`skbilevel.hypergrad`).
    The found alpha's LOO error is therefore never above the minimum over
    RidgeCV's 13-point grid. The final model is the ridge solution at
    ``alpha_`` on all the data.

    Parameters
    ----------
    alpha_init : float > 0 or None, default=None
        ``None`` scans the curve first (global on the grid, recommended). A
        float starts a local search from that alpha instead (bracketing by
        steps of growing size, then the same refinement).
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    alpha_per_target : bool, default=False
        One alpha per target (column of ``y``); targets are independent.
    cv : int, cross-validation generator or iterable, default=None
        ``None``: exact leave-one-out. An int or a splitter: K-fold
        validation error (mean over folds of the per-fold mean squared
        error, weighted by ``sample_weight`` where given); hypergradients are
        averaged over folds, computed in parallel with ``n_jobs``.
    validation_fraction : float in (0, 1) or None, default=None
        Use a single random holdout of this fraction as validation set.
        Cannot be combined with ``cv``.
    hypergradient : str or HypergradientStrategy, default="closed_form"
        How the validation error is differentiated. ``"closed_form"`` is
        exact. With ``cv`` or ``validation_fraction`` any strategy of
        :func:`skbilevel.hypergrad.available_strategies` that can use an
        exact inner solver works (e.g. ``"dense"``, ``"cg"``); the LOO
        objective needs ``"closed_form"``. An instance is copied for every
        fold of every fit: its state (a CG warm start) is never shared, and
        fit leaves it as it was.
    max_iter : int, default=100
        Maximum number of hypergradient evaluations of the refinement.
    tol : float, default=1e-4
        Tolerance on ``log(alpha)`` (a relative tolerance on alpha).
    device : str or torch.device, default="cpu"
        Where the computation runs (``"cuda"``, ``"auto"``, ...).
    dtype : str or dtype, default="float64"
        Floating point precision of the computation. In ``"float32"`` with
        ``fit_intercept=True``, ``y`` and the features whose mean exceeds their
        standard deviation are centred in float64 before the cast (the shift
        goes into ``intercept_``), so offsets such as ``y + 1e5`` do not cost
        the fit its digits.
    verbose : int, default=0
        Print the scan and the refinement iterations.
    n_jobs : int, default=None
        Folds computed in parallel (threads) with ``cv``.
    random_state : int, RandomState instance or None, default=None
        Seed of the ``validation_fraction`` split.

    Attributes
    ----------
    alpha_ : float or ndarray of shape (n_targets,)
        The penalty found (one per target if ``alpha_per_target``).
    coef_ : ndarray of shape (n_features,) or (n_targets, n_features)
        ``(n_features,)`` also for ``y`` of shape ``(n_samples, 1)``, as in
        ``RidgeCV`` (``predict`` then returns shape ``(n_samples,)``).
    intercept_ : float or ndarray of shape (n_targets,)
    best_score_ : float or ndarray of shape (n_targets,)
        Negative mean squared LOO (or validation) error at ``alpha_``, the
        sign convention of ``RidgeCV.best_score_``.
    n_iter_ : int
        Hypergradient evaluations of the search (after the scan).
    history_ : ndarray
        Objective (mean over targets) at the best point: after the scan,
        then after each iteration.
    hypergradient_info_ : dict
        Health record of the last hypergradient
        (:class:`skbilevel.hypergrad.HypergradientInfo`), with in ``extra``
        the derivative at ``alpha_`` and the number of scanned points.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Defined when ``X`` has string feature names.

    See Also
    --------
    sklearn.linear_model.RidgeCV : the same model selected on a finite grid.

    Notes
    -----
    Sparse ``X`` is accepted and densified for the decomposition (memory
    ``n_samples * n_features``). With ``sample_weight`` the LOO error is the
    weighted one of ``RidgeCV``: the mean over samples of
    ``s_i (y_i - y_{loo,i})^2``. Targets whose root mean square (centred
    with an intercept) is below ``2^-20`` are scaled up by a power of two
    near it (exactly) for the search, so that their squared errors do not
    underflow (``y * 1e-25`` in float32); ``best_score_`` and ``history_`` are
    in the units of ``y``.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from skbilevel.linear_model import BilevelRidgeCV
    >>> X, y = load_diabetes(return_X_y=True)
    >>> model = BilevelRidgeCV().fit(X, y)
    >>> print(f"{model.alpha_:.3g}")
    0.00415
    >>> round(model.best_score_, 1)  # RidgeCV's 13-point grid: -3000.4
    -2999.8
    >>> model.predict(X[:2]).round(1)
    array([205.1,  69. ])
    """

    _parameter_constraints: dict = {
        "alpha_init": [Interval(numbers.Real, 0, None, closed="neither"), None],
        "fit_intercept": ["boolean"],
        "alpha_per_target": ["boolean"],
        "cv": ["cv_object"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither"), None],
        "hypergradient": [str, HypergradientStrategy],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "device": "no_validation",
        "dtype": "no_validation",
        "verbose": ["verbose"],
        "n_jobs": [numbers.Integral, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        alpha_init=None,
        *,
        fit_intercept=True,
        alpha_per_target=False,
        cv=None,
        validation_fraction=None,
        hypergradient="closed_form",
        max_iter=100,
        tol=1e-4,
        device="cpu",
        dtype="float64",
        verbose=0,
        n_jobs=None,
        random_state=None,
    ):
        self.alpha_init = alpha_init
        self.fit_intercept = fit_intercept
        self.alpha_per_target = alpha_per_target
        self.cv = cv
        self.validation_fraction = validation_fraction
        self.hypergradient = hypergradient
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, **params):
        """Find alpha, then fit ridge at ``alpha_`` on all the data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
        sample_weight : float or array-like of shape (n_samples,), default=None
            Non-negative sample weights.
        **params : dict
            Metadata for the ``cv`` splitter's ``split``: ``groups`` for a
            group splitter such as ``GroupKFold``, as ``GridSearchCV``
            takes it. Any other metadata needs scikit-learn's metadata
            routing (``sklearn.set_config(enable_metadata_routing=True)``),
            which routes it through :meth:`get_metadata_routing`.

        Returns
        -------
        self : object
        """
        split_params = _split_params(self, params, sample_weight)
        # joblib's check of n_jobs (0 is an error) for leave-one-out as well,
        # which runs no Parallel (n_jobs=0 was accepted there silently)
        effective_n_jobs(self.n_jobs)
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, supported=("float32", "float64"))
        strategy = get_strategy(self.hypergradient)
        _refuse_unrolled(strategy, self.hypergradient, "BilevelRidgeCV")
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse=["csr", "csc", "coo"],
            dtype=[np.float64, np.float32],
            multi_output=True,
            y_numeric=True,
        )
        check_numeric_target(y, type(self).__name__)
        n_samples = X.shape[0]
        if n_samples < 2:
            raise ValueError(
                f"BilevelRidgeCV needs at least 2 samples to measure a validation "
                f"error; got n_samples={n_samples} (1 sample). Pass more samples."
            )
        use_loo = self.cv is None and self.validation_fraction is None
        if self.cv is not None and self.validation_fraction is not None:
            raise ValueError(
                "cv and validation_fraction cannot both be set; pass cv=... for K-fold "
                "validation or validation_fraction=... for a single holdout split."
            )
        if isinstance(self.cv, numbers.Integral) and self.cv > n_samples:
            raise ValueError(
                f"cv={self.cv} folds need at least {self.cv} samples but n_samples="
                f"{n_samples}. Use cv <= {n_samples}, or cv=None for leave-one-out."
            )
        if use_loo and strategy.name != "closed_form":
            raise ValueError(
                f"hypergradient={self.hypergradient!r} needs cv=... or "
                "validation_fraction=...: the leave-one-out objective is differentiated "
                "in closed form. Use hypergradient='closed_form' or set cv."
            )
        if sample_weight is not None:
            sample_weight = _check_sample_weight(
                sample_weight, X, dtype=np.float64, ensure_non_negative=True
            )
            _check_positive_weights(sample_weight, "BilevelRidgeCV", dtype)

        x_offset = y_offset = None
        if self.fit_intercept and dtype == torch.float32:
            # the means in float64 before the cast: the core centres in the fit's
            # dtype, where y + 1e5 keeps 3 digits of its variation (cv=5: alpha 1.5%
            # off the float64 fit's, LOO 0.7%; y + 1e3: 17% off with cv=5)
            sw = np.ones(n_samples) if sample_weight is None else sample_weight
            X, y, x_offset, y_offset = _offsets(X, y, sw, True)
        # every feature too small to be squared in dtype: the Gram matrix was 0,
        # every penalty fitted the mean, and the fit returned an R^2 of 0 without
        # a word (X * 1e-170 in float64, X * 1e-22 in float32; at X * 1e-20 in
        # float32, .93 against .975 with numpy's RuntimeWarnings)
        centre_x = self.fit_intercept and x_offset is None and not sp.issparse(X)
        col_max, _, small = _out_of_range(X - X.mean(axis=0) if centre_x else X, dtype)
        if small.any() and small.sum() == np.count_nonzero(col_max):
            raise ValueError(
                f"BilevelRidgeCV: X's values (largest |value| {col_max.max():.3g}"
                f"{' about the mean' if self.fit_intercept else ''}) are too small to be "
                f"squared in {str(dtype).replace('torch.', '')}. Rescale X, e.g. with "
                "sklearn.preprocessing.StandardScaler"
                + (", or use dtype='float64'." if dtype == torch.float32 else ".")
            )
        n_targets = 1 if y.ndim == 1 else y.shape[1]
        per_target = bool(self.alpha_per_target) and n_targets > 1
        penalty = "per_target" if per_target else "scalar"
        # small targets near unit scale (a power of two: exact; see _target_scale):
        # their squared residuals underflowed and the curve was flat at 0. With
        # one alpha per target, each target by its own (one scale for all left a
        # target 1e-30 times another's to underflow in float32: alpha 1e-6, the
        # grid's end, against 307 for the same target unscaled; test R^2 -.86)
        centred = y - y.mean(axis=0) if self.fit_intercept else y
        if per_target:
            y_scale = np.array([_target_scale(col, down=False) for col in centred.T])
        else:
            y_scale = _target_scale(centred, down=False)
        if np.any(y_scale != 1.0):
            y = y / y_scale
        # the searches' values and slopes per target relative to the largest
        # scale's (float64, after the torch computation; 1 for one scale: the
        # search's values stay near unit scale), and that scale's square
        # returns them to y's units afterwards
        top = float(np.max(y_scale))
        unit = np.square(np.atleast_1d(y_scale) / top)
        back = top * top

        Xt = to_tensor(_writable(X), device=device, dtype=dtype)
        yt = to_tensor(_writable(y), device=device, dtype=dtype)
        swt = None if sample_weight is None else to_tensor(sample_weight, device, dtype)

        with core_warnings_as_sklearn():
            if use_loo:
                result, info, solver = self._search_loo(
                    Xt, yt, swt, per_target, penalty, unit
                )
            else:
                result, info, solver = self._search_validation(
                    X, y, Xt, yt, swt, sample_weight, per_target, penalty, strategy,
                    split_params, unit,
                )
            x_best = result.x if per_target else result.x[0]
            phi = torch.as_tensor(x_best, dtype=dtype, device=device)
            with torch.no_grad():
                theta = solver.closed_form(phi)

        _warn_unlocated(
            result, "BilevelRidgeCV", "the search for alpha", self.max_iter, self.tol
        )

        alphas = np.exp(result.x)
        self.alpha_ = alphas if per_target else float(alphas[0])
        # 0.0 - f: a zero error is a score of 0.0, not -0.0 (constant y)
        score = (0.0 - result.fun) * back
        self.best_score_ = score if per_target else float(score[0])
        coef = to_numpy(theta["coef"]) * y_scale
        # y of shape (n_samples, 1): coef_ of shape (n_features,) and predictions of
        # shape (n_samples,), as Ridge and RidgeCV give since scikit-learn 1.5
        one = coef.ndim == 1 or coef.shape[1] == 1
        self.coef_ = coef.reshape(-1) if one else coef.T.copy()
        if self.fit_intercept:
            intercept = to_numpy(theta["intercept"]) * y_scale
            self.intercept_ = float(intercept) if intercept.ndim == 0 else intercept
        else:
            self.intercept_ = 0.0
        if y_offset is not None:
            # the fit saw X less x_offset and y less y_offset (in float64)
            shift = y_offset - self.coef_ @ x_offset
            self.intercept_ = (
                float(self.intercept_ + shift) if np.ndim(shift) == 0 else self.intercept_ + shift
            )
        self.n_iter_ = int(result.n_iter)
        self.history_ = np.asarray(result.history, dtype=float) * back
        info.extra = dict(info.extra)
        info.extra.update(
            grad_at_alpha=(result.grad * back).tolist(),
            n_scanned=0 if result.grid is None else int(len(result.grid)),
        )
        # a shallow copy: dataclasses.asdict deep-copies (a tenth of a small fit)
        self.hypergradient_info_ = dict(vars(info))
        if self.verbose:
            self._report(result)
        return self

    def _search_loo(self, Xt, yt, swt, per_target, penalty, unit):
        with _numpy_route_at_any_thread_count():
            decomp = ridge_loo_decomposition(Xt, yt, swt, self.fit_intercept)
        last = {}

        def value_and_grad(x):
            value, grad, info = ridge_loo_value_and_grad(decomp, x if per_target else x[0])
            last["info"] = info
            return to_numpy(value), to_numpy(grad)

        def values(grid):
            return to_numpy(ridge_loo_curve(decomp, np.exp(grid), per_target=per_target))

        n_alphas = yt.shape[1] if per_target else 1
        result = self._minimize(
            value_and_grad, values, [to_numpy(decomp.eigvals)], n_alphas, unit
        )
        solver = RidgeSolver(
            Xt, yt, swt, self.fit_intercept, penalty=penalty, decomposition=decomp
        )
        return result, last["info"], solver

    def _splitter(self, y=None):
        """The validation splitter: ``validation_fraction``'s holdout split,
        ``cv``'s (``check_cv``), or leave-one-out (``cv=None``, computed in
        closed form, not by this splitter)."""
        if self.validation_fraction is not None:
            return ShuffleSplit(
                n_splits=1, test_size=self.validation_fraction, random_state=self.random_state
            )
        if self.cv is None:
            return LeaveOneOut()
        return check_cv(self.cv, y, classifier=False)

    def _search_validation(
        self, X, y, Xt, yt, swt, sample_weight, per_target, penalty, strategy, split_params,
        unit,
    ):
        splits = check_splits(self._splitter(y), X, y, **split_params)
        if sample_weight is not None:
            # name the fold rather than fail inside the core
            _check_fold_weights(
                splits, sample_weight, "BilevelRidgeCV",
                "Shuffle the folds (e.g. cv=KFold(5, shuffle=True)), drop the "
                "zero-weight samples, or use cv=None (leave-one-out).",
            )
        device = Xt.device

        def take(t, idx):
            return None if t is None else t[torch.as_tensor(idx, device=device)]

        def build(train, test):
            solver = RidgeSolver(
                take(Xt, train), take(yt, train), take(swt, train), self.fit_intercept,
                penalty=penalty,
            )
            solver.decomposition  # factorize once, in the worker
            return solver, take(Xt, test), take(yt, test), take(swt, test)

        last = {}
        with Parallel(n_jobs=self.n_jobs, prefer="threads") as parallel:
            folds = parallel(delayed(build)(tr, te) for tr, te in splits)
            # a strategy of its own per fold (see _own_strategy)
            strategies = [_own_strategy(strategy) for _ in folds]

            def value_and_grad(x):
                la = x if per_target else x[0]
                out = parallel(
                    delayed(ridge_validation_value_and_grad)(
                        s, Xv, yv, la, sample_weight=wv, hypergradient=h
                    )
                    for (s, Xv, yv, wv), h in zip(folds, strategies)
                )
                last["info"] = out[-1][2]
                value = np.mean([to_numpy(o[0]) for o in out], axis=0)
                grad = np.mean([to_numpy(o[1]) for o in out], axis=0)
                return value, grad

            def values(grid):
                out = parallel(
                    delayed(ridge_validation_curve)(s, Xv, yv, np.exp(grid), sample_weight=wv)
                    for s, Xv, yv, wv in folds
                )
                curve = np.mean([to_numpy(o) for o in out], axis=0)  # (n_grid, k)
                return curve if per_target else curve.mean(1, keepdims=True)

            eigvals = [to_numpy(s.decomposition.eigvals) for s, _, _, _ in folds]
            result = self._minimize(
                value_and_grad, values, eigvals, yt.shape[1] if per_target else 1, unit
            )
        solver = RidgeSolver(Xt, yt, swt, self.fit_intercept, penalty=penalty)
        return result, last["info"], solver

    def _minimize(self, value_and_grad, values, eigvals_list, n_alphas, unit):
        """The search for ``n_alphas`` independent log-alphas (one per target
        with ``alpha_per_target``, else one), on the objective's values and
        slopes times ``unit`` (one factor per log-alpha: the square of the
        target's scale relative to the largest, see ``fit``)."""
        grid = _log_alpha_grid(eigvals_list)
        inner_vg, inner_values = value_and_grad, values

        def value_and_grad(x):
            value, grad = inner_vg(x)
            return np.asarray(value) * unit, np.asarray(grad) * unit

        def values(grid):
            return np.asarray(inner_values(grid)) * unit

        # the search's bounds reach 26 decades beyond the grid, which follows the
        # spectrum: minimize_log_alpha's own (+-120, alpha within 1e+-52) clamped
        # X * 1e-30's alpha (1e-60 times the unscaled one) at e^-120, and an
        # alpha_init there landed e^18 away from it (exp(+-700): finite)
        bounds = (
            max(min(-120.0, grid[0] - 60.0), -700.0),
            min(max(120.0, grid[-1] + 60.0), 700.0),
        )
        if self.alpha_init is None:
            return minimize_log_alpha(
                value_and_grad,
                values=values,
                grid=grid,
                tol=self.tol,
                max_iter=self.max_iter,
                bounds=bounds,
                expand=True,
            )
        return minimize_log_alpha(
            value_and_grad,
            x0=np.full(n_alphas, math.log(self.alpha_init)),
            tol=self.tol,
            max_iter=self.max_iter,
            bounds=bounds,
        )

    def _report(self, result):
        if result.grid is not None:
            print(
                f"[BilevelRidgeCV] scanned {len(result.grid)} alphas in "
                f"[{math.exp(result.grid[0]):.3g}, {math.exp(result.grid[-1]):.3g}]"
            )
        for i, value in enumerate(result.history):
            print(f"[BilevelRidgeCV] iteration {i:3d}  objective {value:.10g}")
        print(f"[BilevelRidgeCV] alpha_ = {self.alpha_}")

    def predict(self, X):
        """Predict with the ridge model fitted at ``alpha_``.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_targets)
        """
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc", "coo"], reset=False)
        return safe_sparse_dot(X, self.coef_.T, dense_output=True) + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
