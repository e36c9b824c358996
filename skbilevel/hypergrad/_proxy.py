"""Proxy hypergradients: a surrogate of ``theta*(phi)`` that autograd can differentiate.

Neither strategy differentiates the inner solver. Both solve the inner problem
(or part of it) without a graph and build a cheap, differentiable stand-in for
the solution map:

- :class:`BestResponse` fits a local linear best-response model
  ``theta(phi) = theta_hat + J (phi - phi0)`` from inner solutions at
  perturbed ``phi`` (MacKay et al. 2019, self-tuning networks; Lorraine and
  Duvenaud 2018, hypernetworks). ``J`` is a finite-difference estimate of the
  Jacobian ``d theta*/d phi`` restricted to the sampled directions.
- :class:`EvoGrad` perturbs ``theta`` and averages the perturbed copies with
  weights ``softmax(-f(theta_k, phi) / temperature)`` (Bohdal et al. 2021);
  gradients flow to ``phi`` through the weights only: first order, no
  second derivatives.

Both are approximations: they are never exact, but cost no Hessian-vector
product and work with any inner solver (even non-differentiable ones).
"""

import math
import numbers
import warnings

import torch

from ._base import (
    HypergradientStrategy,
    HypergradientWarning,
    _check_positive as _check_positive_number,
    _scalar_loss,
    register_strategy,
)
from ._solvers import LBFGS
from ._tree import tree_detach, tree_flatten, tree_unflatten

__all__ = ["BestResponse", "EvoGrad"]


# --------------------------------------------------------------------------- helpers
def _solver_grads(result):
    """Inner-gradient evaluations an inner solve spent (else its iteration count)."""
    n = getattr(result, "n_grad", None)
    if n is None:
        n = result.n_iter
    return int(n)


class _Sampler:
    """Gaussian samples from a private generator (``random_state``) or the global one.

    Samples are drawn on the CPU and moved to the target device so that a seed
    gives the same numbers on every device.
    """

    def __init__(self, random_state):
        self.random_state = random_state
        self._gen = None

    def randn(self, shape, like):
        if self.random_state is None:
            gen = None
        elif isinstance(self.random_state, torch.Generator):
            gen = self.random_state
        else:
            if self._gen is None:
                self._gen = torch.Generator().manual_seed(int(self.random_state))
            gen = self._gen
        floats = (torch.float32, torch.float64)
        dtype = like.dtype if like.dtype in floats else torch.float64
        if gen is not None and gen.device.type != "cpu":
            return torch.randn(
                shape, generator=gen, dtype=like.dtype, device=like.device
            )
        out = torch.randn(shape, generator=gen, dtype=dtype)
        return out.to(device=like.device, dtype=like.dtype)


def _check_positive(name, value, integer=False):
    # (sigma=inf or temperature=inf passed: NaN perturbations or uniform weights)
    if not integer:
        _check_positive_number(value, name, allow_none=False)
        return
    ok = (
        isinstance(value, numbers.Real) and not isinstance(value, bool)
        and math.isfinite(value) and value > 0 and float(value).is_integer()
    )
    if not ok:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


# ------------------------------------------------------------------------ best response
@register_strategy("best_response")
class BestResponse(HypergradientStrategy):
    """Local linear best-response proxy of ``theta*(phi)``, fitted by least squares.

    Around the current outer point ``phi0`` the inner problem is solved at
    ``n_samples`` perturbed points ``phi0 + sigma u_k`` (and at
    ``phi0 - sigma u_k`` with ``antithetic=True``), warm-started from the
    solution ``theta_hat`` at ``phi0``. A linear model
    ``theta(phi) = theta_hat + J (phi - phi0)`` is fitted to these solutions
    by least squares (the "linear hypernetwork" of MacKay et al. 2019, fitted
    in closed form instead of by SGD) and returned as the autograd tensor, so
    ``d theta / d phi = J``.

    With ``antithetic=True`` the fit uses central differences
    ``(theta(phi0 + sigma u) - theta(phi0 - sigma u)) / 2``, whose error is
    ``O(sigma^2)``. With at least as many directions as outer variables
    (``n_samples >= phi.numel()``) ``J`` estimates the full Jacobian and the
    hypergradient ``J^T dF/dtheta`` approaches the exact one as ``sigma`` and
    the inner tolerance go to zero. With fewer directions the hypergradient
    is the exact one projected on the span of the sampled directions (a
    random-subspace estimate, shorter by about ``n_samples / phi.numel()``).

    Cost per hypergradient: ``1 + n_samples * (2 if antithetic else 1)`` inner
    solves (each warm-started), no second derivatives; memory
    ``O(n_samples * (theta.numel() + phi.numel()))``. ``J`` is kept and reused
    for ``refit_every - 1`` further calls to amortize this, as self-tuning
    networks do; ``theta_hat`` is recomputed at every call.

    Parameters
    ----------
    n_samples : int, default=None
        Number of perturbation directions. ``None`` uses
        ``min(phi.numel(), 32)``.
    sigma : float, default=0.05
        Size of the perturbations of ``phi`` (in the units of ``phi``). Must
        dominate the inner solver's error: the finite differences divide it
        by ``sigma``.
    antithetic : bool, default=True
        Also solve at ``phi0 - sigma u_k`` (central differences).
    refit_every : int, default=1
        Refit ``J`` every ``refit_every`` calls; in between, reuse it (its
        shapes must not change).
    sample_solver : InnerSolver, optional
        Solver for the perturbed problems (e.g. a few warm-started steps);
        defaults to the solver passed to :func:`argmin`.
    random_state : int, torch.Generator or None, default=None
        Seed of the perturbations (``None``: torch's global generator).

    Notes
    -----
    ``info.extra`` holds ``fit_residual`` (relative least-squares residual,
    ``0`` when ``n_samples <= phi.numel()``: the fit interpolates),
    ``nonlinearity`` (relative size of the second-order part
    ``(theta_+ + theta_-)/2 - theta_hat``; large values mean ``sigma`` is too
    large for a linear model), ``n_solves``, ``max_sample_grad_norm`` and
    ``refit``. ``n_grad`` counts the inner solvers' gradient evaluations.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, BestResponse, ClosedFormSolver
    >>> X = torch.eye(3, dtype=torch.float64); y = torch.ones(3, dtype=torch.float64)
    >>> class Ridge(ClosedFormSolver):
    ...     def closed_form(self, phi):
    ...         return torch.linalg.solve(X.T @ X + torch.diag(phi.exp()), X.T @ y)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (phi.exp() * w ** 2).sum()
    >>> phi = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    >>> w, info = argmin(inner, phi, torch.zeros(3, dtype=torch.float64),
    ...                  hypergradient=BestResponse(random_state=0), solver=Ridge())
    >>> w.sum().backward()
    >>> phi.grad.round(decimals=3)  # exact: -e^phi / (1 + e^phi)^2 = -0.25
    tensor([-0.2500, -0.2500, -0.2500], dtype=torch.float64)
    """

    name = "best_response"
    family = "proxy"
    solver_kind = "any"

    def __init__(
        self,
        n_samples=None,
        sigma=0.05,
        antithetic=True,
        refit_every=1,
        sample_solver=None,
        random_state=None,
    ):
        self.n_samples = n_samples
        self.sigma = sigma
        self.antithetic = antithetic
        self.refit_every = refit_every
        self.sample_solver = sample_solver
        self.random_state = random_state
        self._sampler = _Sampler(random_state)
        self._fit = None
        self._calls = 0

    def default_solver(self):
        """:class:`LBFGS` with its dtype-dependent default tolerance."""
        return LBFGS()

    def reset(self):
        """Forget the stored fit (the next call refits ``J``)."""
        self._fit = None
        self._calls = 0

    def _directions(self, m, n, like):
        """``(m, n)`` perturbation directions: orthonormal when ``n <= m``."""
        u = self._sampler.randn((m, n), like)
        if n <= m:
            u, _ = torch.linalg.qr(u)
        else:
            u = u / u.norm(dim=0, keepdim=True)
        return u

    def _refit(
        self, inner_loss, phi0_leaves, phi_spec, grad_idx, theta_hat, solver, info
    ):
        # only the leaves that require grad are perturbed: the others (data passed
        # in phi) get no hypergradient, and perturbing them spent the directions
        # on them, leaving a random projection of the wanted one (wrong in sign)
        moved = [phi0_leaves[i] for i in grad_idx]
        m = sum(p.numel() for p in moved)
        n = self.n_samples if self.n_samples is not None else min(m, 32)
        _check_positive("n_samples", n, integer=True)
        _check_positive("sigma", self.sigma)
        n = int(n)
        like = moved[0]
        phi0 = torch.cat([p.reshape(-1) for p in moved])
        U = self._directions(m, n, like)
        sample_solver = self.sample_solver or solver
        theta_hat_vec = torch.cat([t.reshape(-1) for t in tree_flatten(theta_hat)[0]])

        def solve_at(vec):
            leaves, start = list(phi0_leaves), 0
            for i in grad_idx:
                p = phi0_leaves[i]
                leaves[i] = vec[start : start + p.numel()].reshape(p.shape)
                start += p.numel()
            phi_k = tree_unflatten(phi_spec, leaves)
            theta_k, res = sample_solver.solve(
                lambda t: inner_loss(t, phi_k), theta_hat, phi=phi_k
            )
            leaves_k = tree_flatten(theta_k)[0]
            vec_k = torch.cat([t.detach().reshape(-1) for t in leaves_k])
            return vec_k, res

        plus, minus, grad_norms, n_grad, n_hvp = [], [], [], 0, 0
        for k in range(n):
            step = self.sigma * U[:, k]
            vec, res = solve_at(phi0 + step)
            plus.append(vec)
            grad_norms.append(res.grad_norm)
            n_grad += _solver_grads(res)
            n_hvp += getattr(res, "n_hvp", 0) or 0
            if self.antithetic:
                vec, res = solve_at(phi0 - step)
                minus.append(vec)
                grad_norms.append(res.grad_norm)
                n_grad += _solver_grads(res)
                n_hvp += getattr(res, "n_hvp", 0) or 0
        plus = torch.stack(plus, dim=1)
        if self.antithetic:
            minus = torch.stack(minus, dim=1)
            D = (plus - minus) / 2
            second = (plus + minus) / 2 - theta_hat_vec[:, None]
        else:
            D = plus - theta_hat_vec[:, None]
            second = None
        # in theta's dtype: phi of another dtype (float32 penalties, a float64
        # model) made these products fail on mismatched dtypes
        dphi = (self.sigma * U).to(D.dtype)  # (m, n)
        P = torch.linalg.pinv(dphi)  # (n, m); J = D P
        d_norm = float(D.norm())
        resid = D - (D @ P) @ dphi
        fit_residual = float(resid.norm()) / d_norm if d_norm > 0 else 0.0
        nonlinearity = (
            float(second.norm()) / d_norm
            if (second is not None and d_norm > 0)
            else None
        )
        finite = [g for g in grad_norms if not math.isnan(g)]
        info.n_grad += n_grad
        info.n_hvp += n_hvp
        info.extra.update(
            fit_residual=fit_residual,
            nonlinearity=nonlinearity,
            n_solves=1 + len(grad_norms),
            max_sample_grad_norm=max(finite) if finite else math.nan,
            n_samples=n,
        )
        if d_norm == 0:
            warnings.warn(
                f"BestResponse: the inner solutions at {len(grad_norms)} perturbed phi "
                f"(sigma={self.sigma:.3g}) all equal theta_hat, so the fitted Jacobian "
                "is zero. Either theta* does not depend on phi or the sample solver "
                "stopped before moving; raise sigma or tighten the sample solver.",
                HypergradientWarning,
                stacklevel=4,
            )
        return D, P

    def argmin(self, inner_loss, phi, init, solver, info):
        # (refit_every=0, -5 or 1.5 were read as 1)
        _check_positive("refit_every", self.refit_every, integer=True)
        phi0 = tree_detach(phi)
        phi_leaves, phi_spec = tree_flatten(phi)
        phi0_leaves = [p.detach() for p in phi_leaves]
        theta_hat, res = solver.solve(
            lambda t: inner_loss(t, phi0), tree_detach(init), phi=phi0
        )
        theta_hat = tree_detach(theta_hat)
        info.inner_iterations = res.n_iter
        info.inner_grad_norm = None if math.isnan(res.grad_norm) else res.grad_norm
        info.inner_converged = res.converged
        info.n_grad += _solver_grads(res)
        info.n_hvp += getattr(res, "n_hvp", 0) or 0

        theta_leaves, theta_spec = tree_flatten(theta_hat)
        grad_idx = [i for i, p in enumerate(phi_leaves) if p.requires_grad]
        if not grad_idx:  # no hypergradient wanted: nothing to fit
            info.extra["refit"] = False
            return theta_hat
        refit = self._fit is None or self._calls % max(1, int(self.refit_every)) == 0
        shapes = (
            [p.shape for p in phi0_leaves], grad_idx, [t.shape for t in theta_leaves]
        )
        if not refit and self._fit[2] != shapes:
            refit = True
        if refit:
            D, P = self._refit(
                inner_loss, phi0_leaves, phi_spec, grad_idx, theta_hat, solver, info
            )
            self._fit = (D, P, shapes)
        else:
            D, P, _ = self._fit
        info.extra["refit"] = refit
        self._calls += 1

        # phi - phi0 is 0 in value, phi's identity in derivative; NaN at an
        # infinite entry (a log-penalty of -inf), which made theta NaN: held at 0
        dphi = torch.cat(
            [
                torch.where(torch.isfinite(p0), p - p0, torch.zeros_like(p0)).reshape(-1)
                for p, p0 in ((phi_leaves[i], phi0_leaves[i]) for i in grad_idx)
            ]
        )
        # J (phi - phi0), differentiable in phi through dphi
        delta = D @ (P @ dphi.to(P.dtype))
        out, start = [], 0
        for t in theta_leaves:
            piece = delta[start : start + t.numel()].reshape(t.shape)
            out.append(t + piece.to(t.dtype))
            start += t.numel()
        return tree_unflatten(theta_spec, out)


# --------------------------------------------------------------------------- EvoGrad
@register_strategy("evograd")
class EvoGrad(HypergradientStrategy):
    """Perturbation-average proxy of ``theta*(phi)`` (EvoGrad, Bohdal et al. 2021).

    The inner problem is solved (without a graph) to ``theta_hat``; then
    ``n_samples`` perturbed copies ``theta_k = theta_hat + sigma eps_k`` are
    scored by the inner loss and averaged::

        w = softmax(-f(theta_k, phi) / temperature)
        theta(phi) = sum_k w_k theta_k

    Gradients reach ``phi`` through the weights ``w`` only (one backward pass
    through ``n_samples`` inner-loss evaluations): first order, no second
    derivatives.

    What it approximates: for a quadratic inner loss with Hessian ``H`` and
    infinitely many samples, the weighted average is
    ``theta_hat - c (I + c H)^{-1} grad_theta f`` with
    ``c = sigma**2 / temperature``, whose derivative in ``phi`` is
    ``-c (I + c H)^{-1} d^2 f / d theta d phi``. As ``c`` grows this tends
    to the implicit-function answer ``-H^{-1} d^2 f / d theta d phi`` up to
    the factor ``c H (I + cH)^{-1}``; as ``c`` shrinks it tends to the
    identity (Hessian-free) approximation scaled by ``c``. Large ``c`` makes
    the weights degenerate (few effective samples, a noisy estimate).
    The forward value is ``theta_hat`` moved by the weighted mean of the
    perturbations (``theta_hat`` exactly when the weights are uniform).

    A fixed temperature only works when the losses of the perturbed copies
    spread over about that many units: far below it the weights are uniform
    (a vanishing, noisy gradient), far above it they collapse on one copy.
    The spread is ``sigma**2 ||H||`` near an optimum, so it changes with the
    data's scale, the loss's reduction (sum or mean) and ``sigma``. By
    default the temperature is therefore set at each call to
    ``temperature_scale`` times the standard deviation of the perturbed
    losses (a constant: no gradient flows through it). The logits
    ``-f_k / temperature`` then have standard deviation
    ``1 / temperature_scale``, which for roughly Gaussian losses keeps the
    effective sample size near ``n_samples * exp(-1 / temperature_scale**2)``
    (about ``0.37 n_samples`` at the default ``1``) whatever the scale of
    the problem; for a quadratic inner loss at its optimum ``c H`` becomes
    ``sqrt(2) H / (temperature_scale ||H||_F)``, independent of ``sigma``.

    Parameters
    ----------
    n_samples : int, default=32
        Number of perturbed copies of ``theta`` (pairs ``+-eps`` count as
        two with ``antithetic=True``; an odd number gets one extra). At
        least 3 with ``antithetic=True``: the two losses of a single pair
        differ only by rounding at an inner optimum.
    sigma : float, default=0.01
        Standard deviation of the perturbations of ``theta``.
    temperature : float or None, default=None
        Absolute softmax temperature, in the units of the inner loss (the
        paper's ``tau``). ``None``: adapt it to the perturbed losses, see
        ``temperature_scale``.
    temperature_scale : float, default=1.0
        With ``temperature=None``, the temperature is this factor times the
        standard deviation of the perturbed inner losses. Larger values flatten
        the weights (more effective samples, a more Hessian-free estimate);
        smaller values sharpen them. Ignored when ``temperature`` is set.
    antithetic : bool, default=True
        Use pairs ``theta_hat +- sigma eps_k``: removes the first-order noise
        of the average.
    orthogonal : bool, default=True
        Make the perturbation directions exactly orthogonal, in blocks of
        ``dim(theta)`` draws, keeping Gaussian lengths (orthogonal evolution
        strategies, Choromanski et al. 2018). Each ``eps_k`` is still
        ``N(0, I)``, but the sample covariance of a full block has no
        off-diagonal noise, which is what the weighted average's derivative
        is made of: on a 5-feature ridge problem with 32 samples, the mean
        cosine with the exact hypergradient rises from about 0.86 to 0.94.
        One QR factorization of a ``dim(theta)`` by ``min(n, dim(theta))``
        matrix per block.
    random_state : int, torch.Generator or None, default=None
        Seed of the perturbations (``None``: torch's global generator).

    Notes
    -----
    ``info.extra`` holds ``temperature`` (the one used), ``loss_std`` and
    ``loss_spread`` (standard deviation and range of the perturbed losses),
    ``effective_sample_size`` (``1 / sum w_k^2``, between 1 and
    ``n_samples``), ``n_samples``, ``n_nonfinite`` and ``shift_norm`` (how far
    the forward value moved from ``theta_hat``). A
    :class:`~skbilevel.hypergrad.HypergradientWarning` says when the weights
    collapse on a few samples (effective sample size below
    ``min(n_samples / 2, max(3, n_samples / 20))``) and when the perturbed
    losses differ only by rounding (``sigma`` too small for the dtype).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, EvoGrad, ClosedFormSolver
    >>> X = torch.eye(2, dtype=torch.float64); y = torch.ones(2, dtype=torch.float64)
    >>> class Ridge(ClosedFormSolver):
    ...     def closed_form(self, phi):
    ...         return torch.linalg.solve(X.T @ X + torch.diag(phi.exp()), X.T @ y)
    >>> def inner(w, phi):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (phi.exp() * w ** 2).sum()
    >>> phi = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    >>> strategy = EvoGrad(n_samples=2000, sigma=0.5, temperature=0.25, random_state=0)
    >>> w, info = argmin(inner, phi, torch.zeros(2, dtype=torch.float64),
    ...                  hypergradient=strategy, solver=Ridge())
    >>> w.sum().backward()
    >>> bool((phi.grad < 0).all())  # the exact hypergradient is -0.25 per entry
    True
    """

    name = "evograd"
    family = "proxy"
    solver_kind = "any"

    def __init__(
        self,
        n_samples=32,
        sigma=0.01,
        temperature=None,
        temperature_scale=1.0,
        antithetic=True,
        orthogonal=True,
        random_state=None,
    ):
        self.n_samples = n_samples
        self.sigma = sigma
        self.temperature = temperature
        self.temperature_scale = temperature_scale
        self.antithetic = antithetic
        self.orthogonal = orthogonal
        self.random_state = random_state
        self._sampler = _Sampler(random_state)

    def default_solver(self):
        """:class:`LBFGS` with its dtype-dependent default tolerance."""
        return LBFGS()

    def _orthogonal_draws(self, m, leaves):
        """``m`` Gaussian draws over all leaves, orthogonal in blocks of ``dim(theta)``.

        Each block of ``G`` (rows i.i.d. standard normal) becomes ``diag(|g_k|) Q``
        with ``Q`` the orthonormal factor of its rows: by rotation invariance
        every row is still marginally ``N(0, I)``, but rows in a block are
        exactly orthogonal (orthogonal evolution strategies).
        """
        sizes = [t.numel() for t in leaves]
        dim = sum(sizes)
        G = self._sampler.randn((m, dim), leaves[0])
        blocks = []
        for start in range(0, m, dim):
            g = G[start : start + dim]
            q, r = torch.linalg.qr(g.T)
            # QR's signs are arbitrary; fix them so q_k has g_k's orientation
            signs = torch.sign(torch.diagonal(r))
            signs = torch.where(signs == 0, torch.ones_like(signs), signs)
            lengths = torch.linalg.vector_norm(g, dim=1, keepdim=True)
            blocks.append((q * signs).T * lengths)
        flat = torch.cat(blocks)
        eps, start = [], 0
        for t, size in zip(leaves, sizes):
            part = flat[:, start : start + size].reshape((m,) + tuple(t.shape))
            eps.append(part.to(device=t.device, dtype=t.dtype))
            start += size
        return eps

    def argmin(self, inner_loss, phi, init, solver, info):
        _check_positive("n_samples", self.n_samples, integer=True)
        _check_positive("sigma", self.sigma)
        if self.temperature is not None:
            _check_positive("temperature", self.temperature)
        _check_positive("temperature_scale", self.temperature_scale)
        if self.antithetic and int(self.n_samples) < 3:
            # one antithetic pair: its two losses differ only by the odd-order terms
            # (sigma * g.eps with g the inner gradient, ~0 at the optimum), so the
            # adaptive temperature followed rounding and the weights' derivative was
            # huge: hypergradients of -3e8 to -6e10 against an exact -0.64, silently
            raise ValueError(
                f"EvoGrad: n_samples={self.n_samples!r} with antithetic=True draws a "
                "single antithetic pair, whose two losses differ only by rounding at an "
                "inner optimum: use n_samples >= 3 (at least two pairs) or "
                "antithetic=False."
            )
        phi0 = tree_detach(phi)
        theta_hat, res = solver.solve(
            lambda t: inner_loss(t, phi0), tree_detach(init), phi=phi0
        )
        theta_hat = tree_detach(theta_hat)
        info.inner_iterations = res.n_iter
        info.inner_grad_norm = None if math.isnan(res.grad_norm) else res.grad_norm
        info.inner_converged = res.converged
        info.n_grad += _solver_grads(res)
        info.n_hvp += getattr(res, "n_hvp", 0) or 0

        leaves, spec = tree_flatten(theta_hat)
        n = int(self.n_samples)
        n_draw = (n + 1) // 2 if self.antithetic else n
        if self.orthogonal and sum(t.numel() for t in leaves) > 1:
            eps = self._orthogonal_draws(n_draw, leaves)
        else:
            eps = [self._sampler.randn((n_draw,) + tuple(t.shape), t) for t in leaves]
        if self.antithetic:
            eps = [torch.cat([e, -e]) for e in eps]
        n = eps[0].shape[0]

        losses = []
        for k in range(n):
            theta_k = tree_unflatten(
                spec, [t + self.sigma * e[k] for t, e in zip(leaves, eps)]
            )
            losses.append(_scalar_loss(inner_loss(theta_k, phi)))
        losses = torch.stack(losses)
        finite = torch.isfinite(losses.detach())
        n_bad = int((~finite).sum())
        if n_bad == n:
            raise FloatingPointError(
                f"EvoGrad: the inner loss is not finite at any of the {n} perturbed "
                f"points (sigma={self.sigma:.3g}); lower sigma."
            )
        finite_losses = losses.detach()[finite]
        spread = float(finite_losses.max() - finite_losses.min())
        loss_std = float(finite_losses.std(correction=0))
        # Differences below a few ulps of the loss are rounding, not signal.
        noise = 10.0 * torch.finfo(losses.dtype).eps * float(finite_losses.abs().max())
        if self.temperature is not None:
            temperature = float(self.temperature)
        else:
            temperature = float(self.temperature_scale) * max(loss_std, noise)
            if not temperature > 0.0:  # every loss is exactly 0
                temperature = 1.0
        minus_inf = losses.new_tensor(-math.inf)
        logits = torch.where(finite, -losses / temperature, minus_inf)
        weights = torch.softmax(logits, dim=0)
        w_det = weights.detach()
        ess = float(1.0 / (w_det**2).sum())
        # sum_k w_k theta_k = theta_hat + sigma sum_k w_k eps_k (sum w = 1)
        # in the weights' dtype, then the leaf's (theta's leaves may differ)
        out = [
            t + (self.sigma * torch.tensordot(weights, e.to(weights.dtype), dims=1)).to(t.dtype)
            for t, e in zip(leaves, eps)
        ]
        info.n_grad += n  # backward: one pass through each of the n loss evaluations
        info.extra.update(
            n_samples=n,
            temperature=temperature,
            effective_sample_size=ess,
            loss_std=loss_std,
            loss_spread=spread,
            n_nonfinite=n_bad,
            shift_norm=math.sqrt(
                sum(float(((o.detach() - t) ** 2).sum()) for o, t in zip(out, leaves))
            ),
        )
        if n_bad:
            warnings.warn(
                f"EvoGrad: {n_bad} of {n} perturbed points have a non-finite inner "
                "loss and got weight 0; lower sigma.",
                HypergradientWarning,
                stacklevel=3,
            )
        if spread <= noise:
            warnings.warn(
                f"EvoGrad: the inner losses of the {n} perturbed points differ only "
                f"by rounding (spread {spread:.3e}, rounding level {noise:.3e}), so "
                f"the weights carry no information (sigma={self.sigma:.3g}); raise "
                "sigma or use float64.",
                HypergradientWarning,
                stacklevel=3,
            )
        elif ess < min(n / 2, max(3.0, n / 20)):
            advice = (
                "raise temperature or lower sigma" if self.temperature is not None
                else "raise temperature_scale (the losses have a heavy lower tail)"
            )
            warnings.warn(
                "EvoGrad: the weights collapsed on a few samples (effective sample "
                f"size {ess:.2f} of {n}; inner-loss std {loss_std:.3e}, spread "
                f"{spread:.3e} vs temperature {temperature:.3e}). The hypergradient "
                f"is mostly noise; {advice}.",
                HypergradientWarning,
                stacklevel=3,
            )
        return tree_unflatten(spec, out)
