"""Sparse CSR tensors, built without torch's one-time "beta state" warning.

Torch warns once per process, at the first CSR tensor, that its CSR
support is in beta, and again at every construction that does not say
whether to check the index invariants. The fold problems build their CSR
matrices here (from indices that are valid by construction: scipy's
canonical CSR or another CSR tensor), so neither reaches the user.
"""

import contextlib
import warnings

import scipy.sparse as sp
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


def csr_rows(X, rows, scale=None):
    """The rows ``rows`` of a CSR tensor, each times ``scale`` (one factor
    per selected row) when given: a CSR tensor of shape ``(len(rows), p)``
    (``p = X.shape[1]``).

    Torch's ``index_select`` does not take CSR tensors; the selection is
    read from ``crow_indices`` directly (any device).
    """
    rows = torch.as_tensor(rows, device=X.device).reshape(-1)
    crow = X.crow_indices()
    starts = crow[rows]
    counts = crow[rows + 1] - starts
    new_crow = torch.zeros(len(rows) + 1, dtype=crow.dtype, device=X.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    nnz = int(new_crow[-1])
    # the position in X of every kept entry: its row's start there plus its rank
    idx = torch.repeat_interleave(starts - new_crow[:-1], counts, output_size=nnz)
    idx += torch.arange(nnz, dtype=idx.dtype, device=X.device)
    values = X.values()[idx]
    if scale is not None:
        values = values * torch.repeat_interleave(scale.to(values), counts, output_size=nnz)
    return csr_tensor(
        new_crow, X.col_indices()[idx], values, (len(rows), X.shape[1]), device=X.device
    )


def to_scipy(X):
    """A CPU CSR tensor as a ``scipy.sparse.csr_matrix`` sharing its memory."""
    return sp.csr_matrix(
        (X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
        shape=tuple(X.shape),
    )
