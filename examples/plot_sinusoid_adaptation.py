"""
==========================================================
Few-shot sinusoid regression: before and after adaptation
==========================================================

The sinusoid problem of the MAML paper (Finn et al., 2017): every task is a
curve ``A sin(x - phase)`` with amplitude ``A`` in [0.1, 5] and phase in
[0, pi], observed at a handful of points ``x`` in [-5, 5].
:class:`~skbilevel.meta.MetaLearnerRegressor` meta-learns, over many such
tasks, an initialization of a small MLP from which a few gradient steps on
K = 10 points fit a *new* curve.

``fit(X, y, groups=task_ids)`` takes the tasks as ordinary rows with a task
id per row; ``adapt(X_support, y_support)`` returns a fitted scikit-learn
regressor for a new task and leaves the meta-learner unchanged.
"""

import matplotlib.pyplot as plt
import numpy as np

from skbilevel.meta import MetaLearnerRegressor

rng = np.random.RandomState(0)


def sinusoids(n_tasks, n_points):
    amp, phase = rng.uniform(0.1, 5, n_tasks), rng.uniform(0, np.pi, n_tasks)
    X = rng.uniform(-5, 5, (n_tasks, n_points, 1))
    y = amp[:, None] * np.sin(X[..., 0] - phase[:, None])
    return X.reshape(-1, 1), y.ravel(), np.repeat(np.arange(n_tasks), n_points)


X, y, task_ids = sinusoids(n_tasks=2000, n_points=20)

# %%
# Meta-train MAML: 5 inner SGD steps of size 0.01 on K = 10 support points,
# the loss of the adapted network on 10 query points as the meta-objective.
meta = MetaLearnerRegressor(
    method="maml", k_shot=10, n_query=10, inner_steps=5, inner_lr=0.01,
    meta_batch_size=25, max_iter=500, learning_rate=3e-3, random_state=0,
)
meta.fit(X, y, groups=task_ids)
print(f"{meta.n_iter_} meta-iterations; query MSE after adaptation "
      f"{meta.history_[:50].mean():.2f} (first 50) -> {meta.history_[-50:].mean():.2f} (last 50)")

# %%
# A new task, never seen in training: 10 observed points.
amp, phase = 3.0, 1.0
x_support = rng.uniform(-5, 5, (10, 1))
y_support = amp * np.sin(x_support[:, 0] - phase)
grid = np.linspace(-5, 5, 200)[:, None]
truth = amp * np.sin(grid[:, 0] - phase)

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot(grid, truth, "k", lw=2, label="true curve")
for steps, style in [(0, ":"), (1, "--"), (5, "-")]:
    task = meta.adapt(x_support, y_support, inner_steps=steps)
    mse = np.mean((task.predict(grid) - truth) ** 2)
    label = "meta-initialization" if steps == 0 else f"after {steps} step(s)"
    ax.plot(grid, task.predict(grid), style, label=f"{label} (MSE {mse:.2f})")
ax.plot(x_support, y_support, "o", color="C3", label="10 support points")
ax.set(xlabel="x", ylabel="y", title="MAML on a new sinusoid")
ax.legend(loc="lower right", fontsize=8)
plt.tight_layout()
plt.show()
