"""LogisticFolds' closed-form gradient and Hessian-vector products, and the
solvers' use of them (the ``hvp`` / ``loss_and_grad`` protocol) against autograd."""

import warnings

import numpy as np
import pytest
import torch

from skbilevel.hypergrad import (
    ImplicitCG,
    ImplicitNeumann,
    LogisticFolds,
    NewtonCG,
    argmin,
)
from skbilevel.hypergrad._solvers import _FixedPhi
from skbilevel.hypergrad._sparse import to_csr
from skbilevel.hypergrad._tree import tree_to_vector, vector_to_tree

DT = torch.float64


def _folds(n_classes, fit_intercept, n=50, p=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=DT) * torch.linspace(0.5, 2.0, p, dtype=DT)
    y = torch.randint(0, n_classes, (n,), generator=g)
    T = torch.rand(k, n, generator=g, dtype=DT)
    T[torch.rand(k, n, generator=g) < 0.3] = 0.0  # folds leave samples out
    V = (T == 0).to(DT) + 0.1
    return LogisticFolds(X, y, n_classes, T, V, fit_intercept=fit_intercept)


def _per_fold_penalties(folds, seed=1):
    """Replace ``_penalty`` by a differentiable map giving every fold its own penalties."""
    p, K = folds.X.shape[1], folds.n_folds
    scale = torch.exp(
        torch.randn(p, K, generator=torch.Generator().manual_seed(seed), dtype=DT)
    )
    base = folds._penalty

    def penalty(phi):
        return base(phi) * scale

    folds._penalty = penalty
    return folds


def _random_tree(like, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in like.items()}


def _autograd_derivatives(folds, theta, phi, v):
    x = tree_to_vector(theta).clone().requires_grad_(True)
    loss = folds.inner_loss(vector_to_tree(x, theta), phi)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (hv,) = torch.autograd.grad(g, x, tree_to_vector(v))
    return loss.detach(), g.detach(), hv


CASES = [(2, True), (2, False), (4, True), (4, False)]


@pytest.mark.parametrize("per_fold", [False, True])
@pytest.mark.parametrize("n_classes, fit_intercept", CASES)
def test_loss_grad_and_hvp_match_autograd(n_classes, fit_intercept, per_fold):
    folds = _folds(n_classes, fit_intercept)
    if per_fold:
        folds = _per_fold_penalties(folds)
    theta = _random_tree(folds.init_theta(), 2)
    phi = torch.randn(folds.n_groups, generator=torch.Generator().manual_seed(3), dtype=DT)
    v = _random_tree(theta, 4)
    loss, g, hv = _autograd_derivatives(folds, theta, phi, v)
    value, grad = folds.loss_and_grad(theta, phi)
    assert abs(float(value) - float(loss)) < 1e-12
    torch.testing.assert_close(tree_to_vector(grad), g, rtol=0, atol=1e-12)
    hv2 = folds.hvp(theta, phi, v)
    assert hv2.keys() == theta.keys()
    torch.testing.assert_close(tree_to_vector(hv2), hv, rtol=0, atol=1e-12)
    # the cached curvature follows theta: a new point gives the new product
    theta2 = _random_tree(theta, 5)
    _, _, hv_new = _autograd_derivatives(folds, theta2, phi, v)
    torch.testing.assert_close(
        tree_to_vector(folds.hvp(theta2, phi, v)), hv_new, rtol=0, atol=1e-12
    )
    # ... and notices an in-place change of the same tensors
    with torch.no_grad():
        theta2["coef"].mul_(0.5)
    _, _, hv_inplace = _autograd_derivatives(folds, theta2, phi, v)
    torch.testing.assert_close(
        tree_to_vector(folds.hvp(theta2, phi, v)), hv_inplace, rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("n_classes, fit_intercept", CASES)
def test_per_fold_penalties_reach_every_method(n_classes, fit_intercept):
    folds = _per_fold_penalties(_folds(n_classes, fit_intercept))
    theta = _random_tree(folds.init_theta(), 2)
    phi = torch.zeros(folds.n_groups, dtype=DT)
    a = folds._penalty(phi)
    assert a.shape == (folds.X.shape[1], folds.n_folds)
    W = theta["coef"]
    plain = _folds(n_classes, fit_intercept)
    pen = 0.5 * (a[..., None] * W * W).sum() / folds._scale
    data = plain.inner_loss(theta, torch.full_like(phi, -60.0))  # penalty ~ 0
    assert abs(float(folds.inner_loss(theta, phi)) - float(data + pen)) < 1e-12
    # the diagonal is the diagonal of the autograd Hessian
    x = tree_to_vector(theta).clone().requires_grad_(True)
    H = torch.autograd.functional.hessian(
        lambda x: folds.inner_loss(vector_to_tree(x, theta), phi), x
    )
    diag = tree_to_vector(folds.hessian_diagonal(theta, phi))
    torch.testing.assert_close(diag, torch.diagonal(H), rtol=0, atol=1e-12)


def test_penalty_checks_phi():
    folds = _folds(2, True)
    with pytest.raises(ValueError, match="one log-penalty per group"):
        folds.hvp(folds.init_theta(), torch.zeros(2, dtype=DT), folds.init_theta())
    with pytest.raises(ValueError, match="one log-penalty per group"):
        folds.loss_and_grad(folds.init_theta(), torch.zeros(2, dtype=DT))


class _AutogradOnly:
    """The same inner loss without ``hvp`` / ``loss_and_grad`` (autograd fallback)."""

    def __init__(self, folds, diagonal=True):
        self.folds = folds
        if diagonal:
            self.hessian_diagonal = folds.hessian_diagonal

    def __call__(self, theta, phi):
        return self.folds.inner_loss(theta, phi)


class _HvpOnly(_AutogradOnly):
    """``hvp`` but no ``loss_and_grad``: autograd gradients, closed-form products."""

    def hvp(self, theta, phi, v):
        return self.folds.hvp(theta, phi, v)


@pytest.mark.parametrize("per_fold", [False, True])
@pytest.mark.parametrize("n_classes, fit_intercept", CASES)
def test_newton_cg_same_solution_with_and_without_protocol(
    n_classes, fit_intercept, per_fold
):
    folds = _folds(n_classes, fit_intercept)
    if per_fold:
        folds = _per_fold_penalties(folds)
    phi = torch.linspace(-1.0, 1.0, folds.n_groups, dtype=DT)
    solver = NewtonCG(tol=1e-11)
    solutions = []
    for loss in (folds, _HvpOnly(folds), _AutogradOnly(folds)):
        theta, res = solver.solve(_FixedPhi(loss, phi), folds.init_theta())
        assert res.converged and res.n_hvp > 0
        solutions.append(tree_to_vector(theta))
    torch.testing.assert_close(solutions[0], solutions[2], rtol=0, atol=1e-9)
    torch.testing.assert_close(solutions[1], solutions[2], rtol=0, atol=1e-9)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_newton_cg_evaluates_each_iterate_once_with_loss_and_grad(n_classes, monkeypatch):
    # the line search's accepted point is the next iterate: its value and
    # gradient come from loss_and_grad once (they were computed twice: a value
    # by inner_loss in the line search, then both again), and hvp finds the
    # curvature loss_and_grad cached on that iterate's tree
    folds = _folds(n_classes, True)
    phi = torch.linspace(-1.0, 1.0, folds.n_groups, dtype=DT)
    calls = {"loss_and_grad": 0, "inner_loss": 0, "curvature": 0}
    for name in ("loss_and_grad", "inner_loss"):
        method = getattr(LogisticFolds, name)
        monkeypatch.setattr(
            LogisticFolds,
            name,
            lambda self, *a, _m=method, _n=name: calls.__setitem__(_n, calls[_n] + 1)
            or _m(self, *a),
        )
    curvature = LogisticFolds._curvature

    def counted(self, theta, z=None, dtype=None):
        cached = self._curvature_at
        calls["curvature"] += not (cached is not None and cached[0].holds(theta))
        return curvature(self, theta, z, dtype)

    monkeypatch.setattr(LogisticFolds, "_curvature", counted)
    theta, res = NewtonCG(tol=1e-11).solve(_FixedPhi(folds, phi), folds.init_theta())
    assert res.converged and res.n_iter >= 3
    assert calls["inner_loss"] == 0
    # one evaluation per iterate, plus any rejected trial steps (none here)
    assert calls["loss_and_grad"] == res.n_grad == res.n_iter + 1
    if n_classes == 2:  # the binary path caches its curvature in loss_and_grad
        assert calls["curvature"] == 0


@pytest.mark.parametrize("strategy", ["cg", "dense", "neumann"])
@pytest.mark.parametrize("per_fold", [False, True])
@pytest.mark.parametrize("n_classes, fit_intercept", CASES)
def test_implicit_same_hypergradient_with_and_without_protocol(
    n_classes, fit_intercept, per_fold, strategy
):
    folds = _folds(n_classes, fit_intercept)
    if per_fold:
        folds = _per_fold_penalties(folds)
    phi0 = torch.linspace(-1.0, 1.0, folds.n_groups, dtype=DT)
    make = {
        "cg": lambda: ImplicitCG(tol=1e-12),
        "dense": lambda: "dense",
        "neumann": lambda: ImplicitNeumann(n_terms=3000, tol=1e-12),
    }[strategy]
    grads, counts = [], []
    for loss in (folds, _HvpOnly(folds), _AutogradOnly(folds)):
        phi = phi0.clone().requires_grad_(True)
        theta, info = argmin(
            loss, phi, folds.init_theta(), hypergradient=make(),
            solver=NewtonCG(tol=1e-12),
        )
        folds.validation_loss(theta).backward()
        grads.append(phi.grad.clone())
        counts.append(info.n_hvp)
        assert info.inner_converged
    assert all(c > 0 for c in counts)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(grads[1], grads[2], rtol=1e-7, atol=1e-10)


def test_value_and_grad_matches_finite_differences():
    folds = _folds(3, True, n=60, p=3)
    phi = torch.tensor([0.3, -0.5, 1.0], dtype=DT)
    value, grad, info, _ = folds.value_and_grad(phi, solver=NewtonCG(tol=1e-12))
    assert info.n_hvp > 0 and info.linear_solve_converged
    eps = 1e-5
    fd = []
    for j in range(3):
        e = torch.zeros(3, dtype=DT)
        e[j] = eps
        up = folds.value_and_grad(phi + e, solver=NewtonCG(tol=1e-12))[0]
        down = folds.value_and_grad(phi - e, solver=NewtonCG(tol=1e-12))[0]
        fd.append(float(up - down) / (2 * eps))
    np.testing.assert_allclose(grad.numpy(), fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("binary", [True, False])
def test_classifier_unchanged_without_protocol(monkeypatch, binary):
    from sklearn.datasets import load_iris

    from skbilevel.linear_model import HyperL2Classifier

    X, y = load_iris(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    if binary:
        y = (y == 2).astype(int)
    # hypergradients to 1e-5 (the default's 1e-2 residual would add its own
    # differences between the two paths)
    kw = dict(max_iter=8, random_state=0, hypergradient=ImplicitCG(tol=1e-5))
    est = HyperL2Classifier(**kw).fit(X, y)
    monkeypatch.delattr(LogisticFolds, "hvp")
    monkeypatch.delattr(LogisticFolds, "loss_and_grad")
    ref = HyperL2Classifier(**kw).fit(X, y)
    # the two paths differ by the inner solves' rounding (tolerance 1e-5), which
    # L-BFGS's line search amplifies along flat directions of the outer loss:
    # the loss agrees closely, the penalties to a fraction of a percent
    np.testing.assert_allclose(est.cv_loss_, ref.cv_loss_, rtol=1e-4)
    np.testing.assert_allclose(est.alphas_, ref.alphas_, rtol=1e-2)
    np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(est.predict_proba(X), ref.predict_proba(X), atol=1e-3)


@pytest.mark.parametrize("per_fold", [False, True])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_binary_block_preconditioner_is_the_exact_inverse(fit_intercept, per_fold):
    folds = _folds(2, fit_intercept)
    if per_fold:
        folds = _per_fold_penalties(folds)
    phi = torch.linspace(-1.0, 1.0, folds.n_groups, dtype=DT)
    theta = _random_tree(folds.init_theta(), seed=3)
    v = _random_tree(theta, seed=4)
    back = folds.hessian_preconditioner(theta, phi)(folds.hvp(theta, phi, v))
    torch.testing.assert_close(tree_to_vector(back), tree_to_vector(v), rtol=1e-10, atol=1e-12)
    # NewtonCG with it: one CG product per Newton step or so, against many with Jacobi
    counts = []
    for loss in (folds, _HvpOnly(folds)):
        _, res = NewtonCG(tol=1e-11).solve(_FixedPhi(loss, phi), folds.init_theta())
        assert res.converged
        counts.append(res.n_hvp)
    assert counts[0] < counts[1]


def test_block_preconditioner_only_for_binary_problems():
    folds = _folds(4, True)
    phi = torch.zeros(folds.n_groups, dtype=DT)
    assert folds.hessian_preconditioner(folds.init_theta(), phi) is None


def _sparsified(folds, layout):
    """The same folds with X thinned to 30% nonzeros, dense and in ``layout``."""
    g = torch.Generator().manual_seed(1)
    X = folds.X * (torch.rand(folds.X.shape, generator=g) < 0.3)
    # (a COO X is converted by LogisticFolds; a CSR one built without torch's warning)
    sparse = X.to_sparse_coo() if layout == "coo" else to_csr(X)
    args = (folds.y, folds.n_classes, folds.train_weights, folds.val_weights)
    kw = dict(fit_intercept=folds.fit_intercept)
    return LogisticFolds(X, *args, **kw), LogisticFolds(sparse, *args, **kw)


@pytest.mark.parametrize("layout", ["csr", "coo"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("n_classes", [2, 3])
def test_sparse_X_gives_the_dense_results_without_warnings(n_classes, fit_intercept, layout):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's CSR "beta state" warning included
        dense, sparse = _sparsified(_folds(n_classes, fit_intercept), layout)
        assert sparse.X.layout == torch.sparse_csr
        phi = torch.linspace(-1.0, 1.0, 4, dtype=DT)
        solver = NewtonCG(tol=1e-11)
        v_d, g_d, _, theta = dense.value_and_grad(phi, solver=solver)
        v_s, g_s, _, _ = sparse.value_and_grad(phi, solver=solver)
        torch.testing.assert_close(v_s, v_d, rtol=1e-10, atol=0.0)
        torch.testing.assert_close(g_s, g_d, rtol=1e-8, atol=1e-12)
        g = torch.Generator().manual_seed(2)
        v = {k: torch.randn(t.shape, generator=g, dtype=DT) for k, t in theta.items()}
        a, b = dense.hvp(theta, phi, v), sparse.hvp(theta, phi, v)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)
        a, b = dense.hessian_diagonal(theta, phi), sparse.hessian_diagonal(theta, phi)
        (f_d, gr_d), (f_s, gr_s) = dense.loss_and_grad(theta, phi), sparse.loss_and_grad(theta, phi)
        torch.testing.assert_close(f_s, f_d, rtol=1e-12, atol=0.0)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(gr_s[k], gr_d[k], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            sparse.validation_curve([1.0, -1.0], solver=solver),
            dense.validation_curve([1.0, -1.0], solver=solver),
            rtol=1e-9,
            atol=0.0,
        )
        if n_classes == 2:  # the exact outer Hessian, from the dense Hessian blocks
            out_d = dense.value_grad_hessian(phi, solver)
            out_s = sparse.value_grad_hessian(phi, solver)
            for a, b in zip(out_d, out_s):
                torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("n_classes, fit_intercept", CASES)
def test_float32_hvp_gives_the_float64_solution(n_classes, fit_intercept, sparse):
    exact = _folds(n_classes, fit_intercept)
    args = (exact.y, n_classes, exact.train_weights, exact.val_weights)
    X = to_csr(exact.X) if sparse else exact.X
    low = LogisticFolds(X, *args, fit_intercept=fit_intercept, hvp_dtype=torch.float32)
    assert low.hvp_dtype == torch.float32 and exact.hvp_dtype == DT
    # the copies in float32 are built once and shared by reparametrized folds
    assert low.reparametrized(groups=torch.zeros(4, dtype=torch.long))._hvp_X is low._hvp_X
    phi = torch.linspace(-1.0, 1.0, 4, dtype=DT)
    theta, _ = exact.solve(phi, NewtonCG(tol=1e-11))
    v = _random_tree(theta, seed=3)
    a, b = exact.hvp(theta, phi, v), low.hvp(theta, phi, v)
    for k in a:
        assert b[k].dtype == DT
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    # Newton's steps and the implicit system carry float32 products, yet the
    # solution and the hypergradient are float64's to the solver's tolerance
    # (CG's attainable residual with float32 products is about 1e-7)
    _, g_exact, _, t_exact = exact.value_and_grad(phi, ImplicitCG(tol=1e-6), NewtonCG(tol=1e-11))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, g_low, info, t_low = low.value_and_grad(
            phi, ImplicitCG(tol=1e-6), NewtonCG(tol=1e-11)
        )
    assert info.inner_converged and info.linear_solve_converged
    torch.testing.assert_close(tree_to_vector(t_low), tree_to_vector(t_exact), rtol=0, atol=1e-10)
    torch.testing.assert_close(g_low, g_exact, rtol=1e-5, atol=1e-9)


def test_hvp_dtype_is_checked():
    folds = _folds(2, True)
    with pytest.raises(ValueError, match="hvp_dtype must be None or a floating torch dtype"):
        LogisticFolds(folds.X, folds.y, 2, folds.train_weights, hvp_dtype="float32")
    with pytest.raises(ValueError, match="hvp_dtype"):
        LogisticFolds(folds.X, folds.y, 2, folds.train_weights, hvp_dtype=torch.int64)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_solution_keeps_the_curvature_cached_at_its_last_iterate(
    n_classes, count_calls
):
    # NewtonCG's last iterate had its probabilities cached on its own tree, but
    # the solution came back as new tensors (rebuilt from the flat iterate, and
    # detached again): the Hessian at the solution (the implicit backward pass,
    # value_grad_hessian) computed the logits once more. make_classification
    # fits 2.4% faster with the same tree handed through
    folds = _folds(n_classes, fit_intercept=True)
    phi = torch.zeros(4, dtype=DT)
    theta, _ = folds.solve(phi, NewtonCG(tol=1e-8))
    calls = count_calls(LogisticFolds, "logits")
    v = {k: torch.ones_like(t) for k, t in theta.items()}
    folds.hvp(theta, phi, v)
    folds.hessian_diagonal(theta, phi)
    assert not calls
    # the cache still follows theta: another point computes its own
    other = {k: t + 0.1 for k, t in theta.items()}
    folds.hvp(other, phi, v)
    assert len(calls) == 1


@pytest.mark.parametrize("n_classes", [2, 3])
def test_loss_and_grad_reuses_its_data_part_at_the_same_point(n_classes, count_calls):
    # the loss and gradient's data part (logits, X^T R) depends on the point
    # only: value_grad_hessian's value correction asks at the solution NewtonCG
    # just evaluated, and the next solve starts from a copy of it at other
    # penalties. Both reuse it (digits fits 7.5% faster); another point not
    folds = _folds(n_classes, fit_intercept=True)
    phi = torch.zeros(4, dtype=DT)
    theta, _ = folds.solve(phi, NewtonCG(tol=1e-8))

    def exact(theta, phi):
        return _folds(n_classes, fit_intercept=True).loss_and_grad(theta, phi)

    def same(a, b):
        grads = all(torch.equal(a[1][k], b[1][k]) for k in a[1])
        return float(a[0]) == float(b[0]) and grads

    reference = [exact(theta, phi), exact(theta, phi + 1.0)]
    moved = {k: t + 0.1 for k, t in theta.items()}
    reference.append(exact(moved, phi))
    calls = count_calls(LogisticFolds, "logits")
    assert same(folds.loss_and_grad(theta, phi), reference[0])
    copy = {k: t.clone() for k, t in theta.items()}  # a warm start's copy
    assert same(folds.loss_and_grad(copy, phi + 1.0), reference[1])
    assert not calls
    assert same(folds.loss_and_grad(moved, phi), reference[2])
    assert len(calls) == 1


def test_hessian_factor_is_reused_for_the_same_gram_and_penalties(count_calls):
    # the Newton iterations of a solve that reuse the weighted Gram matrix, and
    # the implicit backward pass after it, factored the same matrix again
    from skbilevel.hypergrad import _penalized

    folds = _folds(2, fit_intercept=True)
    phi = torch.zeros(4, dtype=DT)
    theta, _ = folds.solve(phi, NewtonCG(tol=1e-8))
    r = {k: torch.ones_like(t) for k, t in theta.items()}
    first = folds.hessian_preconditioner(theta, phi)(r)
    factored = count_calls(_penalized, "_cholesky_ex")
    again = folds.hessian_preconditioner(theta, phi)(r)
    assert not factored
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = folds.hessian_preconditioner(theta, phi + 1.0)(r)  # other penalties
    assert len(factored) == 1
    assert not torch.equal(other["coef"], first["coef"])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_validation_loss_at_the_solution_reuses_the_solver_losses(
    n_classes, count_calls
):
    # the per-sample losses of loss_and_grad's last point serve the validation
    # loss there, outside a graph; with a graph in theta they are computed anew
    folds = _folds(n_classes, fit_intercept=True)
    theta, _ = folds.solve(torch.zeros(4, dtype=DT), NewtonCG(tol=1e-8))
    exact = _folds(n_classes, fit_intercept=True).validation_loss(theta)
    calls = count_calls(LogisticFolds, "logits")
    assert float(folds.validation_loss(theta)) == float(exact)
    assert not calls
    leaves = {k: t.clone().requires_grad_(True) for k, t in theta.items()}
    loss = folds.validation_loss(leaves)
    assert len(calls) == 1 and loss.requires_grad
    torch.testing.assert_close(loss.detach(), exact, rtol=1e-14, atol=0.0)
