"""iMAML's meta-gradient on a classification MLP against the exact implicit gradient."""

import numpy as np
import torch
from torch.func import grad, hessian

from skbilevel.hypergrad import FunctionalModel, get_meta_method, tree_to_vector, vector_to_tree

DT = torch.float64


def _classification_case(seed=0, n_tasks=2, n_classes=3):
    torch.manual_seed(seed)
    # one more logit than classes: the unused one must get a zero meta-gradient
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                              torch.nn.Linear(5, n_classes + 1))
    model = FunctionalModel(net.to(DT), "cross_entropy")
    g = torch.Generator().manual_seed(seed + 1)
    xs = torch.randn(n_tasks, 6, 3, generator=g, dtype=DT)
    xq = torch.randn(n_tasks, 8, 3, generator=g, dtype=DT)
    ys = torch.randint(0, n_classes, (n_tasks, 6), generator=g)
    yq = torch.randint(0, n_classes, (n_tasks, 8), generator=g)
    return model, (xs, ys, xq, yq), n_classes


def _exact_implicit_gradient(model, phi, batch, n_classes, lam):
    """Mean over tasks of (I + H/lam)^{-1} grad L_q(theta*), theta* solved to 1e-10, dense."""
    xs, ys, xq, yq = batch
    phi_v = tree_to_vector(phi).detach()
    out, min_eig = torch.zeros_like(phi_v), []
    for i in range(xs.shape[0]):
        def f_s(v, i=i):
            return model.loss(vector_to_tree(v, phi), xs[i], ys[i], n_classes)

        def f_q(v, i=i):
            return model.loss(vector_to_tree(v, phi), xq[i], yq[i], n_classes)

        theta = phi_v.clone()
        for _ in range(6):  # Newton on the proximal problem (strongly convex here)
            A = torch.eye(len(theta), dtype=DT) + hessian(f_s)(theta) / lam
            theta = theta - torch.linalg.solve(A, grad(f_s)(theta) / lam + theta - phi_v)
        residual = grad(f_s)(theta) + lam * (theta - phi_v)
        assert float(residual.norm()) < 1e-10
        A = torch.eye(len(theta), dtype=DT) + hessian(f_s)(theta) / lam
        min_eig.append(float(torch.linalg.eigvalsh(A).min()))
        out += torch.linalg.solve(A, grad(f_q)(theta)) / xs.shape[0]
    return out, min(min_eig)


def _imaml_gradient(method, model, batch, n_classes):
    meta = method.init_meta(model)
    meta = {"params": {k: v.clone().requires_grad_(True) for k, v in meta["params"].items()}}
    loss, info = method.meta_loss(model, meta, batch, n_outputs=n_classes)
    loss.backward()
    return tree_to_vector({k: v.grad for k, v in meta["params"].items()}), info


def test_imaml_classification_meta_gradient_matches_the_dense_implicit_gradient():
    model, batch, n_classes = _classification_case()
    lam = 1.0
    exact, min_eig = _exact_implicit_gradient(model, model.init_params(), batch, n_classes, lam)
    assert min_eig > 0  # I + H/lam is positive definite: the formula applies
    # proximal problem solved to (1 - inner_lr * lam)^60 ~ 1e-18, CG to 1e-12
    solved = get_meta_method("imaml", inner_steps=60, inner_lr=0.5, lam=lam,
                             cg_maxiter=100, cg_tol=1e-12)
    g, info = _imaml_gradient(solved, model, batch, n_classes)
    assert info.linear_solve_converged and info.extra["cg_negative_curvature"] == 0
    np.testing.assert_allclose(g.numpy(), exact.numpy(), rtol=1e-8, atol=1e-12)
    # the logit of the absent fourth class never enters the loss
    head_w = vector_to_tree(g, model.init_params())["2.weight"]
    assert float(head_w[3].abs().max()) == 0.0
    # the estimators' defaults (20 steps, inner_lr=0.1, 5 CG steps) stay close
    default = get_meta_method("imaml", inner_steps=20, inner_lr=0.1, lam=lam)
    g20, _ = _imaml_gradient(default, model, batch, n_classes)
    assert float(g20 @ exact / (g20.norm() * exact.norm())) > 0.99
    assert float((g20 - exact).norm() / exact.norm()) < 0.15
