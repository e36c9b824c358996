"""
==========================================================
Hypergradient strategies: error against cost
==========================================================

Every hypergradient strategy in :mod:`skbilevel.hypergrad` is run on the same
problem — ridge regression with one log-penalty per feature, whose exact
hypergradient is known from the closed form — and placed on one chart: its
relative error against the exact value, and its cost in units of one
evaluation of the inner gradient (wall time of ``argmin`` plus ``backward``,
divided by the time of one inner gradient).

Implicit strategies with a converged linear solve sit at round-off error;
unrolled ones pay for exactness with the number of steps T. First-order,
identity, DARTS and EvoGrad are biased whatever they cost here (their cost
includes the inner solve they start from). Best response, which fits a
local model of the inner solution around the current penalties, comes close
to the exact value but is among the most expensive points of the chart.
"""

import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from skbilevel.hypergrad import (
    LBFGS,
    GradientDescent,
    ImplicitCG,
    ImplicitNeumann,
    RidgeSolver,
    TruncatedReverse,
    UnrolledForward,
    UnrolledReverse,
    argmin,
)

QUICK = bool(os.environ.get("SKBILEVEL_QUICK"))
torch.manual_seed(0)
dtype = torch.float64
n, n_val, p = 200, 100, 20
w_true = torch.randn(p, dtype=dtype) * (torch.rand(p, dtype=dtype) < 0.5)
X, Xv = torch.randn(n, p, dtype=dtype), torch.randn(n_val, p, dtype=dtype)
y = X @ w_true + 0.5 * torch.randn(n, dtype=dtype)
yv = Xv @ w_true + 0.5 * torch.randn(n_val, dtype=dtype)
phi0 = torch.full((p,), 2.0, dtype=dtype)


# theta is a dict {"coef": w}, the layout RidgeSolver's closed form returns.
def inner(theta, log_alpha):
    w = theta["coef"]
    return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * (log_alpha.exp() * w**2).sum()


def outer(theta):
    return ((Xv @ theta["coef"] - yv) ** 2).mean()


# The step size of gradient descent on the inner problem: 1 / Lipschitz constant.
lipschitz = float(torch.linalg.eigvalsh(X.T @ X).max() + phi0.exp().max())
gd = lambda steps: GradientDescent(lr=1.0 / lipschitz, n_steps=steps)  # noqa: E731
closed = RidgeSolver(X, y, fit_intercept=False, penalty="per_feature")
exact_solver = LBFGS(tol=1e-12)


def hypergradient(strategy, solver, init=None):
    phi = phi0.clone().requires_grad_(True)
    init = {"coef": torch.zeros(p, dtype=dtype)} if init is None else init
    start = time.perf_counter()
    w, info = argmin(inner, phi, init, hypergradient=strategy, solver=solver)
    outer(w).backward()
    return phi.grad.detach(), time.perf_counter() - start, info


exact, _, _ = hypergradient("closed_form", closed)
# Look-ahead methods (DARTS) start from the current inner solution, as in the
# alternating updates they were designed for.
warm = closed.closed_form(phi0)

# Cost unit: one inner gradient evaluation.
w = torch.zeros(p, dtype=dtype, requires_grad=True)
start = time.perf_counter()
for _ in range(200):
    torch.autograd.grad(inner({"coef": w}, phi0), w)
grad_time = (time.perf_counter() - start) / 200

steps = [10, 100] if QUICK else [10, 100, 1000]
configs = [("closed form", "closed_form", closed, None), ("dense", "dense", exact_solver, None),
           ("cg", ImplicitCG(tol=1e-12), exact_solver, None),
           ("identity", "identity", exact_solver, None)]
configs += [(f"neumann K={k}", ImplicitNeumann(n_terms=k), exact_solver, None) for k in (5, 50)]
configs += [(f"reverse T={t}", UnrolledReverse(), gd(t), None) for t in steps]
configs += [(f"forward T={t}", UnrolledForward(), gd(t), None) for t in steps]
configs += [
    (f"truncated K=10 T={steps[-1]}", TruncatedReverse(truncate=10), gd(steps[-1]), None),
    (f"first order T={steps[-1]}", "first_order", gd(steps[-1]), None),
    ("darts (1 step from theta*)", "darts", gd(1), warm),
    ("evograd", "evograd", gd(steps[-1]), None),
    ("best response", "best_response", exact_solver, None),
]

rows = []
for label, strategy, solver, init in configs:
    try:
        grad, seconds, info = hypergradient(strategy, solver, init)
    except Exception as exc:  # a strategy that cannot take this solver is reported, not hidden
        print(f"{label:28s} failed: {exc}")
        continue
    err = float(torch.linalg.vector_norm(grad - exact) / torch.linalg.vector_norm(exact))
    rows.append((label, max(err, 1e-16), seconds / grad_time, info.n_grad, info.n_hvp))

print(f"{'strategy':28s} {'rel. error':>11s} {'cost (grads)':>13s} {'n_grad':>7s} {'n_hvp':>6s}")
for label, err, cost, n_grad, n_hvp in rows:
    print(f"{label:28s} {err:11.2e} {cost:13.1f} {n_grad:7d} {n_hvp:6d}")

fig, ax = plt.subplots(figsize=(7, 5))
for label, err, cost, _, _ in rows:
    ax.scatter(cost, err)
    ax.annotate(label, (cost, err), fontsize=7, xytext=(3, 3), textcoords="offset points")
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("cost of one hypergradient (inner-gradient evaluations, wall time)")
ax.set_ylabel("relative error vs the exact hypergradient")
ax.set_title("Ridge, one penalty per feature (p = 20)")
fig.tight_layout()
plt.show()
