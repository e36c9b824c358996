"""Implicit differentiation of the inner optimum (the implicit function theorem).

At an inner optimum ``grad_theta f(theta*, phi) = 0``, so

    d theta* / d phi = -H^{-1} d^2 f / (d theta d phi),   H = d^2 f / d theta^2.

For an outer loss with gradient ``g = dF/dtheta`` at ``theta*`` the
vector-Jacobian product is ``-(d^2 f / d phi d theta) v`` with ``H v = g``.
The strategies here solve the inner problem with any :class:`InnerSolver`
(no graph is kept), return ``theta*`` through a ``torch.autograd.Function``
whose backward solves ``H v = g`` from Hessian-vector products, and finish
with one mixed second-order product. They differ only in the linear solve:

==============  ================================  ==========================
strategy        linear solve                      exact when
==============  ================================  ==========================
``"cg"``        conjugate gradient                inner solved, CG converged
``"neumann"``   truncated Neumann series          never (truncation bias)
``"identity"``  ``H ~ I / step`` (Hessian-free)   never (an approximation)
``"dense"``     Cholesky / LU of the Hessian      inner solved (small theta)
==============  ================================  ==========================

Every product is computed by autograd (``torch.autograd.grad`` with
``create_graph=True`` once, then products with the retained gradient graph),
unless the inner loss supplies its own (an optional protocol):

- ``inner_loss.hvp(theta, phi, v)``, the inner Hessian at ``(theta, phi)``
  times a tree ``v`` shaped like ``theta``, without a graph, replaces the
  autograd products of the linear solve (the dense Hessian of ``"dense"``
  is built from it column by column);
- ``inner_loss.loss_and_grad(theta, phi)``, the value and the gradient tree
  in ``theta``, is used (with ``hvp``) for the mixed product
  ``(d^2 f / d phi d theta) v``: a backward pass through that gradient in
  ``phi``, so it must keep ``phi``'s graph when ``phi`` requires grad
  (autograd's double backward is used when it does not).

Only ``phi`` leaves that require
grad receive a hypergradient; tensors captured in ``inner_loss``'s closure do
not (put them in ``phi`` if they should). The backward pass is differentiable
once (no hypergradients of hypergradients).

The implicit function theorem holds at a stationary point only, so every
strategy here judges the inner solution by its gradient norm,
``||grad_theta f(theta, phi)|| <= tol``: ``tol`` is the strategy's
``inner_tol`` when set, otherwise the solver's own
(``SolveResult.tol``, see :class:`~skbilevel.hypergrad.SolveResult`; for a
fixed-step solver such as ``GradientDescent(n_steps=...)`` the dtype's
default, ``1e-10`` in float64 and ``1e-5`` in float32). ``info.inner_converged``
records the verdict, and a point that fails it raises
:class:`~skbilevel.hypergrad.InnerSolveWarning` with the gradient norm (unless
the solver already warned about the same solve).
"""

import math
import numbers
import warnings

import torch
from torch.autograd.function import once_differentiable

from ._base import (
    HypergradientStrategy,
    LinearSolveWarning,
    StepSolver,
    _check_int,
    _check_positive,
    _grad_norm,
    _within_tol,
    register_strategy,
    warn_inner_solve,
    warn_linear_solve,
)
from ._linear_solve import (
    _IndefinitePreconditioner,
    _check_finite_rhs,
    _default_tol,
    solve_cg,
    solve_dense,
    solve_identity,
    solve_neumann,
)
from ._solvers import LBFGS, _FixedPhi, _problem_preconditioner
from ._steps import _DIVERGED
from ._tree import (
    _cat_flat,
    _detach_graph,
    tree_detach,
    tree_flatten,
    tree_to_vector,
    tree_unflatten,
    vector_to_tree,
)
from ._unrolled import _check_diverging

__all__ = ["ImplicitCG", "ImplicitNeumann", "ImplicitIdentity", "ImplicitDense"]


class _ImplicitFunction(torch.autograd.Function):
    """Identity on the inner solution in forward; the strategy's vjp in backward."""

    @staticmethod
    def forward(ctx, state, *phi_leaves):
        ctx.state = state
        return tuple(t.clone() for t in state.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        return (None, *ctx.state.vjp(grad_outputs))


class _BackwardState:
    """What the backward pass needs: the problem at ``theta*`` and the strategy."""

    def __init__(
        self, strategy, inner_loss, phi_leaves, phi_spec, grad_idx, theta_leaves,
        theta_spec, info, exact=False,
    ):
        self.strategy = strategy
        self.exact = exact  # theta from a closed form: nothing to correct
        self.inner_loss = inner_loss
        self.phi_leaves = [p.detach() for p in phi_leaves]
        self.phi_spec = phi_spec
        self.grad_idx = grad_idx
        # the outputs keep each leaf's dtype; the backward pass computes in their
        # promoted dtype, as LBFGS and NewtonCG iterate (a float32 block of H
        # beside float64 ones held CG's residual at 4e-8 > its tol 1e-10)
        self.outputs = theta_leaves
        dtype = theta_leaves[0].dtype if theta_leaves else None
        for t in theta_leaves:
            dtype = torch.promote_types(dtype, t.dtype)
        self.theta_leaves = [t.to(dtype) for t in theta_leaves]
        self.theta_spec = theta_spec
        self.info = info
        self._theta = None
        self._unused = []  # per theta leaf: not used by the inner loss

    def vjp(self, grad_outputs):
        info = self.info
        b_leaves = [
            torch.zeros_like(t) if g is None else g.detach()
            for g, t in zip(grad_outputs, self.theta_leaves)
        ]
        b = torch.cat([g.reshape(-1) for g in b_leaves])
        # one check for every strategy: a NaN outer gradient read, with Neumann or
        # the identity, as a series that diverged or a singular Hessian
        _check_finite_rhs(float(torch.linalg.vector_norm(b)))
        if not bool(torch.any(b != 0)):
            return self._no_solve()
        if getattr(self.inner_loss, "hvp", None) is not None:
            return self._vjp_supplied(b)
        with torch.enable_grad():
            phi, targets = self._phi_requiring_grad()
            theta, g_flat = self._gradient_graph(phi)
            if not g_flat.requires_grad:
                raise RuntimeError(
                    "The inner gradient does not depend on theta or phi, so the "
                    "implicit function theorem does not apply (the Hessian is zero)."
                )
            # leaves of theta the inner loss does not use: their rows and columns
            # of H are zero and so is their mixed product, so their part of v is
            # irrelevant. Solved as it came, b's part there made the system
            # inconsistent (CG diverged to a hypergradient of 1e151, the dense
            # solve fell back to a pseudo-inverse and warned): they get b = 0 and
            # an identity block, and v = 0 there
            unused = self._unused_mask(theta)
            if unused is not None:
                b = torch.where(unused, torch.zeros_like(b), b)
                info.extra["unused_theta_entries"] = int(unused.sum())
                if not bool(torch.any(b != 0)):
                    return self._no_solve()

            def matvec(v):
                info.n_hvp += 1
                hv = torch.autograd.grad(
                    g_flat, theta, v, retain_graph=True, allow_unused=True
                )
                hv = _cat_flat(hv, theta).detach()
                return hv if unused is None else torch.where(unused, v, hv)

            def matrix():
                H = _hessian_matrix(g_flat, theta, info)
                if unused is not None:
                    H = H + torch.diag(unused.to(H.dtype))
                return H

            v = self.strategy._solve(
                matvec, matrix, b.detach(), info, preconditioner=self._preconditioner
            )
            self._check_finite(v)
            self._record_correction(v, g_flat)
            return self._mixed_product(g_flat, targets, v)

    def _no_solve(self):
        """The backward pass for ``b = 0``: ``v = 0`` and a zero indirect term.

        Zeros, not ``None``: an outer loss flat in ``theta`` (a dead ReLU, a
        minimum) left ``phi.grad`` at ``None`` after backward, where the other
        strategies give zeros.
        """
        self.info.linear_solve_iterations = 0
        self.info.linear_solve_residual = 0.0
        self.info.linear_solve_converged = True
        return [torch.zeros_like(self.phi_leaves[i]) for i in self.grad_idx]

    def _unused_mask(self, theta):
        """Flat mask of the entries of ``theta`` in leaves the inner loss does
        not use (``None`` when it uses every leaf); from :meth:`_gradient_graph`."""
        if not any(self._unused):
            return None
        return torch.cat(
            [torch.full((t.numel(),), flag, dtype=torch.bool, device=t.device)
             for flag, t in zip(self._unused, theta)]
        )

    def _vjp_supplied(self, b):
        """:meth:`vjp` with the inner loss's own ``hvp`` (and ``loss_and_grad``)."""
        info = self.info
        theta = self._theta_tree()
        phi_det = tree_unflatten(self.phi_spec, self.phi_leaves)

        def matvec(v):
            info.n_hvp += 1
            hv = self.inner_loss.hvp(theta, phi_det, vector_to_tree(v, theta))
            return tree_to_vector(hv).detach()

        def matrix():
            eye = torch.eye(b.numel(), dtype=b.dtype, device=b.device)
            return torch.stack([matvec(e) for e in eye], dim=1)

        v = self.strategy._solve(matvec, matrix, b, info, preconditioner=self._preconditioner)
        self._check_finite(v)
        with torch.enable_grad():
            phi, targets = self._phi_requiring_grad()
            g_flat = None
            loss_and_grad = getattr(self.inner_loss, "loss_and_grad", None)
            if loss_and_grad is not None:
                _, g = loss_and_grad(theta, tree_unflatten(self.phi_spec, phi))
                g_flat = tree_to_vector(g)
            if g_flat is not None and g_flat.requires_grad:
                info.n_grad += 1
            else:  # no phi graph in the supplied gradient: autograd's
                _, g_flat = self._gradient_graph(phi)
            self._record_correction(v, g_flat)
            if not g_flat.requires_grad:  # the gradient does not depend on phi
                return [torch.zeros_like(t) for t in targets]
            return self._mixed_product(g_flat, targets, v)

    def _record_correction(self, v, g_flat):
        """``info.value_correction = -v^T g``: ``v = H^-1 b`` from the linear
        solve, ``g`` the inner gradient at ``theta``.

        ``theta`` is off the exact solution by about ``H^-1 g``, so the output
        whose gradient ``b`` came back is off by about ``b^T H^-1 g``: adding
        ``-v^T g`` to its value leaves an error of second order in ``g`` (and
        the solve's residual times the first-order one). Recorded only when
        the solve's relative residual is at most 0.1 (an identity or short
        Neumann approximation of ``H^-1`` would correct by a wrong amount),
        and not for an inner solution exact by construction (a closed form,
        whose gradient is rounding).
        """
        residual = self.info.linear_solve_residual
        if not self.exact and residual is not None and residual <= 0.1:
            self.info.value_correction = -float(v @ g_flat.detach())

    def _phi_requiring_grad(self):
        """``phi``'s leaves, those receiving a hypergradient detached with
        ``requires_grad``; and those (the targets of the mixed product)."""
        phi = list(self.phi_leaves)
        for i in self.grad_idx:
            phi[i] = phi[i].detach().requires_grad_(True)
        return phi, [phi[i] for i in self.grad_idx]

    def _gradient_graph(self, phi):
        """Leaves of ``theta*`` requiring grad and the flat inner gradient there,
        with its graph (autograd, ``create_graph=True``). Records which leaves
        the inner loss does not use (``self._unused``)."""
        theta = [t.detach().requires_grad_(True) for t in self.theta_leaves]
        loss = self.inner_loss(
            tree_unflatten(self.theta_spec, theta), tree_unflatten(self.phi_spec, phi)
        )
        grads = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
        self.info.n_grad += 1
        self._unused = [g is None for g in grads]
        return theta, _cat_flat(grads, theta)

    def _mixed_product(self, g_flat, targets, v):
        """``-(d^2 f / d phi d theta) v`` for the targets: the hypergradient."""
        mixed = torch.autograd.grad(g_flat, targets, v, allow_unused=True)
        self.info.n_hvp += 1
        # a leaf the inner gradient does not depend on has a zero indirect term:
        # return it as zeros (None left phi.grad None after backward, so that
        # phi.grad.norm() failed, unlike the strategies _keep_connected covers)
        return [torch.zeros_like(t) if m is None else -m.detach() for m, t in zip(mixed, targets)]

    def _check_finite(self, v):
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(
                f"The {self.strategy.name!r} linear solve produced a non-finite "
                f"solution (relative residual {self.info.linear_solve_residual}); the "
                "inner Hessian is probably singular or the inner solution is not "
                "finite."
            )

    def _theta_tree(self):
        """``theta*`` as one detached tree, the same object on every call (the
        inner loss may cache its curvature on it)."""
        if self._theta is None:
            self._theta = tree_unflatten(
                self.theta_spec, [t.detach() for t in self.theta_leaves]
            )
        return self._theta

    def _preconditioner(self, diagonal_only=False):
        """CG preconditioner at ``theta*`` from the inner loss's optional
        ``hessian_preconditioner(theta, phi)`` or ``hessian_diagonal(theta, phi)``
        (a callable on flat vectors, a flat diagonal, or ``None``); with
        ``diagonal_only``, the Jacobi diagonal alone (the second choice when
        the first is not positive definite)."""
        phi = tree_unflatten(self.phi_spec, self.phi_leaves)
        block = None
        if not diagonal_only:
            block = getattr(self.inner_loss, "hessian_preconditioner", None)
        diagonal = getattr(self.inner_loss, "hessian_diagonal", None)
        return _problem_preconditioner(
            None if block is None else (lambda t: block(t, phi)),
            None if diagonal is None else (lambda t: diagonal(t, phi)),
            self._theta_tree(),
        )


def _hessian_matrix(g_flat, theta, info, chunk=64):
    """Dense Hessian from the retained gradient graph, ``chunk`` products at a time."""
    n = g_flat.numel()
    eye = torch.eye(n, dtype=g_flat.dtype, device=g_flat.device)
    rows = []
    batched = True
    for start in range(0, n, chunk):
        block = eye[start : start + chunk]
        out = None
        if batched:
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    out = torch.autograd.grad(
                        g_flat, theta, block, retain_graph=True, allow_unused=True,
                        is_grads_batched=True,
                    )
            except RuntimeError:  # an op without a batching rule: one product at a time
                batched = False
        if out is not None:
            rows.append(
                torch.cat(
                    [
                        (block.new_zeros((block.shape[0], t.numel())) if h is None
                         else h.reshape(block.shape[0], -1))
                        for h, t in zip(out, theta)
                    ],
                    dim=1,
                )
            )
        else:
            for e in block:
                hv = torch.autograd.grad(
                    g_flat, theta, e, retain_graph=True, allow_unused=True
                )
                rows.append(_cat_flat(hv, theta).unsqueeze(0))
        info.n_hvp += block.shape[0]
    # Row i is H e_i = column i of H.
    return torch.cat(rows, dim=0).mT.detach()


def _record(info, result, extra_fallback=None):
    info.linear_solve_iterations = result.iterations
    info.linear_solve_residual = result.residual
    info.linear_solve_converged = result.converged
    fallbacks = [f for f in (extra_fallback, result.fallback) if f]
    info.fallback = "; ".join(fallbacks) or None
    info.extra["linear_solve_message"] = result.message


class _Implicit(HypergradientStrategy):
    """Shared forward pass of the implicit strategies."""

    family = "implicit"
    solver_kind = "any"

    def default_solver(self):
        """:class:`LBFGS` with its dtype-dependent default tolerance."""
        return LBFGS()

    def argmin(self, inner_loss, phi, init, solver, info):
        phi_leaves, phi_spec = tree_flatten(phi)
        phi_det = tree_detach(phi)
        fun = _FixedPhi(inner_loss, phi_det)  # carries hessian_diagonal for NewtonCG
        theta_star, result = solver.solve(fun, tree_detach(init), phi=phi_det)
        theta_star = _detach_graph(theta_star)
        info.inner_iterations = result.n_iter
        info.n_grad += result.n_grad if result.n_grad is not None else result.n_iter
        info.n_hvp += result.n_hvp
        grad_norm = result.grad_norm
        if grad_norm is None or math.isnan(grad_norm):
            grad_norm = _grad_norm(fun, theta_star)
            info.n_grad += 1
        info.inner_grad_norm = float(grad_norm)
        self._judge_inner(result, solver, info, fun, init, theta_star)
        theta_leaves, theta_spec = tree_flatten(theta_star)
        grad_idx = [i for i, p in enumerate(phi_leaves) if p.requires_grad]
        if not grad_idx:
            return theta_star
        state = _BackwardState(
            self, inner_loss, phi_leaves, phi_spec, grad_idx, theta_leaves,
            theta_spec, info, exact=result.tol is None,
        )
        out = _ImplicitFunction.apply(state, *[phi_leaves[i] for i in grad_idx])
        return tree_unflatten(theta_spec, list(out))

    def _judge_inner(self, result, solver, info, fun=None, init=None, theta=None):
        """Set ``info.inner_converged`` by the gradient norm; warn when it fails.

        Steps of a :class:`StepSolver` that diverged get the unrolled
        strategies' warning, which says to lower the step size, instead of
        the advice to run longer (``GradientDescent(lr=1.0)`` on a curvature
        of 10: a gradient norm of 8.9e48 after 50 steps was "run the inner
        solver longer"); steps that ended non-finite were warned about by
        the solver itself, once (they gave two warnings).
        """
        inner_tol = getattr(self, "inner_tol", None)
        if inner_tol is not None:
            # numbers.Real: numpy scalars (np.float32(1e-6)) were refused, and a
            # bool passes no longer (True read as a tolerance of 1)
            if not (
                isinstance(inner_tol, numbers.Real) and not isinstance(inner_tol, bool)
                and inner_tol >= 0
            ):
                raise ValueError(
                    "inner_tol must be a non-negative number or None; got "
                    f"{inner_tol!r}."
                )
            tol = float(inner_tol)
        else:
            tol = result.tol
        if tol is None:  # exact by construction (a closed form)
            info.inner_converged = bool(result.converged)
        else:
            info.inner_converged = _within_tol(info.inner_grad_norm, tol)
            info.extra["inner_tol"] = tol
        # LBFGS / NewtonCG warn (or were told not to) about their own failures
        solver_warned = hasattr(solver, "warn") and not result.converged
        if info.inner_converged or solver_warned:
            return
        if isinstance(solver, StepSolver):
            if (result.message or "").startswith(_DIVERGED):
                return  # not finite: the solver warned
            finite = math.isfinite(info.inner_grad_norm)
            if fun is not None and result.n_iter > 1 and finite:
                with torch.no_grad():
                    value = float(fun(theta))
                if math.isfinite(value):
                    n_steps = result.n_iter
                    _check_diverging(info, fun, value, self, solver, init, n_steps)
                    if info.extra.get("diverged"):
                        return
        warn_inner_solve(info, tol, self.name, solver, result.message)

    def _solve(self, matvec, matrix, b, info, preconditioner=None):
        """Return ``v ~ H^{-1} b`` and fill the linear-solve fields of ``info``.

        ``preconditioner()``, when given, returns a preconditioner for CG at
        ``theta*`` from the inner problem's ``hessian_preconditioner`` or
        ``hessian_diagonal`` (a callable ``r -> M^{-1} r`` on flat vectors, the
        flat positive diagonal of ``M``, or ``None``); it is computed only by
        the strategies that use it.
        """
        raise NotImplementedError


@register_strategy("cg")
class ImplicitCG(_Implicit):
    """Implicit differentiation with ``H v = g`` solved by conjugate gradient.

    Exact when the inner problem is solved and CG converges; each CG
    iteration costs one Hessian-vector product, plus one for the final
    residual check and one mixed product. CG needs a positive definite
    inner Hessian; at non-positive curvature it stops and warns.

    Parameters
    ----------
    tol : float, optional
        Tolerance on the relative residual ``||H v - g|| / ||g||`` (a
        positive finite number). Default ``1e-10`` in float64, ``1e-5`` in
        float32.
    maxiter : int, optional
        Maximum CG iterations (at least 1); default
        ``min(10 * dim(theta), 1000)``.
    warm_start : bool, default=False
        Start CG from the previous call's solution when its shape, dtype and
        device match (useful when the outer loop calls :func:`argmin`
        repeatedly; ignored when worse than the zero start).
        ``info.extra["warm_started"]`` says whether it was used.
    fallback : {None, "dense"}, default=None
        With ``"dense"``, a CG that does not converge is followed by a dense
        solve of the Hessian when ``dim(theta) <= dense_max_dim``; the
        better solution is kept and ``info.fallback`` records it.
    dense_max_dim : int, default=1000
        Largest ``dim(theta)`` for the dense fallback (an integer >= 0).
    inner_tol : float, optional
        Gradient-norm tolerance at which the inner solution counts as an
        optimum (``info.inner_converged``; above it an
        :class:`~skbilevel.hypergrad.InnerSolveWarning`). Default: the
        solver's own tolerance (``1e-10`` in float64, ``1e-5`` in float32 for
        fixed-step solvers).
    precondition : bool, default=True
        When the ``inner_loss`` passed to :func:`argmin` has a method
        ``hessian_diagonal(theta, phi)`` returning a tree shaped like
        ``theta`` of positive values (the diagonal of the inner Hessian, or
        an approximation), precondition CG by it (Jacobi); a method
        ``hessian_preconditioner(theta, phi)`` returning a map of trees
        ``r -> M^{-1} r`` (or ``None``) takes precedence. The solution and
        the convergence test (on the unpreconditioned residual) are
        unchanged; on badly scaled Hessians (penalties spanning decades) CG
        needs far fewer iterations. ``info.extra["preconditioned"]`` records
        whether a preconditioner was used.

    Notes
    -----
    When CG does not reach ``tol``, a
    :class:`~skbilevel.hypergrad.LinearSolveWarning` gives the residual and
    iteration count, and the best iterate is used: the hypergradient is
    approximate, never a silent zero.

    Examples
    --------
    Ridge regression with a log-penalty ``phi``; the hypergradient of the
    training loss at the optimum.

    >>> import torch
    >>> from skbilevel.hypergrad import argmin, ImplicitCG
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    >>> phi = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * phi.exp() * (w ** 2).sum()
    >>> w0 = torch.zeros(2, dtype=torch.float64)
    >>> w, info = argmin(inner, phi, w0, hypergradient=ImplicitCG())
    >>> ((X @ w - y) ** 2).sum().backward()
    >>> round(float(phi.grad), 6), info.linear_solve_converged
    (0.135023, True)
    >>> info.linear_solve_iterations
    2
    """

    name = "cg"

    def __init__(
        self, tol=None, maxiter=None, warm_start=False, fallback=None,
        dense_max_dim=1000, inner_tol=None, precondition=True,
    ):
        self.tol = _check_positive(tol, "tol")
        self.maxiter = _check_int(maxiter, "maxiter", allow_none=True)
        self.warm_start = warm_start
        # checked here, not first in the backward pass (dense_max_dim=None failed
        # there with "'<=' not supported between instances of 'int' and 'NoneType'")
        self.fallback = _check_fallback(fallback)
        self.dense_max_dim = _check_int(dense_max_dim, "dense_max_dim", minimum=0)
        self.inner_tol = inner_tol
        self.precondition = precondition
        self._x_prev = None

    def _solve(self, matvec, matrix, b, info, preconditioner=None):
        _check_fallback(self.fallback)
        tol = _default_tol(b.dtype) if self.tol is None else self.tol
        n = b.numel()
        maxiter = self.maxiter if self.maxiter is not None else max(1, min(10 * n, 1000))
        x0 = None
        prev = self._x_prev
        if (
            self.warm_start
            and prev is not None
            and prev.shape == b.shape
            and prev.dtype == b.dtype
            and prev.device == b.device
        ):
            x0 = prev
        pre = preconditioner() if self.precondition and preconditioner is not None else None
        try:
            v, result = solve_cg(
                matvec, b, x0=x0, tol=tol, maxiter=maxiter, preconditioner=pre
            )
        except _IndefinitePreconditioner as err:
            # the problem's own preconditioner lost its definiteness in rounding
            # (RidgeFolds' Woodbury inverse with penalties over 20 decades): the
            # fit raised; CG runs with the Jacobi diagonal instead (positive by
            # construction) or none, and warns as usual if it cannot reach tol
            info.extra["preconditioner_dropped"] = str(err)
            pre = preconditioner(diagonal_only=True)
            v, result = solve_cg(
                matvec, b, x0=x0, tol=tol, maxiter=maxiter, preconditioner=pre
            )
        # whether CG used it: a start worse than zero is dropped (it read True)
        info.extra["warm_started"] = bool(result.warm_started)
        info.extra["preconditioned"] = pre is not None
        method, extra_fallback = "CG", None
        use_dense = self.fallback == "dense" and n <= self.dense_max_dim
        if not result.converged and use_dense:
            v_dense, dense = solve_dense(matrix(), b, method="auto", tol=tol)
            extra_fallback = (
                f"cg -> dense (CG relative residual {result.residual:.3e} after "
                f"{result.iterations} iterations: {result.message})"
            )
            if dense.residual <= result.residual or not math.isfinite(result.residual):
                v, result, method = v_dense, dense, "dense (CG fallback)"
        _record(info, result, extra_fallback)
        if self.warm_start:
            self._x_prev = v.detach()
        if not result.converged:
            if "curvature" in result.message:
                method = f"CG (stopped at {result.message})"
            elif result.message.startswith("stagnated"):
                method = f"CG ({result.message})"
            warn_linear_solve(info, tol, method)
        return v


def _check_fallback(fallback):
    if fallback not in (None, "dense"):
        raise ValueError(f"fallback must be None or 'dense', got {fallback!r}.")
    return fallback


@register_strategy("neumann")
class ImplicitNeumann(_Implicit):
    """Implicit differentiation with ``H^{-1}`` replaced by a truncated Neumann series.

    ``H^{-1} g ~ step * sum_{k<K} (I - step H)^k g`` (Lorraine et al., 2020):
    ``K`` Hessian-vector products, biased by the truncation
    ``(I - step H)^K g``, which is reported as the residual. The series
    converges only for ``0 < step < 2 / lambda_max(H)``; when its terms grow a
    :class:`~skbilevel.hypergrad.LinearSolveWarning` says so.

    Parameters
    ----------
    n_terms : int, default=50
        Number of terms ``K`` (at least 1).
    step : float, optional
        Scale of the series, a positive finite number. Default
        ``1 / lambda``, with ``lambda`` the Rayleigh-quotient estimate of
        ``lambda_max(H)`` after
        ``power_iterations`` power-iteration steps started from ``g`` (which
        costs that many extra products). For an inner problem solved by
        gradient descent its learning rate is the classic choice.
    tol : float, optional
        Stop early at this relative residual (a positive finite number),
        and warn when it is not reached. Without it, the ``K`` terms are
        summed and only divergence warns; ``info.linear_solve_converged``
        then says whether the residual is within the dtype's default
        tolerance (``1e-10`` in float64, ``1e-5`` in float32).
    power_iterations : int, default=20
        Power-iteration steps (at least 1) used to choose ``step`` when it is
        ``None``.
    inner_tol : float, optional
        Gradient-norm tolerance at which the inner solution counts as an
        optimum (``info.inner_converged``; above it an
        :class:`~skbilevel.hypergrad.InnerSolveWarning`). Default: the
        solver's own tolerance (``1e-10`` in float64, ``1e-5`` in float32 for
        fixed-step solvers).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, ImplicitNeumann
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    >>> phi = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * phi.exp() * (w ** 2).sum()
    >>> strategy = ImplicitNeumann(n_terms=2000)
    >>> w0 = torch.zeros(2, dtype=torch.float64)
    >>> w, info = argmin(inner, phi, w0, hypergradient=strategy)
    >>> ((X @ w - y) ** 2).sum().backward()
    >>> round(float(phi.grad), 6)
    0.135023
    """

    name = "neumann"

    def __init__(
        self, n_terms=50, step=None, tol=None, power_iterations=20, inner_tol=None
    ):
        self.n_terms = _check_int(n_terms, "n_terms")
        self.step = _check_positive(step, "step")
        self.tol = _check_positive(tol, "tol")
        self.power_iterations = _check_int(power_iterations, "power_iterations")
        self.inner_tol = inner_tol

    def _solve(self, matvec, matrix, b, info, preconditioner=None):
        step = self.step
        if step is None:
            lam = _power_iteration(matvec, b, self.power_iterations)
            if not (math.isfinite(lam) and lam != 0.0):
                raise FloatingPointError(
                    f"Could not estimate the largest Hessian eigenvalue (got {lam}); "
                    "pass ImplicitNeumann(step=...) explicitly."
                )
            step = 1.0 / abs(lam)
            info.extra["lambda_max_estimate"] = lam
        info.extra["neumann_step"] = step
        v, result = solve_neumann(matvec, b, step, self.n_terms, tol=self.tol)
        _record(info, result)
        if self.tol is None:
            # solve_neumann's converged is then "the series contracted" (residual
            # < 1): the record read converged=True at a residual of 0.86. It says
            # whether the dtype's default tolerance is met (still no warning)
            info.linear_solve_converged = bool(result.residual <= _default_tol(b.dtype))
        if result.residual > 1.0:
            lam_est = info.extra.get("lambda_max_estimate", "n/a")
            warnings.warn(
                f"{result.message}. The hypergradient is meaningless; pass a smaller "
                f"step (estimated lambda_max: {lam_est}) "
                "or use the 'cg' strategy.",
                LinearSolveWarning,
                stacklevel=3,
            )
        elif self.tol is not None and not result.converged:
            warn_linear_solve(info, self.tol, "Neumann")
        return v


def _power_iteration(matvec, b, n_iter):
    """Rayleigh-quotient estimate of the eigenvalue of largest magnitude."""
    v = b / torch.linalg.vector_norm(b)
    lam = math.nan
    for _ in range(max(1, n_iter)):
        w = matvec(v)
        lam = float(v @ w)
        w_norm = torch.linalg.vector_norm(w)
        if not float(w_norm) > 0.0:
            break
        v = w / w_norm
    return lam


@register_strategy("identity")
class ImplicitIdentity(_Implicit):
    """Implicit differentiation with the Hessian replaced by ``I / step``.

    The Hessian-free approximation.

    The hypergradient becomes ``-step * (d^2 f / d phi d theta) g``: the
    direction of the exact one when ``H`` is close to a multiple of the
    identity, otherwise a biased approximation (same idea as the
    "T1-T2" / one-step greedy methods). No tolerance applies and nothing warns.

    Parameters
    ----------
    step : float, optional
        ``H ~ I / step``, a positive finite number (0 would make the
        hypergradient an exact zero, a negative step flip its sign).
        Default: ``step = ||g||^2 / (g^T H g)``, the scale
        that minimizes the ``H``-norm error along ``g`` (one Hessian-vector
        product; the result equals one CG iteration) with the residual
        reported for free. With a float, only the mixed product is spent
        and the residual is ``nan`` (for an inner problem solved by gradient
        descent, its learning rate is the classic choice).
    inner_tol : float, optional
        Gradient-norm tolerance at which the inner solution counts as an
        optimum (``info.inner_converged``; above it an
        :class:`~skbilevel.hypergrad.InnerSolveWarning`). Default: the
        solver's own tolerance (``1e-10`` in float64, ``1e-5`` in float32 for
        fixed-step solvers).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, ImplicitIdentity
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    >>> phi = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * phi.exp() * (w ** 2).sum()
    >>> w0 = torch.zeros(2, dtype=torch.float64)
    >>> w, info = argmin(inner, phi, w0, hypergradient="identity")
    >>> ((X @ w - y) ** 2).sum().backward()
    >>> bool(phi.grad > 0), info.linear_solve_converged
    (True, None)
    """

    name = "identity"

    def __init__(self, step=None, inner_tol=None):
        self.step = _check_positive(step, "step")
        self.inner_tol = inner_tol

    def _solve(self, matvec, matrix, b, info, preconditioner=None):
        step = self.step
        if step is None:
            hb = matvec(b)
            curvature = float(b @ hb)
            b_sq = float(b @ b)
            if curvature > 0.0 and math.isfinite(curvature):
                step = b_sq / curvature
                fallback = None
            else:
                step = 1.0
                fallback = f"g^T H g = {curvature:.3e} <= 0: used step=1"
            v, result = solve_identity(b, step)
            r_norm = float(torch.linalg.vector_norm(step * hb - b))
            result.residual = r_norm / math.sqrt(b_sq)
            result.n_matvec = 1
            result.fallback = fallback
        else:
            v, result = solve_identity(b, step)
        info.extra["identity_step"] = step
        _record(info, result)
        return v


@register_strategy("dense")
class ImplicitDense(_Implicit):
    """Implicit differentiation with a dense factorization of the inner Hessian.

    The Hessian is built from ``dim(theta)`` Hessian-vector products
    (batched with ``is_grads_batched`` where the operations allow) and
    factorized. Exact (to rounding) when the inner problem is solved; for
    small ``theta`` only, as memory grows as ``dim(theta)^2``.

    Parameters
    ----------
    method : {"auto", "cholesky", "lu"}, default="auto"
        Factorization; Cholesky falls back to LU when the Hessian is not
        positive definite and LU to the pseudo-inverse when it is singular
        (recorded in ``info.fallback``).
    tol : float, optional
        Relative residual above which a warning is emitted (a positive
        finite number); default ``sqrt(eps)`` of the dtype.
    inner_tol : float, optional
        Gradient-norm tolerance at which the inner solution counts as an
        optimum (``info.inner_converged``; above it an
        :class:`~skbilevel.hypergrad.InnerSolveWarning`). Default: the
        solver's own tolerance (``1e-10`` in float64, ``1e-5`` in float32 for
        fixed-step solvers).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, ImplicitDense
    >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 7.0]], dtype=torch.float64)
    >>> y = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    >>> phi = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * phi.exp() * (w ** 2).sum()
    >>> w0 = torch.zeros(2, dtype=torch.float64)
    >>> w, info = argmin(inner, phi, w0, hypergradient="dense")
    >>> ((X @ w - y) ** 2).sum().backward()
    >>> round(float(phi.grad), 6), info.n_hvp >= 3
    (0.135023, True)
    """

    name = "dense"

    def __init__(self, method="auto", tol=None, inner_tol=None):
        if method not in ("auto", "cholesky", "lu"):
            # (was raised first by the backward pass's dense solve)
            raise ValueError(f"method must be 'auto', 'cholesky' or 'lu', got {method!r}.")
        self.method = method
        self.tol = _check_positive(tol, "tol")
        self.inner_tol = inner_tol

    def _solve(self, matvec, matrix, b, info, preconditioner=None):
        tol = math.sqrt(torch.finfo(b.dtype).eps) if self.tol is None else self.tol
        v, result = solve_dense(matrix(), b, method=self.method, tol=tol)
        result.n_matvec = b.numel()
        _record(info, result)
        if not result.converged:
            warn_linear_solve(info, tol, "Dense")
        return v
