"""HyperL2Regressor and HyperL2Classifier: one L2 penalty per feature, fitted by hypergradient.

The penalties ``alpha_j`` (one per feature, per group of features, or a
single one) minimize a cross-validated loss. The fitting runs in three
stages, each started where the previous one stopped:

1. **Shared penalty.** One ``alpha`` for every feature, found by the
   one-dimensional search :func:`skbilevel.hypergrad.minimize_log_alpha`
   (a scan of the cross-validated loss, then secant steps on its exact
   hypergradient; before stage 2 the classifier takes the best scanned
   penalty as is, and refines it only if it is the answer). With
   ``penalty="scalar"`` this is the whole fit.
2. **Adaptive model.** ``log alpha_j = a - gamma (log(u_j + eps) - c)``,
   ``u_j`` the normalized squared coefficient of feature ``j`` in a pilot
   fit at the shared penalty (each fold's pilot on that fold's training
   part; :func:`skbilevel.hypergrad.adaptive_penalty_basis`). Two
   hyperparameters, ``(a, gamma)``, descend from the best ``gamma`` of a
   short scan: by Newton's method on the exact Hessian of the
   cross-validated loss (:func:`skbilevel.hypergrad.minimize_newton`;
   ``RidgeFolds`` and binary ``LogisticFolds`` give it), by L-BFGS on the
   multinomial classifier's hypergradient. When no scanned
   ``gamma`` beats the shared penalty (breast_cancer in the benchmark), the
   data do not support penalties that differ between features: the shared
   penalty is the answer and stage 3 does not run. ``gamma = 1`` is the
   plug-in ``sigma^2 / w_j^2`` of the optimal generalized ridge, ``gamma =
   1/2`` the fixed point at which adaptive ridge is the lasso. When the
   folds have more features than training rows, the regressor rates three
   pilots on a grid of ``(a, gamma)`` and descends from the best: the ridge
   fit at the shared penalty, and a ridge fit reweighted ten times as
   adaptive ridge at ``gamma = 1/2`` (towards the lasso's fixed point: a
   sparse pilot), started at the shared penalty or at a small one.
3. **Per-group corrections.** One log-penalty correction per feature (or
   group) descends the hypergradient with L-BFGS
   (:func:`skbilevel.hypergrad.minimize_outer`, ``optimizer="lbfgs"``), with
   a Gaussian prior holding it near the adaptive model, tighter when there
   are fewer than ten samples per correction.

The guard against overfitting the validation data with many
hyperparameters: (a) the outer loss is the K-fold cross-validated loss,
averaged over folds, not one holdout split; (b) most of the work is done
by the two-parameter model of stage 2, which cannot overfit the folds; (c)
the free corrections pay ``sum_g delta_g^2 / (2 n tau^2)``
(``tau = prior_scale``, ``n`` the number of samples) on top of the
per-sample negative log-likelihood of the validation data: a Gaussian prior
whose weight falls as ``1/n``, and whose ``tau`` shrinks as
``sqrt(n / (10 n_groups))`` below ten samples per correction; they run only
when the adaptive model beat the shared penalty (on dense truths with
p = n/2 to 3n, free corrections around the shared penalty scored up to
.48 below ``RidgeCV`` in test R^2, and level with it without them); (d)
each stage stops when its objective has
not improved by a relative ``tol`` for ``n_iter_no_change`` iterations and
keeps its best iterate, and the shared penalty is kept unless the later
stages beat it on the validation loss by more than one standard error of
the folds' paired differences. The per-sample negative
log-likelihood is the log-loss for the classifier and ``MSE / (2
MSE_shared)`` for the regressor (the Gaussian ``log(MSE) / 2`` to first
order, but positive so a relative ``tol`` applies), so the prior weight does
not depend on the scale of ``y``.

Why stage 2 (measured with ``benchmarks/bench_hyper_l2.py``'s
heterogeneous set: n = 2000, p = 200, 20 strong, 40 weak and 140
irrelevant features, seeds 0 to 3). Free per-feature penalties overfit the
folds: on a single holdout split they scored below ``RidgeCV`` on 3 seeds
out of 3, and even the exact optimum of the 5-fold loss (L-BFGS to
``1e-10``, prior scales 2 to 16 or none) scored .9722 to .9726 on seed 0,
below ``ARDRegression``'s .9729. The adaptive model with corrections
(``tau = 0.2``) scored .9732, .9727, .9750, .9750 against ARD's .9729, .9725,
.9746, .9746: above ARD on every seed (with ``tau = 2``, the earlier
default: .9731, .9726, .9751, .9750). On ``load_diabetes`` with degree-2
features (65 features, 309 training samples, 5 splits) it scores .4318,
above ``RidgeCV`` (.4128) and ARD (.4264), below ``LassoCV`` (.4381).

Why two pilots. On a wide sparse problem (n = 150, p = 400, 10 strong and
20 weak features) the ridge pilot spreads the fit over correlated
irrelevant features: with it the model scored .9325 (seed 1), above ARD
(.9277) but below ``LassoCV`` (.9567), and .7916 against ``LassoCV``'s
.9405 on seed 3. The reweighted, lasso-like pilot validates better there
and scores .9558, .9440, .9488, .9491, .9507 on seeds 1 to 5 against
``LassoCV``'s .9567, .9331, .9405, .9374, .9420: level on seed 1, above on
the four others. Five
reweightings gave .9497 on seed 1, twenty .9576: the iteration approaches
the lasso's fixed point slowly. On the diabetes set the ridge pilot
validates better and is kept (the sparse one, forced, scores .4229).

Why two sparse pilots, and a grid. The lasso's penalty level matters, and
the reweighting chain inherits it from its start. Started at the shared
penalty only, and compared with the ridge pilot at ``a`` = the shared
level, the wide set of seed 1 scored .929-.960 over 8 fold draws
(``random_state`` 0 to 7; mean .9449): the ridge pilot won the comparison
on 3 draws though its descent ended 50% higher in CV loss (the sparse
pilots' best ``a`` lies several units below the shared level), and the
chain at the shared penalty was too sparse on 4 more. With the chain also
started at a small penalty, and each pilot rated at its best point on a
grid (``gamma`` = 0.5 and 2, ``a`` along a curve), the same draws score
.954-.960 (mean .9575; ``LassoCV`` with the same folds .954-.956). On
seeds 1 to 5 the scores were unchanged (.9565, .9439, .9484, .9495, .9511;
since the search runs on features of unit variance, .9558, .9440, .9488,
.9491, .9507).
"""

import contextlib
import math
import numbers
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from joblib import cpu_count, effective_n_jobs
import scipy.sparse as sp
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.model_selection import (
    KFold,
    LeaveOneOut,
    ShuffleSplit,
    StratifiedKFold,
    StratifiedShuffleSplit,
    check_cv,
)
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import compute_class_weight
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.extmath import safe_sparse_dot, softmax
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    validate_data,
)

from ..hypergrad import (
    HypergradientInfo,
    HypergradientStrategy,
    InnerSolver,
    LBFGS,
    LogisticFolds,
    NewtonCG,
    RidgeFolds,
    RidgeLOO,
    adaptive_penalty_basis,
    attach_gradient,
    get_strategy,
    minimize_log_alpha,
    minimize_newton,
    minimize_outer,
)
from ..hypergrad._outer import OuterResult
from ..hypergrad._sparse import csr_with_values
from ..utils._validation import check_callbacks
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
    _user_stacklevel,
    _warn_unlocated,
)

__all__ = ["HyperL2Regressor", "HyperL2Classifier"]

#: half-width, in natural-log units, of the box the log-penalties stay in
#: around the shared value (a factor of about 3e6 either way)
_LOG_ALPHA_BOX = 15.0
#: floor of the per-feature stage's start, relative to the mean squared (centred)
#: feature norm: below it a penalty barely changes the fit, the hypergradient in
#: log(alpha) vanishes (it is proportional to alpha) and the descent would stall
_LOG_ALPHA_FLOOR = -4.0 * math.log(10.0)
#: floor ``eps`` of the normalized squared pilot coefficient in the adaptive model
_ADAPTIVE_EPS = 1e-3
#: upper bound of the adaptive model's exponent ``gamma`` (``alpha ~ w^(-2 gamma)``)
_ADAPTIVE_MAX_GAMMA = 4.0
#: exponents tried before the adaptive model's descent starts (0 is the shared penalty)
_ADAPTIVE_GAMMA_SCAN = (0.25, 0.5, 1.0, 2.0, 4.0)
#: ... before Newton's method starts (its Hessian shift copes with the loss's
#: non-convexity in gamma): the first of these that beats the shared penalty
_NEWTON_GAMMA_STARTS = (1.0, 0.25)
#: most parameters of a stage that takes Newton steps when its folds give the
#: exact Hessian (each costs a solve per fold: the adaptive model's two do)
_NEWTON_MAX_PARAMS = 8
#: the grid on which several pilots are compared: exponents, and shifts of the
#: level a from the shared log-penalty (inside the descent's box)
_ADAPTIVE_GAMMA_GRID = (0.5, 2.0)
_ADAPTIVE_LEVEL_SCAN = np.arange(-_LOG_ALPHA_BOX, 4.5, 1.0)
#: prior_scale="auto" around the adaptive model: at most this many samples' worth of
#: overfitting per free correction before the prior tightens (tau is scaled by
#: sqrt(n / (_SAMPLES_PER_CORRECTION * n_groups)) when that is below 1)
_SAMPLES_PER_CORRECTION = 10.0
#: most bytes of fold precomputations (Gram matrices, scaled rows) per fold batch
_FOLD_BATCH_BYTES = 256 * 2**20
#: most bytes the regressor's leave-one-out folds (one per sample) may hold
_LOO_MAX_BYTES = 4 * 2**30
#: fewest entries (rows x features x outputs x folds) of the classifier's products
#: with X for float32 Hessian-vector products in a float64 fit (see fit)
_LOW_PRECISION_MIN_ENTRIES = 250_000


def _groups_from_penalty(penalty, n_features):
    """Group index per feature (0..G-1) and G, from the ``penalty`` parameter."""
    if isinstance(penalty, str):
        if penalty == "scalar":
            return np.zeros(n_features, dtype=np.int64), 1
        return np.arange(n_features, dtype=np.int64), n_features
    labels = np.asarray(penalty)
    if labels.ndim != 1 or labels.shape[0] != n_features:
        raise ValueError(
            f"penalty as group ids must be a 1-D array with one id per feature: X has "
            f"{n_features} features but penalty has shape {labels.shape}. Pass "
            "penalty='per_feature', 'scalar', or an array of length n_features."
        )
    bad = "non-finite (NaN or inf)"
    try:
        missing = labels.dtype.kind in "fc" and not np.all(np.isfinite(labels))
        if not missing:
            bad = "missing or unorderable"
            _, groups = np.unique(labels, return_inverse=True)
    except TypeError:  # None, or ids of types that do not compare (np.unique sorts)
        missing = True
    if missing:
        raise ValueError(
            f"penalty as group ids needs one comparable id per feature (integers or "
            f"strings); got {bad} ids: {labels.tolist()[:10]}. Give every "
            "feature a group, e.g. its own id for a group of one."
        )
    groups = groups.reshape(-1).astype(np.int64)
    return groups, int(groups.max()) + 1 if n_features else 0


def _check_magnitudes(X, y, dtype, name, headroom=1.0, floor=1.0):
    """Refuse features (and a target) whose squares leave the range of ``dtype``.

    The fit works with sums of squared values (feature scales, Gram matrices,
    penalties placed relative to them): where a square (over ``floor``)
    underflows the feature looks constant, where a sum of squares (times
    ``headroom``: how far the penalty search goes beyond it) overflows the
    solves return infinities.
    Both gave a silent R^2 of 0 (``X * 1e-170`` or ``X * 1e200`` in float64)
    or an error deep in the solvers naming neither the data nor the remedy.
    ``X`` (dense or sparse) and ``y`` as they go to the tensors, i.e. after
    :func:`_offsets`."""
    finfo = np.finfo(np.float32 if dtype == torch.float32 else np.float64)
    n = max(X.shape[0], 1)
    col_max, big, small = _out_of_range(X, dtype, headroom, floor)
    precision = str(finfo.dtype)
    if big.any() or small.any():
        j = int(np.flatnonzero(big | small)[0])
        which = "large" if big[j] else "small"
        raise ValueError(
            f"{name}: X has features whose values are too {which} to be squared and "
            f"summed in {precision} (feature {j}: largest |value| {col_max[j]:.3g}; "
            f"{int(big.sum())} too large, {int(small.sum())} too small). Rescale X, e.g. "
            "with sklearn.preprocessing.StandardScaler"
            + (", or use dtype='float64'." if precision == "float32" else ".")
        )
    if y is not None and len(y):
        y_max = float(np.max(np.abs(y)))
        with np.errstate(over="ignore"):
            if y_max * y_max * n > finfo.max:
                raise ValueError(
                    f"{name}: y's values (largest |value| {y_max:.3g}) are too large to "
                    f"be squared and summed in {precision}. Rescale y (e.g. divide it by "
                    "its standard deviation) or use sklearn.compose.TransformedTargetRegressor."
                )


def _feature_scales(X, sw, fit_intercept):
    """Weighted sum of squared (centred) values of every feature, ``(p,)``.

    A feature's natural unit of penalty: a penalty of ``1e-4`` times it
    leaves that feature nearly unpenalized.
    """
    if X.layout != torch.strided:
        # sparse (CSR): centring would fill it in; sum_i sw_i x_ij^2 minus the
        # mean's part, sum(sw) m_j^2, instead
        out = (sw[None] @ csr_with_values(X, X.values() ** 2))[0]
        if fit_intercept:
            m = (sw[None] @ X)[0] / sw.sum()
            out = (out - sw.sum() * m * m).clamp_min(0.0)
        return out
    Xc = X - (sw @ X) / sw.sum() if fit_intercept else X.clone()
    return sw @ Xc.square_()


def _penalty_scale(scales):
    """The mean of the feature scales (:func:`_feature_scales`), 1.0 for
    degenerate data: the natural unit of a shared penalty. The shared-penalty
    grid and the floor of the per-feature stage are placed relative to it."""
    scale = float(scales.mean()) if len(scales) else 0.0
    return scale if scale > 0 and math.isfinite(scale) else 1.0


def _merge_infos(infos):
    """One health record for several fold batches: worst residuals, summed counts."""
    infos = [i for i in infos if i is not None]
    if not infos:
        return None
    out = HypergradientInfo(strategy=infos[0].strategy)

    def worst(name, pick=max):
        vals = [getattr(i, name) for i in infos if getattr(i, name) is not None]
        return pick(vals) if vals else None

    out.inner_iterations = worst("inner_iterations")
    out.inner_grad_norm = worst("inner_grad_norm")
    out.linear_solve_iterations = worst("linear_solve_iterations")
    out.linear_solve_residual = worst("linear_solve_residual")
    conv = [i.inner_converged for i in infos if i.inner_converged is not None]
    out.inner_converged = all(conv) if conv else None
    conv = [
        i.linear_solve_converged for i in infos if i.linear_solve_converged is not None
    ]
    out.linear_solve_converged = all(conv) if conv else None
    fallbacks = sorted({i.fallback for i in infos if i.fallback})
    out.fallback = "; ".join(fallbacks) or None
    out.n_grad = sum(i.n_grad for i in infos)
    out.n_hvp = sum(i.n_hvp for i in infos)
    corrections = [i.value_correction for i in infos if i.value_correction is not None]
    out.value_correction = sum(corrections) if corrections else None
    out.extra = dict(infos[0].extra)
    out.extra["n_fold_batches"] = len(infos)
    return out


def _ridge_fold_losses(batch, phi, coef):
    """Every fold's validation loss of the ridge fold batch ``batch`` at
    ``phi``, from the folds' coefficients ``coef`` where
    :meth:`_FoldObjective.fold_values` has them (``None``: solved here)."""
    return batch.fold_losses(batch.closed_form(phi) if coef is None else coef)


def _finite_or_inf(loss):
    """A scanned loss, infinity if it is not finite: a NaN compares false, so a
    NaN at the first exponent of a scan stayed its best point and an exponent
    that beat the shared penalty after it was dropped."""
    return loss if math.isfinite(loss) else math.inf


def _fold_jobs(n_jobs):
    """Threads for the fold batches: ``n_jobs`` (joblib's meaning: ``None`` is
    1 unless a ``joblib.parallel_config`` context sets ``n_jobs``), at most one
    per CPU core. Threads beyond the cores only queue for the interpreter
    lock between torch's operations: on two cores, digits took 3.1 s at
    ``n_jobs=5`` (five threads) against 0.97 s at 2 and 0.88 s at ``None``."""
    return min(effective_n_jobs(n_jobs), cpu_count())


@contextlib.contextmanager
def _fold_pool(n_jobs):
    """Threads for the fold batches, held for a whole fit (``None``: one batch
    at a time). A fit maps its batches a few dozen times, each a few
    milliseconds of work: joblib's ``Parallel`` per call (its threads started
    again every time) made ``n_jobs=2`` fits 3 to 4 times slower than
    sequential ones (hetero 0.27 against 0.06 s, make_classification 0.40
    against 0.14 s), and one held for the fit still spent milliseconds per
    dispatch."""
    n = _fold_jobs(n_jobs)
    if n == 1:
        yield None
        return
    with ThreadPoolExecutor(max_workers=n) as executor:
        yield executor


class _FoldObjective:
    """Mean validation loss over folds, split in batches run in parallel threads
    (``pool``, from :func:`_fold_pool`)."""

    #: evaluations remembered: a descent's best iterate is usually among its last few
    _MEMO_SIZE = 8

    def __init__(
        self,
        batches,
        n_folds,
        pool,
        value_and_grad,
        curve,
        value=None,
        value_grad_hessian=None,
        fold_values=None,
    ):
        self.batches = batches
        self.n_folds = n_folds
        self.pool = pool
        self._vg = value_and_grad
        self._curve = curve
        self._value = value
        self._vgh = value_grad_hessian
        self._fold_values = fold_values
        self.last_info = None
        self._memo = {}  # phi's bytes -> (value, grad, info), oldest first

    def _map(self, fn, *args, states=None):
        """``fn(batch, *args)`` for every batch, in the pool's threads; with
        ``states`` (one per batch), ``fn(batch, *args, state)``."""
        extra = [()] * len(self.batches) if states is None else [(s,) for s in states]
        jobs = list(zip(self.batches, extra))

        def run(job):
            return fn(job[0], *args, *job[1])

        if self.pool is None or len(self.batches) == 1:
            return [run(job) for job in jobs]
        return list(self.pool.map(run, jobs))

    def value_and_grad(self, phi):
        """Mean loss over folds (float tensor) and its gradient in phi.

        The last few evaluations are remembered: a ``phi`` seen again (a
        stage that starts where the previous one stopped, the best iterate
        checked against the shared penalty and recorded) costs nothing. So
        are the batches' solutions, where their ``value_and_grad`` gives them
        (a fourth output), for :meth:`fold_values` at the same ``phi``.
        """
        key = self._key(phi)
        if key in self._memo:
            value, grad, self.last_info, _ = self._memo[key]
            return value, grad
        out = self._map(self._vg, phi.detach())
        value = sum(o[0] for o in out) / self.n_folds
        grad = sum(o[1] for o in out) / self.n_folds
        self.last_info = _merge_infos([o[2] for o in out])
        if len(self._memo) >= self._MEMO_SIZE:
            del self._memo[next(iter(self._memo))]
        solutions = [o[3] if len(o) > 3 else None for o in out]
        self._memo[key] = (value, grad, self.last_info, solutions)
        return value, grad

    @staticmethod
    def _key(phi):
        phi = phi.detach()
        return (tuple(phi.shape), phi.cpu().numpy().tobytes())

    @property
    def has_hessian(self):
        """Whether the batches give the exact Hessian (:meth:`value_grad_hessian`)."""
        return self._vgh is not None

    def value_grad_hessian(self, phi):
        """Mean loss over folds, its gradient and its Hessian in ``phi`` (tensors)."""
        out = self._map(self._vgh, phi.detach())
        return tuple(sum(o[i] for o in out) / self.n_folds for i in range(3))

    def value(self, phi):
        """Mean loss over folds (a float), without the hypergradient."""
        if self._value is None:
            return float(self.value_and_grad(phi)[0])
        with torch.no_grad():
            return float(sum(self._map(self._value, phi.detach()))) / self.n_folds

    def fold_values(self, phi):
        """Every fold's loss at ``phi`` (numpy, folds in batch order), or ``None``
        when the batches do not give them. Each batch's ``fold_values`` gets
        its solution at ``phi`` from :meth:`value_and_grad`'s memory, or
        ``None``: the regressor's one-standard-error rule asks at the descent's
        best iterate and at the shared penalty, both evaluated already (two
        factorizations of the folds, 3% of a hetero fit)."""
        if self._fold_values is None:
            return None
        memo = self._memo.get(self._key(phi))
        states = [None] * len(self.batches) if memo is None else memo[3]
        with torch.no_grad():
            out = self._map(self._fold_values, phi.detach(), states=states)
        return np.concatenate([to_numpy(o).reshape(-1) for o in out])

    def map_batches(self, fn):
        """The same objective over ``fn(batch, index)`` for every fold batch."""
        return _FoldObjective(
            [fn(b, k) for k, b in enumerate(self.batches)],
            self.n_folds,
            self.pool,
            self._vg,
            self._curve,
            self._value,
            self._vgh,
            self._fold_values,
        )

    def warm_starts(self):
        """The batches' inner warm starts (their ``theta_``; ``None`` for a
        closed-form batch, which keeps none)."""
        return [getattr(b, "theta_", None) for b in self.batches]

    def set_warm_starts(self, starts):
        """Start the batches' next inner solves from ``starts`` (from
        :meth:`warm_starts` of the same batches in another parametrization:
        the solutions do not depend on it)."""
        for b, start in zip(self.batches, starts or ()):
            if start is not None:
                b.theta_ = start

    def curve(self, log_alphas, phi=None):
        """Mean loss over folds at shared log-penalties (numpy array); with
        ``phi``, along the penalty model's level at ``phi`` (shifted by them)."""
        args = (log_alphas,) if phi is None else (log_alphas, phi)
        out = self._map(self._curve, *args)
        return to_numpy(sum(out)) / self.n_folds


class _HyperL2Base(_CVRoutingMixin, BaseEstimator):
    """Parameters, validation and the two-stage outer loop shared by both estimators."""

    _parameter_constraints: dict = {
        "penalty": [StrOptions({"per_feature", "scalar"}), "array-like"],
        "cv": ["cv_object", StrOptions({"loo"})],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither"), None],
        "alpha_init": [
            Interval(numbers.Real, 0, None, closed="neither"),
            "array-like",
            None,
        ],
        "adaptive": ["boolean"],
        "prior_scale": [
            Interval(numbers.Real, 0, None, closed="neither"),
            StrOptions({"auto"}),
            None,
        ],
        "hypergradient": [str, HypergradientStrategy],
        "max_iter": [Interval(numbers.Integral, 0, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "outer_optimizer": [StrOptions({"lbfgs", "adam"})],
        "fit_intercept": ["boolean"],
        "device": "no_validation",
        "dtype": "no_validation",
        "verbose": ["verbose"],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "n_jobs": [numbers.Integral, None],
        "callbacks": [list, None],
    }

    _name = "HyperL2"
    #: prior_scale="auto": tau around a shared penalty (False) and around the
    #: adaptive model (True, before the sample-count scaling)
    _auto_prior_scale = {False: 8.0, True: 0.2}
    #: the adaptive model's candidate pilots: name -> (level, reweightings). A pilot
    #: is the ridge fit at the level, then that many adaptive-ridge fits at
    #: gamma = 1/2 (the lasso's fixed point, at a penalty that follows the level).
    #: Levels: "shared", the shared log-penalty; "floor", the per-feature stages'
    #: floor (where folds with more features than rows nearly interpolate, so
    #: the chain heads for the sparsest interpolant)
    _pilots = {"ridge": ("shared", 0), "lasso": ("shared", 10), "lasso_low": ("floor", 10)}
    _grid_points_per_decade = 1
    _grid_decades = (-7.0, 3.0)
    #: before the per-feature stages, refine the best point of the shared grid
    #: (the vertex of its parabola and one step: two or three evaluations)
    #: rather than take it as is. The regressor's pilot depends on it
    #: (diabetes-poly2: .4318 refined, .4253 from the grid point); see the
    #: classifier's for the other side
    _refine_shared = True
    #: the shared penalty's search, when it is the fit's answer, stops on a
    #: secant step below this (in log-alpha; see the classifier's)
    _shared_tol = 1e-3

    # -- shared fitting ------------------------------------------------------

    def _check_alpha_init(self, n_features, groups, n_groups):
        """Return (kind, value): ('none', None) | ('scalar', log) | ('array', log per group)."""
        a = self.alpha_init
        if a is None:
            return "none", None
        if isinstance(a, numbers.Real):
            return "scalar", math.log(a)
        a = np.asarray(a, dtype=float)
        if a.ndim == 0:
            if not a > 0:
                raise ValueError(f"alpha_init must be > 0; got {float(a)}.")
            return "scalar", math.log(float(a))
        if a.shape not in ((n_features,), (n_groups,)):
            raise ValueError(
                f"alpha_init as an array needs one value per feature ({n_features}) or per "
                f"penalty group ({n_groups}); got shape {a.shape}."
            )
        if not np.all(np.isfinite(a)) or np.any(a <= 0):
            raise ValueError(
                "alpha_init must hold finite values > 0 (penalties); got "
                f"min {np.min(a):.3g}. Pass positive penalties."
            )
        log_a = np.log(a)
        if a.shape == (n_features,) and n_groups != n_features:
            log_a = np.bincount(
                groups, weights=log_a, minlength=n_groups
            ) / np.bincount(groups, minlength=n_groups)
        return "array", log_a

    def _splitter(self, y=None):
        """The validation splitter: ``validation_fraction``'s holdout split,
        ``cv``'s shuffled (stratified, for the classifier) K-fold, leave-one-out
        for ``cv="loo"``, or ``cv`` itself (``check_cv``)."""
        classifier = isinstance(self, ClassifierMixin)
        if self.validation_fraction is not None:
            cls = StratifiedShuffleSplit if classifier else ShuffleSplit
            return cls(
                n_splits=1,
                test_size=self.validation_fraction,
                random_state=self.random_state,
            )
        if isinstance(self.cv, numbers.Integral):
            cls = StratifiedKFold if classifier else KFold
            return cls(n_splits=self.cv, shuffle=True, random_state=self.random_state)
        if isinstance(self.cv, str):  # "loo" (the regressor's)
            return LeaveOneOut()
        return check_cv(self.cv, y, classifier=classifier)

    def _splits(self, X, y, split_params):
        """Train/validation index pairs from ``cv`` or ``validation_fraction``;
        ``split_params`` (``groups``) go to the splitter's ``split``."""
        n = X.shape[0]
        if self.validation_fraction is None and isinstance(self.cv, numbers.Integral):
            if self.cv < 2:
                raise ValueError(f"cv={self.cv} must be at least 2 folds.")
            if self.cv > n:
                raise ValueError(
                    f"cv={self.cv} folds need at least {self.cv} samples but n_samples={n}. "
                    "Use fewer folds."
                )
        return check_splits(self._splitter(y), X, y, **split_params)

    def _fold_weights(self, splits, sw, n, like):
        """(K, n) training and validation weight matrices from index splits."""
        weighted = " (class_weight multiplies it)" if hasattr(self, "class_weight") else ""
        _check_fold_weights(
            splits, sw, self._name,
            "Shuffle the folds (e.g. cv=KFold(5, shuffle=True), or an integer cv) or "
            f"drop the zero-weight samples{weighted}.",
        )
        K = len(splits)
        T = np.zeros((K, n))
        V = np.zeros((K, n))
        for k, (tr, te) in enumerate(splits):
            T[k, tr] = sw[tr]
            V[k, te] = sw[te]
        return (
            torch.as_tensor(T, dtype=like.dtype, device=like.device),
            torch.as_tensor(V, dtype=like.dtype, device=like.device),
        )

    def _batches(self, K, fold_bytes=0):
        """Fold indices split in as many batches as useful jobs, and into more
        when the folds' precomputations (``fold_bytes`` each) would exceed
        ``_FOLD_BATCH_BYTES`` per batch (leave-one-out: one fold per sample)."""
        n_jobs = _fold_jobs(self.n_jobs)
        by_memory = math.ceil(K * fold_bytes / _FOLD_BATCH_BYTES)
        n_batches = max(1, min(K, max(n_jobs, by_memory)))
        return [list(c) for c in np.array_split(np.arange(K), n_batches)]

    def _equalize_scales(self, X, Xt, swt, gt, n_groups):
        """Rescale the columns of ``Xt``, one factor per penalty group, so that
        the group's mean :func:`_feature_scales` becomes the sum of the
        weights: unit weighted variance, as ``StandardScaler`` without its
        centring.

        The model is unchanged: a penalty ``alpha`` on the column ``x / d`` is
        the penalty ``alpha d^2`` on ``x``, and the coefficient ``w`` the
        coefficient ``w / d``. But the search becomes equivariant to the
        features' units, as the model is: its shared penalty, the adaptive
        model's pilot and the prior all start from a penalty relative to each
        group's scale, as on standardized data; and on standardized data
        nothing changes. (On ``make_friedman1``, whose
        informative features came first, with the columns multiplied by 1e-3
        to 1e3: the shared search had penalized those out and ended at
        ``alpha = 7e17``, test R^2 -.018 against .718 unscaled, and the
        classifier at chance; and features of standard deviations 1e-6 and
        1e6 lay beyond the per-feature stages' reach.) Within a group the
        scales keep their ratios (one penalty for the group's features in the
        user's units). With one penalty (the user's model, as for ``Ridge``)
        all features share one factor, the mean of their scales: the model
        and its answer stay those of the raw units, but the solves no longer
        depend on the data's overall scale (the classifier's absolute
        gradient tolerances: X * 1e6 in float32 gave 14 "NewtonCG stopped"
        warnings).

        Returns ``Xt`` rescaled, the rescaled scales, and the per-feature
        factors ``c = d^2`` (a float64 tensor, or ``None`` when nothing was
        rescaled). A constant feature (whose scale is rounding), or a group
        of them, keeps its scale.
        """
        scales = _feature_scales(Xt, swt, self.fit_intercept)
        lo_val, hi_val = X.min(axis=0), X.max(axis=0)
        if sp.issparse(X):
            lo_val, hi_val = lo_val.toarray().reshape(-1), hi_val.toarray().reshape(-1)
        s = to_numpy(scales).astype(np.float64)
        if self.fit_intercept:
            varying = (hi_val > lo_val) & (s > 0)
        else:
            varying = ((hi_val != 0) | (lo_val != 0)) & (s > 0)
        if not varying.any():
            return Xt, scales, None
        g = to_numpy(gt) if n_groups > 1 else np.zeros(len(s), dtype=np.int64)
        counts = np.bincount(g, weights=varying, minlength=n_groups)
        sums = np.bincount(g, weights=np.where(varying, s, 0.0), minlength=n_groups)
        group_scale = np.divide(sums, counts, out=np.zeros(len(counts)), where=counts > 0)
        c = group_scale[g] / float(swt.sum())
        # factors within 1e-6 of 1 (standardized data, to rounding) are 1: a
        # rescaling by 1 +- 1e-15 changed nothing but the rounding, yet that was
        # enough to send one benchmark split down another path (twice the time)
        c = np.where((c > 0) & np.isfinite(c) & (np.abs(c - 1.0) > 1e-6), c, 1.0)
        if np.all(c == 1.0):
            return Xt, scales, None
        factors = torch.as_tensor(c, device=Xt.device)
        d = torch.as_tensor(1.0 / np.sqrt(c), dtype=Xt.dtype, device=Xt.device)
        if Xt.layout == torch.strided:
            Xt = Xt * d
        else:  # CSR: the values of each column
            Xt = csr_with_values(Xt, Xt.values() * d[Xt.col_indices()])
        return Xt, (scales / factors.to(scales.dtype)), factors

    def _cg_by_name(self):
        """Whether ``hypergradient`` is the name ``"cg"``: the estimator then
        sets its tolerance (a strategy instance keeps its own)."""
        return isinstance(self.hypergradient, str) and self.hypergradient == "cg"

    def _grid(self, scale):
        lo, hi = self._grid_decades
        step = 1.0 / self._grid_points_per_decade
        return math.log(scale) + np.arange(lo, hi + 1e-9, step) * math.log(10.0)

    def _nll(self, loss, base):
        """Outer objective from the mean validation loss (``base``: its shared-stage value)."""
        return loss

    def _pilot(self, problem, phi):
        """Coefficient sizes ``(n_folds, n_features)`` of the fold problem
        ``problem`` at ``phi`` (its own penalty model), for
        :func:`adaptive_penalty_basis`."""
        raise NotImplementedError

    def _adaptive_bases(self, problem, groups, pilots):
        """:func:`adaptive_penalty_basis` of ``problem``'s pilots, one
        ``(n_folds, n_features, 2)`` basis per ``(level, count)`` of ``pilots``.

        The pilot is the fit at the log-penalty ``level``, then ``count``
        times the adaptive-ridge fit at ``gamma = 1/2`` around it (each from
        the last one's basis, at ``a = level``): iterated, that is the
        lasso's fixed point (Grandvalet 1998), a sparse pilot. Pilots at one
        level come from one chain of reweightings.
        """
        n_groups = int(groups.max()) + 1
        chains = {}
        for level in {lv for lv, _ in pilots}:
            like = dict(dtype=problem.X.dtype, device=problem.X.device)  # X may be sparse
            coef = self._pilot(problem, torch.full((n_groups,), level, **like))
            chain = [adaptive_penalty_basis(coef, groups, eps=_ADAPTIVE_EPS)]
            half = torch.tensor([level, 0.5], **like)
            for _ in range(max(c for lv, c in pilots if lv == level)):
                coef = self._pilot(problem.reparametrized(basis=chain[-1]), half)
                chain.append(adaptive_penalty_basis(coef, groups, eps=_ADAPTIVE_EPS))
            chains[level] = chain
        return tuple(chains[lv][c] for lv, c in pilots)

    def _final_problem(self, full, groups, dtype, device):
        """The all-data problem ``full`` in the fitted parametrization: around
        the adaptive model (its pilot refitted on all the data) when there is
        one, else as is."""
        if self.adaptive_params_ is None:
            return full
        params = torch.as_tensor(self.adaptive_params_, dtype=dtype, device=device)
        (basis,) = self._adaptive_bases(full, groups, [self._pilot_spec])
        return full.reparametrized(groups=groups, log_offset=basis[0] @ params)

    def _outer_stage(self, objective, phi, base, center, prior_weight, lo, hi, stage):
        """One L-BFGS (or Adam) descent of the outer objective from ``phi`` (in
        place), inside the box ``[lo, hi]`` (tensors shaped like ``phi``).
        With ``outer_optimizer="lbfgs"``, a model of at most
        ``_NEWTON_MAX_PARAMS`` parameters whose folds give their exact
        Hessian (the adaptive model of the regressor and of a binary
        classifier) takes Newton steps instead (:func:`minimize_newton`).
        A descent stopped by ``max_iter`` while its objective still fell by
        more than a relative ``tol`` is a ``ConvergenceWarning`` naming
        ``stage``."""
        res = self._descend(objective, phi, base, center, prior_weight, lo, hi)
        h = np.asarray(res.history, dtype=float)
        k = min(self.n_iter_no_change, len(h) - 1)
        if res.stop_reason == "max_iter" and k > 0 and np.all(np.isfinite(h[-k - 1 :])):
            gain = (h[-k - 1] - h[-k:].min()) / max(abs(h[-k - 1]), 1e-300)
            if gain > self.tol:
                warnings.warn(
                    f"{self._name}: the {stage} stage stopped at max_iter={self.max_iter} "
                    f"outer iterations with its objective still falling (by a relative "
                    f"{gain:.3g} over the last {k} iterations, tol={self.tol:g}; best "
                    f"{res.best_loss:.6g}); its best iterate is kept. Raise max_iter or "
                    "loosen tol.",
                    ConvergenceWarning,
                    stacklevel=_user_stacklevel(),
                )
        return res

    def _warn_unlocated(self, res, tol, unit=1.0):
        """:func:`_warn_unlocated` for the shared penalty's search when it is
        the fit's answer, as :class:`BilevelRidgeCV` warns (``unit``: the
        factor from the rescaled features' penalty to the user's)."""
        if self.max_iter > 0:
            # (its tol is the estimator's own, not the tol parameter)
            _warn_unlocated(
                res, self._name, "the shared penalty's search", self.max_iter, tol,
                remedy="max_iter", unit=unit,
            )

    def _takes_newton_steps(self, objective, n_params):
        """Whether :meth:`_outer_stage` descends by Newton's method."""
        return (
            self.outer_optimizer == "lbfgs"
            and n_params <= _NEWTON_MAX_PARAMS
            and objective.has_hessian
        )

    def _descend(self, objective, phi, base, center, prior_weight, lo, hi):
        """The descent of :meth:`_outer_stage`."""
        if self._takes_newton_steps(objective, phi.numel()):
            try:
                return self._newton_stage(
                    objective, phi, base, center, prior_weight, lo, hi
                )
            except torch.linalg.LinAlgError:
                pass  # a fold cannot be factored by Cholesky: L-BFGS from phi

        def outer(p):
            value, grad = objective.value_and_grad(p)
            loss = self._nll(attach_gradient(value, grad, p), base)
            if prior_weight:
                loss = loss + prior_weight * ((p - center) ** 2).sum()
            return loss, objective.last_info

        if prior_weight > 0:
            done = self._gain_below_tol(outer, phi, prior_weight)
            if done is not None:
                return done
        # grad_tol=0: the hypergradient in log(alpha) of a nearly pruned feature
        # is tiny but consistent, so only the stall criterion stops the loop
        res = minimize_outer(
            outer,
            phi,
            optimizer=self.outer_optimizer,
            learning_rate=self.learning_rate,
            max_iter=self.max_iter,
            tol=self.tol,
            grad_tol=0.0,
            n_iter_no_change=self.n_iter_no_change,
            callbacks=list(self.callbacks or []),
            verbose=self.verbose,
            bounds=(lo, hi),
            desc=self._name,
        )
        if self.verbose:
            print(
                f"[{self._name}] {res.n_iter} outer iterations, stop: {res.stop_reason}, "
                f"objective {res.best_loss:.6g}"
            )
        return res

    def _gain_below_tol(self, outer, phi, prior_weight):
        """A descent of no iteration (an :class:`OuterResult`) when the one at
        ``phi`` could not lower the objective ``outer`` by a relative ``tol``;
        else ``None``.

        Around the fit's starting point the prior ``prior_weight * |phi -
        center|^2`` holds nearly all of the objective's curvature, so the
        most a descent gains is about that of a Newton step on the prior's
        curvature: ``|g|^2 / (4 prior_weight)``, with ``g`` the gradient at
        ``phi``. Where that is below ``tol`` times the objective, the descent
        would stop on its stall rule after ``n_iter_no_change`` iterations
        with less than that gained (on five data sets and three splits each,
        the gains of the per-feature stage were 0.75 to 1.26 times this
        estimate; make_classification: 8.8e-6 of the objective, estimated
        and gained, at tol=3e-4, and the skipped descent was 12% of the
        fit). The gradient at ``phi`` is the descent's first evaluation,
        remembered.
        """
        p = phi.detach().clone().requires_grad_(True)
        loss, info = outer(p)
        (g,) = torch.autograd.grad(loss, p)
        value = float(loss.detach())
        gain = float((g * g).sum()) / (4.0 * prior_weight)
        if not (math.isfinite(value) and gain <= self.tol * abs(value)):
            return None
        if self.verbose:
            print(
                f"[{self._name}] 0 outer iterations, stop: tol (a descent would gain "
                f"about {gain / abs(value):.2g} of the objective {value:.6g})"
            )
        return OuterResult(
            n_iter=0,
            history=[value],
            grad_norms=[float(g.norm())],
            best_loss=value,
            converged=True,
            stop_reason="tol",
            info=info,
            n_eval=1,
        )

    def _newton_stage(self, objective, phi, base, center, prior_weight, lo, hi):
        """:meth:`_outer_stage` by Newton's method (the objective's exact Hessian)."""
        # _nll is linear in the loss: its slope scales the gradient and the Hessian
        slope = float(self._nll(torch.ones((), dtype=phi.dtype), base))

        def outer(p):
            value, grad, hess = objective.value_grad_hessian(p)
            d = p - center
            value = slope * value + prior_weight * float((d * d).sum())
            grad = slope * grad + 2.0 * prior_weight * d
            hess = slope * hess + 2.0 * prior_weight * torch.eye(
                len(p), dtype=p.dtype, device=p.device
            )
            return float(value), grad, hess

        x, res = minimize_newton(
            outer,
            phi.detach(),
            bounds=(lo, hi),
            tol=self.tol,
            n_iter_no_change=self.n_iter_no_change,
            max_iter=max(self.max_iter, 1),
            callbacks=list(self.callbacks or []),
            # a step predicted to gain less than tol is not taken, as a stage that
            # cannot gain tol is not started (_gain_below_tol)
            gain_tol=self.tol,
        )
        with torch.no_grad():
            phi.copy_(x)
        if self.verbose:
            print(
                f"[{self._name}] {res.n_iter} Newton iterations, stop: {res.stop_reason}, "
                f"objective {res.best_loss:.6g}"
            )
        return res

    def _candidate_pilots(self, problem, shared, scale):
        """The pilots the adaptive stage tries: name -> ``(level, count)`` for
        :meth:`_adaptive_bases`.

        The sparse (``"lasso"``, ``"lasso_low"``) pilots only when the folds
        have more features than training rows (the Woodbury form): there the
        ridge pilot spreads the fit over correlated irrelevant features. With
        more rows than features its coefficients are close to least squares,
        and the sparse pilot was never better (hetero, diabetes-poly2 and 8
        synthetic sparse and dense problems with n > p), while it costs ten
        solves and a scan. The sparse pilot at the shared level is dropped
        when that level is at or below the floor's.
        """
        levels = {"shared": shared, "floor": math.log(scale) + _LOG_ALPHA_FLOOR}
        out = {}
        for name, (level, count) in self._pilots.items():
            if count and getattr(problem, "method", "dual") != "dual":
                continue
            if count and level == "shared" and shared <= levels["floor"]:
                # below the floor the folds interpolate at either level: the same
                # chain twice (the benchmark's wide set: CV losses within 0.1%)
                continue
            out[name] = (levels[level], count)
        return out

    def _adaptive_stage(self, objective, candidates, center, base, level_floor=None):
        """Stage 2: the pilot and ``(a, gamma)`` of the adaptive model.

        ``candidates`` maps a pilot's name to its bases (one per fold
        batch). Returns the fitted ``(a, gamma)`` tensor, the descent's
        :class:`OuterResult`, the chosen pilot's name and the fold batches'
        last inner solutions (warm starts for the next stage), or four
        ``None`` when no scanned point beats the shared penalty (loss
        ``base``) with any pilot: the data then do not ask for penalties
        that differ between features, and the shared penalty is the answer.
        One pilot is scanned along ``gamma`` at ``a = center`` (before
        Newton's method, only until an exponent beats the shared penalty);
        several are compared on a grid of ``(a, gamma)``.
        """
        # the loss is not convex in gamma: start from the best of a scan, values
        # only (no hypergradient)
        best = {}  # pilot -> (loss, a, gamma)
        starts = {}  # pilot -> the inner solutions at its best scanned point
        for name, bases in candidates.items():
            staged = objective.map_batches(lambda b, k: b.reparametrized(basis=bases[k]))
            if len(candidates) == 1:
                # a one-dimensional scan of gamma at a = centre (a is the u-weighted
                # mean log-penalty whatever gamma). Before L-BFGS, which starts from
                # its best point, stopped once the loss has risen twice in a row:
                # larger exponents only spread the penalties further. Newton's
                # method needs only a start that beats the shared penalty: from the
                # first such exponent of _NEWTON_GAMMA_STARTS it reached the same
                # model (test log-loss and R^2 within 3e-5 on 5 splits of
                # breast_cancer, make_classification, 3 synthetic binary sets,
                # hetero and diabetes-poly2) with 2 to 4 fewer fold solves
                # (make_classification: 0.59 -> 0.49 s over the 5 splits). (L-BFGS
                # from gamma = 1 instead: digits' test log-loss rose on one split of
                # 4, .0973 -> .1015)
                newton = self._takes_newton_steps(staged, 2)
                previous, rises = base, 0  # gamma = 0 is the shared penalty
                for gamma in _NEWTON_GAMMA_STARTS if newton else _ADAPTIVE_GAMMA_SCAN:
                    loss = _finite_or_inf(staged.value(bases[0].new_tensor([center, gamma])))
                    if name not in best or loss < best[name][0]:
                        best[name] = (loss, center, gamma)
                        starts[name] = staged.warm_starts()
                    rises = rises + 1 if loss > previous else 0
                    previous = loss
                    if (loss < base) if newton else rises == 2:
                        break
                continue
            # pilots differ in level as well as in shape: once a sparse pilot prunes
            # the rest, the features it keeps want a penalty several units of a
            # below the centre. Compared at the centre, the ridge pilot won on 3 of
            # 8 fold draws of `wide` and its descent ended at a CV loss 50% above
            # the sparse pilot's (test R^2 .929 against .94-.96). So each pilot is
            # rated on a grid of (a, gamma): a curve along a (one
            # eigendecomposition per fold) at a few exponents. On 16 wide problems
            # its ranking of the pilots was that of their descents' final losses
            for gamma in _ADAPTIVE_GAMMA_GRID:
                curve = staged.curve(
                    _ADAPTIVE_LEVEL_SCAN, phi=bases[0].new_tensor([center, gamma])
                )
                curve = np.where(np.isfinite(curve), curve, np.inf)
                i = int(np.argmin(curve))
                if name not in best or curve[i] < best[name][0]:
                    best[name] = (float(curve[i]), center + _ADAPTIVE_LEVEL_SCAN[i], gamma)
        best = {name: b for name, b in best.items() if b[0] < base}
        if not best:
            return None, None, None, None
        pilot = min(best, key=lambda name: best[name][0])
        _, level, start = best[pilot]
        bases = candidates[pilot]
        like = bases[0]
        # descend in (a, gamma * spread), with spread the standard deviation of
        # the basis' second column over all folds (whatever the fold batches,
        # so n_jobs does not change the iterates): a unit of gamma moves the
        # log-penalties `spread` times more than a unit of a, and L-BFGS's first
        # steps (before it has curvature pairs) treat both alike
        # (L-BFGS evaluations: hetero 14 -> 12, wide 14 -> 12. The regressor and
        # a binary classifier now take Newton steps, which do not depend on the
        # scale; a multinomial classifier still descends by L-BFGS)
        spread = float(torch.cat([b[..., 1].reshape(-1) for b in bases]).std())
        spread = spread if spread > 0 and math.isfinite(spread) else 1.0
        unit = like.new_tensor([1.0, 1.0 / spread])
        staged = objective.map_batches(lambda b, k: b.reparametrized(basis=bases[k] * unit))
        # the classifier's inner solves continue from the scan's best point, not
        # from the shared penalty's solution (a 3-class problem: its first
        # descent step took 5 Newton iterations)
        staged.set_warm_starts(starts.get(pilot))
        psi = like.new_tensor([level, start * spread]).requires_grad_(True)
        # the level a no lower than level_floor (the classifier's: its shared
        # search's lower bound). On separable folds the validation log-loss
        # falls as every penalty vanishes, and a ran to the box's edge (blobs
        # with 3 or 4 classes: penalties of 1e-7, CV loss 1e-9, 29 CG warnings
        # from the saturated softmax's singular Hessians, 2 to 6 s)
        a_lo = center - _LOG_ALPHA_BOX
        if level_floor is not None:
            a_lo = max(a_lo, min(level_floor, level))
        lo = like.new_tensor([a_lo, 0.0])
        hi = like.new_tensor([center + _LOG_ALPHA_BOX, _ADAPTIVE_MAX_GAMMA * spread])
        res = self._outer_stage(staged, psi, base, 0.0, 0.0, lo, hi, "adaptive")
        return psi.detach() * unit, res, pilot, staged.warm_starts()

    def _run_outer(
        self, objective, n_groups, n_samples, scale, groups, dtype, device, factors,
        low_scale=None,
    ):
        """The stages; returns phi (tensor), shared log-alpha, prior centre, history,
        n_iter, info, and the objective whose parametrization ``phi`` belongs to.
        Also sets ``adaptive_params_`` and ``adaptive_pilot_``. ``n_samples`` is
        the sum of the sample weights (an integer weight counts as repeats, as
        for scikit-learn's sample-weight equivalence). The shared search may
        go ten decades below its grid; with ``low_scale`` (the classifier's
        smallest feature scale), only as far below it as the grid's low end is
        below ``scale``, and the later stages no further. ``factors`` (from
        :meth:`_equalize_scales`, or ``None``) convert an ``alpha_init`` in
        the user's units to the rescaled features'."""
        kind, init = self._check_alpha_init(len(groups), groups, n_groups)
        # one penalty: the user's units are the rescaled ones times this factor
        unit = float(factors[0]) if factors is not None and n_groups == 1 else 1.0
        if kind == "scalar" and n_groups == 1:
            init = init - math.log(unit)
        if kind == "array" and factors is not None:
            # per-group penalties in the user's units: in the rescaled ones
            # (_equalize_scales; a group's factor is common to its features)
            first = np.unique(groups, return_index=True)[1]
            init = init - np.log(to_numpy(factors)[first])
        gt = torch.as_tensor(groups, device=device)
        # the adaptive stage needs fold problems that take another penalty model
        # (not the hat-matrix leave-one-out one, which only a shared penalty uses)
        use_adaptive = self.adaptive and hasattr(objective.batches[0], "reparametrized")
        previous = getattr(self, "adaptive_params_", None)
        pilot = getattr(self, "adaptive_pilot_", None)
        spec = getattr(self, "_pilot_spec", None)  # the pilot's (level, count)
        # a warm start continues the previous fit's stage: only with the same
        # parametrization (corrections around an adaptive model, or log-penalties)
        warm = (
            self.warm_start
            and hasattr(self, "_phi_fitted")
            and self._phi_fitted.shape == (n_groups,)
            and (previous is not None) == use_adaptive
        )
        history, n_iter = [], 0
        stage1 = shared_loss = None  # shared_loss: the CV loss at the shared penalty
        scan = None  # stage 1's grid search, when it stopped short of _shared_tol
        # the classifier's lowest level: the shared search's lower bound
        level_floor = None
        from_x0 = None  # stage 1's search from a float alpha_init
        self.adaptive_params_ = self.adaptive_pilot_ = None
        original = objective

        def vg_np(x):
            # the shared penalty, always on the original (per-group) objective
            phi = torch.full((n_groups,), float(x[0]), dtype=dtype, device=device)
            value, grad = original.value_and_grad(phi)
            return np.array([float(value)]), np.array([float(grad.sum())])

        if warm:
            phi0 = torch.as_tensor(self._phi_fitted, dtype=dtype, device=device)
            center = float(self._prior_center)
            shared = math.log(self.shared_alpha_)
        elif kind == "array":
            phi0 = torch.as_tensor(init, dtype=dtype, device=device)
            shared = center = float(np.mean(init))
        else:
            # to 1e-3 in log(alpha) when it is the answer; when the per-feature stages
            # take over (and move the overall level themselves), the vertex of the
            # grid's parabola and one step from it: the pilot hardly depends on the
            # last digits (two more steps changed no benchmark score beyond 2e-4)
            max_iter = 1 if n_groups > 1 else max(1, self.max_iter)
            tol = self._shared_tol if n_groups == 1 else 1e-2
            # the grid is relative to the mean feature scale: with features of
            # very different scales the best penalty can lie beyond it (up to
            # ten more decades: far enough for least squares, near enough for
            # the solves to stay finite in float32). With low_scale (the
            # classifier), no further down than where the smallest feature is
            # as little penalized as the mean one at the grid's end: on (nearly)
            # separable folds the validation log-loss keeps falling as the
            # penalty vanishes and the fit diverges (standardized iris and wine:
            # the search went 3 decades below the grid, test log-loss .096 and
            # .084, against .079 and .070 stopped at the grid's end; in 5-fold
            # cross-validation, 3 seeds)
            grid = self._grid(scale)
            beyond = 10.0 * math.log(10.0)
            below = beyond
            if low_scale is not None:
                below = min(beyond, max(0.0, math.log(scale / low_scale)))
                level_floor = float(grid[0] - below)
            bounds = (grid[0] - below, grid[-1] + beyond)
            if kind == "scalar":
                # from alpha_init the bracketing steps count in max_iter: one
                # evaluation, as after a scan, left alpha_init as it was (and the
                # later stages, which do not move a level no gamma improves,
                # returned it: a regressor's CV loss 109 against 31.4 from the scan).
                # Within the scan's bounds, alpha_init clamped into them: below
                # the classifier's, the loose inner solves of nearly separable
                # folds gave values that moved between evaluations at one
                # alpha (breast_cancer from 1e-6: 1.61, then 2.10 and 1.91; the
                # search stopped at once, CV log-loss 1.61 against .075)
                stage1 = minimize_log_alpha(
                    vg_np, x0=init, tol=tol, max_iter=max(1, self.max_iter), bounds=bounds
                )
                from_x0 = stage1
            else:
                stage1 = minimize_log_alpha(
                    vg_np,
                    values=lambda g: objective.curve(g)[:, None],
                    grid=grid,
                    tol=tol,
                    # the best grid point as is before the classifier's
                    # per-feature stages (see _refine_shared)
                    max_iter=max_iter if self._refine_shared or n_groups == 1 else 0,
                    bounds=bounds,
                    expand=True,
                )
            shared = center = float(stage1.x[0])
            base = shared_loss = float(stage1.fun[0])
            n_iter += int(stage1.n_iter)
            if kind != "scalar":
                scan = stage1  # short of _shared_tol: refined if it is the answer

            history.extend(
                float(self._nll(torch.tensor(h), base)) for h in stage1.history
            )
            if n_groups > 1 and center < math.log(scale) + _LOG_ALPHA_FLOOR:
                center = math.log(scale) + _LOG_ALPHA_FLOOR
                stage1 = None  # base is re-evaluated at the floored start
            phi0 = torch.full((n_groups,), center, dtype=dtype, device=device)
            if self.verbose:
                # (one penalty: the shared search is the fit, no stage follows)
                after = (
                    f"; per-feature stages start at {math.exp(center):.4g}"
                    if n_groups > 1 else ""
                )
                print(
                    f"[{self._name}] shared alpha {math.exp(shared) * unit:.4g} (cv loss "
                    f"{base:.6g}){after}"
                )
        info = objective.last_info

        def refined(shared):
            """The shared penalty as the fit's answer: the search of stage 1
            continued from its grid's values to ``_shared_tol``, as for one
            penalty, since before the later stages it stops short of it (the
            regressor's one step from the grid's parabola, the classifier's
            best grid point as is, or as it left a grid's end). (Iris: the
            grid's 0.105 gave a CV loss 6% above the refined 0.036. A digits
            split whose best grid point was the grid's lower end: 0.118 kept
            with a CV log-loss of .1156, where the minimum between the first two
            grid points, 0.403, has .1101; test log-loss .1138 against .1026.
            A regressor: 19.6 against 17.5, CV loss 0.18% higher.) A search
            from a float ``alpha_init`` stopped at 1e-2: continued from its
            answer, with steps of ten times that (a regressor: 4.962 against
            4.921)."""
            nonlocal n_iter
            if scan is not None:
                start = dict(
                    values=lambda g: scan.grid_values, grid=scan.grid, expand=True
                )
            elif from_x0 is not None and tol > self._shared_tol:
                start = dict(x0=shared, step=10.0 * tol)
            else:
                if from_x0 is not None:
                    self._warn_unlocated(from_x0, tol, unit)
                return shared
            res = minimize_log_alpha(
                vg_np,
                tol=self._shared_tol,
                max_iter=max(1, self.max_iter),
                bounds=bounds,
                **start,
            )
            n_iter += int(res.n_iter)
            history.extend(float(self._nll(torch.tensor(h), base)) for h in res.history)
            self._warn_unlocated(res, self._shared_tol, unit)
            return float(res.x[0])

        if n_groups == 1 and not warm and kind != "array":
            self._warn_unlocated(stage1, tol, unit)
            return phi0, shared, center, history, n_iter, info, objective
        if stage1 is None:
            base = float(objective.value_and_grad(phi0)[0])
        if not base > 0 and not warm and kind != "array":
            # a zero validation loss (e.g. constant y): nothing left to improve,
            # and the relative objective MSE / MSE_shared is undefined
            phi0 = torch.full_like(phi0, shared)
            return phi0, shared, shared, history, n_iter, info, objective
        adaptive = bases = starts = None
        if use_adaptive and warm:
            # (at max_iter=0 too: the previous corrections are around this model,
            # not log-penalties; taken as such, every alpha was near 1)
            bases = [self._adaptive_bases(b, gt, [spec])[0] for b in objective.batches]
            adaptive = torch.as_tensor(previous, dtype=dtype, device=device)
        elif use_adaptive and self.max_iter > 0 and kind != "array":
            pilots = self._candidate_pilots(objective.batches[0], shared, scale)
            # one chain of reweightings per level and fold batch serves every pilot
            chains = [
                self._adaptive_bases(b, gt, list(pilots.values())) for b in objective.batches
            ]
            candidates = {
                name: [chain[i] for chain in chains] for i, name in enumerate(pilots)
            }
            adaptive, res, pilot, starts = self._adaptive_stage(
                objective, candidates, center, base, level_floor
            )
            bases, spec = candidates.get(pilot), pilots.get(pilot)
            if res is None:
                # no exponent with any pilot beats the shared penalty: the data do
                # not support penalties that differ between features, and free
                # per-feature corrections would only fit the folds' noise (dense
                # truths with p >= n/2 scored far below RidgeCV with them)
                shared = refined(shared)
                phi0 = torch.full_like(phi0, shared)
                return phi0, shared, shared, history, n_iter, info, original
            history.extend(res.history)
            n_iter += res.n_iter
            info = res.info if res.info is not None else info
        if adaptive is not None:
            # the folds' pilot solutions (at the shared penalty): a start for the
            # final model's pilot
            self._pilot_starts = objective.warm_starts()
            # stage 3 works on per-group corrections around the adaptive model
            objective = objective.map_batches(
                lambda b, k: b.reparametrized(groups=gt, log_offset=bases[k] @ adaptive)
            )
            # and the corrections' from the adaptive descent's last solutions (a
            # 3-class problem: 9 Newton iterations and 675 Hessian-vector products
            # from the shared penalty's, 111 of the fit's 551 ms)
            objective.set_warm_starts(starts)
            if not warm:
                phi0 = torch.zeros(n_groups, dtype=dtype, device=device)
                center = 0.0
            self.adaptive_params_ = to_numpy(adaptive).astype(np.float64)
            self.adaptive_pilot_ = pilot
            self._pilot_spec = spec
        tau = self.prior_scale
        if isinstance(tau, str):  # "auto"
            tau = self._auto_prior_scale[adaptive is not None]
            if adaptive is not None:
                # fewer than ten samples per free correction tighten the prior
                tau *= min(1.0, math.sqrt(n_samples / (_SAMPLES_PER_CORRECTION * n_groups)))
        prior_weight = 0.0
        if tau is not None:
            denom = 2.0 * n_samples * float(tau) ** 2
            prior_weight = 1.0 / denom if denom > 0 else math.inf
        # a prior too tight for the dtype (a tiny prior_scale, or sample weights
        # summing to 1e-200: 1 / (2 n tau^2) underflowed to a ZeroDivisionError)
        # holds the corrections at its centre: no descent
        pinned = not prior_weight * _LOG_ALPHA_BOX**2 < torch.finfo(dtype).max
        phi = phi0.clone().requires_grad_(True)
        lo = center - _LOG_ALPHA_BOX
        if level_floor is not None and adaptive is None:
            # log-penalties themselves here: no lower than the shared search went
            # (see _adaptive_stage; around the adaptive model they are corrections)
            lo = max(lo, min(level_floor, float(phi0.min())))
        if self.max_iter > 0 and not pinned:
            res = self._outer_stage(
                objective,
                phi,
                base,
                center,
                prior_weight,
                torch.full_like(phi0, lo),
                torch.full_like(phi0, center + _LOG_ALPHA_BOX),
                "per-feature" if n_groups == len(groups) else "per-group",
            )
            history.extend(res.history)
            n_iter += res.n_iter
            info = res.info if res.info is not None else info
        if shared_loss is None and kind != "array" and not warm:
            shared_loss = float(vg_np([shared])[0][0])
        if shared_loss is not None:
            # keep the shared penalty unless the per-feature stages beat it on the
            # validation loss (a floored start may not reach it) by more than one
            # standard error of the folds' paired differences (the one-standard-
            # error rule): a gain within the folds' noise is the penalties fitting
            # that noise. (In 5-fold cross-validation on 3 seeds, standardized
            # wine's test log-loss .070 -> .060, iris .079 -> .078; dense truths
            # with p >= n and low SNR, 200 x 300 R^2 .024 -> .036 (RidgeCV .034),
            # 80 x 400 -.087 -> -.053; the benchmark sets unchanged)
            value, _ = objective.value_and_grad(phi.detach())
            worse = float(value) >= shared_loss
            mine = objective.fold_values(phi.detach())
            if not worse and mine is not None and len(mine) > 1:
                d = mine - original.fold_values(torch.full_like(phi, shared))
                worse = float(d.mean() + d.std(ddof=1) / math.sqrt(len(d))) >= 0.0
            if worse:
                self.adaptive_params_ = self.adaptive_pilot_ = None
                objective = original
                shared = refined(shared)
                phi = torch.full_like(phi, shared)
        return phi.detach(), shared, center, history, n_iter, info, objective

    def _set_common(
        self, phi, shared, center, history, n_iter, info, objective, alphas, factors
    ):
        """Fitted attributes; ``alphas`` are the final model's penalties on the
        rescaled features (``factors``, see :meth:`_equalize_scales`)."""
        # the folds' pilot solutions, handed to the final fit, are not kept
        self.__dict__.pop("_pilot_starts", None)
        self._phi_fitted = to_numpy(phi).copy()
        self.alphas_ = to_numpy(alphas).astype(np.float64).reshape(-1)
        if factors is not None:
            self.alphas_ *= to_numpy(factors)
        self._prior_center = center
        self.shared_alpha_ = math.exp(shared)
        if factors is not None and self._phi_fitted.shape == (1,):
            self.shared_alpha_ *= float(factors[0])  # one penalty: the user's units
        self.n_iter_ = int(n_iter)
        self.history_ = np.asarray(history, dtype=float)
        with torch.no_grad():
            value, _ = objective.value_and_grad(phi)
        self.cv_loss_ = float(value)
        # the health record at the fitted penalties (the last loop one if none)
        info = objective.last_info or info
        self.hypergradient_info_ = {} if info is None else info.as_dict()


class HyperL2Regressor(RegressorMixin, _HyperL2Base):
    """Ridge regression with one penalty per feature, fitted by hypergradient.

    Solves ``min_w 1/2 sum_i s_i (y_i - x_i w - b)^2 + 1/2 sum_j alpha_j w_j^2``
    with penalties ``alpha_j`` chosen to minimize a cross-validated squared
    error, in three stages: a shared penalty (one-dimensional search); the
    two-parameter adaptive model ``log alpha_j = a - gamma log(u_j + eps)``
    (``u_j`` the normalized squared coefficient of a pilot fit, see
    :func:`skbilevel.hypergrad.adaptive_penalty_basis`), fitted by Newton's
    method on the exact Hessian of its loss; then a free correction per feature (or per
    group) with a Gaussian prior centred on the adaptive model. The
    low-dimensional model is the guard against overfitting the validation
    folds with hundreds of penalties (see Notes). With more features than
    training rows per fold, three pilots are tried, each rated at its best
    point of a grid of ``(a, gamma)``, and the best is kept
    (``adaptive_pilot_``): the ridge fit at the shared penalty, and two
    sparse ones, a ridge fit reweighted ten times as adaptive ridge at
    ``gamma = 1/2`` (whose fixed point is the lasso) at the shared penalty
    and at a small one. A dense pilot suits many relevant features, a
    sparse one a few among many (see Notes).
    The inner problem is solved in closed form (a p x p Cholesky solve, or
    the n x n Woodbury form when ``p > n``), so the hypergradient is exact.

    Parameters
    ----------
    penalty : {"per_feature", "scalar"} or array-like of shape (n_features,), default="per_feature"
        One penalty per feature, a single shared one, or one per group of
        features given by a group id per feature.
    cv : int, cross-validation generator, iterable or "loo", default=5
        Outer objective. An int is the number of shuffled K folds (seeded by
        ``random_state``); a splitter or iterable of (train, test) indices is
        used as is; ``"loo"`` is the exact leave-one-out error. With
        ``penalty="scalar"`` it is computed in closed form from the hat
        matrix (``O(n p^2)`` per hypergradient when ``p <= n``,
        ``O(n^2 p + n^3)`` otherwise, as ``RidgeCV``). With several
        penalties every sample with a positive weight is a fold of its own,
        so that the adaptive model's pilot for it is fitted without it
        (with the hat matrix, the pilot would see every sample, and the
        penalties fitted the samples' noise: test R^2 -.18 against the
        shared penalty's .018 on a dense low-SNR truth, 200 x 100): ``n``
        fold problems, ``n p^2`` floats of Gram matrices (2000 x 200: 34 s
        and 640 MB, against 0.08 s with ``cv=5``; ``n^2 p`` with more
        features than samples), for small data: beyond 4 GiB a
        ``ValueError`` asks for an integer ``cv`` instead. The loss
        is the mean over folds of the (sample-weighted) mean squared error;
        hypergradients are averaged over folds.
    validation_fraction : float in (0, 1) or None, default=None
        If set, a single random holdout split of this fraction replaces
        ``cv`` (faster, but overfits more easily with many penalties).
    alpha_init : float > 0, array-like of shape (n_features,) or (n_groups,), or None, default=None
        ``None``: the shared penalty is found by scanning the validation
        curve, then refined. A float: that search starts there instead (no
        scan; its bracketing steps count in ``max_iter``), within the bounds
        the scan's search keeps (a float beyond them starts at the nearest
        bound); with several
        penalties it is the penalty of a feature of unit variance (see
        ``shared_alpha_``). An array: per-feature (or per-group) starting
        penalties in the units of ``X``, no shared stage (the prior is then
        centred on their mean log).
    adaptive : bool, default=True
        Fit the two-parameter adaptive model before the free per-feature
        corrections (and centre the prior on it). When no exponent of the
        scan beats the shared penalty with either pilot, the data do not
        support penalties that differ between features: the shared penalty
        is the answer and no free stage runs. ``False`` starts the free
        stage from the shared penalty, as does an array ``alpha_init``.
        Without the adaptive model nothing tells the free
        stage whether the data support differing penalties: with
        ``p >= n/2`` it can fit the folds' noise (dense truth, n = 200,
        p = 300: test R^2 .26 against the default's .67).
    prior_scale : float > 0, "auto" or None, default="auto"
        Standard deviation ``tau`` (natural-log units) of the Gaussian prior
        on the log-penalties around the adaptive model (around the shared
        penalty when there is no adaptive stage); its weight in the outer
        objective is ``1 / (2 n tau^2)``, with ``n`` the sum of
        ``sample_weight`` (integer weights count as repeated rows, so
        scaling every weight by ``c`` weakens the prior as ``c`` times the
        rows would). ``None`` removes the prior.
        ``"auto"`` is 8 around a shared penalty and, around the adaptive
        model, 0.2 times ``min(1, sqrt(n / (10 n_groups)))``: the corrections
        fit the folds' noise more than the data. Measured against ``tau =
        2`` (the earlier default): the benchmark sets score the same or
        better (hetero seeds 0 to 3 and wide seeds 1 to 5 within 1e-4,
        diabetes-poly2 .4318 against .4310; the classifier's digits
        log-loss .0975 against .1019), dense truths with p ~ n gain up to
        .04 in test R^2 (150 x 150: .404 against .371), and the fits take
        fewer outer iterations (hetero 0.074 -> 0.062 s, digits 1.6 ->
        1.1 s). Pruning an irrelevant feature gains about ``1 / (2 n)`` in
        this objective while moving its log-penalty by 5 to 10 units, so a
        small ``tau`` keeps the penalties near the centre; around a shared
        penalty it erases the gain (hetero test R^2 with ``adaptive=False``:
        .9716 at ``tau = 2``, .9720 at 8).
    hypergradient : str or HypergradientStrategy, default="closed_form"
        ``"closed_form"`` differentiates the exact solution; ``"cg"`` and
        ``"dense"`` (or any implicit strategy instance) use the implicit
        function theorem at that solution. ``"cg"`` is preconditioned by the
        exact inverse Hessian of the folds and solved to a relative residual
        of ``1e-8`` (``1e-5`` in float32; where rounding leaves more, in the
        energy norm: see
        :func:`skbilevel.hypergrad.solve_cg`). ``cv="loo"`` with
        ``penalty="scalar"`` needs ``"closed_form"``. An instance is copied
        for every fold batch of every fit: its state (a CG warm start) is
        never shared, and fit leaves it as it was.
    max_iter : int, default=100
        Maximum number of outer (hypergradient) iterations of each of the
        adaptive and per-feature stages; also caps the refinements of the
        shared stage when it is the answer (``penalty="scalar"``, or no later
        stage beats it; before the per-feature stages it takes one refinement
        after its scan, and searches from a float ``alpha_init`` to 1e-2 in
        ``log(alpha)`` in at most ``max_iter`` steps). An adaptive or
        per-feature stage that reaches it while its objective still falls by
        more than a relative ``tol`` raises a ``ConvergenceWarning`` (its
        best iterate is kept).
    tol : float, default=1e-5
        Stop when the outer objective has not improved by a relative
        ``tol`` for ``n_iter_no_change`` iterations (or L-BFGS's line search
        finds no decrease); the best iterate is kept. The hypergradient norm
        is not a criterion: in ``log(alpha)`` it is tiny wherever a penalty
        barely matters, yet still worth following. The per-feature stage
        does not start where a Newton step on its prior's curvature would
        gain less than ``tol`` (see the user guide).
    n_iter_no_change : int, default=3
        Patience of that criterion (3 gave the same test R^2 as 10 on the
        benchmark sets with about 40% fewer iterations; Adam wants more).
    learning_rate : float, default=0.1
        Length of the first L-BFGS step on the log-penalties (the line
        search takes over from there), or Adam's step size.
    outer_optimizer : {"lbfgs", "adam"}, default="lbfgs"
        Optimizer of the adaptive and per-feature stages. The objective is
        deterministic and its hypergradient exact, so L-BFGS needs several
        times fewer iterations than Adam. With ``"lbfgs"``, the adaptive
        model's two parameters take Newton steps instead, on the exact
        Hessian of the cross-validated loss
        (:meth:`~skbilevel.hypergrad.RidgeFolds.value_grad_hessian`,
        :func:`~skbilevel.hypergrad.minimize_newton`): 5 evaluations where
        L-BFGS took 12 along the same curved valley (hetero; 30 ridge
        factorizations per fit instead of 37).
    fit_intercept : bool, default=True
        Fit an unpenalized intercept.
    device : str or torch.device, default="cpu"
        ``"cpu"``, ``"cuda"``, ``"auto"``, ...
    dtype : str or dtype, default="float64"
    verbose : int, default=0
        Print the shared stage and show a progress bar for the outer loop.
    random_state : int, RandomState instance or None, default=None
        Seeds the K-fold shuffling (int ``cv``) or the holdout split.
    warm_start : bool, default=False
        Start from the previous fit's penalties (skipping the shared and the
        adaptive stages, whose results are kept) when the number of
        penalties is unchanged and the previous fit's answer has the
        parametrization this fit would descend in: per-feature corrections
        around an adaptive model with ``adaptive=True``, plain log-penalties
        with ``adaptive=False``. Otherwise (for instance when the previous
        fit kept the shared penalty) the fit starts afresh.
    n_jobs : int, default=None
        Fold batches computed in parallel threads (``None``: one batch, all
        folds in one batched torch computation, unless a
        ``joblib.parallel_config`` context sets ``n_jobs``; threads whatever
        its backend), at most one per CPU core
        (more only queue for the interpreter lock). The batches then take
        their steps separately, so the penalties can differ from
        ``n_jobs=None``'s within the solves' tolerance. Worth it only for
        large folds with torch on one thread: torch's own threads (by
        default one per core) parallelize the batched computation, and
        small fits pay for the extra batches (on two cores, hetero 0.065 s
        at ``None``, 0.091 s at 2).
    callbacks : list of callable or None, default=None
        Called with a :class:`skbilevel.hypergrad.OuterState` after each
        outer iteration; returning True stops.

    Attributes
    ----------
    alphas_ : ndarray of shape (n_features,)
        The penalty of every feature, in the units of ``X``.
    shared_alpha_ : float
        The shared penalty of the first stage (also that of the pilot fit of
        the adaptive model). With several penalties it is relative to the
        features' scales (see Notes; with one penalty it is ``alphas_[0]``,
        in the units of ``X``): feature ``j`` has ``shared_alpha_``
        times the (sample-weighted) mean squared deviation of its group, the
        penalty of ``Ridge`` on standardized data. The later stages start
        from it, floored at ``1e-4`` times the mean squared (centred) norm
        of the rescaled features (below that the fit does not depend on the
        penalties, so their hypergradients vanish). When they do not beat
        it, it is the answer, searched as closely as the single penalty of
        ``penalty="scalar"`` on standardized data.
    adaptive_params_ : ndarray of shape (2,) or None
        ``(a, gamma)`` of the adaptive model (``None`` when it was not
        used, or when the shared penalty validated better and was kept).
        ``alphas_`` is ``exp(a - gamma (log(u + eps) - c))`` times the
        exponentiated per-feature corrections, with ``u`` from the pilot
        fit on all the data.
    adaptive_pilot_ : {"ridge", "lasso", "lasso_low"} or None
        The pilot of the adaptive model: the ridge fit at the shared penalty
        (``"ridge"``), or a sparse, lasso-like pilot: the ridge fit
        reweighted ten times as adaptive ridge at ``gamma = 1/2``, either at
        the shared penalty (``"lasso"``) or at ``1e-4`` times the mean
        squared (centred) feature norm, where the folds nearly interpolate
        (``"lasso_low"``, a sparser pilot; the lasso's own penalty level is
        a hyperparameter, and with a shared penalty the ridge curve sets it
        too high on some fold draws: on the benchmark's wide set, test
        R^2 .954-.958 instead of .938-.941 on 4 of 8 draws). The sparse pilots
        are tried only with more features than training rows per fold.
        ``None`` with ``adaptive_params_``.
    coef_ : ndarray of shape (n_features,)
    intercept_ : float
    cv_loss_ : float
        Mean validation (or leave-one-out) squared error at ``alphas_``.
    n_iter_ : int
        Hypergradient iterations (shared-stage refinements plus outer steps).
    history_ : ndarray
        Outer objective along the fit: ``MSE / (2 MSE_shared)`` over the
        shared stage, then the adaptive and the per-feature stages (the
        latter with the prior term).
    hypergradient_info_ : dict
        Health record of the hypergradient at the fitted penalties.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Defined when ``X`` has string feature names.

    See Also
    --------
    BilevelRidgeCV : one shared penalty, optimized exactly.
    sklearn.linear_model.ARDRegression : per-feature precisions by evidence maximization.

    Notes
    -----
    With many penalties the validation data can be overfitted: a single
    holdout split with a free penalty per feature scored below plain
    ``RidgeCV``, and even the exact optimum of the 5-fold loss over free
    per-feature penalties scored below ``ARDRegression``. The default
    guards against it with K-fold averaging, the two-parameter adaptive
    model (two hyperparameters cannot overfit the folds, and its pilot is
    fitted on each fold's training part, so the cross-validation stays
    honest), a Gaussian prior holding the free corrections near that model
    with a weight that shrinks as ``1/n`` (and tightens below ten samples
    per correction), no free corrections when the adaptive model does not
    beat the shared penalty, and stopping when the objective stalls (the
    best iterate is kept); the shared penalty is kept unless the later
    stages beat it on the validation loss by more than one standard error of
    the folds' paired differences. See the module
    documentation for measured numbers.

    Sparse ``X`` (one-hot encoded categories, a term-document matrix)
    stays sparse with K-fold validation: the folds' Gram matrices, or their
    kernels in the Woodbury form, come from sparse products, and the rows
    are centred implicitly. With ``cv="loo"`` and ``penalty="scalar"`` (the
    hat-matrix formulas) it is made dense (beyond 4 GiB a ``ValueError``
    asks for an integer ``cv`` instead).

    Scales. With ``fit_intercept=True``, ``y`` and the features whose mean
    exceeds their standard deviation are centred in float64 before the data
    are cast to ``dtype`` (the shift goes into ``intercept_``), so offsets
    such as ``y + 1e8`` survive float32 (in sparse ``X`` such a column, more
    than half filled already, is stored filled in). A centred ``y`` whose root
    mean square lies outside ``[2^-20, 2^20]`` is divided by a power of two
    near it (exactly), so the fit does not depend on the scale of ``y``
    (``y * 1e-25`` or ``y * 1e15`` in float32). Values whose squares leave
    the range of ``dtype`` are a ``ValueError``. With several penalties the
    search runs on features rescaled to unit weighted variance (one factor
    per penalty group, that of the group's mean squared deviation): the
    model is the same (``alphas_`` and ``coef_`` are in the units of ``X``),
    but the fit does not depend on the features' units (multiplying a
    column by ``c`` divides its coefficient by ``c`` and multiplies its
    penalty by ``c^2``, to rounding), and on standardized data nothing
    changes. A shared penalty (``penalty="scalar"``) is the user's model, as
    for ``Ridge``: one penalty in the units of ``X``. Its solves run on ``X``
    divided by one common factor, so they do not depend on the data's
    overall scale either.

    Examples
    --------
    Three relevant features among twenty: the seventeen others get larger
    penalties (by about a decade on average).

    >>> import numpy as np
    >>> from skbilevel.linear_model import HyperL2Regressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(100, 20)
    >>> y = X[:, :3] @ np.array([3.0, -2.0, 1.0]) + 2 * rng.randn(100)
    >>> model = HyperL2Regressor(random_state=0).fit(X, y)
    >>> log_alpha = np.log10(model.alphas_)
    >>> bool(log_alpha[3:].mean() - log_alpha[:3].mean() > 0.5)
    True
    >>> round(model.score(X, y), 2)
    0.76
    """

    _name = "HyperL2Regressor"

    def __init__(
        self,
        penalty="per_feature",
        *,
        cv=5,
        validation_fraction=None,
        alpha_init=None,
        adaptive=True,
        prior_scale="auto",
        hypergradient="closed_form",
        max_iter=100,
        tol=1e-5,
        n_iter_no_change=3,
        learning_rate=0.1,
        outer_optimizer="lbfgs",
        fit_intercept=True,
        device="cpu",
        dtype="float64",
        verbose=0,
        random_state=None,
        warm_start=False,
        n_jobs=None,
        callbacks=None,
    ):
        self.penalty = penalty
        self.cv = cv
        self.validation_fraction = validation_fraction
        self.alpha_init = alpha_init
        self.adaptive = adaptive
        self.prior_scale = prior_scale
        self.hypergradient = hypergradient
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.learning_rate = learning_rate
        self.outer_optimizer = outer_optimizer
        self.fit_intercept = fit_intercept
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.random_state = random_state
        self.warm_start = warm_start
        self.n_jobs = n_jobs
        self.callbacks = callbacks

    def _pilot(self, problem, phi):
        with torch.no_grad():
            return problem.closed_form(phi)

    def _check_loo_memory(self, X, n_folds):
        """Refuse ``cv="loo"`` with several penalties where its one fold problem
        per sample would hold more than ``_LOO_MAX_BYTES``: a Gram matrix each
        (p <= n), or each fold's rows (dense, or sparse and their transpose),
        plus the folds' weight rows."""
        n, p = X.shape
        if p <= n:
            per_fold = p * p
        elif sp.issparse(X):
            per_fold = 4 * X.nnz  # values and indices of the rows and their transpose
        else:
            per_fold = n * p
        need = 8 * n_folds * (per_fold + 2 * n)
        if need > _LOO_MAX_BYTES:
            raise ValueError(
                f"cv='loo' with several penalties solves one ridge problem per sample "
                f"(so that the adaptive model's pilot for a sample does not see it), "
                f"which would hold about {need / 2**30:.1f} GiB here ({n_folds} samples, "
                f"{p} features; the limit is {_LOO_MAX_BYTES / 2**30:.0f} GiB). Use an "
                "integer cv (e.g. cv=10), or penalty='scalar' for leave-one-out in "
                "closed form."
            )

    def _nll(self, loss, base):
        # 0.5 * MSE / MSE_shared: the Gaussian per-sample NLL 0.5 * log(MSE) to first
        # order around the shared stage, but positive, so a relative tol applies
        return 0.5 * loss / base

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, **params):
        """Fit the penalties by hypergradient, then the model on all the data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            A sparse matrix stays sparse, except with ``cv="loo"`` and
            ``penalty="scalar"`` (see Notes).
        y : array-like of shape (n_samples,)
        sample_weight : float or array-like of shape (n_samples,), default=None
            Non-negative sample weights (in the inner and the validation losses).
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
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, supported=("float32", "float64"))
        check_callbacks(self.callbacks)
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse=["csr", "csc", "coo"],
            dtype=[np.float64, np.float32],
            y_numeric=True,
        )
        check_numeric_target(y, type(self).__name__)
        n, p = X.shape
        if n < 2:
            raise ValueError(
                f"{self._name} needs at least 2 samples to measure a validation error; "
                f"got n_samples={n}."
            )
        sw = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        _check_positive_weights(sw, self._name, dtype)
        n_eff = float(sw.sum())  # the prior's sample count (weights count as repeats)
        groups, n_groups = _groups_from_penalty(self.penalty, p)
        loo = isinstance(self.cv, str) and self.cv == "loo"
        if loo and self.validation_fraction is not None:
            raise ValueError("cv='loo' and validation_fraction cannot both be set.")
        # one shared penalty: the hat-matrix formulas (RidgeLOO). Several: one fold
        # per sample, so that the adaptive model's pilot of each is fitted without
        # it (the same error, with honest pilots: with the pilot fitted on all the
        # data, or no adaptive stage, the penalties fitted the samples' noise)
        closed_loo = loo and n_groups == 1
        if self._cg_by_name():
            # float32 stagnates near 1e-7 (200 x 30: 3.7e-8 to 1.4e-7, seven
            # ConvergenceWarnings on a fit that matched the closed form)
            strategy = get_strategy("cg", tol=1e-8 if dtype == torch.float64 else 1e-5)
        else:
            strategy = get_strategy(self.hypergradient)
        _refuse_unrolled(strategy, self.hypergradient, self._name)
        if closed_loo and strategy.name != "closed_form":
            raise ValueError(
                f"cv='loo' with one shared penalty is differentiated in closed form; "
                f"hypergradient={self.hypergradient!r} needs validation folds. Use "
                "hypergradient='closed_form', per-feature penalties or an integer cv."
            )
        if closed_loo and sp.issparse(X):
            # the hat-matrix formulas densify X: refuse before toarray runs out of
            # memory (a 200000 x 50000 term-document matrix: 75 GiB)
            need = X.shape[0] * X.shape[1] * torch.finfo(dtype).bits // 8
            if need > _LOO_MAX_BYTES:
                raise ValueError(
                    f"cv='loo' with penalty='scalar' uses the hat-matrix formulas, which "
                    f"make sparse X dense: {need / 2**30:.3g} GiB here ({X.shape[0]} x "
                    f"{X.shape[1]}; the limit is {_LOO_MAX_BYTES / 2**30:.0f} GiB). Use an "
                    "integer cv (e.g. cv=10): K-fold validation keeps X sparse."
                )

        # sparse X stays sparse in the K-fold problems (RidgeFolds: Gram matrices
        # or kernels from sparse products); the leave-one-out formulas are dense
        Xc, yc, x_offset, y_offset = _offsets(X, y, sw, self.fit_intercept)
        _check_magnitudes(Xc, yc, dtype, self._name, headroom=1.0)
        # y near unit scale (a power of two: exact; see _target_scale)
        y_scale = _target_scale(yc)
        Xt = to_tensor(Xc, device=device, dtype=dtype, keep_sparse=not closed_loo)
        yt = to_tensor(yc / y_scale, device=device, dtype=dtype)
        swt = to_tensor(sw, device=device, dtype=dtype)
        gt = torch.as_tensor(groups, device=device)
        Xt, scales, factors = self._equalize_scales(X, Xt, swt, gt, n_groups)

        with core_warnings_as_sklearn(), _fold_pool(self.n_jobs) as pool:
            if closed_loo:
                problem = RidgeLOO(
                    Xt, yt, swt, groups=gt, fit_intercept=self.fit_intercept
                )
                objective = _FoldObjective(
                    [problem],
                    1,
                    None,
                    lambda b, phi: b.value_and_grad(phi),
                    lambda b, g: b.validation_curve(g),
                    # each sample its own fold, for the one-standard-error rule
                    fold_values=lambda b, phi, _: b.residuals(phi).square(),
                )
            else:
                if loo:  # every sample with a positive weight is a fold of its own
                    pos = np.flatnonzero(sw > 0)
                    self._check_loo_memory(X, len(pos))
                    splits = [(np.setdiff1d(pos, [i]), np.array([i])) for i in pos]
                else:
                    splits = self._splits(X, y, split_params)
                T, V = self._fold_weights(splits, sw, n, Xt)
                # leave-one-out's many folds in batches of bounded temporaries: a
                # fold's Gram matrix (twice, while they are formed) or scaled rows
                # and kernel. (K-fold keeps one batch: a batch of one fold forms
                # its Gram matrix from all its rows, not as all rows' less the
                # left-out ones')
                fold_bytes = 8 * (2 * p * p if p <= n else n * p + n * n) if loo else 0
                batches = [
                    RidgeFolds(
                        Xt,
                        yt,
                        T[idx],
                        V[idx],
                        groups=gt,
                        fit_intercept=self.fit_intercept,
                    )
                    for idx in self._batches(len(splits), fold_bytes)
                ]
                # a strategy of its own per fold batch (see _own_strategy), kept by
                # the batch's reparametrized copies (they share its training weights)
                strategies = {id(b.train_weights): _own_strategy(strategy) for b in batches}
                objective = _FoldObjective(
                    batches,
                    len(splits),
                    pool,
                    # (with the folds' coefficients, for fold_values)
                    lambda b, phi: b.value_and_grad(
                        phi, hypergradient=strategies[id(b.train_weights)]
                    ),
                    lambda b, g, phi=None: b.validation_curve(g, phi),
                    lambda b, phi: b.validation_loss(b.closed_form(phi)),
                    lambda b, phi: b.value_grad_hessian(phi),
                    _ridge_fold_losses,
                )
            scale = _penalty_scale(scales)
            phi, shared, center, history, n_iter, info, objective = self._run_outer(
                objective, n_groups, n_eff, scale, groups, dtype, device, factors
            )
            # the folds' all-rows Gram matrix serves the final fit (K-fold layouts)
            full = self._final_problem(
                RidgeFolds(Xt, yt, swt, groups=gt, fit_intercept=self.fit_intercept)
                if closed_loo
                else batches[0].all_rows(swt),
                gt,
                dtype,
                device,
            )
            with torch.no_grad():
                alphas = full._alpha(phi)
                coef = full.coef(alphas)
                intercept = full.intercepts(coef)
            # inside the pool's block: the CV loss at phi may need the folds again
            self._set_common(
                phi, shared, center, history, n_iter, info, objective, alphas, factors
            )
        self.coef_ = to_numpy(coef[0]).astype(np.float64) * y_scale
        if factors is not None:  # back to the user's units (see _equalize_scales)
            self.coef_ /= np.sqrt(to_numpy(factors))
        self.intercept_ = (
            float(intercept[0]) * y_scale + y_offset - float(x_offset @ self.coef_)
            if self.fit_intercept
            else 0.0
        )
        self.cv_loss_ *= y_scale * y_scale
        return self

    def predict(self, X):
        """Predict with the fitted linear model.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=["csr", "csc", "coo"], reset=False)
        return safe_sparse_dot(X, self.coef_, dense_output=True) + self.intercept_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags


class HyperL2Classifier(LinearClassifierMixin, ClassifierMixin, _HyperL2Base):
    """Logistic regression with one L2 penalty per feature, fitted by hypergradient.

    Binary or multinomial logistic regression,
    ``min_{W,b} sum_i s_i CE(x_i W + b, y_i) + 1/2 sum_j alpha_j ||W_j||^2``
    (``alpha = 1 / C`` of scikit-learn's ``LogisticRegression``), with the
    penalties chosen to minimize the cross-validated log-loss: a shared
    penalty first, then the two-parameter adaptive model (the pilot is the
    per-feature norm, over classes, of the shared-penalty solution), then a
    correction per feature (or group), all by hypergradient descent (see
    :class:`HyperL2Regressor` and the module documentation).
    The inner problems of all folds are solved together to a gradient
    tolerance (L-BFGS or Newton-CG, warm-started between outer iterations)
    and differentiated implicitly (conjugate gradient on Hessian-vector
    products) through :func:`skbilevel.hypergrad.argmin`.

    Parameters
    ----------
    penalty : {"per_feature", "scalar"} or array-like of shape (n_features,), default="per_feature"
        One penalty per feature, a single shared one, or one per group.
    cv : int, cross-validation generator or iterable, default=5
        Outer objective: an int is the number of shuffled stratified folds
        (seeded by ``random_state``). The loss is the mean over folds of
        the sample-weighted mean log-loss; hypergradients are averaged.
    validation_fraction : float in (0, 1) or None, default=None
        If set, a single stratified holdout split replaces ``cv``.
    alpha_init : float > 0, array-like or None, default=None
        As for :class:`HyperL2Regressor`. The search's lower bound is the
        scan's: ``1e-4`` times the mean over features of their (weighted)
        sums of squared centred values (lower when these differ between
        features). Below it, the inner solves of nearly separable folds
        are too loose to compare penalties.
    adaptive : bool, default=True
        Fit the two-parameter adaptive model before the per-feature
        corrections (as for :class:`HyperL2Regressor`). On the benchmark
        splits it lowered the test log-loss on digits (.1042 -> .1018) and
        make_classification (.4812 -> .4716), at 1.6 to 2.2 times the fit time.
    prior_scale : float > 0, "auto" or None, default="auto"
        Standard deviation of the Gaussian prior on the log-penalties around
        the adaptive model (around the shared penalty when
        ``adaptive=False``; weight ``1 / (2 n tau^2)``, ``n`` the sum of
        ``sample_weight`` as for :class:`HyperL2Regressor`); ``None`` removes
        it.
        ``"auto"`` is 1 around a shared penalty and 0.2, times ``min(1,
        sqrt(n / (10 n_groups)))``, around the adaptive model (as for
        :class:`HyperL2Regressor`: digits' test log-loss .0975 against
        .1019 at 1, in two thirds of the time).
    hypergradient : str or HypergradientStrategy, default="cg"
        An implicit strategy: ``"cg"`` (conjugate gradient to a relative
        residual of ``1e-2``, warm-started between outer iterations: an outer
        step needs a direction, not ten digits; at ``1e-4`` digits' adjoint
        solves took 57 to 107 iterations instead of 9 to 47, for the same test
        log-loss), ``"dense"``, or an instance (e.g. ``ImplicitCG(tol=1e-8)``,
        with its own settings; copied for every fold batch of every fit, as
        for :class:`HyperL2Regressor`).
    solver : {"newton-cg", "lbfgs"} or InnerSolver, default="newton-cg"
        Inner solver. Newton-CG copes better with the nearly separable
        problems small penalties create; L-BFGS, preconditioned by the
        Hessian diagonal, reached the same test log-loss on the benchmark
        sets at 2 to 3.7 times the fit time. A string solves the folds (each
        fold's objective its mean training loss) to a Euclidean gradient norm
        of ``1e-3`` over all their coefficients, with at least one iteration
        per solve, and the returned model to ``1e-6`` (``1e-4`` in float32);
        see the user guide for the measurements behind these tolerances.
        An instance is used as given, for the folds and the returned model.
    max_iter : int, default=100
        Maximum number of outer (hypergradient) iterations of each of the
        adaptive and per-feature stages; also caps the refinements of the
        shared stage when it is the answer (``penalty="scalar"``, or no later
        stage beats it; before the per-feature stages it takes the best point
        of its grid as is, and refines it only if it is the answer: each
        refinement solves the folds again, and the stages that follow move
        the level anyway). A stage
        stopped by it is a ``ConvergenceWarning``, as for
        :class:`HyperL2Regressor`.
    tol : float, default=3e-4
        Stop when the outer objective has not improved by a relative
        ``tol`` for ``n_iter_no_change`` iterations; the best iterate is kept
        (and the per-feature stage does not start where it cannot gain
        ``tol``, as for :class:`HyperL2Regressor`).
        Looser than the regressor's ``1e-5``: the classifier's outer values
        are only as exact as its inner solves, and closer steps chase that
        noise (``1e-4`` and a patience of 3 gave the same test log-loss on
        the benchmark sets and 8 others, to 1e-4, at up to 1.4 times the
        time).
    n_iter_no_change : int, default=2
        Patience of that criterion.
    learning_rate : float, default=0.1
        Length of the first L-BFGS step on the log-penalties, or Adam's
        step size.
    outer_optimizer : {"lbfgs", "adam"}, default="lbfgs"
        Optimizer of the per-feature stage (see :class:`HyperL2Regressor`).
    fit_intercept : bool, default=True
    class_weight : dict, "balanced" or None, default=None
        Weights multiplying ``sample_weight`` per class, in the inner and the
        validation losses. ``"balanced"`` gives class ``c`` the weight
        ``W / (n_classes W_c)``, ``W_c`` its total ``sample_weight`` (its
        count without weights) and ``W`` theirs, as ``LogisticRegression``.
    device : str or torch.device, default="cpu"
    dtype : str or dtype, default="float64"
        Precision of the fit. In float64 with ``hypergradient="cg"``, the
        folds' Hessian-vector products (conjugate gradient's directions) run
        in float32, with half the memory traffic; gradients, losses and
        solutions stay in float64 (see ``LogisticFolds``' ``hvp_dtype``).
        Positive sample weights outside ``(1e-20, 1e20)``, and features
        outside the range ``dtype="float32"`` accepts, keep float64 products
        (float32 would under- or overflow), and so do dense problems whose
        products are small (fewer than 250,000 entries: rows times features
        times classes, 1 for a binary problem, times folds). There the casts
        cost what float32 saves, and with float64 products integer sample
        weights give the fit of repeated rows, to rounding (float32 rounds
        the two differently).
    verbose : int, default=0
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    n_jobs : int, default=None
        Fold batches solved in parallel threads (see
        :class:`HyperL2Regressor`). Measured on two cores with torch on one
        thread: only large multinomial folds gain (5 classes, 16000 x 60:
        1.5 s at 2 against 2.0 s at ``None``); binary 32000 x 60 took
        1.2 against 1.16 s, digits 0.97 against 0.88 s. Torch's own two
        threads (``torch.set_num_threads(2)``, ``n_jobs=None``) did as well
        or better on all three: 1.5, 1.05 and 0.64 s.
    callbacks : list of callable or None, default=None

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    alphas_ : ndarray of shape (n_features,)
    shared_alpha_ : float
    adaptive_params_ : ndarray of shape (2,) or None
        ``(a, gamma)`` of the adaptive model, as for :class:`HyperL2Regressor`.
    adaptive_pilot_ : "ridge" or None
        The pilot of the adaptive model: the logistic fit at the shared
        penalty (the regressor's sparse, reweighted pilot is not tried: each
        reweighting is a logistic solve per fold, and on the benchmark sets
        it was never chosen while it doubled the fit time).
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
        Multinomial intercepts are centred (they are defined up to a shift).
    cv_loss_ : float
        Mean validation log-loss at ``alphas_``.
    n_iter_ : int
    history_ : ndarray
    hypergradient_info_ : dict
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (``n_features_in_``,)

    See Also
    --------
    sklearn.linear_model.LogisticRegressionCV : one shared penalty from a grid.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skbilevel.linear_model import HyperL2Classifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = HyperL2Classifier(max_iter=20, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape, clf.alphas_.shape
    ((2, 3), (4,))
    >>> bool(clf.score(X, y) > 0.9)
    True
    """

    _name = "HyperL2Classifier"
    _auto_prior_scale = {False: 1.0, True: 0.2}
    # the ridge pilot only: a reweighting is a logistic solve per fold (see
    # adaptive_pilot_)
    _pilots = {"ridge": ("shared", 0)}
    _grid_points_per_decade = 1
    _grid_decades = (-4.0, 1.0)
    # the best grid point as is: each refinement solves the folds and a linear
    # system, and the stages that follow move the level anyway (it is refined
    # when it turns out to be the answer). Test log-loss, refined -> grid
    # point: digits .0975 -> .0972, make_classification .4717 -> .4716, and
    # within 2e-3 either way on 9 synthetic sets; digits 1.14 -> 0.92 s
    _refine_shared = False
    # 1e-2 in log(alpha) (1% in alpha), not the regressor's 1e-3: the folds'
    # loose inner solves (tol 1e-3) and CG (1e-2) leave a hypergradient noise
    # that a step below 1e-2 only chases. breast_cancer's refinement took 8
    # evaluations for 1e-3, the last five moving the CV log-loss by 2e-7
    # relative, with slopes of either sign between 0.039 and 0.048 (now 3)
    _shared_tol = 1e-2

    _parameter_constraints: dict = {
        **_HyperL2Base._parameter_constraints,
        "cv": ["cv_object"],
        "solver": [StrOptions({"lbfgs", "newton-cg"}), InnerSolver],
        "class_weight": [dict, StrOptions({"balanced"}), None],
    }

    def __init__(
        self,
        penalty="per_feature",
        *,
        cv=5,
        validation_fraction=None,
        alpha_init=None,
        adaptive=True,
        prior_scale="auto",
        hypergradient="cg",
        solver="newton-cg",
        max_iter=100,
        tol=3e-4,
        n_iter_no_change=2,
        learning_rate=0.1,
        outer_optimizer="lbfgs",
        fit_intercept=True,
        class_weight=None,
        device="cpu",
        dtype="float64",
        verbose=0,
        random_state=None,
        warm_start=False,
        n_jobs=None,
        callbacks=None,
    ):
        self.penalty = penalty
        self.cv = cv
        self.validation_fraction = validation_fraction
        self.alpha_init = alpha_init
        self.adaptive = adaptive
        self.prior_scale = prior_scale
        self.hypergradient = hypergradient
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.learning_rate = learning_rate
        self.outer_optimizer = outer_optimizer
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.device = device
        self.dtype = dtype
        self.verbose = verbose
        self.random_state = random_state
        self.warm_start = warm_start
        self.n_jobs = n_jobs
        self.callbacks = callbacks

    def _pilot(self, problem, phi):
        # coefficient size per feature: the norm over classes of the solution
        with torch.no_grad():
            theta, _ = problem.solve(phi, self._inner_solver(problem.X.dtype))
            return theta["coef"].square().sum(-1).sqrt().T  # (n_folds, p)

    def _inner_solver(self, dtype, final=False):
        if isinstance(self.solver, InnerSolver):
            return self.solver
        # The folds' objective is the sum over folds of each fold's mean training
        # loss (LogisticFolds divides by the mean training weight): a Euclidean
        # gradient norm of 1e-3 over all folds' coefficients (3245 on digits) is
        # about 2e-5 per coefficient, where LogisticRegressionCV stops at a
        # largest entry of 1e-4 of its mean loss's gradient. Looser (1e-2),
        # inexact fits regularize like early stopping and the shared scan chose a penalty ten
        # times too small (digits' test log-loss .097 -> .114). At least one
        # iteration per solve: warm-started from a nearby penalty's solution, the
        # start often meets the tolerance already, and an outer step would see no
        # change (digits at 3e-3 without it: .103). Against 1e-4 before, with the
        # looser adjoint solves of _strategy: digits 1.09 -> 0.62 s, and on 8
        # splits of 7 sets (iris, wine, breast_cancer, digits, 3 synthetic) the
        # mean test log-loss lower on 5 (iris .0888 -> .0855), within 3e-5 on
        # the other 2. The returned model: 1e-6
        # (1e-8 before moved no test log-loss in its fifth digit). A solve this
        # loose ends wherever its warm start leads: the outer descents compare
        # values corrected to the exact solutions (value_and_grad, through
        # HypergradientInfo.value_correction); raw, they moved by as much as a
        # step gains and the line searches bisected on that (53 fold
        # evaluations on a digits split, 14 corrected).
        if final:
            tol = 1e-6 if dtype == torch.float64 else 1e-4
            min_iter = 0
        else:
            tol, min_iter = 1e-3, 1
        if self.solver == "newton-cg":
            return NewtonCG(tol=tol, max_iter=100, min_iter=min_iter)
        return LBFGS(tol=tol, max_iter=1000, min_iter=min_iter)

    def _fold_mean(self, starts):
        """The mean over folds of the batches' solutions ``starts`` (from
        :meth:`_FoldObjective.warm_starts`), shaped for one fold: a start for
        a fit on all the data (``None`` if a batch has none)."""
        if not starts or any(t is None for t in starts):
            return None
        mean = {"coef": torch.cat([t["coef"] for t in starts], 1).mean(1, keepdim=True)}
        if self.fit_intercept:
            mean["intercept"] = torch.cat([t["intercept"] for t in starts]).mean(
                0, keepdim=True
            )
        return mean

    def _strategy(self):
        """A fresh strategy per fold batch (CG warm starts must not mix batches)."""
        if self._cg_by_name():
            # an outer step needs a direction, not 10 digits: a relative residual
            # of 1e-2 (1e-4 before: digits' adjoint solves took 57-107 CG
            # iterations, now 9-47, with the same test log-loss)
            return get_strategy("cg", tol=1e-2, warm_start=True)
        # (an instance: a copy of its own, see _own_strategy)
        return _own_strategy(self.hypergradient)

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y, sample_weight=None, **params):
        """Fit the penalties by hypergradient, then the model on all the data.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            A sparse matrix stays sparse: the folds' products with it cost in
            proportion to its nonzeros.
        y : array-like of shape (n_samples,)
        sample_weight : float or array-like of shape (n_samples,), default=None
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
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, supported=("float32", "float64"))
        check_callbacks(self.callbacks)
        X, y = validate_data(
            self,
            X,
            y,
            accept_sparse=["csr", "csc", "coo"],
            dtype=[np.float64, np.float32],
        )
        check_classification_targets(y)
        encoder = LabelEncoder()
        y_idx = encoder.fit_transform(y)
        classes = encoder.classes_
        if len(classes) < 2:
            raise ValueError(
                f"{self._name} needs samples of at least 2 classes; the data contain only "
                f"one class: {classes[0]!r}."
            )
        n, p = X.shape
        sw = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        n_eff = float(sw.sum())  # the prior's sample count (weights count as repeats)
        if isinstance(self.class_weight, str):  # "balanced"
            # from the weighted class counts, as LogisticRegression (scikit-learn
            # >= 1.7): counts of rows left classes unbalanced by their weights
            # (two classes of equal size, one weighted 3: class weights 1 and 1
            # instead of 2/3 and 2), and integer weights unlike repeated rows
            counts = np.bincount(y_idx, weights=sw, minlength=len(classes))
            cw = np.divide(
                counts.sum(), len(classes) * counts, out=np.zeros_like(counts),
                where=counts > 0,
            )
            sw = sw * cw[y_idx]
        elif self.class_weight is not None:
            cw = compute_class_weight(self.class_weight, classes=classes, y=y)
            # (a negative or NaN class weight failed as 'sample_weight sums to
            # zero on the training samples of fold 0 ... Shuffle the folds', an
            # infinite one as 'train_weights must be finite', all zeros in numpy's
            # 'Weights sum to zero, can't be normalized')
            bad = ~(np.isfinite(cw) & (cw >= 0))
            if bad.any():
                raise ValueError(
                    f"{self._name}: class_weight must give every class a finite weight "
                    f">= 0; got {dict(zip(classes[bad].tolist(), cw[bad].tolist()))}."
                )
            sw = sw * cw[y_idx]
            if np.count_nonzero(sw > 0) < 2 or len(np.unique(y_idx[sw > 0])) < 2:
                raise ValueError(
                    f"{self._name}: class_weight {self.class_weight!r} leaves fewer than "
                    "2 classes with a positive weight; give at least 2 classes a "
                    "weight > 0."
                )
        _check_positive_weights(sw, self._name, dtype)
        groups, n_groups = _groups_from_penalty(self.penalty, p)
        strategy = get_strategy(self.hypergradient)
        if strategy.family != "implicit":
            raise ValueError(
                f"hypergradient={self.hypergradient!r} is of the {strategy.family!r} family; the "
                "classifier's inner problem is solved iteratively and differentiated "
                "implicitly. Use 'cg', 'dense' or another implicit strategy."
            )
        solver = self._inner_solver(dtype)

        # sparse data stay sparse: the folds' products with X cost in proportion to
        # its nonzeros (a 1000 x 5000 matrix of 1% density: 0.08 against 7 ms)
        Xc, _, x_offset, _ = _offsets(X, None, sw, self.fit_intercept)
        # the shared search and the per-feature box reach about 1e18 times the
        # mean feature scale: the logistic solves failed from 1e7 below the
        # largest float (X * 1e150 in float64, X * 1e15 in float32), and from
        # squares within 10 of the smallest normal one (X * 1e-19 in float32)
        _check_magnitudes(Xc, None, dtype, self._name, headroom=1e10, floor=1e4)
        Xt = to_tensor(Xc, device=device, dtype=dtype, keep_sparse=True)
        yt = torch.as_tensor(y_idx, device=device)
        swt = to_tensor(sw, device=device, dtype=dtype)
        gt = torch.as_tensor(groups, device=device)
        Xt, scales, factors = self._equalize_scales(X, Xt, swt, gt, n_groups)
        n_classes = len(classes)

        with core_warnings_as_sklearn(), _fold_pool(self.n_jobs) as pool:
            splits = self._splits(X, y_idx, split_params)
            T, V = self._fold_weights(splits, sw, n, Xt)
            # float64 fits with the default strategy run their Hessian-vector
            # products (conjugate gradient's directions, to relative residuals of
            # 1e-2) in float32: half the memory streamed per product (a wide
            # binary fit, 500 x 2000: 3.4 -> 2.2 s; digits 0.57 -> 0.50 s). Any
            # other strategy may ask for residuals float32 products cannot reach
            # (about 1e-7): float64 products then. Sparse X keeps its own: its
            # products stream int64 indices (1500 x 5000 at 1%: no gain)
            low = dtype == torch.float64 and self._cg_by_name() and Xt.layout == torch.strided
            # ... and with weights float32 holds with room to spare (sample weights
            # of 1e40 or 1e-200 gave NaN products: 'invalid value encountered in
            # matmul', CG stopped at p^T A p = nan)
            positive = sw[sw > 0]
            low = low and 1e-20 < positive.min() and positive.max() < 1e20
            # ... and X as well: the range a float32 fit accepts (X * 1e100 in
            # float64 cast to float32 is inf: 5438 'invalid value encountered in
            # matmul' RuntimeWarnings, X * 1e-100 is 0: 73 and CG stopped at
            # p^T A p = nan)
            if low:
                _, big, small = _out_of_range(Xc, torch.float32, headroom=1e10, floor=1e4)
                low = not (big.any() or small.any())
            # ... and only where the products are large enough to gain: below about
            # 2.5e5 entries the casts cost what float32 saves (f64 / f32 fit time,
            # alternating fits: iris 0.96, wine 0.95, breast_cancer 1.00, 4 classes
            # 300 x 20 0.98; 5 classes 500 x 30 1.05, 6 classes 1000 x 50 1.08, digits
            # 1.30), and float64 products keep integer weights equivalent to
            # repeated rows (float32 rounds the two differently: predicted
            # probabilities 1.5e-3 apart, relative, on scikit-learn's check)
            n_out = 1 if n_classes == 2 else n_classes
            entries = Xt.shape[0] * Xt.shape[1] * n_out * len(splits)
            low = low and entries >= _LOW_PRECISION_MIN_ENTRIES
            hvp_dtype = torch.float32 if low else None
            batches = [
                LogisticFolds(
                    Xt,
                    yt,
                    n_classes,
                    T[idx],
                    V[idx],
                    groups=gt,
                    fit_intercept=self.fit_intercept,
                    hvp_dtype=hvp_dtype,
                )
                for idx in self._batches(len(splits))
            ]
            # one strategy per fold batch, whatever its penalty model (the stages
            # reparametrize copies that share its training weights): its CG warm
            # start follows that batch through the fit and never mixes batches.
            # (Keyed by the id of the batch object itself, a copy could reuse a
            # dead copy's id, and fits differed from run to run by 4e-5.)
            strategies = {id(b.train_weights): self._strategy() for b in batches}
            objective = _FoldObjective(
                batches,
                len(splits),
                pool,
                lambda b, phi: b.value_and_grad(
                    phi, hypergradient=strategies[id(b.train_weights)], solver=solver
                )[:3],
                lambda b, g: b.validation_curve(g, solver=solver),
                lambda b, phi: b.validation_loss(b.solve(phi, solver)[0]),
                # the exact Hessian (binary problems): Newton steps for the adaptive model
                (lambda b, phi: b.value_grad_hessian(phi, solver)) if n_classes == 2 else None,
                lambda b, phi, _: b.fold_losses_at(phi, solver),
            )
            scale = _penalty_scale(scales)
            # the smallest scale of a feature that varies: the shared grid's low end
            varying = scales[scales > 1e-12 * scale]
            low_scale = float(varying.min()) if len(varying) else scale
            phi, shared, center, history, n_iter, info, objective = self._run_outer(
                objective, n_groups, n_eff, scale, groups, dtype, device, factors,
                low_scale,
            )
            full = LogisticFolds(
                Xt,
                yt,
                n_classes,
                swt,
                groups=gt,
                fit_intercept=self.fit_intercept,
                hvp_dtype=hvp_dtype,
            )
            if self.adaptive_params_ is not None:
                # its pilot starts from the folds' (digits: 9 Newton iterations from 0)
                full.theta_ = self._fold_mean(self._pilot_starts)
            full = self._final_problem(full, gt, dtype, device)
            init = self._fold_mean(objective.warm_starts())
            theta, _ = full.solve(phi, self._inner_solver(dtype, final=True), init=init)
            with torch.no_grad():
                alphas = full._alpha(phi)
            # inside the pool's block: the CV loss at phi may need the folds again
            self._set_common(
                phi, shared, center, history, n_iter, info, objective, alphas, factors
            )
        W = to_numpy(theta["coef"][:, 0]).astype(np.float64)  # (p, n_out)
        if factors is not None:  # back to the user's units (see _equalize_scales)
            W /= np.sqrt(to_numpy(factors))[:, None]
        self.coef_ = W.T.copy()
        if self.fit_intercept:
            b = to_numpy(theta["intercept"][0]).astype(np.float64)
            if n_classes > 2:
                b = np.append(b, 0.0)
            # the fit saw X less x_offset
            b = b - self.coef_ @ x_offset
            if n_classes > 2:
                b = b - b.mean()
            self.intercept_ = b
        else:
            self.intercept_ = np.zeros(self.coef_.shape[0])
        self.classes_ = classes
        return self

    def predict_proba(self, X):
        """Class probabilities.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        scores = self.decision_function(X)
        if scores.ndim == 1:
            pos = expit(scores)
            return np.column_stack([1.0 - pos, pos])
        return softmax(scores.copy())

    def predict_log_proba(self, X):
        """Logarithm of :meth:`predict_proba`."""
        return np.log(self.predict_proba(X))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True
        return tags
