"""Summary statistics that stay finite at any finite scale of the data."""

import numpy as np


def _rms(A, axis=None):
    """Root mean square of ``A`` (along ``axis``), also where its squares would
    overflow (``|A|`` beyond 1e154) or underflow to zero (below 1e-154): those
    are computed on ``A`` divided by its largest magnitude."""
    m = np.abs(A).max(axis=axis)
    with np.errstate(over="ignore", under="ignore"):
        plain = np.sqrt((A**2).mean(axis=axis))
        scaled = m * np.sqrt(((A / np.where(m > 0, m, 1.0)) ** 2).mean(axis=axis))
    return np.where((m > 1e-150) & (m < 1e150), plain, scaled)
