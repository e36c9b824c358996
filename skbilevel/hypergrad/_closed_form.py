"""Closed-form inner problems: ridge, kernel ridge and ridge leave-one-out.

The ``closed_form`` strategy differentiates the inner solution by running the
solver's explicit formula inside autograd, so the hypergradient is exact up to
rounding. Ridge is the main client: :class:`RidgeSolver` solves

    min_{w, b}  1/2 sum_i s_i (y_i - x_i w - b)^2 + 1/2 sum_j alpha_j w_j^2

with ``log(alpha)`` as the outer variable (one value, one per feature or
group, or one per target). The leave-one-out (LOO) error of ridge for every
alpha and every target comes from one eigendecomposition
(:func:`ridge_loo_decomposition`, :func:`ridge_loo_errors`), following
scikit-learn's ``_RidgeGCV`` exactly, so the numbers match ``RidgeCV``.
:func:`minimize_log_alpha` is the one-dimensional search (coarse scan of the
cheap curve, then a bracketed secant on the exact hypergradient) used by
``BilevelRidgeCV``.

Kernel ridge (:func:`kernel_ridge_fit`, :class:`KernelRidgeSolver`) is
differentiable in the kernel matrix, the
targets, the support points and the regularization, as kernel inducing
points (KIP) dataset distillation needs.
"""

import contextlib
import contextvars
import dataclasses
import math
import numbers
import types
import warnings
from typing import Optional

import numpy as np
import torch
from scipy.linalg import lapack

from ._base import (
    ClosedFormSolver,
    HypergradientInfo,
    HypergradientStrategy,
    HypergradientWarning,
    _all_finite,
    _grad_norm,
    argmin,
    register_strategy,
)
from ._solvers import _FixedPhi
from ._sparse import csr_transpose, to_scipy
from ._tree import tree_detach, tree_flatten

__all__ = [
    "ClosedForm",
    "RidgeSolver",
    "RidgeDecomposition",
    "ridge_loo_decomposition",
    "ridge_loo_errors",
    "ridge_loo_curve",
    "ridge_loo_value_and_grad",
    "ridge_coef",
    "ridge_validation_curve",
    "ridge_validation_value_and_grad",
    "KernelRidgeSolver",
    "kernel_ridge_fit",
    "LogAlphaSearchResult",
    "minimize_log_alpha",
]


# --------------------------------------------------------------------------
# The strategy
# --------------------------------------------------------------------------


@register_strategy("closed_form")
class ClosedForm(HypergradientStrategy):
    """Differentiate through an explicit inner solution (exact hypergradient).

    ``argmin`` returns ``solver.closed_form(phi)`` computed with torch
    operations, so autograd gives ``d theta*/d phi`` exactly. The solver must
    be a :class:`~skbilevel.hypergrad.ClosedFormSolver` such as
    :class:`RidgeSolver` or :class:`KernelRidgeSolver`.

    Parameters
    ----------
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned solution in the health
        record (one extra gradient of the inner loss).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, RidgeSolver
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    >>> y = X @ torch.ones(4, dtype=torch.float64)
    >>> solver = RidgeSolver(X, y, fit_intercept=False)
    >>> log_alpha = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> theta, info = argmin(solver.inner_loss, log_alpha, solver.init_theta(),
    ...                      hypergradient="closed_form", solver=solver)
    >>> (theta["coef"] ** 2).sum().backward()
    >>> info.inner_iterations, bool(log_alpha.grad < 0)
    (1, True)
    """

    name = "closed_form"
    family = "closed_form"
    solver_kind = "closed_form"

    def __init__(self, check_inner=True):
        if not isinstance(check_inner, bool):
            raise ValueError(f"check_inner must be True or False; got {check_inner!r}.")
        self.check_inner = check_inner

    def default_solver(self):
        raise ValueError(
            "The 'closed_form' hypergradient strategy needs a ClosedFormSolver "
            "describing the inner problem; pass solver=RidgeSolver(X, y) or "
            "solver=KernelRidgeSolver(...)."
        )

    def argmin(self, inner_loss, phi, init, solver, info):
        if not isinstance(solver, ClosedFormSolver):
            raise ValueError(
                f"The 'closed_form' strategy needs a ClosedFormSolver, got "
                f"{type(solver).__name__}. Use RidgeSolver / KernelRidgeSolver, or an "
                "iterative strategy such as 'cg' for other inner problems."
            )
        solver.last_fallback = None
        theta = solver.closed_form(phi)
        info.inner_iterations = 1
        # exact by construction, unless not finite (log_alpha = 800: alpha = inf,
        # a NaN gradient norm and hypergradient, reported converged)
        info.inner_converged = _all_finite(tree_flatten(theta)[0])
        info.fallback = getattr(solver, "last_fallback", None)
        if self.check_inner and inner_loss is not None:
            phi_d = tree_detach(phi)
            info.inner_grad_norm = _grad_norm(_FixedPhi(inner_loss, phi_d), tree_detach(theta))
            info.n_grad += 1
            info.inner_converged = info.inner_converged and math.isfinite(info.inner_grad_norm)
        return theta


# --------------------------------------------------------------------------
# Shared preprocessing (scikit-learn's _preprocess_data with rescale_with_sw)
# --------------------------------------------------------------------------


def _as_2d_targets(y):
    if y.ndim == 1:
        return y[:, None], True
    if y.ndim != 2:
        raise ValueError(f"y must be 1-D or 2-D, got shape {tuple(y.shape)}.")
    return y, False


def _zeros(like, *shape):
    if isinstance(like, np.ndarray):
        return np.zeros(shape, dtype=like.dtype)
    return like.new_zeros(shape)


def _cat(parts, axis):
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis)
    return torch.cat(parts, axis)


def _eigh(A):
    """Symmetric eigendecomposition (numpy's LAPACK for numpy arrays: up to 2x
    faster than torch's single-threaded on CPU for n >= 200)."""
    if isinstance(A, np.ndarray):
        return np.linalg.eigh(A)
    return torch.linalg.eigh(A)


#: set (through :func:`_numpy_route_at_any_thread_count`) around a computation
#: that is numpy's alone, with no torch operation between its products: there the
#: numpy route pays whatever torch's thread count
_NUMPY_ANY_THREADS = contextvars.ContextVar("skbilevel_numpy_any_threads", default=False)


@contextlib.contextmanager
def _numpy_route_at_any_thread_count():
    """Let :func:`_use_numpy` route through numpy whatever torch's thread count.

    For :class:`BilevelRidgeCV`'s leave-one-out decomposition, whose products
    run back to back (the searches that follow work on vectors): with torch's
    default two threads it took the torch route, 3.3 times RidgeCV's time on
    a 500 x 2000 X (0.12 against 0.037 s; numpy 0.056 s), and the main demo
    1.4 to 1.7 times RidgeCV's (numpy: 0.56 to 1.1). Not for the K-fold
    solvers, whose decompositions alternate with torch products (a 2000 x
    100 x 10 fit: 0.07 -> 0.16 s with the numpy route).
    """
    token = _NUMPY_ANY_THREADS.set(True)
    try:
        yield
    finally:
        _NUMPY_ANY_THREADS.reset(token)


def _use_numpy(*tensors):
    """Run the heavy O(n p min(n, p)) products through numpy on CPU.

    torch's CPU allocator does not request transparent huge pages unless
    ``THP_MEM_ALLOC_ENABLE=1`` is set, so each large temporary it allocates
    pays ~3x its arithmetic cost in page faults (and ``X @ X.T`` is not a
    symmetric rank-k update). numpy views of CPU tensors share memory, so
    this changes speed only; GPU tensors and tensors requiring grad stay in
    torch.

    Only while torch runs one CPU thread: otherwise torch's OpenMP threads,
    which spin a while after each parallel operation, and numpy's BLAS
    threads compete for the same cores. With torch's default of one
    thread per core (2 here), HyperL2Classifier on digits took 30.7 s
    instead of 0.90 s with torch alone, and HyperL2Regressor 4 to 9 times
    its time (hetero 0.42 against 0.055 s, wide 1.01 against 0.11 s).
    """
    if torch.get_num_threads() != 1 and not _NUMPY_ANY_THREADS.get():
        return False
    return all(
        t is None
        or (
            t.device.type == "cpu"
            and not t.requires_grad
            and t.dtype in (torch.float32, torch.float64)
        )
        for t in tensors
    )


def _gram(A):
    """``A^T A`` for ``A`` of shape ``(n, p)`` or ``(K, n, p)`` (a tensor).

    Where :func:`_use_numpy` allows, through numpy, whose matmul computes
    ``A^T A`` with the BLAS's symmetric rank-k update: half the operations
    of the general product torch runs (2000 x 200 in float64: 1.7 against
    2.9 ms; the logistic folds' 5 x 2000 x 51 Hessians: 1.0 against
    1.9 ms).

    A CSR tensor ``(n, p)`` gives the dense ``(p, p)`` result of a sparse
    product (scipy's on CPU: 32 against torch's 95 ms for 20000 x 1000 at
    1% density; 420 ms dense).
    """
    if A.layout == torch.sparse_csr:
        if _use_numpy(A):
            a = to_scipy(A)
            return torch.from_numpy((a.T @ a).toarray())
        return (csr_transpose(A) @ A).to_dense()
    if not _use_numpy(A):
        return A.mT @ A
    if A.ndim == 3:
        return torch.stack([_gram(a) for a in A])
    a = A.numpy()
    return torch.from_numpy(a.T @ a)


def _matmul(A, B):
    """``A @ B`` of two dense matrices (tensors).

    Where :func:`_use_numpy` allows, through numpy: the thin products of
    the logistic folds (a few columns per fold against a tall ``X``) ran
    1.1 to 2.7 times faster there (best of repeats, float64, one thread:
    ``(35, 21000) @ (21000, 54)`` 3.4 against 7.5 ms, ``(45, 1257) @
    (1257, 64)`` 0.18 against 0.30 ms), from the page faults of torch's
    fresh allocations and its BLAS's choice of kernel for these shapes.
    """
    if not _use_numpy(A, B) or A.layout != torch.strided or B.layout != torch.strided:
        return A @ B
    return torch.from_numpy(A.numpy() @ B.numpy())


def _cholesky_ex(A, overwrite_a=False):
    """``torch.linalg.cholesky_ex(A)``: the lower factor and the info code.

    Where :func:`_use_numpy` allows, by LAPACK's ``potrf`` (scipy's
    wrapper) on each matrix, in the memory of ``A`` itself when
    ``overwrite_a`` (a temporary the caller no longer needs; otherwise a
    copy): 5 x 200 x 200 in float64, 0.49 ms against numpy's 0.54 ms
    (which copies every matrix twice and clears its upper triangle
    separately) and torch's 0.62 ms.
    """
    if not _use_numpy(A):
        return torch.linalg.cholesky_ex(A)
    L = A if overwrite_a and A.is_contiguous() else A.contiguous().clone()
    a = L.numpy()
    potrf = lapack.dpotrf if a.dtype == np.float64 else lapack.spotrf
    info = np.zeros(a.shape[:-2], dtype=np.int32)
    for idx in np.ndindex(*a.shape[:-2]):
        # the transpose of a C-ordered symmetric matrix is itself, in Fortran
        # order: its upper factor there is the lower factor here
        out, info[idx] = potrf(a[idx].T, lower=0, clean=1, overwrite_a=1)
        if not np.shares_memory(out, a):
            a[idx] = out.T
    return L, torch.from_numpy(info)


def _integral(t):
    """Whether every value of the tensor ``t`` is an integer (a non-integer
    float label was truncated by ``.long()`` silently: group 0.5 became
    group 0)."""
    if not t.is_floating_point():
        return True
    return bool((torch.isfinite(t) & (t == t.round())).all())


def _check_tensors(where, **arrays):
    """``TypeError`` naming the first of ``arrays`` (name -> value or ``None``)
    that is not a torch tensor."""
    for name, a in arrays.items():
        if a is not None and not isinstance(a, torch.Tensor):
            raise TypeError(
                f"{where}: {name} must be a torch tensor; got {type(a).__name__}. "
                f"Convert it first, e.g. torch.as_tensor({name}, dtype=torch.float64)."
            )


def _check_sample_weight(sample_weight, n, like, where, per="sample", zero_sum=None):
    """``sample_weight`` as a tensor of ``like``'s dtype and device, after
    checking it: ``n`` weights (one per ``per``), finite, non-negative, with a
    positive sum (``zero_sum`` says what a zero sum would break)."""
    if tuple(sample_weight.shape) != (n,):
        raise ValueError(
            f"{where}: sample_weight has shape {tuple(sample_weight.shape)}; expected "
            f"({n},), one weight per {per}."
        )
    sample_weight = sample_weight.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(sample_weight).all()):
        raise ValueError(f"{where}: sample_weight must be finite (no NaN or infinity).")
    if bool((sample_weight < 0).any()):
        raise ValueError(f"{where}: sample_weight must be non-negative.")
    if not float(sample_weight.sum()) > 0:
        raise ValueError(
            f"{where}: sample_weight sums to zero{zero_sum or ''}. Give a sample a "
            "positive weight."
        )
    return sample_weight


def _check_ridge_data(X, y, sample_weight=None, where="RidgeSolver", check_X=True):
    """Validate the data of a ridge problem; return ``y`` and ``sample_weight``
    as tensors of ``X``'s dtype and device.

    ``X`` must be a 2-D floating-point tensor, ``y`` a tensor with one row
    per sample and ``sample_weight`` (optional) a tensor of ``n_samples``
    finite, non-negative weights with a positive sum; all finite. (A NaN
    gave numpy's "Eigenvalues did not converge" or a NaN hypergradient;
    all-zero weights divided the weighted means by zero.) ``check_X=False``
    leaves the finiteness of ``X`` to the caller (the decomposition checks
    its Gram matrix instead: no extra pass over ``X``).
    """
    _check_tensors(where, X=X, y=y, sample_weight=sample_weight)
    if X.layout != torch.strided:
        # (a CSR X failed inside: "can't convert SparseCsr layout tensor to numpy" or
        # "torch.empty: Only batched sparse compressed tensors are supported")
        raise ValueError(
            f"{where}: X must be a dense tensor; got layout "
            f"{str(X.layout).replace('torch.', '')}. Pass X.to_dense() (the "
            "decomposition is dense anyway)."
        )
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {tuple(X.shape)}.")
    if not X.dtype.is_floating_point:
        raise ValueError(
            f"X must hold floating-point values; got dtype {X.dtype}. Convert it "
            "first, e.g. X.double()."
        )
    n = X.shape[0]
    if y.ndim == 0 or y.shape[0] != n:
        raise ValueError(f"X has {n} samples but y has shape {tuple(y.shape)}.")
    y = y.to(dtype=X.dtype, device=X.device)
    _check_finite_X(X if check_X else None, y, where)
    if sample_weight is not None:
        sample_weight = _check_sample_weight(
            sample_weight, n, X, where, zero_sum=": no sample carries weight"
        )
    return y, sample_weight


def _check_finite_X(X, y=None, where=None):
    """``ValueError`` unless ``X`` (a numpy array, a dense torch tensor or a
    sparse compressed one: its stored values; ``None`` skips it) and ``y``
    (optional) are finite. (A NaN or an infinity gave numpy's "Eigenvalues
    did not converge", or NaN values and hypergradients, silently.)"""
    if X is None:
        ok = True
    elif isinstance(X, np.ndarray):
        ok = bool(np.isfinite(X).all())
    else:
        ok = bool(torch.isfinite(X if X.layout == torch.strided else X.values()).all())
    if ok and y is not None:
        ok = bool(torch.isfinite(y).all())
    if not ok:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}X and y must be finite (no NaN or infinity).")


def _check_loo_samples(n_positive, n, where):
    """Leave-one-out with an intercept needs a second sample of positive
    weight to fit the intercept (one: 0/0, a NaN value and hypergradient)."""
    if n_positive < 2:
        raise ValueError(
            f"{where}: leave-one-out errors with fit_intercept=True need at least 2 "
            f"samples with a positive sample_weight; got {n_positive} of {n}. Use "
            "more samples."
        )


_OVERFLOW_FIX = "Rescale X and y, e.g. with StandardScaler, or divide by their largest values."


def _check_no_overflow(A, what, fix=_OVERFLOW_FIX, X=None):
    """``ValueError`` when ``A`` (a product of the data) is not finite: ``X``
    (when given) not finite, else an overflow of ``A``'s dtype."""
    if isinstance(A, torch.Tensor):
        ok, dtype = bool(torch.isfinite(A).all()), str(A.dtype).replace("torch.", "")
    else:
        ok, dtype = bool(np.isfinite(A).all()), str(np.asarray(A).dtype)
    if not ok:
        if X is not None:
            _check_finite_X(X)  # a NaN or infinity in X itself
        raise ValueError(
            f"{what} overflows {dtype}: the data are too large "
            f"in magnitude. {fix}"
        )


def _center_and_rescale(X, y2, sample_weight, fit_intercept):
    """Weighted centering, then rows scaled by ``sqrt(s)`` (torch or numpy arrays).

    ``X_offset = sum_i s_i x_i / sum_i s_i`` (zero without intercept), and
    ``Xs = sqrt(s) (X - X_offset)``, ``ys = sqrt(s) (y - y_offset)``: the
    weighted, intercept-fitting ridge on ``(X, y)`` is the plain ridge on
    ``(Xs, ys)``. The data have passed :func:`_check_ridge_data` (weights
    of the right shape, finite, non-negative, with a positive sum).
    """
    n = X.shape[0]
    if sample_weight is None:
        sw = np.ones(n, dtype=X.dtype) if isinstance(X, np.ndarray) else X.new_ones(n)
    else:
        sw = sample_weight
    sqrt_sw = sw ** 0.5
    if fit_intercept:
        sw_sum = sw.sum()
        X_offset = (sw @ X) / sw_sum
        y_offset = (sw @ y2) / sw_sum
        Xc, yc = X - X_offset, y2 - y_offset
    else:
        X_offset = _zeros(X, X.shape[1])
        y_offset = _zeros(y2, y2.shape[1])
        Xc, yc = X, y2
    if sample_weight is None:
        return Xc, yc, sqrt_sw, X_offset, y_offset
    return Xc * sqrt_sw[:, None], yc * sqrt_sw[:, None], sqrt_sw, X_offset, y_offset


# --------------------------------------------------------------------------
# One decomposition, every alpha: ridge coefficients and leave-one-out errors
# --------------------------------------------------------------------------


def _intercept_reflection(sqrt_sw):
    """The Householder reflection that takes the intercept direction to an axis.

    With ``q0 = sqrt(s) / ||sqrt(s)||`` (``sqrt_sw``: a numpy array or a
    tensor), returns ``v`` and ``beta`` such that ``H = I - beta v v^T``
    maps ``q0`` to ``-+e1``: the last ``n - 1`` columns of ``H`` are an
    orthonormal basis of the complement of ``q0``. After weighted centering
    ``q0`` is an exact null vector of the centered rows' products, and in
    this basis the intercept's share of the hat matrix (``q0 q0^T``) drops
    out analytically instead of being subtracted numerically.
    """
    q0 = sqrt_sw / (sqrt_sw @ sqrt_sw) ** 0.5
    v = q0 * 1.0
    v[0] = v[0] + (1.0 if float(q0[0]) >= 0 else -1.0)
    return v, 2.0 / (v @ v)


def _reflect(z, v, beta):
    """``Q z`` for the reflection ``H = I - beta v v^T`` of
    :func:`_intercept_reflection` and its last ``n - 1`` columns ``Q``: ``z``
    (``n - 1`` rows, a vector or a matrix; numpy or a tensor) in the
    deflated basis, back in sample space."""
    z = _cat([_zeros(z, 1, *z.shape[1:]), z], 0)  # [0; z]: H [0; z] = Q z
    vz = v @ z
    return z - (beta * v[:, None] * vz[None] if z.ndim == 2 else beta * v * vz)


def _deflate(z, v, beta):
    """``Q^T z``, the inverse of :func:`_reflect` on the complement of the
    intercept direction: ``(H z)[1:]`` for ``z`` (``n`` rows, a vector or a
    matrix; numpy or a tensor) in sample space."""
    vz = v @ z
    return z[1:] - (beta * v[1:, None] * vz[None] if z.ndim == 2 else beta * v[1:] * vz)


def _deflated_gram_eigh(Xs, sqrt_sw, X=None):
    """Eigendecomposition of the centered Gram matrix on the complement of ``sqrt(s)``.

    After weighted centering ``Xs^T sqrt(s) = 0``, so ``q0 = sqrt(s)/||sqrt(s)||``
    is an exact null vector of ``K = Xs Xs^T``. A Householder reflection
    ``H`` with ``H q0 = +-e1`` makes the first row and column of ``H K H``
    zero (a rank-2 update of ``K``, ``O(n^2)``); the remaining block is
    decomposed and ``basis = H [0; Q']`` (orthonormal, orthogonal to ``q0``).
    In this basis the intercept correction of ``_RidgeGCV``
    cancels analytically (``d = (B*B) D``) instead of subtracting two
    ``O(1/alpha)`` terms, which keeps full precision at small alpha.
    """
    n = Xs.shape[0]
    v, beta = _intercept_reflection(sqrt_sw)
    K = Xs @ Xs.T
    _check_no_overflow(K, "X X^T (the Gram matrix of X)", X=X)
    Kv = K @ v
    # H K H = K - beta (v Kv^T + Kv v^T) + beta^2 (v^T K v) v v^T, rows/cols 1:
    v1, Kv1 = v[1:], Kv[1:]
    Kr = K[1:, 1:] - beta * (v1[:, None] * Kv1[None, :] + Kv1[:, None] * v1[None, :])
    Kr = Kr + (beta * beta * (v @ Kv)) * (v1[:, None] * v1[None, :])
    eigvals, Qr = _eigh(Kr)
    return eigvals, _reflect(Qr, v, beta)


@dataclasses.dataclass
class RidgeDecomposition:
    """Eigendecomposition of a (weighted, centered) ridge problem.

    Built by :func:`ridge_loo_decomposition`. With ``Xs``, ``ys`` the
    rescaled design and targets (see there), ``mode`` is

    - ``"gram"`` (``n <= p``): ``Xs Xs^T = Q diag(eigvals) Q^T``;
      ``basis = Q`` (n x n), or n x (n-1) when ``deflated`` (with an
      intercept, the exact null direction ``sqrt(s)`` is removed; see
      :func:`ridge_loo_decomposition`);
    - ``"cov"`` (``n > p``): ``Xs^T Xs = V diag(eigvals) V^T``;
      ``basis = Xs V`` (n x p), so ``Xs H^{-1} Xs^T = basis D basis^T``
      with ``D = diag(1 / (eigvals + alpha))``.

    Attributes hold the projections every alpha needs, so one alpha costs
    ``O(n * m * n_targets)`` with ``m = min(n, p)``.
    """

    mode: str
    deflated: bool
    eigvals: torch.Tensor
    basis: torch.Tensor
    basis_sq: torch.Tensor
    basis_t_y: torch.Tensor
    basis_t_sqrt_sw: torch.Tensor
    y: torch.Tensor
    sqrt_sw: torch.Tensor
    sw_sum: torch.Tensor
    fit_intercept: bool
    X_scaled: torch.Tensor
    V: Optional[torch.Tensor]
    X_offset: torch.Tensor
    y_offset: torch.Tensor
    y_1d: bool
    basis_t_y_sw: Optional[torch.Tensor] = None
    sw_over_sum: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.basis_t_y_sw is None:
            self.basis_t_y_sw = torch.cat([self.basis_t_y, self.basis_t_sqrt_sw[:, None]], 1)
        if self.sw_over_sum is None:
            self.sw_over_sum = (self.sqrt_sw / self.sw_sum)[:, None]

    @property
    def n_samples(self):
        return self.basis.shape[0]

    @property
    def n_features(self):
        return self.X_scaled.shape[1]

    @property
    def n_targets(self):
        return self.y.shape[1]


def ridge_loo_decomposition(X, y, sample_weight=None, fit_intercept=True, mode="auto"):
    """Decompose a ridge problem once, for LOO errors and coefficients at any alpha.

    Follows scikit-learn's ``_RidgeGCV``: with sample weights ``s`` and an
    intercept, ``X`` and ``y`` are centered by their ``s``-weighted means and
    their rows multiplied by ``sqrt(s)``, giving ``Xs``, ``ys``. Then

    - ``mode="gram"`` (default when ``n <= p``): eigendecomposition of the
      n x n Gram matrix ``Xs Xs^T = Q L Q^T``, cost ``O(n^2 p + n^3)``;
    - ``mode="cov"`` (default when ``n > p``): eigendecomposition of the
      p x p matrix ``Xs^T Xs = V L V^T`` and the product ``B = Xs V``, cost
      ``O(n p^2 + p^3)`` (two matrix products, no SVD of ``X``).

    With an intercept in gram mode, the exact null vector ``sqrt(s)`` of the
    centered Gram matrix is deflated first (one Householder reflection):
    ``_RidgeGCV``'s intercept correction then cancels analytically instead of
    numerically, which keeps ~1e-12 relative accuracy at alphas where
    ``_RidgeGCV`` itself loses digits (error ~ eps * max(eigvals) / alpha).

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
    y : tensor of shape (n_samples,) or (n_samples, n_targets)
    sample_weight : tensor of shape (n_samples,), optional
        Non-negative weights.
    fit_intercept : bool, default=True
    mode : {"auto", "gram", "cov"}, default="auto"

    Returns
    -------
    RidgeDecomposition

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_loo_decomposition
    >>> X = torch.arange(12.0, dtype=torch.float64).reshape(6, 2) ** 0.5
    >>> y = torch.arange(6.0, dtype=torch.float64)
    >>> ridge_loo_decomposition(X, y).mode
    'cov'
    """
    # X's finiteness is judged on its Gram matrix below (no extra pass over X)
    y, sample_weight = _check_ridge_data(
        X, y, sample_weight, "ridge_loo_decomposition", check_X=False
    )
    y2, y_1d = _as_2d_targets(y)
    n, p = X.shape
    if mode == "auto":
        mode = "gram" if n <= p else "cov"
    if mode not in ("gram", "cov"):
        raise ValueError(f"mode must be 'auto', 'gram' or 'cov', got {mode!r}.")
    numpy_path = _use_numpy(X, y2, sample_weight)
    if numpy_path:
        X, y2 = X.numpy(), y2.numpy()
        sample_weight = None if sample_weight is None else sample_weight.numpy()
    # numpy's "overflow" and "invalid value encountered" warnings on data beyond
    # the dtype's range (or infinite) would only precede the ValueErrors below
    def quiet():
        if numpy_path:
            return np.errstate(over="ignore", invalid="ignore")
        return contextlib.nullcontext()

    with quiet():
        Xs, ys, sqrt_sw, X_offset, y_offset = _center_and_rescale(
            X, y2, sample_weight, fit_intercept
        )
    deflated = mode == "gram" and fit_intercept and n > 1
    # NaN in X, or squares of the data beyond the dtype's range: numpy's
    # "Eigenvalues did not converge" (X * 1e200) or an infinite objective at
    # every alpha (y * 1e200)
    with quiet():
        y_sq = (ys * ys).sum()
    _check_no_overflow(y_sq, "The sum of squares of y")
    V = None
    if deflated:
        with quiet():
            eigvals, basis = _deflated_gram_eigh(Xs, sqrt_sw, X=X)
    elif mode == "gram":
        with quiet():
            K = Xs @ Xs.T
        _check_no_overflow(K, "X X^T (the Gram matrix of X)", X=X)
        eigvals, basis = _eigh(K)
    else:
        with quiet():
            C = Xs.T @ Xs
        _check_no_overflow(C, "X^T X", X=X)
        eigvals, V = _eigh(C)
        basis = Xs @ V
    parts = dict(
        eigvals=eigvals,
        basis=basis,
        basis_sq=basis * basis,
        basis_t_y=basis.T @ ys,
        basis_t_sqrt_sw=basis.T @ sqrt_sw,
        y=ys,
        sqrt_sw=sqrt_sw,
        X_scaled=Xs,
        V=V,
        X_offset=X_offset,
        y_offset=y_offset,
    )
    if numpy_path:
        parts = {
            k: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
            for k, a in parts.items()
        }
    return RidgeDecomposition(
        mode=mode,
        deflated=deflated,
        sw_sum=(parts["sqrt_sw"] * parts["sqrt_sw"]).sum(),
        fit_intercept=bool(fit_intercept),
        y_1d=y_1d,
        **parts,
    )


def _numpy_view(decomp):
    """The decomposition's arrays as numpy views (CPU), cached; else ``None``."""
    cached = decomp.__dict__.get("_numpy")
    if cached is not None:
        return cached
    basis = decomp.basis
    if basis.device.type != "cpu" or basis.dtype not in (torch.float32, torch.float64):
        return None
    view = types.SimpleNamespace(
        **{
            k: getattr(decomp, k).detach().numpy()
            for k in ("eigvals", "basis", "basis_sq", "basis_t_y", "basis_t_sqrt_sw", "y",
                      "sqrt_sw", "basis_t_y_sw", "sw_over_sum", "X_scaled", "X_offset", "y_offset")
        },
        V=None if decomp.V is None else decomp.V.detach().numpy(),
        sw_sum=float(decomp.sw_sum),
        mode=decomp.mode,
        deflated=decomp.deflated,
        fit_intercept=decomp.fit_intercept,
        n_targets=decomp.n_targets,
        n_samples=decomp.n_samples,
    )
    decomp.__dict__["_numpy"] = view
    return view


def _loo_residuals(decomp, D):
    """LOO residuals ``sqrt(s) (y - y_loo)`` for ``D = 1/(eigvals + alpha)``.

    ``D`` has shape (m, 1) (one alpha) or (m, n_targets) (one per target).
    Formulas (Rifkin & Lippert 2007, as in ``_RidgeGCV``), with
    ``G = Xs Xs^T + alpha I``:

    - gram: ``c = G^{-1} ys = Q D Q^T ys``, ``d = diag(G^{-1}) = (Q*Q) D``;
    - cov: ``alpha c = ys - B D B^T ys``, ``alpha d = 1 - (B*B) D``;
    - intercept: ``d <- d - (G^{-1} sqrt(s)) * sqrt(s) / sum(s)`` (zero in
      the deflated gram basis, where it cancels ``sqrt(s)``'s own term);

    and the LOO residual is ``c / d`` (the factor alpha cancels in cov mode).
    """
    B, k = decomp.basis, decomp.n_targets
    if D.shape[1] == 1:
        # one product for ys and sqrt(s) together: fewer autograd nodes
        M = B @ (D * decomp.basis_t_y_sw)
        By, Bs = M[:, :k], M[:, k:]
    else:
        By = B @ (D * decomp.basis_t_y)
        Bs = B @ (D * decomp.basis_t_sqrt_sw[:, None]) if decomp.fit_intercept else None
    den = decomp.basis_sq @ D
    if decomp.mode == "gram":
        num = By
        if decomp.fit_intercept and not decomp.deflated:
            den = den - Bs * decomp.sw_over_sum
    else:
        num = decomp.y - By
        den = 1.0 - den
        if decomp.fit_intercept:
            den = den - (decomp.sqrt_sw[:, None] - Bs) * decomp.sw_over_sum
    return num / den


def _check_log_alpha(la, n_targets, name="log_alpha", batched=False):
    """``ValueError`` unless ``la`` (numpy array or tensor) is finite and has one
    entry or one per target (in its last axis when ``batched``)."""
    values = la.detach() if isinstance(la, torch.Tensor) else np.asarray(la)
    last = values.shape[-1] if values.ndim else 1
    if (values.ndim > (2 if batched else 1)) or last not in (1, n_targets) or (
        values.ndim and values.shape[0] == 0
    ):
        what = "a scalar, one entry per target, or rows of those" if batched else (
            "a scalar or have one entry per target"
        )
        raise ValueError(
            f"{name} must be {what} ({n_targets}); got shape {tuple(values.shape)}."
        )
    finite = bool(torch.isfinite(values).all()) if isinstance(values, torch.Tensor) else bool(
        np.isfinite(values).all()
    )
    if not finite:
        raise ValueError(
            f"{name} must be finite (natural logs of penalties); got "
            f"{values.tolist()}."
        )


def _check_loo(decomp):
    """Leave-one-out with an intercept needs a second sample to fit the intercept
    (one of positive weight: zero-weight rows fit nothing)."""
    if not decomp.fit_intercept:
        return
    # (one positive weight among 20 rows: 0/0, a NaN value, derivative and curve)
    n_pos = decomp.n_samples if decomp.n_samples < 2 else int((decomp.sqrt_sw > 0).sum())
    _check_loo_samples(n_pos, decomp.n_samples, "the decomposition")


def _alpha_column(decomp, log_alpha):
    log_alpha = torch.as_tensor(log_alpha, dtype=decomp.eigvals.dtype, device=decomp.eigvals.device)
    _check_log_alpha(log_alpha, decomp.n_targets)
    if log_alpha.ndim == 0:
        log_alpha = log_alpha.reshape(1)
    if log_alpha.ndim != 1 or log_alpha.shape[0] not in (1, decomp.n_targets):
        raise ValueError(
            f"log_alpha must be a scalar or have one entry per target "
            f"({decomp.n_targets}); got shape {tuple(log_alpha.shape)}."
        )
    return 1.0 / (decomp.eigvals[:, None] + log_alpha.exp()[None, :])


def ridge_loo_errors(decomp, log_alpha):
    """Squared leave-one-out errors, differentiable in ``log_alpha``.

    The LOO residual of sample ``i`` is ``e_i = c_i / d_i`` with
    ``c = G^{-1} ys`` and ``d = diag(G^{-1})`` (corrected for the intercept),
    ``G = Xs Xs^T + alpha I``; see :func:`ridge_loo_decomposition`. Returned
    values are ``e_i^2 = s_i (y_i - y_{loo,i})^2``, the entries of
    scikit-learn's ``RidgeCV(store_cv_results=True).cv_results_`` at this
    alpha. Cost ``O(n * min(n, p) * n_targets)``.

    Parameters
    ----------
    decomp : RidgeDecomposition
    log_alpha : tensor of shape () or (n_targets,)
        Natural log of the penalty (one per target if 1-D).

    Returns
    -------
    tensor of shape (n_samples,) or (n_samples, n_targets)
        Shaped like ``y``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_errors
    >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    >>> y = torch.tensor([0.0, 1.0, 2.0, 3.5], dtype=torch.float64)
    >>> d = ridge_loo_decomposition(X, y)
    >>> ridge_loo_errors(d, torch.tensor(-20.0, dtype=torch.float64)).round(decimals=3)
    tensor([0.1110, 0.0050, 0.0820, 0.2500], dtype=torch.float64)
    """
    _check_loo(decomp)
    resid = _loo_residuals(decomp, _alpha_column(decomp, log_alpha))
    sq = resid * resid
    return sq[:, 0] if decomp.y_1d else sq


def _loo_residuals_and_tangent(decomp, D, dD):
    """LOO residuals ``e`` and their derivatives ``de`` along ``dD = dD/dt``.

    Differentiates the formulas of :func:`_loo_residuals` in closed form:
    every term is linear in ``D``, so ``c' = B (dD * B^T ys)`` and so on, and
    ``e' = (c' - e d') / d``. With ``dD = -alpha D^2`` this is the exact
    derivative in ``log(alpha)``. All products for ``e`` and ``e'`` share
    one matrix product with the basis.
    """
    B, k = decomp.basis, decomp.n_targets
    c = D.shape[1]
    if c == 1:
        P = decomp.basis_t_y_sw  # (m, k + 1)
        M = B @ _cat([D * P, dD * P], 1)
        By, Bs, dBy, dBs = M[:, :k], M[:, k : k + 1], M[:, k + 1 : 2 * k + 1], M[:, 2 * k + 1 :]
    else:
        Py, Ps = decomp.basis_t_y, decomp.basis_t_sqrt_sw[:, None]
        M = B @ _cat([D * Py, dD * Py, D * Ps, dD * Ps], 1)
        By, dBy, Bs, dBs = M[:, :k], M[:, k : 2 * k], M[:, 2 * k : 3 * k], M[:, 3 * k :]
    N = decomp.basis_sq @ _cat([D, dD], 1)
    den, dden = N[:, :c], N[:, c:]
    if decomp.mode == "gram":
        num, dnum = By, dBy
        if decomp.fit_intercept and not decomp.deflated:
            den = den - Bs * decomp.sw_over_sum
            dden = dden - dBs * decomp.sw_over_sum
    else:
        num, dnum = decomp.y - By, -dBy
        den, dden = 1.0 - den, -dden
        if decomp.fit_intercept:
            den = den - (decomp.sqrt_sw[:, None] - Bs) * decomp.sw_over_sum
            dden = dden + dBs * decomp.sw_over_sum
    e = num / den
    return e, (dnum - e * dden) / den


def ridge_loo_value_and_grad(decomp, log_alpha, autograd=False):
    """Mean squared LOO error and its exact derivative in ``log_alpha``.

    With a scalar ``log_alpha`` the value is the mean over samples and
    targets (``-RidgeCV.best_score_``); with one log-alpha per target, the
    per-target means and their derivatives (the targets are independent).

    The derivative of ``f = mean(e^2)`` is ``mean(2 e e')`` with the LOO
    residual ``e = c / d`` differentiated in closed form: with
    ``D = 1 / (eigvals + alpha)``, ``dD/dlog(alpha) = -alpha D^2`` and
    ``c``, ``d`` linear in ``D``, ``e' = (c' - e d') / d``. This costs one
    extra column in the products of the forward pass, about a third of an
    autograd backward pass on small problems; ``autograd=True`` computes the
    same number with ``torch.autograd.grad`` through
    :func:`ridge_loo_errors` (the tests check they agree).

    Returns
    -------
    value : tensor of shape (1,) or (n_targets,)
    grad : tensor, same shape
    info : HypergradientInfo

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_value_and_grad
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(20, 3, generator=g, dtype=torch.float64)
    >>> y = X.sum(1) + torch.randn(20, generator=g, dtype=torch.float64)
    >>> d = ridge_loo_decomposition(X, y)
    >>> value, grad, info = ridge_loo_value_and_grad(d, 0.0)
    >>> _, grad_ad, _ = ridge_loo_value_and_grad(d, 0.0, autograd=True)
    >>> bool(torch.allclose(grad, grad_ad, rtol=1e-10)), info.strategy
    (True, 'closed_form')
    """
    dtype, device = decomp.eigvals.dtype, decomp.eigvals.device
    _check_loo(decomp)
    nv = None if autograd else _numpy_view(decomp)
    if nv is not None:
        # same formulas on numpy views of the CPU tensors: no per-op torch overhead
        if isinstance(log_alpha, torch.Tensor):
            log_alpha = log_alpha.detach().cpu().numpy()
        la = np.asarray(log_alpha, dtype=nv.eigvals.dtype).reshape(-1)
        per_target = la.shape[0] > 1
        _check_log_alpha(la, nv.n_targets)
        alpha = np.exp(la)
        D = 1.0 / (nv.eigvals[:, None] + alpha[None, :])
        e, de = _loo_residuals_and_tangent(nv, D, -alpha * D * D)
        if per_target:
            value = np.einsum("ij,ij->j", e, e) / e.shape[0]
            grad = 2.0 * np.einsum("ij,ij->j", e, de) / e.shape[0]
        else:
            value = np.array([np.vdot(e, e) / e.size])
            grad = np.array([2.0 * np.vdot(e, de) / e.size])
        value, grad = torch.from_numpy(value), torch.from_numpy(grad)
    else:
        phi = torch.as_tensor(log_alpha, dtype=dtype, device=device).detach().reshape(-1)
        per_target = phi.shape[0] > 1
        _check_log_alpha(phi, decomp.n_targets)
    if nv is not None:
        pass  # computed above
    elif autograd:
        phi = phi.clone().requires_grad_(True)
        with torch.enable_grad():
            resid = _loo_residuals(decomp, _alpha_column(decomp, phi))
            per_col = (resid * resid).mean(0)
            value = per_col if per_target else per_col.mean().reshape(1)
            (grad,) = torch.autograd.grad(value.sum(), phi)
        value = value.detach()
    else:
        with torch.no_grad():
            D = _alpha_column(decomp, phi)
            e, de = _loo_residuals_and_tangent(decomp, D, -phi.exp() * D * D)
            value = (e * e).mean(0)
            grad = 2.0 * (e * de).mean(0)
            if not per_target:
                value, grad = value.mean().reshape(1), grad.mean().reshape(1)
    info = HypergradientInfo(
        strategy="closed_form",
        inner_iterations=1,
        inner_converged=True,
        n_grad=1,
        extra={"objective": "leave_one_out", "mode": decomp.mode, "autograd": bool(autograd)},
    )
    return value, grad, info


def _check_alphas(alphas):
    """Penalties of a curve: a non-empty 1-D array of finite, non-negative values."""
    a = np.asarray(
        alphas.detach().cpu() if isinstance(alphas, torch.Tensor) else alphas, dtype=float
    )
    if a.ndim != 1 or a.shape[0] == 0:
        raise ValueError(f"alphas must be a non-empty 1-D array; got shape {a.shape}.")
    if not (np.isfinite(a).all() and (a >= 0).all()):
        raise ValueError(
            f"alphas must be finite and non-negative (penalties, not their logs); got "
            f"{a[~(np.isfinite(a) & (a >= 0))].tolist()[:5]}."
        )
    return a


def ridge_loo_curve(decomp, alphas, per_target=False, max_elements=2**22):
    """Mean squared LOO error at many alphas (no autograd), in chunks.

    Parameters
    ----------
    decomp : RidgeDecomposition
    alphas : array-like of shape (n_alphas,)
        Penalties (not logs).
    per_target : bool, default=False
        Return one column per target instead of the mean over targets.
    max_elements : int
        Bound on the size of the temporary (n_samples, chunk, n_targets).

    Returns
    -------
    tensor of shape (n_alphas, n_targets) or (n_alphas, 1)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_loo_decomposition, ridge_loo_curve
    >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    >>> y = torch.tensor([0.0, 1.0, 2.0, 3.5], dtype=torch.float64)
    >>> ridge_loo_curve(ridge_loo_decomposition(X, y), [1e-9, 1e9]).round(decimals=3)
    tensor([[0.1120],
            [2.9720]], dtype=torch.float64)
    """
    dtype, device = decomp.eigvals.dtype, decomp.eigvals.device
    _check_loo(decomp)
    alphas = _check_alphas(alphas)
    n, k = decomp.n_samples, decomp.n_targets
    chunk = max(1, int(max_elements // max(1, n * k)))
    nv = _numpy_view(decomp)
    if nv is None:
        alphas = torch.as_tensor(np.asarray(alphas, dtype=float), dtype=dtype, device=device)
        src, eigvals = decomp, decomp.eigvals
    else:
        alphas = np.asarray(alphas, dtype=nv.eigvals.dtype)
        src, eigvals = nv, nv.eigvals
    out = []
    with torch.no_grad():
        for start in range(0, alphas.shape[0], chunk):
            a = alphas[start : start + chunk]
            D = 1.0 / (eigvals[:, None] + a[None, :])  # (m, na)
            resid = _batched_loo_residuals(src, D)  # (n, na, k)
            per_col = (resid * resid).mean(0)  # (na, k)
            out.append(per_col if per_target else per_col.mean(1)[:, None])
    if nv is not None:
        return torch.from_numpy(np.concatenate(out, 0))
    return torch.cat(out, 0)


def _batched_loo_residuals(decomp, D):
    """:func:`_loo_residuals` for a batch of alphas: D (m, na) -> (n, na, k)."""
    B, Bsq = decomp.basis, decomp.basis_sq
    m, na = D.shape
    k = decomp.n_targets
    sqrt_sw = decomp.sqrt_sw[:, None]
    DBy = (D[:, :, None] * decomp.basis_t_y[:, None, :]).reshape(m, na * k)
    if decomp.mode == "gram":
        num = (B @ DBy).reshape(-1, na, k)
        den = Bsq @ D
        if decomp.fit_intercept and not decomp.deflated:
            den = den - (B @ (D * decomp.basis_t_sqrt_sw[:, None])) * sqrt_sw / decomp.sw_sum
    else:
        num = decomp.y[:, None, :] - (B @ DBy).reshape(-1, na, k)
        den = 1.0 - Bsq @ D
        if decomp.fit_intercept:
            g = sqrt_sw - B @ (D * decomp.basis_t_sqrt_sw[:, None])
            den = den - g * sqrt_sw / decomp.sw_sum
    return num / den[:, :, None]


def ridge_coef(decomp, log_alpha):
    """Ridge coefficients and intercept at ``alpha`` from a decomposition.

    ``w = V D V^T Xs^T ys`` (cov mode) or ``w = Xs^T Q D Q^T ys`` (gram
    mode, the dual form), ``b = y_offset - X_offset w``. Differentiable in
    ``log_alpha`` (scalar, one per target, or a batch ``(n_alphas, 1)`` /
    ``(n_alphas, n_targets)`` giving coefficients for each row).

    Returns
    -------
    coef : tensor of shape (..., n_features, n_targets)
    intercept : tensor of shape (..., n_targets)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_loo_decomposition, ridge_coef
    >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    >>> y = 2 * X[:, 0] + 1
    >>> coef, intercept = ridge_coef(ridge_loo_decomposition(X, y), torch.tensor(-30.0))
    >>> round(float(coef[0, 0]), 6), round(float(intercept[0]), 6)
    (2.0, 1.0)
    """
    dtype, device = decomp.eigvals.dtype, decomp.eigvals.device
    needs_grad = isinstance(log_alpha, torch.Tensor) and log_alpha.requires_grad
    nv = None if needs_grad else _numpy_view(decomp)
    if nv is not None:  # no gradient wanted: the same products on numpy views (CPU)
        if isinstance(log_alpha, torch.Tensor):
            log_alpha = log_alpha.detach().cpu().numpy()
        la = np.asarray(log_alpha, dtype=nv.eigvals.dtype)
        _check_log_alpha(la, nv.n_targets, batched=True)
        batched = la.ndim == 2
        la = la if batched else la.reshape(1, -1)
        DBy = nv.basis_t_y[None, :, :] / (nv.eigvals[None, :, None] + np.exp(la)[:, None, :])
        if nv.mode == "gram":
            coef = nv.X_scaled.T @ (nv.basis @ DBy)
        else:
            coef = nv.V @ DBy
        intercept = nv.y_offset - np.einsum("p,apk->ak", nv.X_offset, coef)
        if not batched:
            coef, intercept = coef[0], intercept[0]
        return torch.from_numpy(np.ascontiguousarray(coef)), torch.from_numpy(intercept)
    la = torch.as_tensor(log_alpha, dtype=dtype, device=device)
    _check_log_alpha(la, decomp.n_targets, batched=True)
    batched = la.ndim == 2
    if not batched:
        la = la.reshape(1, -1)  # (1, 1) or (1, k)
    D = 1.0 / (decomp.eigvals[None, :, None] + la.exp()[:, None, :])  # (na, m, c)
    DBy = D * decomp.basis_t_y[None, :, :]  # (na, m, k)
    if decomp.mode == "gram":
        coef = decomp.X_scaled.T @ (decomp.basis @ DBy)  # (na, p, k)
    else:
        coef = decomp.V @ DBy
    intercept = decomp.y_offset - torch.einsum("p,apk->ak", decomp.X_offset, coef)
    if not batched:
        coef, intercept = coef[0], intercept[0]
    return coef, intercept


# --------------------------------------------------------------------------
# Ridge as a closed-form inner solver
# --------------------------------------------------------------------------


class RidgeSolver(ClosedFormSolver):
    """Weighted ridge regression solved exactly, differentiable in log-penalties.

    Inner problem (``alpha = exp(phi)``, broadcast as ``penalty`` says)::

        min_{w, b}  1/2 sum_i s_i ||y_i - x_i w - b||^2 + 1/2 sum_j alpha_j ||w_j||^2

    The intercept ``b`` (if ``fit_intercept``) is not penalized; it is
    eliminated by weighted centering. Methods:

    - ``"eigen"`` (scalar or per-target penalty): one eigendecomposition
      (:func:`ridge_loo_decomposition`) at construction, then each call is
      ``O(p * min(n, p) * n_targets)``;
    - ``"cholesky"`` (any penalty): the p x p system
      ``(Xs^T Xs + diag(alpha)) w = Xs^T ys`` when ``p <= n``, else the
      Woodbury (dual) form ``w = A^{-1} Xs^T (Xs A^{-1} Xs^T + I)^{-1} ys``
      with ``A = diag(alpha)``, an n x n Cholesky.

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
    y : tensor of shape (n_samples,) or (n_samples, n_targets)
    sample_weight : tensor of shape (n_samples,), optional
    fit_intercept : bool, default=True
    penalty : {"scalar", "per_feature", "per_target"} or integer tensor, default="scalar"
        Shape of ``phi``: ``()``, ``(n_features,)``, ``(n_targets,)``; or a
        tensor of group labels ``0..G-1`` per feature, for ``phi`` of shape
        ``(G,)``.
    method : {"auto", "eigen", "cholesky"}, default="auto"
        ``"auto"`` is ``"eigen"`` for scalar and per-target penalties.
    decomposition : RidgeDecomposition, optional
        Reuse a decomposition of the same data (eigen method).

    Attributes
    ----------
    last_fallback : str or None
        Set when a Cholesky factorization failed and an LU solve was used.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import RidgeSolver
    >>> X = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    >>> y = 2 * X[:, 0] + 1
    >>> theta = RidgeSolver(X, y).closed_form(torch.tensor(-30.0, dtype=torch.float64))
    >>> round(float(theta["coef"][0]), 6), round(float(theta["intercept"]), 6)
    (2.0, 1.0)
    """

    def __init__(
        self,
        X,
        y,
        sample_weight=None,
        fit_intercept=True,
        penalty="scalar",
        method="auto",
        decomposition=None,
    ):
        y, sample_weight = _check_ridge_data(X, y, sample_weight, "RidgeSolver")
        self.X = X
        self.y = y
        self.sample_weight = sample_weight
        self.fit_intercept = bool(fit_intercept)
        y2, self._y_1d = _as_2d_targets(self.y)
        n, p = X.shape
        if y2.shape[0] != n:
            raise ValueError(f"X has {n} samples but y has {y2.shape[0]}.")
        self.n_features, self.n_targets = p, y2.shape[1]
        if isinstance(penalty, str):
            if penalty not in ("scalar", "per_feature", "per_target"):
                raise ValueError(
                    "penalty must be 'scalar', 'per_feature', 'per_target' or a tensor of "
                    f"group labels, got {penalty!r}."
                )
            self._groups = None
        else:
            groups = torch.as_tensor(penalty, device=X.device)
            integral = _integral(groups)
            groups = groups.long()
            if groups.shape != (p,) or not integral or int(groups.min()) < 0:
                raise ValueError(
                    f"Group labels must be {p} non-negative integers (one per feature)."
                )
            self._groups = groups
            penalty = "groups"
        self.penalty = penalty
        if method == "auto":
            method = "eigen" if penalty in ("scalar", "per_target") else "cholesky"
        if method not in ("eigen", "cholesky"):
            raise ValueError(f"method must be 'auto', 'eigen' or 'cholesky', got {method!r}.")
        if method == "eigen" and penalty not in ("scalar", "per_target"):
            raise ValueError(
                "method='eigen' needs a scalar or per-target penalty (one alpha shared "
                "by all features); use method='cholesky' for per-feature penalties."
            )
        self.method = method
        self.last_fallback = None
        if decomposition is not None:
            if not isinstance(decomposition, RidgeDecomposition):
                raise TypeError(
                    "decomposition must be a RidgeDecomposition from "
                    f"ridge_loo_decomposition; got {type(decomposition).__name__}."
                )
            got = (decomposition.n_samples, decomposition.n_features,
                   decomposition.n_targets, decomposition.fit_intercept)
            if got != (n, p, self.n_targets, self.fit_intercept):
                raise ValueError(
                    "decomposition does not describe this problem: it has (n_samples, "
                    f"n_features, n_targets, fit_intercept) = {got}, the solver "
                    f"{(n, p, self.n_targets, self.fit_intercept)}. Build it with "
                    "ridge_loo_decomposition(X, y, sample_weight, fit_intercept) of "
                    "the same data."
                )
        self._decomp = decomposition
        self._cov = None

    # -- helpers -----------------------------------------------------------

    def phi_shape(self):
        """Shape ``phi`` must have for this penalty."""
        return {
            "scalar": (),
            "per_feature": (self.n_features,),
            "per_target": (self.n_targets,),
            "groups": (int(self._groups.max()) + 1,) if self._groups is not None else None,
        }[self.penalty]

    def _check_phi(self, phi):
        if not isinstance(phi, torch.Tensor):
            raise ValueError("RidgeSolver expects phi to be one tensor of log-penalties.")
        shape = self.phi_shape()
        if tuple(phi.shape) != shape and not (shape == () and phi.numel() == 1):
            raise ValueError(
                f"phi has shape {tuple(phi.shape)} but penalty={self.penalty!r} needs "
                f"shape {shape}."
            )
        if not bool(torch.isfinite(phi.detach()).all()):
            raise ValueError(
                f"phi (log-penalties) must be finite; got {phi.detach().tolist()}."
            )
        return phi

    def _alpha(self, phi):
        """Penalty per feature (p,), per target (1, k) or scalar (1,)."""
        alpha = phi.exp()
        if self.penalty == "groups":
            return alpha[self._groups]
        if self.penalty == "per_target":
            return alpha.reshape(1, -1)
        return alpha.reshape(-1)

    @property
    def decomposition(self):
        """The eigendecomposition used by the eigen method (built lazily)."""
        if self._decomp is None:
            self._decomp = ridge_loo_decomposition(
                self.X, self.y, self.sample_weight, self.fit_intercept
            )
        return self._decomp

    def init_theta(self):
        """Zero coefficients (and intercept): a starting point for iterative strategies."""
        shape = (self.n_features,) if self._y_1d else (self.n_features, self.n_targets)
        theta = {"coef": self.X.new_zeros(shape)}
        if self.fit_intercept:
            theta["intercept"] = self.X.new_zeros(() if self._y_1d else (self.n_targets,))
        return theta

    def _pack(self, coef, intercept):
        if self._y_1d:
            coef, intercept = coef[:, 0], intercept[0]
        theta = {"coef": coef}
        if self.fit_intercept:
            theta["intercept"] = intercept
        return theta

    # -- the inner problem -------------------------------------------------

    def inner_loss(self, theta, phi):
        """The inner objective (weighted squared loss plus penalty)."""
        pred = self.predict(theta, self.X)
        resid = self.y - pred
        if resid.ndim == 1:
            resid = resid[:, None]
        sq = resid * resid
        if self.sample_weight is not None:
            sq = sq * self.sample_weight.to(sq)[:, None]
        coef = theta["coef"]
        coef2 = coef[:, None] if coef.ndim == 1 else coef
        alpha = self._alpha(phi)
        if self.penalty == "per_target":
            pen = (alpha * coef2 * coef2).sum()
        elif alpha.shape[0] == 1:
            pen = alpha[0] * (coef2 * coef2).sum()
        else:
            pen = (alpha[:, None] * coef2 * coef2).sum()
        return 0.5 * sq.sum() + 0.5 * pen

    @staticmethod
    def predict(theta, X):
        """``X @ coef + intercept`` for a solution ``theta``."""
        out = X @ theta["coef"]
        if "intercept" in theta:
            out = out + theta["intercept"]
        return out

    def _centered(self, X_val, y_val):
        """``(X_val - X_offset, y_val - y_offset)`` with the offsets of the fit
        (``(None, None)`` without an intercept).

        The residual ``y - X w - b`` with ``b = y_offset - X_offset w`` is
        ``(y - y_offset) - (X - X_offset) w``; computed this way it keeps the
        digits an offset would take: with float32 and targets near 1e5, the
        rounding of ``X w + b`` (~4e-3 per sample) made the validation curve
        noisy, and BilevelRidgeCV(cv=5, dtype='float32')'s alpha came out
        1.5% of the float64 one.
        """
        if not self.fit_intercept:
            return None, None
        if self.method == "eigen":
            X_off, y_off = self.decomposition.X_offset, self.decomposition.y_offset
        else:
            if self._cov is None:
                self._cholesky_solve(torch.zeros(self.phi_shape(), dtype=self.X.dtype,
                                                 device=self.X.device))
            X_off, y_off = self._cov["X_offset"], self._cov["y_offset"]
        X_off = torch.as_tensor(X_off).to(X_val)
        y_off = torch.as_tensor(y_off).to(X_val)
        y_c = y_val - (y_off[0] if y_val.ndim == 1 else y_off)
        return X_val - X_off, y_c

    def closed_form(self, phi):
        """Return ``{"coef", "intercept"}`` at ``alpha = exp(phi)``, in autograd."""
        phi = self._check_phi(phi)
        if self.method == "eigen":
            coef, intercept = ridge_coef(self.decomposition, phi.reshape(-1))
            return self._pack(coef, intercept)
        return self._pack(*self._cholesky_solve(phi))

    def coef_path(self, alphas):
        """Coefficients at many scalar alphas, no autograd.

        Returns ``coef`` of shape (n_alphas, p, k) and ``intercept`` (n_alphas, k).
        """
        dtype, device = self.X.dtype, self.X.device
        alphas = _check_alphas(alphas)
        if not (alphas > 0).all():
            raise ValueError(
                f"alphas must be positive (penalties, not their logs); got "
                f"{alphas[alphas <= 0].tolist()[:5]}."
            )
        la = torch.as_tensor(np.log(alphas), dtype=dtype, device=device)
        with torch.no_grad():
            if self.method == "eigen":
                return ridge_coef(self.decomposition, la.reshape(-1, 1))
            pairs = [self._cholesky_solve(v.expand(self.phi_shape())) for v in la]
        return torch.stack([c for c, _ in pairs]), torch.stack([b for _, b in pairs])

    def _cholesky_solve(self, phi):
        if self._cov is None:
            y2, _ = _as_2d_targets(self.y)
            Xs, ys, _, X_offset, y_offset = _center_and_rescale(
                self.X, y2, self.sample_weight, self.fit_intercept
            )
            n, p = Xs.shape
            self._cov = {
                "Xs": Xs,
                "ys": ys,
                "X_offset": X_offset,
                "y_offset": y_offset,
                "primal": p <= n,
                "C": _gram(Xs) if p <= n else None,
                "Xty": Xs.T @ ys,
            }
        c = self._cov
        Xs, ys = c["Xs"], c["ys"]
        n, p = Xs.shape
        alpha = self._alpha(phi)
        if self.penalty == "per_target":
            a = alpha.reshape(-1)  # (k,)
            if c["primal"]:
                A = c["C"][None] + a[:, None, None] * torch.eye(p, dtype=Xs.dtype, device=Xs.device)
                rhs = c["Xty"].T[:, :, None]
                coef = self._spd_solve(A, rhs)[:, :, 0].T
            else:
                eye = torch.eye(n, dtype=Xs.dtype, device=Xs.device)
                G = (Xs @ Xs.T)[None] + a[:, None, None] * eye
                dual = self._spd_solve(G, ys.T[:, :, None])[:, :, 0].T
                coef = Xs.T @ dual
        else:
            a = alpha.expand(p) if alpha.shape[0] == 1 else alpha
            if c["primal"]:
                coef = self._spd_solve(c["C"] + torch.diag(a), c["Xty"])
            else:
                XA = Xs / a  # Xs diag(1/alpha)
                G = XA @ Xs.T + torch.eye(n, dtype=Xs.dtype, device=Xs.device)
                coef = XA.T @ self._spd_solve(G, ys)
        intercept = c["y_offset"] - c["X_offset"] @ coef
        return coef, intercept

    def _spd_solve(self, A, b):
        x, lu = _cholesky_or_lu(A, b)
        if lu:
            self.last_fallback = _LU_FALLBACK
        return x


_LU_FALLBACK = (
    "Cholesky factorization failed (matrix not numerically positive definite); used "
    "an LU solve."
)


def _cholesky_or_lu(A, b):
    """``A^{-1} b`` by Cholesky (batched ``A`` too), by LU where that fails;
    and whether LU was used."""
    L, status = torch.linalg.cholesky_ex(A)
    if bool((status != 0).any()):
        return torch.linalg.solve(A, b), True
    return torch.cholesky_solve(b, L), False


# --------------------------------------------------------------------------
# Validation error of ridge (K-fold / holdout path)
# --------------------------------------------------------------------------


def _weighted_mse(pred, y, sample_weight):
    """Per-target mean squared error, ``sum_i s_i e_i^2 / sum_i s_i``."""
    resid = y - pred
    if resid.ndim == 1:
        resid = resid[:, None]
    sq = resid * resid
    if sample_weight is None:
        return sq.mean(0)
    w = sample_weight.to(sq)
    return (w @ sq) / w.sum()


def _check_validation_data(solver, X_val, y_val, sample_weight, where):
    """Validation data of a ridge solver, as tensors of its dtype and device.

    Shapes are checked against the solver (torch's "size mismatch" or a
    silent broadcast of one target against two before), values must be
    finite and weights non-negative with a positive sum (``0 / 0`` before).
    """
    _check_tensors(where, X_val=X_val, y_val=y_val, sample_weight=sample_weight)
    dtype, device = solver.X.dtype, solver.X.device
    if X_val.ndim != 2 or X_val.shape[1] != solver.n_features:
        raise ValueError(
            f"{where}: X_val has shape {tuple(X_val.shape)}; expected (n_val, "
            f"{solver.n_features}), the solver's number of features."
        )
    n_val = X_val.shape[0]
    k = 1 if y_val.ndim == 1 else (y_val.shape[1] if y_val.ndim == 2 else -1)
    if y_val.ndim == 0 or y_val.shape[0] != n_val or k != solver.n_targets:
        raise ValueError(
            f"{where}: y_val has shape {tuple(y_val.shape)}; expected ({n_val},) or "
            f"({n_val}, {solver.n_targets}): one row per row of X_val and the solver's "
            f"{solver.n_targets} target(s)."
        )
    X_val = X_val.to(dtype=dtype, device=device)
    y_val = y_val.to(dtype=dtype, device=device)
    if not (bool(torch.isfinite(X_val).all()) and bool(torch.isfinite(y_val).all())):
        raise ValueError(f"{where}: X_val and y_val must be finite (no NaN or infinity).")
    if sample_weight is not None:
        sample_weight = _check_sample_weight(
            sample_weight, n_val, X_val, where, per="validation sample",
            zero_sum=", so the weighted validation error is 0/0",
        )
    return X_val, y_val, sample_weight


def ridge_validation_curve(solver, X_val, y_val, alphas, sample_weight=None):
    """Validation MSE per target of ridge at many scalar alphas (no autograd).

    Returns
    -------
    tensor of shape (n_alphas, n_targets)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import RidgeSolver, ridge_validation_curve
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    >>> y = X.sum(1)
    >>> ridge_validation_curve(RidgeSolver(X[:20], y[:20]), X[20:], y[20:], [1e-8, 1e8]).shape
    torch.Size([2, 1])
    """
    X_val, y_val, sample_weight = _check_validation_data(
        solver, X_val, y_val, sample_weight, "ridge_validation_curve"
    )
    coef, intercept = solver.coef_path(alphas)  # (na, p, k), (na, k)
    with torch.no_grad():
        X_c, y_c = solver._centered(X_val, y_val)
        if X_c is None:
            pred = X_val[None] @ coef + intercept[:, None, :]  # (na, nv, k)
            y2 = (y_val[:, None] if y_val.ndim == 1 else y_val).to(pred)
        else:  # residuals of centered data: see RidgeSolver._centered
            pred = X_c[None] @ coef
            y2 = (y_c[:, None] if y_c.ndim == 1 else y_c).to(pred)
        sq = (pred - y2[None]) ** 2
        if sample_weight is None:
            return sq.mean(1)
        w = sample_weight.to(sq)
        return torch.einsum("n,ank->ak", w, sq) / w.sum()


def ridge_validation_value_and_grad(
    solver, X_val, y_val, log_alpha, sample_weight=None, hypergradient="closed_form", init=None
):
    """Validation MSE of ridge and its hypergradient through :func:`argmin`.

    The inner problem is ``solver`` (a :class:`RidgeSolver` with a scalar or
    per-target penalty); ``hypergradient`` is any strategy name or object
    (``"closed_form"`` is exact; ``"dense"``, ``"cg"`` use the implicit
    function theorem at the exact inner solution).

    Returns
    -------
    value : tensor of shape (1,) (scalar penalty: mean over targets) or (n_targets,)
    grad : tensor, same shape (derivative of each value in its log-alpha)
    info : HypergradientInfo
    theta : dict of detached tensors (the inner solution)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import RidgeSolver, ridge_validation_value_and_grad
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    >>> y = X.sum(1) + torch.randn(30, generator=g, dtype=torch.float64)
    >>> value, grad, info, theta = ridge_validation_value_and_grad(
    ...     RidgeSolver(X[:20], y[:20]), X[20:], y[20:], 0.0)
    >>> info.strategy, value.shape
    ('closed_form', torch.Size([1]))
    """
    dtype, device = solver.X.dtype, solver.X.device
    X_val, y_val, sample_weight = _check_validation_data(
        solver, X_val, y_val, sample_weight, "ridge_validation_value_and_grad"
    )
    phi = torch.as_tensor(log_alpha, dtype=dtype, device=device).detach().clone()
    phi = phi.reshape(solver.phi_shape()).requires_grad_(True)
    if init is None:
        init = solver.init_theta()
    with torch.enable_grad():
        theta, info = argmin(
            solver.inner_loss, phi, init, hypergradient=hypergradient, solver=solver
        )
        X_c, y_c = solver._centered(X_val, y_val)
        if X_c is None:
            pred, target = solver.predict(theta, X_val), y_val
        else:  # residuals of centered data: see RidgeSolver._centered
            pred, target = X_c @ theta["coef"], y_c
        per_target = _weighted_mse(pred, target, sample_weight)
        value = per_target if solver.penalty == "per_target" else per_target.mean().reshape(1)
        (grad,) = torch.autograd.grad(value.sum(), phi)
    return value.detach(), grad.detach().reshape(-1), info, tree_detach(theta)


# --------------------------------------------------------------------------
# Kernel ridge
# --------------------------------------------------------------------------


def kernel_ridge_fit(K, y, reg):
    """Dual coefficients ``(K + reg I)^{-1} y`` by Cholesky, in autograd.

    Differentiable in ``K`` (hence in whatever produced it, e.g. support
    points), ``y`` and ``reg`` (a scalar tensor or float; an absolute penalty,
    unlike :func:`kernel_ridge_coef` whose penalty is relative to the trace).
    Falls back to an LU solve if the Cholesky factorization fails: a
    singular ``K + reg I`` is then a ``ValueError``, and one singular to
    working precision (typically ``reg=0`` with a rank-deficient ``K``,
    whose coefficients come out near ``1 / eps``) a
    ``HypergradientWarning``, both naming the cause and the fix. Predict
    with ``K_test_train @ dual``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import kernel_ridge_fit
    >>> K = torch.eye(2, dtype=torch.float64)
    >>> dual = kernel_ridge_fit(K, torch.tensor([1.0, 2.0], dtype=torch.float64), 1.0)
    >>> [round(v, 6) for v in dual.tolist()]
    [0.5, 1.0]
    >>> [round(v, 6) for v in (K @ dual).tolist()]
    [0.5, 1.0]
    """
    return _kernel_ridge_fit(K, y, reg)[0]


def _kernel_ridge_fit(K, y, reg):
    """:func:`kernel_ridge_fit`, and whether its solve fell back from Cholesky
    to LU (for :class:`KernelRidgeSolver`'s ``last_fallback``)."""
    for name, a in (("K", K), ("y", y)):
        if not isinstance(a, torch.Tensor):
            raise TypeError(
                f"kernel_ridge_fit: {name} must be a torch tensor; got {type(a).__name__}."
            )
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"kernel_ridge_fit: K must be a square matrix; got shape {tuple(K.shape)}.")
    n = K.shape[0]
    if y.ndim not in (1, 2) or y.shape[0] != n:
        # (torch's "Incompatible matrix sizes for cholesky_solve")
        raise ValueError(
            f"kernel_ridge_fit: y must have one row per row of K ({n}); got shape "
            f"{tuple(y.shape)}."
        )
    # K first: a penalty relative to K's diagonal (kernel_ridge_coef) is NaN when
    # K is, and the message blamed reg (a kernel returning NaN)
    if not bool(torch.isfinite(K.detach()).all()):
        raise ValueError("kernel_ridge_fit: K is not finite (NaN or infinity).")
    if isinstance(reg, torch.Tensor):
        r = reg.detach()
        reg_ok = bool(torch.isfinite(r).all()) and bool((r >= 0).all())
    else:
        reg_ok = isinstance(reg, numbers.Real) and math.isfinite(reg) and reg >= 0
    if not reg_ok:
        # (a negative reg was solved as K - |reg| I, NaN gave a NaN solution)
        raise ValueError(f"kernel_ridge_fit: reg must be a finite number >= 0; got {reg!r}.")
    y = y.to(dtype=K.dtype)  # (float32 targets: a dtype RuntimeError in the solve)
    A = K + reg * torch.eye(n, dtype=K.dtype, device=K.device)
    y2 = y[:, None] if y.ndim == 1 else y
    try:
        dual, lu = _cholesky_or_lu(A, y2)
    except torch.linalg.LinAlgError as exc:
        # (a raw "_LinAlgError: torch.linalg.solve: The solver failed because the
        # input matrix is singular", e.g. kernel_ridge_coef on an all-zero K,
        # whose relative penalty is then 0)
        raise ValueError(
            f"kernel_ridge_fit: K + reg*I is singular (reg={_reg_value(reg):.3g}): "
            + _singular_cause(K, reg)
        ) from exc
    if lu:
        _warn_if_ill_conditioned(K, reg, A, y2, dual)
    return (dual[:, 0] if y.ndim == 1 else dual), lu


def _check_kernel_test(K_test, dual, where):
    """``K_test`` for predictions ``K_test @ dual``: a real tensor of shape
    ``(m, n)`` against ``dual`` of shape ``(n,)`` or ``(n, k)``, returned cast
    to ``dual``'s dtype and device (a no-op when they match).

    (A K_test with the wrong number of columns raised torch's "size mismatch,
    got input (3), mat (3x4), vec (10)"; a float32 one against float64
    coefficients "addmv input tensors must have the same dtype".)
    """
    _check_tensors(where, K_test=K_test)
    n = dual.shape[0]
    if K_test.ndim != 2 or K_test.shape[1] != n:
        raise ValueError(
            f"{where}: K_test must have shape (m, {n}), one row per test point and "
            f"one column per training point; got shape {tuple(K_test.shape)}. "
            "Compute it as kernel(X_test, X_train)."
        )
    if K_test.is_complex() or K_test.dtype == torch.bool:
        raise TypeError(f"{where}: K_test must be a real tensor; got dtype {K_test.dtype}.")
    return K_test.to(dtype=dual.dtype, device=dual.device)


def _reg_value(reg):
    """``reg`` (a number, or a tensor: its largest entry) as a float, for messages."""
    return float(reg.detach().max() if isinstance(reg, torch.Tensor) else reg)


def _singular_cause(K, reg):
    """Why ``K + reg I`` is (numerically) singular, and the fix."""
    r = _reg_value(reg)
    scale = float(K.detach().diagonal().abs().max()) if K.numel() else 0.0
    if scale == 0.0:
        return (
            "K's diagonal is zero (a kernel that returned zeros?), so no penalty "
            "relative to it can help: kernel_ridge_coef's is reg * mean(diag(K)) = 0. "
            "Check the kernel, or pass an absolute reg > 0 to kernel_ridge_fit."
        )
    if r <= torch.finfo(K.dtype).eps * scale:
        return (
            "K is singular (e.g. a linear kernel on fewer features than samples, or "
            f"repeated points) and reg={r:.3g} adds nothing at its scale (largest "
            f"diagonal entry {scale:.3g}). Use reg > 0, e.g. 1e-6 times the mean of "
            "K's diagonal."
        )
    return (
        "K is not positive semi-definite (its Cholesky factorization failed) and has "
        "an eigenvalue near -reg: check the kernel that produced it, or change reg."
    )


def _warn_if_ill_conditioned(K, reg, A, y2, dual):
    """Warn when the LU fallback's solution says ``K + reg I`` is singular to
    working precision: ``|dual| |A|_F / |y|`` is a lower bound of its
    condition number, and above ``0.01 / eps`` fewer than two digits of
    ``dual`` are right. Runs only after a failed Cholesky factorization.

    (``kernel_ridge_fit(X @ X.T, y, 0.0)``, X of shape (10, 3), returned
    coefficients of 2.8e16 silently, bound 4e17. Over X of shapes (10, 3) to
    (200, 20) and five seeds, wherever Cholesky failed, the bound was 9e15 to
    6e18 in float64 (threshold 4.5e13) and 1e7 to 1e10 in float32 (threshold
    8.4e4); random symmetric indefinite matrices of size 10 to 500, which LU
    solves well, gave at most 9e2.)
    """
    with torch.no_grad():
        y_norm = float(torch.linalg.norm(y2))
        if y_norm == 0.0:
            return
        bound = float(torch.linalg.norm(dual) * torch.linalg.norm(A)) / y_norm
    if not bound > 0.01 / torch.finfo(A.dtype).eps:  # (NaN warns too)
        return
    warnings.warn(
        f"kernel_ridge_fit: K + reg*I is singular to working precision (reg="
        f"{_reg_value(reg):.3g}; condition number >= {bound:.1e}), so the dual "
        f"coefficients (largest {float(dual.detach().abs().max()):.3g}) are "
        f"unreliable: " + _singular_cause(K, reg),
        HypergradientWarning,
        stacklevel=4,  # kernel_ridge_fit's caller
    )


class KernelRidgeSolver(ClosedFormSolver):
    """Kernel ridge regression as a closed-form inner problem.

    The inner variable is the dual vector ``a``; the inner objective is
    ``1/2 a^T (K + reg I) a - a^T y`` whose minimizer is
    ``a* = (K + reg I)^{-1} y``. ``phi`` is either a tensor (the log of
    ``reg``) or a dict with any of the keys ``"X"`` (support inputs),
    ``"y"`` (support targets or soft labels) and ``"log_reg"``; missing
    entries come from the constructor. With ``"X"`` in ``phi`` the kernel
    is recomputed from ``kernel(X, X)``, so gradients reach the support
    points (kernel inducing points, KIP).

    Parameters
    ----------
    kernel : callable or str, optional
        ``kernel(A, B) -> (len(A), len(B))`` tensor, differentiable, or a name
        accepted by :func:`pairwise_kernel` (``"rbf"``, ``"ntk"``, ...).
    X : tensor, optional
        Fixed support inputs.
    y : tensor, optional
        Fixed support targets.
    K : tensor, optional
        Precomputed kernel matrix of the support (instead of kernel and X).
    log_reg : float or tensor, optional
        Fixed log-regularization (default log(1e-6)).
    kernel_params : dict, optional
        Keyword arguments of a named kernel.

    Attributes
    ----------
    last_fallback : str or None
        Set by :meth:`closed_form` when the Cholesky factorization of
        ``K + reg I`` failed and an LU solve was used.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import KernelRidgeSolver
    >>> lin = lambda A, B: A @ B.T
    >>> Xs = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    >>> solver = KernelRidgeSolver(lin, y=torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> phi = {"X": Xs, "log_reg": torch.tensor(0.0, dtype=torch.float64)}
    >>> dual = solver.closed_form(phi)
    >>> pred = solver.predict(dual, phi, torch.tensor([[3.0]], dtype=torch.float64))
    >>> pred.backward()
    >>> Xs.grad.shape
    torch.Size([2, 1])
    """

    def __init__(self, kernel=None, X=None, y=None, K=None, log_reg=None, kernel_params=None):
        self.kernel = kernel
        self.kernel_params = kernel_params
        self.X = X
        self.y = y
        self.K = K
        self.log_reg = math.log(1e-6) if log_reg is None else log_reg
        self.last_fallback = None

    def _parts(self, phi):
        if isinstance(phi, torch.Tensor):
            phi = {"log_reg": phi}
        if not isinstance(phi, dict):
            raise ValueError("KernelRidgeSolver expects phi to be a tensor or a dict.")
        unknown = set(phi) - {"X", "y", "log_reg"}
        if unknown:
            raise ValueError(f"Unknown phi keys {sorted(unknown)}; use 'X', 'y', 'log_reg'.")
        X = phi.get("X", self.X)
        y = phi.get("y", self.y)
        log_reg = phi.get("log_reg", self.log_reg)
        if y is None:
            raise ValueError("KernelRidgeSolver needs targets: pass y=... or phi['y'].")
        if "X" in phi or self.K is None:
            if self.kernel is None or X is None:
                raise ValueError("KernelRidgeSolver needs K=..., or kernel=... and X=....")
            K = self._kernel(X, X)
        else:
            K = self.K
        reg = log_reg.exp() if isinstance(log_reg, torch.Tensor) else math.exp(log_reg)
        return X, y, K, reg

    def _kernel(self, A, B):
        if isinstance(self.kernel, str):
            from ._kernels import pairwise_kernel

            return pairwise_kernel(A, B, kernel=self.kernel, **(self.kernel_params or {}))
        return self.kernel(A, B)

    def closed_form(self, phi):
        X, y, K, reg = self._parts(phi)
        dual, lu = _kernel_ridge_fit(K, y.to(K.dtype), reg)
        # (an LU fallback went unrecorded: the 'closed_form' strategy's
        # info.fallback read None)
        self.last_fallback = _LU_FALLBACK if lu else None
        return dual

    def inner_loss(self, theta, phi):
        """``1/2 a^T (K + reg I) a - a^T y`` (summed over target columns)."""
        _, y, K, reg = self._parts(phi)
        Ka = K @ theta + reg * theta
        return 0.5 * (theta * Ka).sum() - (theta * y.to(K.dtype)).sum()

    def predict(self, theta, phi, X_test=None, K_test=None):
        """Predictions on ``X_test`` (through ``kernel``) or from ``K_test``
        (shape ``(m, n_support)``, cast to ``theta``'s dtype)."""
        if K_test is None:
            X, _, _, _ = self._parts(phi)
            K_test = self._kernel(X_test, X)
        else:
            K_test = _check_kernel_test(K_test, theta, "KernelRidgeSolver.predict")
        return K_test @ theta

    def init_theta(self, n_support=None, n_targets=None, like=None):
        """Zero dual vector for the support (needs its size)."""
        y = self.y
        if y is None:
            raise ValueError("init_theta needs fixed targets y.")
        return torch.zeros_like(y, dtype=y.dtype if like is None else like.dtype)


# --------------------------------------------------------------------------
# One-dimensional search over log-alpha
# --------------------------------------------------------------------------


@dataclasses.dataclass
class LogAlphaSearchResult:
    """Outcome of :func:`minimize_log_alpha` (arrays have one entry per coordinate).

    Attributes
    ----------
    x : ndarray
        Best log-alpha found.
    fun : ndarray
        Objective there.
    grad : ndarray
        Derivative there (nan where only the scan evaluated it).
    n_iter : int
        Hypergradient evaluations (after the scan, if any).
    converged : ndarray of bool
        Whether each coordinate met ``tol``.
    history : list of float
        Mean objective at the current best point: after the scan, then after
        every refinement iteration (non-increasing).
    grid : ndarray or None
        The scanned log-alphas; ``grid_values`` the objective there.
    """

    x: np.ndarray
    fun: np.ndarray
    grad: np.ndarray
    n_iter: int
    converged: np.ndarray
    history: list
    grid: Optional[np.ndarray] = None
    grid_values: Optional[np.ndarray] = None
    n_evaluations: int = 0


def minimize_log_alpha(
    value_and_grad,
    *,
    values=None,
    grid=None,
    x0=None,
    tol=1e-4,
    max_iter=100,
    step=1.0,
    bounds=(-120.0, 120.0),
    expand=False,
):
    """Minimize k independent 1-D objectives of log-alpha with exact derivatives.

    Two phases, vectorized over the k coordinates (k = 1 for one shared
    alpha, k = n_targets for one alpha per target):

    1. **Bracket.** With ``grid`` and ``values``: evaluate the cheap
       objective at every grid point and take the best ``x_b``. Its
       derivative sign says on which side the minimum lies; the neighbouring
       grid point ``e`` on that side has ``f(e) >= f(x_b)``, so a local
       minimum lower than ``f(x_b)`` lies strictly between them. This is what
       makes the search robust to several local minima: the global minimum
       *on the grid* is always bracketed and the result is never worse
       than it. With ``x0`` instead: step ``step, 2 step, 4 step, ...``
       downhill until the objective rises or the slope changes sign.
    2. **Refine.** Keep the best point ``x_b`` and the far end ``e`` of its
       bracket. The trial point is, in order of preference and when it falls
       strictly inside ``(x_b, e)``: the secant step on the derivative from
       the last two derivative evaluations; on the first step, a Newton step
       with the curvature of the parabola through the three best grid
       points; the minimizer of the quadratic through ``f(x_b), f'(x_b),
       f(e)``; the midpoint (always the midpoint after two trials in a row
       that did not lower the objective, as in Brent's method: one-sided
       secant steps can otherwise creep towards the best point by the
       margin kept from the far end). A trial that lowers the objective becomes
       ``x_b`` (and the old ``x_b`` becomes ``e`` if the derivative changed
       sign); otherwise it becomes ``e``. Stop when the secant step from
       ``x_b`` is below ``tol`` (in log-alpha; as Newton's method stops on a
       small Newton step), when the bracket is narrower than ``tol``, or
       when ``|f'(x_b)| <= 1e-12 |f(x_b)|``.

    A one-dimensional problem needs neither a learning rate nor a generic
    optimizer: secant steps on the exact derivative converge superlinearly,
    typically in two to four hypergradient evaluations after the scan.

    Parameters
    ----------
    value_and_grad : callable
        ``value_and_grad(x: ndarray (k,)) -> (f (k,), g (k,))``.
    values : callable, optional
        ``values(grid: ndarray (a,)) -> ndarray (a, k)``, the objective at
        many points (no derivatives needed). A non-finite value (NaN or
        infinity) counts as ``+inf``: never the best grid point. A
        coordinate whose values are all non-finite is a ``ValueError``.
    grid : ndarray of shape (a,), optional
        Strictly increasing, finite log-alphas to scan; requires ``values``
        and excludes ``x0``.
    x0 : float or ndarray of shape (k,), optional
        Starting point when no grid is given (clamped into ``bounds``).
    tol : float, default=1e-4
        Tolerance on log-alpha.
    max_iter : int, default=100
        Maximum number of refinement evaluations. With a grid, ``0`` returns
        the best grid points as they are, without calling
        ``value_and_grad`` (``grad`` is then NaN), unless one of them is at
        an end of the grid: that case is searched as usual (bracket or
        expansion), without refinement.
    step : float > 0, default=1.0
        First bracketing step from ``x0``.
    bounds : tuple of float
        Limits on log-alpha, ``(lower, upper)`` with ``lower < upper``, for
        the search from ``x0`` and the expansion beyond a grid. The points of
        a grid are taken as given, inside the bounds or not: the refinement
        stays between grid points, so a grid reaching beyond the bounds can
        return a point beyond them.
    expand : bool, default=False
        With a grid: when the best grid point is an end of the grid and the
        slope points outwards, search beyond it (steps of the grid spacing,
        doubled until the objective rises, stops falling by more than a
        relative ``1e-8`` (an asymptote) or the slope flips, within
        ``bounds``; at most 60 such evaluations, not counted in
        ``max_iter``). By default the grid is the domain, as for a grid
        search.

    Returns
    -------
    LogAlphaSearchResult

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.hypergrad import minimize_log_alpha
    >>> f = lambda x: ((x - 1.5) ** 2, 2 * (x - 1.5))
    >>> res = minimize_log_alpha(f, values=lambda g: ((g - 1.5) ** 2)[:, None],
    ...                          grid=np.linspace(-5, 5, 11))
    >>> round(float(res.x[0]), 6)
    1.5
    """
    lo_b, hi_b = (float(b) for b in bounds)
    if not lo_b < hi_b:
        raise ValueError(f"bounds={bounds!r} must be (lower, upper) with lower < upper.")
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step={step!r} must be a positive number (a bracketing step).")
    # (a negative or NaN tol, or max_iter=-1 or 1.5, were taken as given)
    if not (isinstance(tol, numbers.Real) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol={tol!r} must be a finite number >= 0 (in log-alpha).")
    if not (
        isinstance(max_iter, numbers.Integral) and not isinstance(max_iter, bool)
        and max_iter >= 0
    ):
        raise ValueError(f"max_iter={max_iter!r} must be an integer >= 0.")
    if grid is not None and x0 is not None:
        raise ValueError("Pass either grid and values, or x0, not both (x0 was ignored).")

    def evaluate(x):
        f, g = value_and_grad(np.asarray(x, dtype=float))
        f = np.asarray(f, dtype=float).reshape(-1).tolist()
        g = np.asarray(g, dtype=float).reshape(-1).tolist()
        if not len(f) == len(g) == len(x):
            # (zip dropped the extra entries, or the missing ones, silently)
            raise ValueError(
                f"value_and_grad must return one value and one derivative per "
                f"coordinate ({len(x)}); got {len(f)} values and {len(g)} derivatives."
            )
        return f, g

    V = None
    if grid is not None:
        if values is None:
            raise ValueError("A grid scan needs the values callable.")
        grid = np.asarray(grid, dtype=float)
        # a reversed grid returned 2.0 for a minimum at 1.5 (the bracket of a
        # neighbour on the wrong side); an empty or 2-D one failed in numpy
        if grid.ndim != 1 or grid.shape[0] == 0 or not np.isfinite(grid).all():
            raise ValueError(
                f"grid must be a non-empty 1-D array of finite log-alphas; got shape "
                f"{grid.shape}" + ("" if grid.ndim != 1 or not grid.size else
                                   " with non-finite entries") + "."
            )
        if not (np.diff(grid) > 0).all():
            raise ValueError(
                "grid must be strictly increasing; sort it first (np.unique(grid))."
            )
        V = np.asarray(values(grid), dtype=float)
        if V.ndim == 1:
            V = V[:, None]
        if V.ndim != 2 or V.shape[0] != grid.shape[0]:
            # (a curve one point short was matched to the wrong grid points)
            raise ValueError(
                f"values(grid) must return shape ({grid.shape[0]},) or "
                f"({grid.shape[0]}, k), one row per grid point; got {V.shape}."
            )
        finite = np.isfinite(V)
        empty = np.flatnonzero(~finite.any(axis=0))
        if empty.size:
            # no grid point can be rated, so there is no grid minimum to bracket:
            # an all-NaN curve started the secant steps at the grid's first point
            # and returned x=[-4.00006] with converged=[True] (the answer, from
            # value_and_grad, was 1.5). An error rather than converged=False:
            # there is no point to return, and x would be taken as an answer.
            raise ValueError(
                f"values(grid) is not finite (NaN or infinity) at any of the "
                f"{grid.shape[0]} grid points for coordinate(s) {empty.tolist()}: "
                "there is no grid minimum to search from. Check the objective (and "
                "its data) for those coordinates, or scan a grid where it is finite."
            )
        # a point where the curve is not finite is never the best one: its value
        # is +inf, so it can only be the far end of a bracket
        V = np.where(finite, V, np.inf)
        idx = np.argmin(V, axis=0).tolist()
        if max_iter == 0 and all(0 < i < len(grid) - 1 for i in idx):
            # the grid search's answer, without a derivative evaluation
            best = V[idx, np.arange(len(idx))]
            return LogAlphaSearchResult(
                x=grid[idx],
                fun=best,
                grad=np.full(len(idx), np.nan),
                n_iter=0,
                n_evaluations=0,
                converged=np.zeros(len(idx), dtype=bool),
                history=[float(np.mean(best))],
                grid=grid,
                grid_values=V,
            )
        # first point: the vertex of the parabola through the best grid point and
        # its neighbours (one hypergradient evaluation saved when it is lower)
        starts = [_parabola_vertex(grid, V[:, j], i) for j, i in enumerate(idx)]
        x_first = [grid[i] if v is None else v for i, v in zip(idx, starts)]
        f1, g1 = evaluate(x_first)
        n_expand = 1
        brackets = []
        redo = []
        for j, i in enumerate(idx):
            v = starts[j]
            if v is None:
                brackets.append(_Bracket.from_grid(grid, V[:, j], i, g1[j]))
            elif _finite(f1[j]) and f1[j] < V[i, j]:
                brackets.append(_Bracket.from_vertex(grid, V[:, j], i, v, f1[j], g1[j]))
            else:
                brackets.append(None)
                redo.append(j)
        if redo:
            # the vertex was no better than the grid point: take the slope there
            _, g2 = evaluate([grid[i] for i in idx])
            n_expand += 1
            for j in redo:
                b = _Bracket.from_grid(grid, V[:, j], idx[j], g2[j])
                v = starts[j]
                if min(b.xb, b.e) < v < max(b.xb, b.e):  # the vertex is a nearer far end
                    b.e, b.fe, b.ge = v, f1[j], g1[j]
                brackets[j] = b
        if expand:
            spacing = float(grid[1] - grid[0]) if len(grid) > 1 else step
            for b in brackets:
                # the best point at an end of the grid, sloping outwards
                if not _finite(b.e) and b.gb != 0 and _finite(b.gb):
                    b.expanding, b.h = True, spacing
            n_expand += _expand(brackets, evaluate, lo_b, hi_b, 60)
    else:
        if x0 is None:
            raise ValueError("Pass either grid and values, or x0.")
        x_init = np.atleast_1d(np.asarray(x0, dtype=float))
        if x_init.ndim != 1 or not np.isfinite(x_init).all():
            # (x0=nan returned nan, silently)
            raise ValueError(f"x0 must be finite log-alphas (a scalar or 1-D); got {x0!r}.")
        # a start outside the bounds is clamped into them (the result stays inside)
        x_init = np.clip(x_init, lo_b, hi_b)
        f0, g0 = evaluate(x_init)
        brackets = [_Bracket.from_point(x, f, g, step) for x, f, g in zip(x_init.tolist(), f0, g0)]
        n_expand = 1 + _expand(brackets, evaluate, lo_b, hi_b, max_iter - 1)
    for b in brackets:
        b.start()
    history = [float(np.mean([b.fb for b in brackets]))]
    n_iter = 0
    while n_iter < max_iter:
        trials = [b.propose(tol) for b in brackets]
        if all(t is None for t in trials):
            break
        xt = [b.xb if t is None else t for b, t in zip(brackets, trials)]
        ft, gt = evaluate(xt)
        n_iter += 1
        for b, t, f, g in zip(brackets, trials, ft, gt):
            if t is not None:
                b.update(t, f, g, tol)
        history.append(float(np.mean([b.fb for b in brackets])))
    return LogAlphaSearchResult(
        x=np.array([b.xb for b in brackets]),
        fun=np.array([b.fb for b in brackets]),
        grad=np.array([b.gb for b in brackets]),
        n_iter=n_iter + n_expand,
        n_evaluations=n_iter + n_expand,
        # a non-finite value or slope is no answer (a NaN objective stopped at once),
        # nor is a bracketing search cut short by max_iter while still stepping
        # downhill (it reported converged at its start point: alpha_init as is)
        converged=np.array(
            [
                not b.active and not b.expanding and _finite(b.fb) and _finite(b.gb)
                for b in brackets
            ]
        ),
        history=history,
        grid=grid,
        grid_values=V,
    )


def _expand(brackets, evaluate, lo, hi, max_evals):
    """Step the expanding brackets downhill until the objective rises or the
    slope flips (or ``max_evals`` evaluations); returns the evaluations spent."""
    n = 0
    while any(b.expanding for b in brackets) and n < max_evals:
        xt = [b.expansion_trial(lo, hi) for b in brackets]
        ft, gt = evaluate(xt)
        n += 1
        for b, x, f, g in zip(brackets, xt, ft, gt):
            b.expansion_update(x, f, g, lo, hi)
    return n


#: widest bracket (in log-alpha) over which the refinement trusts a secant or a
#: quadratic model; wider ones are halved first. Above one decade (2.30), so
#: the brackets of grids of one point per decade or more keep their models
_MODEL_SPAN = 3.0


def _finite(z):
    return z == z and z not in (math.inf, -math.inf)


def _parabola_vertex(grid, values, i):
    """Vertex of the parabola through grid points i-1, i, i+1 (None if not convex/interior)."""
    if not 0 < i < len(grid) - 1:
        return None
    h_l, h_r = grid[i] - grid[i - 1], grid[i + 1] - grid[i]
    s_l = (values[i] - values[i - 1]) / h_l
    s_r = (values[i + 1] - values[i]) / h_r
    curv = 2.0 * (s_r - s_l) / (h_l + h_r)
    if not (_finite(curv) and curv > 0):
        return None
    slope = (h_l * s_r + h_r * s_l) / (h_l + h_r)  # derivative of the parabola at grid[i]
    v = float(grid[i] - slope / curv)
    if not grid[i - 1] < v < grid[i + 1] or v == grid[i]:
        return None
    return v


class _Bracket:
    """State of :func:`minimize_log_alpha` for one coordinate (plain floats: cheap).

    ``xb`` is the best point (value ``fb``, derivative ``gb``); ``e`` the far
    end of the bracket on the descent side (``f(e) >= fb``); ``xp, gp`` the
    previous derivative evaluation; ``curv`` a curvature estimate from the
    scan (used for the first step only).
    """

    nan = float("nan")

    def __init__(self, xb, fb, gb):
        self.xb, self.fb, self.gb = xb, fb, gb
        self.e = self.fe = self.ge = self.nan
        self.xp = self.gp = self.curv = self.nan
        self.first = True
        self.active = False
        self.expanding = False
        self.h = 1.0
        self.fails = 0  # trials in a row that did not lower the objective
        self.from_x0 = False  # bracketing from a start point (not beyond a grid)

    @classmethod
    def from_grid(cls, grid, values, i, g):
        last = len(grid) - 1
        b = cls(float(grid[i]), float(values[i]), float(g))  # the scan's value: the grid minimum
        side = i - 1 if g > 0 else i + 1
        if 0 <= side <= last:
            b.e, b.fe = float(grid[side]), float(values[side])
        if 0 < i < last:
            # curvature of the parabola through the best grid point and its neighbours
            s_r = (values[i + 1] - values[i]) / (grid[i + 1] - grid[i])
            s_l = (values[i] - values[i - 1]) / (grid[i] - grid[i - 1])
            b.curv = float(2.0 * (s_r - s_l) / (grid[i + 1] - grid[i - 1]))
        return b

    @classmethod
    def from_vertex(cls, grid, values, i, x, f, g):
        """Start at the parabola's vertex ``x`` (``f < values[i]``)."""
        b = cls.from_grid(grid, values, i, g)
        b.xb, b.fb, b.gb = x, f, g
        # the nearest scanned point on the descent side: its value is >= values[i] > f
        pts = [float(p) for p in grid[max(i - 1, 0) : i + 2]]
        vals = [float(v) for v in values[max(i - 1, 0) : i + 2]]
        side = [(p, v) for p, v in zip(pts, vals) if (p < x if g > 0 else p > x)]
        if side:
            b.e, b.fe = min(side, key=lambda pv: abs(pv[0] - x))
        else:
            b.e = b.fe = cls.nan
        b.ge = cls.nan
        return b

    @classmethod
    def from_point(cls, x, f, g, step):
        b = cls(x, f, g)
        b.expanding = g != 0 and _finite(g)
        b.h = float(step)
        b.from_x0 = True
        return b

    def expansion_trial(self, lo, hi):
        if not self.expanding:
            return self.xb
        return min(max(self.xb - math.copysign(self.h, self.gb), lo), hi)

    def expansion_update(self, x, f, g, lo, hi):
        if not self.expanding:
            return
        # rose, flat to 1e-8 (an asymptote, e.g. least squares as alpha -> 0), or
        # not finite: the bracket is (xb, x). From x0 (not beyond a grid, which
        # spans the data's own scales), flat but with the slope steeper than at
        # xb on the same side and a fall of at least half the one that xb's
        # slope predicts over the step, is no asymptote: the steps are leaving
        # a plateau they started on (from alpha_init=1e11, ten decades above
        # the optimum, where ridge predicts the mean: the first step fell by
        # 1e-10 and the search stopped there, R^2 2e-9). (Beyond a grid's low
        # end, rounding noise growing towards alpha = 0 passes that test: two
        # samples' leave-one-out error, constant in alpha, ran to 0/0 at 1e-15.)
        leaving = (
            self.from_x0
            and _finite(g)
            and (g > 0) == (self.gb > 0)
            and abs(g) > abs(self.gb)
            and self.fb - f >= 0.5 * abs(self.gb) * abs(x - self.xb)
        )
        if not (f < self.fb - 1e-8 * abs(self.fb) or leaving):
            self.e, self.fe, self.ge = x, f, g
            self.expanding = False
            return
        if (g > 0) != (self.gb > 0):  # slope flipped: the bracket is (x, old xb)
            self.e, self.fe, self.ge = self.xb, self.fb, self.gb
            self.expanding = False
        self.xb, self.fb, self.gb = x, f, g
        if self.expanding and (x <= lo or x >= hi or g == 0):
            self.expanding = False
        self.h *= 2.0

    def start(self):
        # a minimum on the boundary with the slope pointing outward: nothing to refine
        self.active = _finite(self.e) and self.gb != 0 and _finite(self.gb)
        self.xp, self.gp = self.e, self.ge

    def propose(self, tol):
        """Next trial point, or ``None`` once located to ``tol``."""
        if not self.active:
            return None
        xb, gb, e = self.xb, self.gb, self.e
        lo, hi = min(xb, e), max(xb, e)
        # stay off the far end, whose value is already >= f(x_b)
        margin = 1e-3 * (hi - lo)
        if hi - lo > _MODEL_SPAN:
            # too wide for a secant or a quadratic: bracketing steps that overshot
            # onto a plateau (least squares below the spectrum) leave a bracket
            # of 16 units with a slope of 1e-7 at its best end, where both models
            # proposed steps of 1e-6 and the search stopped far from the minimum
            # (diabetes from alpha_init=1e6: alpha 3.4e-8 against 4.2e-3). Halve it
            return 0.5 * (xb + e)
        if self.fails >= 2:
            # two trials in a row rejected: a secant or a quadratic model on one
            # side keeps proposing points next to the far end, each shrinking the
            # bracket by its 0.1% margin (regula falsi's stagnation). Halve it, as
            # Brent's method does. (A digits classifier's shared penalty, whose
            # loosely solved inner problems make values noisy at 3e-5: 101
            # evaluations, 1.9 s, stepping 2e-4 at a time towards the best point)
            return 0.5 * (xb + e)

        def inside(z):
            return _finite(z) and lo < z < hi and z != xb

        sec = self.nan
        if _finite(self.gp) and gb != self.gp:
            sec = xb - gb * (xb - self.xp) / (gb - self.gp)
        if inside(sec) and abs(sec - xb) < tol:
            # the secant step from the best point is below tol: located to tol
            self.active = False
            return None
        newton = xb - gb / self.curv if self.first and self.curv > 0 else self.nan
        t = e - xb  # quadratic q(t) = fb + gb t + c t^2 through f(e)
        quad = self.nan
        if _finite(self.fe) and _finite(t) and t != 0.0:  # (a far end may be inf)
            c = (self.fe - self.fb - gb * t) / (t * t)
            quad = xb - gb / (2.0 * c) if c > 0 else self.nan
        for trial in (sec, newton, quad, 0.5 * (xb + e)):
            if inside(trial):
                break
        return min(max(trial, e + margin), xb) if e < xb else max(min(trial, e - margin), xb)

    def update(self, x, f, g, tol):
        self.first = False
        step = abs(x - self.xb)
        if _finite(f) and f < self.fb:
            if (g > 0) != (self.gb > 0):  # new bracket (old xb, x)
                self.e, self.fe, self.ge = self.xb, self.fb, self.gb
            self.xp, self.gp = self.xb, self.gb
            self.xb, self.fb, self.gb = x, f, g
            better = True
            self.fails = 0
        else:
            self.xp, self.gp = x, g
            self.e, self.fe, self.ge = x, f, g
            better = False
            self.fails += 1
        if (
            (better and step < tol)
            or abs(self.e - self.xb) < tol
            or abs(self.gb) <= 1e-12 * abs(self.fb)
        ):
            self.active = False
