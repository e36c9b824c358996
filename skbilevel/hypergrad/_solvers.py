"""Inner solvers that minimize to a gradient-norm tolerance (for implicit strategies).

Implicit differentiation is exact only at a stationary point, so these
solvers stop on ``||grad f(theta)|| <= tol`` (the Euclidean norm over all
leaves of the tree ``theta``) and report that norm. When the tolerance is not
reached they emit :class:`~skbilevel.hypergrad.InnerSolveWarning` with the
numbers. Both work on a tensor or a dict/tuple/list of tensors, on whatever
device and dtype ``theta0`` has.

An objective may supply its own derivatives (an optional protocol; autograd
is the fallback for whatever it lacks): ``loss_and_grad(theta)`` returning
the value and a gradient tree (used by both solvers),
``hvp(theta, v)`` returning the Hessian times a tree ``v`` (used by
:class:`NewtonCG`), and ``hessian_preconditioner(theta)`` (a map of trees
``r -> M^{-1} r``, or ``None``) or ``hessian_diagonal(theta)`` (its
preconditioner). :class:`_FixedPhi` forwards an inner loss's
``loss_and_grad(theta, phi)``, ``hvp(theta, phi, v)``,
``hessian_preconditioner(theta, phi)`` and ``hessian_diagonal(theta, phi)``
this way.
"""

import math
import warnings

import torch

from ._base import (
    InnerSolver,
    InnerSolveWarning,
    SolveResult,
    _check_int,
    _check_positive,
    _scalar_loss,
    _within_tol,
)
from ._linear_solve import _default_tol, solve_cg
from ._tree import tree_detach, tree_flatten, tree_map, tree_to_vector, vector_to_tree

__all__ = ["LBFGS", "NewtonCG"]


class _FlatProblem:
    """``fun`` on a tree, seen as a function of one flat vector; counts evaluations."""

    def __init__(self, fun, like):
        self.fun = fun
        self.like = like
        self.n_grad = 0
        self.n_fun = 0

    def value(self, x):
        self.n_fun += 1
        with torch.no_grad():
            return float(self.fun(vector_to_tree(x, self.like)))

    def value_and_grad(self, x, create_graph=False, tree=None):
        """``(f, g)``; with ``create_graph``, ``(f, g, x)`` with ``g``'s graph.

        ``tree``, when given, is ``x`` as a tree (passed on to the objective's
        ``loss_and_grad``, which may cache work on it).
        """
        self.n_grad += 1
        loss_and_grad = getattr(self.fun, "loss_and_grad", None)
        if loss_and_grad is not None and not create_graph:
            val, g = loss_and_grad(vector_to_tree(x, self.like) if tree is None else tree)
            return float(val), tree_to_vector(g).detach()
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            # (a Python float: AttributeError "'float' object has no attribute 'numel'")
            val = _scalar_loss(self.fun(vector_to_tree(xr, self.like)))
            if val.requires_grad:
                (g,) = torch.autograd.grad(
                    val, xr, create_graph=create_graph, allow_unused=True
                )
            else:
                g = None
        if g is None:
            g = torch.zeros_like(xr)
        if create_graph:
            return val.detach(), g, xr
        return float(val.detach()), g.detach()


class _FixedPhi:
    """``theta -> inner_loss(theta, phi)``, the objective an inner solver minimizes.

    Carries ``hessian_diagonal(theta)``, ``hvp(theta, v)`` and
    ``loss_and_grad(theta)`` when ``inner_loss`` has the same methods with
    ``phi`` as an extra argument, so that :class:`NewtonCG` and
    :class:`LBFGS` find the problem's own derivatives through the closure.
    """

    def __init__(self, inner_loss, phi):
        self.inner_loss = inner_loss
        self.phi = phi
        diagonal = getattr(inner_loss, "hessian_diagonal", None)
        if diagonal is not None:
            self.hessian_diagonal = lambda theta: diagonal(theta, phi)
        block = getattr(inner_loss, "hessian_preconditioner", None)
        if block is not None:
            self.hessian_preconditioner = lambda theta: block(theta, phi)
        hvp = getattr(inner_loss, "hvp", None)
        if hvp is not None:
            self.hvp = lambda theta, v: hvp(theta, phi, v)
        loss_and_grad = getattr(inner_loss, "loss_and_grad", None)
        if loss_and_grad is not None:
            self.loss_and_grad = lambda theta: loss_and_grad(theta, phi)

    def __call__(self, theta):
        return self.inner_loss(theta, self.phi)


def _as_tree(x, like, tree=None):
    """The flat iterate ``x`` as a tree like ``like``, each leaf in its own dtype.

    ``x`` has the promoted dtype of the leaves, in which the solvers iterate:
    a float32 leaf beside a float64 one came back float64 (and an outer loss
    on float32 data failed on mismatched dtypes). ``tree``, when given, is
    ``x`` already as a tree: its leaves are kept where their dtype is right
    (the problem may have cached its curvature on them).
    """
    tree = vector_to_tree(x, like) if tree is None else tree
    return tree_map(lambda t, leaf: t.to(leaf.dtype), tree, like)


def _problem_preconditioner(hessian_preconditioner, hessian_diagonal, theta):
    """A CG preconditioner at ``theta`` from an objective's optional protocol.

    ``hessian_preconditioner(theta)``, when given and not ``None``, is a map
    of trees ``r -> M^{-1} r`` (an approximate inverse Hessian); it is
    wrapped as a callable on flat vectors. Otherwise the Jacobi diagonal of
    ``hessian_diagonal(theta)`` (see :func:`_jacobi_diagonal`); ``None``
    without either.
    """
    if hessian_preconditioner is not None:
        apply = hessian_preconditioner(theta)
        if apply is not None:
            return lambda r: tree_to_vector(apply(vector_to_tree(r, theta))).detach()
    if hessian_diagonal is not None:
        return _jacobi_diagonal(hessian_diagonal, theta)
    return None


def _jacobi_diagonal(hessian_diagonal, theta):
    """Flat positive diagonal from ``hessian_diagonal(theta)`` for :func:`solve_cg`.

    Entries that are not positive and finite (a curvature that underflowed)
    are replaced by the mean of the others; ``None`` when none is usable, so
    CG runs unpreconditioned. A preconditioner changes speed, not results.
    """
    n = tree_to_vector(theta).numel()
    with torch.no_grad():
        d = tree_to_vector(hessian_diagonal(theta)).detach()
    if d.numel() != n:
        raise ValueError(
            f"hessian_diagonal must return a tree shaped like theta ({n} entries); "
            f"got {d.numel()} entries."
        )
    ok = torch.isfinite(d) & (d > 0)
    if bool(ok.all()):
        return d
    if not bool(ok.any()):
        return None
    return torch.where(ok, d, d[ok].mean())


_LINE_SEARCH_FAILED = (
    "line search could not decrease the objective (floating-point limit?)"
)


def _done(converged, n_iter, min_iter, g_norm):
    """Whether an iterative solver stops: converged, after at least
    ``min_iter`` iterations unless the gradient vanishes (nowhere to go)."""
    return converged and (n_iter >= min_iter or g_norm == 0.0)


def _check_theta0(theta0, solver):
    """``theta0`` must be a tensor, or a tree of tensors, of a real floating dtype.

    An integer ``theta0`` failed inside autograd with "only Tensors of floating
    point dtype can require gradients", naming neither ``theta0`` nor the fix.
    Metadata only: no device sync. A ``ValueError``, as ``argmin`` raises for
    an integer ``init``.
    """
    leaves = tree_flatten(theta0)[0]
    if not leaves:
        raise ValueError(
            f"{solver}: theta0 has no tensors; give the starting point as a tensor or "
            "a dict / tuple / list of tensors."
        )
    for leaf in leaves:
        if not torch.is_floating_point(leaf):
            raise ValueError(
                f"{solver}: theta0 must hold real floating-point tensors (the solver "
                f"differentiates the objective with respect to it); got a tensor of "
                f"dtype {leaf.dtype}. Convert it, e.g. theta0.to(torch.float64), or "
                "build it with a floating dtype (torch.zeros(n, dtype=torch.float64))."
            )


def _check_start(f, g_norm):
    """The objective's value and gradient norm at the start must be finite.

    A finite value with a NaN gradient (``sqrt`` or a norm at 0) sent LBFGS
    through 25 failed line-search evaluations to 'could not decrease the
    objective (floating-point limit?)', and NewtonCG to a linear-solve error
    blaming the outer loss.
    """
    overflow = (
        "values too large for the precision of the computation (data of 1e12 in "
        "float32: rescale the data, or compute in float64)"
    )
    if not math.isfinite(f):
        raise ValueError(
            f"The inner objective is not finite at the starting point (value {f}); "
            f"check the initialization and the data (NaN, or {overflow})."
        )
    if not math.isfinite(g_norm):
        # (a finite value of 1e22 with an overflowing gradient was blamed on
        # a non-differentiable objective: SampleReweighter on X * 1e12)
        raise ValueError(
            f"The gradient of the inner objective is not finite at the starting point "
            f"(norm {g_norm}; value {f:.6g}): either the objective is not "
            "differentiable there (e.g. sqrt or a norm at 0: start elsewhere, with a "
            "small nonzero init, or smooth it, sqrt(x + eps)), or its gradient "
            f"overflows: {overflow}."
        )


def _solver_tol(tol, dtype):
    return _default_tol(dtype) if tol is None else tol


def _warn_inner(name, result, tol, max_iter):
    warnings.warn(
        f"{name} stopped with inner gradient norm {result.grad_norm:.3e} > "
        f"tol {tol:.1e} "
        f"after {result.n_iter} iterations (max_iter={max_iter}): {result.message}. "
        "Implicit hypergradients assume a stationary point; raise max_iter, "
        "loosen tol, or check the inner objective's scaling.",
        InnerSolveWarning,
        stacklevel=3,
    )


def _cubic_minimizer(x1, f1, g1, x2, f2, g2, lo, hi):
    """Minimizer of the cubic through (x1, f1, g1), (x2, f2, g2), in [lo, hi]."""
    try:
        d1 = g1 + g2 - 3.0 * (f1 - f2) / (x1 - x2)
        d2_sq = d1 * d1 - g1 * g2
        if d2_sq >= 0.0:
            d2 = math.sqrt(d2_sq)
            if x1 <= x2:
                t = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2.0 * d2))
            else:
                t = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2.0 * d2))
            if math.isfinite(t):
                return min(max(t, lo), hi)
    except ZeroDivisionError:
        pass
    return 0.5 * (lo + hi)


def _strong_wolfe(
    problem, x, d, f0, gtd0, t, c1=1e-4, c2=0.9, max_evals=25, t_max=math.inf,
    min_width=0.0,
):
    """Line search for a strong Wolfe step (Nocedal & Wright, Algorithms 3.5-3.6).

    Returns ``(t, f, g, ok)``; when no Wolfe point is found within
    ``max_evals`` evaluations, the best point satisfying sufficient decrease
    is returned (``ok=True``) if there is one, else ``ok=False``. Steps are
    at most ``t_max`` (the edge of a feasible box): a point there with
    sufficient decrease that still descends is accepted. The zoom also stops
    once its bracket is narrower than ``min_width`` times the first trial
    step (an objective known only to a solver's tolerance).
    """

    def evaluate(step):
        f, g = problem.value_and_grad(x + step * d)
        return f, g, float(g @ d)

    # Objective changes below a few ulps of f are rounding noise: judge them
    # by the gradient, so the solver can reach gradient norms near eps.
    eps_f = 10.0 * torch.finfo(x.dtype).eps * abs(f0)
    t_first = t
    d_norm = float(torch.linalg.vector_norm(d))
    x_norm = float(torch.linalg.vector_norm(x))
    evals = 0
    t_prev, f_prev, g_prev, gtd_prev = 0.0, f0, None, gtd0
    bracket = None
    while evals < max_evals:
        f_t, g_t, gtd_t = evaluate(t)
        evals += 1
        if not math.isfinite(f_t) or not math.isfinite(gtd_t):
            t = 0.5 * (t_prev + t)  # stepped out of the domain: shrink
            continue
        if f_t > f0 + c1 * t * gtd0 + eps_f or (evals > 1 and f_t >= f_prev + eps_f):
            bracket = ((t_prev, f_prev, g_prev, gtd_prev), (t, f_t, g_t, gtd_t))
            break
        if abs(gtd_t) <= -c2 * gtd0:
            return t, f_t, g_t, True
        if gtd_t >= 0.0:
            bracket = ((t, f_t, g_t, gtd_t), (t_prev, f_prev, g_prev, gtd_prev))
            break
        if t >= t_max:
            return t, f_t, g_t, True  # descending at the edge of the box
        hi = min(10.0 * t, t_max)  # extrapolate
        lo = min(t + 0.01 * (t - t_prev), hi)
        t_next = _cubic_minimizer(t_prev, f_prev, gtd_prev, t, f_t, gtd_t, lo, hi)
        t_prev, f_prev, g_prev, gtd_prev = t, f_t, g_t, gtd_t
        t = t_next
    if bracket is None:
        if t_prev > 0.0 and f_prev <= f0 + eps_f:
            return t_prev, f_prev, g_prev, True
        return 0.0, f0, None, False
    lo, hi = bracket
    while evals < max_evals:
        (t_lo, f_lo, g_lo, gtd_lo), (t_hi, f_hi, _, gtd_hi) = lo, hi
        width = abs(t_hi - t_lo)
        if width * d_norm < 1e-14 * max(1.0, x_norm) or width < min_width * t_first:
            break
        a, b = min(t_lo, t_hi), max(t_lo, t_hi)
        a, b = a + 0.1 * width, b - 0.1 * width  # stay inside the bracket
        t = _cubic_minimizer(t_lo, f_lo, gtd_lo, t_hi, f_hi, gtd_hi, a, b)
        f_t, g_t, gtd_t = evaluate(t)
        evals += 1
        armijo = f_t <= f0 + c1 * t * gtd0 + eps_f
        if not math.isfinite(f_t) or not armijo or f_t >= f_lo + eps_f:
            hi = (t, f_t, g_t, gtd_t)
        else:
            if abs(gtd_t) <= -c2 * gtd0:
                return t, f_t, g_t, True
            if gtd_t * (t_hi - t_lo) >= 0.0:
                hi = lo
            lo = (t, f_t, g_t, gtd_t)
    t_lo, f_lo, g_lo, _ = lo
    if t_lo > 0.0 and f_lo <= f0 + eps_f:
        return t_lo, f_lo, g_lo, True
    return 0.0, f0, None, False


class _LBFGSMemory:
    """The curvature pairs of L-BFGS: the two-loop direction and the pair update.

    Shared by :class:`LBFGS` (inner problems) and ``minimize_outer``'s
    ``optimizer="lbfgs"`` (outer variables).
    """

    def __init__(self, size):
        self.size = size
        self.reset()

    def reset(self):
        self.S, self.Y, self.rho = [], [], []

    def __bool__(self):
        return bool(self.S)

    def direction(self, g, g_norm, h0=None):
        """``(d, g^T d)``: the quasi-Newton direction, or steepest descent (with
        the memory cleared) when that is not a descent direction.

        ``h0``, when given, is a positive diagonal (flat) initial inverse
        Hessian, e.g. ``1 / diag(H)``: the two-loop recursion starts from it
        instead of the scalar ``s^T y / y^T y``, and steepest descent becomes
        ``-h0 g``.
        """
        d = self._two_loop(g, h0) if self.S else (-g if h0 is None else -h0 * g)
        gtd = float(g @ d)
        if not gtd < 0.0 or not math.isfinite(gtd):
            self.reset()
            d = -g if h0 is None else -h0 * g
            gtd = float(g @ d)
        return d, gtd

    def update(self, s, y):
        """Keep the pair ``(s, y)`` when its curvature ``y^T s`` is safely positive."""
        ys = float(y @ s)
        if ys > 1e-10 * float(y @ y) and ys > 0.0:
            self.S.append(s)
            self.Y.append(y)
            self.rho.append(1.0 / ys)
            if len(self.S) > self.size:
                self.S.pop(0), self.Y.pop(0), self.rho.pop(0)

    def _two_loop(self, g, h0=None):
        S, Y, rho = self.S, self.Y, self.rho
        q = -g
        alphas = []
        for s, y, r in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r * (s @ q)
            q = q - a * y
            alphas.append(a)
        if h0 is None:
            z = ((S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])) * q
        else:
            z = h0 * q
        for s, y, r, a in zip(S, Y, rho, reversed(alphas)):
            b = r * (y @ z)
            z = z + (a - b) * s
        return z


class LBFGS(InnerSolver):
    """Limited-memory BFGS with a strong Wolfe line search, to a gradient tolerance.

    Parameters
    ----------
    tol : float, optional
        Stop when the Euclidean norm of the gradient (over all leaves) is at
        most ``tol`` (a positive finite number). Default: ``1e-10`` in
        float64, ``1e-5`` in float32 (``1e-3`` in half precision), chosen
        from ``theta0``'s dtype.
    max_iter : int, default=500
        Maximum number of iterations (at least 1).
    history_size : int, default=10
        Number of curvature pairs kept.
    max_ls : int, default=25
        Maximum function evaluations per line search.
    min_iter : int, default=0
        Iterations taken even when the start already meets ``tol`` (while
        the gradient is nonzero). With a loose ``tol`` and a warm start from
        a nearby problem's solution (an outer step, the next point of a
        regularization path), the start often meets ``tol`` already and
        would be returned as is: the solution would not follow the outer
        variable, and the outer objective would look flat. One iteration
        makes the warm-started solve track it.
    warn : bool, default=True
        Emit :class:`InnerSolveWarning` when ``tol`` is not reached.

    Notes
    -----
    The solve stops early, unconverged, when a line search cannot decrease
    the objective any more (usually the floating-point limit); the warning
    says so. The returned :class:`SolveResult` also carries ``n_grad`` (the
    gradient evaluations spent) and ``message``. When ``fun`` has a method
    ``loss_and_grad(theta)`` returning the value and a gradient tree, it
    replaces autograd. When it has ``hessian_diagonal(theta)`` (see
    :class:`NewtonCG`), the inverse of that diagonal at the current iterate
    is the initial inverse Hessian of the two-loop recursion (a diagonally
    preconditioned L-BFGS): L2 penalties spanning many decades make the
    Hessian's diagonal itself span them, which the scalar scaling of plain
    L-BFGS cannot follow.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import LBFGS
    >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> fun = lambda w: 0.5 * w @ A @ w - b @ w
    >>> w, res = LBFGS(tol=1e-12).solve(fun, torch.zeros(2, dtype=torch.float64))
    >>> [round(float(t), 6) for t in w], res.converged
    ([0.6, -0.8], True)
    """

    def __init__(
        self, tol=None, max_iter=500, history_size=10, max_ls=25, min_iter=0, warn=True
    ):
        self.tol = _check_positive(tol, "tol")
        self.max_iter = _check_int(max_iter, "max_iter")
        self.history_size = _check_int(history_size, "history_size")
        self.max_ls = _check_int(max_ls, "max_ls")
        self.min_iter = _check_int(min_iter, "min_iter", minimum=0)
        self.warn = warn

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def solve(self, fun, theta0, phi=None):
        """Minimize ``fun`` from ``theta0``; return ``(theta, SolveResult)``."""
        _check_theta0(theta0, type(self).__name__)
        like = tree_detach(theta0)
        x = tree_to_vector(like).detach().clone()
        tol = _solver_tol(self.tol, x.dtype)
        problem = _FlatProblem(fun, like)
        f, g = problem.value_and_grad(x)
        g_norm = float(torch.linalg.vector_norm(g))
        _check_start(f, g_norm)
        memory = _LBFGSMemory(self.history_size)
        diagonal = getattr(fun, "hessian_diagonal", None)
        n_iter, converged, message = 0, _within_tol(g_norm, tol), ""
        while n_iter < self.max_iter and not _done(
            converged, n_iter, self.min_iter, g_norm
        ):
            h0 = None
            if diagonal is not None:
                d_h = _jacobi_diagonal(diagonal, vector_to_tree(x, like))
                h0 = None if d_h is None else 1.0 / d_h
            d, gtd = memory.direction(g, g_norm, h0)
            if memory or h0 is not None:
                t0 = 1.0  # a (diagonally) scaled quasi-Newton step
            else:
                t0 = min(1.0, 1.0 / max(g_norm, 1e-300))
            t, f_new, g_new, ok = _strong_wolfe(
                problem, x, d, f, gtd, t0, max_evals=self.max_ls
            )
            if not ok:
                if memory:  # retry along steepest descent with a fresh memory
                    memory.reset()
                    continue
                message = _LINE_SEARCH_FAILED
                break
            s = t * d
            memory.update(s, g_new - g)
            x = x + s
            f, g = f_new, g_new
            g_norm = float(torch.linalg.vector_norm(g))
            n_iter += 1
            converged = _within_tol(g_norm, tol)
        if not message:
            message = "converged" if converged else "max_iter reached"
        result = SolveResult(
            n_iter=n_iter,
            grad_norm=g_norm,
            converged=bool(converged),
            n_grad=problem.n_grad,
            message=message,
            tol=tol,
        )
        if not converged and self.warn:
            _warn_inner("LBFGS", result, tol, self.max_iter)
        return _as_tree(x, like), result


class NewtonCG(InnerSolver):
    """Truncated Newton: CG on Hessian-vector products, then a backtracking line search.

    Each iteration builds the gradient with ``create_graph=True`` once and
    solves ``H d = -g`` by conjugate gradient (:func:`solve_cg`) to the
    forcing tolerance ``min(0.5, max(sqrt(||g||), tol / (2 ||g||)))``
    relative to ``||g||``: superlinear local convergence (Eisenstat and
    Walker, 1996), and no more accuracy than reaching ``tol`` needs (the
    safeguard of Kelley, 1995, section 6.3). Negative curvature stops CG early;
    a direction that is not a descent direction is replaced by ``-g``.

    When the objective ``fun`` has a method ``hessian_diagonal(theta)``
    returning a tree shaped like ``theta`` of positive values (the diagonal
    of the Hessian, or an approximation of it), CG is preconditioned by it
    (Jacobi preconditioning): far fewer Hessian-vector products on badly
    scaled problems, the same Newton steps up to the CG tolerance. The
    implicit strategies and :class:`~skbilevel.hypergrad.LogisticFolds`
    pass such an objective when their inner loss has
    ``hessian_diagonal(theta, phi)``. A method
    ``hessian_preconditioner(theta)`` returning a map of trees
    ``r -> M^{-1} r`` (``M`` an approximation of the Hessian that is cheap to
    invert, e.g. block diagonal), or ``None``, takes precedence over the
    diagonal.

    When ``fun`` has a method ``hvp(theta, v)`` (the Hessian at ``theta``
    times a tree ``v`` shaped like ``theta``, without a graph), CG uses it
    instead of autograd's double backward, and ``loss_and_grad(theta)``
    (the value and a gradient tree), when present, replaces the gradient's
    backward pass: the same Newton steps, far cheaper for a loss whose
    Hessian is known in closed form (e.g.
    :meth:`~skbilevel.hypergrad.LogisticFolds.hvp`). ``n_hvp`` counts the
    products either way.

    Parameters
    ----------
    tol : float, optional
        Tolerance on the gradient norm (a positive finite number); default
        ``1e-10`` in float64, ``1e-5`` in float32 (chosen from ``theta0``'s
        dtype).
    max_iter : int, default=100
        Maximum Newton iterations (at least 1).
    cg_maxiter : int, optional
        Maximum CG iterations per Newton step; default ``min(dim, 200)``.
    min_iter : int, default=0
        Newton iterations taken even when the start already meets ``tol``
        (see :class:`LBFGS`: a warm start then still follows the outer
        variable). Such a step's CG solve stops at the forcing term's cap,
        a relative residual of 0.5.
    warn : bool, default=True
        Emit :class:`InnerSolveWarning` when ``tol`` is not reached.
    precondition : bool, default=True
        Precondition CG by ``fun.hessian_diagonal(theta)`` when ``fun`` has
        it (ignored otherwise).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import NewtonCG
    >>> def fun(w):
    ...     return torch.nn.functional.softplus(-w).sum() + 0.5 * (w ** 2).sum()
    >>> w, res = NewtonCG().solve(fun, torch.zeros(3, dtype=torch.float64))
    >>> round(float(w[0]), 6), res.converged
    (0.401058, True)
    """

    def __init__(
        self,
        tol=None,
        max_iter=100,
        cg_maxiter=None,
        warn=True,
        precondition=True,
        min_iter=0,
    ):
        self.tol = _check_positive(tol, "tol")
        self.max_iter = _check_int(max_iter, "max_iter")
        self.cg_maxiter = _check_int(cg_maxiter, "cg_maxiter", allow_none=True)
        self.min_iter = _check_int(min_iter, "min_iter", minimum=0)
        self.warn = warn
        self.precondition = precondition

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def solve(self, fun, theta0, phi=None):
        """Minimize ``fun`` from ``theta0``; return ``(theta, SolveResult)``."""
        _check_theta0(theta0, type(self).__name__)
        like = tree_detach(theta0)
        x = tree_to_vector(like).detach().clone()
        tol = _solver_tol(self.tol, x.dtype)
        cg_maxiter = self.cg_maxiter
        if cg_maxiter is None:
            cg_maxiter = max(1, min(x.numel(), 200))
        problem = _FlatProblem(fun, like)
        diagonal = getattr(fun, "hessian_diagonal", None) if self.precondition else None
        block = getattr(fun, "hessian_preconditioner", None) if self.precondition else None
        tree_hvp = getattr(fun, "hvp", None)
        # with closed-form gradients the line search evaluates them with its
        # values: the accepted trial point is the next iterate, whose value and
        # gradient (and the curvature the problem caches on its tree) are then
        # computed once, not twice (a make_classification fit: 3% faster)
        trial_grads = tree_hvp is not None and hasattr(fun, "loss_and_grad")
        accepted = None
        n_iter, n_hvp, converged, message = 0, 0, False, ""
        while True:
            if accepted is not None:
                theta, f, g = accepted
                g_graph = xr = None
            elif tree_hvp is not None:
                # one tree per iterate: the problem may cache its curvature on it
                theta = vector_to_tree(x, like)
                f, g = problem.value_and_grad(x, tree=theta)
                g_graph = xr = None
            else:
                theta = vector_to_tree(x, like)
                f_t, g_graph, xr = problem.value_and_grad(x, create_graph=True)
                f = float(f_t)
                g = g_graph.detach()
            g_norm = float(torch.linalg.vector_norm(g))
            if n_iter == 0:
                _check_start(f, g_norm)
            converged = _within_tol(g_norm, tol)
            done = _done(converged, n_iter, self.min_iter, g_norm)
            if done or n_iter >= self.max_iter:
                break
            if tree_hvp is not None:

                def hvp(v, theta=theta):
                    hv = tree_hvp(theta, vector_to_tree(v, like))
                    return tree_to_vector(hv).detach()

            elif g_graph.requires_grad:

                def hvp(v, g_graph=g_graph, xr=xr):
                    (hv,) = torch.autograd.grad(
                        g_graph, xr, v, retain_graph=True, allow_unused=True
                    )
                    return torch.zeros_like(v) if hv is None else hv.detach()

            else:  # the objective is linear in theta: H = 0

                def hvp(v):
                    return torch.zeros_like(v)

            # Eisenstat-Walker's forcing term with its safeguard: no more accurate
            # than the gradient tolerance needs (a last step from 2.3e-4 to the
            # tolerance 1e-4 took 62 CG iterations at sqrt(||g||) = 1.5e-2; a
            # relative residual of 0.22 gets there too)
            forcing = min(0.5, max(math.sqrt(g_norm), 0.5 * tol / g_norm))
            pre = _problem_preconditioner(block, diagonal, theta)
            d, res = solve_cg(
                hvp, -g, tol=forcing, maxiter=cg_maxiter, preconditioner=pre
            )
            n_hvp += res.n_matvec
            del g_graph, xr
            gtd = float(g @ d)
            if not gtd < 0.0 or not bool(torch.isfinite(d).all()):
                d, gtd = -g / max(g_norm, 1e-300), -g_norm
            step = self._backtrack(problem, x, d, f, gtd, like, trial_grads)
            if step is None and gtd != -g_norm:  # retry along the gradient
                d, gtd = -g / max(g_norm, 1e-300), -g_norm
                step = self._backtrack(problem, x, d, f, gtd, like, trial_grads)
            if step is None:
                message = _LINE_SEARCH_FAILED
                break
            x, accepted = step
            n_iter += 1
        if not message:
            message = "converged" if converged else "max_iter reached"
        result = SolveResult(
            n_iter=n_iter,
            grad_norm=g_norm,
            converged=bool(converged),
            n_grad=problem.n_grad,
            n_hvp=n_hvp,
            message=message,
            tol=tol,
        )
        if not converged and self.warn:
            _warn_inner("NewtonCG", result, tol, self.max_iter)
        return _as_tree(x, like, tree=theta), result  # the last iterate's own tree

    @staticmethod
    def _backtrack(problem, x, d, f, gtd, like, with_grad, c1=1e-4, max_halvings=40):
        """Armijo backtracking from the full step: ``(x_new, evaluated)``, with
        ``evaluated = (tree, value, gradient)`` at ``x_new`` when ``with_grad``
        (else ``None``); ``None`` when no step decreases ``f`` enough."""
        eps_f = 10.0 * torch.finfo(x.dtype).eps * abs(f)  # rounding noise in f
        t = 1.0
        for _ in range(max_halvings):
            x_new = x + t * d
            if with_grad:
                tree = vector_to_tree(x_new, like)
                f_new, g_new = problem.value_and_grad(x_new, tree=tree)
            else:
                f_new = problem.value(x_new)
            if math.isfinite(f_new) and f_new <= f + c1 * t * gtd + eps_f:
                return x_new, ((tree, f_new, g_new) if with_grad else None)
            t *= 0.5
        return None
