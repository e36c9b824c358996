"""Penalty / value-function hypergradients: BOME (Liu et al. 2022).

The bi-level problem ``min_phi F(theta*(phi), phi)`` is rewritten as the
single-level constrained problem ``min_{theta, phi} F(theta, phi)`` subject to
``q(theta, phi) = f(theta, phi) - min_theta' f(theta', phi) <= 0`` (the
value-function approach) and solved first order, moving ``theta`` and
``phi`` together. No second derivatives and no inner solve to tolerance are
needed, and the formulation tolerates non-unique inner solutions; the price
is that ``theta`` is an iterate of the joint method, not an inner minimizer.
"""

import math
import warnings

import torch

from ._base import (
    HypergradientStrategy,
    InnerSolveWarning,
    _check_positive,
    _scalar_loss,
    register_strategy,
)
from ._proxy import _solver_grads
from ._steps import GradientDescent
from ._tree import tree_detach, tree_flatten, tree_unflatten

__all__ = ["BOME"]


class _BOMEFunction(torch.autograd.Function):
    """Returns BOME's ``theta`` iterate; its backward gives BOME's ``phi`` direction."""

    @staticmethod
    def forward(ctx, state, *phi_leaves):
        ctx.state = state
        return tuple(t.clone() for t in state["theta"])

    @staticmethod
    def backward(ctx, *grads):
        state = ctx.state
        grads_phi = state["strategy"]._backward(state, grads)
        return (None, *grads_phi)


@register_strategy("bome")
class BOME(HypergradientStrategy):
    """BOME: first-order value-function method for bi-level problems (Liu et al. 2022).

    With ``theta_hat_T`` the result of the inner solver run from the current
    ``theta`` (detached; BOME uses ``T`` gradient steps), the value-function
    gap is ``q(theta, phi) = f(theta, phi) - f(theta_hat_T, phi)``. BOME moves
    ``(theta, phi)`` along ``-(grad F + lambda grad q)`` with::

        lambda = max((eta ||grad q||^2 - <grad F, grad q>) / ||grad q||^2, 0)

    which guarantees that ``q`` decreases at least at rate
    ``eta ||grad q||^2`` while ``F`` decreases as fast as that allows.

    How it fits the :func:`argmin` shape:

    - ``argmin`` returns the current BOME iterate ``theta_t`` (not an inner
      minimizer) as an autograd tensor. Its backward pass receives
      ``g = dF/dtheta`` at ``theta_t`` and returns ``lambda * grad_phi q`` to
      ``phi``; autograd adds the direct ``dF/dphi`` itself, so ``phi.grad``
      is BOME's ``phi``-direction, ready for any torch optimizer.
    - ``lambda`` is computed with the ``theta``-part of ``grad F`` only:
      ``<grad F, grad q>`` omits ``<dF/dphi, grad_phi q>``, which the backward
      pass cannot see. The two agree when ``F`` does not depend on ``phi``
      directly (the usual validation loss).
    - The same backward pass moves the strategy's own iterate:
      ``theta_{t+1} = theta_t - step_size * (g + lambda grad_theta q)``. The
      iterate is kept **on the strategy object** between outer iterations:
      pass the same ``BOME`` instance at every call (a strategy name builds a
      fresh instance each time, which restarts from ``init``). ``init`` is
      used at the first call, after :meth:`reset`, or when its shapes change.

    What is exact and what is not: the direction is BOME's exactly (up to the
    ``lambda`` caveat above). It is not the hypergradient of
    ``F(theta*(phi))``; near a stationary point of the joint dynamics,
    ``theta_t - theta*`` is pushed along ``-H^{-1} dF/dtheta`` and
    ``lambda grad_phi q`` lines up with the implicit-function hypergradient,
    but a single call from a fresh ``theta`` carries little information
    (``lambda grad_phi q`` is zero when ``theta_t`` is an exact inner
    minimizer). The outer loss evaluated at ``theta_t`` is not
    ``F(theta*(phi))`` either: it can be *lower*, so do not select iterates
    by it (``minimize_outer(..., restore_best=False)``).

    Parameters
    ----------
    eta : float, default=0.5
        Minimal decrease rate of ``q`` relative to ``||grad q||^2``.
    step_size : float, default=0.1
        Step ``xi`` of the ``theta`` update done in the backward pass (the
        ``phi`` step is the outer optimizer's).

    Attributes
    ----------
    theta_ : tensor or tree of tensors or None
        The current BOME iterate (``None`` before the first call).

    Notes
    -----
    ``info.extra`` holds ``q`` (the gap at ``theta_t``), ``grad_q_norm`` and,
    after backward, ``lambda``. ``info.inner_grad_norm`` is the norm of
    ``grad_theta f`` at ``theta_t``. Cost: the inner solver's steps plus two
    gradient evaluations; no Hessian-vector product. An inner solver that
    raises the inner objective (a negative gap ``q``, e.g. gradient steps
    too long for its curvature) emits an
    :class:`~skbilevel.hypergrad.InnerSolveWarning` and sets
    ``info.inner_converged`` to ``False``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, BOME, ClosedFormSolver
    >>> X = torch.eye(2, dtype=torch.float64); y = torch.ones(2, dtype=torch.float64)
    >>> class Ridge(ClosedFormSolver):
    ...     def closed_form(self, phi):
    ...         return torch.linalg.solve(X.T @ X + torch.diag(phi.exp()), X.T @ y)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (phi.exp() * w ** 2).sum()
    >>> bome = BOME(step_size=0.2)
    >>> phi = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> for _ in range(200):  # phi fixed: let the theta iterate settle
    ...     phi.grad = None
    ...     w, info = argmin(inner, phi, torch.zeros(2, dtype=torch.float64),
    ...                      hypergradient=bome, solver=Ridge())
    ...     ((w - 2.0) ** 2).sum().backward()
    >>> bool((phi.grad > 0).all())  # exact: d/dphi sum (w* - 2)^2 = 0.75 per entry
    True
    """

    name = "bome"
    family = "penalty"
    solver_kind = "any"

    def __init__(self, eta=0.5, step_size=0.1):
        self.eta = eta
        self.step_size = step_size
        self.theta_ = None

    def default_solver(self):
        """``GradientDescent(lr=0.1, n_steps=10)``: BOME's ``T = 10`` gradient steps."""
        return GradientDescent(lr=0.1, n_steps=10)

    def reset(self):
        """Forget the iterate: the next call starts from its ``init``."""
        self.theta_ = None

    def _start(self, init):
        init = tree_detach(init)
        if self.theta_ is not None:
            old, old_spec = tree_flatten(self.theta_)
            new, new_spec = tree_flatten(init)
            same = old_spec == new_spec and all(
                a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                for a, b in zip(old, new)
            )
            if same:
                return self.theta_
        return _tree_clone(init)

    def argmin(self, inner_loss, phi, init, solver, info):
        for name in ("eta", "step_size"):
            # (step_size=inf was accepted and made the iterate NaN after one call;
            # numpy scalars such as np.float32(0.5) were refused)
            _check_positive(getattr(self, name), f"BOME: {name}", allow_none=False)
        theta = self._start(init)
        self.theta_ = theta
        theta_leaves, theta_spec = tree_flatten(theta)
        phi_leaves, phi_spec = tree_flatten(phi)
        phi0 = tree_detach(phi)

        theta_hat, res = solver.solve(lambda t: inner_loss(t, phi0), theta, phi=phi0)
        theta_hat = tree_detach(theta_hat)
        info.inner_iterations = res.n_iter
        info.inner_converged = res.converged

        with torch.enable_grad():
            th = [t.detach().requires_grad_(True) for t in theta_leaves]
            ph = [p.detach().requires_grad_(p.requires_grad) for p in phi_leaves]
            ph_tree = tree_unflatten(phi_spec, ph)
            f_theta = _scalar_loss(inner_loss(tree_unflatten(theta_spec, th), ph_tree))
            f_hat = _scalar_loss(inner_loss(theta_hat, ph_tree))
            q = f_theta - f_hat
            wrt = th + [p for p in ph if p.requires_grad]
            grads = torch.autograd.grad(q, wrt, allow_unused=True)
        grads = [
            torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, wrt)
        ]
        gq_theta = grads[: len(th)]
        gq_phi_req = iter(grads[len(th) :])
        gq_phi = [next(gq_phi_req) if p.requires_grad else None for p in ph]
        sq = sum(float((g**2).sum()) for g in grads)
        info.n_grad += _solver_grads(res) + 2
        info.n_hvp += getattr(res, "n_hvp", 0) or 0
        info.inner_grad_norm = math.sqrt(sum(float((g**2).sum()) for g in gq_theta))
        info.extra.update(q=float(q.detach()), grad_q_norm=math.sqrt(sq))
        f0, f1 = float(f_theta.detach()), float(f_hat.detach())
        if not f1 <= f0 + 1e-8 * abs(f0):
            # the gap q = f(theta) - min f must be >= 0: the solver went uphill
            # (GradientDescent(lr=0.1) on a curvature of 300: q = -7e13 and a
            # direction of 1e12, silently)
            info.inner_converged = False
            warnings.warn(
                f"BOME's inner solver raised the inner objective from {f0:.3e} to "
                f"{f1:.3e} in {res.n_iter} iterations of {type(solver).__name__}, so "
                f"the value-function gap q = {f0 - f1:.3e} is negative and BOME's "
                "direction is meaningless. Lower the solver's lr (below 2 / the largest "
                "curvature of the inner objective for gradient descent) or use LBFGS().",
                InnerSolveWarning,
                stacklevel=3,  # the user's argmin call
            )

        state = {
            "strategy": self,
            "theta": [t.detach() for t in theta_leaves],
            "theta_spec": theta_spec,
            "gq_theta": gq_theta,
            "gq_phi": gq_phi,
            "sq": sq,
            "info": info,
        }
        out = _BOMEFunction.apply(state, *phi_leaves)
        return tree_unflatten(theta_spec, list(out))

    def _backward(self, state, grads):
        """Lambda from ``g = dF/dtheta``; move the iterate; return the ``phi`` grads."""
        theta, gq_theta = state["theta"], state["gq_theta"]
        gq_phi, sq = state["gq_phi"], state["sq"]
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, theta)]
        if sq > 0:
            inner = sum(float((g * q).sum()) for g, q in zip(grads, gq_theta))
            lam = max((self.eta * sq - inner) / sq, 0.0)
        else:
            # theta_t is an exact inner minimizer: q and its gradient vanish.
            lam = 0.0
        state["info"].extra["lambda"] = lam
        # lambda = 0: phi gets only dF/dphi (often exactly 0), not a sign of convergence
        state["info"].extra["provisional"] = lam == 0.0
        with torch.no_grad():
            new = [
                t - self.step_size * (g + lam * q)
                for t, g, q in zip(theta, grads, gq_theta)
            ]
        self.theta_ = tree_unflatten(state["theta_spec"], new)
        return [None if q is None else lam * q for q in gq_phi]


def _tree_clone(tree):
    """Detached copy of every leaf with its own storage."""
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(spec, [t.detach().clone() for t in leaves])
