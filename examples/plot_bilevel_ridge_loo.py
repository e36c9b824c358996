"""
==========================================================
Leave-one-out ridge: the grid against the exact optimum
==========================================================

``RidgeCV(alphas=np.logspace(-6, 6, 13))`` evaluates the leave-one-out (LOO)
error of ridge at 13 points and keeps the best. :class:`~skbilevel.linear_model.BilevelRidgeCV`
computes the same LOO error for *any* alpha from one eigendecomposition
(:func:`~skbilevel.hypergrad.ridge_loo_decomposition`), scans it finely,
and refines the best point with secant steps on its exact derivative.

On the diabetes data expanded with degree-3 polynomial features
(285 columns for 442 samples) the LOO curve has its minimum between two
grid points, about a factor 2 from RidgeCV's choice, and 1.3 % lower. The left panel shows the
whole curve with RidgeCV's grid, the right one zooms on the minimum, where
the derivative (dashed, right axis) crosses zero at the alpha found.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from skbilevel.hypergrad import (
    ridge_loo_curve,
    ridge_loo_decomposition,
    ridge_loo_value_and_grad,
)
from skbilevel.linear_model import BilevelRidgeCV

X, y = load_diabetes(return_X_y=True)
X = make_pipeline(
    StandardScaler(), PolynomialFeatures(3, include_bias=False), StandardScaler()
).fit_transform(X)

grid = np.logspace(-6, 6, 13)
ridge_cv = RidgeCV(alphas=grid, store_cv_results=True).fit(X, y)
ours = BilevelRidgeCV().fit(X, y)

# %%
# The LOO curve, from the decomposition the estimator uses
decomp = ridge_loo_decomposition(torch.as_tensor(X), torch.as_tensor(y))
alphas = np.logspace(-6, 6, 600)
curve = ridge_loo_curve(decomp, alphas).numpy()[:, 0]
grid_loo = ridge_cv.cv_results_.mean(axis=0)  # RidgeCV's own numbers

zoom = np.geomspace(ours.alpha_ / 8, ours.alpha_ * 8, 200)
zoom_loo = ridge_loo_curve(decomp, zoom).numpy()[:, 0]
zoom_grad = np.array(
    [float(ridge_loo_value_and_grad(decomp, np.log(a))[1][0]) for a in zoom]
)

fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(11, 4.2))
ax.semilogx(alphas, curve, color="0.3", lw=1.5, label="exact LOO error")
ax.semilogx(grid, grid_loo, "o", color="tab:blue", label="RidgeCV's 13-point grid")
ax.semilogx([ridge_cv.alpha_], [-ridge_cv.best_score_], "s", ms=10, mfc="none",
            color="tab:blue", label=f"RidgeCV: alpha={ridge_cv.alpha_:.3g}")
ax.semilogx([ours.alpha_], [-ours.best_score_], "*", ms=14, color="tab:red",
            label=f"BilevelRidgeCV: alpha={ours.alpha_:.3g}")
ax.set_ylim(curve.min() * 0.97, np.percentile(curve, 90))
ax.set_xlabel("alpha")
ax.set_ylabel("mean squared LOO error")
ax.set_title("Diabetes, degree-3 polynomial features")
ax.legend(fontsize=8)

ax_zoom.semilogx(zoom, zoom_loo, color="0.3", lw=1.5)
ax_zoom.semilogx([ours.alpha_], [-ours.best_score_], "*", ms=14, color="tab:red")
for a, v in zip(grid, grid_loo):
    if zoom[0] <= a <= zoom[-1]:
        ax_zoom.semilogx([a], [v], "o", color="tab:blue")
ax_zoom.set_xlabel("alpha")
ax_zoom.set_title(
    f"LOO {-ours.best_score_:.1f} (ours) vs {-ridge_cv.best_score_:.1f} (grid)"
)
ax_grad = ax_zoom.twinx()
ax_grad.semilogx(zoom, zoom_grad, "--", color="tab:red", lw=1)
ax_grad.axhline(0.0, color="tab:red", lw=0.5)
ax_zoom.axvline(ours.alpha_, color="tab:red", lw=0.5, ls=":")
ax_grad.set_ylabel("d LOO / d log(alpha)", color="tab:red")
fig.tight_layout()
plt.show()

print(f"RidgeCV:        alpha={ridge_cv.alpha_:.4g}  LOO MSE={-ridge_cv.best_score_:.2f}")
print(f"BilevelRidgeCV: alpha={ours.alpha_:.4g}  LOO MSE={-ours.best_score_:.2f}  "
      f"({ours.n_iter_} hypergradient evaluations after the scan)")
