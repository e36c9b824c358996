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
    "available_kernels",
    "kernel_ridge_predict",
    "kernel_ridge_coef",
]



def _check_pair(X, Z):
    Z = X if Z is None else Z
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
    return torch.exp(-gamma * _sq_dists(X, Z))


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
        c = (sxz / norm).clamp(-1.0 + eps, 1.0 - eps)
        t = torch.arccos(c)
        sxz_new = weight_var * norm / (2 * math.pi) * (torch.sqrt(1 - c * c) + (math.pi - t) * c) + bias_var
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
    >>> [round(v, 4) for v in K[0].tolist()]  # 2 * 1/2 on the diagonal: Theta = Sigma*1 + Sigma
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
        raise ValueError(f"Bad parameters {sorted(params)} for kernel {kernel!r}: {exc}") from exc


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
    alpha = kernel_ridge_coef(K_train, y_train, reg)
    return K_test @ alpha


def kernel_ridge_coef(K_train, y_train, reg):
    """Dual coefficients ``(K + lam I)^{-1} y`` with ``lam = reg * trace(K) / n``."""
    n = K_train.shape[0]
    lam = reg * torch.diagonal(K_train).sum() / n
    A = K_train + lam * torch.eye(n, dtype=K_train.dtype, device=K_train.device)
    rhs = y_train if y_train.dim() == 2 else y_train[:, None]
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        alpha = torch.cholesky_solve(rhs, L)
    else:
        # Not numerically positive definite (tiny reg, duplicated points): LU instead.
        alpha = torch.linalg.solve(A, rhs)
    return alpha if y_train.dim() == 2 else alpha[:, 0]
