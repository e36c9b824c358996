"""Differentiable inner-optimizer steps for the unrolled strategies.

Each solver here is a :class:`~skbilevel.hypergrad.StepSolver` whose step is
a pure function of ``(theta, state)``:

    g = grad fun(theta)
    theta_next, state_next = update(theta, g, state)

With ``create_graph=True`` the gradient is itself differentiable, so the
whole trajectory ``theta_0 -> theta_T`` can be differentiated in reverse
mode (keep the graph) or in forward mode (carry Jacobian-vector products).
The hyperparameters of the update (``lr``, ``momentum``, ``betas``, ``eps``)
may be plain numbers or tensors that require grad: a learned learning rate,
or one learning rate per parameter as in Meta-SGD (``lr`` a tree shaped like
``theta``), receives a hypergradient like any outer variable.

The update rules follow ``torch.optim.SGD`` and ``torch.optim.Adam`` (without
weight decay; put it in the inner loss instead) so that an unrolled loop
reproduces an ordinary training loop step for step.
"""

import math
import numbers
import warnings

import torch

from ._base import (
    InnerSolveWarning,
    SolveResult,
    StepSolver,
    _all_finite,
    _scalar_loss,
    _value_and_grad_norm,
    _within_tol,
)
from ._linear_solve import _default_tol
from ._solvers import _check_start, _check_theta0
from ._tree import tree_detach, tree_flatten, tree_unflatten

__all__ = ["GradientStepSolver", "GradientDescent", "Momentum", "Adam"]

#: how a StepSolver's SolveResult.message starts when its iterates ended
#: non-finite (it has warned then: see GradientStepSolver.solve)
_DIVERGED = "the iterates diverged"


def _tree_grad(fun, theta, create_graph):
    """Return ``(theta_used, grad)``: the gradient of ``fun`` at ``theta`` as a tree.

    With ``create_graph=True`` the gradient is differentiable and
    ``theta_used`` is ``theta`` itself (leaves that did not require grad are
    replaced by fresh leaves that do, so ``autograd.grad`` can run). With
    ``create_graph=False`` the gradient is taken at a detached copy, so it
    carries no graph at all while ``theta_used`` keeps whatever graph
    ``theta`` had (the first-order strategy relies on this).
    """
    leaves, spec = tree_flatten(theta)
    if create_graph:
        used = [t if t.requires_grad else t.detach().requires_grad_(True) for t in leaves]
        inputs = used
    else:
        used = leaves
        inputs = [t.detach().requires_grad_(True) for t in leaves]
    with torch.enable_grad():
        value = _scalar_loss(fun(tree_unflatten(spec, inputs)))
        if value.requires_grad:
            grads = torch.autograd.grad(
                value,
                inputs,
                create_graph=create_graph,
                allow_unused=True,
                materialize_grads=True,
            )
        else:
            # a loss that does not depend on theta has a zero gradient, as LBFGS
            # and NewtonCG take it (autograd raised "element 0 of tensors does
            # not require grad and does not have a grad_fn")
            grads = [torch.zeros_like(t) for t in inputs]
    return tree_unflatten(spec, used), tree_unflatten(spec, list(grads))


def _lr_text(solver):
    """The solver's step size as a message names it: ``"lr (now 10)"``, or
    ``"step size"`` when it has none or a tensor of several."""
    lr = getattr(solver, "lr", None)
    if isinstance(lr, torch.Tensor) and lr.numel() == 1:
        lr = float(lr.detach())
    if isinstance(lr, numbers.Real) and not isinstance(lr, bool):
        return f"lr (now {lr:g})"
    return "lr" if lr is not None else "step size"


def _per_leaf(value, tree, name):
    """Broadcast a hyperparameter to one value per leaf of ``tree``.

    ``value`` is a number or tensor (shared by all leaves) or a dict / list /
    tuple with the structure of ``tree`` (one value per leaf, each a number
    or a tensor broadcastable to the leaf).
    """
    if isinstance(value, dict):
        if not isinstance(tree, dict) or set(value) != set(tree):
            raise ValueError(
                f"{name} given as a dict must have the keys of theta "
                f"({sorted(map(str, tree)) if isinstance(tree, dict) else 'theta is not a dict'}); "
                f"got keys {sorted(map(str, value))}."
            )
        return [v for key in tree for v in _per_leaf(value[key], tree[key], name)]
    if isinstance(value, (list, tuple)):
        if not isinstance(tree, (list, tuple)) or len(value) != len(tree):
            raise ValueError(
                f"{name} given as a {type(value).__name__} of length {len(value)} "
                "must match the structure of theta."
            )
        return [v for sub_v, sub_t in zip(value, tree) for v in _per_leaf(sub_v, sub_t, name)]
    leaves = tree_flatten(tree)[0]
    if isinstance(value, torch.Tensor) and value.ndim:
        for leaf in leaves:
            try:
                ok = torch.broadcast_shapes(value.shape, leaf.shape) == leaf.shape
            except RuntimeError:
                ok = False
            if not ok:
                # (torch's "The size of tensor a (4) must match the size of tensor b
                # (2)" from inside a step)
                raise ValueError(
                    f"{name} given as a tensor of shape {tuple(value.shape)} must be "
                    f"broadcastable to every leaf of theta; a leaf has shape "
                    f"{tuple(leaf.shape)}. Give a scalar, or a dict / list with one "
                    "value per leaf."
                )
    return [value] * len(leaves)


def _check_positive_tree(value, name):
    """Validate numbers inside a (tree of) hyperparameter(s); tensors pass."""
    if isinstance(value, dict):
        for v in value.values():
            _check_positive_tree(v, name)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_positive_tree(v, name)
    elif isinstance(value, torch.Tensor):
        if not torch.is_floating_point(value):
            raise ValueError(f"{name} must be a floating-point tensor; got {value.dtype}.")
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number; got {value!r}.")
    else:
        raise ValueError(
            f"{name} must be a positive number, a tensor, or a dict/list/tuple of "
            f"them shaped like theta; got {type(value).__name__}."
        )


def _check_unit_interval(value, name):
    """Validate a number in [0, 1); tensors pass."""
    if isinstance(value, torch.Tensor):
        return
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}.")


def _check_n_steps(n_steps):
    if (
        not isinstance(n_steps, numbers.Integral)
        or isinstance(n_steps, bool)
        or n_steps < 0
    ):
        raise ValueError(f"n_steps must be a non-negative integer; got {n_steps!r}.")
    return int(n_steps)


def _zeros_like_tree(theta):
    leaves, spec = tree_flatten(theta)
    return tree_unflatten(spec, [torch.zeros_like(t) for t in leaves])


def _safe_sqrt(x):
    """``sqrt(x)`` whose derivative at ``x = 0`` is 0 instead of inf.

    Adam divides by ``sqrt(v)``; a parameter with an exactly zero gradient
    has ``v = 0`` and the plain derivative would turn the hypergradient into
    NaN (``inf * 0``). The double ``where`` keeps both values and gradients
    finite and is exact wherever ``x > 0``.
    """
    positive = x > 0
    root = torch.sqrt(torch.where(positive, x, torch.ones_like(x)))
    return torch.where(positive, root, torch.zeros_like(x))


class GradientStepSolver(StepSolver):
    """A step solver whose step is ``update(theta, grad fun(theta), state)``.

    Subclasses implement :meth:`update`, a pure tensor function of the
    parameters, their gradient and the optimizer state (no in-place
    operations). That split lets :class:`~skbilevel.hypergrad.UnrolledForward`
    take the gradient with ``torch.func`` and vectorize Jacobian-vector
    products over all hyperparameter directions at once.

    Hyperparameters are stored as plain attributes; any attribute that is a
    tensor (or a dict / list / tuple holding tensors) requiring grad is
    treated as an outer variable by the unrolled strategies.

    Parameters
    ----------
    n_steps : int, default=100
        Number of steps.

    Examples
    --------
    A hand-written update rule (sign descent) plugs into the unrolled
    strategies without writing any differentiation code:

    >>> import torch
    >>> from skbilevel.hypergrad import GradientStepSolver
    >>> class SignDescent(GradientStepSolver):
    ...     def __init__(self, lr=0.1, n_steps=10):
    ...         super().__init__(n_steps)
    ...         self.lr = lr
    ...     def update(self, theta, grad, state):
    ...         return theta - self.lr * torch.tanh(grad / 1e-2), state
    >>> theta, res = SignDescent().solve(lambda w: ((w - 1) ** 2).sum(), torch.zeros(2))
    >>> theta
    tensor([1.0000, 1.0000])
    """

    def __init__(self, n_steps=100):
        self.n_steps = _check_n_steps(n_steps)

    def update(self, theta, grad, state):
        """Return ``(theta_next, state_next)`` from the gradient ``grad`` at ``theta``.

        Parameters
        ----------
        theta : tensor or tree of tensors
            Current parameters.
        grad : tensor or tree of tensors
            Gradient of the inner loss at ``theta``, same structure.
        state : tree of tensors or None
            Optimizer state from :meth:`init_state` or the previous update.

        Returns
        -------
        theta_next, state_next
        """
        raise NotImplementedError

    def step(self, fun, theta, state, create_graph=False):
        """One update step on ``fun`` from ``theta``.

        Parameters
        ----------
        fun : callable
            ``fun(theta) -> scalar tensor``.
        theta : tensor or tree of tensors
            Current parameters.
        state : tree of tensors or None
            Optimizer state.
        create_graph : bool, default=False
            Keep the gradient differentiable (second-order terms); with
            ``False`` the gradient is a constant, but the update stays
            differentiable in ``theta``, ``state`` and tensor hyperparameters.

        Returns
        -------
        theta_next, state_next
        """
        theta, grad = _tree_grad(fun, theta, create_graph)
        return self.update(theta, grad, state)

    def solve(self, fun, theta0, phi=None):
        """Run ``n_steps`` steps without a graph; return ``(theta, SolveResult)``.

        There is no stopping tolerance: ``result.grad_norm`` says how far
        from stationary the returned point is, and ``result.converged``
        whether that is within the dtype's default tolerance
        (``result.tol``; see :class:`~skbilevel.hypergrad.StepSolver`).

        Parameters
        ----------
        fun : callable
            ``fun(theta) -> scalar tensor``, the objective to minimize.
        theta0 : tensor or tree of tensors
            Starting point, of a real floating dtype.
        phi : ignored
            Accepted for the :class:`~skbilevel.hypergrad.InnerSolver`
            interface.

        Returns
        -------
        theta : tensor or tree of tensors
            The last iterate, detached.
        result : SolveResult
            ``converged`` is ``False`` and ``message`` says why when the last
            iterate, the objective there or its gradient is not finite.

        Raises
        ------
        ValueError
            When ``theta0`` is not of a real floating dtype, or when it, the
            objective or its gradient is not finite at the starting point (as
            :class:`~skbilevel.hypergrad.LBFGS` raises); the latter is found
            after the steps, only when their result is not finite.

        Warns
        -----
        InnerSolveWarning
            When the steps started from a finite point and ended at a
            non-finite one (they diverged): lower ``lr``.
        """
        name = type(self).__name__
        _check_theta0(theta0, name)
        theta = self._run_steps(fun, theta0)
        leaves = tree_flatten(theta)[0]
        value, grad_norm = _value_and_grad_norm(fun, theta)
        tol = _default_tol(leaves[0].dtype)
        n_grad = self.n_steps + 1  # the steps and the final gradient norm
        message = f"ran the fixed number of steps ({self.n_steps})"
        # Judged once, at the end (no sync per step): a NaN theta0, a NaN loss
        # or steps that diverge (GradientDescent(lr=10) on a quadratic of
        # curvature 2) all returned a NaN theta ([nan, nan]) with this message
        # and no word. The start is examined only on that failure path, so a
        # finite run costs the same (10 steps on a 200 x 20 least squares:
        # 1.34 ms before, 1.38 ms after, within the noise).
        finite = math.isfinite(value) and math.isfinite(grad_norm) and _all_finite(leaves)
        if not finite:
            grad0 = self._check_finite_start(fun, theta0)  # raises when it is not
            n_grad += 1
            message = (
                f"{_DIVERGED}: not finite after {self.n_steps} steps "
                f"(inner gradient norm {grad0:.3e} at the start, "
                f"{grad_norm:.3e} at the end)"
            )
            warnings.warn(
                f"{name}: {message}; lower the solver's {_lr_text(self)} (below 2 / "
                "the largest curvature of the inner objective for gradient descent).",
                InnerSolveWarning,
                stacklevel=2,  # the caller of solve
            )
        result = SolveResult(
            n_iter=self.n_steps,
            grad_norm=grad_norm,
            converged=finite and _within_tol(grad_norm, tol),
            n_grad=n_grad,
            message=message,
            tol=tol,
        )
        return theta, result

    @staticmethod
    def _check_finite_start(fun, theta0):
        """Raise a ``ValueError`` when ``theta0``, the objective or its gradient
        there is not finite (as :class:`~skbilevel.hypergrad.LBFGS` does); else
        return the gradient norm at ``theta0``."""
        theta0 = tree_detach(theta0)
        if not _all_finite(tree_flatten(theta0)[0]):
            raise ValueError(
                "theta0 has non-finite entries (NaN or inf): the inner objective "
                "cannot be minimized from there; check the initialization."
            )
        value0, grad0 = _value_and_grad_norm(fun, theta0)
        _check_start(value0, grad0)
        return grad0


class GradientDescent(GradientStepSolver):
    """Differentiable gradient descent, ``theta <- theta - lr * grad``.

    Parameters
    ----------
    lr : float, tensor, or dict/list/tuple shaped like theta, default=0.1
        Step size. A tensor that requires grad is learned by the outer
        problem; a tree gives one step size per parameter tensor (each a
        scalar or a tensor broadcastable to that parameter, as in Meta-SGD).
    n_steps : int, default=100
        Number of steps.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import GradientDescent
    >>> solver = GradientDescent(lr=0.5, n_steps=50)
    >>> theta, res = solver.solve(lambda w: ((w - 3.0) ** 2).sum(), torch.zeros(2))
    >>> theta
    tensor([3., 3.])

    Per-parameter learning rates on a dict of parameters:

    >>> solver = GradientDescent(lr={"a": 0.5, "b": 0.25}, n_steps=1)
    >>> theta = {"a": torch.zeros(1), "b": torch.zeros(1)}
    >>> new, _ = solver.step(lambda t: -(t["a"] + t["b"]).sum(), theta, None)
    >>> new["a"].item(), new["b"].item()
    (0.5, 0.25)
    """

    def __init__(self, lr=0.1, n_steps=100):
        super().__init__(n_steps)
        _check_positive_tree(lr, "lr")
        self.lr = lr

    def update(self, theta, grad, state):
        leaves, spec = tree_flatten(theta)
        grads, _ = tree_flatten(grad)
        lrs = _per_leaf(self.lr, theta, "lr")
        new = [t - lr * g for t, g, lr in zip(leaves, grads, lrs)]
        return tree_unflatten(spec, new), state


class Momentum(GradientStepSolver):
    """Differentiable heavy-ball (or Nesterov) momentum, as ``torch.optim.SGD``.

    ``buf <- momentum * buf + grad``; ``theta <- theta - lr * buf``, or with
    ``nesterov=True``, ``theta <- theta - lr * (grad + momentum * buf)``.

    Parameters
    ----------
    lr : float, tensor, or dict/list/tuple shaped like theta, default=0.1
        Step size (see :class:`GradientDescent`).
    momentum : float or tensor, default=0.9
        Momentum factor in [0, 1).
    n_steps : int, default=100
        Number of steps.
    nesterov : bool, default=False
        Use Nesterov momentum.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import Momentum
    >>> solver = Momentum(lr=0.1, momentum=0.5, n_steps=100)
    >>> theta, res = solver.solve(lambda w: ((w - 2.0) ** 2).sum(), torch.zeros(3))
    >>> theta.round(decimals=4)
    tensor([2., 2., 2.])
    """

    def __init__(self, lr=0.1, momentum=0.9, n_steps=100, nesterov=False):
        super().__init__(n_steps)
        _check_positive_tree(lr, "lr")
        _check_unit_interval(momentum, "momentum")
        self.lr = lr
        self.momentum = momentum
        self.nesterov = bool(nesterov)

    def init_state(self, theta):
        """Zero momentum buffers shaped like ``theta``."""
        return {"momentum_buffer": _zeros_like_tree(theta)}

    def update(self, theta, grad, state):
        leaves, spec = tree_flatten(theta)
        grads, _ = tree_flatten(grad)
        bufs, _ = tree_flatten(state["momentum_buffer"])
        lrs = _per_leaf(self.lr, theta, "lr")
        new_theta, new_bufs = [], []
        for t, g, b, lr in zip(leaves, grads, bufs, lrs):
            b = self.momentum * b + g
            direction = g + self.momentum * b if self.nesterov else b
            new_theta.append(t - lr * direction)
            new_bufs.append(b)
        return tree_unflatten(spec, new_theta), {"momentum_buffer": tree_unflatten(spec, new_bufs)}


class Adam(GradientStepSolver):
    """Differentiable Adam, as ``torch.optim.Adam`` (no weight decay, no amsgrad).

    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g**2``,
    ``theta <- theta - lr * m_hat / (sqrt(v_hat) + eps)`` with the bias
    corrections ``m_hat = m / (1 - b1**t)``, ``v_hat = v / (1 - b2**t)``.
    The square root has derivative 0 (not inf) at ``v = 0`` so parameters
    with an exactly zero gradient do not make the hypergradient NaN.

    Parameters
    ----------
    lr : float, tensor, or dict/list/tuple shaped like theta, default=1e-3
        Step size (see :class:`GradientDescent`).
    betas : tuple of two floats or tensors, default=(0.9, 0.999)
        Decay rates of the first and second moment estimates, in [0, 1).
    eps : float or tensor, default=1e-8
        Added to the denominator.
    n_steps : int, default=100
        Number of steps.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import Adam
    >>> solver = Adam(lr=0.1, n_steps=200)
    >>> theta, res = solver.solve(lambda w: ((w - 1.0) ** 2).sum(), torch.zeros(2))
    >>> theta.round(decimals=2)
    tensor([1., 1.])
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, n_steps=100):
        super().__init__(n_steps)
        _check_positive_tree(lr, "lr")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2); got {betas!r}.")
        _check_unit_interval(betas[0], "betas[0]")
        _check_unit_interval(betas[1], "betas[1]")
        if not isinstance(eps, torch.Tensor) and (
            not isinstance(eps, numbers.Real) or not eps >= 0
        ):
            raise ValueError(f"eps must be a non-negative number; got {eps!r}.")
        self.lr = lr
        self.betas = tuple(betas)
        self.eps = eps

    def init_state(self, theta):
        """Step count 0 and zero first and second moments shaped like ``theta``.

        The step count (and so the bias corrections) is kept in the widest
        floating dtype of ``theta``'s leaves, at least float32, as
        ``torch.optim.Adam`` keeps it in float32: in bfloat16, ``0.999`` rounds
        to ``1`` (the second-moment correction ``1 - beta2**t`` was 0 and the
        parameters never moved) and the count stopped at 256.
        """
        leaves = tree_flatten(theta)[0]
        dtype = torch.float32
        for leaf in leaves:
            dtype = torch.promote_types(dtype, leaf.dtype)
        return {
            "step": torch.zeros((), dtype=dtype, device=leaves[0].device),
            "exp_avg": _zeros_like_tree(theta),
            "exp_avg_sq": _zeros_like_tree(theta),
        }

    def update(self, theta, grad, state):
        leaves, spec = tree_flatten(theta)
        grads, _ = tree_flatten(grad)
        ms, _ = tree_flatten(state["exp_avg"])
        vs, _ = tree_flatten(state["exp_avg_sq"])
        lrs = _per_leaf(self.lr, theta, "lr")
        beta1, beta2 = self.betas
        step = state["step"] + 1
        bias1 = 1 - beta1**step
        bias2 = 1 - beta2**step
        new_theta, new_m, new_v = [], [], []
        for t, g, m, v, lr in zip(leaves, grads, ms, vs, lrs):
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            denom = _safe_sqrt(v / bias2) + self.eps
            new_theta.append(t - lr * (m / bias1) / denom)
            new_m.append(m)
            new_v.append(v)
        new_state = {
            "step": step,
            "exp_avg": tree_unflatten(spec, new_m),
            "exp_avg_sq": tree_unflatten(spec, new_v),
        }
        return tree_unflatten(spec, new_theta), new_state
