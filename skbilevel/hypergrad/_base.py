"""The contract of the solver core: strategies, inner solvers, health records.

A bi-level problem has an inner objective ``f(theta, phi)`` minimized over
``theta`` and an outer objective ``F(theta*(phi), phi)``. :func:`argmin`
returns ``theta*(phi)`` as an ordinary autograd tensor (or tree of tensors);
*how* its backward pass is computed is the job of a
:class:`HypergradientStrategy`, chosen independently of the problem. Any
outer loss then composes with it: ``F(argmin(...), phi).backward()`` fills
``phi.grad`` with the hypergradient, direct and indirect terms together.
"""

import dataclasses
import math
import warnings
from typing import Optional

import torch

from ._checks import _check_int, _check_positive  # noqa: F401 (used across the core)
from ._linear_solve import _default_tol
from ._tree import tree_detach, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "HypergradientInfo",
    "HypergradientWarning",
    "LinearSolveWarning",
    "InnerSolveWarning",
    "HypergradientStrategy",
    "InnerSolver",
    "StepSolver",
    "ClosedFormSolver",
    "SolveResult",
    "argmin",
    "get_strategy",
    "register_strategy",
    "available_strategies",
]


class HypergradientWarning(UserWarning):
    """Base class of the warnings the solver core emits."""


class LinearSolveWarning(HypergradientWarning):
    """A linear solve (CG, Neumann, ...) stopped before reaching its tolerance."""


class InnerSolveWarning(HypergradientWarning):
    """The inner problem was not solved to the tolerance the strategy needs."""


@dataclasses.dataclass
class HypergradientInfo:
    """Health record of one hypergradient computation.

    Fields set at ``argmin`` time describe the inner solve; fields set during
    the backward pass describe the linear solve. ``None`` means "does not
    apply to this strategy".

    Attributes
    ----------
    strategy : str
        Name of the strategy that produced the hypergradient.
    inner_iterations : int or None
        Iterations (or unrolled steps) of the inner solver.
    inner_grad_norm : float or None
        Euclidean norm of the inner gradient at the returned ``theta``.
    inner_converged : bool or None
        Whether ``inner_grad_norm`` is within the inner tolerance: the
        solver's own tolerance (:attr:`SolveResult.tol`), or the strategy's
        ``inner_tol`` where it has one. A fixed-step solver counts as
        converged only when its last step lands within the dtype's default
        tolerance, never merely for having run its steps.
    linear_solve_iterations : int or None
        Iterations of the linear solve in the backward pass.
    linear_solve_residual : float or None
        Relative residual ``||H v - b|| / ||b||`` of that solve.
    linear_solve_converged : bool or None
        Whether that residual met the tolerance.
    fallback : str or None
        Description of any fallback taken (e.g. CG replaced by a dense solve).
    n_grad : int
        Inner-gradient evaluations spent, forward and backward.
    n_hvp : int
        Hessian-vector (or mixed second-order) products spent.
    value_correction : float or None
        Implicit strategies: ``-v^T g``, with ``v = H^{-1} b`` the backward
        pass's linear solve (``b`` the gradient of the differentiated output
        in ``theta``) and ``g`` the inner gradient at the returned
        ``theta``. The output's value plus this is its value at the exact
        inner solution to first order in ``g``: an inner problem solved to a
        loose tolerance then gives values as consistent as its
        hypergradients. Set only when the solve's relative residual is at
        most 0.1 and the inner solver is iterative; ``None`` otherwise and
        for the other families.
    extra : dict
        Strategy-specific numbers.

    Examples
    --------
    >>> from skbilevel.hypergrad import HypergradientInfo
    >>> info = HypergradientInfo(strategy="cg", n_hvp=3)
    >>> info.as_dict()["n_hvp"]
    3
    """

    strategy: str
    inner_iterations: Optional[int] = None
    inner_grad_norm: Optional[float] = None
    inner_converged: Optional[bool] = None
    linear_solve_iterations: Optional[int] = None
    linear_solve_residual: Optional[float] = None
    linear_solve_converged: Optional[bool] = None
    fallback: Optional[str] = None
    n_grad: int = 0
    n_hvp: int = 0
    value_correction: Optional[float] = None
    extra: dict = dataclasses.field(default_factory=dict)

    def as_dict(self):
        """Return the record as a plain dict (for ``hypergradient_info_``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class SolveResult:
    """What an inner solver reports about its run.

    Attributes
    ----------
    n_iter : int
        Iterations performed.
    grad_norm : float
        Norm of the gradient of the inner objective at the returned point
        (``nan`` where the solver does not compute it).
    converged : bool
        Whether the returned point is stationary: ``grad_norm <= tol``, or
        with ``tol=None`` for a solution that is exact by construction (a
        closed form), whether it and its gradient norm are finite.
    n_grad : int or None
        Gradient evaluations spent (``None``: the solver does not count them).
    n_hvp : int
        Hessian-vector products spent.
    message : str
        Why the solver stopped, in words.
    tol : float or None
        The gradient-norm tolerance ``converged`` was judged by (``None``:
        exact by construction).
    """

    n_iter: int
    grad_norm: float = math.nan
    converged: bool = True
    n_grad: Optional[int] = None
    n_hvp: int = 0
    message: str = ""
    tol: Optional[float] = None


def _all_finite(leaves):
    """Whether every entry of every tensor is finite (one device sync)."""
    flags = [torch.isfinite(t.detach()).all() for t in leaves]
    return bool(torch.stack(flags).all()) if flags else True


def _within_tol(grad_norm, tol):
    """The core's one convergence rule: ``||grad f(theta)|| <= tol`` (nan fails)."""
    return bool(grad_norm <= tol)


class InnerSolver:
    """Solves ``min_theta fun(theta)`` without building an autograd graph.

    Subclasses implement :meth:`solve`. ``fun`` maps a tree of tensors to a
    scalar tensor; the solver may call ``torch.autograd.grad`` on it.
    """

    def solve(self, fun, theta0, phi=None):
        """Return ``(theta, SolveResult)``; ``theta`` is detached.

        ``phi`` (detached) is passed for solvers that need it directly, such as
        :class:`ClosedFormSolver`; iterative solvers only use ``fun``.
        """
        raise NotImplementedError


class StepSolver(InnerSolver):
    """An inner solver made of explicit, differentiable update steps.

    Unrolled strategies call :meth:`init_state` and then :meth:`step`
    ``n_steps`` times, with ``create_graph=True`` where the steps must be
    differentiated.

    :meth:`solve` has no stopping tolerance: it runs the ``n_steps`` steps
    and reports ``converged`` by the gradient norm at the last point against
    the default tolerance of its dtype (``1e-10`` in float64, ``1e-5`` in
    float32, the :class:`~skbilevel.hypergrad.LBFGS` default), so that
    strategies needing a stationary point can tell.

    Parameters
    ----------
    n_steps : int
        Number of steps.
    """

    def __init__(self, n_steps=100):
        self.n_steps = n_steps

    def init_state(self, theta):
        """Optimizer state for the first step (e.g. momentum buffers)."""
        return None

    def step(self, fun, theta, state, create_graph=False):
        """Return ``(theta_next, state_next)``."""
        raise NotImplementedError

    def _run_steps(self, fun, theta0):
        """``n_steps`` steps from ``theta0``, without a graph between them."""
        theta = tree_detach(theta0)
        state = self.init_state(theta)
        for _ in range(self.n_steps):
            with torch.enable_grad():
                theta = tree_map(lambda t: t.detach().requires_grad_(True), theta)
                theta, state = self.step(fun, theta, state, create_graph=False)
            theta = tree_detach(theta)
            state = None if state is None else tree_detach(state)
        return theta

    def solve(self, fun, theta0, phi=None):
        theta = self._run_steps(fun, theta0)
        grad_norm = _grad_norm(fun, theta)
        tol = _default_tol(tree_flatten(theta)[0][0].dtype)
        return theta, SolveResult(
            n_iter=self.n_steps, grad_norm=grad_norm,
            converged=_within_tol(grad_norm, tol), tol=tol,
        )


class ClosedFormSolver(InnerSolver):
    """An inner problem whose solution is an explicit differentiable map of phi.

    Subclasses implement :meth:`closed_form`; the ``closed_form`` strategy
    differentiates through it with autograd, and implicit strategies may use
    it as an exact inner solver.
    """

    def closed_form(self, phi):
        """Return ``theta*(phi)`` computed with differentiable torch operations."""
        raise NotImplementedError

    def solve(self, fun, theta0, phi=None):
        if phi is None:
            raise ValueError("A ClosedFormSolver needs phi to solve the inner problem.")
        with torch.no_grad():
            theta = self.closed_form(tree_detach(phi))
        grad_norm = _grad_norm(fun, theta)
        # exact by construction, unless it is not finite (a penalty that
        # overflowed): converged=True beside a NaN gradient norm misreported it
        finite = _all_finite(tree_flatten(theta)[0]) and math.isfinite(grad_norm)
        return theta, SolveResult(n_iter=1, grad_norm=grad_norm, converged=finite)


def _scalar_loss(value):
    """``value`` as a 0-d tensor; a ``ValueError`` when the inner loss did not
    return a one-element tensor (a vector loss failed deep in autograd with
    "grad can be implicitly created only for scalar outputs")."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(
            "The inner loss must return a scalar tensor; got "
            f"{type(value).__name__} with shape {tuple(getattr(value, 'shape', ()))}."
        )
    return value.reshape(())


def _value_and_grad_norm(fun, theta):
    """``fun(theta)`` and the Euclidean norm of its gradient (floats), one pass,
    without keeping a graph.

    By ``fun.loss_and_grad(theta)`` when ``fun`` has it (a closed-form
    gradient, see :class:`~skbilevel.hypergrad._solvers._FixedPhi`), else by
    autograd; the norm is summed leaf by leaf. A loss that does not depend
    on ``theta`` has a zero gradient (as :class:`LBFGS` takes it).
    """
    loss_and_grad = getattr(fun, "loss_and_grad", None)
    if loss_and_grad is not None:
        value, g = loss_and_grad(theta)
        grads = tree_flatten(g)[0]
    else:
        with torch.enable_grad():
            theta = tree_map(lambda t: t.detach().requires_grad_(True), theta)
            leaves = tree_flatten(theta)[0]
            value = _scalar_loss(fun(theta))
            grads = []
            if value.requires_grad:
                grads = torch.autograd.grad(value, leaves, allow_unused=True)
    sq = sum(float((g.detach() ** 2).sum()) for g in grads if g is not None)
    if isinstance(value, torch.Tensor):  # (loss_and_grad may return a float)
        value = value.detach()
    return float(value), math.sqrt(sq)


def _grad_norm(fun, theta):
    """Norm of ``grad fun(theta)`` (a float): :func:`_value_and_grad_norm`'s."""
    return _value_and_grad_norm(fun, theta)[1]


class HypergradientStrategy:
    """How ``theta*(phi)`` is differentiated.

    Subclasses set ``name`` and ``family`` and implement :meth:`argmin`.
    Keep constructor arguments as plain attributes so strategies print and
    compare well.
    """

    name = "base"
    family = "base"
    #: kind of inner solver the strategy needs: "any", "step" or "closed_form"
    solver_kind = "any"

    def default_solver(self):
        """The inner solver used when ``argmin`` gets none."""
        raise ValueError(
            f"The {self.name!r} hypergradient strategy needs an inner solver; pass "
            "solver=..."
        )

    def argmin(self, inner_loss, phi, init, solver, info):
        """Return ``theta*(phi)`` with this strategy's backward pass attached.

        Parameters
        ----------
        inner_loss : callable
            ``inner_loss(theta, phi) -> scalar tensor``.
        phi : tensor or tree of tensors
            Outer variables. Gradients flow to the leaves that require grad.
        init : tensor or tree of tensors
            Starting point of the inner solver (may depend on ``phi``, as in
            MAML, for the unrolled strategies).
        solver : InnerSolver
            The inner solver (already defaulted by :func:`argmin`).
        info : HypergradientInfo
            Record to fill.
        """
        raise NotImplementedError

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


_REGISTRY = {}


def register_strategy(*names):
    """Class decorator registering a strategy under one or more string names.

    A name already taken by another class is a ``ValueError`` (registering
    ``"cg"`` again replaced the library's conjugate-gradient strategy for
    every later ``hypergradient="cg"``, silently); the same class (by module
    and name, as after a module reload) may register again.
    """
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Strategy names must be non-empty strings; got {name!r}.")

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, HypergradientStrategy)):
            raise TypeError(
                "register_strategy decorates HypergradientStrategy subclasses; got "
                f"{cls!r}."
            )
        for name in names:
            old = _REGISTRY.get(name)
            if old is not None and (old.__module__, old.__qualname__) != (
                cls.__module__, cls.__qualname__
            ):
                raise ValueError(
                    f"The strategy name {name!r} is taken by {old.__module__}."
                    f"{old.__qualname__}; register {cls.__qualname__} under another "
                    "name (or pass an instance as hypergradient=...)."
                )
        for name in names:
            _REGISTRY[name] = cls
        return cls

    return decorator


def available_strategies():
    """Sorted names accepted by :func:`get_strategy`.

    Examples
    --------
    >>> from skbilevel.hypergrad import available_strategies
    >>> "cg" in available_strategies()
    True
    """
    return sorted(_REGISTRY)


def get_strategy(spec, **params):
    """Return a strategy instance from a name, a class or an instance.

    Parameters
    ----------
    spec : str, HypergradientStrategy subclass or instance
        For example ``"cg"``, ``"reverse"`` or ``ImplicitCG(tol=1e-8)``.
    **params
        Constructor arguments, used when ``spec`` is a name or a class.

    Examples
    --------
    >>> from skbilevel.hypergrad import get_strategy
    >>> get_strategy("cg").name
    'cg'
    """
    if isinstance(spec, HypergradientStrategy):
        if params:
            raise ValueError("Pass constructor arguments only with a strategy name or class.")
        return spec
    if isinstance(spec, type) and issubclass(spec, HypergradientStrategy):
        return spec(**params)
    if isinstance(spec, str) and spec in _REGISTRY:
        return _REGISTRY[spec](**params)
    raise ValueError(
        f"Unknown hypergradient strategy {spec!r}. Use one of "
        f"{available_strategies()} or a HypergradientStrategy instance."
    )


def _check_tree(tree, what):
    try:
        leaves, _ = tree_flatten(tree)
    except TypeError as exc:
        # (the bare message named neither the argument nor the fix)
        leaf = str(exc).rsplit("got ", 1)[-1].rstrip(".")
        raise TypeError(
            f"{what} must be a torch tensor or a dict, tuple or list of tensors; "
            f"got {type(tree).__name__}"
            + ("" if leaf == type(tree).__name__ else f" holding a {leaf}")
            + ". Wrap numbers with torch.tensor(..., dtype=torch.float64)."
        ) from None
    for leaf in leaves:
        if not torch.is_floating_point(leaf):
            raise ValueError(
                f"{what} must hold floating-point tensors; got dtype {leaf.dtype}. "
                "Convert it with .double() or .float()."
            )
    return leaves


def argmin(inner_loss, phi, init, *, hypergradient="cg", solver=None):
    """Solve the inner problem and return ``theta*(phi)`` as an autograd tree.

    Parameters
    ----------
    inner_loss : callable
        ``inner_loss(theta, phi) -> scalar tensor``, the inner objective.
    phi : tensor or dict/tuple/list of tensors
        Outer variables; the hypergradient flows to leaves that require grad.
    init : tensor or dict/tuple/list of tensors
        Starting point of the inner solver (a warm start from the previous
        outer iteration is the usual choice).
    hypergradient : str or HypergradientStrategy, default="cg"
        How ``theta*(phi)`` is differentiated; see
        :func:`available_strategies`.
    solver : InnerSolver, optional
        Inner solver, an instance (e.g. ``LBFGS()``); each strategy has a
        default. Anything without a ``solve`` method raises ``TypeError``.

    Returns
    -------
    theta : tensor or tree of tensors
        The inner solution, differentiable with respect to ``phi``.
    info : HypergradientInfo
        Health record; linear-solve fields are filled when ``backward`` runs.

    Examples
    --------
    Ridge with a log-penalty: the hypergradient of a validation loss.

    >>> import torch
    >>> from skbilevel.hypergrad import argmin
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    >>> log_alpha = torch.zeros((), dtype=torch.float64, requires_grad=True)
    >>> def inner(w, la):
    ...     return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * la.exp() * (w ** 2).sum()
    >>> w, info = argmin(inner, log_alpha, torch.zeros(3, dtype=torch.float64), hypergradient="cg")
    >>> ((X @ w - y) ** 2).mean().backward()
    >>> bool(torch.isfinite(log_alpha.grad))
    True
    """
    strategy = get_strategy(hypergradient)
    if not callable(inner_loss):
        raise TypeError(
            "inner_loss must be a callable inner_loss(theta, phi) -> scalar tensor; "
            f"got {type(inner_loss).__name__}."
        )
    _check_tree(phi, "phi")
    _check_tree(init, "init")
    _check_solver(solver)
    if solver is None:
        solver = strategy.default_solver()
    info = HypergradientInfo(strategy=strategy.name)
    theta = strategy.argmin(inner_loss, phi, init, solver, info)
    return _keep_connected(theta, phi, info), info


def _check_solver(solver):
    """``solver`` must be ``None`` or an inner solver: an object with ``solve``."""
    if solver is None:
        return
    if isinstance(solver, type):
        raise TypeError(
            "solver must be an InnerSolver instance (e.g. LBFGS() or "
            f"GradientDescent(lr=0.1, n_steps=100)); got the class {solver.__name__}: "
            f"pass {solver.__name__}() instead."
        )
    if not callable(getattr(solver, "solve", None)):
        raise TypeError(
            "solver must be an InnerSolver instance (e.g. LBFGS() or "
            "GradientDescent(lr=0.1, n_steps=100)); got "
            f"{type(solver).__name__} {solver!r}. Choose the differentiation "
            "method with hypergradient=..., the inner solver with solver=..."
        )


def _keep_connected(theta, phi, info):
    """Give ``theta`` a (zero) path to ``phi`` when the strategy returned none.

    A strategy may legitimately produce a ``theta`` that does not depend on
    ``phi`` (first-order methods drop the indirect term; a ``phi`` that does not
    enter the inner problem has none). Without a path, ``backward`` on an outer
    loss with no direct ``phi`` term would raise deep inside autograd; with
    it, ``phi.grad`` is the (zero) indirect term and the record says so.
    """
    phi_leaves = [t for t in tree_flatten(phi)[0] if t.requires_grad]
    if not phi_leaves:
        return theta
    theta_leaves, spec = tree_flatten(theta)
    if any(t.requires_grad for t in theta_leaves):
        return theta
    # a zero whatever phi holds: (phi * 0) was NaN for an infinite phi (a
    # log-penalty of -inf, no penalty), and made every entry of theta NaN
    anchor = 0.0
    for t in phi_leaves:
        first = t.reshape(-1)[:1]
        anchor = anchor + first.masked_fill(torch.ones_like(first, dtype=torch.bool), 0.0).sum()
    info.extra["theta_independent_of_phi"] = True
    return tree_unflatten(spec, [t + anchor.to(t.dtype) for t in theta_leaves])


def warn_inner_solve(info, tol, strategy, solver, message=""):
    """Emit :class:`InnerSolveWarning`: the inner solution is not stationary."""
    why = f" ({message})" if message else ""
    limit = "its tolerance" if tol is None else f"tol {tol:.1e}"
    warnings.warn(
        f"The {strategy!r} hypergradient assumes an inner optimum, but "
        f"{type(solver).__name__} returned a point with inner gradient norm "
        f"{info.inner_grad_norm:.3e} > {limit} after "
        f"{info.inner_iterations} iterations{why}. The implicit hypergradient is "
        "biased; run the inner solver longer (or use LBFGS / NewtonCG), loosen "
        "inner_tol, or use an unrolled strategy for a fixed number of steps.",
        InnerSolveWarning,
        stacklevel=5,  # the user's argmin call
    )


def warn_linear_solve(info, tol, method):
    """Emit :class:`LinearSolveWarning` with the numbers from ``info``."""
    warnings.warn(
        f"{method} linear solve did not converge: relative residual "
        f"{info.linear_solve_residual:.3e} > tol {tol:.1e} after "
        f"{info.linear_solve_iterations} iterations (inner gradient norm "
        f"{info.inner_grad_norm if info.inner_grad_norm is not None else float('nan'):.3e}). "
        "The hypergradient is approximate; raise maxiter, loosen tol, "
        "or use the 'dense' strategy for small problems.",
        LinearSolveWarning,
        stacklevel=3,
    )
