"""iMAML's linear solve: a fixed CG budget, indefinite systems, no inner step."""

import numpy as np
import torch

from skbilevel.hypergrad import FunctionalModel, batched_cg, get_meta_method

DT = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 1))
    return FunctionalModel(net.to(DT), "mse")


def _batch(n_tasks=3, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, n, 2, generator=g, dtype=DT)
    xq = torch.randn(n_tasks, n, 2, generator=g, dtype=DT)
    w = 3 * torch.randn(n_tasks, 2, 1, generator=g, dtype=DT)
    return xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)


def _grad(method, model, batch):
    meta = method.init_meta(model)
    for v in meta["params"].values():
        v.requires_grad_(True)
    loss, info = method.meta_loss(model, meta, batch)
    loss.backward()
    return torch.cat([v.grad.reshape(-1) for v in meta["params"].values()]), info


def test_zero_inner_steps_gives_the_query_gradient_without_a_solve():
    # theta = phi exactly, so d theta/d phi = I: no system to solve, nothing to warn.
    model, batch = _model(), _batch()
    method = get_meta_method("imaml", inner_steps=0, lam=0.1)
    g_imaml, info = _grad(method, model, batch)
    g_maml, _ = _grad(get_meta_method("maml", inner_steps=0), model, batch)
    np.testing.assert_allclose(g_imaml.numpy(), g_maml.numpy(), rtol=1e-12, atol=1e-14)
    assert info.n_hvp == 0 and info.linear_solve_iterations == 0
    assert info.linear_solve_converged and info.linear_solve_residual == 0.0


def test_cg_budget_is_reported_not_failed_and_defaults_to_five_steps():
    model, batch = _model(), _batch()
    method = get_meta_method("imaml", inner_steps=5, inner_lr=0.02, lam=20.0,
                             cg_tol=0.0)
    assert method.cg_maxiter == 5
    _, info = _grad(method, model, batch)
    assert info.linear_solve_iterations == 5 and info.n_hvp == 3 * 5
    assert 0 < info.linear_solve_residual < 1e-3
    assert info.extra["cg_negative_curvature"] == 0
    assert info.fallback is None


def test_indefinite_row_returns_its_smallest_residual_iterate():
    # eigenvalues 1e-3 and -1 make the second CG step blow up before the sign shows
    A = torch.stack([torch.diag(torch.tensor(d, dtype=DT))
                     for d in ([3.0, 2.0, 1.0], [1.0, 1e-3, -1.0], [-1.0, 2.0, 2.0])])
    b = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.2], [1.0, 0.1, 0.1]], dtype=DT)

    def mv(v):
        return torch.einsum("bij,bj->bi", A, v)

    x, res, neg = batched_cg(mv, b, tol=1e-12, maxiter=10)
    norm = torch.linalg.vector_norm
    true = norm(b - mv(x), dim=1) / norm(b, dim=1)
    assert res.residual == float(true.max())  # the recurrence's residual is exact here
    assert neg["rows"] == 2 and neg["first_step"] == 1 and neg["min_rayleigh"] < 0
    assert float(true[0]) < 1e-12  # the definite row is unaffected
    assert torch.equal(x[2], b[2])  # curvature on the first step: x = b, never zero
    assert torch.isfinite(x).all() and float(true[1]) <= 1.0
