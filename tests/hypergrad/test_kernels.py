import math

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import linear_kernel as sk_linear
from sklearn.metrics.pairwise import polynomial_kernel as sk_poly
from sklearn.metrics.pairwise import rbf_kernel as sk_rbf

from skbilevel.hypergrad import (
    available_kernels,
    kernel_diagonal,
    kernel_ridge_coef,
    kernel_ridge_predict,
    nngp_kernel,
    ntk_kernel,
    pairwise_kernel,
)

DT = torch.float64


def _wide_relu_net(d, depth, width, weight_var, bias_var, gen):
    """Parameters of a ReLU MLP in the NTK parameterization (standard normal draws)."""
    params, fan = [], d
    for layer in range(depth + 1):
        out = 1 if layer == depth else width
        params.append(torch.randn(out, fan, dtype=DT, generator=gen).requires_grad_(True))
        params.append(torch.randn(out, dtype=DT, generator=gen).requires_grad_(True))
        fan = out
    return params


def _forward(params, X, weight_var, bias_var, return_hidden=False):
    a = X
    n_layers = len(params) // 2
    for layer in range(n_layers):
        W, b = params[2 * layer], params[2 * layer + 1]
        h = math.sqrt(weight_var / W.shape[1]) * a @ W.T + math.sqrt(bias_var) * b
        if layer == n_layers - 1:
            return a if return_hidden else h[:, 0]
        a = torch.relu(h)


def _empirical_ntk(params, X, weight_var, bias_var):
    out = _forward(params, X, weight_var, bias_var)
    rows = []
    for i in range(X.shape[0]):
        grads = torch.autograd.grad(out[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    J = torch.stack(rows)
    return J @ J.T


@pytest.mark.parametrize("depth", [1, 3])
def test_ntk_matches_monte_carlo_of_wide_networks(depth):
    # Average of the empirical NTK of n_nets random networks of width 512: the
    # closed form must lie within the Monte-Carlo error (5 standard errors,
    # plus 2% for the O(1/width) finite-width bias).
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4, 5, dtype=DT, generator=gen)
    wv, bv, width, n_nets = 2.0, 0.1, 512, 16
    samples = torch.stack(
        [_empirical_ntk(_wide_relu_net(5, depth, width, wv, bv, gen), X, wv, bv)
         for _ in range(n_nets)]
    )
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(n_nets)
    exact = ntk_kernel(X, depth=depth, weight_var=wv, bias_var=bv)
    err = (mean - exact).abs()
    assert torch.all(err <= 5 * se + 0.02 * exact.abs()), (err, se)
    # and the MC error is small enough for the test to mean something
    assert float(se.max() / exact.abs().max()) < 0.05


def test_nngp_matches_last_hidden_layer_of_wide_network():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 3, dtype=DT, generator=gen)
    wv, bv, depth, width = 2.0, 0.2, 2, 4000
    with torch.no_grad():
        params = _wide_relu_net(3, depth, width, wv, bv, gen)
        a = _forward(params, X, wv, bv, return_hidden=True)
    empirical = wv * a @ a.T / width + bv
    exact = nngp_kernel(X, depth=depth, weight_var=wv, bias_var=bv)
    torch.testing.assert_close(empirical, exact, rtol=0.05, atol=0.02)


def test_ntk_known_values_and_psd():
    X = torch.eye(3, dtype=DT)
    K = ntk_kernel(X, depth=1, weight_var=2.0, bias_var=0.0)
    # orthogonal unit inputs (scaled by 2/d): Sigma0 = 2/3 on the diagonal, 0 off it
    s0 = 2.0 / 3
    torch.testing.assert_close(torch.diagonal(K), torch.full((3,), 2 * s0, dtype=DT))
    torch.testing.assert_close(K[0, 1], torch.tensor(2 * s0 / (2 * math.pi), dtype=DT))
    Xr = torch.randn(30, 4, dtype=DT)
    for name in available_kernels():
        G = pairwise_kernel(Xr, kernel=name)
        torch.testing.assert_close(G, G.T)
        assert float(torch.linalg.eigvalsh(G).min()) > -1e-8 * float(G.diagonal().max())


def test_simple_kernels_match_scikit_learn():
    rng = np.random.RandomState(0)
    A, B = rng.randn(6, 4), rng.randn(5, 4)
    tA, tB = torch.from_numpy(A), torch.from_numpy(B)
    np.testing.assert_allclose(
        pairwise_kernel(tA, tB, kernel="linear").numpy(), sk_linear(A, B)
    )
    np.testing.assert_allclose(
        pairwise_kernel(tA, tB, kernel="rbf", gamma=0.3).numpy(), sk_rbf(A, B, gamma=0.3)
    )
    np.testing.assert_allclose(
        pairwise_kernel(tA, tB, kernel="poly", degree=2, gamma=0.5, coef0=2.0).numpy(),
        sk_poly(A, B, degree=2, gamma=0.5, coef0=2.0),
    )


@pytest.mark.parametrize("name", ["rbf", "poly", "ntk", "nngp", "linear"])
def test_kernels_gradcheck(name):
    X = torch.randn(4, 3, dtype=DT, requires_grad=True)
    Z = torch.randn(3, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: pairwise_kernel(a, b, kernel=name), (X, Z))
    # the Gram matrix of one set (diagonal included) has a finite gradient
    G = pairwise_kernel(X, kernel=name)
    (g,) = torch.autograd.grad(G.sum(), X)
    assert torch.isfinite(g).all()


def test_kernel_ridge_predict_matches_numpy():
    rng = np.random.RandomState(0)
    X, y, Xt = rng.randn(8, 3), rng.randn(8, 2), rng.randn(4, 3)
    K, Kt = X @ X.T, Xt @ X.T
    lam = 0.1 * np.trace(K) / 8
    expected = Kt @ np.linalg.solve(K + lam * np.eye(8), y)
    got = kernel_ridge_predict(
        torch.from_numpy(Kt), torch.from_numpy(K), torch.from_numpy(y), 0.1
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    alpha = kernel_ridge_coef(torch.from_numpy(K), torch.from_numpy(y[:, 0]), 0.1)
    assert alpha.shape == (8,)


def test_unknown_kernel_and_bad_params():
    X = torch.randn(3, 2)
    with pytest.raises(ValueError, match="Unknown kernel 'cosine'"):
        pairwise_kernel(X, kernel="cosine")
    with pytest.raises(ValueError, match="depth must be an integer >= 1"):
        ntk_kernel(X, depth=0)
    with pytest.raises(ValueError, match="Bad parameters"):
        pairwise_kernel(X, kernel="rbf", depth=2)
    with pytest.raises(ValueError, match="features"):
        pairwise_kernel(X, torch.randn(2, 3), kernel="linear")


@pytest.mark.parametrize("name", ["rbf", "poly", "ntk", "nngp", "linear"])
def test_kernel_diagonal_matches_gram(name):
    from skbilevel.hypergrad import kernel_diagonal

    X = torch.randn(6, 4, dtype=DT)
    params = {"ntk": {"depth": 2, "bias_var": 0.3}, "poly": {"degree": 2, "coef0": 0.5}}
    params = params.get(name, {})
    full = torch.diagonal(pairwise_kernel(X, kernel=name, **params))
    torch.testing.assert_close(kernel_diagonal(X, name, **params), full)


@pytest.mark.parametrize("name", ["ntk", "nngp"])
def test_arccos_kernels_are_exact_on_identical_inputs(name):
    # the correlation was clamped to 1 - 2.2e-15, an angle of 6.7e-8 instead of 0
    # at every layer: a depth-3 NTK's diagonal was 6e-7 off kernel_diagonal
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    K = pairwise_kernel(X, X, kernel=name)
    diag = kernel_diagonal(X.detach(), kernel=name)
    torch.testing.assert_close(K.diagonal(), diag, rtol=1e-14, atol=0)
    # the same for two equal rows of different inputs, with a finite gradient
    Z = torch.cat([X[:2], X[:2] * 1.0])
    Kz = pairwise_kernel(Z, Z, kernel=name)
    torch.testing.assert_close(Kz[0, 2], Kz[0, 0], rtol=1e-14, atol=0)
    (grad,) = torch.autograd.grad(Kz.sum(), X)
    assert bool(torch.isfinite(grad).all())


def test_kernels_and_kernel_ridge_check_their_inputs():
    from skbilevel.hypergrad import kernel_ridge_fit, rbf_kernel

    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 3, generator=g, dtype=DT)
    y = torch.randn(5, generator=g, dtype=DT)
    # a numpy input: AttributeError 'dim'; float32 with float64: a dtype RuntimeError
    with pytest.raises(TypeError, match="Kernels take torch tensors; X is a ndarray"):
        rbf_kernel(A.numpy(), A)
    torch.testing.assert_close(rbf_kernel(A.float(), A), rbf_kernel(A, A))
    # gamma=-1 gave values of 1e8, NaN a NaN matrix
    for gamma in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="gamma must be finite and >= 0"):
            rbf_kernel(A, gamma=gamma)
    K = rbf_kernel(A)
    # a negative reg was solved as K - 0.1 I, NaN gave NaN, the wrong y or a
    # non-square K torch RuntimeErrors, float32 y a dtype RuntimeError
    for reg in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="reg must be a finite number >= 0"):
            kernel_ridge_fit(K, y, reg)
        with pytest.raises(ValueError, match="reg must be a finite number > 0"):
            kernel_ridge_coef(K, y, reg)
    with pytest.raises(ValueError, match="y must have one row per row of K"):
        kernel_ridge_fit(K, y[:3], 0.1)
    with pytest.raises(ValueError, match="K must be a square matrix"):
        kernel_ridge_fit(K[:, :3], y, 0.1)
    with pytest.raises(ValueError, match="K is not finite"):
        kernel_ridge_fit(K * float("nan"), y, 0.1)
    torch.testing.assert_close(kernel_ridge_fit(K, y.float(), 0.1), kernel_ridge_fit(K, y, 0.1))


def test_kernel_ridge_coef_names_a_non_finite_kernel_not_reg():
    """A NaN on K's diagonal made the relative penalty reg * mean(diag K) NaN,
    and kernel_ridge_fit said 'reg must be a finite number' of a valid reg."""
    K = torch.eye(3, dtype=torch.float64)
    K[1, 1] = float("nan")
    with pytest.raises(ValueError, match="K is not finite"):
        kernel_ridge_coef(K, torch.ones(3, dtype=torch.float64), reg=1e-3)


def test_kernel_ridge_coef_on_an_all_zero_kernel_is_a_value_error():
    """kernel_ridge_coef on an all-zero K (its relative penalty
    reg * mean(diag K) is then 0) raised torch's raw '_LinAlgError:
    torch.linalg.solve: The solver failed because the input matrix is
    singular'. Now a ValueError saying why no relative penalty can help."""
    with pytest.raises(ValueError, match="K's diagonal is zero .* kernel_ridge_coef's is "
                                         r"reg \* mean\(diag\(K\)\) = 0"):
        kernel_ridge_coef(torch.zeros(10, 10, dtype=DT), torch.ones(10, dtype=DT), 1.0)


def test_kernel_ridge_predict_checks_its_test_kernel():
    """A K_test with the wrong number of columns raised torch's 'size
    mismatch', a float32 one against float64 coefficients an addmv dtype
    error."""
    from skbilevel.hypergrad import kernel_ridge_predict

    K = torch.eye(4, dtype=torch.float64) * 2
    y = torch.ones(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"kernel_ridge_predict: K_test must have shape \(m, 4\)"):
        kernel_ridge_predict(K[:3, :3], K, y, 1.0)
    out = kernel_ridge_predict(K[:3].float(), K, y, 1.0)
    assert out.dtype == torch.float64 and out.shape == (3,)
