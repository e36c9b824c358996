"""
=====================================================
Learning sample weights from a small trusted set
=====================================================

40 % of the training labels of scikit-learn's digits are replaced by a wrong
class. Only 8 % of the training samples are known to be clean: they are the
*trusted* set. :class:`~skbilevel.reweighting.SampleReweighter` learns a
weight for every other sample so that a model trained with those weights
does well on the trusted samples: the outer problem of a bi-level problem
whose inner problem is the weighted training of a logistic regression. Its
default, Meta-Weight-Net (Shu et al. 2019), learns a small network mapping a
sample's training loss to its weight; ``method="per_sample"`` learns one free
weight per sample (Ren et al. 2018). Both use the one-step look-ahead
hypergradient computed by :func:`skbilevel.hypergrad.argmin`.

The trusted mask is passed to ``fit`` as metadata, so the estimator also
works at the end of a :class:`~sklearn.pipeline.Pipeline` with metadata
routing enabled.
"""

import matplotlib.pyplot as plt
import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from skbilevel.reweighting import SampleReweighter

X, y = load_digits(return_X_y=True)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.3, random_state=0, stratify=y
)
rng = np.random.RandomState(0)
n = len(y_train)
trusted = np.zeros(n, bool)
trusted[rng.choice(n, int(0.08 * n), replace=False)] = True
flipped = ~trusted & (rng.rand(n) < 0.4)
y_noisy = y_train.copy()
y_noisy[flipped] = (y_train[flipped] + rng.randint(1, 10, flipped.sum())) % 10

# %%
# Fit inside a pipeline
# ---------------------
# ``trusted`` is requested by default, so the pipeline routes it to the
# reweighter. The final model is a plain logistic regression refitted with
# the learned weights.
with sklearn.config_context(enable_metadata_routing=True):
    pipe = make_pipeline(
        StandardScaler(),
        SampleReweighter(final_estimator=LogisticRegression(), random_state=0),
    )
    pipe.fit(X_train, y_noisy, trusted=trusted)
reweighter = pipe[-1]
weights = reweighter.sample_weight_

plain = make_pipeline(StandardScaler(), LogisticRegression()).fit(X_train, y_noisy)
oracle = make_pipeline(StandardScaler(), LogisticRegression()).fit(X_train, y_train)
print(f"test accuracy, noisy labels as given: {plain.score(X_test, y_test):.3f}")
print(f"test accuracy, learned weights:       {pipe.score(X_test, y_test):.3f}")
print(f"test accuracy, clean labels (oracle): {oracle.score(X_test, y_test):.3f}")
auroc = roc_auc_score(~flipped[~trusted], weights[~trusted])
print(f"AUROC of the weights, clean vs flipped: {auroc:.3f}")

# %%
# Learned weights of clean and flipped samples
# --------------------------------------------
# Flipped samples get weights near zero. The right panel shows the function
# the weighting network learned: the weight falls as the sample's loss rises.
# :meth:`~skbilevel.reweighting.SampleReweighter.weigh` applies it to any
# labelled samples, here the training samples themselves.
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
bins = np.linspace(0, weights[~trusted].max(), 40)
axes[0].hist(weights[~trusted & ~flipped], bins=bins, alpha=0.6, label="clean")
axes[0].hist(weights[flipped], bins=bins, alpha=0.6, label="flipped")
axes[0].set_xlabel("learned weight")
axes[0].set_ylabel("training samples")
axes[0].set_title(f"Meta-Weight-Net weights (AUROC {auroc:.2f})")
axes[0].legend()

losses = np.linspace(0, 8, 200)
with torch.no_grad():
    curve = reweighter.weight_net_(torch.as_tensor(losses, dtype=torch.float32)).numpy()
axes[1].plot(losses, curve)
axes[1].set_xlabel("training loss of a sample")
axes[1].set_ylabel("weight")
axes[1].set_title("learned weighting function")
fig.tight_layout()

# %%
# One free weight per sample
# --------------------------
# ``method="per_sample"`` has one weight per training sample instead of a
# shared function of the loss. It separates clean from flipped samples less
# well here: with about 1150 free weights and 100 trusted samples it partly
# fits the trusted set itself (see ``benchmarks/bench_reweighting.py``).
Xs = StandardScaler().fit_transform(X_train)
per_sample = SampleReweighter(
    method="per_sample", final_estimator=LogisticRegression(), random_state=0
).fit(Xs, y_noisy, trusted=trusted)
w = per_sample.sample_weight_
print(f"per-sample weights: AUROC {roc_auc_score(~flipped[~trusted], w[~trusted]):.3f}")

fig, ax = plt.subplots(figsize=(5, 4))
order = np.argsort(-w[~trusted])
ax.plot(np.cumsum(flipped[~trusted][order]) / flipped.sum())
ax.set_xlabel("training samples, by decreasing learned weight")
ax.set_ylabel("fraction of flipped samples included")
ax.set_title("per-sample weights")
fig.tight_layout()
plt.show()
