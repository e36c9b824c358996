"""Fixtures shared by the test packages."""

import pytest
import torch


class _TupleNet(torch.nn.Module):
    """A module whose forward returns a tuple (logits and its input), as some
    user networks do: the estimators must refuse it with a clear error."""

    def __init__(self, n_features, n_outputs):
        super().__init__()
        self.out = torch.nn.Linear(n_features, n_outputs)

    def forward(self, x):
        return self.out(x), x


@pytest.fixture
def tuple_net():
    """The module class :class:`_TupleNet`, for an estimator's ``module``."""
    return _TupleNet


def _unit_variance_factors(X):
    """Each column's mean squared deviation: the factor by which HyperL2's
    per-feature penalties (in the units of ``X``) relate to those of the
    search, which runs on features rescaled to unit variance."""
    import numpy as np

    X = np.asarray(X, dtype=float)
    return ((X - X.mean(0)) ** 2).mean(0)


@pytest.fixture
def variance_factors():
    """The function :func:`_unit_variance_factors`."""
    return _unit_variance_factors


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, name)`` patches ``owner.name`` (a method of a
    class, or a function of a module) to count its calls, and returns a list
    that grows by one per call."""

    def count(owner, name):
        calls = []
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return count
