"""Synthetic data shared by the tests and the benchmarks."""

import numpy as np


def make_relevance_tiers(
    n_samples, n_features, n_strong, n_weak, noise_ratio=0.16, random_state=0
):
    """Linear regression data with three tiers of relevance.

    ``y = X w + noise + 3``: ``n_strong`` coefficients drawn in +-[1, 2],
    ``n_weak`` in +-[0.05, 0.3], the rest 0, at random positions; ``X`` is
    standard normal and the noise's standard deviation ``noise_ratio`` times
    that of ``X w``. The data where one penalty per feature pays: the
    benchmark's ``hetero`` and ``wide`` sets (``bench_hyper_l2.py``) and the
    tests that reproduce them.

    Parameters
    ----------
    n_samples, n_features, n_strong, n_weak : int
    noise_ratio : float, default=0.16
    random_state : int, default=0
        Seed of a ``numpy.random.RandomState``.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)

    Examples
    --------
    >>> from skbilevel.utils._datasets import make_relevance_tiers
    >>> X, y = make_relevance_tiers(100, 20, 2, 3)
    >>> X.shape, y.shape
    ((100, 20), (100,))
    """
    rng = np.random.RandomState(random_state)
    w = np.zeros(n_features)
    w[:n_strong] = rng.uniform(1, 2, n_strong) * rng.choice([-1, 1], n_strong)
    w[n_strong : n_strong + n_weak] = rng.uniform(0.05, 0.3, n_weak) * rng.choice(
        [-1, 1], n_weak
    )
    w = w[rng.permutation(n_features)]
    X = rng.randn(n_samples, n_features)
    f = X @ w
    return X, f + noise_ratio * np.std(f) * rng.randn(n_samples) + 3.0
