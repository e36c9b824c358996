"""Device and dtype resolution and numpy <-> torch conversion for estimators."""

import contextlib
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning

from ..hypergrad import HypergradientWarning
from ..hypergrad._sparse import csr_tensor

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "to_tensor",
    "to_numpy",
    "torch_generator",
    "core_warnings_as_sklearn",
]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_device(device):
    """Return a :class:`torch.device`, raising ``ValueError`` if it is unusable.

    Parameters
    ----------
    device : str, torch.device or None
        ``None`` and ``"cpu"`` (or ``"cpu:0"``) mean the CPU; ``"auto"`` picks
        CUDA when one is available; ``"cuda"``, ``"cuda:1"``, ``"mps"`` must
        exist. Any other CPU index (``"cpu:7"``) is an error: torch ignores it.

    Examples
    --------
    >>> from skbilevel.utils import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid torch device; use 'cpu', 'cuda', "
            "'cuda:N', 'mps' or 'auto'."
        ) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={device!r} was requested but CUDA is not available on this "
                "machine (torch.cuda.is_available() is False). Use device='cpu' or "
                "device='auto'."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)."
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(
                f"device={device!r} was requested but MPS is not available. Use "
                "device='cpu'."
            )
    elif dev.type != "cpu":
        raise ValueError(f"device={device!r} is not supported; use 'cpu', 'cuda' or 'mps'.")
    elif dev.index is not None:
        # torch accepts 'cpu:7' but drops the index: torch.zeros(1, device='cpu:7')
        # lands on device 'cpu', so 'cpu:7' was a silent no-op (likely a typo of
        # 'cuda:7'). torch.cpu.device_count() is 1, so as for CUDA an index past
        # the last device is an error; 'cpu:0' names the one CPU and is returned
        # as 'cpu', the device tensors report (torch.device('cpu:0') != 'cpu').
        if dev.index != 0:
            raise ValueError(
                f"device={device!r}: the CPU has no device index (torch ignores it "
                "and runs on the one CPU); use device='cpu', or 'cuda:N' for the "
                "N-th GPU."
            )
        dev = torch.device("cpu")
    return dev


def resolve_dtype(dtype, supported=None, why=None):
    """Return a floating :class:`torch.dtype` from a name, numpy or torch dtype.

    Parameters
    ----------
    dtype : str, numpy dtype, torch.dtype or None
        ``None`` is float64.
    supported : tuple of str, optional
        The names of the precisions the caller computes in (default: float32,
        float64, float16 and bfloat16). Estimators whose solves factorize
        matrices pass ``("float32", "float64")``: torch has no half-precision
        Cholesky or eigendecomposition on CPU.
    why : str, optional
        Why the others are not supported: appended to the error message.

    Returns
    -------
    torch.dtype

    Raises
    ------
    ValueError
        When ``dtype`` is not a floating-point dtype of ``supported``.

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.utils import resolve_dtype
    >>> resolve_dtype(np.float32)
    torch.float32
    >>> resolve_dtype("torch.float64")
    torch.float64
    >>> resolve_dtype("float16", supported=("float32", "float64"))
    Traceback (most recent call last):
    ...
    ValueError: dtype='float16' is not supported here; use 'float32' or 'float64'.
    """
    names = tuple(_DTYPES) if supported is None else tuple(supported)
    if dtype is None:
        return torch.float64
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype={dtype!r} must be a floating-point dtype.")
        name = str(dtype).replace("torch.", "")
    else:
        if isinstance(dtype, str) and dtype.startswith("torch."):
            dtype = dtype[len("torch.") :]  # "torch.float32", as str(torch.float32) prints
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in _DTYPES or name not in names:
        where = "" if supported is None else " here"
        shown = [repr(n) for n in (names[:2] if supported is None else names)]
        use = " or ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown)
        # ``why`` explains the floating precisions left out, not an integer dtype
        reason = "" if why is None or name not in _DTYPES else f" {why}"
        raise ValueError(f"dtype={dtype!r} is not supported{where}; use {use}.{reason}")
    return _DTYPES[name]


def _resolve_adam_dtype(dtype, factorization=None):
    """:func:`resolve_dtype` for the estimators whose outer loop runs Adam.

    float16 is refused (Adam turns zero or tiny gradients into NaN or inf
    there); bfloat16 is kept unless the fit factorizes a matrix:
    ``factorization`` says which one (a sentence's subject, e.g. ``"R2D2's
    ridge head solves a linear system"``), and only float32 and float64 are
    then supported.
    """
    if factorization is not None:
        return resolve_dtype(
            dtype,
            supported=("float32", "float64"),
            why=f"{factorization}, which torch does only in float32 and float64.",
        )
    return resolve_dtype(
        dtype,
        supported=("float32", "float64", "bfloat16"),
        why="In float16 the outer Adam steps turn zero or tiny gradients into NaN or "
        "inf; use 'bfloat16' for half precision.",
    )


def to_tensor(array, device=None, dtype=torch.float64, keep_sparse=False):
    """Convert an array-like (dense or scipy sparse) to a torch tensor.

    Dense, unless ``keep_sparse`` and ``array`` is a scipy sparse matrix:
    then a CSR tensor (duplicate entries summed), whose products cost in
    proportion to its nonzeros.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> from skbilevel.utils import to_tensor
    >>> X = sp.csr_matrix([[0.0, 2.0], [1.0, 0.0]])
    >>> to_tensor(X).tolist(), to_tensor(X, keep_sparse=True).layout
    ([[0.0, 2.0], [1.0, 0.0]], torch.sparse_csr)
    """
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=dtype)
    if sp.issparse(array) and keep_sparse:
        csr = sp.csr_matrix(array, copy=True)
        csr.sum_duplicates()  # canonical: sorted column indices, no repeats
        return csr_tensor(
            torch.as_tensor(csr.indptr, dtype=torch.int64),
            torch.as_tensor(csr.indices, dtype=torch.int64),
            torch.as_tensor(csr.data, dtype=dtype),
            csr.shape,
            device=device,
        )
    if sp.issparse(array):
        array = array.toarray()
    array = np.asarray(array)
    if not array.flags.writeable:  # torch warns on read-only buffers (memmaps)
        array = array.copy()
    return torch.as_tensor(array, dtype=dtype, device=device)


def to_numpy(tensor):
    """Detach, move to CPU and convert a tensor to a numpy array."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(tensor)


@contextlib.contextmanager
def _seeded_global_rng(seed, device=None):
    """Run the block on torch's global generator seeded with ``seed`` (and the
    CUDA one of ``device``), restoring the caller's streams afterwards: for
    draws an estimator does not make itself (dropout in a user's module, the
    proxy hypergradients), so that two fits with one ``random_state`` agree."""
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def torch_generator(random_state, device=None):
    """A :class:`torch.Generator` seeded from a scikit-learn ``random_state``."""
    from sklearn.utils import check_random_state

    rng = check_random_state(random_state)
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(int(rng.randint(0, 2**31 - 1)))
    return gen


@contextlib.contextmanager
def core_warnings_as_sklearn():
    """Re-emit the solver core's warnings as scikit-learn ``ConvergenceWarning``.

    The core (:mod:`skbilevel.hypergrad`) cannot import scikit-learn; estimators
    wrap their calls into it with this context so users can filter the usual
    ``sklearn.exceptions.ConvergenceWarning``. Messages are kept verbatim;
    repeated identical messages are reported once.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HypergradientWarning)
        yield
    seen = set()
    for w in caught:
        if issubclass(w.category, HypergradientWarning):
            msg = str(w.message)
            if msg not in seen:
                seen.add(msg)
                warnings.warn(msg, ConvergenceWarning, stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
