"""Meta-learning primitives of the core: meta-gradients against exact answers."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from skbilevel.hypergrad import (
    FunctionalModel,
    get_meta_method,
    inner_adapt,
    ridge_head,
    tree_to_vector,
    vector_to_tree,
)

DT = torch.float64


def _tiny_model(seed=0, n_out=1, loss="mse"):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, n_out))
    return FunctionalModel(net.to(DT), loss)


def _batch(n_tasks=3, n_s=4, n_q=5, seed=1, classes=None):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n_tasks, n_s, 2, generator=g, dtype=DT)
    xq = torch.randn(n_tasks, n_q, 2, generator=g, dtype=DT)
    if classes is None:
        w = torch.randn(n_tasks, 2, 1, generator=g, dtype=DT)
        return xs, torch.sin(xs @ w), xq, torch.sin(xq @ w)
    ys = torch.arange(n_s).remainder(classes).repeat(n_tasks, 1)
    yq = torch.arange(n_q).remainder(classes).repeat(n_tasks, 1)
    return xs, ys, xq, yq


def _meta_value_and_grad(method, model, meta, batch, n_outputs=None):
    meta = {k: ({kk: vv.clone().requires_grad_(True) for kk, vv in v.items()}
                if isinstance(v, dict) else v.clone().requires_grad_(True))
            for k, v in meta.items()}
    loss, info = method.meta_loss(model, meta, batch, n_outputs=n_outputs)
    loss.backward()
    grads = {k: ({kk: vv.grad for kk, vv in v.items()} if isinstance(v, dict) else v.grad)
             for k, v in meta.items()}
    return float(loss.detach()), grads, info


def _finite_difference(method, model, meta, batch, eps=1e-6, n_outputs=None):
    vec = tree_to_vector(meta).detach()
    out = torch.zeros_like(vec)
    for i in range(vec.numel()):
        vals = []
        for sign in (1.0, -1.0):
            v = vec.clone()
            v[i] += sign * eps
            with torch.no_grad():
                loss, _ = method.meta_loss(model, vector_to_tree(v, meta), batch, n_outputs=n_outputs)
            vals.append(float(loss))
        out[i] = (vals[0] - vals[1]) / (2 * eps)
    return out


@pytest.mark.parametrize("name", ["maml", "anil", "metasgd"])
def test_second_order_meta_gradient_matches_finite_differences(name):
    model = _tiny_model()
    method = get_meta_method(name, inner_steps=2, inner_lr=0.3)
    meta = method.init_meta(model)
    batch = _batch()
    _, grads, info = _meta_value_and_grad(method, model, meta, batch)
    fd = _finite_difference(method, model, meta, batch)
    np.testing.assert_allclose(tree_to_vector(grads).numpy(), fd.numpy(), rtol=1e-6, atol=1e-9)
    assert info.strategy == name and info.inner_iterations == 2


def test_maml_classification_meta_gradient_matches_finite_differences():
    model = _tiny_model(n_out=3, loss="cross_entropy")
    method = get_meta_method("maml", inner_steps=1, inner_lr=0.5)
    meta = method.init_meta(model)
    batch = _batch(classes=2)
    _, grads, _ = _meta_value_and_grad(method, model, meta, batch, n_outputs=2)
    fd = _finite_difference(method, model, meta, batch, n_outputs=2)
    np.testing.assert_allclose(tree_to_vector(grads).numpy(), fd.numpy(), rtol=1e-6, atol=1e-9)


def _flat_loss(model, spec_like, x, y):
    def f(vec):
        return model.loss(vector_to_tree(vec, spec_like), x, y)

    return f


def test_fomaml_is_maml_without_second_order_terms():
    """One step: MAML = (I - lr H_s) g_q and FOMAML = g_q, with g_q at the adapted point."""
    model = _tiny_model(seed=3)
    lr = 0.2
    maml = get_meta_method("maml", inner_steps=1, inner_lr=lr)
    fomaml = get_meta_method("fomaml", inner_steps=1, inner_lr=lr)
    meta = maml.init_meta(model)
    xs, ys, xq, yq = batch = _batch(n_tasks=2)
    _, g_maml, _ = _meta_value_and_grad(maml, model, meta, batch)
    _, g_fo, _ = _meta_value_and_grad(fomaml, model, meta, batch)
    phi = tree_to_vector(meta["params"]).detach()
    expect_fo, expect_maml = torch.zeros_like(phi), torch.zeros_like(phi)
    for i in range(2):
        f_s = _flat_loss(model, meta["params"], xs[i], ys[i])
        f_q = _flat_loss(model, meta["params"], xq[i], yq[i])
        theta = phi - lr * torch.autograd.functional.jacobian(f_s, phi)
        g_q = torch.autograd.functional.jacobian(f_q, theta)
        H_s = torch.autograd.functional.hessian(f_s, phi)
        expect_fo += g_q / 2
        expect_maml += (g_q - lr * H_s @ g_q) / 2
    np.testing.assert_allclose(tree_to_vector(g_fo).numpy(), expect_fo.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(tree_to_vector(g_maml).numpy(), expect_maml.numpy(), rtol=1e-10, atol=1e-13)
    assert not np.allclose(expect_fo.numpy(), expect_maml.numpy())


def test_reptile_direction_is_phi_minus_adapted_mean():
    model = _tiny_model(seed=4)
    method = get_meta_method("reptile", inner_steps=3, inner_lr=0.1)
    meta = method.init_meta(model)
    xs, ys, xq, yq = batch = _batch(n_tasks=3)
    _, grads, _ = _meta_value_and_grad(method, model, meta, batch)
    phi = meta["params"]
    adapted = [inner_adapt(lambda p: model.loss(p, xs[i], ys[i]), phi, steps=3, lr=0.1)
               for i in range(3)]
    expect = tree_to_vector(phi) - sum(tree_to_vector(a) for a in adapted) / 3
    np.testing.assert_allclose(tree_to_vector(grads).numpy(), expect.detach().numpy(), rtol=1e-10)


def test_imaml_matches_dense_implicit_solve():
    model = _tiny_model(seed=5)
    lam, lr, steps = 2.0, 0.1, 200
    method = get_meta_method("imaml", inner_steps=steps, inner_lr=lr, lam=lam,
                             cg_maxiter=200, cg_tol=1e-12)
    meta = method.init_meta(model)
    xs, ys, xq, yq = batch = _batch(n_tasks=2)
    _, grads, info = _meta_value_and_grad(method, model, meta, batch)
    assert info.linear_solve_converged and info.linear_solve_residual <= 1e-12
    phi = tree_to_vector(meta["params"]).detach()
    expect = torch.zeros_like(phi)
    for i in range(2):
        f_s = _flat_loss(model, meta["params"], xs[i], ys[i])
        f_q = _flat_loss(model, meta["params"], xq[i], yq[i])
        theta = phi.clone()
        for _ in range(steps):  # the same proximal gradient steps
            theta = theta - lr * (torch.autograd.functional.jacobian(f_s, theta) + lam * (theta - phi))
        H = torch.autograd.functional.hessian(f_s, theta)
        g = torch.autograd.functional.jacobian(f_q, theta)
        A = torch.eye(phi.numel(), dtype=DT) + H / lam
        expect += torch.linalg.solve(A, g) / 2
    np.testing.assert_allclose(tree_to_vector(grads).numpy(), expect.numpy(), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("n, p", [(5, 8), (30, 4)])
def test_ridge_head_equals_sklearn_ridge(n, p):
    rng = np.random.RandomState(0)
    F, T = rng.randn(n, p), rng.randn(n, 2)
    W, b = ridge_head(torch.tensor(F), torch.tensor(T), alpha=0.7)
    ref = Ridge(alpha=0.7).fit(F, T)
    np.testing.assert_allclose(W.numpy().T, ref.coef_, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.numpy(), ref.intercept_, rtol=1e-10, atol=1e-12)


def test_r2d2_head_is_ridge_on_backbone_features():
    model = _tiny_model(seed=6, n_out=3)
    method = get_meta_method("r2d2", alpha=0.5)
    meta = method.init_meta(model)
    xs, ys, xq, _ = _batch(n_tasks=1, n_s=6)
    task = method.adapt(model, meta, xs[0], ys[0])
    with torch.no_grad():
        feats_s = model.forward(meta["params"], xs[0]).numpy()
        feats_q = model.forward(meta["params"], xq[0]).numpy()
        pred = method.predict(model, meta, task, xq[0]).numpy()
    ref = Ridge(alpha=0.5).fit(feats_s, ys[0].numpy())
    np.testing.assert_allclose(pred.ravel(), ref.predict(feats_q), rtol=1e-9, atol=1e-12)


def test_r2d2_meta_gradient_reaches_penalty_and_matches_finite_differences():
    model = _tiny_model(seed=7, n_out=3, loss="cross_entropy")
    method = get_meta_method("r2d2")
    meta = method.init_meta(model)
    batch = _batch(classes=2, n_s=4)
    _, grads, _ = _meta_value_and_grad(method, model, meta, batch, n_outputs=2)
    assert grads["log_alpha"] is not None and grads["log_scale"] is not None
    fd = _finite_difference(method, model, meta, batch, n_outputs=2)
    np.testing.assert_allclose(tree_to_vector(grads).numpy(), fd.numpy(), rtol=1e-6, atol=1e-9)


def test_vmapped_meta_loss_equals_loop_over_tasks():
    model = _tiny_model(seed=8)
    method = get_meta_method("maml", inner_steps=2, inner_lr=0.1)
    meta = method.init_meta(model)
    xs, ys, xq, yq = batch = _batch(n_tasks=4)
    loss, _ = method.meta_loss(model, meta, batch)
    loop = sum(method.task_loss(model, meta, xs[i], ys[i], xq[i], yq[i]) for i in range(4)) / 4
    assert abs(float(loss) - float(loop)) < 1e-12


def test_state_dict_round_trip_and_unknown_method():
    model = _tiny_model()
    method = get_meta_method("metasgd")
    meta = method.init_meta(model)
    state = method.state_dict(meta)
    assert "lr.0.weight" in state and "0.weight" in state
    back = method.load_state_dict(model, state)
    assert torch.equal(tree_to_vector(back), tree_to_vector(meta))
    with pytest.raises(ValueError, match="Unknown meta-learning method"):
        get_meta_method("nope")
    with pytest.raises(ValueError, match="Invalid parameters"):
        get_meta_method("maml", lam=1.0)


def test_imaml_diverging_inner_solve_gives_nan_not_zero_or_error():
    model = _tiny_model(seed=9)
    # the loss diverges (data scaled by 100), not the proximal term (inner_lr * lam < 2)
    method = get_meta_method("imaml", inner_steps=200, inner_lr=1.9, lam=1.0)
    meta = method.init_meta(model)
    xs, ys, xq, yq = _batch(n_tasks=2)
    loss, info = method.meta_loss(model, meta, (100 * xs, 100 * ys, xq, yq))
    assert not np.isfinite(float(loss.detach()))
    assert info.linear_solve_converged is False and "diverged" in info.extra["cg_message"]


def test_batched_cg_solves_each_system_and_flags_indefinite_rows():
    from skbilevel.hypergrad import batched_cg

    g = torch.Generator().manual_seed(0)
    M = torch.randn(4, 6, 6, generator=g, dtype=DT)
    A = M @ M.transpose(1, 2) + 0.5 * torch.eye(6, dtype=DT)
    b = torch.randn(4, 6, generator=g, dtype=DT)
    b[2] = 0.0  # a zero right-hand side gives exactly zero

    def mv(v):
        return torch.einsum("bij,bj->bi", A, v)

    x, res, neg = batched_cg(mv, b, tol=1e-12, maxiter=50)
    assert res.converged and res.residual <= 1e-12 and res.fallback is None
    assert neg["rows"] == 0
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(A, b).numpy(), rtol=1e-9, atol=1e-12)
    assert torch.equal(x[2], torch.zeros(6, dtype=DT))
    A[1] = -A[1]  # indefinite row: stops, the record says so, others unaffected
    x, res, neg = batched_cg(mv, b, tol=1e-12, maxiter=50)
    assert not res.converged and "non-positive curvature" in res.message
    # its first direction is b itself: it returns b (A ~ I), not a silent zero
    assert neg == {"rows": 1, "first_step": 1, "min_rayleigh": neg["min_rayleigh"]}
    assert neg["min_rayleigh"] < 0
    assert torch.equal(x[1], b[1])
    np.testing.assert_allclose(x[0].numpy(), torch.linalg.solve(A[0], b[0]).numpy(), rtol=1e-9)


# ------------------------------------------------- settings and batch validation

ALL_METHODS = ["anil", "fomaml", "imaml", "maml", "metasgd", "r2d2", "reptile"]


def test_get_meta_method_keeps_inner_lr_for_r2d2_and_rejects_foreign_arguments():
    """The docstring said R2D2 rejects ``inner_lr``; it accepts (and ignores)
    it, as it must: the meta-learning estimators pass ``inner_steps`` and
    ``inner_lr`` to every method. Before: the behaviour below held already and
    only the last assertion (the corrected docstring) failed."""
    model = _tiny_model(n_out=2)
    batch = _batch()
    plain = get_meta_method("r2d2")
    with_lr = get_meta_method("r2d2", inner_lr=0.1)
    meta = plain.init_meta(model)
    assert float(plain.meta_loss(model, meta, batch)[0]) == float(
        with_lr.meta_loss(model, meta, batch)[0])
    with pytest.raises(ValueError, match="Invalid parameters for meta-learning method 'maml'"):
        get_meta_method("maml", lam=1.0)
    assert "``lam`` for MAML" in get_meta_method.__doc__


@pytest.mark.parametrize("name", ALL_METHODS)
def test_negative_inner_steps_are_refused(name):
    """Before: inner_steps=-1 was accepted by all seven methods (range(-1) ran
    no step, silently)."""
    with pytest.raises(ValueError, match=r"inner_steps .* must be an integer >= 0; got -1"):
        get_meta_method(name, inner_steps=-1)
    get_meta_method(name, inner_steps=0)  # no adaptation: allowed


def test_negative_steps_to_adapt_and_inner_adapt_are_refused():
    """Before: adapt(..., steps=-1) and inner_adapt(steps=-1) returned the
    starting parameters without a word."""
    model = _tiny_model()
    method = get_meta_method("maml")
    meta = method.init_meta(model)
    xs, ys, _, _ = _batch()
    with pytest.raises(ValueError, match="steps .* must be an integer >= 0; got -1"):
        method.adapt(model, meta, xs[0], ys[0], steps=-1)
    with pytest.raises(ValueError, match="inner_adapt's steps"):
        inner_adapt(lambda p: (p["w"] ** 2).sum(), {"w": torch.ones(())}, steps=-1, lr=0.1)


def _bad_batches():
    xs, ys, xq, yq = _batch()
    return {
        # before: "not enough values to unpack (expected 4, got 3)"
        "three-items": ((xs, ys, xq), ValueError, r"tuple \(xs, ys, xq, yq\).*3 items"),
        # before: a vmap error about in_dims and non-Tensor arguments
        "numpy": (tuple(t.numpy() for t in (xs, ys, xq, yq)), TypeError,
                  r"xs must be a torch.Tensor; got numpy.ndarray.*torch.as_tensor"),
        # before: "shape '[3, 4, 1]' is invalid for input of size 9"
        "short-ys": ((xs, ys[:, :3], xq, yq), ValueError, "ys must have one target per sample"),
        # before: "shape '[3, 4, 1]' is invalid for input of size 24"
        "wide-ys": ((xs, torch.cat([ys, ys], -1), xq, yq), ValueError,
                    "same number of targets per sample"),
        # before: R2D2 "cannot reshape tensor of 0 elements"; the others a finite
        # loss with no adaptation
        "empty-support": ((xs[:, :0], ys[:, :0], xq, yq), ValueError, "support set is empty"),
        # before: no error, a loss of nan (the mean over no query sample)
        "empty-query": ((xs, ys, xq[:, :0], yq[:, :0]), ValueError, "query set is empty"),
        # before: vmap's "Expected all tensors to have the same size in the mapped
        # dimension, got sizes [3, 3, 2, 2]"
        "task-mismatch": ((xs, ys, xq[:2], yq[:2]), ValueError, "number of tasks"),
    }


@pytest.mark.parametrize("case", list(_bad_batches()))
@pytest.mark.parametrize("name", ALL_METHODS)
def test_malformed_meta_batch_is_refused_where_it_enters(name, case):
    """Before: raw errors from deep inside (see each case), or for an empty
    support set a silently unadapted loss (all but R2D2)."""
    batch, error, match = _bad_batches()[case]
    model = _tiny_model(n_out=2 if name == "r2d2" else 1)
    method = get_meta_method(name, inner_steps=1)
    with pytest.raises(error, match=match):
        method.meta_loss(model, method.init_meta(model), batch)


def test_targets_wider_than_the_model_output_are_named():
    """Before: torch's "shape '[3, 4, 1]' is invalid for input of size 24" from
    inside vmap, for two targets per sample against a one-output model."""
    xs, ys, xq, yq = _batch()
    model = _tiny_model()
    method = get_meta_method("maml", inner_steps=1)
    wide = (xs, torch.cat([ys, ys], -1), xq, torch.cat([yq, yq], -1))
    with pytest.raises(ValueError, match=r"outputs of shape \(4, 1\) against targets of shape \(4, 2\)"):
        method.meta_loss(model, method.init_meta(model), wide)


def test_classification_labels_must_be_one_per_sample():
    """Before: cross_entropy's "0D or 1D target tensor expected, multi-target not
    supported, got 2D" from inside vmap."""
    xs, ys, xq, yq = _batch(classes=2)
    model = _tiny_model(n_out=3, loss="cross_entropy")
    method = get_meta_method("maml", inner_steps=1)
    with pytest.raises(ValueError, match=r"integer labels ys must be \(n_tasks, n_samples\)"):
        method.meta_loss(model, method.init_meta(model), (xs, ys[..., None], xq, yq))


@pytest.mark.parametrize("inner_lr", [0.0, -0.1, float("nan"), float("inf")])
def test_meta_methods_refuse_an_inner_lr_that_is_no_step(inner_lr):
    """A negative or NaN inner_lr was accepted by every method (steps uphill,
    or NaN task states), zero froze the adaptation."""
    for name in ("maml", "fomaml", "reptile", "imaml"):
        with pytest.raises(ValueError, match="inner_lr .* must be a positive finite number"):
            get_meta_method(name, inner_lr=inner_lr)


def test_unknown_method_parameter_lists_the_accepted_ones():
    """A misspelled key named only the constructor ("MetaMethod.__init__() got an
    unexpected keyword argument 'lamb'"): neither the keys the method takes nor
    the likely one."""
    with pytest.raises(ValueError, match="Invalid parameters") as err:
        get_meta_method("imaml", lamb=1.0)
    message = str(err.value)
    assert "'lamb'" in message and "did you mean lam?" in message
    for key in ("inner_steps", "inner_lr", "lam", "cg_maxiter"):
        assert key in message
    assert "__init__" not in message
    with pytest.raises(ValueError, match=r"takes inner_steps, inner_lr\b") as err:
        get_meta_method("maml", lam=1.0)
    assert "did you mean" not in str(err.value)
    # a constructor's own TypeError (a bad value, not a bad key) is not relabelled
    assert get_meta_method("imaml", lam=2.0).lam == 2.0
