import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import ConvergenceWarning

from skbilevel.hypergrad import LinearSolveWarning
from skbilevel.utils import (
    core_warnings_as_sklearn,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
    torch_generator,
)


def test_resolve_device():
    assert resolve_device(None).type == "cpu"
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="not a valid torch device"):
        resolve_device("gpu0")


@pytest.mark.parametrize("device", ["cpu:7", "cpu:1", torch.device("cpu", 3)])
def test_cpu_device_index_is_rejected(device):
    """torch accepts 'cpu:7' but drops the index (tensors land on 'cpu'), and
    resolve_device returned device(type='cpu', index=7): every estimator took
    device='cpu:7' silently."""
    with pytest.raises(ValueError, match=r"the CPU has no device index.*device='cpu'"):
        resolve_device(device)


def test_cpu_0_is_the_cpu():
    """'cpu:0' names the one CPU: it resolves to the device tensors report
    ('cpu'; torch.device('cpu:0') != torch.device('cpu'))."""
    assert resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.zeros(1, device="cpu:0").device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_resolves():
    assert resolve_device("cuda").type == "cuda"


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float64
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(np.float64) is torch.float64
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="float32"):
        resolve_dtype("int64")
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int32)
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("float32", supported=("float32", "float64")) is torch.float32
    for half in ("float16", torch.bfloat16, np.float16):
        with pytest.raises(ValueError, match="not supported here; use 'float32'"):
            resolve_dtype(half, supported=("float32", "float64"))
    # the names torch prints are accepted ("torch.float32" was "not supported")
    assert resolve_dtype("torch.float32") is torch.float32
    # the reason given for leaving out half precisions is not given for integers
    why = "Its solves factorize matrices."
    with pytest.raises(ValueError, match="Its solves"):
        resolve_dtype("float16", supported=("float32", "float64"), why=why)
    with pytest.raises(ValueError, match=r"use 'float32' or 'float64'\.$"):
        resolve_dtype("int32", supported=("float32", "float64"), why=why)


def test_round_trip_dense_and_sparse():
    X = np.arange(6.0).reshape(2, 3)
    t = to_tensor(sp.csr_matrix(X), dtype=torch.float32)
    assert t.dtype is torch.float32 and t.shape == (2, 3)
    np.testing.assert_array_equal(to_numpy(t), X.astype(np.float32))
    np.testing.assert_array_equal(to_numpy(to_tensor(X)), X)


def test_torch_generator_is_reproducible():
    a = torch.rand(3, generator=torch_generator(0))
    b = torch.rand(3, generator=torch_generator(0))
    torch.testing.assert_close(a, b)


def test_core_warnings_become_sklearn_convergence_warnings():
    with pytest.warns(ConvergenceWarning, match="residual 1.0e-02"):
        with core_warnings_as_sklearn():
            warnings.warn("CG: residual 1.0e-02", LinearSolveWarning)
            warnings.warn("CG: residual 1.0e-02", LinearSolveWarning)  # deduplicated
    with pytest.warns(RuntimeWarning, match="other"):
        with core_warnings_as_sklearn():
            warnings.warn("other", RuntimeWarning)
