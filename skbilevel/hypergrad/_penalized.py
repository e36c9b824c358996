"""L2-penalized linear models with one penalty per feature (or group), fold-batched.

The outer variable is ``phi``, one log-penalty per group of features
(``alpha_j = exp(phi[groups[j]])``; one group per feature, a single group,
or any grouping). Three problems, all differentiable in ``phi``:

- :class:`RidgeFolds`: ridge regression fitted on K training subsets at
  once (the training parts of K cross-validation folds, or the whole data),
  a :class:`~skbilevel.hypergrad.ClosedFormSolver` for the ``closed_form``
  strategy and an exact inner solver for the implicit ones;
- :class:`RidgeLOO`: the exact leave-one-out error of ridge with a diagonal
  penalty, in closed form (Cholesky-free primal solve when ``p <= n``,
  Woodbury / dual form when ``p > n``);
- :class:`LogisticFolds`: binary or multinomial logistic regression on K
  training subsets, solved to a tolerance and differentiated implicitly.

A fold is a vector of sample weights over the ``n`` samples (zero outside
the fold), so K folds share one copy of ``X`` and their problems are solved
as one batched problem: fewer, larger torch operations. The folds are
independent, so the batched inner objective is the sum of the fold
objectives and its Hessian is block diagonal.

Each problem has ``value_and_grad(phi)``: the validation loss summed over
folds and its hypergradient, through :func:`~skbilevel.hypergrad.argmin`
with any strategy. :func:`attach_gradient` turns a value and a gradient
computed elsewhere (another thread, another fold batch) back into a tensor
whose ``backward`` delivers that gradient, so folds can be spread over
workers and still drive :func:`~skbilevel.hypergrad.minimize_outer`.
"""

import copy
import functools
import math
import warnings

import numpy as np
import torch

from ._base import ClosedFormSolver, HypergradientInfo, InnerSolveWarning, argmin
from ._checks import _check_positive
from ._closed_form import (
    ClosedForm,
    _check_finite_X,
    _check_loo_samples,
    _check_ridge_data,
    _check_tensors,
    _cholesky_ex,
    _deflate,
    _gram,
    _integral,
    _intercept_reflection,
    _matmul,
    _reflect,
    _use_numpy,
)
from ._solvers import LBFGS, _FixedPhi
from ._sparse import csr_rows, csr_tensor, csr_transpose, csr_with_values, to_csr, to_scipy
from ._tree import _detach_graph, tree_detach

__all__ = [
    "RidgeFolds",
    "RidgeLOO",
    "LogisticFolds",
    "attach_gradient",
    "penalty_per_feature",
    "adaptive_penalty_basis",
]


def penalty_per_feature(phi, groups):
    """``exp(phi)`` broadcast to one penalty per feature: ``exp(phi)[groups]``.

    Parameters
    ----------
    phi : tensor of shape (n_groups,)
        Log-penalties.
    groups : long tensor of shape (n_features,)
        Group index ``0..n_groups-1`` of every feature (integer values).

    Returns
    -------
    tensor of shape (n_features,)

    Raises
    ------
    TypeError
        If ``phi`` is not a torch tensor.
    ValueError
        If ``phi`` is not 1-D, or ``groups`` holds a negative, non-integer or
        too large (``>= len(phi)``) label.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import penalty_per_feature
    >>> penalty_per_feature(torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 1])).tolist()
    [1.0, 2.718281..., 2.718281...]
    """
    # validated here, in the public function only: the fold problems index
    # with groups checked once at construction (_LogPenalty). Unchecked, a
    # label -1 took the last group's penalty silently, and a label >= len(phi)
    # or a float label failed inside torch (IndexError)
    _check_tensors("penalty_per_feature", phi=phi)
    if phi.ndim != 1:
        raise ValueError(
            f"penalty_per_feature: phi must be 1-D, one log-penalty per group; "
            f"got shape {tuple(phi.shape)}."
        )
    groups = torch.as_tensor(groups, device=phi.device)
    groups = _check_groups(groups, groups.numel(), phi.device)
    if groups.numel() and int(groups.max()) >= phi.shape[0]:
        raise ValueError(
            f"penalty_per_feature: groups must be labels in [0, {phi.shape[0]}), one "
            f"per entry of phi; got a label {int(groups.max())}."
        )
    return phi.exp()[groups]


def attach_gradient(value, grad, phi):
    """A scalar tensor equal to ``value`` whose gradient in ``phi`` is ``grad``.

    ``value + <phi, grad> - <phi.detach(), grad>``: the forward value is
    unchanged and ``backward`` adds ``grad`` to ``phi.grad``. Used to hand
    hypergradients computed outside the current graph (fold batches run in
    worker threads) to :func:`~skbilevel.hypergrad.minimize_outer`.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import attach_gradient
    >>> phi = torch.zeros(2, requires_grad=True)
    >>> out = attach_gradient(torch.tensor(3.0), torch.tensor([1.0, -1.0]), phi)
    >>> out.backward()
    >>> float(out.detach()), phi.grad.tolist()
    (3.0, [1.0, -1.0])
    """
    grad = grad.detach().to(phi)
    value = torch.as_tensor(value).detach().to(phi)
    return value + (phi * grad).sum() - (phi.detach() * grad).sum()


def _check_groups(groups, n_features, device):
    if groups is None:
        return torch.arange(n_features, device=device)
    groups = torch.as_tensor(groups, device=device)
    integral = _integral(groups)
    groups = groups.long()
    if (
        groups.shape != (n_features,)
        or not integral
        or (n_features and int(groups.min()) < 0)
    ):
        raise ValueError(
            f"groups must hold {n_features} non-negative integers (one per feature); "
            f"got shape {tuple(groups.shape)}"
            f"{'' if integral else ' with non-integer values'}."
        )
    return groups


def adaptive_penalty_basis(coef, groups=None, eps=1e-3):
    """Basis of the adaptive-ridge model of the log-penalties, from pilot coefficients.

    The model (one per fold ``k``) has two parameters, ``phi = (a, gamma)``::

        log alpha_kj = a - gamma * (log(u_kg + eps) - c_k),
        u_kg = mean_{j in g} w_kj^2 / mean_{g'} (mean_{j in g'} w_kj^2),
        c_k = sum_g u_kg log(u_kg + eps) / sum_g u_kg

    with ``w_k`` the pilot coefficients of fold ``k`` (a ridge fit with one
    shared penalty) and ``g`` the group of feature ``j``. At ``gamma = 0``
    every penalty is ``exp(a)``; ``gamma > 0`` penalizes features whose
    pilot coefficient is small more, ``gamma = 1`` being the plug-in
    ``sigma^2 / w_j^2`` of the optimal generalized ridge (Hoerl and Kennard
    1970) and ``gamma = 1/2`` the fixed point that makes adaptive ridge a
    lasso (Grandvalet 1998). Two hyperparameters instead of one per feature:
    a cross-validated loss cannot overfit them, which is why
    :class:`HyperL2Regressor` fits this model before (or instead of) free
    per-feature penalties. The pilot enters as data, not as a function of
    ``phi``: each fold's pilot is fitted on that fold's training part, so
    cross-validating the model is honest. The second column is centred at
    ``c_k``, the ``u``-weighted mean, so ``a`` is the (log) penalty of the
    features that carry the pilot fit whatever ``gamma``: the two parameters
    are nearly decoupled, which keeps the outer problem well conditioned.
    (An unweighted centring ties ``a`` to the many irrelevant features
    instead; on wide data the outer descent then stalled in a poorer basin.)

    Parameters
    ----------
    coef : tensor of shape (n_folds, n_features) or (n_features,)
        Pilot coefficients, finite. Only their relative sizes matter (``u``
        is scale-free): any scale that the floating-point type holds gives
        the same basis.
    groups : long tensor of shape (n_features,), optional
        Penalty group of every feature (default: one per feature).
    eps : float, default=1e-3
        Floor of the normalized squared coefficient ``u`` (so a pilot
        coefficient of exactly zero gives a finite penalty); a positive
        finite number.

    Returns
    -------
    tensor of shape (n_folds, n_features, 2) or (n_features, 2)
        Columns ``1`` and ``-(log(u + eps) - c)``: ``log alpha = basis @ phi``.

    Raises
    ------
    ValueError
        If ``eps`` is not a positive finite number, ``coef`` is not 1-D or
        2-D or holds a NaN or an infinity, or ``groups`` is invalid.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import adaptive_penalty_basis
    >>> coef = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)  # u = (2.4, 0.6, 0)
    >>> B = adaptive_penalty_basis(coef, eps=1e-3)
    >>> B.shape
    torch.Size([3, 2])
    >>> alpha = (B @ torch.tensor([0.0, 1.0], dtype=torch.float64)).exp()  # e^c / (u + eps)
    >>> [round(a, 3) for a in alpha.tolist()]
    [0.758, 3.028, 1820.072]
    >>> u = torch.tensor([2.4, 0.6, 0.0], dtype=torch.float64)
    >>> round(float((u * alpha.log()).sum() / u.sum()), 12)  # a = 0: u-weighted mean
    0.0
    """
    if isinstance(eps, torch.Tensor) and eps.numel() == 1:
        eps = eps.item()
    # (eps = 0 gave log(0) = -inf for a zero pilot coefficient, and eps < 0 the
    # log of a negative number: a NaN column either way, silently)
    eps = _check_positive(eps, "adaptive_penalty_basis: eps", allow_none=False)
    coef = torch.as_tensor(coef).detach()
    if not coef.is_floating_point():
        coef = coef.to(torch.get_default_dtype())
    if coef.ndim not in (1, 2):
        raise ValueError(
            f"adaptive_penalty_basis: coef must have shape (n_folds, n_features) or "
            f"(n_features,); got {tuple(coef.shape)}."
        )
    if not bool(torch.isfinite(coef).all()):
        # (a NaN or infinite pilot made the whole second column NaN, silently)
        raise ValueError(
            "adaptive_penalty_basis: coef must be finite (no NaN or infinity); "
            "refit the pilot, e.g. at a larger penalty."
        )
    squeeze = coef.ndim == 1
    coef = coef[None] if squeeze else coef
    n_folds, p = coef.shape
    groups = _check_groups(groups, p, coef.device)
    n_groups = int(groups.max()) + 1 if p else 0
    if p:
        # each fold's pilot scaled by the power of two that brings its largest
        # |coefficient| into [1/2, 1) before squaring: u is scale-free, but the
        # squares overflowed (coef * 1e200: a NaN column) or underflowed (coef *
        # 1e-200: all zero, so u = 0 and a constant column) on the way. A power
        # of two scales exactly, so ordinary pilots give the same bits as
        # before. (Two halves: 2^-e alone overflows for a subnormal maximum.)
        _, e = torch.frexp(coef.abs().amax(1, keepdim=True))
        e = e.to(coef.dtype)  # (an integer exponent made ldexp's 2^k float32)
        half = torch.floor(-e / 2)
        coef = torch.ldexp(torch.ldexp(coef, half), -e - half)
    sq = coef * coef
    counts = torch.bincount(groups, minlength=n_groups).to(sq)
    # a group id no feature has (groups 0 and 2, no 1) is left out: its 0 / 0
    # made the mean, and so every entry of the basis, NaN
    used = counts > 0
    per_group = sq.new_zeros(n_folds, n_groups).index_add_(1, groups, sq) / torch.where(
        used, counts, torch.ones_like(counts)
    )
    mean = per_group[:, used].mean(1, keepdim=True)
    u = per_group / torch.where(mean > 0, mean, torch.ones_like(mean))
    log_u = torch.log(u + float(eps))
    # u-weighted centre (a plain mean when the pilot is all zero)
    weight = torch.where(mean > 0, u, torch.ones_like(u)) * used.to(u)
    log_u = log_u - (weight * log_u).sum(1, keepdim=True) / weight.sum(1, keepdim=True)
    basis = torch.stack([torch.ones_like(sq), -log_u[:, groups]], dim=-1)
    return basis[0] if squeeze else basis


@functools.lru_cache(maxsize=None)
def _log_penalty_limits(dtype, inverted):
    """``(low, high)``: the log-penalties whose ``exp`` is a normal number of
    ``dtype`` (float64: -708.4 to 709.8; float32: -87.3 to 88.7). With
    ``inverted`` (the dual / Woodbury forms, which divide by the penalties
    in float64 and whose gradients form ``1 / alpha^2``), ``low`` is at least
    ``-log(float64 max) / 2 = -354.9``."""
    # (an integer phi: exp gives the default floating type)
    info = torch.finfo(dtype if dtype.is_floating_point else torch.get_default_dtype())
    low, high = math.log(info.tiny), math.log(info.max)
    if inverted:
        low = max(low, -0.5 * math.log(torch.finfo(torch.float64).max))
    return low, high


class _LogPenalty:
    """``phi`` -> penalties: ``exp(phi[groups] + offset)`` or ``exp(basis @ phi + offset)``.

    The one map from outer variables to penalties of the fold problems.
    ``basis`` (``(p, m)`` or ``(n_folds, p, m)``) replaces ``groups`` when
    given; ``log_offset`` (``(p,)`` or ``(n_folds, p)``) is added to the
    log-penalties. The result has shape ``(p,)`` or ``(n_folds, p)``.

    ``where`` names the problem in error messages; ``inverted``: the problem
    divides by the penalties (dual forms), which narrows the range of
    log-penalties accepted (:func:`_log_penalty_limits`).
    """

    def __init__(
        self,
        n_features,
        n_folds,
        device,
        groups=None,
        basis=None,
        log_offset=None,
        where="the fold problem",
        inverted=False,
    ):
        self.basis = self.log_offset = None
        self.where, self.inverted = where, bool(inverted)
        if basis is not None:
            basis = torch.as_tensor(basis, device=device)
            if basis.ndim not in (2, 3) or basis.shape[-2] != n_features or (
                basis.ndim == 3 and basis.shape[0] != n_folds
            ):
                raise ValueError(
                    f"basis must have shape ({n_features}, m) or ({n_folds}, {n_features}, m); "
                    f"got {tuple(basis.shape)}."
                )
            # checked once here (phi is checked every call): a NaN or infinite
            # basis entry gave a NaN value and gradient silently
            if not bool(torch.isfinite(basis).all()):
                raise ValueError(
                    f"{where}: basis must be finite (no NaN or infinity); a pilot "
                    "basis from adaptive_penalty_basis needs finite coefficients."
                )
            self.basis = basis
            self.groups = None
            self.n_params = basis.shape[-1]
        else:
            self.groups = _check_groups(groups, n_features, device)
            self.n_params = int(self.groups.max()) + 1 if n_features else 0
        if log_offset is not None:
            log_offset = torch.as_tensor(log_offset, device=device)
            if log_offset.shape not in ((n_features,), (n_folds, n_features)):
                raise ValueError(
                    f"log_offset must have shape ({n_features},) or ({n_folds}, "
                    f"{n_features}); got {tuple(log_offset.shape)}."
                )
            if not bool(torch.isfinite(log_offset).all()):
                # (a NaN offset gave a NaN value and gradient silently)
                raise ValueError(f"{where}: log_offset must be finite (no NaN or infinity).")
            self.log_offset = log_offset

    def __call__(self, phi):
        # (a numpy phi failed with "'numpy.ndarray' object has no attribute
        # 'detach'")
        _check_tensors(self.where, phi=phi)
        if phi.shape != (self.n_params,):
            what = "log-penalty per group" if self.basis is None else "value per basis column"
            raise ValueError(
                f"phi must hold one {what}, shape ({self.n_params},); "
                f"got {tuple(phi.shape)}."
            )
        if self.basis is None:
            log_a = phi if self.log_offset is None else phi[self.groups]
        else:
            log_a = self.basis.to(phi) @ phi
        if self.log_offset is not None:
            log_a = log_a + self.log_offset.to(phi)
        if log_a.numel():
            self._check_range(phi, log_a)
        if self.basis is None and self.log_offset is None:
            return phi.exp()[self.groups]  # (penalty_per_feature, groups checked)
        return log_a.exp()

    def _check_range(self, phi, log_a):
        """``ValueError`` unless every log-penalty is finite and within
        :func:`_log_penalty_limits` of ``phi``'s dtype.

        One reduction and one host sync per call on the common path, as the
        finiteness check of ``phi`` it replaces. Unchecked, a NaN ``phi`` gave a NaN loss and an
        infinity a zero or infinite penalty; ``exp`` overflowed past 709.78
        (float64; ``RidgeLOO`` at ``phi = 710``: a finite value, a NaN
        gradient; ``LogisticFolds`` at 800: "inner objective is not finite
        ... check the initialization") and underflowed below -708.4 (the dual
        ``RidgeLOO`` at -709: a NaN value); the dual forms' gradients, which
        form ``1 / alpha^2``, were NaN from -355 (at -360: a finite value, a
        NaN gradient). In float32 the same happened past 88.7 and below -87.3.
        """
        low, high = _log_penalty_limits(phi.dtype, self.inverted)
        # the common case in two operations and one sync: every |log-penalty|
        # within the nearer limit (NaN fails the comparison)
        if float(log_a.detach().abs().max()) <= min(-low, high):
            return
        lo, hi = torch.stack(torch.aminmax(log_a.detach())).tolist()
        if low <= lo and hi <= high:
            return
        bad = ~torch.isfinite(phi.detach())
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"phi (log-penalties) must be finite; got {int(bad.sum())} "
                f"non-finite value(s), the first phi[{i}] = {float(phi.detach()[i])}."
            )
        form = " (the dual form divides by the penalties)" if self.inverted else ""
        raise ValueError(
            f"{self.where}: the log-penalties must lie in [{low:.1f}, {high:.1f}] in "
            f"{str(phi.dtype).replace('torch.', '')}{form}, where exp(.) neither "
            f"overflows nor underflows; got values from {lo:.4g} to {hi:.4g}. Bound "
            "phi, or rescale X so that useful penalties are moderate."
        )

    def jacobian(self, n_folds, like):
        """``d log(alpha) / d phi`` of every fold, dense: ``(n_folds, p, m)``."""
        if self.basis is None:
            B = torch.nn.functional.one_hot(self.groups, self.n_params).to(like)
        else:
            B = self.basis.to(like)
        return B.expand(n_folds, *B.shape[-2:])


class _PenaltyModel:
    """The penalty model of a fold problem (``X``, ``n_folds``): ``groups``,
    ``basis`` and ``log_offset`` as for :class:`_LogPenalty`."""

    def _set_penalty(self, groups=None, basis=None, log_offset=None):
        self._log_penalty = _LogPenalty(
            self.X.shape[1],
            self.n_folds,
            self.X.device,
            groups,
            basis,
            log_offset,
            where=type(self).__name__,
            inverted=getattr(self, "method", None) == "dual",
        )
        self.groups = self._log_penalty.groups
        self.n_groups = self._log_penalty.n_params

    def _alpha(self, phi):
        """Penalties at ``phi``: ``(n_features,)`` or ``(n_folds, n_features)``."""
        return self._log_penalty(phi)

    def reparametrized(self, groups=None, basis=None, log_offset=None):
        """The same folds (sharing their data and precomputations) with another
        penalty model: ``groups``, or a ``basis`` of the log-penalties, plus an
        optional fixed ``log_offset``.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> X = torch.randn(20, 3, dtype=torch.float64)
        >>> folds = RidgeFolds(X, X[:, 0], torch.ones(20, dtype=torch.float64))
        >>> folds.reparametrized(groups=torch.tensor([0, 0, 1])).n_groups
        2
        """
        out = copy.copy(self)
        out._set_penalty(groups, basis, log_offset)
        return out


#: LogisticFolds.hessian_preconditioner reuses its last weighted Gram matrix while the
#: curvature weights have moved by at most this relative L1 distance (per fold)
_GRAM_REFRESH = 0.1
#: LogisticFolds.hessian_preconditioner: most features for which the exact
#: per-fold Hessian (n (p + 1)^2 to form, (p + 1)^3 / 3 to factor per fold) is
#: built as the preconditioner
_BLOCK_MAX_FEATURES = 256


def _check_weights(W, n, like, what, n_folds=None, vector=False):
    """``W`` as ``(n_folds, n)`` weights of ``like``'s dtype and device, after
    checking them: finite, non-negative, a positive sum per fold, and
    ``n_folds`` rows when given (validation weights: one row per training fold).
    ``vector``: ``W`` must be one weight per sample, ``(n,)`` (returned as
    ``(1, n)``)."""
    W = torch.as_tensor(W).to(dtype=like.dtype, device=like.device)
    if vector and W.shape != (n,):
        # (RidgeLOO took the first row of (K, n) weights and dropped the
        # others silently; all_rows made K folds of them)
        raise ValueError(
            f"{what} must have shape ({n},), one weight per sample; got {tuple(W.shape)}."
        )
    if W.ndim == 1:
        W = W[None]
    if W.ndim != 2 or W.shape[1] != n or (n_folds is not None and W.shape[0] != n_folds):
        # (validation weights of another number of folds than the training
        # weights: torch's IndexError or "invalid gradient", or, one row for
        # two folds, its weights silently applied to both)
        raise ValueError(
            f"{what} must have shape ({'n_folds' if n_folds is None else n_folds}, {n})"
            f"{'' if n_folds is None else ', one row per fold of train_weights'}; "
            f"got {tuple(W.shape)}."
        )
    # (a NaN or an infinity passed both checks below: every value and
    # hypergradient came out NaN, silently)
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{what} must be finite (no NaN or infinity).")
    if bool((W < 0).any()):
        raise ValueError(f"{what} must be non-negative.")
    if bool((W.sum(1) <= 0).any()):
        raise ValueError(f"Every fold of {what} needs a positive total weight.")
    return W


def _ridge_method(method, n, p):
    """``"primal"`` (p x p system) or ``"dual"`` (n x n, Woodbury); ``"auto"``
    picks the smaller (``n``: the rows a problem is fitted on; for folds, the
    most training rows of any fold)."""
    if method == "auto":
        return "primal" if p <= n else "dual"
    if method not in ("primal", "dual"):
        raise ValueError(f"method must be 'auto', 'primal' or 'dual', got {method!r}.")
    return method


def _value_and_grad(problem, phi, hypergradient, solver, init, inner_loss=None):
    """Validation loss (summed over folds), its gradient in phi, info, theta.

    ``inner_loss`` defaults to ``problem.inner_loss``; a problem with a
    ``hessian_diagonal(theta, phi)`` passes itself (callable) so that the
    implicit strategies and :class:`NewtonCG` find its preconditioner.

    The value is corrected to the exact inner solution to first order
    (``info.value_correction``, where the strategy records one). Solved to
    a loose tolerance and warm-started from wherever the last solve ended,
    the raw validation loss moves with the start: on digits (10 classes,
    5 folds solved to a gradient norm of 1e-3, starts from the solutions
    at penalties 0.6 to 1.6 times the one asked for), the summed loss of
    1.85 was off its exact value by up to 2.7e-4, as much as an outer step
    gains, and the outer line searches bisected on that noise. Corrected,
    by at most 2e-5.
    """
    inner_loss = problem.inner_loss if inner_loss is None else inner_loss
    # (a numpy phi failed with "'numpy.ndarray' object has no attribute 'detach'")
    _check_tensors(f"{type(problem).__name__}.value_and_grad", phi=phi)
    phi = phi.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        theta, info = argmin(
            inner_loss, phi, init, hypergradient=hypergradient, solver=solver
        )
        value = problem.validation_loss(theta)
        (grad,) = torch.autograd.grad(value, phi)
    value = value.detach()
    if info.value_correction is not None:
        value = value + info.value_correction
    return value, grad.detach(), info, tree_detach(theta)


# --------------------------------------------------------------------------
# Ridge on K folds
# --------------------------------------------------------------------------


def _fold_grams(X, y, T, X_offset, y_offset, center=True):
    """Centred weighted Gram matrices and right-hand sides of K folds: ``(K, p, p)``,
    ``(K, p)``, and the all-rows problem ``(w, centre of X, centre of y, Gram,
    right-hand side)`` when it was computed on the way (else ``None``).

    ``C_k = sum_i t_ki (x_i - mu_k)(x_i - mu_k)^T``, ``r_k = sum_i t_ki (x_i - mu_k)(y_i - m_k)``
    with ``mu_k``, ``m_k`` the fold's weighted means (``X_offset``, ``y_offset``;
    zero, with ``center=False``, for a model without intercept).
    When every fold's weights are a common weight vector ``w`` or zero (the
    usual K-fold layout), ``C_k`` is the ``w``-weighted Gram matrix of all
    rows minus that of the rows fold ``k`` leaves out: about ``2 n p^2``
    operations instead of ``K n p^2``, and ``n p^2`` when the left-out
    parts partition the rows (K-fold: the all-rows matrix is their sum).
    Dense rows are first centred at the ``w``-weighted mean, so the
    subtraction loses no digits to large means. A CSR ``X`` stays sparse:
    its Gram matrices are sparse products of uncentred rows (centring would
    fill them in), and the subtraction of the fold means after loses the
    digits of ``mean^2 / variance``, small for sparse features (mostly
    zeros), as in scikit-learn's sparse ridge.
    """
    sparse = X.layout == torch.sparse_csr
    K = T.shape[0]
    w = T.max(0).values
    t_sum = T.sum(1)
    w_sum = w.sum()
    cx = ((w[None] @ X)[0] if sparse else w @ X) / w_sum if center else y.new_zeros(X.shape[1])
    cy = (w @ y) / w_sum if center else y.new_zeros(())
    # the centre of the rows the Gram matrices are formed from
    c, c_y = (y.new_zeros(X.shape[1]), y.new_zeros(())) if sparse else (cx, cy)
    if sparse:

        def part(s):  # X^T diag(s) X and X^T (s y), over the rows with s > 0
            rows = torch.nonzero(s > 0).reshape(-1)
            gram = _gram(csr_rows(X, rows, s[rows].sqrt())).to(device=y.device)
            return gram, ((s * y)[None] @ X)[0]

    else:
        X0, y0 = X - cx, y - cy

        def part(s):  # the same of the centred rows
            rows = torch.nonzero(s > 0).reshape(-1)
            scaled = X0[rows] * s[rows].sqrt()[:, None]
            return _gram(scaled), scaled.T @ (s[rows].sqrt() * y0[rows])

    common = None
    if bool(((T == 0) | (T == w)).all()) and K > 2:
        out = (T == 0) & (w > 0)  # (K, n): the rows each fold leaves out
        parts = [part(w * o) for o in out]
        grams_out = torch.stack([g for g, _ in parts])
        rhs_out = torch.stack([r for _, r in parts])
        if bool((out.sum(0) == (w > 0)).all()):
            # the left-out parts partition the rows (K-fold): their Gram
            # matrices add up to that of all rows (hetero: 5.3 -> 3.6 ms)
            gram_w, rhs_w = grams_out.sum(0), rhs_out.sum(0)
        else:
            gram_w, rhs_w = part(w)
        # in place: (K, p, p) temporaries cost page faults on CPU
        gram = grams_out.neg_().add_(gram_w)
        rhs = rhs_w - rhs_out
        # the all-rows problem centred at (cx, cy) (zero shift for dense rows)
        e = cx - c
        common = (
            w,
            cx,
            cy,
            gram_w - w_sum * torch.outer(e, e),
            rhs_w - w_sum * e * (cy - c_y),
        )
    elif sparse:
        parts = [part(t) for t in T]
        gram = torch.stack([g for g, _ in parts])
        rhs = torch.stack([r for _, r in parts])
    else:
        gram = _gram(X0[None] * T.sqrt()[..., None])  # (K, p, p)
        rhs = (T * y0) @ X0
    # remove the fold means: sum_i t_ki (x_i - c)(x_i - c)^T - t_k (mu_k - c)(mu_k - c)^T
    dx, dy = X_offset - c, y_offset - c_y  # (zero without intercept)
    d = dx * t_sum.sqrt()[:, None]
    gram = gram.baddbmm_(d[:, :, None], d[:, None, :], alpha=-1.0)
    rhs = rhs - t_sum[:, None] * dx * dy[:, None]
    return gram, rhs, common


class _CentredRows:
    """Sparse rows centred at ``mu`` and scaled, without filling them in:
    ``Xc = R - s mu^T`` with ``R = diag(s) X_rows`` sparse (``s = 1`` when
    ``None``), given with its transpose ``rows_t``. Only the products
    ``Xc @ M`` and ``Xc.T @ G`` (a scipy CSR matrix with numpy arrays, or a
    CSR tensor with tensors): the validation rows of the primal form, and
    each fold's training rows in the Woodbury form (:class:`_SparseFoldRows`)."""

    def __init__(self, rows, mu, rows_t, s=None):
        self.rows, self.mu, self.rows_t, self.s = rows, mu, rows_t, s

    def __matmul__(self, M):  # (p,) or (p, S) -> (m,) or (m, S)
        c = self.mu @ M
        if self.s is not None:
            c = self.s[:, None] * c if M.ndim == 2 else self.s * c
        return self.rows @ M - c

    @property
    def T(self):
        return _CentredRowsT(self)


class _CentredRowsT:
    """The transpose of :class:`_CentredRows`: ``R^T G - mu (s^T G)``."""

    def __init__(self, centred):
        self.c = centred

    def __matmul__(self, G):  # (m,) or (m, S) -> (p,) or (p, S)
        c = self.c
        sg = G.sum(0) if c.s is None else c.s @ G
        mu = c.mu if G.ndim == 1 else c.mu[:, None]
        return c.rows_t @ G - mu * sg


def _bmv(A, x):
    """Batched matrix-vector product ``A[k] @ x[k]``: ``(K, m, n), (K, n) -> (K, m)``.

    A loop of matrix-vector products: on CPU a batched ``matmul`` with one
    column ran 4 to 7 times slower for these shapes (torch 2.13: 150 against
    43 microseconds for 5 x 400 x 120).
    """
    return torch.stack([a @ v for a, v in zip(A, x)])


class _SparseFoldRows:
    """The Woodbury form's ``Xs`` for a CSR ``X``, kept sparse.

    Stands for the dense ``(K, m, p)`` tensor of every fold's training rows,
    centred at the fold's means and scaled by the root weights (zero rows
    padding the folds to a common ``m``): ``Xs_k = R_k - s_k mu_k^T`` with
    ``R_k = diag(s_k) X_k`` sparse (CSR, and its transpose), ``s_k`` the root
    weights (zero past the fold's rows) and ``mu_k`` the fold's mean (zero
    without intercept): a :class:`_CentredRows` per fold. Gives the
    products the dual form needs, each a sparse product and a rank-one
    correction per fold. Held in float64 (:func:`_wide`); products return in
    their argument's precision.
    """

    def __init__(self, X, T, mu):
        K = T.shape[0]
        m = int((T > 0).sum(1).max())
        self.shape = (K, m, X.shape[1])
        X, T, mu = csr_with_values(X, _wide(X.values())), _wide(T), _wide(mu)
        self.s = mu.new_zeros(K, m)
        self.folds, self._rt_rows = [], []
        self.rows = [torch.nonzero(t > 0).reshape(-1) for t in T]  # each fold's rows
        for k, rows in enumerate(self.rows):
            self.s[k, : len(rows)] = T[k, rows].sqrt()
            R = csr_rows(X, rows, self.s[k, : len(rows)])
            crow = R.crow_indices()
            crow = torch.cat([crow, crow[-1:].expand(m - len(rows))])
            R = csr_tensor(crow, R.col_indices(), R.values(), (m, X.shape[1]), device=X.device)
            RT = csr_transpose(R)
            self.folds.append(_CentredRows(R, mu[k], RT, self.s[k]))
            # the row (feature) of every stored entry of R^T
            counts = RT.crow_indices().diff()
            self._rt_rows.append(
                torch.repeat_interleave(torch.arange(len(counts), device=X.device), counts)
            )

    def mv(self, v):
        """``Xs_k v_k``: ``(K, p) -> (K, m)``."""
        w = v.to(self.s.dtype)
        return torch.stack([Xc @ vk for Xc, vk in zip(self.folds, w)]).to(v.dtype)

    def rmv(self, u):
        """``Xs_k^T u_k``: ``(K, m) -> (K, p)``, or ``(K, m, S) -> (K, p, S)``."""
        w = u.to(self.s.dtype)
        return torch.stack([Xc.T @ uk for Xc, uk in zip(self.folds, w)]).to(u.dtype)

    def kernel(self, d):
        """``Xs_k diag(d_k) Xs_k^T``: ``(K, p) -> (K, m, m)``, dense, in float64."""
        out = []
        d = d.to(self.s.dtype)
        for Xc, rows, dk in zip(self.folds, self._rt_rows, d):
            RT, s, mu = Xc.rows_t, Xc.s, Xc.mu
            # (R diag(d) R^T) as the Gram matrix of the row-scaled R^T
            G = _gram(csr_with_values(RT, RT.values() * dk.sqrt()[rows])).to(d)
            c = Xc.rows @ (dk * mu)
            G -= torch.outer(c, s) + torch.outer(s, c)
            G += (mu @ (dk * mu)) * torch.outer(s, s)
            out.append(G)
        return torch.stack(out)

    def col_sq_sums(self):
        """``sum_i Xs_kij^2`` of every fold and feature: ``(K, p)``, in float64."""
        return torch.stack(
            [
                csr_with_values(Xc.rows_t, Xc.rows_t.values() ** 2) @ torch.ones_like(Xc.s)
                - 2.0 * Xc.mu * (Xc.rows_t @ Xc.s)
                + Xc.mu * Xc.mu * (Xc.s @ Xc.s)
                for Xc in self.folds
            ]
        )

    def to_dense(self):
        """The dense ``(K, m, p)`` tensor in float64 (a fallback's: a singular system)."""
        return torch.stack(
            [Xc.rows.to_dense() - torch.outer(Xc.s, Xc.mu) for Xc in self.folds]
        )


def _rows_mv(Xs, v):
    """``Xs_k v_k`` of the dual form's rows (dense ``(K, m, p)`` or sparse)."""
    return Xs.mv(v) if isinstance(Xs, _SparseFoldRows) else _bmv(Xs, v)


def _rows_rmv(Xs, u):
    """``Xs_k^T u_k`` of the dual form's rows (dense ``(K, m, p)`` or sparse)."""
    return Xs.rmv(u) if isinstance(Xs, _SparseFoldRows) else _bmv(Xs.mT, u)


def _cho_solve(L, b):
    """``(L L^T)^{-1} b`` for a batch of Cholesky factors ``L`` and vectors ``b``
    (``(K, n)``): two triangular solves, half the time of ``cholesky_solve``
    with one column."""
    z = torch.linalg.solve_triangular(L, b[..., None], upper=False)
    return torch.linalg.solve_triangular(L.mT, z, upper=True)[..., 0]


def _primal_factor(gram, alpha):
    """Cholesky factor of every fold's ``G_k + diag(alpha_k)``: ``(L, info)``."""
    A = gram.clone()
    A.diagonal(dim1=-2, dim2=-1).add_(alpha)
    return _cholesky_ex(A, overwrite_a=True)


def _wide(t):
    """``t`` in float64 when it is in a narrower floating type (else as is).

    The Woodbury form runs in float64 whatever the data's precision: with
    penalties over many decades (the adaptive model's, near interpolation)
    the kernel ``I + Xs A^{-1} Xs^T`` has entries of ``1/alpha_min`` (1e7)
    beside the identity, which float32 loses, and the inverse subtracts two
    terms of that size (a float32 validation loss of 72.3 against 0.309 at
    penalties from 1e-7 to 1e12). Its ``m x m`` factorization is the cheap
    part; the products with the rows stay in the data's precision. (Not on
    Apple's MPS, which has no float64.)
    """
    if t.dtype == torch.float64 or not t.is_floating_point() or t.device.type == "mps":
        return t
    return t.double()


def _dual_kernel(Xs, alpha):
    """Every fold's kernel ``Xs A^{-1} Xs^T`` (``A = diag(alpha_k)``) in
    float64 (:func:`_wide`), and the scaled rows ``Xs A^{-1/2}`` it came
    from (``None`` for sparse rows, whose kernel is a sparse product)."""
    alpha = _wide(alpha)
    if isinstance(Xs, _SparseFoldRows):
        return Xs.kernel(1.0 / alpha), None
    scaled = _wide(Xs) * alpha.rsqrt()[:, None, :]
    return _gram(scaled.mT), scaled  # by a symmetric product


def _dual_factor(Xs, alpha):
    """``Xs A^{-1}`` and a factorization of ``M = I + Xs A^{-1} Xs^T`` (``A =
    diag(alpha_k)``) of every fold, in float64 (:func:`_wide`): ``(XA, F,
    info)`` (``XA`` is ``None`` for sparse rows, which apply ``A^{-1}
    Xs^T`` as a product instead; ``F`` for :func:`_m_solve`).

    ``F`` is the Cholesky factor, or where that fails (``info != 0``) an LU
    factorization ``(LU, pivots)``: ``M`` is positive definite, but with an
    intercept its smallest eigenvalue is 1 (along the root weights, which
    the centred rows are orthogonal to) and a penalty 1e-16 times its
    feature's squared norm puts an entry of 1e16 beside it, which Cholesky
    loses (``info`` of the last row). Partial pivoting keeps the solve
    backward stable there, and :func:`_dual_refine` the answer exact.
    ``info`` is nonzero only where LU fails too.
    """
    M, scaled = _dual_kernel(Xs, alpha)
    M.diagonal(dim1=-2, dim2=-1).add_(1.0)
    F, info = _cholesky_ex(M, overwrite_a=True)
    if bool((info != 0).any()):
        M = _dual_kernel(Xs, alpha)[0]  # the factorization overwrote it
        M.diagonal(dim1=-2, dim2=-1).add_(1.0)
        LU, pivots, info = torch.linalg.lu_factor_ex(M)
        F = (LU, pivots)
    # in place: a fresh (K, m, p) product cost more in page faults than in
    # arithmetic
    XA = None if scaled is None else scaled.mul_(_wide(alpha).rsqrt()[:, None, :])
    return XA, F, info


def _m_solve(F, b):
    """``M^{-1} b`` per fold (``(K, m)``) with a factorization ``F`` of
    :func:`_dual_factor`."""
    if isinstance(F, tuple):
        return torch.linalg.lu_solve(*F, b[..., None])[..., 0]
    return _cho_solve(F, b)


def _dual_apply(XA, Xs, alpha, z):
    """``A^{-1} Xs^T z`` per fold (``XA`` from :func:`_dual_factor`), in
    ``z``'s precision."""
    return _rows_rmv(Xs, z) / _wide(alpha) if XA is None else _bmv(XA.mT, z)


def _dual_inverse(F, XA, Xs, alpha, r):
    """``(Xs^T Xs + A)^{-1} r = A^{-1} r - A^{-1} Xs^T M^{-1} Xs A^{-1} r``
    (Woodbury), in float64 (:func:`_wide`), returned in ``r``'s dtype
    (``F`` from :func:`_dual_factor`). ``Xs A^{-1} r`` is ``XA r`` (dense
    rows)."""
    rw = _wide(r)
    u = rw / _wide(alpha)
    xu = _rows_mv(Xs, u) if XA is None else _bmv(XA, rw)
    return (u - _dual_apply(XA, Xs, alpha, _m_solve(F, xu))).to(r.dtype)


# a dual solve whose relative residual (:func:`_dual_refine`) exceeds this is
# refined; beyond _DUAL_WARN_RTOL after refinement, RidgeFolds warns
_DUAL_REFINE_RTOL = 1e-12
_DUAL_REFINE_STEPS = 3
_DUAL_WARN_RTOL = 1e-7
# the residual is not computed where eps64 * max_j |x_j|^2 / alpha_j is below
# this (a ratio of 4.5e8). Over 300 random folds (10 to 100 rows, 2 to 5
# times as many features, correlated or not, column scales over 6 decades,
# 1 to 5 penalties 1e-4 to 1e-13 times their feature's squared norm) the
# unrefined relative residual was at most 0.09 eps times that ratio: below
# 1e-8 here. HyperL2Regressor's penalty box keeps its wide fits below 1e8,
# where a check cost 4% of the fit and found nothing to refine (forward
# solves at 5e-16; backward ones at the rounding floor of their residual)
_DUAL_CHECK_RATIO = 1e-7


def _dual_residual(XA, Xs, alpha, r, x):
    """The residual ``r - (Xs^T Xs + A) x`` of every fold, in float64
    (:func:`_wide`), and its size relative to the terms':
    ``|r - Xs^T Xs x - A x| / (|Xs^T Xs x| + |A x| + |r|)`` (``(K,)``), the
    normwise backward error (relative to ``|Hx|`` instead, an ``x`` exact to
    the system's conditioning showed 1e-8 where the two terms cancel).

    With dense rows ``Xs^T Xs x`` is ``alpha * (XA^T (XA (alpha * x)))``
    (``XA = Xs A^{-1}`` from :func:`_dual_factor`, already float64): each
    factor rounds relatively, whatever ``Xs``'s precision and the
    penalties' spread.
    """
    a, x, r = _wide(alpha), _wide(x), _wide(r)
    ax = a * x
    if XA is None:
        gx = _rows_rmv(Xs, _rows_mv(Xs, x))
    else:
        gx = a * _bmv(XA.mT, _bmv(XA, ax))
    res = r - gx - ax
    scale = gx.norm(dim=-1) + ax.norm(dim=-1) + r.norm(dim=-1)
    return res, res.norm(dim=-1) / torch.where(scale > 0, scale, torch.ones_like(scale))


def _dual_checked(sq, alpha):
    """Whether the penalties ``alpha`` are small enough, against the columns'
    squared norms ``sq`` (``(K, p)``), for the Woodbury form to lose digits
    (``_DUAL_CHECK_RATIO``): where not, :func:`_dual_refine` is not called."""
    eps = torch.finfo(torch.float64).eps
    return eps * float((sq / _wide(alpha)).max()) > _DUAL_CHECK_RATIO


def _dual_refine(F, XA, Xs, alpha, r, x):
    """Iterative refinement of ``x ~ (Xs^T Xs + A)^{-1} r`` with the Woodbury
    factorization ``F``: ``(x, rel)`` in float64, ``rel`` the relative residual
    of every fold (``(K,)``, :func:`_dual_residual`; ``None`` where it is not
    finite, norms past float64's range, and ``x`` is returned as it came).

    The Woodbury form is exact in exact arithmetic, but a penalty far below
    its feature's squared norm puts an entry of ``|x_j|^2 / alpha_j`` beside
    the identity in ``M = I + Xs A^{-1} Xs^T``, and the solve loses the digits
    that ratio costs: one penalty at ``e^-30`` on folds of 15 x 50 gave a
    relative error of 2.5e-4 (mpmath reference) with a relative residual of
    6.5e-5; the residual tracked the error within a factor of 3 to 15 over
    penalties from ``e^-10`` to ``e^-35``, one or two of them small or all
    spread. Each step ``x += H_L^{-1} (r - H x)`` gains those digits again
    (2.5e-4 -> 6e-6 -> 1e-7 -> 2e-9). Refined while ``rel`` exceeds
    ``_DUAL_REFINE_RTOL``, at most ``_DUAL_REFINE_STEPS`` times, keeping the
    best iterate, and stopped when a step gains less than a digit. Called
    only where the penalties are small enough to need it
    (:func:`_dual_checked`); a check costs two products with the rows.
    """
    x = _wide(x)
    best, best_rel = x, None
    for step in range(_DUAL_REFINE_STEPS + 1):
        res, rel = _dual_residual(XA, Xs, alpha, r, x)
        worst = float(rel.max())
        if not math.isfinite(worst):
            # (norms past float64's range, at penalties near its limits: the
            # solve stands as it is)
            break
        if best_rel is not None and worst > 0.1 * float(best_rel.max()):
            break  # no longer gaining a digit a step: the solve's own limit
        best, best_rel = x, rel
        if worst <= _DUAL_REFINE_RTOL or step == _DUAL_REFINE_STEPS:
            break
        x = x + _dual_inverse(F, XA, Xs, alpha, res)
    return best, best_rel


def _dual_solve(F, XA, Xs, alpha, r, refine):
    """``(Xs^T Xs + A)^{-1} r`` in ``r``'s dtype (:func:`_dual_inverse`),
    refined (:func:`_dual_refine`) when ``refine`` (:func:`_dual_checked`)."""
    x = _dual_inverse(F, XA, Xs, alpha, r)
    return _dual_refine(F, XA, Xs, alpha, r, x)[0].to(r.dtype) if refine else x


def _first_order(backward):
    """The backward pass of a first-order Function, refusing a second derivative.

    ``create_graph=True`` runs a backward pass with grad mode on; it is
    refused with a clear error. (torch's ``once_differentiable`` refuses it
    only when the incoming gradient carries a graph: through these Functions
    the rest of the chain, the log-penalties' exponential, does, and a
    double backward silently returned a partial second derivative.)
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "RidgeFolds' solves and validation loss, and RidgeLOO's dual form, "
                "are differentiable once; for second derivatives in phi use "
                "RidgeFolds.value_grad_hessian (exact, for models with few "
                "parameters), RidgeLOO(method='primal'), or finite differences of "
                "value_and_grad."
            )
        return backward(ctx, *grads)

    return wrapper


class _PrimalRidgeSolve(torch.autograd.Function):
    """``w_k = (G_k + diag(alpha_k))^{-1} r_k`` by Cholesky; gradient in ``alpha`` only.

    With ``v = (G + diag(alpha))^{-1} dL/dw`` (the same factor),
    ``dL/dalpha = -v * w``. Returns ``None`` when a factorization fails
    (the caller then solves by LU through autograd).
    """

    @staticmethod
    def forward(ctx, alpha, gram, rhs):
        L, info = _primal_factor(gram, alpha)
        if bool((info != 0).any()):
            return None
        w = _cho_solve(L, rhs)
        ctx.save_for_backward(L, w)
        return w

    @staticmethod
    @_first_order
    def backward(ctx, grad_w):
        L, w = ctx.saved_tensors
        v = _cho_solve(L, grad_w)
        return -(v * w), None, None


class _DualRidgeSolve(torch.autograd.Function):
    """The same solution in the Woodbury form (``p > n``); gradient in ``alpha`` only.

    ``w = A^{-1} Xs^T M^{-1} ys`` with ``M = I + Xs A^{-1} Xs^T`` factored
    (:func:`_dual_factor`); the backward pass applies ``(Xs^T Xs + A)^{-1}
    = A^{-1} - A^{-1} Xs^T M^{-1} Xs A^{-1}`` with the same factor. Both
    are refined against the residual (:func:`_dual_refine`); the forward
    pass puts its relative residual in ``report["residual"]``.
    """

    @staticmethod
    def forward(ctx, alpha, Xs, ys, rhs, sq, report):
        XA, F, info = _dual_factor(Xs, alpha)
        if bool((info != 0).any()):
            return None
        w = _dual_apply(XA, Xs, alpha, _m_solve(F, _wide(ys)))
        report["residual"] = None
        ctx.refine = _dual_checked(sq, alpha)  # the backward solve's too
        if ctx.refine:  # rhs: Xs^T ys
            w, report["residual"] = _dual_refine(F, XA, Xs, alpha, rhs, w)
        w = w.to(ys.dtype)
        ctx.rows = Xs  # a tensor, or sparse rows (not a tensor to save)
        ctx.lu = isinstance(F, tuple)
        ctx.save_for_backward(*(F if ctx.lu else (F,)), XA, alpha, w)
        return w

    @staticmethod
    @_first_order
    def backward(ctx, grad_w):
        *F, XA, alpha, w = ctx.saved_tensors
        F = tuple(F) if ctx.lu else F[0]
        v = _dual_solve(F, XA, ctx.rows, alpha, grad_w, ctx.refine)
        return -(v * w), None, None, None, None, None


def _penalty_derivatives(lam, alpha, B, w, J):
    """The penalty's part of the outer gradient and Hessian (``value_grad_hessian``).

    With ``lam = H^-1 g`` (the adjoint of the validation gradient, on the
    coefficients), ``D_a = alpha * B_a`` and ``J_a = d w / d phi_a``, all per
    fold (``(K, p)``, ``(K, p, m)``)::

        grad_a = -lam^T (D_a w)
        H_ab = -lam^T (D_b J_a + D_a J_b + alpha B_a B_b w)

    the same for ridge and logistic folds, whose Hessians add their loss's
    own terms. Returns ``(grad (m,), H (m, m))``.
    """
    D = alpha[..., None] * B
    grad = -(lam[..., None] * D * w[..., None]).sum((0, 1))
    cross = torch.einsum("kpa,kpb->ab", lam[..., None] * D, J)
    curv = torch.einsum("kp,kpa,kpb->ab", lam * alpha * w, B, B)
    return grad, -(cross + cross.T + curv)


def _t(a):
    """The transpose of a matrix, a vector as is (numpy arrays or tensors)."""
    return a if a.ndim < 2 else a.T


def _fold_squared_errors(theta, rows):
    """Per fold (``rows`` as in :class:`_FoldValidationLoss`): whether ``rows``
    are numpy arrays, the weighted residuals ``v r`` and the losses
    ``sum(v r^2)`` (numpy or tensors, ``()`` or ``(S,)``)."""
    numpy = not isinstance(rows[0][1], torch.Tensor)  # yc: X may be sparse
    th = theta.detach()
    th = th.numpy() if numpy else th
    weighted, losses = [], []
    for k, (Xc, yc, v) in enumerate(rows):
        r = yc - _t(Xc @ _t(th[k]))  # (m,) or (S, m)
        weighted.append(v * r)
        losses.append((weighted[-1] * r).sum(-1))
    return numpy, weighted, losses


class _FoldValidationLoss(torch.autograd.Function):
    """Sum over folds of the weighted squared validation error; gradient in ``theta`` only.

    ``rows`` holds, per fold, the validation rows and targets centred at the
    fold's training means and the normalized weights ``(Xc, yc, v)`` (numpy
    arrays on CPU, else tensors), so the residual of coefficients ``w`` is
    ``yc - Xc w`` (intercept included) and its gradient is
    ``-2 Xc^T (v r)``. One autograd node instead of the ~40 of the per-fold
    products, intercepts and sums (hetero's 5 folds of 400 x 200: 0.46 ms
    per evaluation, forward and backward, against 0.12 ms).
    ``theta`` of shape ``(n_folds, p)`` gives a scalar, ``(n_folds, S, p)``
    the ``S`` losses.
    """

    @staticmethod
    def forward(ctx, theta, rows):
        numpy, weighted, losses = _fold_squared_errors(theta, rows)
        out = sum(losses)
        ctx.rows, ctx.weighted, ctx.numpy = rows, weighted, numpy
        return torch.from_numpy(np.asarray(out)) if numpy else out

    @staticmethod
    @_first_order
    def backward(ctx, grad_out):
        g = grad_out[..., None]
        g = g.numpy() if ctx.numpy else g
        grad = [-2.0 * g * _t(Xc.T @ _t(wr)) for wr, (Xc, _, _) in zip(ctx.weighted, ctx.rows)]
        grad = np.stack(grad) if ctx.numpy else torch.stack(grad)
        return (torch.from_numpy(grad) if ctx.numpy else grad), None


class RidgeFolds(_PenaltyModel, ClosedFormSolver):
    """Ridge regression with a diagonal penalty on K weighted subsets at once.

    Fold ``k`` has training weights ``t_k`` (zero outside its training part)
    and solves, with ``alpha_j = exp(phi[groups[j]])``::

        min_{w, b}  1/2 sum_i t_ki (y_i - x_i w - b)^2 + 1/2 sum_j alpha_j w_j^2

    The intercept (if any) is eliminated by ``t_k``-weighted centering.
    With ``p <= n`` the p x p system ``(C_k + diag(alpha)) w = X_c^T t y_c``
    is solved from the fold's centered Gram matrix ``C_k``, computed once;
    with ``p > n`` the Woodbury (dual) form
    ``w = A^{-1} Xs^T (Xs A^{-1} Xs^T + I)^{-1} ys`` (``A = diag(alpha)``,
    ``Xs`` the ``sqrt(t)``-scaled centered rows) needs an n x n solve (in float64
    whatever the data's precision). Both factor by Cholesky, with a backward
    pass of two triangular solves with the same factor (:meth:`coef`; an LU
    or least-squares solve through autograd where the factorization fails).
    Samples with zero weight contribute nothing: the folds share one copy
    of ``X``.

    ``theta`` is the coefficient tensor of shape ``(n_folds, n_features)``;
    :meth:`intercepts` gives the intercepts. The inner objective
    :meth:`inner_loss` is the sum over folds (exactly the problem above with
    ``b`` profiled out), so the implicit strategies (``"cg"``, ``"dense"``)
    apply too, with this class as their exact inner solver.

    A sparse ``X`` stays sparse: the Gram matrices (primal) and the kernels
    ``Xs A^{-1} Xs^T`` (dual) come from sparse products, with the fold's
    centring applied as a rank-one correction instead of filling ``X`` in.

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
        Dense, or sparse (CSR, CSC or COO layout).
    y : tensor of shape (n_samples,)
    train_weights : tensor of shape (n_folds, n_samples) or (n_samples,)
        Non-negative training weights of every fold (sample weights times a
        0/1 fold indicator).
    val_weights : tensor of shape (n_folds, n_samples), optional
        Validation weights; needed by :meth:`validation_loss`.
    groups : long tensor of shape (n_features,), optional
        Penalty group of every feature (default: one group per feature):
        ``alpha_j = exp(phi[groups[j]])``.
    fit_intercept : bool, default=True
    method : {"auto", "primal", "dual"}, default="auto"
        ``"auto"`` is ``"primal"`` when ``n_features`` is at most the
        number of training rows (of positive weight) of the largest fold,
        else ``"dual"``: a fold with fewer training rows than features has a
        singular Gram matrix, and the primal system loses its accuracy at
        small penalties (the Woodbury form stays exact). The primal form
        warns (:class:`InnerSolveWarning`) when a fold's Gram matrix is
        singular (``"primal"`` forced, a fold smaller than the largest, or as
        many rows as features with an intercept) and the smallest penalty is
        too small for six correct digits. The Woodbury form refines its
        solves against their residual where a penalty is below about 2e-9
        times its feature's squared norm (one penalty at 6e-15 times it: a
        relative error of 1e-8 instead of 2e-4), and warns the same way
        where refinement leaves a relative residual above 1e-7 (near 1e-16
        times it).
    basis : tensor of shape (n_features, m) or (n_folds, n_features, m), optional
        A linear model of the log-penalties replacing ``groups``:
        ``log alpha = basis @ phi`` (per fold with a 3-D basis), e.g.
        :func:`adaptive_penalty_basis`.
    log_offset : tensor of shape (n_features,) or (n_folds, n_features), optional
        Added to the log-penalties (fixed, not differentiated).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import RidgeFolds
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    >>> y = X @ torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
    >>> train = torch.ones(2, 40, dtype=torch.float64)
    >>> train[0, :20] = 0
    >>> train[1, 20:] = 0
    >>> folds = RidgeFolds(X, y, train, val_weights=1 - train)
    >>> value, grad, info, coef = folds.value_and_grad(torch.full((3,), -5.0, dtype=torch.float64))
    >>> coef.shape, grad.shape, info.strategy
    (torch.Size([2, 3]), torch.Size([3]), 'closed_form')
    >>> bool(value < 1e-4)
    True
    """

    def __init__(
        self,
        X,
        y,
        train_weights,
        val_weights=None,
        groups=None,
        fit_intercept=True,
        method="auto",
        basis=None,
        log_offset=None,
    ):
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}.")
        n, p = X.shape
        y = y.to(dtype=X.dtype, device=X.device)
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},); got {tuple(y.shape)}.")
        _ridge_method(method, n, p)  # (a bad name fails first)
        if X.layout != torch.strided:
            # sparse stays sparse: Gram matrices (primal) or kernels (dual) by
            # sparse products, rows centred implicitly
            X = to_csr(X)
        _check_finite_X(X, y, "RidgeFolds")
        self.X, self.y = X, y
        self.train_weights = _check_weights(train_weights, n, X, "train_weights")
        # by the folds' training rows, not all the rows: with fewer training rows
        # than features a fold's Gram matrix is singular, and the primal system
        # at small penalties lost every digit (n = 120, p = 110 in 5 folds of 96
        # training rows, penalties e^-40: a validation loss of 81787 against 53.8)
        rows = int((self.train_weights > 0).sum(1).max())
        self.method = _ridge_method(method, rows, p)
        self.val_weights = (
            None
            if val_weights is None
            else _check_weights(
                val_weights, n, X, "val_weights", n_folds=self.train_weights.shape[0]
            )
        )
        self._set_penalty(groups, basis, log_offset)
        self.fit_intercept = bool(fit_intercept)
        self.last_fallback = None
        self._set_training(self.train_weights)
        self._set_validation_rows()

    def _set_training(self, T):
        """Offsets, and Gram matrices (primal) or scaled rows (dual), of the
        training weights ``T`` (``(K, n)``)."""
        X, y = self.X, self.y
        self.train_weights = T
        self._all_rows = None
        self._set_accuracy_check(T)
        t_sum = T.sum(1)
        if self.fit_intercept:
            self.X_offset = (T @ X) / t_sum[:, None]  # (K, p)
            self.y_offset = (T @ y) / t_sum  # (K,)
        else:
            self.X_offset = y.new_zeros(T.shape[0], X.shape[1])
            self.y_offset = y.new_zeros(T.shape[0])
        if self.method == "primal":
            self.gram, self.rhs, self._all_rows = _fold_grams(
                X, y, T, self.X_offset, self.y_offset, self.fit_intercept
            )
        else:
            self._set_dual(X, y, T)

    def _set_accuracy_check(self, T):
        """Whether a primal fold of the training weights ``T`` has a singular
        Gram matrix (:meth:`_check_primal_accuracy`), and no accuracy warning
        given yet."""
        rank = int((T > 0).sum(1).min()) - int(self.fit_intercept)
        self._singular_gram = self.method == "primal" and rank < self.X.shape[1]
        self._warned_accuracy = False

    def all_rows(self, sample_weight):
        """The same ridge problem fitted on all rows, with weights ``sample_weight``.

        One fold, no validation part, the same penalty model: the final fit
        after cross-validation. In the primal form, when every row is in
        some fold's training part with ``sample_weight`` as its weight (a
        K-fold layout), the folds' Gram matrices were computed from that of
        all rows, which is reused (``n p^2`` operations saved).

        Parameters
        ----------
        sample_weight : tensor of shape (n_samples,)
            Non-negative weights of the rows.

        Returns
        -------
        RidgeFolds

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> X = torch.randn(30, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> train = torch.ones(3, 30, dtype=torch.float64)
        >>> for k in range(3):
        ...     train[k, 10 * k:10 * (k + 1)] = 0
        >>> folds = RidgeFolds(X, X[:, 0], train, val_weights=1 - train)
        >>> full = folds.all_rows(torch.ones(30, dtype=torch.float64))
        >>> fresh = RidgeFolds(X, X[:, 0], torch.ones(30, dtype=torch.float64))
        >>> phi = torch.zeros(3, dtype=torch.float64)
        >>> bool(torch.allclose(full.closed_form(phi), fresh.closed_form(phi), atol=1e-12))
        True
        """
        sw = _check_weights(
            sample_weight, self.X.shape[0], self.X, "sample_weight", vector=True
        )
        out = copy.copy(self)
        out.val_weights = out._val_rows = None
        if self._all_rows is None or not torch.equal(self._all_rows[0], sw[0]):
            out._set_training(sw)
            return out
        _, cx, cy, gram, rhs = self._all_rows
        out.train_weights = sw
        # (its own rows: the folds' flags warned about a nonsingular Gram matrix)
        out._set_accuracy_check(sw)
        out.X_offset, out.y_offset = cx[None], cy.reshape(1)
        out.gram, out.rhs, out._all_rows = gram[None], rhs[None], None
        return out

    def _set_dual(self, X, y, T):
        """Scaled centred training rows of every fold, zero-padded: ``Xs``,
        ``ys``, and ``_Xs_wide``, the rows in float64 (:func:`_wide`) for the
        Woodbury form (``Xs`` itself for float64 data; ``Xs`` kept sparse for
        a CSR ``X``, :class:`_SparseFoldRows`, which holds float64 values).

        The rows are centred in float64, at the folds' means computed there.
        Centred in float32, they kept a mean of about eps times their size
        along the root weights, which eliminating the intercept takes as
        zero, and a penalty far below its feature's squared norm amplified
        it into the answer (every penalty at e^-20 on folds of 15 x 50:
        3.7e-5 off; at e^-30: 30%, where float64 rows are exact).
        """
        p = X.shape[1]
        if self.fit_intercept and _wide(X).dtype != X.dtype:
            Tw = _wide(T)
            mu = (Tw @ _wide(X)) / Tw.sum(1)[:, None]
            y_mu = (Tw @ _wide(y)) / Tw.sum(1)
        else:
            mu, y_mu = _wide(self.X_offset), _wide(self.y_offset)
        if X.layout == torch.sparse_csr:
            self.Xs = self._Xs_wide = _SparseFoldRows(X, T, mu)
            self._dual_sq = self.Xs.col_sq_sums()
            self._ys_wide = torch.zeros_like(self.Xs.s)
            for k, rows in enumerate(self.Xs.rows):
                s = self.Xs.s[k, : len(rows)]
                self._ys_wide[k, : len(rows)] = (_wide(y[rows]) - y_mu[k]) * s
            self.ys = self._ys_wide.to(y.dtype)
            self._dual_rhs = _rows_rmv(self.Xs, self._ys_wide)
            return
        scaled, targets = [], []
        # only the rows with positive weight, zero-padded to a common count
        # (a zero row adds an identity row to Xs A^-1 Xs^T + I and changes nothing)
        m = int((T > 0).sum(1).max())
        for k in range(T.shape[0]):
            rows = torch.nonzero(T[k] > 0).reshape(-1)
            s = T[k, rows].sqrt()
            Xk = mu.new_zeros(m, p)
            yk = mu.new_zeros(m)
            s = _wide(s)
            Xk[: len(rows)] = (_wide(X[rows]) - mu[k]) * s[:, None]
            yk[: len(rows)] = (_wide(y[rows]) - y_mu[k]) * s
            scaled.append(Xk)
            targets.append(yk)
        self._Xs_wide = torch.stack(scaled)  # (K, m, p)
        self._ys_wide = torch.stack(targets)  # (K, m)
        self.Xs, self.ys = self._Xs_wide.to(X.dtype), self._ys_wide.to(y.dtype)
        # the columns' squared norms (K, p): the Hessian's diagonal, less alpha
        self._dual_sq = (self._Xs_wide * self._Xs_wide).sum(1)
        # Xs^T ys (K, p) in float64, in the row space of the exactly centred rows:
        # the primal form's rhs, for refinement and value_grad_hessian
        self._dual_rhs = _rows_rmv(self._Xs_wide, self._ys_wide)

    def _set_validation_rows(self):
        """Each fold's validation rows and targets, centred at the fold's
        training means, and normalized weights (a list; numpy arrays where
        :func:`_use_numpy` allows), for :class:`_FoldValidationLoss`."""
        self._val_rows = None
        V = self.val_weights
        if V is None:
            return
        numpy = _use_numpy(self.X, self.y, V)
        self._val_rows = []
        for k in range(V.shape[0]):
            rows = torch.nonzero(V[k] > 0).reshape(-1)
            if self.X.layout == torch.sparse_csr:
                R = csr_rows(self.X, rows)
                mu, yc, v = self.X_offset[k], self.y[rows] - self.y_offset[k], V[k, rows] / V[k].sum()
                if numpy:
                    R = to_scipy(R)
                    Xc = _CentredRows(R, mu.numpy(), R.T.tocsr())
                    self._val_rows.append((Xc, yc.numpy(), v.numpy()))
                else:
                    self._val_rows.append((_CentredRows(R, mu, csr_transpose(R)), yc, v))
                continue
            part = (
                self.X[rows] - self.X_offset[k],
                self.y[rows] - self.y_offset[k],
                V[k, rows] / V[k].sum(),
            )
            self._val_rows.append(tuple(t.numpy() for t in part) if numpy else part)

    @property
    def n_folds(self):
        return self.train_weights.shape[0]

    def init_theta(self):
        """Zero coefficients, shape ``(n_folds, n_features)``."""
        return self.y.new_zeros(self.n_folds, self.X.shape[1])

    def closed_form(self, phi):
        """Coefficients of every fold at the penalties of ``phi``, in autograd."""
        return self.coef(self._alpha(phi))

    def coef(self, alpha):
        """Coefficients of every fold at penalties ``alpha``: ``(p,)`` or ``(n_folds, p)``.

        Differentiable in ``alpha`` (first order): a Cholesky factorization
        whose backward pass is two triangular solves with the same factor
        (:class:`_PrimalRidgeSolve`, :class:`_DualRidgeSolve`); an LU or
        least-squares solve through autograd if the factorization fails.
        """
        a = alpha.expand(self.n_folds, -1)
        if self.method == "primal":
            if self._singular_gram:
                self._check_primal_accuracy(a)
            out = _PrimalRidgeSolve.apply(a, self.gram, self.rhs)
            if out is not None:
                return out
            # (in the data's precision, as the factorization: a float64 alpha on
            # float32 data failed here with "linalg.solve: Expected A and B to
            # have the same dtype")
            A = self.gram + torch.diag_embed(a.to(self.gram.dtype))
            return self._solve(A, self.rhs[..., None])[..., 0]
        report = {}
        out = _DualRidgeSolve.apply(
            a, self._Xs_wide, self._ys_wide, self._dual_rhs, self._dual_sq, report
        )
        if out is not None:
            self._check_dual_accuracy(a, report["residual"])
            return out.to(self.ys.dtype)
        # in alpha's precision (the Woodbury form needs its range), returned in
        # the data's, as _DualRidgeSolve does
        sparse = isinstance(self.Xs, _SparseFoldRows)
        Xs = (self.Xs.to_dense() if sparse else self._Xs_wide).to(a.dtype)
        XA = Xs / a[:, None, :]  # (K, m, p): Xs diag(1/alpha)
        n = Xs.shape[1]
        G = XA @ Xs.mT + torch.eye(n, dtype=a.dtype, device=a.device)
        dual = self._solve(G, self._ys_wide.to(a.dtype)[..., None])  # (K, m, 1)
        out = (XA.mT @ dual)[..., 0]
        with torch.no_grad():
            r = self._dual_rhs.to(a.dtype)
            residual = _dual_residual(None, Xs, a.detach(), r, out.detach())[1]
            self._check_dual_accuracy(a, residual)
        return out.to(self.ys.dtype)

    def _check_primal_accuracy(self, a):
        """Warn (once) when the primal system of a fold whose Gram matrix is
        singular (its centred training rows span fewer dimensions than there
        are features) cannot be solved accurately at penalties ``a``.

        Its Gram matrix is singular, so once scaled to a unit diagonal (which
        Cholesky's accuracy does not depend on) the system has eigenvalues
        down to about ``alpha_j / (G_jj + alpha_j)``, and the relative error
        of the coefficients is about ``eps`` times the largest ratio
        ``(G_jj + alpha_j) / alpha_j`` (30 x 50 folds of 15 rows: 1.7e-10 at
        penalties e^-10, 3.5e-6 at e^-20, 7.7e-2 at e^-30, 15 times the
        answer's norm at e^-40, where the Woodbury form is exact to 1e-13).
        Warned beyond 1e-6. (A large penalty beside a small one costs
        nothing: penalties from e^-12 to e^25 on folds of 20 rows and 20
        features solve to 1e-12.)
        """
        if self._warned_accuracy:
            return
        with torch.no_grad():
            a = a.detach().to(self.gram.dtype)
            ratio = (self.gram.diagonal(dim1=-2, dim2=-1) + a) / a
            error = float(ratio.max()) * torch.finfo(self.gram.dtype).eps
        if error > 1e-6:
            self._warned_accuracy = True
            warnings.warn(
                f"RidgeFolds(method='primal') solves folds whose centred training "
                f"rows span fewer dimensions than the {self.X.shape[1]} features, so "
                f"that their Gram matrices are singular: at penalties down to "
                f"{float(a.min()):.3g} the "
                f"coefficients may be off by about {error:.1g} of their size. "
                "The Woodbury form, method='dual', is exact there.",
                InnerSolveWarning,
                stacklevel=3,
            )

    def _check_dual_accuracy(self, a, residual):
        """Warn (once) when the Woodbury form's coefficients at penalties ``a``
        keep a relative residual (:func:`_dual_refine`, per fold) above
        ``_DUAL_WARN_RTOL`` after iterative refinement: a penalty so far below
        its feature's squared norm that ``M = I + Xs A^{-1} Xs^T`` cannot be
        factored to any use (one penalty at ``e^-40`` on folds of 15 x 50: a
        relative error of 600 before this check)."""
        if residual is None or self._warned_accuracy:
            return
        rel = float(residual.max())
        if not rel > _DUAL_WARN_RTOL:
            return
        self._warned_accuracy = True
        with torch.no_grad():
            a = _wide(a.detach())
            sq = self._dual_sq.clamp_min(torch.finfo(torch.float64).tiny)
            ratio = float((a / sq).min())
        warnings.warn(
            f"RidgeFolds(method='dual'): at penalties down to {float(a.min()):.3g} "
            f"(down to {ratio:.1g} times their feature's squared norm) the Woodbury "
            f"form keeps a relative residual of {rel:.1g} after iterative "
            f"refinement, so the coefficients may be off by about {10 * rel:.1g} of "
            "their size. A penalty that small acts as no penalty at all: raising "
            "the smallest ones to 1e-8 of their feature's squared norm keeps the "
            "solve exact and barely changes the fit.",
            InnerSolveWarning,
            stacklevel=3,
        )

    def _solve(self, A, B):
        out, info = torch.linalg.solve_ex(A, B)
        if bool((info != 0).any()):
            self.last_fallback = "singular ridge system; used a least-squares solve"
            out = torch.linalg.lstsq(A, B).solution
        return out

    def inner_loss(self, theta, phi):
        """Sum over folds of the ridge objectives (intercepts profiled out)."""
        a = self._alpha(phi)
        pen = 0.5 * (a * theta * theta).sum()
        if self.method == "primal":
            quad = 0.5 * (theta * (self.gram @ theta[..., None])[..., 0]).sum()
            return quad - (self.rhs * theta).sum() + pen
        resid = self.ys - _rows_mv(self.Xs, theta)
        return 0.5 * (resid * resid).sum() + pen

    def __call__(self, theta, phi):
        """:meth:`inner_loss`: the object is the inner loss it carries a diagonal for."""
        return self.inner_loss(theta, phi)

    def loss_and_grad(self, theta, phi):
        """:meth:`inner_loss` and its gradient in ``theta``, in closed form.

        ``(C_k + diag(alpha_k)) w_k - r_k`` per fold (``-Xs^T (ys - Xs w) +
        alpha w`` in the dual form): one matrix-vector product per fold, which
        the health record's inner-gradient check and the implicit strategies
        use instead of a backward pass. No graph in ``theta``; the penalty
        terms keep ``phi``'s graph when ``phi`` requires grad.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
        >>> folds = RidgeFolds(X, X[:, 0], torch.ones(3, dtype=torch.float64), fit_intercept=False)
        >>> phi = torch.zeros(2, dtype=torch.float64)
        >>> value, grad = folds.loss_and_grad(folds.closed_form(phi), phi)
        >>> bool(grad.abs().max() < 1e-12)
        True
        """
        theta = theta.detach()
        with torch.no_grad():
            if self.method == "primal":
                Gw = _bmv(self.gram, theta)
                data_grad = Gw - self.rhs
                value = 0.5 * (theta * Gw).sum() - (self.rhs * theta).sum()
            else:
                resid = self.ys - _rows_mv(self.Xs, theta)
                data_grad = -_rows_rmv(self.Xs, resid)
                value = 0.5 * (resid * resid).sum()
        # the penalty terms keep phi's graph (the implicit strategies' mixed term)
        a = self._alpha(phi)
        return value + 0.5 * (a * theta * theta).sum(), data_grad + a * theta

    def hessian_preconditioner(self, theta, phi):
        """The exact inverse Hessian of :meth:`inner_loss`, per fold (``None``
        if a factorization fails).

        The Hessian ``C_k + diag(alpha_k)`` does not depend on ``theta``; it
        is factored as in :meth:`coef` (``p x p`` Cholesky, or the Woodbury
        form's ``n x n`` one), so the implicit strategies' conjugate gradient
        converges in one or two products whatever the spread of the
        penalties. (With the Jacobi diagonal alone, penalties spanning 18
        decades left a relative residual of ``2e-9`` after 1000 iterations.)

        Returns
        -------
        callable or None
            ``r -> H^{-1} r`` on tensors shaped like ``theta``.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
        >>> folds = RidgeFolds(X, X[:, 0], torch.ones(3, dtype=torch.float64), fit_intercept=False)
        >>> phi = torch.zeros(2, dtype=torch.float64)  # alpha = 1
        >>> inv = folds.hessian_preconditioner(folds.init_theta(), phi)
        >>> H = torch.tensor([[3.0, 2.0], [2.0, 9.0]], dtype=torch.float64)  # X^T X + I
        >>> torch.allclose(inv(torch.tensor([[1.0, 0.0]], dtype=torch.float64)),
        ...                torch.linalg.inv(H)[0:1], atol=1e-12)
        True
        """
        with torch.no_grad():
            a = self._alpha(phi.detach()).expand(self.n_folds, -1)
            if self.method == "primal":
                L, info = _primal_factor(self.gram, a)
            else:
                XA, F, info = _dual_factor(self._Xs_wide, a)
        if bool((info != 0).any()):
            return None
        if self.method == "primal":
            return lambda r: _cho_solve(L, r.detach())

        refine = _dual_checked(self._dual_sq, a)
        return lambda r: _dual_solve(F, XA, self._Xs_wide, a, r.detach(), refine)

    def hessian_diagonal(self, theta, phi):
        """Exact diagonal of the Hessian of :meth:`inner_loss`: ``diag(C_k) + alpha``.

        ``C_k`` is fold ``k``'s centred Gram matrix (``Xs^T Xs`` in the dual
        form); the Hessian does not depend on ``theta``. The implicit
        strategies precondition their conjugate gradients with it, which
        matters when the penalties span many decades (the adaptive model's
        do).

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0]], dtype=torch.float64)
        >>> folds = RidgeFolds(X, X[:, 0], torch.ones(3, dtype=torch.float64), fit_intercept=False)
        >>> folds.hessian_diagonal(folds.init_theta(), torch.zeros(2, dtype=torch.float64)).tolist()
        [[3.0, 9.0]]
        """
        with torch.no_grad():
            a = self._alpha(phi.detach()).expand(self.n_folds, -1)
            if self.method == "primal":
                return torch.diagonal(self.gram, dim1=-2, dim2=-1) + a
            return self._dual_sq.to(a.dtype) + a

    def intercepts(self, theta):
        """Intercept of every fold, ``y_offset - X_offset @ w``: shape ``(n_folds,)``
        (``(n_folds, S)`` for ``S`` coefficient vectors per fold, ``theta`` of
        shape ``(n_folds, S, n_features)``)."""
        X_offset, y_offset = self.X_offset, self.y_offset
        if theta.ndim == 3:
            X_offset, y_offset = X_offset[:, None], y_offset[:, None]
        return y_offset - (X_offset * theta).sum(-1)

    def predict(self, theta, X):
        """Predictions of every fold's model on ``X``: shape ``(n_folds, len(X))``."""
        return (X @ theta.T).T + self.intercepts(theta)[:, None]

    def validation_loss(self, theta):
        """Sum over folds of the ``val_weights``-weighted mean squared error.

        Only each fold's validation rows are predicted (gathered once).
        ``theta`` of shape ``(n_folds, S, n_features)`` (``S`` coefficient
        vectors per fold) gives the ``S`` losses. Differentiable in ``theta``
        (first order; ``X`` and ``y`` are data, not differentiated).
        """
        if self.val_weights is None:
            raise ValueError("validation_loss needs val_weights.")
        # one matrix-vector product per fold (several times faster than a batched
        # product over zero-padded rows), in one autograd node
        return _FoldValidationLoss.apply(theta, self._val_rows)

    def fold_losses(self, theta):
        """Every fold's weighted mean squared validation error, ``(n_folds,)``
        (no graph; :meth:`validation_loss` is their sum).

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
        >>> T = torch.ones(2, 20, dtype=torch.float64)
        >>> T[0, :10] = 0
        >>> T[1, 10:] = 0
        >>> folds = RidgeFolds(X, X[:, 0], T, val_weights=1 - T)
        >>> w = folds.closed_form(torch.zeros(3, dtype=torch.float64))
        >>> per_fold = folds.fold_losses(w)
        >>> per_fold.shape, bool(torch.isclose(per_fold.sum(), folds.validation_loss(w)))
        (torch.Size([2]), True)
        """
        if self.val_weights is None:
            raise ValueError("validation_loss needs val_weights.")
        _, _, losses = _fold_squared_errors(theta, self._val_rows)
        return torch.as_tensor(
            np.asarray([float(v) for v in losses]), dtype=theta.dtype, device=theta.device
        )

    def validation_curve(self, log_alphas, phi=None):
        """Summed validation loss at many shared log-penalties (no autograd).

        Every feature gets the penalty ``exp(log_alpha)`` (whatever the
        penalty model); with ``phi``, the model's penalties at ``phi`` are
        scaled by it instead (``log_alpha`` shifts every log-penalty, a curve
        along the model's level). Returns a tensor of shape
        ``(len(log_alphas),)``. In the dual form each fold's ``Xs Xs^T`` (of
        the rows scaled by ``alpha^(-1/2)`` with ``phi``) is diagonalized
        once, so a penalty costs matrix-vector products instead of a
        factorization (``w = Xs^T U diag(1 / (lambda + alpha)) U^T ys``); in
        the primal form a ``p x p`` eigendecomposition costs more than the
        Cholesky factorizations of a scan, which are used instead. The dual
        curve is not refined as :meth:`coef` is: at a penalty far below its
        feature's squared norm it loses the digits that ratio costs (one
        penalty at 6e-15 times it: 1.7e-4 of the validation loss; at 2e-9,
        5e-9). A scan only brackets the minimum for the exact
        :meth:`value_and_grad`; refining its points would cost a solve each
        (26 of the 91 points of a wide HyperL2Regressor fit's curves, each
        a factorization of the folds' kernels).

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(30, 50, generator=g, dtype=torch.float64)
        >>> y = X[:, 0] + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
        >>> train = torch.ones(2, 30, dtype=torch.float64)
        >>> train[0, :15] = 0
        >>> train[1, 15:] = 0
        >>> folds = RidgeFolds(X, y, train, val_weights=1 - train)  # 50 > 15: dual form
        >>> phi = torch.linspace(-2.0, 2.0, 50, dtype=torch.float64)
        >>> curve = folds.validation_curve([-1.0, 1.0], phi=phi)
        >>> shifted = folds.validation_loss(folds.closed_form(phi + 1.0))
        >>> bool(torch.isclose(curve[1], shifted))
        True
        """
        log_alphas = torch.as_tensor(log_alphas, dtype=self.X.dtype).reshape(-1)
        out = []
        with torch.no_grad():
            p = self.X.shape[1]
            base = (
                self.y.new_ones(self.n_folds, p)
                if phi is None
                else self._alpha(phi.detach()).expand(self.n_folds, -1)
            )
            if self.method == "dual":
                # every penalty at once, in float64 as the factorizations
                # (_wide): coefficients (K, S, p)
                base = _wide(base)
                shifts = _wide(log_alphas).exp()
                kernel, scaled = _dual_kernel(self._Xs_wide, base)
                lam, U = torch.linalg.eigh(kernel)  # (K, m), (K, m, m)
                d = _bmv(U.mT, self._ys_wide)[..., None] / (lam[..., None] + shifts)
                if scaled is None:  # sparse rows: A^-1 Xs^T as a product
                    coef = (self.Xs.rmv(U @ d) / base[..., None]).mT
                else:
                    coef = (scaled.mT @ (U @ d)).mT * base.rsqrt()[:, None, :]
                return self.validation_loss(coef.to(self.ys.dtype))
            for la in log_alphas.tolist():
                out.append(self.validation_loss(self.coef(base * math.exp(la))))
        return torch.stack(out)

    def value_grad_hessian(self, phi):
        """Validation loss summed over folds, its gradient and its Hessian in ``phi``.

        In closed form, for penalty models with few parameters ``m`` (the
        adaptive model's two): with ``S = C + diag(alpha)`` (per fold), ``w =
        S^-1 r``, the validation gradient ``g = -2 Xc^T (v res)``, ``lam = S^-1
        g``, ``D_a = alpha * B_a`` (``B = d log(alpha) / d phi``) and ``J_a =
        -S^-1 (D_a w)`` (``d w / d phi_a``)::

            grad_a = -lam^T (D_a w)
            H_ab = 2 sum_i v_i (Xc J_a)_i (Xc J_b)_i
                   - lam^T (D_b J_a + D_a J_b + alpha B_a B_b w)

        One factorization and ``m + 2`` solves per fold (``m`` for ``J``):
        a Newton step on the outer problem costs little more than a gradient.

        Returns
        -------
        value : tensor
        grad : tensor of shape (m,)
        hessian : tensor of shape (m, m)

        Raises
        ------
        torch.linalg.LinAlgError
            When a fold's system cannot be factored by Cholesky.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import RidgeFolds
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(40, 3, generator=g, dtype=torch.float64)
        >>> y = X @ torch.tensor([1.0, 0.0, -2.0], dtype=torch.float64)
        >>> y = y + torch.randn(40, generator=g, dtype=torch.float64)
        >>> train = torch.ones(2, 40, dtype=torch.float64)
        >>> train[0, :20] = 0
        >>> train[1, 20:] = 0
        >>> folds = RidgeFolds(X, y, train, val_weights=1 - train)
        >>> phi = torch.zeros(3, dtype=torch.float64)
        >>> value, grad, hess = folds.value_grad_hessian(phi)
        >>> bool(torch.allclose(grad, folds.value_and_grad(phi)[1], atol=1e-12))
        True
        >>> e = torch.tensor([1e-6, 0.0, 0.0], dtype=torch.float64)  # first column
        >>> fd = (folds.value_and_grad(phi + e)[1] - folds.value_and_grad(phi - e)[1]) / 2e-6
        >>> bool(torch.allclose(hess[:, 0], fd, rtol=1e-6, atol=1e-8))
        True
        """
        if self.val_weights is None:
            raise ValueError("value_grad_hessian needs val_weights.")
        _check_tensors("RidgeFolds.value_grad_hessian", phi=phi)
        with torch.no_grad():
            # in the data's precision (a float32 phi on float64 data failed in
            # torch: "expected scalar type Double but found Float")
            phi = phi.detach().to(self.y)
            a = self._alpha(phi).expand(self.n_folds, -1)  # (K, p)
            B = self._log_penalty.jacobian(self.n_folds, a)  # (K, p, m)
            m = B.shape[-1]
            # the exact inverse Hessian of the folds' ridge systems (its theta is unused)
            solve = self.hessian_preconditioner(None, phi)
            rhs = self.rhs if self.method == "primal" else self._dual_rhs
            if solve is None:
                raise torch.linalg.LinAlgError(
                    "value_grad_hessian: a fold's ridge system is not numerically "
                    "positive definite at these penalties (value_and_grad falls back "
                    "to an LU solve there)."
                )
            w = solve(rhs).to(a.dtype)
            D = a[..., None] * B  # (K, p, m)
            J = -torch.stack([solve(D[..., j] * w) for j in range(m)], -1)  # (K, p, m)
            numpy, weighted, losses = _fold_squared_errors(w, self._val_rows)
            value = sum(float(loss) for loss in losses)
            Jn = J.cpu().numpy() if numpy else J
            g, XJ = [], []
            for (Xc, _, v), wr, Jk in zip(self._val_rows, weighted, Jn):
                g.append(-2.0 * (Xc.T @ wr))
                XJ.append((Xc @ Jk) * (v**0.5)[:, None])
            g = torch.as_tensor(np.stack(g) if numpy else torch.stack(g), device=a.device)
            XJ = [torch.as_tensor(xj, device=a.device) for xj in XJ]
            lam = solve(g)  # (K, p)
            grad, penalty = _penalty_derivatives(lam, a, B, w, J)
            hess = 2.0 * sum(xj.T @ xj for xj in XJ) + penalty
        return torch.as_tensor(value, dtype=a.dtype), grad, 0.5 * (hess + hess.T)

    def value_and_grad(self, phi, hypergradient="closed_form", init=None):
        """Validation loss summed over folds, its gradient in ``phi``, info, coefficients.

        ``hypergradient`` is any strategy: ``"closed_form"`` (default, exact;
        :class:`~skbilevel.hypergrad.ClosedForm`), ``"cg"``, ``"dense"``, or
        an instance; implicit strategies use this class as their (exact)
        inner solver.
        """
        if hypergradient == "closed_form":
            hypergradient = ClosedForm()
        if init is None:
            init = self.init_theta()
        # the object itself as inner loss: the implicit strategies find its diagonal
        return _value_and_grad(self, phi, hypergradient, self, init, inner_loss=self)


# --------------------------------------------------------------------------
# Exact leave-one-out error of ridge with a diagonal penalty
# --------------------------------------------------------------------------


class _DualLOOResiduals(torch.autograd.Function):
    """:class:`RidgeLOO`'s leave-one-out residuals in the dual form (float64),
    from a QR factorization; gradient in ``alpha`` only, in closed form.

    With ``B = Xs A^{-1/2}``, ``M = (I + B B^T)^{-1} = W W^T`` where ``R``
    is the triangular factor of the stacked ``[B^T; I]`` (``R^T R = I + B
    B^T``) and ``W = R^{-1}``. With ``Q`` the deflated basis (the identity
    without an intercept), ``d = diag(Q M Q^T)`` is the squared row norms
    of ``Q W`` and ``e = Q W W^T ys / d``: no difference of large terms.
    ``dM / dalpha_j = z_j z_j^T`` with ``z_j = M x_j / alpha_j``, so::

        de_i / dalpha_j = ((Q z_j)_i (z_j^T ys) - e_i (Q z_j)_i^2) / d_i

    The rows of ``[B^T; I]`` (``|x_j| / sqrt(alpha_j)``, then 1) are sorted
    by decreasing norm before Householder QR, which is then accurate row by
    row however their scales differ. Against mpmath (60 digits, 25 x 50 to
    40 x 120, penalties over +-3 to +-12 decades) the value and gradient
    are within 1e-14; the explicit inverse of ``I + B B^T`` they replace
    was within 1e-13 at +-3 decades, 1e-11 at +-6 and 1.5e-5 at +-12, and
    autograd through it lost a further ``eps |x_j|^2 / alpha_j`` of the
    gradient (the regression test's 40 x 120 at +-12 decades: 7e-4).
    """

    @staticmethod
    def forward(ctx, alpha, Xs, ys, sq, v, beta):
        m = Xs.shape[0]
        eye = torch.eye(m, dtype=Xs.dtype, device=Xs.device)
        order = torch.argsort(sq / alpha, descending=True)  # sq: |x_j|^2
        # [B^T; I] as the transpose of its rows: column-major, as LAPACK takes it
        T = torch.cat([Xs.index_select(1, order).mul_(alpha[order].rsqrt()), eye], 1)
        R = torch.linalg.qr(T.mT, mode="r").R
        W = torch.linalg.solve_triangular(R, eye, upper=True)  # M = W W^T
        QW = W if v is None else _reflect(W, v, beta)
        d = (QW * QW).sum(1)
        e = (QW @ (W.T @ ys)) / d
        ctx.save_for_backward(alpha, Xs, ys, W, QW, d, e)
        return e

    @staticmethod
    @_first_order
    def backward(ctx, grad_e):
        alpha, Xs, ys, W, QW, d, e = ctx.saved_tensors
        c = grad_e.to(e.dtype)
        WX = W.T @ Xs
        Y = (QW @ WX).div_(alpha)  # Q z_j, (n, p)
        zy = (WX.T @ (W.T @ ys)) / alpha  # z_j^T ys
        grad = zy * (Y.T @ (c / d)) - (Y * Y).T @ (c * e / d)
        return grad, None, None, None, None, None


class RidgeLOO:
    """Exact leave-one-out squared error of ridge with a diagonal penalty.

    For the weighted ridge problem of :class:`RidgeFolds` on all samples
    (weights ``s``), rescale rows by ``sqrt(s)`` after weighted centering:
    ``Xs``, ``ys``. The fit is a linear smoother with hat matrix
    ``H = q q^T + Xs (Xs^T Xs + A)^{-1} Xs^T``, ``A = diag(alpha)``, where
    ``q = sqrt(s) / ||sqrt(s)||`` accounts for the unpenalized intercept
    (``q = 0`` without one). Removing sample ``i`` gives the residual
    ``e_i = r_i / (1 - H_ii)`` with ``r = ys - H ys`` (in ``sqrt(s)`` units),
    and the returned error is ``sum_i e_i^2 / sum_i s_i``: the
    ``s``-weighted mean of ``(y_i - y_loo,i)^2``. This is exact, not an
    approximation (Allen 1974; it is what ``RidgeCV`` computes for a
    scalar alpha).

    - ``p <= n`` (primal): ``Z = (Xs^T Xs + A)^{-1} Xs^T`` by one p x p
      solve with n right-hand sides, ``H_ii = q_i^2 + (Xs Z)_ii``; cost
      ``O(n p^2)`` per evaluation.
    - ``p > n`` (dual, Woodbury): with ``K = Xs A^{-1} Xs^T`` and
      ``M = (K + I)^{-1}``, ``r = M ys`` and ``1 - H_ii = M_ii - q_i^2``;
      cost ``O(n^2 p + n^3)``, in float64 whatever the data's precision
      (as :class:`RidgeFolds`' dual form), returned in the data's. With an
      intercept, on the complement of ``q`` (a Householder reflection; ``q``
      is a null vector of ``K``), where ``1 - H_ii`` is a diagonal entry of
      its own rather than that difference, which near interpolation loses
      every digit (penalties over +-12 decades: 32% off). ``M`` is never
      inverted: ``M = W W^T`` with ``W`` the inverse of the triangular
      factor of ``[A^{-1/2} Xs^T; I]``, its rows sorted by norm, so that
      penalties over many decades keep every digit (``_DualLOOResiduals``;
      against mpmath within 1e-14 where the explicit inverse was 1e-13 off
      at +-3 decades and 1.5e-5 at +-12).

    Derivatives in ``phi`` come from autograd through these formulas, but
    the dual form's derivative in the penalties is in closed form, from the
    same factor (autograd through the explicit inverse lost a further ``eps
    |x_j|^2 / alpha_j``: 7e-4 of the gradient on 40 x 120 at +-12 decades;
    now 1e-14). It is first-order only: a second derivative raises
    (``method="primal"`` has them).

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
    y : tensor of shape (n_samples,)
    sample_weight : tensor of shape (n_samples,), optional
    groups : long tensor of shape (n_features,), optional
    fit_intercept : bool, default=True
    method : {"auto", "primal", "dual"}, default="auto"

    Examples
    --------
    With one shared penalty the value equals scikit-learn's ``RidgeCV``
    leave-one-out error:

    >>> import numpy as np, torch
    >>> from sklearn.linear_model import RidgeCV
    >>> from skbilevel.hypergrad import RidgeLOO
    >>> rng = np.random.RandomState(0)
    >>> X, y = rng.randn(30, 4), rng.randn(30)
    >>> loo = RidgeLOO(torch.tensor(X), torch.tensor(y))
    >>> ours = float(loo(torch.zeros(4, dtype=torch.float64)))
    >>> ref = -RidgeCV(alphas=[1.0], scoring=None).fit(X, y).best_score_
    >>> bool(abs(ours - ref) < 1e-10)
    True
    """

    def __init__(
        self, X, y, sample_weight=None, groups=None, fit_intercept=True, method="auto"
    ):
        # dense, 2-D, floating-point, finite (a CSR X had failed inside torch:
        # "torch.empty: Only batched sparse compressed (non-block) tensors are
        # supported"; a NaN gave NaN values silently)
        y, _ = _check_ridge_data(X, y, where="RidgeLOO")
        n, p = X.shape
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},); got {tuple(y.shape)}.")
        s = (
            X.new_ones(n)
            if sample_weight is None
            else _check_weights(sample_weight, n, X, "sample_weight", vector=True)[0]
        )
        if fit_intercept:
            _check_loo_samples(int((s > 0).sum()), n, "RidgeLOO")
        self.method = method = _ridge_method(method, n, p)
        self._log_penalty = _LogPenalty(
            p, 1, X.device, groups, where="RidgeLOO", inverted=method == "dual"
        )
        self.groups = self._log_penalty.groups
        self.n_groups = self._log_penalty.n_params
        self.fit_intercept = bool(fit_intercept)
        sqrt_s = s.sqrt()
        self.s_sum = s.sum()
        if self.fit_intercept:
            X_offset = (s @ X) / self.s_sum
            y_offset = (s @ y) / self.s_sum
            self.q_sq = s / self.s_sum
        else:
            X_offset, y_offset = X.new_zeros(p), X.new_zeros(())
            self.q_sq = X.new_zeros(n)
        self.Xs = (X - X_offset) * sqrt_s[:, None]
        self.ys = (y - y_offset) * sqrt_s
        self.gram = _gram(self.Xs) if method == "primal" else None
        # the dual form's rows, targets, the rows' squared column norms and the
        # intercept's reflection (v, beta), in float64 (_wide)
        self._dual = None
        if method == "dual":
            Xw, yw = _wide(self.Xs), _wide(self.ys)
            v = beta = None
            if self.fit_intercept:
                # on the complement of the intercept direction q (an exact null
                # vector of the centred kernel): there 1 - H_ii is a diagonal of
                # its own instead of M_ii - q_i^2, two terms near 1/n whose
                # difference is tiny near interpolation (penalties over +-9
                # decades: 1.3% off a brute-force refit, +-12: 32%; now 1e-10 and
                # 2e-7) (the reflection H = I - beta v v^T; its last n - 1 columns
                # Q are the basis, never formed: _deflate and _reflect apply it)
                v, beta = _intercept_reflection(_wide(sqrt_s))
                Xw, yw = _deflate(Xw, v, beta), _deflate(yw, v, beta)  # (n - 1) rows
            self._dual = (Xw, yw, (Xw * Xw).sum(0), v, beta)

    def residuals(self, phi):
        """Leave-one-out residuals ``sqrt(s_i) (y_i - y_loo,i)``, differentiable."""
        if self.method == "primal":
            # in the data's precision, as RidgeFolds (the cast is in the graph:
            # the gradient comes back in phi's). A float64 phi on float32 data
            # failed in torch: "linalg.solve: Expected A and B to have the same
            # dtype"; the dual form below works in float64 either way
            _check_tensors("RidgeLOO", phi=phi)
            a = self._log_penalty(phi.to(self.Xs.dtype))
            Z = torch.linalg.solve(self.gram + torch.diag(a), self.Xs.T)  # (p, n)
            w = Z @ self.ys
            r = self.ys - self.Xs @ w
            h = (self.Xs * Z.T).sum(1) + self.q_sq
            return r / (1.0 - h)
        a = self._log_penalty(phi)
        # in float64 (_wide), as RidgeFolds' Woodbury form: in float32 the
        # kernel's entries of 1/alpha_min beside the identity are lost (60 x 200,
        # penalties from 1e-6 to 1e6: a LOO error of 0.00034 against 13.02)
        out = torch.promote_types(self.Xs.dtype, a.dtype)
        return _DualLOOResiduals.apply(_wide(a), *self._dual).to(out)

    def __call__(self, phi):
        """Weighted mean squared leave-one-out error at ``alpha = exp(phi)[groups]``."""
        e = self.residuals(phi)
        return (e * e).sum() / self.s_sum

    def validation_curve(self, log_alphas):
        """LOO error at many shared log-penalties (no autograd): shape ``(len(log_alphas),)``."""
        out = []
        with torch.no_grad():
            for la in torch.as_tensor(log_alphas, dtype=self.Xs.dtype).reshape(-1):
                out.append(self(self.Xs.new_full((self.n_groups,), float(la))))
        return torch.stack(out)

    def value_and_grad(self, phi):
        """LOO error, its gradient in ``phi`` (autograd) and a health record."""
        _check_tensors("RidgeLOO.value_and_grad", phi=phi)
        phi = phi.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            value = self(phi)
            (grad,) = torch.autograd.grad(value, phi)
        info = HypergradientInfo(
            strategy="closed_form",
            inner_iterations=1,
            inner_converged=True,
            extra={"objective": "leave_one_out", "method": self.method},
        )
        return value.detach(), grad.detach(), info


# --------------------------------------------------------------------------
# Logistic regression on K folds
# --------------------------------------------------------------------------


class _Point:
    """A point ``theta`` of :class:`LogisticFolds` as its caches know it: the
    leaves (the objects and their versions) and copies of their values.

    The same leaves unmodified since, or leaves of equal values, are the
    same point: a warm-started solve starts from a copy of the last
    solution, whose probabilities and gradient's data part need no second
    computation (9 of the 42 gradients of a make_classification fit, 18 of
    a digits fit's 65).
    """

    __slots__ = ("leaves", "versions", "values")

    def __init__(self, theta):
        self.leaves = self._leaves(theta)
        self.versions = tuple(t._version for t in self.leaves)
        self.values = tuple(t.detach().clone() for t in self.leaves)

    @staticmethod
    def _leaves(theta):
        return tuple(theta[k] for k in ("coef", "intercept") if k in theta)

    def holds(self, theta):
        """Whether ``theta`` is this point."""
        leaves = self._leaves(theta)
        if len(leaves) != len(self.leaves):
            return False
        if all(a is b for a, b in zip(leaves, self.leaves)) and self.versions == tuple(
            t._version for t in leaves
        ):
            return True
        return all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.detach(), b)
            for a, b in zip(leaves, self.values)
        )


class LogisticFolds(_PenaltyModel):
    """Binary or multinomial logistic regression with a diagonal L2 penalty on K folds.

    Fold ``k`` (training weights ``t_k``) solves::

        min_{W, b}  sum_i t_ki CE(x_i W + b, y_i) + 1/2 sum_j alpha_j ||W_j||^2

    with ``alpha_j = exp(phi[groups[j]])`` (``alpha = 1 / C`` of
    scikit-learn's ``LogisticRegression``) and an unpenalized intercept.
    Binary problems use one logit column (``W`` of shape ``(p, 1)``);
    multinomial ones use ``n_classes`` columns with the last intercept fixed
    at zero, which removes the shift invariance of the softmax so the inner
    Hessian is positive definite (the L2 penalty already fixes ``W``).

    The folds are solved together as one problem (the sum of the fold
    objectives, divided by the mean training weight so gradients are of
    order one; the minimizer is unchanged) by an iterative solver to a
    gradient tolerance, warm-started from the previous solution, and
    differentiated implicitly (``"cg"`` by default; the Hessian is block
    diagonal over folds).

    The object is its own inner loss (``folds(theta, phi)`` is
    :meth:`inner_loss`) and supplies the exact diagonal of its Hessian,
    :meth:`hessian_diagonal`: :class:`~skbilevel.hypergrad.NewtonCG` and
    :class:`~skbilevel.hypergrad.ImplicitCG` precondition their conjugate
    gradients with it, which matters when the penalties span decades. It
    also supplies its gradient and Hessian-vector products in closed form,
    :meth:`loss_and_grad` and :meth:`hvp` (two matrix products each, no
    autograd), which those solvers use instead of autograd.

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
        Dense, or sparse (CSR, COO or CSC; kept as CSR): every product with
        ``X`` is then a sparse one, so a term-document matrix of 1% density
        costs about a hundredth of its dense form, in time and memory (its
        dense form is only built when the per-fold Hessian blocks are, with
        at most ``_BLOCK_MAX_FEATURES`` features).
    y : long tensor of shape (n_samples,)
        Class indices ``0..n_classes-1``.
    n_classes : int
        At least 2.
    train_weights : tensor of shape (n_folds, n_samples) or (n_samples,)
    val_weights : tensor of shape (n_folds, n_samples), optional
    groups : long tensor of shape (n_features,), optional
    fit_intercept : bool, default=True
    hvp_dtype : torch.dtype, optional
        Precision of the two matrix products of :meth:`hvp` (``X`` is then
        also held in it, with its transpose); default: ``X``'s. ``float32``
        for float64 ``X`` halves the memory they stream, which bounds their
        speed when ``X`` is large: conjugate gradient needs directions, not
        16 digits, and the gradient, the values and the solutions stay in
        ``X``'s precision, so the solves reach the same tolerances. (A wide
        binary HyperL2Classifier fit, 500 x 2000 in five folds: 3.4 -> 2.2
        s, the same test log-loss to 1e-8.)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import LogisticFolds
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    >>> y = (X[:, 0] > 0).long()
    >>> train = torch.ones(2, 60, dtype=torch.float64)
    >>> train[0, :30] = 0
    >>> train[1, 30:] = 0
    >>> folds = LogisticFolds(X, y, 2, train, val_weights=1 - train)
    >>> value, grad, info, theta = folds.value_and_grad(torch.zeros(3, dtype=torch.float64))
    >>> theta["coef"].shape, grad.shape, info.strategy, info.inner_converged
    (torch.Size([3, 2, 1]), torch.Size([3]), 'cg', True)
    """

    def __init__(
        self,
        X,
        y,
        n_classes,
        train_weights,
        val_weights=None,
        groups=None,
        fit_intercept=True,
        hvp_dtype=None,
    ):
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}.")
        if hvp_dtype is not None and not (
            isinstance(hvp_dtype, torch.dtype) and hvp_dtype.is_floating_point
        ):
            raise ValueError(
                f"hvp_dtype must be None or a floating torch dtype, got {hvp_dtype!r}."
            )
        self._sparse = X.layout != torch.strided
        if self._sparse:
            X = to_csr(X)
        n, p = X.shape
        if int(n_classes) < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes}.")
        y = torch.as_tensor(y, device=X.device)
        integral = _integral(y)
        y = y.long()
        if (
            y.shape != (n,)
            or not integral
            or (n and (int(y.min()) < 0 or int(y.max()) >= n_classes))
        ):
            raise ValueError(f"y must hold {n} class indices in [0, {n_classes}).")
        self.X, self.y, self.n_classes = X, y, int(n_classes)
        self.train_weights = _check_weights(train_weights, n, X, "train_weights")
        self.val_weights = (
            None
            if val_weights is None
            else _check_weights(
                val_weights, n, X, "val_weights", n_folds=self.train_weights.shape[0]
            )
        )
        self._set_penalty(groups)
        self.fit_intercept = bool(fit_intercept)
        self.n_out = 1 if self.n_classes == 2 else self.n_classes
        self._scale = float(self.train_weights.sum(1).mean())
        # (n, K) layouts matching the logits
        self._train_t = self.train_weights.T.contiguous()
        self._val_t = (
            None if self.val_weights is None else self.val_weights.T.contiguous()
        )
        if self.n_out == 1:
            self._sign = (2.0 * y.to(X.dtype) - 1.0)[:, None]
        else:
            self._onehot = torch.nn.functional.one_hot(y, self.n_classes).to(X.dtype)[
                :, None, :
            ]
        self.theta_ = None  # warm start
        self._X_sq = None  # X ** 2, built on the first hessian_diagonal call
        self._X_aug = None  # [X, 1] dense, built on the first hessian_preconditioner call
        self._X_aug_hvp = None  # _X_aug in hvp_dtype (_weighted_gram)
        self._neg_sign = None  # -(2 y - 1) as (1, 1, n): _binary_curvature
        self._curvature_at = None  # [_Point, (P, w), copies]: _curvature
        # (_Point, data loss, X^T R, sum R, per-sample losses): loss_and_grad
        self._data_at = None
        self._XT = None  # X.T contiguous (or CSR), built on its first use (_transposed)
        self._gram_at = None  # (curvature weights, weighted Gram) of hessian_preconditioner
        self._factor_at = None  # (weighted Gram, penalties, factor) of _hessian_factor
        self._penalty_at = None  # (phi, key, penalties) of _penalty
        self._solved_at = None  # (penalties, solution) of the last solve: fold_losses_at
        self._train_rows = None  # each fold's rows of nonzero training weight (_weighted_gram)
        # X and X^T in hvp_dtype for hvp's products (built now: the copies that
        # reparametrized() makes share them)
        self.hvp_dtype = X.dtype if hvp_dtype is None else hvp_dtype
        self._hvp_X = None
        if self.hvp_dtype != X.dtype:
            self._hvp_X = (X.to(self.hvp_dtype), self._transposed().to(self.hvp_dtype))

    @property
    def n_folds(self):
        return self.train_weights.shape[0]

    def __call__(self, theta, phi):
        """:meth:`inner_loss`: the object is the inner loss it carries a diagonal for."""
        return self.inner_loss(theta, phi)

    def init_theta(self):
        """Zero coefficients ``(p, n_folds, n_out)`` and intercepts ``(n_folds, .)``."""
        K, p = self.n_folds, self.X.shape[1]
        theta = {"coef": self.train_weights.new_zeros(p, K, self.n_out)}
        if self.fit_intercept:
            theta["intercept"] = self.train_weights.new_zeros(
                K, 1 if self.n_out == 1 else self.n_out - 1
            )
        return theta

    def logits(self, theta, X=None):
        """Logits of every fold's model: shape ``(n, n_folds, n_out)``.

        One matrix product for all folds: ``X @ coef.reshape(p, K * n_out)``
        (its backward pass is one product too, several times cheaper than a
        batched product over an expanded ``X``). Binary logits on the
        training data are computed as ``(coef^T X^T)^T`` with ``X^T`` stored
        contiguous: twice as fast on CPU for a column per fold (1400 x 50 by
        50 x 5: 29 against 60 microseconds), and their samples-last layout
        is the one :meth:`_curvature` wants. (Multinomial logits keep the
        classes last, where the softmax reduces.)
        """
        W = theta["coef"]
        p, K, c = W.shape
        if X is None and c == 1 and not self._sparse:
            n = self.X.shape[0]
            out = _matmul(W.reshape(p, K * c).T, self._transposed()).T.reshape(n, K, c)
        else:
            X = self.X if X is None else X
            out = _matmul(X, W.reshape(p, K * c)).reshape(X.shape[0], K, c)
        if self.fit_intercept:
            b = theta["intercept"]
            if self.n_out > 1:
                b = torch.cat([b, b.new_zeros(b.shape[0], 1)], dim=1)
            out = out + b
        return out

    def _transposed(self):
        """``X^T``, stored: contiguous (dense ``X``) or CSR (sparse ``X``)."""
        if self._XT is None:
            self._XT = csr_transpose(self.X) if self._sparse else self.X.T.contiguous()
        return self._XT

    def _dense_X(self):
        """``X`` as a dense tensor (a copy when it is sparse)."""
        return self.X.to_dense() if self._sparse else self.X

    def _penalty(self, phi):
        """Penalty of every feature in every fold, shape ``(p, n_folds)``.

        The one place penalties are computed (:meth:`inner_loss`,
        :meth:`loss_and_grad`, :meth:`hvp`, :meth:`hessian_diagonal`), so
        nothing else assumes they are equal across folds. ``phi`` is cast to
        the data's precision first (as in :meth:`value_grad_hessian`; in the
        graph, so a gradient comes back in ``phi``'s): float64 penalties on
        float32 data made the implicit strategies' products mixed, and the
        hypergradient failed in torch ("dot : expected both vectors to have
        same dtype").

        Without a graph, the last result is reused for the same ``phi``
        (its memory and version, and the same penalty model): a Newton
        iteration asks for it five or six times (the map and its range check
        took 40 microseconds a call, 10% of a warm-started fold solve).
        """
        _check_tensors("LogisticFolds", phi=phi)
        phi = phi.to(self.X.dtype)
        key = None
        if not (phi.requires_grad and torch.is_grad_enabled()) and not phi.is_inference():
            # (the cache holds phi itself: its memory cannot be reused by another)
            key = (self._log_penalty, phi.data_ptr(), phi._version, phi.shape, phi.stride())
            cached = self._penalty_at
            if cached is not None and cached[1] == key:
                return cached[2]
        a = self._alpha(phi)  # (p,) or (n_folds, p)
        a = a[:, None].expand(a.shape[0], self.n_folds) if a.ndim == 1 else a.T
        if key is not None:
            self._penalty_at = (phi, key, a)
        return a

    def _curvature(self, theta, z=None, dtype=None):
        """Probabilities ``P`` (sigmoid, or softmax over classes) and the logit
        curvature's weight (binary: ``t P (1 - P)``; multinomial: ``t P``,
        with ``t`` the training weights), both ``(K, n_out, n)``; no graph.
        With ``dtype``, in that precision (copies cached with them).

        Samples last: products with ``X`` as ``(K n_out, n) @ (n, p)`` are
        about twice as fast as ``(p, n) @ (n, K n_out)`` for few columns.
        Cached for the last ``theta`` (:class:`_Point`): a Newton step and a
        CG solve apply many Hessian-vector products at one point. ``z``,
        when given, are the logits at ``theta``.
        """
        cached = self._curvature_at
        if cached is not None and cached[0].holds(theta):
            if dtype is None or dtype == cached[1][0].dtype:
                return cached[1]
            if cached[2] is None:
                cached[2] = tuple(t.to(dtype) for t in cached[1])
            return cached[2]
        with torch.no_grad():
            if z is None:
                z = self.logits({k: v.detach() for k, v in theta.items()})
            z = z.permute(1, 2, 0).contiguous()
            if self.n_out == 1:
                _, _, out = self._binary_curvature(z)
            else:
                P = torch.softmax(z, dim=1)
                out = (P, self.train_weights[:, None, :] * P)
        self._curvature_at = [_Point(theta), out, None]
        return out if dtype is None else self._curvature(theta, dtype=dtype)

    def _binary_curvature(self, z):
        """``m = -s z`` (``s = 2 y - 1``), ``Q = sigmoid(m)`` (the probability
        of the wrong class), and :meth:`_curvature`'s ``(P, t P (1 - P))``
        from the binary logits ``z`` in the samples-last layout ``(K, 1, n)``.

        ``P (1 - P)`` is ``Q sigmoid(-m)``, and ``P`` the one of ``Q`` and
        ``sigmoid(-m)`` that is the positive class's: no ``1 - P``, so no
        cancellation for confident samples.
        """
        if self._neg_sign is None:
            self._neg_sign = -self._sign.T[:, None, :]  # (1, 1, n)
        m = z * self._neg_sign
        Q = torch.sigmoid(m)
        Qc = torch.sigmoid(-m)
        P = torch.where(self._neg_sign < 0, Qc, Q)
        return m, Q, (P, self.train_weights[:, None, :] * Q * Qc)

    def _to_theta(self, R, V, a, X=None, XT=None):
        """``(X^T R + a V, sum_i R)``, divided by the scale, shaped like ``theta``.

        ``R`` (``(K, n_out, n)``) holds per-sample logit-space terms, ``V`` the
        coefficient part to penalize. ``X`` and ``XT`` (default: the data's)
        may be copies in another precision; the result is in ``V``'s.
        """
        return self._with_penalty(*self._data_products(R, V.dtype, X, XT), V, a)

    def _data_products(self, R, dtype, X=None, XT=None):
        """:meth:`_to_theta`'s ``X^T R`` (``(p, K, n_out)``) and ``sum_i R``
        (``(K, n_out)``, ``None`` without an intercept), in ``dtype``."""
        K, c, n = R.shape
        X = self.X if X is None else X
        Rh = R.reshape(K * c, n).to(X.dtype)
        if self._sparse:
            XT = self._transposed() if XT is None else XT
            XtR = (XT @ Rh.T).reshape(-1, K, c)
        else:
            XtR = _matmul(Rh, X).T.reshape(-1, K, c)
        b = R.sum(-1).to(dtype) if self.fit_intercept else None
        return XtR.to(dtype), b

    def _with_penalty(self, XtR, b, V, a):
        """:meth:`_to_theta` from its data products."""
        out = {"coef": (XtR + a[..., None] * V) / self._scale}
        if b is not None:
            out["intercept"] = (b if self.n_out == 1 else b[:, :-1]) / self._scale
        return out

    def loss_and_grad(self, theta, phi):
        """:meth:`inner_loss` and its gradient in ``theta``, in closed form.

        With ``P`` the model's probabilities, ``Y`` the targets (one-hot, or
        0/1 for the binary logit), ``t_k`` the training weights, ``a`` the
        penalties and ``s`` the mean training weight::

            d f / d W_k = (X^T (t_k (P_k - Y)) + a_k W_k) / s
            d f / d b_k = (sum_i t_ki (P_ik - Y_i)) / s

        (the last multinomial intercept is fixed, so its entry is dropped).
        One product with ``X`` and one with ``X^T``; no graph in ``theta``.
        The penalty terms keep ``phi``'s graph when ``phi`` requires grad,
        so the implicit strategies differentiate the gradient in ``phi``
        (their mixed second-order term) with one cheap backward pass.

        Returns
        -------
        value : tensor
            Scalar, :meth:`inner_loss` at ``(theta, phi)``.
        grad : dict
            Shaped like ``theta``.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 1]), 2, torch.ones(3, dtype=torch.float64))
        >>> value, grad = folds.loss_and_grad(folds.init_theta(), torch.zeros(2, dtype=torch.float64))
        >>> round(float(value), 6), [round(g, 6) for g in grad["coef"].flatten().tolist()]
        (0.693147, [0.333333, 0.416667])
        >>> round(float(grad["intercept"]), 6)
        -0.166667
        """
        a = self._penalty(phi)
        W = theta["coef"].detach()
        # the data part (loss, X^T R, sum R) of the last point (_Point): the
        # penalties change between solves, the point often not (a warm start
        # from the last solution; value_grad_hessian's correction at the
        # solution its solver just evaluated)
        cached = self._data_at
        if cached is None or not cached[0].holds(theta):
            with torch.no_grad():
                z = self.logits({k: v.detach() for k, v in theta.items()})
                if self.n_out == 1:
                    data, R, losses = self._binary_terms(theta, z)
                else:
                    P, _ = self._curvature(theta, z)  # (K, c, n)
                    losses = torch.logsumexp(z, dim=-1) - (z * self._onehot).sum(-1)
                    R = self.train_weights[:, None, :] * (
                        P - self._onehot.permute(1, 2, 0)
                    )
                    data = (self._train_t * losses).sum()
                XtR, b = self._data_products(R, W.dtype)
            self._data_at = (_Point(theta), data, XtR, b, losses)
        data, XtR, b = self._data_at[1:4]
        value = (data + 0.5 * (a[..., None] * W * W).sum()) / self._scale
        return value, self._with_penalty(XtR, b, W, a)

    def hvp(self, theta, phi, v):
        """Hessian of :meth:`inner_loss` in ``theta`` times ``v``, in closed form.

        With ``u = X V_k + v_b`` the direction in logit space, the curvature
        of the cross-entropy per sample is ``q u`` with ``q = P (1 - P)``
        (binary) or ``diag(P) - P P^T`` (multinomial, ``P u - P (P^T u)``)::

            H v = (X^T (t_k q u) + a_k V_k,  sum_i t_ki q u) / s

        Two matrix products for all folds, in ``hvp_dtype`` (the result in
        ``X``'s); no graph (``v`` and the result are detached trees shaped
        like ``theta``). The probabilities at ``theta`` are computed once and
        reused while ``theta`` is the same.

        Examples
        --------
        At ``theta = 0``, ``q = 1/4`` and ``s = 3``; along the first coefficient:

        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 1]), 2, torch.ones(3, dtype=torch.float64))
        >>> theta = folds.init_theta()
        >>> v = {"coef": torch.tensor([1.0, 0.0], dtype=torch.float64).reshape(2, 1, 1),
        ...      "intercept": torch.zeros(1, 1, dtype=torch.float64)}
        >>> hv = folds.hvp(theta, torch.zeros(2, dtype=torch.float64), v)
        >>> [round(x, 6) for x in hv["coef"].flatten().tolist()], hv["intercept"].tolist()
        ([0.5, 0.125], [[0.0]])
        """
        with torch.no_grad():
            a = self._penalty(phi.detach())
            X, XT = (self.X, self._transposed()) if self._hvp_X is None else self._hvp_X
            # the per-sample terms in the products' precision as well
            P, w = self._curvature(theta, dtype=X.dtype)  # (K, c, n)
            V = v["coef"].detach()
            p, K, c = V.shape
            Vh = V.reshape(p, K * c).to(X.dtype)
            if self._sparse:
                u = (X @ Vh).T.reshape(K, c, -1)
            else:
                u = _matmul(Vh.T, XT).reshape(K, c, -1)
            if self.fit_intercept:
                vb = v["intercept"].detach().to(X.dtype)
                if self.n_out > 1:
                    vb = torch.cat([vb, vb.new_zeros(vb.shape[0], 1)], dim=1)
                u = u + vb[..., None]
            if self.n_out == 1:
                R = w * u
            else:
                R = w * (u - (P * u).sum(1, keepdim=True))
            return self._to_theta(R, V, a, X, XT)

    def _binary_terms(self, theta, z):
        """The weighted training loss, its logit-space gradient ``R``
        (``(K, 1, n)``) and the per-sample losses (``(n, K)``, as
        :meth:`_losses`) of a binary problem, from one pass over the logits
        ``z``; they also fill :meth:`_curvature`'s cache for ``theta``.

        With ``s = 2 y - 1``, ``m = -s z`` and ``Q = sigmoid(m)`` (see
        :meth:`_binary_curvature`), ``P - y = -s Q`` without cancellation
        for confident samples, and the loss is ``log(1 + exp(m))``. Two
        sigmoids instead of three, on the samples-last layout throughout
        (make_classification's folds: 0.26 against 0.28 ms a call, 67 calls
        a fit).
        """
        m, Q, curvature = self._binary_curvature(z.permute(1, 2, 0))
        t = self.train_weights[:, None, :]  # (K, 1, n)
        losses = torch.logaddexp(m, torch.zeros((), dtype=m.dtype))  # (K, 1, n)
        data = torch.dot(t.reshape(-1), losses.reshape(-1))
        self._curvature_at = [_Point(theta), curvature, None]
        # the losses in _losses' layout (n, K), contiguous as its own
        return data, self._neg_sign * t * Q, losses[:, 0, :].T.contiguous()

    def _binary_losses(self, z):
        """``log(1 + exp(-s z))`` exactly: ``softplus`` is linear beyond 20, so
        its value would disagree with the closed-form gradient by ``exp(-20)``
        per sample, enough to stall a line search at tight tolerances."""
        return torch.logaddexp(-self._sign * z[..., 0], torch.zeros((), dtype=z.dtype))

    def _losses(self, theta):
        """Per-sample, per-fold cross-entropy: shape ``(n, n_folds)``.

        Outside a graph, those :meth:`loss_and_grad` computed at the same
        point: the validation loss at a solution the solver just evaluated
        (7 of a make_classification fit's 14 validation losses, 5 of a digits
        fit's 17)."""
        cached = self._data_at
        if (
            cached is not None
            and not any(t.requires_grad for t in theta.values())
            and cached[0].holds(theta)
        ):
            return cached[4]
        z = self.logits(theta)
        if self.n_out == 1:
            return self._binary_losses(z)
        return torch.logsumexp(z, dim=-1) - (z * self._onehot).sum(-1)

    def inner_loss(self, theta, phi):
        """Sum of the fold objectives divided by the mean training weight."""
        a = self._penalty(phi)
        W = theta["coef"]
        data = (self._train_t * self._losses(theta)).sum()
        pen = 0.5 * (a[..., None] * W * W).sum()
        return (data + pen) / self._scale

    def hessian_preconditioner(self, theta, phi, exact=False):
        """The inverse Hessian of a binary problem, per fold; ``None`` otherwise.

        With one logit the folds' Hessians are independent blocks of size
        ``p + 1`` (coefficients and intercept)::

            H_k = [[X^T diag(w_k) X + diag(alpha_k), X^T w_k],
                   [w_k^T X,                          sum w_k]] / s

        (``w_k = t_k P (1 - P)``, ``s`` the mean training weight). They are
        formed (``n (p + 1)^2`` operations per fold, about ``(p + 1) / 2``
        Hessian-vector products) and factored by Cholesky, so CG on the
        Newton system or the implicit linear system converges in one or two
        iterations instead of 10 to 35 with the Jacobi diagonal. Returns
        ``None`` (the Jacobi diagonal is then used) for multinomial
        problems, where a per-class block ignores the coupling between
        classes (on digits it cut the CG iterations only from 34 to 25, not
        worth forming ``K n_classes`` blocks), and beyond
        ``_BLOCK_MAX_FEATURES`` features.

        The weighted Gram matrix ``X^T diag(w_k) X`` is the expensive part;
        unless ``exact``, the last one is reused while the weights ``w_k``
        have moved by at most 10% (relative L1 distance, every fold) since it
        was formed (the penalties are always current). Conjugate gradient
        then takes a few more products, which are far cheaper: along the
        Newton iterations and outer steps of a fit, most calls reuse it
        (make_classification: fit 0.148 -> 0.121 s, the same log-loss to
        1e-5). It is formed in ``hvp_dtype`` unless ``exact``.

        Parameters
        ----------
        theta : dict
            The point of the Hessian, shaped like :meth:`init_theta`.
        phi : tensor
            The outer variables (penalties).
        exact : bool, default=False
            Form the Gram matrix at ``theta`` whatever the last one
            (:meth:`value_grad_hessian` needs the exact inverse).

        Returns
        -------
        callable or None
            ``r -> H^{-1} r`` on trees shaped like ``theta``.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 1]), 2, torch.ones(3, dtype=torch.float64))
        >>> theta, phi = folds.init_theta(), torch.zeros(2, dtype=torch.float64)
        >>> v = {"coef": torch.tensor([1.0, -2.0], dtype=torch.float64).reshape(2, 1, 1),
        ...      "intercept": torch.tensor([[0.5]], dtype=torch.float64)}
        >>> back = folds.hessian_preconditioner(theta, phi)(folds.hvp(theta, phi, v))
        >>> [round(x, 12) for x in back["coef"].flatten().tolist()], round(float(back["intercept"]), 12)
        ([1.0, -2.0], 0.5)
        """
        L = self._hessian_factor(theta, phi, exact)
        if L is None:
            return None
        p = self.X.shape[1]

        def apply(r):
            rc = r["coef"][:, :, 0].T  # (K, p)
            if self.fit_intercept:
                rc = torch.cat([rc, r["intercept"]], dim=1)
            z = _cho_solve(L, rc)
            out = {"coef": z[:, :p].T[..., None]}
            if self.fit_intercept:
                out["intercept"] = z[:, p:]
            return out

        return apply

    def _hessian_factor(self, theta, phi, exact=False):
        """Cholesky factor ``(K, q, q)`` of the binary per-fold Hessian blocks
        of :meth:`inner_loss` (coefficients, then the intercept), or ``None``
        (multinomial, too many features, or not positive definite); see
        :meth:`hessian_preconditioner`."""
        p = self.X.shape[1]
        if self.n_out != 1 or p > _BLOCK_MAX_FEATURES:
            return None
        with torch.no_grad():
            _, W = self._curvature(theta)  # (K, 1, n)
            w = W[:, 0, :]
            if self._X_aug is None:  # X with a column of ones for the intercept
                X = self._dense_X()
                self._X_aug = X if not self.fit_intercept else torch.cat(
                    [X, X.new_ones(X.shape[0], 1)], dim=1
                )
            cached = self._gram_at
            if (
                exact
                or cached is None
                or float(((w - cached[0]).abs().sum(-1) / cached[0].sum(-1)).max())
                > _GRAM_REFRESH
            ):
                cached = self._gram_at = (w, self._weighted_gram(w, exact))
            a = self._penalty(phi.detach()).T  # (K, p)
            # the same Gram matrix and penalties: the same factor (the Newton
            # iterations of a solve that reuse the Gram matrix, and the implicit
            # backward pass after it: 13 of a make_classification fit's 32)
            last = self._factor_at
            if last is not None and last[0] is cached[1] and torch.equal(last[1], a):
                return last[2]
            H = cached[1].to(self.X.dtype, copy=True)  # (K, q, q)
            idx = torch.arange(p, device=self.X.device)
            H[:, idx, idx] += a
            L, info = _cholesky_ex(H / self._scale, overwrite_a=True)
            L = None if bool((info != 0).any()) else L
            self._factor_at = (cached[1], a.clone(), L)
        return L

    def _weighted_gram(self, w, exact=True):
        """``X_aug^T diag(w_k) X_aug`` of every fold, ``(K, q, q)``.

        Over each fold's training rows only (``w`` is zero elsewhere), one
        fold at a time, the weighted rows gathered into one temporary
        scaled in place: 5 folds of 14000 x 101 in 27 ms, against 56 ms for
        one ``(K, n, q)`` product over all the rows.

        Unless ``exact``, in ``hvp_dtype`` when that is float32 or float64
        (the result is cast back by the caller): a preconditioner's Gram
        matrix, reused while the weights move by up to 10%, needs no more
        precision than the products conjugate gradient runs with it
        (float32: the gathered rows and their rank-k update, 5 folds of
        1120 x 51, in 0.57 against 0.98 ms; 8 of a make_classification fit's
        13 Gram matrices; the same log-losses to 1e-5).
        """
        if self._train_rows is None:
            self._train_rows = [torch.nonzero(t > 0)[:, 0] for t in self.train_weights]
        Xa = self._X_aug
        # (float32 at the least: a half-precision Gram matrix loses the
        # preconditioner, and its products run slowly on CPU)
        if not exact and self.hvp_dtype != Xa.dtype and self.hvp_dtype in (
            torch.float32,
            torch.float64,
        ):
            if self._X_aug_hvp is None:
                self._X_aug_hvp = Xa.to(self.hvp_dtype)
            Xa, w = self._X_aug_hvp, w.to(self.hvp_dtype)
        return torch.stack(
            [
                _gram(Xa.index_select(0, rows).mul_(w[k, rows].sqrt()[:, None]))
                for k, rows in enumerate(self._train_rows)
            ]
        )

    def hessian_diagonal(self, theta, phi):
        """Exact diagonal of the Hessian of :meth:`inner_loss` in ``theta``.

        With ``t_k`` the training weights of fold ``k``, ``s`` the mean
        training weight (the scale of :meth:`inner_loss`) and the logit
        curvature ``q_ikc = P_ikc (1 - P_ikc)`` (``sigma(z)(1 - sigma(z))``
        for one binary logit)::

            d^2 f / d W_jkc^2 = (sum_i t_ki q_ikc x_ij^2 + alpha_j) / s
            d^2 f / d b_kc^2  = (sum_i t_ki q_ikc) / s

        One product ``(X ** 2)^T (t q)``, about the cost of a gradient; the
        preconditioner of :class:`~skbilevel.hypergrad.NewtonCG` and
        :class:`~skbilevel.hypergrad.ImplicitCG`. No graph is built.

        Returns
        -------
        dict
            Shaped like ``theta``: ``"coef"`` ``(p, n_folds, n_out)`` and,
            with an intercept, ``"intercept"``.

        Examples
        --------
        At ``theta = 0`` every ``q_i = 1/4``; three samples, so ``s = 3``:

        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, -1.0]], dtype=torch.float64)
        >>> t = torch.ones(3, dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 1]), 2, t)
        >>> phi = torch.zeros(2, dtype=torch.float64)  # alpha = 1
        >>> d = folds.hessian_diagonal(folds.init_theta(), phi)
        >>> [round(v, 6) for v in d["coef"][:, 0, 0].tolist()], d["intercept"].tolist()
        ([0.5, 0.770833], [[0.25]])
        """
        with torch.no_grad():
            a = self._penalty(phi.detach())  # (p, K)
            if self._X_sq is None:  # sparse: (X ** 2)^T in CSR, for the product below
                XT = self._transposed()
                self._X_sq = (
                    csr_with_values(XT, XT.values() ** 2) if self._sparse else self.X * self.X
                )
            P, w = self._curvature(theta)  # (K, c, n)
            tq = w if self.n_out == 1 else w * (1.0 - P)  # t P (1 - P)
            K, c, n = tq.shape
            if self._sparse:
                coef = (self._X_sq @ tq.reshape(K * c, n).T).reshape(-1, K, c)
            else:
                coef = _matmul(tq.reshape(K * c, n), self._X_sq).T.reshape(-1, K, c)
            diag = {"coef": (coef + a[..., None]) / self._scale}
            if self.fit_intercept:
                curv = tq.sum(-1)  # (K, c)
                if self.n_out > 1:
                    curv = curv[:, :-1]  # the last intercept is fixed at zero
                diag["intercept"] = curv / self._scale
        return diag

    def validation_loss(self, theta):
        """Sum over folds of the ``val_weights``-weighted mean log-loss."""
        return self.fold_losses(theta).sum()

    def fold_losses(self, theta):
        """Every fold's ``val_weights``-weighted mean log-loss, ``(n_folds,)``.

        Their sum is :meth:`validation_loss`; their spread across folds is
        what :class:`~skbilevel.linear_model.HyperL2Classifier` weighs a gain
        in it against.

        Examples
        --------
        At ``theta = 0`` every probability is 1/2, so each fold's loss is ``log 2``:

        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0], [-1.0], [2.0], [0.5]], dtype=torch.float64)
        >>> T = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 0, 1]), 2, T, 1.0 - T)
        >>> [round(v, 6) for v in folds.fold_losses(folds.init_theta()).tolist()]
        [0.693147, 0.693147]
        """
        if self.val_weights is None:
            raise ValueError("validation_loss needs val_weights.")
        V = self._val_t
        return (V * self._losses(theta)).sum(0) / V.sum(0)

    def fold_losses_at(self, phi, solver=None):
        """:meth:`fold_losses` at the inner solution for ``phi``: the last one
        found at the same penalties (by :meth:`solve`, :meth:`value_and_grad`,
        or the best point of :meth:`validation_curve`), else a new solve.

        The classifier's one-standard-error rule asks for them right after a
        descent evaluated that point, and at the shared penalty its curve
        chose: each was a solve of every fold again (from the solution
        itself, one forced Newton iteration), 6% of a make_classification fit.

        Parameters
        ----------
        phi : tensor
            The outer variables (penalties), as for :meth:`solve`.
        solver : InnerSolver, optional
            The solver of a new solve (default :meth:`default_solver`).

        Returns
        -------
        tensor of shape (n_folds,)

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds
        >>> X = torch.tensor([[1.0], [-1.0], [2.0], [0.5]], dtype=torch.float64)
        >>> T = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
        >>> folds = LogisticFolds(X, torch.tensor([0, 1, 0, 1]), 2, T, 1.0 - T)
        >>> phi = torch.zeros(1, dtype=torch.float64)
        >>> theta, _ = folds.solve(phi)
        >>> bool(torch.equal(folds.fold_losses_at(phi), folds.fold_losses(theta)))
        True
        """
        with torch.no_grad():
            alpha = self._penalty(phi.detach())
        last = self._solved_at
        if last is not None and last[0].shape == alpha.shape and torch.equal(last[0], alpha):
            theta = last[1]
        else:
            theta, _ = self.solve(phi, solver)
        with torch.no_grad():
            return self.fold_losses(theta)

    def _record_solution(self, phi, theta, model=None):
        """Keep ``theta`` as the solution at ``phi``'s penalties (under
        ``model``'s penalty model, default this one's) for :meth:`fold_losses_at`."""
        with torch.no_grad():
            alpha = (self if model is None else model)._penalty(phi.detach())
        self._solved_at = (alpha.clone(), theta)

    def value_grad_hessian(self, phi, solver=None):
        """Validation loss summed over folds, its gradient and its Hessian in
        ``phi``, for binary problems (one logit per fold).

        The folds are solved first (as :meth:`solve`, warm-started). With
        ``H`` the unscaled inner Hessian at the solution (its exact per-fold
        blocks, :meth:`hessian_preconditioner`), ``g`` the validation
        gradient in ``theta``, ``lam = H^-1 g``, ``D_a = alpha * B_a`` on the
        coefficients (``B = d log(alpha) / d phi``), ``t_a = -H^-1 (D_a W)``
        (``d theta / d phi_a``), ``u_a = X t_a`` (logits; an intercept
        column included) and ``q = P (1 - P)``::

            grad_a = -lam^T (D_a W)
            H_ab = sum_i v_i q_i u_ai u_bi
                   - lam^T (X^T (tr q (1 - 2P) u_a u_b)
                            + D_b t_a + D_a t_b + alpha B_a B_b W)

        (``v`` the normalized validation weights, ``tr`` the training
        weights; the ``1 - 2P`` term is the logistic loss's third
        derivative, absent for ridge, :meth:`RidgeFolds.value_grad_hessian`).
        ``m + 1`` solves with the factored Hessian per fold.

        Returns
        -------
        value : tensor
            The loss at the returned solutions minus ``lam^T r`` (``r`` their
            inner gradient): its value at the exact solutions to first
            order, as :meth:`value_and_grad` gives it.
        grad : tensor of shape (m,)
        hessian : tensor of shape (m, m)

        Raises
        ------
        NotImplementedError
            For a multinomial problem.
        torch.linalg.LinAlgError
            When a fold's Hessian cannot be factored by Cholesky.
        """
        if self.n_out != 1:
            raise NotImplementedError(
                "value_grad_hessian is implemented for binary problems only."
            )
        if self.val_weights is None:
            raise ValueError("value_grad_hessian needs val_weights.")
        # in the data's precision (a float32 phi on float64 data failed in
        # torch: "expected scalar type Double but found Float")
        _check_tensors("LogisticFolds.value_grad_hessian", phi=phi)
        phi = phi.detach().to(dtype=self.X.dtype, device=self.X.device)
        theta, _ = self.solve(phi, solver)
        L = self._hessian_factor(theta, phi, exact=True)
        if L is None:
            raise torch.linalg.LinAlgError(
                "value_grad_hessian: a fold's logistic Hessian could not be factored "
                "by Cholesky (or the problem has too many features for the exact "
                "per-fold Hessian)."
            )
        with torch.no_grad():
            K, p = self.n_folds, self.X.shape[1]
            Xa = self._X_aug  # (n, q): X, and a column of ones with an intercept
            a = self._penalty(phi).T  # (K, p)
            B = self._log_penalty.jacobian(K, a)  # (K, p, m)
            m = B.shape[-1]

            def solve(r):  # H^-1 r for (K, q), H unscaled (L factors H / scale)
                return _cho_solve(L, r) / self._scale

            def pad(c):  # (K, p) coefficient part -> (K, q)
                return torch.cat([c, c.new_zeros(K, Xa.shape[1] - p)], dim=1)

            W = theta["coef"][:, :, 0].T  # (K, p)
            z = self.logits(theta)[:, :, 0].T  # (K, n)
            P = torch.sigmoid(z)
            q = P * torch.sigmoid(-z)
            V = self.val_weights
            v = V / V.sum(1, keepdim=True)
            g = (v * (P - self.y.to(P))) @ Xa  # (K, q): the validation gradient
            lam = solve(g)
            # the value at the exact solutions to first order, as value_and_grad's
            # (HypergradientInfo.value_correction): minus lam^T r, with r the
            # unscaled inner gradient at theta
            _, r = self.loss_and_grad(theta, phi)
            r = [r["coef"][:, :, 0].T] + ([r["intercept"]] if self.fit_intercept else [])
            r = torch.cat(r, 1) * self._scale  # (K, q)
            value = self.validation_loss(theta) - (lam * r).sum()
            D = a[..., None] * B  # (K, p, m)
            T = torch.stack([-solve(pad(D[..., j] * W)) for j in range(m)], -1)  # (K, q, m)
            U = torch.einsum("nq,kqm->knm", Xa, T)  # logits' derivatives (K, n, m)
            grad, penalty = _penalty_derivatives(lam[:, :p], a, B, W, T[:, :p, :])
            gauss = torch.einsum("kn,kna,knb->ab", v * q, U, U)
            third = self.train_weights * q * (1.0 - 2.0 * P) * (lam @ Xa.T)  # (K, n)
            third = torch.einsum("kn,kna,knb->ab", third, U, U)
            hess = gauss - third + penalty
        return value, grad, 0.5 * (hess + hess.T)

    def default_solver(self, tol=None, max_iter=500):
        """:class:`~skbilevel.hypergrad.LBFGS` with a gradient tolerance for this scaling."""
        if tol is None:
            tol = 1e-8 if self.X.dtype == torch.float64 else 1e-4
        return LBFGS(tol=tol, max_iter=max_iter)

    def solve(self, phi, solver=None, init=None):
        """Inner solution at ``phi`` (no graph), warm-started; returns ``(theta, SolveResult)``."""
        solver = self.default_solver() if solver is None else solver
        if init is None:
            init = self.theta_ if self.theta_ is not None else self.init_theta()
        _check_tensors("LogisticFolds.solve", phi=phi)
        phi = phi.detach()
        theta, result = solver.solve(_FixedPhi(self, phi), init, phi=phi)
        self.theta_ = _detach_graph(theta)
        self._record_solution(phi, self.theta_)
        return self.theta_, result

    def validation_curve(self, log_alphas, solver=None):
        """Summed validation loss at many shared log-penalties (no autograd).

        Solved in decreasing order of penalty, each warm-started from the
        previous solution (the regularization path). The next warm start
        (``theta_``) is the solution at the best penalty of the curve: the
        search that follows a scan looks near there.
        """
        log_alphas = torch.as_tensor(log_alphas, dtype=self.X.dtype).reshape(-1)
        order = torch.argsort(log_alphas, descending=True)
        out = log_alphas.new_zeros(log_alphas.shape)
        # every feature gets exp(log_alpha), whatever the penalty model
        shared = self.reparametrized(
            groups=torch.zeros(self.X.shape[1], dtype=torch.long, device=self.X.device)
        )
        best, previous = None, None
        for i in order.tolist():
            phi = self.train_weights.new_full((1,), float(log_alphas[i]))
            if previous is not None:
                shared.theta_ = shared._path_predictor(*previous, phi)
            theta, _ = shared.solve(phi, solver)
            previous = (theta, phi)
            with torch.no_grad():
                out[i] = self.validation_loss(theta)
            if best is None or out[i] < out[best[0]]:
                best = (i, theta, phi)
        self.theta_ = shared.theta_ if best is None else best[1]
        if best is not None:
            self._record_solution(best[2], best[1], model=shared)
        return out

    def _path_predictor(self, theta, phi, phi_next):
        """First-order prediction of the solution at ``phi_next`` from the
        solution ``theta`` at ``phi`` (a warm start for the path).

        At a solution the gradient vanishes, so along the path ``H dtheta =
        -d(grad)/dphi dphi``; the penalty's term ``a W / s`` gives
        ``dtheta = -H^{-1} (a W / s) dlog(a)`` for every penalty moved by the
        same ``dlog(a)`` (a shared penalty). Needs the inverse Hessian
        (:meth:`hessian_preconditioner`, binary problems); otherwise
        ``theta`` itself. A warm start needs no exact inverse: the one with
        the last Gram matrix (weights within 10%) serves, and a curve forms
        about half as many. (With the exact one, HyperL2Classifier took 14%
        longer on 5 splits of make_classification; the test log-losses were
        the same but on one breast_cancer split of 15: .1470 exact, .1483.)
        """
        inverse = self.hessian_preconditioner(theta, phi)
        step = float((phi_next - phi).mean())
        if inverse is None or not (phi_next - phi == step).all():
            return theta
        with torch.no_grad():
            a = self._penalty(phi)  # (p, K)
            rhs = {"coef": a[..., None] * theta["coef"] / self._scale}
            if self.fit_intercept:
                rhs["intercept"] = torch.zeros_like(theta["intercept"])
            d = inverse(rhs)
            return {k: v - step * d[k] for k, v in theta.items()}

    def value_and_grad(self, phi, hypergradient="cg", solver=None):
        """Validation loss summed over folds, its hypergradient, info, and theta.

        The inner problem is solved by ``solver`` (default
        :meth:`default_solver`) from the previous solution, and
        differentiated by ``hypergradient`` (default ``"cg"``, any implicit
        strategy name or instance). The value is that of the returned
        ``theta`` plus ``info.value_correction`` (where the strategy's
        linear solve gives one): the loss at the exact solutions to first
        order, so that a loosely solved inner problem gives values that do
        not depend on the warm start.

        Examples
        --------
        >>> import torch
        >>> from skbilevel.hypergrad import LogisticFolds, NewtonCG
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(80, 3, generator=g, dtype=torch.float64)
        >>> y = (X[:, 0] + 0.5 * torch.randn(80, generator=g, dtype=torch.float64) > 0).long()
        >>> train = torch.ones(2, 80, dtype=torch.float64)
        >>> train[0, :40] = 0
        >>> train[1, 40:] = 0
        >>> folds = LogisticFolds(X, y, 2, train, val_weights=1 - train)
        >>> phi = torch.zeros(3, dtype=torch.float64)
        >>> exact = folds.value_and_grad(phi, solver=NewtonCG(tol=1e-12))[0]
        >>> folds.theta_ = None  # start again from zero, solved loosely
        >>> value, grad, info, theta = folds.value_and_grad(phi, solver=NewtonCG(tol=1e-2))
        >>> raw = folds.validation_loss(theta)
        >>> bool(abs(value - exact) < abs(raw - exact) / 10)
        True
        """
        solver = self.default_solver() if solver is None else solver
        init = self.theta_ if self.theta_ is not None else self.init_theta()
        value, grad, info, theta = _value_and_grad(
            self, phi, hypergradient, solver, init, inner_loss=self
        )
        self.theta_ = theta
        self._record_solution(phi, theta)
        return value, grad, info, theta
