"""Kernels as differentiable torch functions, for kernel ridge inner problems.

Every kernel maps two batches of points ``X`` (n, d) and ``Z`` (m, d) to an
(n, m) Gram matrix built from differentiable torch operations only, so a
kernel ridge fit on ``Z`` (a synthetic training set, say) can be
differentiated with respect to ``Z`` by autograd. This is what KIP (kernel
inducing points, Nguyen et al. 2021) needs.

The ``"ntk"`` kernel is the neural tangent kernel of a fully-connected ReLU
network in the NTK parameterization, in closed form by the arc-cosine
recursion (Cho & Saul 2009; Jacot et al. 2018; Arora et al. 2019):

.. math::

    \\Sigma^{(0)}(x, z) = \\sigma_w^2\\, x^\\top z / d + \\sigma_b^2, \\qquad
    \\Theta^{(0)} = \\Sigma^{(0)},

and for each hidden layer ``h = 1..depth``, with ``c`` the correlation of
``x`` and ``z`` under :math:`\\Sigma^{(h-1)}` and ``t = arccos(c)``:

.. math::

    \\Sigma^{(h)} = \\sigma_w^2 \\frac{\\sqrt{\\Sigma_{xx}\\Sigma_{zz}}}{2\\pi}
        (\\sin t + (\\pi - t) c) + \\sigma_b^2, \\qquad
    \\dot\\Sigma^{(h)} = \\sigma_w^2 \\frac{\\pi - t}{2\\pi}, \\qquad
    \\Theta^{(h)} = \\Theta^{(h-1)} \\dot\\Sigma^{(h)} + \\Sigma^{(h)}.

The network's NTK is :math:`\\Theta^{(depth)}` (``depth`` hidden layers and
one linear read-out); ``"nngp"`` returns :math:`\\Sigma^{(depth)}`, the
kernel of the same network with only its read-out trained.
"""

import math

import torch

__all__ = [
    "rbf_kernel",
    "linear_kernel",
    "poly_kernel",
    "ntk_kernel",
    "nngp_kernel",
    "pairwise_kernel",
    "kernel_diagonal",
    "available_kernels",
    "kernel_ridge_predict",
    "kernel_ridge_coef",
    "kip_loss",
]



def _check_pair(X, Z):
    Z = X if Z is None else Z
    for name, a in (("X", X), ("Z", Z)):
        if not isinstance(a, torch.Tensor):
            # (AttributeError "'numpy.ndarray' object has no attribute 'dim'")
            raise TypeError(
                f"Kernels take torch tensors; {name} is a {type(a).__name__}. Convert it "
                "with torch.as_tensor(..., dtype=torch.float64)."
            )
    if X.dtype != Z.dtype and X.dtype.is_floating_point and Z.dtype.is_floating_point:
        # float32 against float64: "expected m1 and m2 to have the same dtype"
        dtype = torch.promote_types(X.dtype, Z.dtype)
        X, Z = X.to(dtype), Z.to(dtype)
    if X.dim() != 2 or Z.dim() != 2:
        raise ValueError(
            f"Kernels need 2-D inputs (n_samples, n_features); got shapes "
            f"{tuple(X.shape)} and {tuple(Z.shape)}."
        )
    if X.shape[1] != Z.shape[1]:
        raise ValueError(
            f"X has {X.shape[1]} features but Z has {Z.shape[1]}; they must match."
        )
    return X, Z


def linear_kernel(X, Z=None):
    """Linear kernel ``X @ Z.T``.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    Z : torch.Tensor of shape (m, d), optional
        Defaults to ``X``.

    Returns
    -------
    torch.Tensor of shape (n, m)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import linear_kernel
    >>> linear_kernel(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]))
    tensor([[11.]])
    """
    X, Z = _check_pair(X, Z)
    return X @ Z.T


def _sq_dists(X, Z):
    # ||x||^2 + ||z||^2 - 2 x.z: no sqrt, so the gradient is finite at x = z.
    d2 = (X * X).sum(1)[:, None] + (Z * Z).sum(1)[None, :] - 2.0 * (X @ Z.T)
    return d2.clamp_min(0.0)


def rbf_kernel(X, Z=None, gamma=None):
    """Gaussian kernel ``exp(-gamma * ||x - z||^2)``.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    Z : torch.Tensor of shape (m, d), optional
        Defaults to ``X``.
    gamma : float, optional
        Inverse squared length scale; defaults to ``1 / d`` (as scikit-learn).

    Returns
    -------
    torch.Tensor of shape (n, m)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import rbf_kernel
    >>> K = rbf_kernel(torch.tensor([[0.0], [1.0]]), gamma=1.0)
    >>> [round(v, 4) for v in K[0].tolist()]
    [1.0, 0.3679]
    """
    X, Z = _check_pair(X, Z)
    if gamma is None:
        gamma = 1.0 / X.shape[1]
    _check_gamma(gamma)
    return torch.exp(-gamma * _sq_dists(X, Z))


def _check_gamma(gamma):
    """``gamma >= 0`` and finite (a tensor's values too): -1 gave values of 1e8, NaN NaN."""
    values = gamma.detach() if isinstance(gamma, torch.Tensor) else torch.as_tensor(gamma)
    if not (bool(torch.isfinite(values).all()) and bool((values >= 0).all())):
        raise ValueError(f"gamma must be finite and >= 0; got {gamma!r}.")


def poly_kernel(X, Z=None, degree=3, gamma=None, coef0=1.0):
    """Polynomial kernel ``(gamma * x.z + coef0) ** degree``.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    Z : torch.Tensor of shape (m, d), optional
        Defaults to ``X``.
    degree : int, default=3
    gamma : float, optional
        Defaults to ``1 / d``.
    coef0 : float, default=1.0

    Returns
    -------
    torch.Tensor of shape (n, m)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import poly_kernel
    >>> poly_kernel(torch.tensor([[1.0, 1.0]]), degree=2, gamma=0.5, coef0=1.0)
    tensor([[4.]])
    """
    X, Z = _check_pair(X, Z)
    if gamma is None:
        gamma = 1.0 / X.shape[1]
    return (gamma * (X @ Z.T) + coef0) ** degree


def _arccos_recursion(X, Z, depth, weight_var, bias_var):
    """Return ``(nngp, ntk)`` Gram matrices of a ReLU network with ``depth`` hidden layers."""
    X, Z = _check_pair(X, Z)
    if int(depth) != depth or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (hidden layers); got {depth!r}.")
    if weight_var <= 0 or bias_var < 0:
        raise ValueError(
            f"weight_var must be > 0 and bias_var >= 0; got {weight_var!r}, {bias_var!r}."
        )
    d = X.shape[1]
    # Sigma restricted to the diagonals (variances of each point), then cross terms.
    sxx = weight_var * (X * X).sum(1) / d + bias_var
    szz = weight_var * (Z * Z).sum(1) / d + bias_var
    sxz = weight_var * (X @ Z.T) / d + bias_var
    ntk = sxz
    tiny = torch.finfo(X.dtype).tiny
    # Correlations are clamped away from +-1: arccos has an infinite derivative
    # there, and where |c| = 1 exactly (the diagonal) c does not move anyway.
    eps = 10 * torch.finfo(X.dtype).eps
    for _ in range(int(depth)):
        norm = torch.sqrt((sxx[:, None] * szz[None, :]).clamp_min(tiny))
        c_raw = sxz / norm
        c = c_raw.clamp(-1.0 + eps, 1.0 - eps)
        # the angle itself is exact at |c| = 1: arccos(1 - eps) = 6.7e-8 made each
        # layer's (pi - t) / pi on the diagonal 2e-8 too small (a depth-3 NTK's
        # diagonal 6e-7 off kernel_diagonal); the clamp still keeps the gradient
        # finite, and zero there, as before
        t = torch.arccos(c)
        j1 = torch.sqrt(1 - c * c) + (math.pi - t) * c  # arc-cosine kernel of degree 1
        # at c = +-1 exactly: t = 0, j1 = pi and t = pi, j1 = 0
        top, bottom = c_raw >= 1.0 - eps, c_raw <= -1.0 + eps
        t = torch.where(top, torch.zeros_like(t), torch.where(bottom, math.pi, t))
        j1 = torch.where(top, torch.full_like(j1, math.pi), torch.where(bottom, 0.0, j1))
        sxz_new = weight_var * norm / (2 * math.pi) * j1 + bias_var
        dot = weight_var * (math.pi - t) / (2 * math.pi)
        ntk = ntk * dot + sxz_new
        sxz = sxz_new
        # E[relu(u)^2] = var / 2 for the diagonal terms.
        sxx = weight_var * sxx / 2 + bias_var
        szz = weight_var * szz / 2 + bias_var
    return sxz, ntk


def ntk_kernel(X, Z=None, depth=3, weight_var=2.0, bias_var=0.1):
    """Neural tangent kernel of a fully-connected ReLU network (closed form).

    The network has ``depth`` hidden ReLU layers and a linear read-out, in the
    NTK parameterization: each layer computes
    ``sqrt(weight_var / fan_in) * W @ a + sqrt(bias_var) * b`` with standard
    normal ``W`` and ``b``. The kernel is the infinite-width limit of
    ``<df(x)/dparams, df(z)/dparams>`` at initialization, computed by the
    arc-cosine recursion in the module docstring.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    Z : torch.Tensor of shape (m, d), optional
        Defaults to ``X``.
    depth : int, default=3
        Number of hidden layers (>= 1).
    weight_var : float, default=2.0
        Weight variance ``sigma_w^2`` (2 keeps ReLU activations at unit scale).
    bias_var : float, default=0.1
        Bias variance ``sigma_b^2``.

    Returns
    -------
    torch.Tensor of shape (n, m)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import ntk_kernel
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> K = ntk_kernel(x, depth=1, weight_var=2.0, bias_var=0.0)
    >>> [round(v, 4) for v in K[0].tolist()]  # diagonal: Theta = Sigma * 1 + Sigma
    [2.0, 0.3183]
    """
    return _arccos_recursion(X, Z, depth, weight_var, bias_var)[1]


def nngp_kernel(X, Z=None, depth=3, weight_var=2.0, bias_var=0.1):
    """Gaussian-process kernel of the same ReLU network (read-out trained only).

    Parameters are those of :func:`ntk_kernel`; returns
    :math:`\\Sigma^{(depth)}` of the arc-cosine recursion.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import nngp_kernel
    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> K = nngp_kernel(x, depth=1, weight_var=2.0, bias_var=0.0)
    >>> [round(v, 4) for v in K[0].tolist()]
    [1.0, 0.3183]
    """
    return _arccos_recursion(X, Z, depth, weight_var, bias_var)[0]


_KERNELS = {
    "linear": linear_kernel,
    "rbf": rbf_kernel,
    "poly": poly_kernel,
    "ntk": ntk_kernel,
    "nngp": nngp_kernel,
}


def available_kernels():
    """Names accepted by :func:`pairwise_kernel`.

    Examples
    --------
    >>> from skbilevel.hypergrad import available_kernels
    >>> available_kernels()
    ['linear', 'nngp', 'ntk', 'poly', 'rbf']
    """
    return sorted(_KERNELS)


def kernel_diagonal(X, kernel="rbf", **params):
    """``k(x_i, x_i)`` for every row of ``X``, without the off-diagonal entries.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    kernel : str or callable, default="rbf"
        A callable falls back to the diagonal of its full Gram matrix.
    **params
        Kernel parameters, as for :func:`pairwise_kernel`.

    Returns
    -------
    torch.Tensor of shape (n,)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import kernel_diagonal, ntk_kernel
    >>> X = torch.randn(5, 3, dtype=torch.float64)
    >>> full = ntk_kernel(X, depth=2).diagonal()
    >>> bool(torch.allclose(kernel_diagonal(X, "ntk", depth=2), full))
    True
    """
    if callable(kernel) or kernel not in _KERNELS:
        return torch.diagonal(pairwise_kernel(X, kernel=kernel, **params))
    # the kernel's own checks of its parameters, names and values, on one row
    # (a misspelt one, gama=0.1, was ignored here where pairwise_kernel refuses it)
    pairwise_kernel(X[:1], kernel=kernel, **params)
    sq = (X * X).sum(1)
    if kernel == "linear":
        return sq
    if kernel == "rbf":
        return torch.ones_like(sq)
    d = X.shape[1]
    if kernel == "poly":
        degree, gamma = params.get("degree", 3), params.get("gamma")
        gamma = 1.0 / d if gamma is None else gamma
        return (gamma * sq + params.get("coef0", 1.0)) ** degree
    depth = params.get("depth", 3)
    wv, bv = params.get("weight_var", 2.0), params.get("bias_var", 0.1)
    if int(depth) != depth or depth < 1:
        raise ValueError(f"depth must be an integer >= 1 (hidden layers); got {depth!r}.")
    # on the diagonal the correlation is 1: E[relu(u)^2] = var/2, E[relu'(u)^2] = 1/2
    sigma = wv * sq / d + bv
    ntk = sigma
    for _ in range(int(depth)):
        sigma = wv * sigma / 2 + bv
        ntk = ntk * (wv / 2) + sigma
    return ntk if kernel == "ntk" else sigma


def pairwise_kernel(X, Z=None, kernel="rbf", **params):
    """Gram matrix of a named kernel (or a callable ``kernel(X, Z, **params)``).

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
    Z : torch.Tensor of shape (m, d), optional
    kernel : str or callable, default="rbf"
        One of :func:`available_kernels`, or a callable.
    **params
        Keyword arguments of the kernel (``gamma``, ``degree``, ``depth``...).

    Returns
    -------
    torch.Tensor of shape (n, m)

    Raises
    ------
    ValueError
        For an unknown kernel name or parameter.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import pairwise_kernel
    >>> pairwise_kernel(torch.eye(2), kernel="linear")
    tensor([[1., 0.],
            [0., 1.]])
    """
    if callable(kernel):
        return kernel(X, X if Z is None else Z, **params)
    if kernel not in _KERNELS:
        raise ValueError(
            f"Unknown kernel {kernel!r}; use one of {available_kernels()} or a callable "
            "kernel(X, Z, **params) returning a torch Gram matrix."
        )
    try:
        return _KERNELS[kernel](X, Z, **params)
    except TypeError as exc:
        raise ValueError(
            f"Bad parameters {sorted(params)} for kernel {kernel!r}: {exc}"
        ) from exc


def kernel_ridge_predict(K_test, K_train, y_train, reg):
    """Kernel ridge predictions ``K_test (K_train + lam I)^{-1} y_train``, differentiable.

    ``lam = reg * trace(K_train) / n`` so that ``reg`` does not depend on the
    scale of the kernel (as in KIP). Solved by a Cholesky factorization inside
    autograd, so gradients flow to every input.

    Parameters
    ----------
    K_test : torch.Tensor of shape (m, n)
    K_train : torch.Tensor of shape (n, n)
    y_train : torch.Tensor of shape (n,) or (n, k)
    reg : float
        Relative ridge penalty (> 0).

    Returns
    -------
    torch.Tensor of shape (m,) or (m, k)

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import kernel_ridge_predict
    >>> K = torch.eye(2, dtype=torch.float64)
    >>> kernel_ridge_predict(K, K, torch.tensor([1.0, -1.0], dtype=torch.float64), reg=1.0)
    tensor([ 0.5000, -0.5000], dtype=torch.float64)
    """
    from ._closed_form import _check_kernel_test

    alpha = kernel_ridge_coef(K_train, y_train, reg)
    return _check_kernel_test(K_test, alpha, "kernel_ridge_predict") @ alpha


def kernel_ridge_coef(K_train, y_train, reg):
    """Dual coefficients ``(K + lam I)^{-1} y`` with ``lam = reg * trace(K) / n``.

    A relative-penalty front end to
    :func:`~skbilevel.hypergrad.kernel_ridge_fit` (Cholesky, LU fallback).

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import kernel_ridge_coef
    >>> kernel_ridge_coef(2 * torch.eye(2, dtype=torch.float64),
    ...                   torch.tensor([1.0, 2.0], dtype=torch.float64), reg=1.0)
    tensor([0.2500, 0.5000], dtype=torch.float64)
    """
    from ._closed_form import kernel_ridge_fit

    r = reg.detach() if isinstance(reg, torch.Tensor) else torch.as_tensor(reg)
    if not (bool(torch.isfinite(r).all()) and bool((r > 0).all())):
        raise ValueError(f"reg must be a finite number > 0 (relative penalty); got {reg!r}.")
    lam = reg * torch.diagonal(K_train).mean()
    return kernel_ridge_fit(K_train, y_train, lam)


class _NamedKernel:
    """``kernel(A, B)`` for a name (or callable) and its parameters; picklable."""

    def __init__(self, kernel, params):
        self.kernel, self.params = kernel, dict(params)

    def __call__(self, A, B=None):
        return pairwise_kernel(A, B, kernel=self.kernel, **self.params)

    def diagonal(self, A):
        """``k(a_i, a_i)`` for each row."""
        if isinstance(self.kernel, str):
            return kernel_diagonal(A, kernel=self.kernel, **self.params)
        return torch.diagonal(self(A))


def kip_loss(
    X_support,
    y_support,
    X_target,
    y_target,
    *,
    kernel="ntk",
    reg=1e-6,
    hypergradient="closed_form",
    **kernel_params,
):
    """Outer loss of kernel inducing points (KIP, Nguyen et al. 2021).

    Kernel ridge regression is fitted on the support set (the synthetic
    data) with :class:`~skbilevel.hypergrad.KernelRidgeSolver` through
    :func:`~skbilevel.hypergrad.argmin`, and its mean squared error on the
    target set (real data) is returned:

    .. math::

        L = \\frac{1}{m k} \\| K_{ts} (K_{ss} + \\lambda I)^{-1} y_s - y_t \\|^2,
        \\qquad \\lambda = \\text{reg} \\cdot \\operatorname{tr}(K_{ss}) / n_s.

    ``L`` is differentiable in ``X_support`` and ``y_support`` (whichever
    require grad). With ``hypergradient="closed_form"`` the derivative is
    exact autograd through a Cholesky solve; implicit strategies (``"dense"``,
    ``"cg"``) give the same value through the implicit function theorem.

    Parameters
    ----------
    X_support : torch.Tensor of shape (n_s, d)
    y_support : torch.Tensor of shape (n_s,) or (n_s, k)
    X_target : torch.Tensor of shape (m, d)
    y_target : torch.Tensor of shape (m,) or (m, k)
    kernel : str or callable, default="ntk"
        See :func:`pairwise_kernel`.
    reg : float, default=1e-6
        Ridge penalty relative to the mean diagonal of ``K_ss`` (> 0).
    hypergradient : str or HypergradientStrategy, default="closed_form"
    **kernel_params
        Passed to the kernel.

    Returns
    -------
    loss : torch.Tensor (scalar)
    info : HypergradientInfo

    Examples
    --------
    >>> import torch
    >>> from skbilevel.hypergrad import kip_loss
    >>> g = torch.Generator().manual_seed(0)
    >>> Xt = torch.randn(50, 3, generator=g, dtype=torch.float64)
    >>> yt = Xt[:, :1].sign()
    >>> Xs = Xt[:4].clone().requires_grad_(True)
    >>> loss, info = kip_loss(Xs, yt[:4], Xt, yt, kernel="rbf", reg=1e-3)
    >>> loss.backward()
    >>> Xs.grad.shape, info.strategy
    (torch.Size([4, 3]), 'closed_form')
    """
    from ._base import argmin
    from ._closed_form import KernelRidgeSolver

    if not reg > 0:
        raise ValueError(f"reg must be > 0 for kernel ridge; got {reg!r}.")
    kern = kernel if isinstance(kernel, _NamedKernel) else _NamedKernel(kernel, kernel_params)
    y_support = y_support.to(X_support.dtype)
    diag = kern.diagonal(X_support)
    log_lam = math.log(reg) + torch.log(diag.mean().clamp_min(torch.finfo(diag.dtype).tiny))
    phi = {"X": X_support, "y": y_support, "log_reg": log_lam}
    solver = KernelRidgeSolver(kernel=kern, y=y_support)
    dual, info = argmin(
        solver.inner_loss, phi, torch.zeros_like(y_support), hypergradient=hypergradient,
        solver=solver,
    )
    pred = solver.predict(dual, phi, X_test=X_target)
    return ((pred - y_target.to(pred.dtype).reshape(pred.shape)) ** 2).mean(), info
