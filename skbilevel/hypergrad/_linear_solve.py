"""Linear solvers for the backward pass of implicit differentiation.

Implicit strategies solve ``H v = g`` where ``H`` is the inner Hessian, known
only through Hessian-vector products. Every solver here takes a ``matvec``
(or a matrix, for :func:`solve_dense`) and a right-hand side ``b`` that is a
1-D vector or a 0-d scalar, and returns ``(x, LinearSolveResult)``. None of
them warns: the caller reads ``result.converged`` / ``result.message`` and
decides (the implicit strategies turn a failure into a
:class:`~skbilevel.hypergrad.LinearSolveWarning` with the numbers).

A solver never returns a silent zero or NaN: conjugate gradient stops at
non-positive curvature and says so, keeps its last finite iterate, and checks its
final residual with one extra product ``A x``.
"""

import dataclasses
import functools
import math
import numbers
from typing import Optional

import torch

from ._checks import _check_int, _check_positive

__all__ = [
    "LinearSolveResult",
    "solve_cg",
    "solve_neumann",
    "solve_dense",
    "solve_identity",
]


@dataclasses.dataclass
class LinearSolveResult:
    """What a linear solve reports.

    Attributes
    ----------
    iterations : int
        Iterations (CG steps, Neumann terms; 1 for a dense factorization,
        0 for the identity).
    residual : float
        Relative residual ``||A x - b|| / ||b||`` of the returned ``x``
        (``0`` when ``b = 0``; ``nan`` where it was not computed).
    converged : bool or None
        Whether ``residual`` met the tolerance (``None`` where no tolerance
        applies, as for the identity approximation).
    n_matvec : int
        Products ``A v`` spent, including the final residual check.
    fallback : str or None
        Description of any fallback taken (Cholesky replaced by LU, a step
        along a direction of non-positive curvature, ...).
    message : str
        Why the solve stopped, in words.
    warm_started : bool or None
        :func:`solve_cg`: whether the start ``x0`` was used (it is ignored
        when not finite or worse than the zero start); ``None`` without one.

    Examples
    --------
    >>> from skbilevel.hypergrad import LinearSolveResult
    >>> res = LinearSolveResult(3, residual=1e-12, converged=True, n_matvec=4)
    >>> res.converged
    True
    """

    iterations: int
    residual: float
    converged: Optional[bool]
    n_matvec: int
    fallback: Optional[str] = None
    message: str = ""
    warm_started: Optional[bool] = None


def _default_tol(dtype):
    """A tolerance reachable in ``dtype``: 1e-10 in float64, 1e-5 in float32."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-3


def _check_b(b, where):
    """``b`` must be a floating-point tensor (a numpy array was an
    AttributeError, an integer tensor a RuntimeError from vector_norm)."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(
            f"{where}: b must be a torch tensor; got {type(b).__name__}. Convert it "
            "with torch.as_tensor(b, dtype=torch.float64)."
        )
    if not b.dtype.is_floating_point:
        raise ValueError(
            f"{where}: b must hold floating-point values; got dtype {b.dtype}. "
            "Convert it with b.double() or b.float()."
        )


def _check_tol(tol, where, allow_none=False):
    if tol is None and allow_none:
        return
    if not (isinstance(tol, numbers.Real) and not isinstance(tol, bool)
            and math.isfinite(tol) and tol >= 0):
        # (tol=-1 ran the solve and reported converged=False whatever the residual)
        none = "None or " if allow_none else ""
        raise ValueError(f"{where}: tol must be {none}a finite number >= 0; got {tol!r}.")


def _as_flat(matvec, b, where="solve"):
    """Flatten ``b`` to 1-D and wrap ``matvec`` to act on flat vectors."""
    _check_b(b, where)
    if not callable(matvec):
        raise TypeError(
            f"{where}: matvec must be a callable v -> A v; got {type(matvec).__name__}"
            + (" (pass lambda v: A @ v, or use solve_dense for a matrix)"
               if isinstance(matvec, torch.Tensor) else "") + "."
        )
    shape = b.shape
    n = b.numel()
    dtype, device = b.dtype, b.device

    def flat_matvec(v):
        out = matvec(v.reshape(shape))
        if not isinstance(out, torch.Tensor) or out.numel() != n:
            # (torch's "inconsistent tensor size" deep inside the solve)
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"{where}: matvec must return a tensor shaped like b, {tuple(shape)}; "
                f"got {got}."
            )
        if out.dtype != dtype or out.device != device:
            # (solve_cg: torch's "dot : expected both vectors to have same dtype";
            # solve_dense: "Expected b and A to have the same dtype"; solve_neumann
            # silently promoted every term). Two attribute comparisons, no sync.
            raise TypeError(
                f"{where}: matvec must return a tensor of b's dtype and device, "
                f"{dtype} on {device}; got {out.dtype} on {out.device}. Cast "
                "inside matvec (lambda v: A(v).to(v.dtype)) or convert b."
            )
        return out.reshape(-1)

    return flat_matvec, b.reshape(-1), shape


def _check_finite_rhs(b_norm):
    """A ``ValueError`` for a right-hand side whose norm ``b_norm`` is not finite."""
    if not math.isfinite(b_norm):
        raise ValueError(
            f"The right-hand side of the linear solve is not finite (norm {b_norm}); "
            "check the outer loss and the inner solution for NaN or inf."
        )


def _norm(v):
    return float(torch.linalg.vector_norm(v))


@functools.lru_cache(maxsize=None)
def _safe_norm_range(dtype):
    """``(lo, hi)``: powers of two between which a right-hand side's norm is
    solved as given: a quarter of the dtype's exponent range either side of 1
    (``2^-256 .. 2^256`` in float64, ``2^-32 .. 2^32`` in float32), so that
    squared norms and ``p^T A p`` keep many decades of room."""
    e = math.frexp(torch.finfo(dtype).max)[1] // 4
    return math.ldexp(1.0, -e), math.ldexp(1.0, e)


def _ldexp(t, k):
    """``t * 2^k``, exact unless values leave the dtype's range, in steps whose
    factor the dtype can hold (``2^145`` is inf in float32)."""
    step = math.frexp(torch.finfo(t.dtype).max)[1] - 2
    while k:
        j = max(-step, min(step, k))
        t = t * math.ldexp(1.0, j)
        k -= j
    return t


def _rhs_exponent(bf, b_norm):
    """``k`` such that ``b * 2^-k`` has a norm near 1 when ``b_norm`` lies
    outside :func:`_safe_norm_range`, else 0 (``b`` is solved as given).

    A norm that underflowed to 0 or overflowed to inf although every entry is
    finite is recovered from ``max |b|``, one more reduction paid only then.
    Returns 0 for ``b = 0`` and for a ``b`` that is not finite (the caller
    handles both)."""
    lo, hi = _safe_norm_range(bf.dtype)
    if lo <= b_norm <= hi or math.isnan(b_norm):
        return 0
    if b_norm == 0.0 or math.isinf(b_norm):
        if bf.numel() == 0:
            return 0
        b_norm = float(bf.abs().max())
        if b_norm == 0.0 or not math.isfinite(b_norm):
            return 0
    return math.frexp(b_norm)[1]


def _scaled_rhs(bf):
    """``(b * 2^-k, its norm, k)``, with ``k`` from :func:`_rhs_exponent`.

    The linear solvers solve ``A y = b * 2^-k`` and return ``x = y * 2^k``.
    A power of two is exact, so every ordinary ``b`` (``k = 0``) is solved as
    before, bit for bit, while a ``b`` whose norm underflows or overflows is
    no longer taken for 0 or for infinite: ``[1, 2] * 1e-25`` in float32 and
    ``* 1e-170`` in float64 returned x = 0 marked converged ('b = 0'), and
    ``* 1e160`` in float64 raised 'not finite (norm inf)'."""
    b_norm = _norm(bf)
    k = _rhs_exponent(bf, b_norm)
    if k:
        bf = _ldexp(bf, -k)
        b_norm = _norm(bf)
    return bf, b_norm, k


def _unscale(x, k, message):
    """``(x * 2^k, message, in_range)``: a solution that leaves the dtype's
    range when scaled back gets ``in_range=False`` and a message saying so,
    rather than passing off inf or 0 as converged."""
    if not k:
        return x, message, True
    out = _ldexp(x, k)
    if not bool(torch.isfinite(out).all()):
        return out, message + (
            f"; the solution overflows {x.dtype} (b was scaled by 2^{-k} for the "
            "solve): rescale the problem"
        ), False
    if bool((out == 0).all()) and bool((x != 0).any()):
        return out, message + (
            f"; the solution underflows to 0 in {x.dtype} (b was scaled by 2^{-k} "
            "for the solve): rescale the problem"
        ), False
    return out, message, True


def _check_preconditioner(preconditioner, bf, shape):
    """``r -> M^{-1} r`` on flat vectors, for a diagonal ``M`` or a callable."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, torch.Tensor):
        if preconditioner.shape != shape:
            raise ValueError(
                f"A diagonal preconditioner must be shaped like b, {tuple(shape)}; got "
                f"{tuple(preconditioner.shape)}."
            )
        diag = preconditioner.detach().reshape(-1).to(dtype=bf.dtype, device=bf.device)
        if not bool(torch.isfinite(diag).all()) or not bool((diag > 0).all()):
            bad = int((~(torch.isfinite(diag) & (diag > 0))).sum())
            raise ValueError(
                f"A diagonal preconditioner must be positive and finite; {bad} of its "
                f"{diag.numel()} entries are not (min {float(diag.min()):.3e})."
            )
        inv_diag = 1.0 / diag
        return lambda r: r * inv_diag
    if callable(preconditioner):

        def apply(r):
            z = preconditioner(r.reshape(shape))
            if not isinstance(z, torch.Tensor) or z.shape != shape:
                is_tensor = isinstance(z, torch.Tensor)
                got = tuple(z.shape) if is_tensor else type(z).__name__
                raise ValueError(
                    f"The preconditioner must return a tensor shaped like b, "
                    f"{tuple(shape)}; got {got}."
                )
            return z.detach().reshape(-1)

        return apply
    raise ValueError(
        "preconditioner must be None, a positive tensor shaped like b (the diagonal "
        f"of M) or a callable r -> M^-1 r; got {type(preconditioner).__name__}."
    )


class _IndefinitePreconditioner(ValueError):
    """:func:`solve_cg`'s error for a preconditioner with ``r^T M^-1 r <= 0``
    (a ``ValueError``; the implicit strategies catch it to retry without
    the problem's preconditioner)."""


def solve_cg(matvec, b, x0=None, tol=1e-10, maxiter=None, preconditioner=None):
    """Solve ``A x = b`` for symmetric positive definite ``A`` by conjugate gradient.

    Parameters
    ----------
    matvec : callable
        ``matvec(v) -> A v`` for ``v`` shaped like ``b``, returning ``b``'s
        dtype and device.
    b : torch.Tensor
        Right-hand side, 1-D or 0-d.
    x0 : torch.Tensor, optional
        Starting point (a warm start), shaped like ``b``. Ignored when it is
        not finite or its residual is larger than that of the zero start.
    tol : float, default=1e-10
        Tolerance on the relative residual ``||A x - b|| / ||b||``.
    maxiter : int, optional
        Maximum number of iterations, an integer ``>= 1``; default
        ``10 * b.numel()``.
    preconditioner : torch.Tensor or callable, optional
        A symmetric positive definite ``M ~ A`` for preconditioned CG: a
        positive, finite tensor shaped like ``b`` holding the diagonal of
        ``M`` (Jacobi preconditioning, ``z = r / M``), or a callable
        ``r -> M^{-1} r``. It changes the speed of convergence, not the
        solution, nor the test, which stays on ``||A x - b|| / ||b||``.

    Returns
    -------
    x : torch.Tensor
        The last finite iterate, shaped like ``b``: CG's iterates have
        monotonically decreasing ``A``-norm error, while their residuals
        need not decrease.
    result : LinearSolveResult
        ``converged`` is judged on the *true* residual, recomputed with one
        extra product at the end (a drifting recursive residual is restarted
        from the true one).

    Raises
    ------
    TypeError
        When ``b`` is not a tensor, ``matvec`` is not callable, or ``matvec``
        returns a tensor of another dtype or device than ``b``.
    ValueError
        When ``b`` is not finite or not floating-point, ``matvec`` returns a
        tensor of another size, ``x0`` is not shaped like ``b``, ``tol`` is
        negative or not finite, ``maxiter`` is not ``None`` or an integer
        ``>= 1``, or the preconditioner is not shaped like
        ``b``, not positive or not finite (a callable is checked on every
        application: ``r^T M^{-1} r`` must be positive).

    Notes
    -----
    When ``p^T A p <= 0`` (``A`` is not positive definite) the iteration
    stops and ``result.message`` says so. If that happens before any step
    was taken, ``x`` is a step along ``z = M^{-1} b`` (``b`` without a
    preconditioner) of length ``b^T z / |z^T A z|`` (or ``z`` itself when
    ``z^T A z = 0``) rather than the zero start, and ``result.fallback``
    records it. ``b = 0`` returns exactly zero.

    A ``b`` whose norm lies outside ``2^-256 .. 2^256`` (float64; ``2^-32 ..
    2^32`` in float32), or underflows or overflows although every entry is
    finite, is solved as ``A y = b / 2^k`` with ``2^k`` near its norm (or
    ``max |b|``), and ``x = 2^k y`` is returned (``x0`` is divided by
    ``2^k`` too). A power of two is exact: the iterates are those of the
    unscaled solve wherever that one stays in range, and ``residual`` is
    the same relative residual. If ``x`` leaves the dtype's range when
    scaled back, ``converged`` is ``False`` and ``message`` says so.

    When the recursive residual has passed ``tol`` but the true one has not,
    CG restarts from the true residual (iterative refinement). If a restart
    does not halve the true residual, the iteration stops and
    ``result.message`` says it stagnated: the residual is then at the
    accuracy the system allows in floating point (penalties spanning 18
    decades left ``2e-9`` with an exact preconditioner), and iterating on
    would spend every remaining iteration there. It counts as converged
    if, with a preconditioner, the residual in its norm,
    ``sqrt(r^T M^{-1} r / b^T M^{-1} b)``, is within ``tol``: for ``M``
    close to ``A`` that is the relative error in ``A``'s energy norm, which
    CG minimizes, and which rounding in the directions where ``A`` is huge
    leaves small (a sparse ridge problem with penalties over 20 decades:
    ``3e-6`` in the plain norm, within ``1e-6`` in this one).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import solve_cg
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> x, res = solve_cg(lambda v: A @ v, b)
    >>> [round(float(t), 6) for t in x], res.converged, res.iterations
    ([0.090909, 0.636364], True, 2)
    >>> x, res = solve_cg(lambda v: 2.0 * v, torch.tensor(3.0))  # a scalar system
    >>> float(x)
    1.5

    A diagonal preconditioner on a badly scaled system:

    >>> A = torch.diag(torch.logspace(0, 6, 50, dtype=torch.float64)) + 0.1
    >>> b = torch.ones(50, dtype=torch.float64)
    >>> plain = solve_cg(lambda v: A @ v, b, tol=1e-8)[1].iterations
    >>> jacobi = solve_cg(lambda v: A @ v, b, tol=1e-8, preconditioner=A.diagonal())
    >>> jacobi[1].converged, jacobi[1].iterations < plain
    (True, True)
    """
    flat_matvec, bf, shape = _as_flat(matvec, b, "solve_cg")
    _check_tol(tol, "solve_cg")
    # (maxiter=-1 ran no iteration and reported maxiter=-1 reached, 1.5 ran
    # like 2, and "3" raised "'<' not supported between 'int' and 'str'")
    _check_int(maxiter, "solve_cg: maxiter", allow_none=True)
    precondition = _check_preconditioner(preconditioner, bf, shape)
    n = bf.numel()
    if maxiter is None:
        maxiter = 10 * max(n, 1)
    # b scaled by 2^-scale_exp when its norm is out of range (0, no copy, for any
    # ordinary b); x0 and the returned x are in b's units
    bf, b_norm, scale_exp = _scaled_rhs(bf)
    if b_norm == 0.0:
        return torch.zeros_like(b), LinearSolveResult(
            0, 0.0, True, 0, message="b = 0: the solution is 0."
        )
    _check_finite_rhs(b_norm)

    def apply_inverse(r):
        """``z = M^{-1} r`` and ``r^T z`` (``r`` itself and ``||r||^2`` without M)."""
        if precondition is None:
            return r, float(r @ r)
        z = precondition(r)
        rz = float(r @ z)
        if not math.isfinite(rz) or (not rz > 0.0 and bool(torch.any(r != 0))):
            raise _IndefinitePreconditioner(
                f"The preconditioner is not positive definite: r^T M^-1 r = {rz:.3e} "
                "(it must be positive and finite)."
            )
        return z, rz

    n_matvec = 0
    x = torch.zeros_like(bf)
    r = bf.clone()
    warm_started = None if x0 is None else False
    if x0 is not None:
        if not isinstance(x0, torch.Tensor) or x0.numel() != n:
            # (a start of another shape was ignored silently)
            got = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
            raise ValueError(
                f"solve_cg: x0 must be a tensor shaped like b, {tuple(shape)}; got {got}."
            )
        x0f = x0.detach().reshape(-1).to(dtype=bf.dtype, device=bf.device)
        x0f = _ldexp(x0f, -scale_exp)  # in the units of the scaled b
        if bool(torch.isfinite(x0f).all()):
            r0 = bf - flat_matvec(x0f)
            n_matvec += 1
            if _norm(r0) < b_norm:
                x, r = x0f.clone(), r0
                warm_started = True
    z, rz = apply_inverse(r)
    p = z.clone()
    rs = float(r @ r)
    # CG's iterates minimize the A-norm error over growing Krylov spaces, so the
    # last finite iterate is the best one (residual norms are not monotone).
    best_x = x
    fallback, message = None, ""
    iterations, converged, curvature_stop = 0, False, False
    last_true_res = math.inf  # true residual at the last restart
    while True:
        while iterations < maxiter and math.sqrt(rs) / b_norm > tol:
            Ap = flat_matvec(p)
            n_matvec += 1
            pAp = float(p @ Ap)
            if not pAp > 0.0 or not math.isfinite(pAp):
                curvature_stop = True
                message = (
                    f"non-positive curvature p^T A p = {pAp:.3e} at iteration "
                    f"{iterations + 1}: A is not positive definite"
                )
                if iterations == 0 and not bool(torch.any(x != 0)):
                    # Never hand back the zero start: step along p with |curvature|.
                    scale = rz / abs(pAp) if pAp != 0.0 and math.isfinite(pAp) else 1.0
                    best_x = scale * p
                    along = "b" if precondition is None else "M^-1 b"
                    fallback = (
                        f"cg: step along {along} with |p^T A p| "
                        "(non-positive curvature)"
                    )
                break
            alpha = rz / pAp
            x = x + alpha * p
            r = r - alpha * Ap
            rs_new = float(r @ r)
            iterations += 1
            if not math.isfinite(rs_new):
                message = f"residual became non-finite at iteration {iterations}"
                curvature_stop = True
                break
            best_x = x
            z, rz_new = apply_inverse(r)
            p = z + (rz_new / rz) * p
            rs, rz = rs_new, rz_new
        # Check the true residual of the best iterate (one more product).
        r_true = bf - flat_matvec(best_x)
        n_matvec += 1
        true_res = _norm(r_true) / b_norm
        converged = true_res <= tol
        if converged or curvature_stop or iterations >= maxiter:
            break
        if true_res > 0.5 * last_true_res:
            # a restart did not halve the true residual: it is at the accuracy
            # this system allows in this precision (iterating on would spend
            # every remaining iteration there)
            message = (
                f"stagnated at relative residual {true_res:.3e} after {iterations} "
                "iterations: restarts from the true residual no longer reduce it "
                "(the attainable accuracy for this system in this precision)"
            )
            if precondition is not None:
                # measured in the preconditioner's norm, the residual may be within
                # tol: with M ~ A, the relative error in A's energy norm (what CG
                # minimizes), which rounding in directions of huge A leaves small
                energy = math.sqrt(apply_inverse(r_true)[1] / apply_inverse(bf)[1])
                if energy <= tol:
                    converged = True
                    message += (
                        f"; in the preconditioner's norm {energy:.3e} <= tol {tol:.1e}"
                    )
            break
        last_true_res = true_res
        # The recursive residual drifted below tol but the true one did not:
        # restart from the best iterate with the true residual.
        x, r = best_x, r_true
        z, rz = apply_inverse(r)
        p = z.clone()
        rs = float(r @ r)
    if not message:
        message = (
            f"relative residual {true_res:.3e} <= tol {tol:.1e}"
            if converged
            else f"maxiter={maxiter} reached with relative residual {true_res:.3e}"
        )
    best_x, message, in_range = _unscale(best_x, scale_exp, message)
    result = LinearSolveResult(
        iterations=iterations,
        residual=true_res,
        converged=bool(converged and in_range),
        n_matvec=n_matvec,
        fallback=fallback,
        message=message,
        warm_started=warm_started,
    )
    return best_x.reshape(shape), result


def solve_neumann(matvec, b, step, n_terms, tol=None):
    """Approximate ``A^{-1} b`` by the truncated Neumann series.

    ``x = step * sum_{k<K} (I - step A)^k b``. The series converges when the
    spectral radius of ``I - step A`` is below one, i.e. ``0 < step <
    2 / lambda_max(A)`` for positive definite ``A``. The residual of the
    truncation is exactly the next term: ``b - A x = (I - step A)^K b``,
    so it is computed with no extra product beyond the ``K`` spent.

    Parameters
    ----------
    matvec : callable
        ``matvec(v) -> A v``, a tensor of ``v``'s shape, dtype and device
        (another dtype or device is a ``TypeError``).
    b : torch.Tensor
        Right-hand side, 1-D or 0-d. One whose norm is out of range is
        scaled by a power of two for the sum, as in :func:`solve_cg`.
    step : float
        Scale ``eta`` in ``A^{-1} ~ eta * sum (I - eta A)^k``.
    n_terms : int
        Number of terms ``K`` (at least 1).
    tol : float, optional
        Stop early once the relative residual is below ``tol``. Without it,
        all terms are summed and ``converged`` means "the series contracted"
        (residual below 1).

    Returns
    -------
    x : torch.Tensor
        Shaped like ``b``.
    result : LinearSolveResult
        ``residual = ||(I - step A)^K b|| / ||b||``; a residual above 1 means
        the terms grew and the series diverges (``message`` says so).
        Summation stops before a term becomes non-finite.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import solve_neumann
    >>> A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> b = torch.ones(2, dtype=torch.float64)
    >>> x, res = solve_neumann(lambda v: A @ v, b, step=0.5, n_terms=60)
    >>> [round(float(t), 6) for t in x], res.converged
    ([0.5, 1.0], True)
    """
    if n_terms < 1:
        raise ValueError(f"n_terms must be at least 1, got {n_terms}.")
    _check_step(step, "solve_neumann")
    _check_tol(tol, "solve_neumann", allow_none=True)
    flat_matvec, bf, shape = _as_flat(matvec, b, "solve_neumann")
    bf, b_norm, scale_exp = _scaled_rhs(bf)  # (b * 1e-170 in float64: 0, converged)
    if b_norm == 0.0:
        return torch.zeros_like(b), LinearSolveResult(
            0, 0.0, True, 0, message="b = 0: the solution is 0."
        )
    term = bf.clone()
    acc = bf.clone()
    n_matvec, k, residual = 0, 1, math.nan
    message = ""
    while True:
        next_term = term - step * flat_matvec(term)
        n_matvec += 1
        next_norm = _norm(next_term)
        if not math.isfinite(next_norm):
            message = (
                f"Neumann term {k} became non-finite; the series diverges "
                f"(step={step:.3e} is too large: it needs step < 2 / lambda_max)"
            )
            residual = math.inf
            break
        residual = next_norm / b_norm
        term = next_term
        if (tol is not None and residual <= tol) or k >= n_terms:
            break
        acc = acc + term
        k += 1
    if not message:
        if residual > 1.0:
            message = (
                f"Neumann series diverges: ||(I - step A)^{k} b|| / ||b|| = "
                f"{residual:.3e} > 1 "
                f"with step={step:.3e} (it needs step < 2 / lambda_max)"
            )
        else:
            message = f"{k} Neumann terms, relative residual {residual:.3e}"
    converged = residual <= tol if tol is not None else residual < 1.0
    x, message, in_range = _unscale(step * acc, scale_exp, message)
    return x.reshape(shape), LinearSolveResult(
        iterations=k,
        residual=residual,
        converged=bool(converged and in_range),
        n_matvec=n_matvec,
        message=message,
    )


def solve_identity(b, step, matvec=None):
    """The Hessian-free approximation ``A^{-1} b ~ step * b`` (``A ~ I / step``).

    Parameters
    ----------
    b : torch.Tensor
        Right-hand side, 1-D or 0-d.
    step : float
        Scale (for a gradient-descent inner solver, its learning rate).
    matvec : callable, optional
        When given, one product is spent to report the residual (on ``b``
        scaled by a power of two when its norm is out of range, as in
        :func:`solve_cg`).

    Returns
    -------
    x : torch.Tensor
    result : LinearSolveResult
        ``converged`` is ``None``: the identity is an approximation with no
        tolerance. ``residual`` is ``nan`` without ``matvec``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import solve_identity
    >>> x, res = solve_identity(torch.tensor([2.0, 4.0]), step=0.5)
    >>> x.tolist(), res.converged
    ([1.0, 2.0], None)
    """
    _check_b(b, "solve_identity")
    _check_step(step, "solve_identity")
    x = step * b
    residual, n_matvec = math.nan, 0
    if matvec is not None:
        # on b scaled as in solve_cg (b * 1e-170 in float64 reported residual 0)
        bs, b_norm, _ = _scaled_rhs(b.reshape(-1))
        r = matvec((step * bs).reshape(b.shape)).reshape(-1) - bs
        residual = _norm(r) / b_norm if b_norm > 0 else 0.0
        n_matvec = 1
    return x, LinearSolveResult(
        iterations=0,
        residual=residual,
        converged=None,
        n_matvec=n_matvec,
        message=f"identity approximation A ~ I / {step:.3e}",
    )


def _check_step(step, where):
    """A positive finite step, a number or a one-element tensor (``step=0``
    made ``solve_identity`` a silent zero)."""
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = float(step.detach())
    _check_positive(step, f"{where}: step", allow_none=False)


def _dense_matrix(matvec, like, vectorize=False):
    """Matrix of the linear map ``matvec`` on flat vectors shaped like ``like``."""
    n = like.numel()
    if vectorize:
        try:
            return torch.func.jacrev(matvec)(torch.zeros_like(like)), "jacrev"
        except Exception:  # matvecs calling torch.autograd.grad do not compose
            pass
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    cols = [matvec(eye[i]) for i in range(n)]
    return torch.stack(cols, dim=1), "columns"


def solve_dense(matvec_or_matrix, b, method="auto", tol=None, vectorize=False):
    """Solve ``A x = b`` with a dense factorization.

    Parameters
    ----------
    matvec_or_matrix : torch.Tensor or callable
        The ``(n, n)`` matrix, or ``matvec(v) -> A v`` from which the matrix
        is built column by column (``n`` products) or, with
        ``vectorize=True``, by ``torch.func.jacrev`` when ``matvec`` allows;
        it must return ``b``'s dtype and device (else a ``TypeError``).
    b : torch.Tensor
        Right-hand side, 1-D or 0-d. One whose norm is out of range is
        scaled by a power of two for the solve, as in :func:`solve_cg`.
    method : {"auto", "cholesky", "lu"}, default="auto"
        ``"cholesky"`` for symmetric positive definite ``A``, falling back to
        LU when the matrix is not symmetric or the factorization fails;
        ``"lu"`` directly; ``"auto"`` tries Cholesky when ``A`` is
        symmetric and LU otherwise. A singular matrix falls back to the
        pseudo-inverse (least squares). Every fallback is recorded in
        ``result.fallback``.
    tol : float, optional
        Tolerance on the relative residual for ``converged``; default
        ``sqrt(eps)`` of the dtype. A solve above it whose normwise backward
        error ``||A x - b|| / (||A|| ||x|| + ||b||)`` is within it is
        converged too: the factorization did its job, and the residual is
        the rounding floor of an ill-conditioned ``A``.
    vectorize : bool, default=False
        Build the matrix with ``torch.func.jacrev`` (falls back to columns).

    Returns
    -------
    x : torch.Tensor
        Shaped like ``b``.
    result : LinearSolveResult
        ``iterations = 1``; ``n_matvec`` counts the products spent building
        the matrix.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import solve_dense
    >>> A = torch.tensor([[2.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # indefinite
    >>> b = torch.tensor([3.0, 0.0], dtype=torch.float64)
    >>> x, res = solve_dense(A, b, method="cholesky")
    >>> [round(float(t), 6) for t in x], res.fallback
    ([1.0, 1.0], 'cholesky failed (matrix not positive definite); used LU')
    """
    if method not in ("auto", "cholesky", "lu"):
        raise ValueError(f"method must be 'auto', 'cholesky' or 'lu', got {method!r}.")
    _check_b(b, "solve_dense")
    _check_tol(tol, "solve_dense", allow_none=True)
    shape = b.shape
    bf = b.reshape(-1)
    n = bf.numel()
    n_matvec = 0
    if callable(matvec_or_matrix) and not isinstance(matvec_or_matrix, torch.Tensor):
        flat_matvec, _, _ = _as_flat(matvec_or_matrix, b, "solve_dense")
        A, how = _dense_matrix(flat_matvec, bf, vectorize=vectorize)
        n_matvec = n if how == "columns" else 1
    else:
        A = matvec_or_matrix
        if not isinstance(A, torch.Tensor):
            raise TypeError(
                "solve_dense: matvec_or_matrix must be a tensor (the matrix A) or a "
                f"callable v -> A v; got {type(A).__name__}."
            )
        if A.numel() != n * n:
            raise ValueError(
                f"A has {A.numel()} entries; a system with {n} unknowns needs an "
                f"({n}, {n}) matrix."
            )
        A = A.reshape(n, n).to(dtype=bf.dtype, device=bf.device)
    if tol is None:
        tol = math.sqrt(torch.finfo(bf.dtype).eps)
    # (b * 1e-170 in float64 returned 0 as converged, b * 1e160 'b is not finite')
    bf, b_norm, scale_exp = _scaled_rhs(bf)
    if not (math.isfinite(b_norm) and bool(torch.isfinite(A).all())):
        # (a NaN matrix: torch's "atol must be greater than or equal to zero, but
        # got -nan"; a NaN b: a NaN solution reported by its NaN residual)
        what = "b" if not math.isfinite(b_norm) else "the matrix A"
        raise ValueError(
            f"solve_dense: {what} is not finite (NaN or infinity); check the outer "
            "loss and the inner problem for NaN or inf."
        )
    if b_norm == 0.0:
        return torch.zeros_like(b), LinearSolveResult(
            0, 0.0, True, n_matvec, message="b = 0: the solution is 0."
        )
    fallbacks = []
    x = None
    scale = float(A.abs().max()) if n else 0.0
    atol = 1e-10 * max(scale, 1e-300)
    symmetric = bool(torch.allclose(A, A.mT, rtol=1e-6, atol=atol))
    if method in ("auto", "cholesky"):
        if symmetric:
            L, err = torch.linalg.cholesky_ex(0.5 * (A + A.mT))
            if int(err) == 0:
                x = torch.cholesky_solve(bf.unsqueeze(-1), L).squeeze(-1)
                if not bool(torch.isfinite(x).all()):
                    x = None
            if x is None:
                fallbacks.append(
                    "cholesky failed (matrix not positive definite); used LU"
                )
        elif method == "cholesky":
            fallbacks.append("matrix not symmetric; used LU instead of Cholesky")
    if x is None:
        x_lu, err = torch.linalg.solve_ex(A, bf)
        if int(err) == 0 and bool(torch.isfinite(x_lu).all()):
            x = x_lu
        else:
            fallbacks.append("LU failed (matrix singular); used the pseudo-inverse")
            x = torch.linalg.pinv(A, hermitian=symmetric) @ bf
    r_norm = _norm(A @ x - bf)
    residual = r_norm / b_norm
    converged = residual <= tol
    message = f"dense solve, relative residual {residual:.3e}"
    if not converged:
        # a factorization is backward stable: at the rounding floor of an
        # ill-conditioned system its relative residual reaches eps * cond(A)
        # (penalties spanning 10 decades: 5e-8 in float64), which no method
        # lowers. Judged then by the normwise backward error, the relative
        # change of (A, b) that x solves exactly; a failed solve (singular A,
        # b outside its range) keeps a large one
        a_norm = float(torch.linalg.matrix_norm(A, ord=2)) if n else 0.0
        backward = r_norm / (a_norm * _norm(x) + b_norm)
        if backward <= tol:
            converged = True
            message += (
                f"; backward error {backward:.3e} <= tol {tol:.1e}: the rounding "
                "floor of an ill-conditioned system"
            )
    x, message, in_range = _unscale(x, scale_exp, message)
    return x.reshape(shape), LinearSolveResult(
        iterations=1,
        residual=residual,
        converged=bool(converged and in_range),
        n_matvec=n_matvec,
        fallback="; ".join(fallbacks) or None,
        message=message,
    )
