"""Functional, vmap-able primitives for gradient-based meta-learning.

A *task* is a support set ``(x_s, y_s)`` and a query set ``(x_q, y_q)``. A
meta-learning *method* turns meta-parameters into task parameters by
adapting on the support set; the meta-objective is the mean query loss of
the adapted models over a batch of tasks::

    F(phi) = mean_i L(adapt(phi, x_s[i], y_s[i]), x_q[i], y_q[i])

Everything here is written per task with :mod:`torch.func` (``grad``,
``vjp``, ``functional_call``) and vectorized over the tasks of a meta-batch
with :func:`torch.func.vmap`, so a meta-batch costs one batched computation
instead of a Python loop. The meta-gradient reaches ``phi`` through ordinary
autograd: :meth:`MetaMethod.meta_loss` returns a scalar whose ``backward``
writes the method's meta-gradient into ``phi.grad``, which is what
:func:`~skbilevel.hypergrad.minimize_outer` expects.

Methods (see :func:`available_meta_methods`):

- ``"maml"``: differentiate through the inner gradient steps (second order;
  Finn et al. 2017);
- ``"fomaml"``: the same with the inner gradients treated as constants
  (``d theta' / d phi = I``);
- ``"reptile"``: move ``phi`` towards the adapted parameters (Nichol et al.
  2018); the meta-gradient is ``phi - theta'``;
- ``"anil"``: adapt only the last layer (the head), second order (Raghu et
  al. 2020);
- ``"metasgd"``: per-parameter learned inner step sizes (Li et al. 2017);
- ``"imaml"``: proximal inner problem ``L_s(theta) + lam/2 ||theta - phi||^2``
  and the implicit meta-gradient ``(I + H/lam)^{-1} grad L_q(theta*)``,
  solved by conjugate gradient with Hessian-vector products (Rajeswaran et
  al. 2019);
- ``"r2d2"``: a ridge-regression head solved in closed form on meta-learned
  features, with a learned ridge penalty (Bertinetto et al. 2019).
"""

import inspect
import math
from numbers import Real

import torch
from torch.func import functional_call, grad, vjp, vmap

from ._base import HypergradientInfo
from ._checks import _check_int, _check_positive, _did_you_mean
from ._linear_solve import LinearSolveResult
from ._tree import tree_detach, tree_flatten

__all__ = [
    "FunctionalModel",
    "inner_adapt",
    "ridge_head",
    "batched_cg",
    "MetaMethod",
    "MAML",
    "FOMAML",
    "Reptile",
    "ANIL",
    "MetaSGD",
    "IMAML",
    "R2D2",
    "get_meta_method",
    "available_meta_methods",
]

_LOSSES = ("mse", "cross_entropy")


class FunctionalModel:
    """A torch module evaluated at parameters passed in, with its task loss.

    Parameters
    ----------
    module : torch.nn.Module
        The backbone, already on the device and dtype of the data. Batch-norm
        layers are switched to batch statistics (no running averages), which
        :func:`torch.func.vmap` requires.
    loss : {"mse", "cross_entropy"}
        ``"mse"``: outputs ``(n, o)`` against targets ``(n, o)``, mean over
        both; ``"cross_entropy"``: logits ``(n, C)`` against integer labels
        ``(n,)``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import FunctionalModel
    >>> model = FunctionalModel(torch.nn.Linear(2, 1), "mse")
    >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    >>> float(model.loss(params, torch.ones(3, 2), torch.full((3, 1), 2.0)))
    0.0
    """

    def __init__(self, module, loss="mse"):
        if loss not in _LOSSES:
            raise ValueError(f"loss={loss!r} is not supported; use one of {_LOSSES}.")
        torch.func.replace_all_batch_norm_modules_(module)
        self.module = module
        self.loss_name = loss
        self.buffers = {k: v for k, v in module.named_buffers()}

    def trainable_names(self):
        """Names of the module's parameters that require grad: those meta-learned
        and adapted (a frozen parameter keeps the module's value, as in torch)."""
        return [k for k, v in self.module.named_parameters() if v.requires_grad]

    def init_params(self):
        """Detached copies of the module's trainable parameters (the starting
        meta-parameters)."""
        named = dict(self.module.named_parameters())
        return {k: named[k].detach().clone() for k in self.trainable_names()}

    def head_keys(self):
        """Names of the trainable parameters of the last submodule that owns any."""
        names = self.trainable_names()
        if not names:
            if next(self.module.parameters(), None) is not None:
                raise ValueError(
                    "Every parameter of the module has requires_grad=False, so there "
                    "is nothing to meta-learn; unfreeze the layers to learn (the "
                    "output layer, say).")
            raise ValueError(
                "The module has no parameters to meta-learn; give a module with at "
                "least one layer that has parameters (a torch.nn.Linear head, say).")
        prefix = names[-1].rpartition(".")[0]
        return [k for k in names if k.rpartition(".")[0] == prefix]

    def forward(self, params, x, n_outputs=None):
        """Module output at ``params``; the first ``n_outputs`` columns if given."""
        out = functional_call(self.module, (params, self.buffers), (x,))
        if out.dim() == 1:
            out = out.unsqueeze(-1)
        return out if n_outputs is None else out[..., :n_outputs]

    def loss_from_outputs(self, out, y):
        """Mean task loss of outputs ``out`` against targets ``y``."""
        if self.loss_name == "mse":
            if y.numel() != out.numel():
                # (torch's "shape '[3, 4, 1]' is invalid for input of size 24", from
                # inside vmap, for targets two wide against a one-output model)
                raise ValueError(
                    f"The targets do not match the model's outputs: outputs of shape "
                    f"{tuple(out.shape)} against targets of shape {tuple(y.shape)} "
                    "(one task). Give the targets as (n_samples, n_outputs), n_outputs "
                    "the width of the model's output (a meta-batch's ys and yq as "
                    "(n_tasks, n_samples, n_outputs)), or change the module's last layer."
                )
            return ((out - y.reshape(out.shape)) ** 2).mean()
        return torch.nn.functional.cross_entropy(out, y)

    def loss(self, params, x, y, n_outputs=None):
        """Mean task loss of the module at ``params`` on ``(x, y)``."""
        return self.loss_from_outputs(self.forward(params, x, n_outputs), y)


def inner_adapt(loss_fn, params, *, steps, lr, keys=None, first_order=False,
                proximal=0.0, anchor=None):
    """Differentiable gradient steps on one task: the inner loop of MAML and kin.

    ``theta_{t+1} = theta_t - lr * (grad loss_fn(theta_t) + proximal * (theta_t - anchor))``
    on the entries ``keys`` of ``params`` (all by default), the others held
    fixed. Gradients come from :func:`torch.func.grad`, so the result stays
    differentiable with respect to ``params`` (and ``lr``), also under
    :func:`torch.func.vmap`.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params) -> scalar tensor``.
    params : dict of str to tensor
        Starting point (the meta-parameters).
    steps : int
        Number of steps (``>= 0``; 0 returns ``params``).
    lr : float or dict of str to tensor
        Step size, one for all or one tensor per adapted parameter (Meta-SGD).
    keys : list of str, optional
        Entries to adapt (ANIL adapts the head only).
    first_order : bool, default=False
        Treat the inner gradients as constants (FOMAML): the result's
        derivative with respect to ``params`` is the identity.
    proximal : float, default=0.0
        Strength of the proximal term ``proximal / 2 * ||theta - anchor||^2``
        (iMAML's inner problem).
    anchor : dict, optional
        Centre of the proximal term; defaults to ``params``.

    Returns
    -------
    dict of str to tensor

    Examples
    --------
    One step on ``(theta - 3)^2`` from 0 with step 0.25 lands on 1.5.

    >>> import torch
    >>> from skbilevel.hypergrad import inner_adapt
    >>> p = {"w": torch.zeros(())}
    >>> float(inner_adapt(lambda q: (q["w"] - 3) ** 2, p, steps=1, lr=0.25)["w"])
    1.5
    """
    # (steps=-1 ran no step, silently)
    _check_int(steps, "inner_adapt's steps (the inner gradient steps)", minimum=0)
    keys = list(params) if keys is None else list(keys)
    anchor = params if anchor is None else anchor
    fixed = {k: v for k, v in params.items() if k not in keys}
    sub = {k: params[k] for k in keys}

    def sub_loss(s):
        return loss_fn({**fixed, **s})

    for _ in range(int(steps)):
        g = grad(sub_loss)(sub)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        new = {}
        for k in keys:
            step = g[k]
            if proximal:
                step = step + proximal * (sub[k] - anchor[k])
            new[k] = sub[k] - (lr[k] if isinstance(lr, dict) else lr) * step
        sub = new
    return {**fixed, **sub}


def ridge_head(features, targets, alpha, fit_intercept=True):
    """Ridge regression solved in closed form, differentiable and vmap-able.

    Minimizes ``||targets - features @ W - b||^2 + alpha ||W||^2`` (the
    intercept ``b`` is not penalized, as in scikit-learn's ``Ridge``). Uses
    the ``n x n`` (Woodbury) system ``W = Fc^T (Fc Fc^T + alpha I)^{-1} Tc``
    when there are fewer samples than features, as few-shot support sets
    have, and the ``p x p`` normal equations otherwise; ``Fc`` and ``Tc`` are
    the centred features and targets.

    Parameters
    ----------
    features : tensor of shape (n, p)
    targets : tensor of shape (n, o)
    alpha : float or 0-d tensor
        Ridge penalty (> 0); may carry a gradient.
    fit_intercept : bool, default=True

    Returns
    -------
    W : tensor of shape (p, o)
    b : tensor of shape (o,)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ridge_head
    >>> F = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    >>> W, b = ridge_head(F, 2 * F + 1, alpha=1e-12)
    >>> round(float(W), 6), round(float(b), 6)
    (2.0, 1.0)
    """
    n, p = features.shape
    if fit_intercept:
        f_mean = features.mean(0)
        t_mean = targets.mean(0)
        fc, tc = features - f_mean, targets - t_mean
    else:
        fc, tc = features, targets
    if n <= p:
        gram = fc @ fc.transpose(-1, -2)
        eye = torch.eye(n, dtype=features.dtype, device=features.device)
        W = fc.transpose(-1, -2) @ torch.linalg.solve(gram + alpha * eye, tc)
    else:
        gram = fc.transpose(-1, -2) @ fc
        eye = torch.eye(p, dtype=features.dtype, device=features.device)
        W = torch.linalg.solve(gram + alpha * eye, fc.transpose(-1, -2) @ tc)
    if fit_intercept:
        b = t_mean - f_mean @ W
    else:
        b = targets.new_zeros(targets.shape[-1])
    return W, b


def batched_cg(matvec, b, tol=1e-10, maxiter=10):
    """Conjugate gradient on ``B`` independent systems ``A_i x_i = b_i`` at once.

    Each row of ``b`` (shape ``(B, d)``) is one system with its own step
    sizes, as a per-task CG would run; ``matvec`` maps a ``(B, d)`` batch of
    vectors to the batch of products (typically Hessian-vector products
    under :func:`torch.func.vmap`). :func:`~skbilevel.hypergrad.solve_cg`
    solves one system with scalar control flow; run on the block-diagonal
    stack of the tasks' systems it would share its Krylov steps between the
    tasks and converge more slowly, hence this batched form.

    ``A`` need not be positive definite (iMAML's ``I + H/lam`` is not when
    the inner loss has curvature below ``-lam``). A row that meets a
    direction of non-positive curvature ``p^T A p <= 0`` stops there and
    returns an iterate it has already reached, as truncated Newton-CG does
    (Nocedal & Wright, Algorithm 7.1; CG-Steihaug without a trust region):
    the one of smallest residual among ``b`` itself (the identity
    approximation ``A ~ I``) and its CG iterates, since near-zero curvature
    met before the sign shows can blow the last iterate up. On the first
    step that is ``b``: never a silent zero. A zero right-hand side
    gives zero. Stopping at ``maxiter`` is not a failure: a few CG steps is
    a deliberate approximation (iMAML uses 5).

    Parameters
    ----------
    matvec : callable
        ``(B, d) -> (B, d)``.
    b : tensor of shape (B, d)
    tol : float, default=1e-10
        Stop when every row's relative residual is ``<= tol``.
    maxiter : int, default=10

    Returns
    -------
    x : tensor of shape (B, d)
    result : LinearSolveResult
        ``residual`` is the largest relative residual ``||b - A x|| / ||b||``
        over the rows, from CG's recurrence (no extra product).
    negative_curvature : dict
        ``"rows"``: the number of rows stopped by non-positive curvature
        (``"first_step"`` of them returned ``b``); ``"min_rayleigh"``: the
        smallest ``p^T A p / p^T p`` met (an upper bound on the smallest
        eigenvalue of the ``A_i``; ``nan`` if ``maxiter`` is 0).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import batched_cg
    >>> A = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[2.0, 0.0], [0.0, 5.0]]], dtype=torch.float64)
    >>> b = torch.tensor([[1.0, 2.0], [2.0, 5.0]], dtype=torch.float64)
    >>> def mv(v):
    ...     return torch.einsum("bij,bj->bi", A, v)
    >>> x, res, neg = batched_cg(mv, b, maxiter=5)
    >>> [[round(float(t), 6) for t in row] for row in x], res.converged, neg["rows"]
    ([[0.090909, 0.636364], [1.0, 1.0]], True, 0)
    """
    b_norm = torch.linalg.vector_norm(b, dim=1)
    safe = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(1)
    active = b_norm > 0
    # Smallest-residual candidate of each row, b included: what a row that meets
    # non-positive curvature returns (its last iterates may have blown up on
    # near-zero curvature before the sign showed).
    best_x, best_r, best_rs = b.clone(), None, None
    iterations, n_matvec, curvature_rows, first_step_rows = 0, 0, 0, 0
    min_rayleigh = math.nan
    for _ in range(int(maxiter)):
        # a row solved exactly (residual 0, hence p = 0) is done: left active, its
        # p^T A p = 0 counted as non-positive curvature (A = 2 I beside another
        # system: "1 of 2 system(s) met non-positive curvature", a fallback)
        active = active & (rs != 0)
        # rows stopped by curvature keep their residual and must not hold the others
        pending = torch.where(active, rs.sqrt() / safe, torch.zeros_like(rs))
        if not bool(active.any()) or float(pending.max()) <= tol:
            break
        Ap = matvec(p)
        n_matvec += 1
        if best_r is None:  # p = b: the residual of x = b comes for free
            best_r = b - Ap
            best_rs = (best_r * best_r).sum(1)
        pAp = (p * Ap).sum(1)
        rayleigh = pAp[active] / (p * p).sum(1)[active]
        if rayleigh.numel():
            low = float(rayleigh.min())
            min_rayleigh = low if math.isnan(min_rayleigh) else min(min_rayleigh, low)
        bad = active & ~(pAp > 0)
        if bool(bad.any()):
            curvature_rows += int(bad.sum())
            first_step_rows += int(bad.sum()) if iterations == 0 else 0
            x = torch.where(bad[:, None], best_x, x)
            r = torch.where(bad[:, None], best_r, r)
        active = active & ~bad
        alpha = torch.where(active, rs / torch.where(pAp > 0, pAp, torch.ones_like(pAp)),
                            torch.zeros_like(rs))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rs_new = (r * r).sum(1)
        better = active & (rs_new < best_rs)
        best_x = torch.where(better[:, None], x, best_x)
        best_r = torch.where(better[:, None], r, best_r)
        best_rs = torch.where(better, rs_new, best_rs)
        beta = torch.where(active, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)),
                           torch.zeros_like(rs))
        p = r + beta[:, None] * p
        rs = rs_new
        iterations += 1
    residual = torch.linalg.vector_norm(r, dim=1) / safe
    worst = float(residual.max()) if residual.numel() else 0.0
    converged = worst <= tol
    if not math.isfinite(worst):
        message = f"non-finite residual {worst} (the products A v overflowed)"
    elif converged:
        message = f"largest relative residual {worst:.3e} <= tol {tol:.1e}"
    else:
        message = (f"stopped after {iterations} step(s) with largest relative "
                   f"residual {worst:.3e}")
    if curvature_rows:
        message += (f"; {curvature_rows} of {b.shape[0]} system(s) met non-positive "
                    f"curvature (smallest p^T A p / p^T p {min_rayleigh:.3e}) and kept "
                    f"their smallest-residual iterate ({first_step_rows} on the first "
                    "step: x = b)")
    return x, LinearSolveResult(
        iterations=iterations, residual=worst, converged=bool(converged), n_matvec=n_matvec,
        fallback="cg stopped on non-positive curvature" if curvature_rows else None,
        message=message), {"rows": curvature_rows, "first_step": first_step_rows,
                           "min_rayleigh": min_rayleigh}


def _surrogate(value, meta, direction):
    """A scalar equal to ``value`` whose gradient with respect to ``meta`` is ``direction``."""
    leaves, _ = tree_flatten(meta)
    dirs, _ = tree_flatten(direction)
    inner = sum((leaf * d.detach()).sum() for leaf, d in zip(leaves, dirs))
    return value.detach() + inner - inner.detach()


_BATCH_NAMES = ("xs", "ys", "xq", "yq")


def _check_batch(batch, model):
    """The meta-batch ``(xs, ys, xq, yq)``, checked where it enters a method.

    Shapes and types only (no device sync, once per meta-batch). Before, a
    3-tuple failed with "not enough values to unpack", numpy arrays with a
    vmap error about ``in_dims``, ``ys`` with fewer samples than ``xs`` with
    torch's "shape '[3, 4, 1]' is invalid for input of size 9", and an empty
    support set with a reshape error in R2D2 while the other methods silently
    skipped adaptation.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 4:
        got = (f"a {type(batch).__name__} of {len(batch)} items"
               if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}")
        raise ValueError(
            "A meta-batch must be a tuple (xs, ys, xq, yq) of four tensors with a "
            "leading task dimension: the support inputs and targets, then the query "
            f"inputs and targets; got {got}."
        )
    for name, t in zip(_BATCH_NAMES, batch):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"The meta-batch's {name} must be a torch.Tensor; got "
                f"{type(t).__module__}.{type(t).__name__}. Convert it with "
                f"torch.as_tensor({name}, dtype=..., device=...) to the dtype and device "
                "of the model."
            )
        if t.ndim < 2:
            raise ValueError(
                f"The meta-batch's {name} must have a task and a sample dimension, "
                f"(n_tasks, n_samples, ...); got shape {tuple(t.shape)}."
            )
    xs, ys, xq, yq = batch
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(_BATCH_NAMES, batch))
    n_tasks = xs.shape[0]
    if n_tasks == 0 or any(t.shape[0] != n_tasks for t in batch):
        raise ValueError(
            "The meta-batch's tensors must share their first dimension, the number "
            f"of tasks (at least 1); got {shapes}."
        )
    for which, x, y, xn, yn in (("support", xs, ys, "xs", "ys"),
                                ("query", xq, yq, "xq", "yq")):
        if x.shape[1] == 0:
            raise ValueError(
                f"The {which} set is empty ({shapes}): every task needs at least one "
                f"{which} sample to {'adapt on' if which == 'support' else 'be scored on'}."
            )
        if y.shape[1] != x.shape[1]:
            raise ValueError(
                f"{yn} must have one target per sample of {xn} (dimension 1, the "
                f"samples of each task); got {shapes}."
            )
    if model.loss_name == "cross_entropy":
        for yn, y in (("ys", ys), ("yq", yq)):
            if not torch.is_floating_point(y) and y.ndim != 2:
                raise ValueError(
                    f"With loss='cross_entropy' the integer labels {yn} must be "
                    f"(n_tasks, n_samples); got {shapes}."
                )
    elif math.prod(ys.shape[2:]) != math.prod(yq.shape[2:]):
        raise ValueError(
            "ys and yq must have the same number of targets per sample (the "
            f"model's outputs); got {shapes}."
        )
    return xs, ys, xq, yq


def _adaptable_params(model):
    """The module's parameters, or a clear error when it has none to adapt."""
    model.head_keys()  # raises when the module has no parameters
    return model.init_params()


def _n_params(tree):
    return sum(leaf.numel() for leaf in tree_flatten(tree)[0])


class MetaMethod:
    """Base class of the meta-learning methods: init, adapt, predict, meta-loss.

    Meta-parameters are a dict ``{"params": {name: tensor}, ...}``; methods
    add their own entries (Meta-SGD's step sizes, R2D2's ridge penalty).
    A *task state* (what :meth:`adapt` returns) is a dict of tensors.

    Parameters
    ----------
    inner_steps : int, default=5
        Inner gradient steps on the support set (``>= 0``; 0 scores the
        meta-parameters unadapted).
    inner_lr : float, default=0.01
        Inner step size (Meta-SGD: its initial value); a positive finite
        number.
    """

    name = "base"
    #: whether the meta-gradient is computed through the inner steps
    second_order = True
    #: whether the method adapts by gradient steps (uses inner_lr)
    _takes_inner_steps = True

    def __init__(self, inner_steps=5, inner_lr=0.01):
        # (inner_steps=-1 was accepted by all seven methods and ran no step)
        _check_int(inner_steps, f"{type(self).__name__}'s inner_steps (the inner "
                   "gradient steps on each task's support set)", minimum=0)
        # (a negative or NaN inner_lr was accepted: steps uphill, or NaN task
        # states; R2D2 takes no inner step and ignores it)
        if self._takes_inner_steps:
            _check_positive(inner_lr, f"{type(self).__name__}'s inner_lr (the inner "
                            "step size)", allow_none=False)
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr

    # -- meta-parameters --------------------------------------------------
    def init_meta(self, model):
        """Initial meta-parameters (detached; the caller sets ``requires_grad``)."""
        return {"params": _adaptable_params(model)}

    def state_dict(self, meta):
        """Flatten meta-parameters to ``{name: tensor}`` (model parameters unprefixed)."""
        out = {}
        for group, value in meta.items():
            if group == "params":
                out.update({k: v for k, v in value.items()})
            elif isinstance(value, dict):
                out.update({f"{group}.{k}": v for k, v in value.items()})
            else:
                out[group] = value
        return out

    def load_state_dict(self, model, state):
        """Inverse of :meth:`state_dict`."""
        names = model.trainable_names()
        meta = {"params": {k: state[k] for k in names}}
        for key, value in state.items():
            if key in meta["params"]:
                continue
            group, _, rest = key.partition(".")
            if rest:
                meta.setdefault(group, {})[rest] = value
            else:
                meta[group] = value
        return meta

    # -- one task -----------------------------------------------------------
    def _steps(self, steps):
        if steps is None:
            return self.inner_steps
        return _check_int(steps, "steps (the inner gradient steps)", minimum=0)

    def adapt(self, model, meta, x, y, *, n_outputs=None, steps=None):
        """Task state after adapting on the support set ``(x, y)``."""
        params = inner_adapt(
            lambda p: model.loss(p, x, y, n_outputs), meta["params"],
            steps=self._steps(steps), lr=self.inner_lr,
            first_order=not self.second_order,
        )
        return {"params": params}

    def predict(self, model, meta, task, x, *, n_outputs=None):
        """Outputs of the adapted model on ``x``."""
        return model.forward(task["params"], x, n_outputs)

    def task_loss(self, model, meta, xs, ys, xq, yq, *, n_outputs=None):
        """Query loss of one task after adaptation (differentiable in ``meta``)."""
        task = self.adapt(model, meta, xs, ys, n_outputs=n_outputs)
        return model.loss_from_outputs(self.predict(model, meta, task, xq, n_outputs=n_outputs), yq)

    # -- a meta-batch ---------------------------------------------------------
    def _batched_query_losses(self, model, meta, batch, n_outputs=None):
        xs, ys, xq, yq = _check_batch(batch, model)

        def one(a, b, c, d):
            return self.task_loss(model, meta, a, b, c, d, n_outputs=n_outputs)

        return vmap(one, randomness="different")(xs, ys, xq, yq)

    def meta_loss(self, model, meta, batch, *, n_outputs=None):
        """Mean query loss over a meta-batch and its health record.

        Parameters
        ----------
        model : FunctionalModel
        meta : dict
            Meta-parameters; gradients flow to leaves that require grad.
        batch : tuple of tensors
            ``(xs, ys, xq, yq)`` with a leading task dimension: ``xs`` is
            ``(B, n_support, ...)``, ``xq`` ``(B, n_query, ...)`` (``B``,
            ``n_support`` and ``n_query`` at least 1); ``ys`` and ``yq`` have
            one target per sample (``(B, n)`` labels for cross-entropy,
            ``(B, n, n_outputs)`` or ``(B, n)`` targets for MSE).
        n_outputs : int, optional
            Use the first ``n_outputs`` outputs of the model (the classes of
            an episode); R2D2 classification needs it for its one-hot targets.

        Returns
        -------
        loss : 0-d tensor
            Its value is the mean query loss after adaptation; its gradient
            with respect to ``meta`` is the method's meta-gradient.
        info : HypergradientInfo
        """
        losses = self._batched_query_losses(model, meta, batch, n_outputs)
        steps = int(self.inner_steps)
        n_tasks = int(batch[0].shape[0])
        info = HypergradientInfo(
            strategy=self.name, inner_iterations=steps,
            n_grad=n_tasks * (steps + 1),
            n_hvp=n_tasks * steps if self.second_order else 0,
        )
        return losses.mean(), info

    def __repr__(self):
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


_META_REGISTRY = {}


def _register(name):
    def decorator(cls):
        cls.name = name
        _META_REGISTRY[name] = cls
        return cls

    return decorator


@_register("maml")
class MAML(MetaMethod):
    """Model-agnostic meta-learning: differentiate through the inner steps.

    The meta-gradient of one task after one step is
    ``(I - lr H_s) grad L_q(theta')``; more steps chain such factors. The
    Hessian-vector products come from differentiating
    :func:`torch.func.grad` with autograd, never formed explicitly.

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import FunctionalModel, MAML
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = FunctionalModel(torch.nn.Linear(1, 1), "mse")
    >>> method = MAML(inner_steps=1, inner_lr=0.1)
    >>> meta = method.init_meta(model)
    >>> meta["params"]["weight"].requires_grad_(True)  # doctest: +ELLIPSIS
    tensor(...)
    >>> x = torch.randn(4, 3, 1)
    >>> loss, info = method.meta_loss(model, meta, (x, 2 * x, x, 2 * x))
    >>> loss.backward()
    >>> meta["params"]["weight"].grad.shape, info.strategy
    (torch.Size([1, 1]), 'maml')
    """


@_register("fomaml")
class FOMAML(MetaMethod):
    """First-order MAML: the inner gradients are treated as constants.

    The meta-gradient of a task is ``grad L_q(theta')`` evaluated at the
    adapted parameters: MAML's with the second-order terms dropped.

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01
    """

    second_order = False


@_register("anil")
class ANIL(MetaMethod):
    """Almost-no-inner-loop: adapt only the head (the last layer), second order.

    The body is meta-learned but frozen during adaptation; the head is the
    last submodule of the backbone that owns parameters (see
    :meth:`FunctionalModel.head_keys`).

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01
    """

    def adapt(self, model, meta, x, y, *, n_outputs=None, steps=None):
        params = inner_adapt(
            lambda p: model.loss(p, x, y, n_outputs), meta["params"],
            steps=self._steps(steps), lr=self.inner_lr, keys=model.head_keys(),
        )
        return {"params": params}


@_register("metasgd")
class MetaSGD(MetaMethod):
    """Meta-SGD: one learned inner step size per parameter entry.

    ``theta' = theta - alpha * grad L_s(theta)`` with ``alpha`` (same shapes
    as ``theta``, initialized to ``inner_lr``) meta-learned together with
    ``theta``, second order.

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01
        Initial value of every step size.
    """

    def init_meta(self, model):
        params = _adaptable_params(model)
        return {"params": params,
                "lr": {k: torch.full_like(v, float(self.inner_lr)) for k, v in params.items()}}

    def adapt(self, model, meta, x, y, *, n_outputs=None, steps=None):
        params = inner_adapt(
            lambda p: model.loss(p, x, y, n_outputs), meta["params"],
            steps=self._steps(steps), lr=meta["lr"],
        )
        return {"params": params}


@_register("reptile")
class Reptile(MetaMethod):
    """Reptile: move the initialization towards the adapted parameters.

    The meta-"gradient" is ``phi - mean_i theta'_i`` (no derivative of the
    inner loop at all), handed to the outer optimizer like a gradient; the
    reported loss is the query loss after adaptation.

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01
    """

    second_order = False

    def meta_loss(self, model, meta, batch, *, n_outputs=None):
        xs, ys, xq, yq = _check_batch(batch, model)
        detached = tree_detach(meta)

        def one(a, b, c, d):
            task = self.adapt(model, detached, a, b, n_outputs=n_outputs)
            loss = model.loss(task["params"], c, d, n_outputs)
            return loss, task["params"]

        losses, adapted = vmap(one, randomness="different")(xs, ys, xq, yq)
        direction = {"params": {k: detached["params"][k] - adapted[k].mean(0)
                                for k in detached["params"]}}
        n_tasks = int(xs.shape[0])
        info = HypergradientInfo(strategy=self.name, inner_iterations=int(self.inner_steps),
                                 n_grad=n_tasks * int(self.inner_steps))
        return _surrogate(losses.mean(), meta, direction), info


@_register("imaml")
class IMAML(MetaMethod):
    """Implicit MAML: proximal inner problem, implicit meta-gradient by CG.

    Each task solves ``min_theta L_s(theta) + lam/2 ||theta - phi||^2``
    approximately by ``inner_steps`` gradient steps from ``phi`` (no graph
    is kept, so memory does not grow with the steps). At ``theta*`` the
    implicit function theorem gives ``d theta*/d phi = (I + H_s/lam)^{-1}``,
    so the task's meta-gradient is ``v = (I + H_s/lam)^{-1} grad L_q(theta*)``.
    The tasks' systems are solved together, each with its own CG steps, by
    :func:`batched_cg`; its Hessian-vector products are reverse-over-reverse
    products of one linearization of the tasks' support gradients, reused by
    every CG step. The formula is exact only at the inner optimum: choose
    ``inner_steps * inner_lr * lam`` large enough (>= 2 or so) that the
    proximal problem is nearly solved. With ``inner_steps=0`` the adapted
    parameters are ``phi`` itself and the meta-gradient is exactly
    ``grad L_q(phi)`` (no linear solve).

    As in the paper (Rajeswaran et al. 2019), CG runs a fixed small number of
    steps (``cg_maxiter``, 5 there): its residual is reported in
    ``info.linear_solve_residual``, not warned about. ``I + H_s/lam`` is
    positive definite only when the support loss has no curvature below
    ``-lam``; a network's loss can have some, and then the task's CG stops
    at the first direction of non-positive curvature and keeps its iterate
    (the first-order meta-gradient ``grad L_q(theta*)`` if it is the first
    direction), see :func:`batched_cg`. ``info.extra`` counts those tasks
    (``"cg_negative_curvature"`` of ``"n_tasks"``) and gives the smallest
    ``p^T (I + H/lam) p / p^T p`` met (``"cg_min_rayleigh"``): below 0 it
    shows ``H`` has an eigenvalue ``<= lam * (cg_min_rayleigh - 1)``.

    Parameters
    ----------
    inner_steps : int, default=5
    inner_lr : float, default=0.01
    lam : float, default=1.0
        Proximal strength (> 0); larger keeps ``theta*`` closer to ``phi``.
    cg_maxiter : int, default=5
        CG steps per meta-iteration (the paper's 5; >= 1).
    cg_tol : float, default=1e-3
        Relative residual at which CG stops early (in ``[0, 1)``; 0 runs all
        ``cg_maxiter`` steps); the reached value is in
        ``info.linear_solve_residual`` and ``info.linear_solve_converged``.
    """

    second_order = False

    def __init__(self, inner_steps=5, inner_lr=0.01, lam=1.0, cg_maxiter=5,
                 cg_tol=1e-3):
        super().__init__(inner_steps, inner_lr)
        self.lam = lam
        self.cg_maxiter = cg_maxiter
        self.cg_tol = cg_tol
        self._check_lam()
        self._check_cg()

    def _check_cg(self):
        # CG starts at v = 0 with a relative residual of 1: no step (cg_maxiter 0 or
        # -1) or a tolerance of 1 or more left v = 0, a meta-gradient of exactly
        # zero (the meta-parameters never moved: change 0.0 from 1 to 5
        # meta-iterations, against 3.7e-3 at the defaults); a NaN or negative
        # tolerance was never met and silently meant 0
        _check_int(self.cg_maxiter, "iMAML's cg_maxiter (the conjugate-gradient steps "
                   "of each task's meta-gradient, 5 in the paper)")
        tol = self.cg_tol
        if not (isinstance(tol, Real) and not isinstance(tol, bool) and 0 <= tol < 1):
            raise ValueError(
                f"iMAML's cg_tol must be a number in [0, 1); got cg_tol={tol!r}. It is "
                "the relative residual at which CG stops early: CG starts at a "
                "residual of 1, so at 1 or more it takes no step and the "
                "meta-gradient is zero; use e.g. cg_tol=1e-3, or 0 to run all "
                "cg_maxiter steps."
            )

    def _check_lam(self):
        # the meta-gradient solves (I + H/lam) v = g: lam = 0 divides by zero
        if not (isinstance(self.lam, Real) and self.lam > 0):
            raise ValueError(
                f"iMAML's lam must be > 0; got lam={self.lam!r}. lam is the strength "
                "of the proximal term lam/2 ||theta - phi||^2 that keeps each task's "
                "solution near the meta-parameters (the implicit meta-gradient "
                "divides by it); use e.g. lam=1.0, larger to stay closer to phi."
            )
        if isinstance(self.inner_lr, Real) and self.inner_lr * self.lam >= 2:
            # each inner step scales theta - phi by (1 - inner_lr * lam) on top of the
            # loss's own step: at 2 or more the proximal term alone diverges
            raise ValueError(
                f"iMAML's inner steps diverge with inner_lr * lam = "
                f"{self.inner_lr * self.lam:g} >= 2 (inner_lr={self.inner_lr!r}, "
                f"lam={self.lam!r}): each step multiplies theta - phi by "
                "1 - inner_lr * lam. Lower inner_lr or lam so that their product is "
                "below 2 (below 1 to approach the proximal solution without "
                "oscillating)."
            )

    def init_meta(self, model):
        self._check_lam()
        self._check_cg()
        return super().init_meta(model)

    def adapt(self, model, meta, x, y, *, n_outputs=None, steps=None):
        params = inner_adapt(
            lambda p: model.loss(p, x, y, n_outputs), meta["params"],
            steps=self._steps(steps), lr=self.inner_lr, first_order=True,
            proximal=float(self.lam),
        )
        return {"params": params}

    def implicit_meta_gradient(self, model, phi, batch, n_outputs=None):
        """Per-task implicit meta-gradients, query losses, inner solutions and CG record.

        Returns ``(v, losses, theta, result, curvature)`` where ``v`` and
        ``theta`` are dicts of ``(B, ...)`` tensors, ``result`` the
        :class:`LinearSolveResult` and ``curvature`` the negative-curvature
        record of :func:`batched_cg`.
        """
        xs, ys, xq, yq = _check_batch(batch, model)
        lam = float(self.lam)
        steps = int(self.inner_steps)
        no_curvature = {"rows": 0, "first_step": 0, "min_rayleigh": math.nan}

        def solve_inner(a, b):
            return inner_adapt(lambda p: model.loss(p, a, b, n_outputs), phi,
                               steps=steps, lr=self.inner_lr, proximal=lam)

        theta = vmap(solve_inner, randomness="different")(xs, ys)
        # A copy per task: with no inner step vmap returns phi broadcast along the
        # task axis, one memory location that the products below cannot write through.
        theta = {k: v.detach().clone() for k, v in theta.items()}

        def query(t, c, d):
            return grad(lambda p: model.loss(p, c, d, n_outputs))(t), model.loss(t, c, d, n_outputs)

        gq, losses = vmap(query, randomness="different")(theta, xq, yq)
        gq = {k: v.detach() for k, v in gq.items()}
        if not all(bool(torch.isfinite(v).all()) for v in gq.values()):
            # The inner solve diverged: hand back NaN (never a silent zero) so the
            # outer loop's divergence guard stops and keeps the last finite state.
            result = LinearSolveResult(
                iterations=0, residual=math.nan, converged=False, n_matvec=0,
                message="non-finite query gradient at the inner solution: the inner "
                        "solve diverged (lower inner_lr or raise lam)")
            nan = {k: torch.full_like(v, math.nan) for k, v in gq.items()}
            return nan, losses, theta, result, no_curvature
        if steps == 0:
            # theta = phi exactly: d theta / d phi = I solves the system (I) v = g.
            result = LinearSolveResult(
                iterations=0, residual=0.0, converged=True, n_matvec=0,
                message="inner_steps=0: the adapted parameters are phi, so "
                        "d theta/d phi = I and the meta-gradient is the query gradient")
            return gq, losses, theta, result, no_curvature

        keys = list(theta)
        n_tasks = int(xs.shape[0])
        shapes = [theta[k].shape for k in keys]

        def unflat(mat):
            out, start = {}, 0
            for k, s in zip(keys, shapes):
                n = math.prod(s[1:])
                out[k] = mat[:, start:start + n].reshape(s)
                start += n
            return out

        def flat(tree):
            return torch.cat([tree[k].reshape(n_tasks, -1) for k in keys], dim=1)

        def support_grads(t):
            def one(t1, a, b):
                return grad(lambda p: model.loss(p, a, b, n_outputs))(t1)

            return vmap(one, randomness="different")(t, xs, ys)

        # One linearization of the tasks' support gradients (block diagonal in the
        # tasks); each CG step is one backward pass through it. H is symmetric,
        # so the vector-Jacobian product is the Hessian-vector product.
        _, hvp = vjp(support_grads, theta)

        def matvec(mat):
            hv = hvp(unflat(mat))[0]
            return mat + flat(hv) / lam

        with torch.no_grad():
            sol, result, curvature = batched_cg(matvec, flat(gq), tol=self.cg_tol,
                                                maxiter=self.cg_maxiter)
        return unflat(sol), losses, theta, result, curvature

    def meta_loss(self, model, meta, batch, *, n_outputs=None):
        phi = tree_detach(meta["params"])
        v, losses, theta, result, curvature = self.implicit_meta_gradient(
            model, phi, batch, n_outputs)
        direction = {"params": {k: v[k].mean(0) for k in phi}}
        n_tasks = int(batch[0].shape[0])
        info = HypergradientInfo(
            strategy=self.name, inner_iterations=int(self.inner_steps),
            linear_solve_iterations=result.iterations,
            linear_solve_residual=result.residual,
            linear_solve_converged=result.converged,
            fallback=result.fallback,
            n_grad=n_tasks * (int(self.inner_steps) + 1), n_hvp=n_tasks * result.n_matvec,
            extra={"cg_message": result.message, "n_tasks": n_tasks,
                   "cg_negative_curvature": curvature["rows"],
                   "cg_first_step_fallback": curvature["first_step"],
                   "cg_min_rayleigh": curvature["min_rayleigh"]},
        )
        return _surrogate(losses.mean(), meta, direction), info


@_register("r2d2")
class R2D2(MetaMethod):
    """Ridge-regression head in closed form on meta-learned features (R2D2).

    The backbone's output is the feature map; each task fits
    :func:`ridge_head` on the support features (one-hot targets for
    classification) and predicts the query. Meta-parameters are the backbone,
    ``log_alpha`` (the ridge penalty) and, for classification, ``log_scale``
    of the logits. No inner steps: ``inner_steps`` and ``inner_lr`` are
    accepted (the meta-learning estimators pass them to every method) and
    unused.

    Parameters
    ----------
    inner_steps : int, default=0
        Unused (validated as ``>= 0`` like the other methods').
    inner_lr : float, default=0.0
        Unused.
    alpha : float, default=1.0
        Initial ridge penalty (> 0).
    scale : float, default=1.0
        Initial logit scale (> 0; classification).
    """

    second_order = True
    _takes_inner_steps = False  # a closed-form head: inner_lr is ignored

    def __init__(self, inner_steps=0, inner_lr=0.0, alpha=1.0, scale=1.0):
        super().__init__(inner_steps, inner_lr)
        self.alpha = alpha
        self.scale = scale
        self._check_positive()

    def _check_positive(self):
        # both are meta-learned through their logarithms
        for name, what in (("alpha", "the initial ridge penalty"),
                           ("scale", "the initial logit scale")):
            value = getattr(self, name)
            if not (isinstance(value, Real) and value > 0):
                raise ValueError(
                    f"R2D2's {name} must be > 0; got {name}={value!r}. It is {what}, "
                    f"meta-learned through its logarithm; use e.g. {name}=1.0."
                )

    def init_meta(self, model):
        self._check_positive()
        params = _adaptable_params(model)
        like = next(iter(params.values()))
        meta = {"params": params,
                "log_alpha": like.new_tensor(math.log(self.alpha))}
        if model.loss_name == "cross_entropy":
            meta["log_scale"] = like.new_tensor(math.log(self.scale))
        return meta

    def _targets(self, model, y, feats, n_outputs):
        if model.loss_name == "cross_entropy":
            if n_outputs is None:
                raise ValueError("R2D2 classification needs n_outputs (the number of classes).")
            return torch.nn.functional.one_hot(y, n_outputs).to(feats.dtype)
        return y.reshape(feats.shape[0], -1)

    def adapt(self, model, meta, x, y, *, n_outputs=None, steps=None):
        feats = model.forward(meta["params"], x)
        W, b = ridge_head(feats, self._targets(model, y, feats, n_outputs),
                          meta["log_alpha"].exp())
        return {"W": W, "b": b}

    def predict(self, model, meta, task, x, *, n_outputs=None):
        out = model.forward(meta["params"], x) @ task["W"] + task["b"]
        if n_outputs is not None:
            out = out[..., :n_outputs]
        if "log_scale" in meta:
            out = meta["log_scale"].exp() * out
        return out

    def meta_loss(self, model, meta, batch, *, n_outputs=None):
        if model.loss_name == "cross_entropy" and n_outputs is None:
            raise ValueError("R2D2 classification needs n_outputs (the classes per task).")
        losses = self._batched_query_losses(model, meta, batch, n_outputs)
        n_tasks = int(batch[0].shape[0])
        info = HypergradientInfo(strategy=self.name, inner_iterations=0,
                                 inner_converged=True, n_grad=n_tasks)
        return losses.mean(), info


def available_meta_methods():
    """Sorted names accepted by :func:`get_meta_method`.

    Examples
    --------
    >>> from skbilevel.hypergrad import available_meta_methods
    >>> available_meta_methods()
    ['anil', 'fomaml', 'imaml', 'maml', 'metasgd', 'r2d2', 'reptile']
    """
    return sorted(_META_REGISTRY)


def get_meta_method(spec, **params):
    """Return a :class:`MetaMethod` from a name or an instance.

    Parameters
    ----------
    spec : str or MetaMethod
        One of :func:`available_meta_methods` or an instance.
    **params
        Constructor arguments used with a name; arguments the method does
        not take (``lam`` for MAML, say) are rejected with a ``ValueError``.
        Every method takes ``inner_steps`` and ``inner_lr`` (R2D2 ignores
        them), since the meta-learning estimators pass both to whichever
        method they use.

    Examples
    --------
    >>> from skbilevel.hypergrad import get_meta_method
    >>> get_meta_method("imaml", lam=2.0).lam
    2.0
    """
    if isinstance(spec, MetaMethod):
        return spec
    if isinstance(spec, str) and spec in _META_REGISTRY:
        cls = _META_REGISTRY[spec]
        # the constructor's TypeError named only 'MetaMethod.__init__() got an
        # unexpected keyword argument', not the keys the method takes
        takes = [k for k in inspect.signature(cls).parameters if k != "self"]
        unknown = [k for k in params if k not in takes]
        if unknown:
            raise ValueError(
                f"Invalid parameters for meta-learning method {spec!r}: it does not "
                f"take {', '.join(map(repr, unknown))}{_did_you_mean(unknown, takes)}; "
                f"it takes {', '.join(takes)}."
            )
        return cls(**params)
    raise ValueError(
        f"Unknown meta-learning method {spec!r}; use one of {available_meta_methods()} "
        "or a MetaMethod instance."
    )
