"""Explicit (unrolled) hypergradient strategies.

The inner problem is "solved" by ``T`` steps of a differentiable optimizer
(:class:`~skbilevel.hypergrad.GradientDescent`, :class:`~skbilevel.hypergrad.Momentum`,
:class:`~skbilevel.hypergrad.Adam`), ``theta_{t+1} = Phi(theta_t, phi)``, and
the returned ``theta_T`` is differentiated *as computed*:

    d theta_T / d phi = sum_t (prod_{s>t} A_s) B_t,   A_s = dPhi/dtheta, B_t = dPhi/dphi

None of these strategies is exact for ``theta*(phi)``: they differentiate
the T-step approximation, which converges to the implicit hypergradient only
as ``T`` grows and the inner optimizer converges. What each one computes:

- :class:`UnrolledReverse` (``"reverse"``): the product above by reverse
  mode over the kept graph of all ``T`` steps; memory O(T d).
- :class:`TruncatedReverse` (``"truncated"``): only the last ``K`` factors
  (Shaban et al. 2019); memory O(K d).
- :class:`OneStepLookahead` (``"lookahead"``): one differentiable step from
  the current ``theta`` (Learning to Reweight, Meta-Weight-Net).
- :class:`UnrolledForward` (``"forward"``): the same value as reverse mode,
  carried forward as ``Z_t = d theta_t / d phi`` with Jacobian-vector
  products (Franceschi et al. 2017); memory O(m d) independent of ``T``,
  time O(m T) Hessian-vector products for ``m`` outer variables.
- :class:`FirstOrder` (``"first_order"``): ``A_s = I`` and ``B_t`` keeps
  only the explicit dependence of the update (learning rates), as in
  first-order MAML.
- :class:`FiniteDifferenceDARTS` (``"darts"``): one step, with the mixed
  second-order product replaced by a central finite difference of
  gradients (Liu et al. 2019).

The health record judges the returned ``theta_T`` as
:class:`~skbilevel.hypergrad.HypergradientInfo` says for a fixed-step
solver: ``info.inner_converged`` is whether the inner gradient norm there is
within the dtype's default tolerance (``1e-10`` in float64, ``1e-5`` in
float32). A finite but unconverged ``theta_T`` does not warn, since the
T-step map is what these strategies differentiate; a non-finite one (the
steps diverged, or the objective is not finite at the start) emits an
:class:`~skbilevel.hypergrad.InnerSolveWarning` with the step at which the
iterates failed and the gradient norms before it. So do finite iterates of
two steps or more that diverged: the inner objective ended above its value
at ``init`` and its gradient norm more than ten times larger
(``info.extra["diverged"]``). It does not raise as the
implicit strategies' solvers do: the non-finite outer loss it leads to is
what outer loops (``minimize_outer``, the estimators) detect and stop on.
"""

import copy
import math
import numbers
import warnings

import torch
import torch.autograd.forward_ad as fwAD

from ._base import (
    HypergradientStrategy,
    InnerSolveWarning,
    StepSolver,
    _all_finite,
    _check_positive,
    _grad_norm,
    _value_and_grad_norm,
    _within_tol,
    register_strategy,
)
from ._linear_solve import _default_tol
from ._steps import GradientDescent, GradientStepSolver, _per_leaf, _tree_grad
from ._tree import tree_detach, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "UnrolledReverse",
    "TruncatedReverse",
    "OneStepLookahead",
    "UnrolledForward",
    "FirstOrder",
    "FiniteDifferenceDARTS",
]

_NO_STATE = object()


# --------------------------------------------------------------------------- helpers


def _flatten_state(state):
    """Like :func:`tree_flatten`, also accepting ``None`` (no optimizer state)."""
    if state is None:
        return [], _NO_STATE
    return tree_flatten(state)


def _unflatten_state(spec, leaves):
    if spec is _NO_STATE:
        return None
    return tree_unflatten(spec, leaves)


def _detach_state(state):
    return None if state is None else tree_detach(state)


def _tensors_in(value):
    """Tensors inside a value that may be a tensor or a nested dict/list/tuple."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    return []


def _replace_tensors(value, mapping):
    """Copy of ``value`` with tensors replaced according to ``{id: new}``."""
    if isinstance(value, torch.Tensor):
        return mapping.get(id(value), value)
    if isinstance(value, dict):
        return {k: _replace_tensors(v, mapping) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_replace_tensors(v, mapping) for v in value]
        # (a namedtuple takes its fields one by one: "P.__new__() missing 1
        # required positional argument" for learned per-leaf step sizes)
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _hyper_leaves(phi, solver):
    """Outer variables seen by an unrolled loop: phi's leaves and tensor
    hyperparameters of the solver (learned learning rates) that require grad."""
    candidates = list(tree_flatten(phi)[0])
    if solver is not None:
        for value in vars(solver).values():
            candidates.extend(_tensors_in(value))
    leaves, seen = [], set()
    for t in candidates:
        if t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            leaves.append(t)
    return leaves


def _substitute(phi, solver, hyper, new):
    """``phi`` and ``solver`` with the tensors in ``hyper`` replaced by ``new``."""
    mapping = {id(h): n for h, n in zip(hyper, new)}
    leaves, spec = tree_flatten(phi)
    phi_new = tree_unflatten(spec, [mapping.get(id(t), t) for t in leaves])
    if solver is None:
        return phi_new, None
    names = [
        name
        for name, value in vars(solver).items()
        if any(id(t) in mapping for t in _tensors_in(value))
    ]
    if not names:
        return phi_new, solver
    solver_new = copy.copy(solver)
    for name in names:
        setattr(solver_new, name, _replace_tensors(getattr(solver, name), mapping))
    return phi_new, solver_new


def _check_step_solver(solver, strategy):
    if not isinstance(solver, StepSolver):
        raise ValueError(
            f"The {strategy.name!r} hypergradient strategy unrolls the steps of a "
            "StepSolver (GradientDescent, Momentum, Adam); got "
            f"{type(solver).__name__}. Pass solver=GradientDescent(lr=..., n_steps=...)."
        )


def _n_steps(strategy, solver):
    return solver.n_steps if strategy.n_steps is None else strategy.n_steps


def _check_optional_steps(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be None or a non-negative integer; got {value!r}.")
    return int(value)


class _BackwardCounter(torch.autograd.Function):
    """Identity on the returned parameters; counts the second-order products
    a reverse pass through the unrolled graph spends."""

    @staticmethod
    def forward(ctx, info, n_hvp, *leaves):
        ctx.info = info
        ctx.n_hvp = n_hvp
        return tuple(t.clone() for t in leaves)

    @staticmethod
    def backward(ctx, *grads):
        ctx.info.n_hvp += ctx.n_hvp
        return (None, None) + grads


def _count_backward(theta, info, n_hvp):
    leaves, spec = tree_flatten(theta)
    idx = [i for i, t in enumerate(leaves) if t.requires_grad]
    if not idx:
        return theta
    outs = _BackwardCounter.apply(info, n_hvp, *[leaves[i] for i in idx])
    leaves = list(leaves)
    for i, out in zip(idx, outs):
        leaves[i] = out
    return tree_unflatten(spec, leaves)


def _check_inner_flag(value):
    if not isinstance(value, bool):
        raise ValueError(f"check_inner must be True or False; got {value!r}.")
    return value


def _record_inner(info, fun, theta, n_steps, check_inner, strategy, solver, init):
    """Fill the inner-solve fields of ``info``; warn when ``theta`` is not finite.

    With ``check_inner``: the inner gradient norm at ``theta`` and the verdict
    ``info.inner_converged``, by the rule of a fixed-step solver (that norm
    within the dtype's default tolerance, ``info.extra["inner_tol"]``).
    Without it only the finiteness of ``theta`` is checked (no gradient), and
    ``inner_converged`` stays ``None`` unless that fails. An unconverged but
    finite result does not warn: a step budget is what these strategies
    differentiate. A non-finite one does
    (:class:`~skbilevel.hypergrad.InnerSolveWarning`, see
    :func:`_warn_not_finite`), and ``inner_converged`` is ``False``.
    """
    info.inner_iterations = n_steps
    info.n_grad += n_steps
    leaves = tree_flatten(theta)[0]
    finite = _all_finite(leaves)
    if check_inner:
        value, info.inner_grad_norm = _value_and_grad_norm(fun, theta)
        info.n_grad += 1
        tol = _default_tol(leaves[0].dtype)
        info.extra["inner_tol"] = tol
        info.inner_converged = finite and _within_tol(info.inner_grad_norm, tol)
        finite = finite and math.isfinite(info.inner_grad_norm) and math.isfinite(value)
        if finite and n_steps > 1:  # (one-step lookahead / DARTS: no extra pass)
            _check_diverging(info, fun, value, strategy, solver, init, n_steps)
    if not finite:
        info.inner_converged = False
        _warn_not_finite(info, fun, strategy, solver, init, n_steps)


def _check_diverging(info, fun, value, strategy, solver, init, n_steps):
    """Warn when finite iterates diverged: the inner objective rose over the
    steps and the inner gradient norm grew more than tenfold.

    Steps of a descent method that end above their start, and steeper, have
    diverged (``GradientDescent()``'s ``lr=0.1`` on a quadratic of curvature
    above 20: a gradient norm of 5e62 after 100 steps, a hypergradient of
    6e122, no warning). One forward pass at ``init``; the gradient there only
    when the objective rose. Not run for a single step (the one-step
    lookahead and DARTS approximations, called at every outer step).
    """
    with torch.no_grad():
        value0 = float(fun(tree_detach(init)))
    if not (math.isfinite(value0) and value > value0 + 1e-8 * abs(value0)):
        return
    grad0 = _grad_norm(fun, tree_detach(init))
    info.n_grad += 1
    if not info.inner_grad_norm > 10.0 * grad0:
        return
    info.inner_converged = False
    info.extra["diverged"] = True
    name, lr_text = _solver_and_lr(solver)
    warnings.warn(
        f"The {strategy.name!r} hypergradient comes from diverging inner steps: over "
        f"{n_steps} steps of {name}, the inner objective rose from {value0:.3e} to "
        f"{value:.3e} and its gradient norm from {grad0:.3e} to "
        f"{info.inner_grad_norm:.3e}. Lower the solver's {lr_text} (below 2 / the "
        "largest curvature of the inner objective for gradient descent).",
        InnerSolveWarning,
        stacklevel=5,  # the user's argmin call
    )


def _solver_and_lr(solver):
    """The solver's class name and its step size as a message shows it
    (``"lr=0.1"``, or ``"lr"`` when it has none or a tensor of several)."""
    lr = getattr(solver, "lr", None)
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = float(lr.detach())
    return type(solver).__name__, f"lr={lr:g}" if isinstance(lr, numbers.Real) else "lr"


def _replay(fun, solver, init, n_steps, info):
    """Rerun the steps from ``init`` without a graph, to find where they fail.

    Returns ``(step, value0, grad0, grad_last)``: the first step whose
    iterate or inner gradient is not finite (``0`` when the start fails: a
    non-finite objective, gradient or ``init``; ``None`` when none fails),
    the inner objective and its gradient norm at the start, and the gradient
    norm at the last step before ``step``. Run only once the result is known
    to be non-finite: it costs two gradients per step.
    """
    theta = tree_detach(init)
    with torch.no_grad():
        value0 = float(fun(theta))
    grad0 = _grad_norm(fun, theta)
    info.n_grad += 1
    if not (
        math.isfinite(value0)
        and math.isfinite(grad0)
        and _all_finite(tree_flatten(theta)[0])
    ):
        return 0, value0, grad0, None
    state = _detach_state(solver.init_state(theta))
    grad_last = grad0
    for k in range(1, n_steps + 1):
        with torch.enable_grad():
            theta = tree_map(lambda t: t.detach().requires_grad_(True), theta)
            theta, state = solver.step(fun, theta, state, create_graph=False)
        theta, state = tree_detach(theta), _detach_state(state)
        info.n_grad += 1
        norm = math.nan
        if _all_finite(tree_flatten(theta)[0]):
            norm = _grad_norm(fun, theta)
            info.n_grad += 1
        if not math.isfinite(norm):
            return k, value0, grad0, grad_last
        grad_last = norm
    return None, value0, grad0, grad_last


def _warn_not_finite(info, fun, strategy, solver, init, n_steps):
    """Emit :class:`InnerSolveWarning` for a non-finite unrolled result, with
    the step at which the iterates failed and the gradient norms before it."""
    step, value0, grad0, grad_last = _replay(fun, solver, init, n_steps, info)
    info.extra["nonfinite_step"] = step
    name, lr_text = _solver_and_lr(solver)
    if step == 0:
        what = (
            f"the inner objective is not finite at the starting point (value "
            f"{value0:.3e}, gradient norm {grad0:.3e}); check the data, phi and init"
        )
    elif step is None:
        what = (
            f"the result of {name}'s {n_steps} steps is not finite, although a "
            f"replay of them stayed finite (inner gradient norm {grad0:.3e} at the "
            f"start, {grad_last:.3e} at the end): is the inner loss random? A "
            f"lower {lr_text} may help"
        )
    else:
        what = (
            f"the inner gradient norm of {name}'s iterates went from {grad0:.3e} "
            f"at the start to {grad_last:.3e} at step {step - 1} and was not "
            f"finite at step {step} of {n_steps}: the steps diverge; lower the "
            f"solver's {lr_text}"
        )
    warnings.warn(
        f"The {strategy.name!r} hypergradient is not finite: {what}.",
        InnerSolveWarning,
        stacklevel=5,  # the user's argmin call
    )


# --------------------------------------------------------------------------- reverse


@register_strategy("reverse")
class UnrolledReverse(HypergradientStrategy):
    """Reverse-mode differentiation through ``T`` unrolled inner steps.

    Runs the solver's steps with ``create_graph=True`` and keeps the whole
    graph, so ``backward`` back-propagates through every step (memory grows
    linearly in ``T``). ``init`` may depend on ``phi`` (MAML: ``init = phi``)
    and the solver's hyperparameters may be tensors that require grad
    (learned learning rates); both receive their gradient.

    This is the exact derivative of the T-step map, never the exact
    hypergradient of ``theta*(phi)``: the bias vanishes only as the inner
    optimizer converges.

    Parameters
    ----------
    n_steps : int or None, default=None
        Number of steps; ``None`` uses ``solver.n_steps``.
    truncate : int or None, default=None
        Keep only the last ``K = truncate`` steps differentiable (truncated
        back-propagation, Shaban et al. 2019). The first ``T - K`` steps run
        without a graph; their result is linked to ``init`` by the identity
        (``theta_{T-K} = init + stopgrad(theta_{T-K} - init)``), so a
        phi-dependent ``init`` still gets the first-order part of its
        gradient. ``None`` keeps all steps.
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters in the
        health record (one extra gradient of the inner loss, the only work
        beyond the steps); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``, for hot loops that never read it.

    Notes
    -----
    A one-step look-ahead (Learning to Reweight, Ren et al. 2018;
    Meta-Weight-Net, Shu et al. 2019) is this strategy with one
    :class:`~skbilevel.hypergrad.GradientDescent` step started from the
    current (detached) ``theta``; see :class:`OneStepLookahead`.

    ``info.n_hvp`` is increased by the number of differentiable steps each
    time a backward pass runs through the result.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent
    >>> log_alpha = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, la):
    ...     return 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * la.exp() * (w ** 2).sum()
    >>> w, info = argmin(inner, log_alpha, torch.zeros(2, dtype=torch.float64),
    ...                  hypergradient="reverse", solver=GradientDescent(lr=0.5, n_steps=60))
    >>> w.detach()  # w* = 1 / (1 + exp(log_alpha))
    tensor([0.5000, 0.5000], dtype=torch.float64)
    >>> w.sum().backward()
    >>> round(log_alpha.grad.item(), 6)  # exact: -2 * e / (1 + e)^2 at 0
    -0.5
    >>> info.inner_iterations, info.n_hvp
    (60, 60)
    """

    name = "reverse"
    family = "unrolled"
    solver_kind = "step"

    def __init__(self, n_steps=None, truncate=None, check_inner=True):
        self.n_steps = _check_optional_steps(n_steps, "n_steps")
        self.truncate = _check_optional_steps(truncate, "truncate")
        self.check_inner = _check_inner_flag(check_inner)

    def default_solver(self):
        """``GradientDescent()``."""
        return GradientDescent()

    def argmin(self, inner_loss, phi, init, solver, info):
        _check_step_solver(solver, self)
        n_steps = _n_steps(self, solver)
        kept = n_steps if self.truncate is None else min(self.truncate, n_steps)

        def fun(theta):
            return inner_loss(theta, phi)

        theta = init
        state = solver.init_state(tree_detach(init))
        if kept < n_steps:
            theta, state = tree_detach(init), _detach_state(state)
            for _ in range(n_steps - kept):
                theta, state = solver.step(fun, theta, state, create_graph=False)
                theta, state = tree_detach(theta), _detach_state(state)
            # identity link to a phi-dependent init (first-order for the cut steps)
            theta = _straight_through(init, theta)
        for _ in range(kept):
            theta, state = solver.step(fun, theta, state, create_graph=True)
        _record_inner(info, fun, theta, n_steps, self.check_inner, self, solver, init)
        info.extra["differentiable_steps"] = kept
        if self.truncate is not None:
            info.extra["truncate"] = kept
        return _count_backward(theta, info, kept)


def _straight_through(init, theta):
    """Value of ``theta``, derivative of ``init`` (identity Jacobian)."""
    init_leaves, spec = tree_flatten(init)
    leaves, _ = tree_flatten(theta)
    out = [
        i + (t - i.detach()) if i.requires_grad else t for i, t in zip(init_leaves, leaves)
    ]
    return tree_unflatten(spec, out)


@register_strategy("truncated")
class TruncatedReverse(UnrolledReverse):
    """Truncated back-propagation: reverse mode through the last ``K`` steps only.

    Shaban et al. (2019): run ``T`` steps, keep the graph of the last
    ``K = truncate``; the first ``T - K`` steps are treated as constants
    (their dependence on phi and on learned learning rates is dropped; a
    phi-dependent ``init`` keeps an identity link). Memory O(K d). Biased
    even at a converged inner solve unless ``K`` is large; never exact.
    ``info.extra["truncate"]`` records the ``K`` used (``min(truncate, T)``).

    Parameters
    ----------
    truncate : int, default=10
        Number of differentiable final steps ``K``.
    n_steps : int or None, default=None
        Total number of steps ``T``; ``None`` uses ``solver.n_steps``.
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters (one
        extra inner gradient); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent, TruncatedReverse
    >>> phi = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    >>> inner = lambda w, p: 0.5 * ((w - p) ** 2).sum()
    >>> w, info = argmin(inner, phi, torch.zeros(1, dtype=torch.float64),
    ...                  hypergradient=TruncatedReverse(truncate=2),
    ...                  solver=GradientDescent(lr=0.5, n_steps=20))
    >>> w.sum().backward()
    >>> phi.grad.item()  # 1 - 0.5**2: only the last two steps are seen
    0.75
    >>> info.extra["truncate"]
    2
    """

    name = "truncated"

    def __init__(self, truncate=10, n_steps=None, check_inner=True):
        if truncate is None:
            raise ValueError("TruncatedReverse needs an integer truncate (K >= 0).")
        super().__init__(n_steps=n_steps, truncate=truncate, check_inner=check_inner)


@register_strategy("lookahead")
class OneStepLookahead(UnrolledReverse):
    """One differentiable inner step from the current ``theta``.

    ``theta' = theta - lr * grad_theta f(theta, phi)`` with ``theta = init``
    (pass it detached: the current model parameters), differentiated in
    reverse mode. This is the meta-step of Learning to Reweight (Ren et al.
    2018) and Meta-Weight-Net (Shu et al. 2019): with ``phi`` the sample
    weights, ``dF(theta')/dphi = -lr * d^2 f / (dphi dtheta) . grad F``.
    Same as ``UnrolledReverse(n_steps=1)`` with a
    :class:`~skbilevel.hypergrad.GradientDescent` solver; an approximation,
    never exact.

    Parameters
    ----------
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters (one
        extra inner gradient); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``.

    Examples
    --------
    Per-sample weights of a mean; the look-ahead gradient says which samples
    pull the parameter towards the validation target.

    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent
    >>> x = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    >>> weights = torch.ones(3, dtype=torch.float64, requires_grad=True)
    >>> inner = lambda w, eps: 0.5 * (eps * (w - x) ** 2).sum()
    >>> w, info = argmin(inner, weights, torch.zeros(1, dtype=torch.float64),
    ...                  hypergradient="lookahead", solver=GradientDescent(lr=0.1))
    >>> ((w - 1.0) ** 2).sum().backward()
    >>> weights.grad  # -lr * (w - x_i) * 2 (w' - 1) with w = 0, w' = 0.5
    tensor([ 0.0000, -0.1000, -0.4000], dtype=torch.float64)
    """

    name = "lookahead"

    def __init__(self, check_inner=True):
        super().__init__(n_steps=1, check_inner=check_inner)


# --------------------------------------------------------------------------- forward


class _ForwardModeOutput(torch.autograd.Function):
    """Returns ``theta_T``; its backward is ``Z_T^T g`` split over the outer
    variables (``Z_T = d theta_T / d phi`` computed in forward mode)."""

    @staticmethod
    def forward(ctx, tangents, theta_leaves, *hyper):
        ctx.tangents = tangents
        ctx.shapes = [(h.shape, h.dtype) for h in hyper]
        return tuple(t.clone() for t in theta_leaves)

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for z, g in zip(ctx.tangents, grads):
            if g is None:
                continue
            contrib = z.reshape(z.shape[0], -1) @ g.reshape(-1).to(z.dtype)
            total = contrib if total is None else total + contrib
        out, start = [], 0
        for shape, dtype in ctx.shapes:
            n = math.prod(shape)
            out.append(total[start : start + n].reshape(shape).to(dtype))
            start += n
        return (None, None) + tuple(out)


def _direction_basis(hyper, m):
    """Tangents of the outer variables for the ``m`` unit directions."""
    basis, start = [], 0
    for h in hyper:
        n = h.numel()
        e = h.new_zeros((m, n))
        e[start : start + n] = torch.eye(n, dtype=h.dtype, device=h.device)
        basis.append(e.reshape((m,) + tuple(h.shape)))
        start += n
    return basis


class _Batching:
    """Vectorizes ``autograd.grad`` over directions (``is_grads_batched``),
    falling back to a loop, once and on the record, where an operator has no
    batching rule."""

    def __init__(self, info):
        self.info = info
        self.batched = True

    def grad(self, outputs, inputs, tangents):
        """``[sum_k d<outputs_k, tangents_k>/d inputs_i]`` for each batched direction."""
        if self.batched:
            try:
                return torch.autograd.grad(
                    outputs,
                    inputs,
                    grad_outputs=tangents,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            except (RuntimeError, NotImplementedError) as exc:
                self.batched = False
                self.info.fallback = (
                    "forward mode: Jacobian-vector products computed one direction "
                    f"at a time (batched autograd failed: {_first_line(exc)})"
                )
        m = tangents[0].shape[0]
        rows = [
            torch.autograd.grad(
                outputs,
                inputs,
                grad_outputs=[t[j] for t in tangents],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
            for j in range(m)
        ]
        return [torch.stack([row[i] for row in rows]) for i in range(len(inputs))]


def _first_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _jvp_by_double_vjp(outputs, inputs, tangents, batching):
    """``J v`` for each batched direction ``v``, from reverse mode only.

    ``J^T u`` is linear in ``u``, so ``J v = d <J^T u, v> / du``: one vjp
    with ``create_graph=True`` and then one batched vjp of that. Returns one
    tensor ``(m, *output.shape)`` per output (zeros where an output is
    constant).
    """
    m = tangents[0].shape[0]
    live = [i for i, o in enumerate(outputs) if o.requires_grad]
    result = [o.new_zeros((m,) + tuple(o.shape)) for o in outputs]
    if not live:
        return result
    with torch.enable_grad():
        us = [torch.zeros_like(outputs[i]).requires_grad_(True) for i in live]
        jtu = torch.autograd.grad(
            [outputs[i] for i in live],
            inputs,
            grad_outputs=us,
            create_graph=True,
            allow_unused=True,
        )
        pairs = [(j, v) for j, v in zip(jtu, tangents) if j is not None and j.requires_grad]
        if not pairs:
            return result
        jv = batching.grad([j for j, _ in pairs], us, [v for _, v in pairs])
    for i, z in zip(live, jv):
        result[i] = z.detach()
    return result


def _init_tangent(init_leaves, hyper, basis, batching):
    """``Z_0 = d init / d phi`` for every unit direction (zero if init is constant)."""
    m = basis[0].shape[0]
    req = [i for i, t in enumerate(init_leaves) if t.requires_grad]
    tangents = [t.new_zeros((m,) + tuple(t.shape)) for t in init_leaves]
    if req:
        z = _jvp_by_double_vjp([init_leaves[i] for i in req], hyper, basis, batching)
        for i, zi in zip(req, z):
            tangents[i] = zi
    return tangents


@register_strategy("forward")
class UnrolledForward(HypergradientStrategy):
    """Forward-mode differentiation of ``T`` unrolled inner steps.

    Carries ``Z_t = d theta_t / d phi`` (and the tangents of the optimizer
    state) along the steps (Franceschi et al. 2017),
    ``Z_{t+1} = A_t Z_t + B_t``, as Jacobian-vector products of the step map
    ``(theta_t, state_t, phi) -> (theta_{t+1}, state_{t+1})``, one per
    outer-variable direction. Memory is O(m d) for ``m`` outer variables
    and independent of ``T``; time is about ``T * m`` Hessian-vector
    products (``info.n_hvp``), so it suits few outer variables and long
    inner runs. The value equals :class:`UnrolledReverse` up to rounding.
    ``theta_T`` is returned through an autograd function whose backward is
    ``Z_T^T g``.

    Gradients flow to the leaves of ``phi`` and to tensor hyperparameters of
    the solver that require grad (learned learning rates). ``init`` may
    depend on those (MAML); ``Z_0 = d init / d phi`` is then included.
    Dependence of ``init`` on any other tensor is not differentiated.

    Like every unrolled strategy this differentiates the T-step map, not
    ``theta*(phi)``: never exact.

    Parameters
    ----------
    n_steps : int or None, default=None
        Number of steps; ``None`` uses ``solver.n_steps``.
    method : {"double_vjp", "jvp", "dual"}, default="double_vjp"
        How the Jacobian-vector products of one step are computed:

        - ``"double_vjp"``: from reverse mode, ``J v = d <J^T u, v> / du``,
          all ``m`` directions batched (``is_grads_batched``); works with any
          :class:`~skbilevel.hypergrad.StepSolver` and was the fastest here
          on CPU (torch's forward-mode formulas for backward operators run
          through Python decompositions).
        - ``"jvp"``: ``torch.func.vmap`` over ``torch.func.jvp`` of a
          ``torch.func.grad`` step; needs a
          :class:`~skbilevel.hypergrad.GradientStepSolver` and an inner loss
          that runs under ``torch.func`` (falls back to ``"double_vjp"``
          otherwise, noted in ``info.fallback``).
        - ``"dual"``: forward-over-reverse dual tensors
          (``torch.autograd.forward_ad``) through ``solver.step``, one
          direction at a time.
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters (one
        extra inner gradient); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent
    >>> log_alpha = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    >>> def inner(w, la):
    ...     return 0.5 * ((w - 1.0) ** 2).sum() + 0.5 * la.exp() * (w ** 2).sum()
    >>> w, info = argmin(inner, log_alpha, torch.zeros(2, dtype=torch.float64),
    ...                  hypergradient="forward", solver=GradientDescent(lr=0.5, n_steps=60))
    >>> w.sum().backward()
    >>> round(log_alpha.grad.item(), 6)
    -0.5
    >>> info.extra["n_directions"], info.extra["method"]
    (1, 'double_vjp')
    """

    name = "forward"
    family = "unrolled"
    solver_kind = "step"
    _methods = ("double_vjp", "jvp", "dual")

    def __init__(self, n_steps=None, method="double_vjp", check_inner=True):
        self.n_steps = _check_optional_steps(n_steps, "n_steps")
        if method not in self._methods:
            raise ValueError(f"method must be one of {self._methods}; got {method!r}.")
        self.method = method
        self.check_inner = _check_inner_flag(check_inner)

    def default_solver(self):
        """``GradientDescent()``."""
        return GradientDescent()

    def argmin(self, inner_loss, phi, init, solver, info):
        _check_step_solver(solver, self)
        n_steps = _n_steps(self, solver)
        hyper = _hyper_leaves(phi, solver)
        m = sum(h.numel() for h in hyper)
        init_leaves, spec = tree_flatten(init)
        theta = [t.detach() for t in init_leaves]
        state, state_spec = _flatten_state(_detach_state(solver.init_state(tree_detach(init))))

        def fun(th):
            return inner_loss(th, phi)

        info.extra["n_directions"] = m
        if m == 0:
            th, st = tree_unflatten(spec, theta), _unflatten_state(state_spec, state)
            for _ in range(n_steps):
                th, st = solver.step(fun, th, st, create_graph=False)
                th, st = tree_detach(th), _detach_state(st)
            info.extra["method"] = None
            _record_inner(info, fun, th, n_steps, self.check_inner, self, solver, init)
            return th

        batching = _Batching(info)
        basis = _direction_basis([h.detach() for h in hyper], m)
        z_theta = _init_tangent(init_leaves, hyper, basis, batching)
        z_state = [
            s.new_zeros((m,) + tuple(s.shape)) if torch.is_floating_point(s) else None
            for s in state
        ]
        problem = (inner_loss, phi, solver, hyper, basis, spec, state_spec, n_steps)
        method = self.method
        result = None
        if method == "jvp":
            pure = (
                isinstance(solver, GradientStepSolver)
                and type(solver).step is GradientStepSolver.step
                and all(z is not None for z in z_state)
            )
            if pure:
                try:
                    result = _forward_func_jvp(theta, state, z_theta, z_state, *problem)
                except (RuntimeError, NotImplementedError) as exc:
                    reason = f"the torch.func path failed ({_first_line(exc)})"
            else:
                reason = (
                    f"{type(solver).__name__} is not a GradientStepSolver with a pure "
                    "update() and floating-point state"
                )
            if result is None:
                info.fallback = f"forward mode by double vjp: {reason}"
                method = "double_vjp"
        if method == "dual":
            result = _forward_dual(theta, state, z_theta, z_state, *problem)
        elif method == "double_vjp":
            result = _forward_double_vjp(theta, state, z_theta, z_state, *problem, batching)
        info.extra["method"] = method
        theta, z_theta = result
        theta_tree = tree_unflatten(spec, theta)
        _record_inner(
            info, fun, theta_tree, n_steps, self.check_inner, self, solver, init
        )
        info.n_hvp += n_steps * (m + 1 if method == "double_vjp" else m)
        out = _ForwardModeOutput.apply(z_theta, theta, *hyper)
        return tree_unflatten(spec, list(out))


def _forward_double_vjp(
    theta, state, z_theta, z_state, inner_loss, phi, solver, hyper, basis, spec,
    state_spec, n_steps, batching
):
    """Tangents carried with reverse-mode-only JVPs of ``solver.step``."""
    floating = [z is not None for z in z_state]
    n_theta = len(theta)
    for _ in range(n_steps):
        with torch.enable_grad():
            th = [t.detach().requires_grad_(True) for t in theta]
            st = [s.detach().requires_grad_(True) if f else s for s, f in zip(state, floating)]
            hy = [h.detach().requires_grad_(True) for h in hyper]
            phi_s, solver_s = _substitute(phi, solver, hyper, hy)
            new_theta, new_state = solver_s.step(
                lambda t: inner_loss(t, phi_s),
                tree_unflatten(spec, th),
                _unflatten_state(state_spec, st),
                create_graph=True,
            )
            outs_theta = tree_flatten(new_theta)[0]
            outs_state = _flatten_state(new_state)[0]
            outs = outs_theta + [s for s, f in zip(outs_state, floating) if f]
            inputs = th + [s for s, f in zip(st, floating) if f] + hy
            tangents = z_theta + [z for z in z_state if z is not None] + basis
            z_out = _jvp_by_double_vjp(outs, inputs, tangents, batching)
        theta = [t.detach() for t in outs_theta]
        state = [s.detach() for s in outs_state]
        z_theta = z_out[:n_theta]
        rest = iter(z_out[n_theta:])
        z_state = [next(rest) if f else None for f in floating]
    return theta, z_theta


def _forward_func_jvp(
    theta, state, z_theta, z_state, inner_loss, phi, solver, hyper, basis, spec,
    state_spec, n_steps
):
    """All directions at once: vmap over jvp of a torch.func step map."""

    def step_map(theta_l, state_l, hyper_l):
        phi_s, solver_s = _substitute(phi, solver, hyper, hyper_l)
        th = tree_unflatten(spec, theta_l)
        grad = torch.func.grad(lambda t: inner_loss(t, phi_s).reshape(()))(th)
        new_theta, new_state = solver_s.update(th, grad, _unflatten_state(state_spec, state_l))
        return tree_flatten(new_theta)[0], _flatten_state(new_state)[0]

    hyper_p = [h.detach() for h in hyper]
    for _ in range(n_steps):

        def tangent_map(zt, zs, zh, theta=theta, state=state):
            return torch.func.jvp(step_map, (theta, state, hyper_p), (zt, zs, zh))

        (theta, state), (z_theta, z_state) = torch.func.vmap(
            tangent_map, out_dims=((None, None), (0, 0)), randomness="same"
        )(z_theta, z_state, basis)
        theta, state = list(theta), list(state)
        z_theta, z_state = list(z_theta), list(z_state)
    return theta, z_theta


def _forward_dual(
    theta, state, z_theta, z_state, inner_loss, phi, solver, hyper, basis, spec,
    state_spec, n_steps
):
    """One direction at a time: dual tensors through ``solver.step`` with
    ``create_graph=True`` (forward-over-reverse)."""
    m = basis[0].shape[0]
    hyper_p = [h.detach() for h in hyper]
    for _ in range(n_steps):
        new_z_theta = [torch.empty_like(z) for z in z_theta]
        new_z_state = [None if z is None else torch.empty_like(z) for z in z_state]
        for j in range(m):
            with fwAD.dual_level():
                th_d = [
                    fwAD.make_dual(t.detach().requires_grad_(True), z[j])
                    for t, z in zip(theta, z_theta)
                ]
                st_d = [
                    s if z is None else fwAD.make_dual(s, z[j]) for s, z in zip(state, z_state)
                ]
                hy_d = [fwAD.make_dual(h, e[j]) for h, e in zip(hyper_p, basis)]
                phi_d, solver_d = _substitute(phi, solver, hyper, hy_d)
                new_theta, new_state = solver_d.step(
                    lambda t: inner_loss(t, phi_d),
                    tree_unflatten(spec, th_d),
                    _unflatten_state(state_spec, st_d),
                    create_graph=True,
                )
                outs = [fwAD.unpack_dual(x) for x in tree_flatten(new_theta)[0]]
                souts = [fwAD.unpack_dual(x) for x in _flatten_state(new_state)[0]]
                for i, (_, tan) in enumerate(outs):
                    new_z_theta[i][j] = 0 if tan is None else tan.detach()
                for i, (_, tan) in enumerate(souts):
                    if new_z_state[i] is not None:
                        new_z_state[i][j] = 0 if tan is None else tan.detach()
                if j == m - 1:
                    next_theta = [p.detach() for p, _ in outs]
                    next_state = [p.detach() for p, _ in souts]
        theta, state = next_theta, next_state
        z_theta, z_state = new_z_theta, new_z_state
    return theta, z_theta


# --------------------------------------------------------------------------- first order


@register_strategy("first_order")
class FirstOrder(HypergradientStrategy):
    """First-order unrolling: every inner gradient is treated as a constant.

    Runs the steps with ``theta_{t+1} = update(theta_t, stopgrad(g_t))``,
    so ``d theta_T / d theta_0 = I`` and all second-order terms are dropped:
    with ``init = phi`` this is first-order MAML (Finn et al. 2017) and the
    meta-gradient is ``grad F(theta_T)``; the dependence of the inner
    gradients on phi (an inner regularization strength, say) is dropped too,
    so such hyperparameters get no gradient. Tensor learning rates keep the
    explicit part of their gradient (``-sum_t g_t``). Costs no second-order
    products; an approximation, never exact.

    Parameters
    ----------
    n_steps : int or None, default=None
        Number of steps; ``None`` uses ``solver.n_steps``.
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters (one
        extra inner gradient); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent
    >>> phi = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    >>> inner = lambda w, p: ((w - 5.0) ** 2).sum()
    >>> w, info = argmin(inner, phi, phi, hypergradient="first_order",
    ...                  solver=GradientDescent(lr=0.25, n_steps=1))
    >>> w  # 2 - 0.25 * 2 * (2 - 5)
    tensor([3.5000], dtype=torch.float64, grad_fn=<SubBackward0>)
    >>> (w ** 2).sum().backward()
    >>> phi.grad  # grad F(w) = 2 w, without the (1 - 2 * 0.25) factor
    tensor([7.], dtype=torch.float64)
    """

    name = "first_order"
    family = "unrolled"
    solver_kind = "step"

    def __init__(self, n_steps=None, check_inner=True):
        self.n_steps = _check_optional_steps(n_steps, "n_steps")
        self.check_inner = _check_inner_flag(check_inner)

    def default_solver(self):
        """``GradientDescent()``."""
        return GradientDescent()

    def argmin(self, inner_loss, phi, init, solver, info):
        _check_step_solver(solver, self)
        n_steps = _n_steps(self, solver)

        def fun(theta):
            return inner_loss(theta, phi)

        theta, state = init, solver.init_state(tree_detach(init))
        for _ in range(n_steps):
            theta, state = solver.step(fun, theta, state, create_graph=False)
        _record_inner(info, fun, theta, n_steps, self.check_inner, self, solver, init)
        return theta


# --------------------------------------------------------------------------- DARTS


class _FiniteDifferenceMixedTerm(torch.autograd.Function):
    """Zero in the forward pass; in the backward pass maps the cotangent
    ``g`` of ``theta'`` to ``-(grad_phi f(theta + d v) - grad_phi f(theta - d v)) / (2 d)``
    with ``v = lr * g`` and ``d = radius / ||v||``."""

    @staticmethod
    def forward(ctx, problem, *hyper):
        ctx.problem = problem
        return tuple(torch.zeros_like(t) for t in problem["theta"])

    @staticmethod
    def backward(ctx, *grads):
        p = ctx.problem
        hyper = p["hyper"]
        direction = [lr * g for lr, g in zip(p["lrs"], grads)]
        norm = math.sqrt(sum(float((v.detach() ** 2).sum()) for v in direction))
        if norm == 0.0:
            return (None,) + tuple(torch.zeros_like(h) for h in hyper)
        delta = p["radius"] / norm
        with torch.enable_grad():
            copies = [h.detach().requires_grad_(True) for h in hyper]
            phi_c, _ = _substitute(p["phi"], None, hyper, copies)
            diffs = []
            for sign in (1.0, -1.0):
                shifted = [t + sign * delta * v.detach() for t, v in zip(p["theta"], direction)]
                value = p["inner_loss"](tree_unflatten(p["spec"], shifted), phi_c)
                diffs.append(
                    torch.autograd.grad(value, copies, allow_unused=True, materialize_grads=True)
                )
        info = p["info"]
        info.n_grad += 2
        info.extra["fd_epsilon"] = delta
        return (None,) + tuple(-(gp - gm) / (2.0 * delta) for gp, gm in zip(*diffs))


@register_strategy("darts")
class FiniteDifferenceDARTS(HypergradientStrategy):
    """DARTS second-order approximation with a finite-difference mixed product.

    Liu et al. (2019): one unrolled step from the current parameters
    ``theta = init`` (treated as a constant; pass it detached),

        theta' = theta - xi * grad_theta f(theta, phi),

    where ``xi`` is the solver's learning rate. The hypergradient of an
    outer loss ``F(theta', phi)`` is

        dF/dphi = dF/dphi|direct - xi * d^2 f / (dphi dtheta) (theta) . g,
        g = dF/dtheta',

    and the mixed second-order product is replaced by a central difference
    of gradients,

        d^2 f / (dphi dtheta) . v
            ~ (grad_phi f(theta + eps v) - grad_phi f(theta - eps v)) / (2 eps),

    with ``v = xi * g`` and ``eps = epsilon / ||v||``: the parameters move
    by exactly ``epsilon`` (Liu et al.'s ``0.01 / ||g||`` on ``g``). What is
    approximated: (1) ``theta*(phi)`` by one gradient step (as in every
    look-ahead); (2) the mixed product by a difference with O(epsilon^2)
    error (exact when ``grad_phi f`` is quadratic in ``theta``); (3) any
    dependence of ``theta`` itself on ``phi`` is ignored. The direct term is
    added by autograd. Costs two extra inner gradients per backward pass
    (``info.n_grad``), no Hessian-vector product. Never exact.

    Parameters
    ----------
    epsilon : float, default=0.01
        Norm of the parameter perturbation used by the finite difference.
    check_inner : bool, default=True
        Record the inner-gradient norm at the returned parameters (one
        extra inner gradient); ``False`` leaves ``info.inner_grad_norm`` at
        ``None``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import argmin, GradientDescent
    >>> alpha = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    >>> inner = lambda w, a: 0.5 * a * (w ** 2).sum() - w.sum()
    >>> w, info = argmin(inner, alpha, torch.ones(1, dtype=torch.float64),
    ...                  hypergradient="darts", solver=GradientDescent(lr=0.1))
    >>> w.sum().backward()
    >>> round(alpha.grad.item(), 8)  # exact one-step value: -xi * w = -0.1
    -0.1
    """

    name = "darts"
    family = "unrolled"
    solver_kind = "step"

    def __init__(self, epsilon=0.01, check_inner=True):
        # (numpy scalars were refused, and epsilon=True passed as 1)
        self.epsilon = _check_positive(epsilon, "epsilon", allow_none=False)
        self.check_inner = _check_inner_flag(check_inner)

    def default_solver(self):
        """``GradientDescent()`` (only its ``lr`` is used: one step)."""
        return GradientDescent()

    def argmin(self, inner_loss, phi, init, solver, info):
        if not isinstance(solver, GradientDescent):
            raise ValueError(
                "The 'darts' strategy approximates one plain gradient step; pass "
                f"solver=GradientDescent(lr=xi), not {type(solver).__name__}."
            )
        theta = tree_detach(init)
        leaves, spec = tree_flatten(theta)

        def fun(th):
            return inner_loss(th, phi)

        _, grad = _tree_grad(fun, theta, create_graph=False)
        grads = tree_flatten(grad)[0]
        lrs = _per_leaf(solver.lr, theta, "lr")
        new = [t - lr * g for t, g, lr in zip(leaves, grads, lrs)]
        hyper = [h for h in _hyper_leaves(phi, None)]
        if hyper:
            problem = {
                "inner_loss": inner_loss,
                "phi": phi,
                "hyper": hyper,
                "theta": leaves,
                "spec": spec,
                "lrs": [lr.detach() if isinstance(lr, torch.Tensor) else lr for lr in lrs],
                "radius": self.epsilon,
                "info": info,
            }
            corrections = _FiniteDifferenceMixedTerm.apply(problem, *hyper)
            new = [n + c for n, c in zip(new, corrections)]
        theta_next = tree_unflatten(spec, new)
        info.extra["fd_perturbation_norm"] = self.epsilon
        _record_inner(info, fun, theta_next, 1, self.check_inner, self, solver, init)
        return theta_next
