"""Sparse CSR tensors, built without torch's one-time "beta state" warning.

Torch warns once per process, at the first CSR tensor, that its CSR
support is in beta, and again at every construction that does not say
whether to check the index invariants. The fold problems build their CSR
matrices here (from indices that are valid by construction: scipy's
canonical CSR or another CSR tensor), so neither reaches the user.
"""

import contextlib
import warnings

import torch


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        yield


def csr_tensor(crow_indices, col_indices, values, size, device=None):
    """A CSR tensor from valid CSR arrays (no invariant check, no warning)."""
    with _quiet():
        return torch.sparse_csr_tensor(
            crow_indices,
            col_indices,
            values,
            size=tuple(size),
            device=device,
            check_invariants=False,
        )


def to_csr(X):
    """``X`` (any sparse layout, or dense) in CSR layout."""
    if X.layout == torch.sparse_csr:
        return X
    with _quiet():
        return X.to_sparse_csr()


def csr_transpose(X):
    """``X^T`` of a CSR tensor, itself in CSR layout."""
    return to_csr(X.t())


def csr_with_values(X, values):
    """The CSR tensor with ``X``'s sparsity pattern and the given ``values``."""
    return csr_tensor(X.crow_indices(), X.col_indices(), values, X.shape, device=X.device)
