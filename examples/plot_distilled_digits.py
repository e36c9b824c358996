"""
========================================================
Distilling the digits data set to a few images per class
========================================================

:class:`~skbilevel.distillation.DatasetDistiller` learns a tiny synthetic
training set: here 1 and then 5 images per class of scikit-learn's 8x8
digits. With ``method="kip"`` (kernel inducing points) the synthetic images
are the outer variables of a bi-level problem whose inner problem, kernel
ridge regression with the neural tangent kernel of a ReLU network, is solved
in closed form inside autograd; the outer loss is the error of that kernel
model on the real training images.

We compare the kernel model trained on the distilled images with the same
model trained on as many random real images, and check that the distilled
images also teach a plain logistic regression better.
"""

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from skbilevel.distillation import DatasetDistiller

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.3, random_state=0, stratify=y
)

# %%
# One image per class
# -------------------
# ``fit_resample`` returns the distilled set, ready for any estimator.
distiller = DatasetDistiller(n_per_class=1, max_iter=200, random_state=0)
X_small, y_small = distiller.fit_resample(X_train, y_train)

# The same kernel model fitted on one random real image per class: a
# distiller stopped before its first real step.
baseline = DatasetDistiller(
    n_per_class=1, init="random", max_iter=1, learning_rate=1e-12, random_state=0
)
baseline.fit(X_train, y_train)

logreg = LogisticRegression(max_iter=5000)
print(f"kernel model, 10 distilled images: {distiller.score(X_test, y_test):.3f}")
print(f"kernel model, 10 random images:    {baseline.score(X_test, y_test):.3f}")
print(f"logistic regression, distilled:    "
      f"{logreg.fit(X_small, y_small).score(X_test, y_test):.3f}")
print(f"logistic regression, random:       "
      f"{logreg.fit(baseline.X_distilled_, baseline.y_distilled_).score(X_test, y_test):.3f}")

# %%
# The distilled images start at the mean image of each class (k-means with
# one cluster) and end as prototypes that keep what separates each class
# from the others. Top row: the random real images of the baseline.
fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
for j in range(10):
    axes[0, j].imshow(baseline.X_distilled_[j].reshape(8, 8), cmap="gray_r")
    axes[1, j].imshow(X_small[j].reshape(8, 8), cmap="gray_r")
    axes[0, j].set_title(str(y_small[j]))
    for ax in axes[:, j]:
        ax.set_xticks([])
        ax.set_yticks([])
axes[0, 0].set_ylabel("random")
axes[1, 0].set_ylabel("distilled")
fig.suptitle("1 image per class: random real (top), distilled (bottom)")
plt.tight_layout()

# %%
# Five images per class
# ---------------------
# With a list of kernels, each outer step uses one of them at random, so the
# images do not specialize to one kernel and transfer better to other
# learners.
distiller5 = DatasetDistiller(
    n_per_class=5, kernel=[("ntk", {"depth": 3}), "rbf"], max_iter=200, random_state=0
)
X5, y5 = distiller5.fit_resample(X_train, y_train)
print(f"kernel model, 50 distilled images: {distiller5.score(X_test, y_test):.3f}")
print(f"logistic regression, distilled:    "
      f"{logreg.fit(X5, y5).score(X_test, y_test):.3f}")

fig, axes = plt.subplots(5, 10, figsize=(10, 5.2))
for c in range(10):
    images = X5[y5 == c]
    for i in range(5):
        ax = axes[i, c]
        ax.imshow(images[i].reshape(8, 8), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, c].set_title(str(c))
fig.suptitle("5 distilled images per class")
plt.tight_layout()

# %%
# The outer loss (on mini-batches of real images) along the fit.
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(np.convolve(distiller5.history_, np.ones(10) / 10, mode="valid"))
ax.set_xlabel("outer iteration")
ax.set_ylabel("outer loss (moving average)")
ax.set_yscale("log")
plt.tight_layout()
plt.show()
