"""Summary statistics that stay finite at any finite scale of the data."""

import numpy as np


def _rms(A, axis=None):
    """Root mean square of ``A`` (along ``axis``), also where its squares would
    overflow (``|A|`` beyond 1e154) or underflow to zero (below 1e-154): those
    are computed on ``A`` divided by its largest magnitude. In float64 whatever
    ``A``'s dtype: float32 squares overflow beyond 1.8e19.

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.utils._stats import _rms
    >>> float(_rms(np.array([3e200, -4e200]))), float(_rms(np.float32([3e20, -4e20])))
    (3.5355...e+200, 3.5355...e+20)
    """
    A = np.asarray(A, dtype=np.float64)
    m = np.abs(A).max(axis=axis)
    with np.errstate(over="ignore", under="ignore"):
        plain = np.sqrt((A**2).mean(axis=axis))
        scaled = m * np.sqrt(((A / np.where(m > 0, m, 1.0)) ** 2).mean(axis=axis))
    return np.where((m > 1e-150) & (m < 1e150), plain, scaled)


def _softmax(logits):
    """Row-wise softmax of ``logits``, computed in float64: probabilities whose
    rows sum to 1 within float64 rounding (scikit-learn's ``log_loss`` checks
    that), whatever precision the logits come in.

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.utils._stats import _softmax
    >>> _softmax(np.float32([[0.0, np.log(3.0)]])).round(6).tolist()
    [[0.25, 0.75]]
    """
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)
