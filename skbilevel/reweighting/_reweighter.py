"""Learn training-sample weights from a small trusted set (L2RW, Meta-Weight-Net).

The bi-level problem, for a mini-batch ``B`` of training samples and a batch
``V`` of trusted samples::

    inner:  theta*(phi) = argmin_theta  sum_{i in B} w_i(phi) l_i(theta) / sum_{i in B} w_i(phi)
                                         + alpha / 2 ||theta||^2
    outer:  min_phi  F(phi) = mean_{j in V} l_j(theta*(phi))

``w_i(phi) = sigmoid(phi_i)`` with one logit per training sample
(``method="per_sample"``: hyper-cleaning, Franceschi et al. 2017; Ren et al.
2018) or ``w_i(phi) = net_phi(l_i(theta), y_i)`` for a small weighting
network (``method="weight_net"``: Shu et al. 2019). The default hypergradient
is the one-step look-ahead of both papers: ``theta*`` is replaced by one
gradient step from the current model, ``theta - lr * grad_theta f``. It is
obtained from the solver core's ``argmin`` with the ``"lookahead"`` strategy;
truncated or full unrolling and implicit strategies plug in the same way.
After each hypergradient step on ``phi`` the model takes one optimizer step
on the same batch weighted by the updated ``w(phi)`` (Meta-Weight-Net's
alternating scheme), so the model and the weights are learned in one pass.
"""

import copy
import math
import numbers
import warnings

import numpy as np
import torch
from sklearn import get_config
from sklearn.base import (
    BaseEstimator,
    ClassifierMixin,
    RegressorMixin,
    clone,
    is_classifier,
    is_regressor,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import ShuffleSplit, StratifiedShuffleSplit
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    assert_all_finite,
    check_is_fitted,
    has_fit_parameter,
    validate_data,
)
from sklearn.base import _fit_context
from torch import nn

from ..hypergrad import (
    LBFGS,
    GradientDescent,
    StepSolver,
    argmin,
    available_strategies,
    get_strategy,
)
from ..hypergrad._checks import _did_you_mean
from ..utils import resolve_device, to_numpy, to_tensor
from ..utils._fit import fit_outer, keep_state_on_error
from ..utils._modules import (
    MLP,
    WeightNet,
    _is_skorch_net,
    build_module,
    check_forward,
    functional_forward,
    load_parameters,
    module_params,
    skorch_parts,
)
from ..utils._stats import _rms, _softmax
from ..utils._torch import _resolve_adam_dtype, _seeded_global_rng
from ..utils._validation import check_callbacks, check_hidden_layer_sizes

__all__ = ["SampleReweighter", "SampleReweighterRegressor"]


# --------------------------------------------------------------------------
# per-sample losses and output conversions


def _per_sample_loss(kind, criterion, outputs, y):
    """Per-sample loss (shape ``(n,)``) of model ``outputs`` for targets ``y``.

    ``kind`` is ``"ce"`` (outputs are logits, cross-entropy), ``"nll_prob"``
    (outputs are probabilities; skorch's ``NeuralNetClassifier`` default:
    ``NLLLoss`` on ``log(p + eps)``), ``"mse"`` (squared error) or
    ``"criterion"`` (a torch criterion built with ``reduction="none"``,
    averaged over the non-batch dimensions).
    """
    if kind == "ce":
        return nn.functional.cross_entropy(outputs, y, reduction="none")
    if kind == "nll_prob":
        eps = torch.finfo(outputs.dtype).eps
        return nn.functional.nll_loss(torch.log(outputs + eps), y, reduction="none")
    if kind == "mse":
        return (outputs.reshape(-1) - y) ** 2
    losses = criterion(outputs.reshape(y.shape) if outputs.numel() == y.numel() else outputs, y)
    return losses.reshape(losses.shape[0], -1).mean(dim=1)


#: gradient norm of the final refit's loss (a weighted mean) beyond which it is
#: not a fit: ConvergenceWarning (see _refit_inner)
_REFIT_GRAD_NORM = 1e-3


def _check_in_range(X, dtype):
    """Raise a ``ValueError`` where ``X``, finite in float64 (``validate_data``),
    is not in ``dtype``, the dtype of the torch computation: there its values
    become inf, and the outputs NaN."""
    limit = torch.finfo(dtype).max
    if X.size and np.abs(X).max() > limit:
        raise ValueError(
            f"X has values up to {np.abs(X).max():.3g}, beyond the range of "
            f"{str(dtype).replace('torch.', '')} (largest {limit:.3g}), the dtype "
            "of the computation. Pass dtype='float64' (and refit) or scale X (e.g. "
            "with StandardScaler)."
        )


def _trainable(module):
    """``(name, parameter)`` pairs of the module's parameters that require grad:
    those the fit trains (a frozen layer keeps its values, as in torch)."""
    return [(k, p) for k, p in module.named_parameters() if p.requires_grad]


def _as_logits(outputs, n_classes):
    """Classifier outputs as an ``(n, n_classes)`` tensor (a single logit column
    ``z`` for two classes becomes ``[0, z]``)."""
    if n_classes == 2 and (outputs.dim() == 1 or outputs.shape[1] == 1):
        z = outputs.reshape(-1, 1)
        return torch.cat([torch.zeros_like(z), z], dim=1)
    return outputs


class _TorchModel:
    """The inner torch model, fitted: predictions in scikit-learn's format.

    Holds the module (on the CPU) and what is needed to turn its outputs into
    labels, probabilities or regression values. It is what ``estimator_``
    holds when no ``final_estimator`` is given.
    """

    def __init__(self, module, kind, criterion, classes, y_mean, y_scale, dtype):
        self.module_ = module
        self.kind = kind
        self.criterion = criterion
        self.classes_ = classes
        self.y_mean = y_mean
        self.y_scale = y_scale
        self.dtype = dtype

    def _outputs(self, X, batch_size=4096):
        self.module_.eval()
        # a float32 model gave NaN probabilities and class 0 for X beyond 3.4e38
        _check_in_range(np.asarray(X), self.dtype)
        # a copy where numpy's array is read-only (pandas 3 frames, joblib memmaps):
        # torch warns on those
        X = np.asarray(X)
        X = torch.as_tensor(X if X.flags.writeable else X.copy(), dtype=self.dtype)
        with torch.no_grad():
            outs = [self.module_(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]
        return torch.cat(outs) if outs else self.module_(X)

    def predict_proba(self, X):
        # normalized in float64: in the module's float32 (or bfloat16) the rows
        # summed to 1 only within 1e-7 (2e-3), and log_loss objects to that
        out = to_numpy(_as_logits(self._outputs(X), len(self.classes_))).astype(np.float64)
        if self.kind == "nll_prob":
            return out / out.sum(axis=1, keepdims=True)
        return _softmax(out)

    def decision_function(self, X):
        out = _as_logits(self._outputs(X), len(self.classes_))
        if self.kind == "nll_prob":
            out = torch.log(out + torch.finfo(out.dtype).eps)
        scores = to_numpy(out).astype(np.float64)
        if scores.shape[1] == 2:
            return scores[:, 1] - scores[:, 0]
        return scores

    def predict(self, X):
        if self.classes_ is None:
            out = to_numpy(self._outputs(X)).astype(np.float64).reshape(len(X), -1)[:, 0]
            return out * self.y_scale + self.y_mean
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class _WeightedProblem:
    """Data, model and weighting of one fit, as torch closures.

    Everything the outer loop needs: the inner loss ``f(theta, phi)`` on a
    training batch, the outer loss on a trusted batch, the weights ``w(phi)``,
    and one ordinary training step of the model. No derivative is taken
    here; ``argmin`` and the optimizers do that.
    """

    def __init__(self, module, kind, criterion, X, y, prior, train_idx, trusted_idx, *,
                 method, weight_net, weight_label, alpha, normalize, n_classes):
        self.module = module
        self.kind = kind
        self.criterion = criterion
        self.X, self.y, self.prior = X, y, prior
        self.train_idx, self.trusted_idx = train_idx, trusted_idx
        self.method = method
        self.weight_net = weight_net
        self.weight_label = weight_label
        self.alpha = alpha
        self.normalize = normalize
        self.n_classes = n_classes

    def losses(self, theta, idx):
        out = functional_forward(self.module, theta, self.X[idx])
        if self.n_classes:
            out = _as_logits(out, self.n_classes)
        return _per_sample_loss(self.kind, self.criterion, out, self.y[idx])

    def weight_inputs(self, theta, pos):
        """Inputs of the weighting network for training positions ``pos``:
        the samples' losses at ``theta`` (constants, as in Meta-Weight-Net)."""
        if self.method != "weight_net":
            return None
        idx = self.train_idx[pos]
        with torch.no_grad():
            loss = self.losses(theta, idx).detach()
        label = self.y[idx] if self.weight_label else None
        return loss, label

    def weights(self, phi, pos, inputs):
        """Learned weights ``w(phi)`` of the training samples at positions ``pos``."""
        if self.method == "per_sample":
            return torch.sigmoid(phi[pos])
        loss, label = inputs
        if label is None:
            return functional_forward(self.weight_net, phi, loss)
        return functional_forward(self.weight_net, phi, loss, label)

    def weighted_loss(self, theta, w, pos):
        idx = self.train_idx[pos]
        w = w * self.prior[idx]
        value = (w * self.losses(theta, idx)).sum()
        if self.normalize:
            value = value / w.sum().clamp_min(torch.finfo(w.dtype).tiny ** 0.5)
        else:
            value = value / len(idx)
        if self.alpha:
            value = value + 0.5 * self.alpha * sum((t**2).sum() for t in theta.values())
        return value

    def inner_loss(self, pos, inputs):
        def loss(theta, phi):
            return self.weighted_loss(theta, self.weights(phi, pos, inputs), pos)

        return loss

    def outer_loss(self, theta, tpos):
        idx = self.trusted_idx[tpos]
        prior = self.prior[idx]
        return (prior * self.losses(theta, idx)).sum() / prior.sum()


def _outer_objective(problem, theta, phi, pos, tpos, strategy, solver):
    """Outer loss on trusted positions ``tpos`` at ``theta*(phi)`` for training
    positions ``pos``, with ``theta*`` from :func:`~skbilevel.hypergrad.argmin`
    started at ``theta`` (the current model). Returns ``(loss, theta*, info)``;
    ``loss.backward()`` puts the hypergradient in ``phi``'s ``.grad``."""
    inputs = problem.weight_inputs(theta, pos)
    theta_new, info = argmin(
        problem.inner_loss(pos, inputs), phi, theta, hypergradient=strategy, solver=solver
    )
    return problem.outer_loss(theta_new, tpos), theta_new, info


def _batches(n, batch_size, rng):
    """Endless stream of index arrays: shuffled epochs cut into batches."""
    while True:
        if batch_size >= n:
            yield np.arange(n)
            continue
        perm = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def _make_inner_optimizer(name, params, lr):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9)


class _BaseSampleReweighter(BaseEstimator):
    """Shared implementation of :class:`SampleReweighter` and its regressor twin."""

    # ``trusted`` is the one piece of metadata this estimator cannot work
    # without, so it is requested by default (like ``groups`` for splitters).
    __metadata_request__fit = {"trusted": True}

    _parameter_constraints = {
        "module": "no_validation",
        "method": [StrOptions({"per_sample", "weight_net"})],
        "hypergradient": "no_validation",
        "final_estimator": [None, StrOptions({"joint"}), HasMethods(["fit"])],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [StrOptions({"auto"}), Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "weight_learning_rate": [StrOptions({"auto"}), Interval(numbers.Real, 0, None, closed="neither")],
        "optimizer": [StrOptions({"adam", "sgd"})],
        "alpha": [Interval(numbers.Real, 0, None, closed="left")],
        "unroll_steps": [Interval(numbers.Integral, 1, None, closed="left")],
        "normalize_weights": ["boolean"],
        "weight_net_hidden_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "weight_net_label": ["boolean"],
        "validation_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "early_stopping": ["boolean"],
        "n_iter_no_change": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "device": "no_validation",
        "dtype": "no_validation",
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callbacks": [None, list],
    }

    def __init__(
        self,
        module="linear",
        *,
        method="weight_net",
        hypergradient="lookahead",
        final_estimator=None,
        max_iter=300,
        batch_size="auto",
        learning_rate=0.01,
        weight_learning_rate="auto",
        optimizer="adam",
        alpha=1e-4,
        unroll_steps=5,
        normalize_weights=True,
        weight_net_hidden_size=100,
        weight_net_label=False,
        validation_fraction=0.1,
        early_stopping=False,
        n_iter_no_change=10,
        tol=1e-4,
        device="cpu",
        dtype="float32",
        random_state=None,
        verbose=0,
        callbacks=None,
        **kwargs,
    ):
        self.module = module
        self.method = method
        self.hypergradient = hypergradient
        self.final_estimator = final_estimator
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.weight_learning_rate = weight_learning_rate
        self.optimizer = optimizer
        self.alpha = alpha
        self.unroll_steps = unroll_steps
        self.normalize_weights = normalize_weights
        self.weight_net_hidden_size = weight_net_hidden_size
        self.weight_net_label = weight_net_label
        self.validation_fraction = validation_fraction
        self.early_stopping = early_stopping
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.callbacks = callbacks
        # skorch's convention: ``module__*`` keywords are parameters too. They
        # are validated in ``fit`` (scikit-learn estimators do not raise in
        # ``__init__`` or ``set_params``). Any other keyword is a parameter as
        # well (clone keeps it, fit rejects it), kept aside rather than as an
        # attribute: max_iter_=3 passed for a fitted attribute (check_is_fitted
        # took the unfitted estimator as fitted) and, ending in "_", was not
        # even rejected by fit
        self._unknown_params = {k: v for k, v in kwargs.items() if not k.startswith("module__")}
        for key, value in kwargs.items():
            if key.startswith("module__"):
                setattr(self, key, value)

    def _extra_params(self):
        """Keyword parameters given beyond the signature: the ``module__*``
        ones, and any unknown one given to ``__init__`` (rejected in fit)."""
        known = set(self._get_param_names())
        extra = {
            k: v for k, v in vars(self).items() if k.startswith("module__") and k not in known
        }
        extra.update(getattr(self, "_unknown_params", {}))
        return extra

    def get_params(self, deep=True):
        params = super().get_params(deep=deep)
        params.update(self._extra_params())
        return params

    def set_params(self, **params):
        # module__* keywords are parameters too; any other unknown name goes to
        # scikit-learn's set_params, which rejects it at once (a misspelled name
        # was stored, cloned, and failed only in fit: in a grid search, every fit)
        known = set(self._get_param_names())
        nested = hasattr(self.module, "set_params")
        unknown = dict(getattr(self, "_unknown_params", {}))
        for key in list(params):
            if key in known or (nested and key.startswith("module__")):
                continue
            if key.startswith("module__"):
                setattr(self, key, params.pop(key))
            elif key in unknown:  # given to __init__ (clone): still rejected in fit
                unknown[key] = params.pop(key)
        self._unknown_params = unknown
        return super().set_params(**params)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # ------------------------------------------------------------------
    # validation helpers

    def _split_trusted(self, y, trusted, sample_weight):
        n = len(y)
        if n < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 samples (training and trusted); "
                f"got 1 sample."
            )
        if trusted is not None:
            trusted = np.asarray(trusted)
            if trusted.ndim != 1 or trusted.shape[0] != n:
                raise ValueError(
                    f"trusted must be a boolean mask with one entry per sample: expected "
                    f"shape ({n},), got {trusted.shape}."
                )
            if trusted.dtype != bool:
                if not np.isin(trusted, [0, 1]).all():
                    raise ValueError(
                        "trusted must be a boolean mask (True for trusted samples); got "
                        f"values other than 0/1 (dtype {trusted.dtype}). To pass indices, "
                        "build a mask: mask = np.zeros(n, bool); mask[idx] = True."
                    )
                trusted = trusted.astype(bool)
            n_trusted = int(trusted.sum())
            if n_trusted == 0:
                raise ValueError(
                    "trusted has no True entry: at least one trusted (clean) sample is "
                    "needed to learn the weights. Mark some samples as trusted, or pass "
                    "trusted=None to hold out validation_fraction of the data."
                )
            if n_trusted == n:
                raise ValueError(
                    "Every sample is marked trusted, so there is nothing to reweight. "
                    "Mark only the clean subset as trusted (the rest is reweighted), or "
                    "fit the inner model directly."
                )
            train_idx, trusted_idx = np.flatnonzero(~trusted), np.flatnonzero(trusted)
            if self._is_classifier:
                missing = np.setdiff1d(np.unique(y[trusted_idx]), np.unique(y[train_idx]))
                if missing.size:
                    raise ValueError(
                        f"Labels {self.classes_[missing].tolist()} appear in the trusted "
                        "set but not among the training (non-trusted) samples, so their "
                        "weights cannot be learned. Add training samples of those classes "
                        "or remove them from the trusted set."
                    )
            return train_idx, trusted_idx
        rng = check_random_state(self._seed)
        # Hold out only samples that count (positive sample_weight).
        pool = np.flatnonzero(sample_weight > 0)
        if len(pool) < 2:
            pool = np.arange(n)
        n_val = max(1, int(round(self.validation_fraction * len(pool))))
        n_val = min(n_val, len(pool) - 1)
        split = None
        if self._is_classifier and n_val >= len(np.unique(y[pool])):
            try:
                split = next(
                    StratifiedShuffleSplit(1, test_size=n_val, random_state=rng).split(
                        np.zeros(len(pool)), y[pool]
                    )
                )
            except ValueError:
                split = None
        if split is None:
            split = next(
                ShuffleSplit(1, test_size=n_val, random_state=rng).split(np.zeros(len(pool)))
            )
        trusted_idx = np.sort(pool[split[1]])
        train_idx = np.setdiff1d(np.arange(n), trusted_idx)
        if self._is_classifier:
            # A class held out entirely could not be weighted: keep it in training.
            lacking = np.isin(y[trusted_idx], y[train_idx], invert=True)
            if lacking.any() and not lacking.all():
                train_idx = np.sort(np.concatenate([train_idx, trusted_idx[lacking]]))
                trusted_idx = trusted_idx[~lacking]
        return train_idx, trusted_idx

    def _warn_untrusted_classes(self, y_enc, train_idx, trusted_idx, sample_weight):
        """Warn about classes with training samples but no trusted one in the
        given mask (counting samples of positive ``sample_weight``): the trusted
        loss never measures them, and weights tied to the sample or its label
        drift towards zero. (A validation split too small to hold every class
        is the ``validation_fraction`` chosen.)"""
        counted = sample_weight > 0
        train = y_enc[train_idx[counted[train_idx]]]
        unseen = np.setdiff1d(train, y_enc[trusted_idx[counted[trusted_idx]]])
        if not unseen.size:
            return
        labels = self.classes_[unseen].tolist()
        counts = ", ".join(f"{label!r}: {int((train == c).sum())}"
                           for label, c in zip(labels, unseen))
        warnings.warn(
            f"Classes {labels} have training samples ({counts}) "
            "but no trusted sample: the trusted loss that learns the weights does not "
            "measure them. With method='per_sample' or weight_net_label=True their "
            "weights are driven towards zero and the refitted model seldom predicts "
            "them. Mark some samples of each class as trusted.",
            UserWarning,
            stacklevel=7,  # the caller of fit (through its two decorators)
        )

    def _resolve_model(self, n_features, n_outputs):
        """Return ``(module, kind, criterion)`` for the configured inner model."""
        if _is_skorch_net(self.module):
            if module_params(self):
                raise ValueError(
                    "module__* keywords cannot be combined with a skorch net; set them "
                    "on the net itself."
                )
            spec, params, criterion = skorch_parts(self.module)
            module = build_module(spec, params, n_features, n_outputs, skorch=True)
            name = type(criterion).__name__
            if self._is_classifier:
                kinds = {"NLLLoss": "nll_prob", "CrossEntropyLoss": "ce"}
                if name not in kinds:
                    raise ValueError(
                        f"The skorch net's criterion {name} is not supported for "
                        "classification; use NLLLoss (module outputs probabilities) "
                        "or CrossEntropyLoss (module outputs logits)."
                    )
                return module, kinds[name], None
            return module, "criterion", criterion
        params = module_params(self)
        if (isinstance(self.module, str) or self.module is MLP) and (
            "hidden_layer_sizes" in params
        ):
            check_hidden_layer_sizes(
                params["hidden_layer_sizes"], "module__hidden_layer_sizes"
            )
        module = build_module(self.module, params, n_features, n_outputs, skorch=True)
        return module, ("ce" if self._is_classifier else "mse"), None

    def _check_output_shape(self, module, X):
        """One forward pass on two rows of ``X``: the module must have parameters,
        take ``n_features_in_`` inputs and give one logit per class (one output
        for regression)."""
        if next(module.parameters(), None) is None:
            raise ValueError(
                f"The inner module {type(module).__name__} has no parameters, so "
                "there is no model to train with the learned weights. Give a module "
                "with parameters, e.g. module='linear' or module='mlp'."
            )
        if not _trainable(module):
            raise ValueError(
                f"Every parameter of the inner module {type(module).__name__} has "
                "requires_grad=False, so there is no model to train with the learned "
                "weights. Unfreeze the layers to train (e.g. the output layer)."
            )
        out = check_forward(module, X, "inner module")
        n = X[:2].shape[0]
        if self._is_classifier:
            k = len(self.classes_)
            ok = out.dim() == 2 and out.shape == (n, k)
            ok = ok or (k == 2 and (out.shape == (n,) or out.shape == (n, 1)))
            expected = f"({n}, {k})" + (f" or ({n},) / ({n}, 1) logits" if k == 2 else "")
        else:
            ok = out.shape == (n,) or out.shape == (n, 1)
            expected = f"({n},) or ({n}, 1)"
        if not ok:
            raise ValueError(
                f"The inner module's output has shape {tuple(out.shape)} for {n} samples, "
                f"but {expected} is needed"
                + (f" for the {len(self.classes_)} classes {self.classes_.tolist()}" if self._is_classifier else "")
                + ". Fix the module's output layer (or its module__* size parameters)."
            )

    def _final_weight_key(self):
        """The ``fit`` keyword that gives ``final_estimator`` the learned weights
        (``None`` for the torch model), checked before any training."""
        est = self.final_estimator
        if est is None or isinstance(est, str):
            return None
        # (an estimator of the other kind was refitted, and a classifier's
        # predict returned its continuous outputs: Ridge gave 1.05, 1.47)
        if self._is_classifier and is_regressor(est):
            raise ValueError(
                f"final_estimator {est!r} is a regressor, and {type(self).__name__}'s "
                "predict returns class labels. Pass a classifier (e.g. "
                "LogisticRegression), or use SampleReweighterRegressor for a "
                "continuous target."
            )
        if not self._is_classifier and is_classifier(est):
            raise ValueError(
                f"final_estimator {est!r} is a classifier, and {type(self).__name__} "
                "predicts a continuous target. Pass a regressor (e.g. Ridge), or use "
                "SampleReweighter for class labels."
            )
        if has_fit_parameter(est, "sample_weight"):
            return "sample_weight"
        steps = getattr(est, "steps", None)
        if steps:
            if get_config().get("enable_metadata_routing", False):
                return "sample_weight"  # routed by the steps' fit requests
            name, last = steps[-1]
            if hasattr(last, "fit") and has_fit_parameter(last, "sample_weight"):
                return f"{name}__sample_weight"
            est = last
        raise ValueError(
            f"final_estimator {est!r} does not take sample_weight in fit, so it "
            "cannot be refitted with the learned weights. Use an estimator whose fit "
            "takes sample_weight (e.g. LogisticRegression, or a Pipeline ending in "
            "one), or final_estimator=None / 'joint' for the inner torch model."
        )

    def _check_hypergradient(self):
        """Reject the closed-form family: the weighted model has no closed form."""
        family = get_strategy(self.hypergradient).family
        if family == "closed_form":
            names = [n for n in available_strategies()
                     if get_strategy(n).family != "closed_form"]
            raise ValueError(
                f"hypergradient={self.hypergradient!r} needs an inner problem with a "
                f"closed-form solution, which the weighted inner model of "
                f"{type(self).__name__} has not. Use one of {names} (default "
                "'lookahead')."
            )

    def _resolve_dtype(self):
        """The computing dtype; half precision only where it works."""
        dense = "The 'dense' hypergradient factorizes a matrix"
        return _resolve_adam_dtype(
            self.dtype, dense if get_strategy(self.hypergradient).name == "dense" else None
        )

    def _strategy_and_solver(self):
        strategy = get_strategy(self.hypergradient)
        if strategy.solver_kind == "step":
            n_steps = 1 if strategy.name == "lookahead" else self.unroll_steps
            return strategy, GradientDescent(lr=self.learning_rate, n_steps=n_steps)
        return strategy, None

    # ------------------------------------------------------------------

    def _fit(self, X, y, trusted, sample_weight):
        unknown = [k for k in self._extra_params() if not k.startswith("module__")]
        if unknown:
            hint = _did_you_mean(unknown, self._get_param_names())
            raise ValueError(
                f"Unknown parameters {unknown}{hint} for {type(self).__name__}; only "
                "module__* keywords are passed through to the inner module."
            )
        self._seed = check_random_state(self.random_state).randint(0, 2**31 - 1)
        device = resolve_device(self.device)
        # The whole fit draws from torch's global generator seeded by random_state
        # (dropout and other random layers of the inner module): two fits with the
        # same seed are identical, and the caller's generator is left as it was.
        with _seeded_global_rng(self._seed, device):
            return self._fit_seeded(X, y, trusted, sample_weight, device)

    def _fit_seeded(self, X, y, trusted, sample_weight, device):
        self._check_hypergradient()
        if self.batch_size == 1 and self.normalize_weights:
            raise ValueError(
                "batch_size=1 with normalize_weights=True: a batch of one sample "
                "normalizes its weight to 1, so the weights get no gradient and keep "
                "their start (0.5 for every sample with method='per_sample'). Use "
                "batch_size >= 2, or normalize_weights=False."
            )
        if self.weight_net_label and not self._is_classifier:
            raise ValueError(
                "weight_net_label=True feeds each sample's class label to the "
                f"weighting network, and {type(self).__name__} has no classes; leave "
                "it False (the network weighs by the loss)."
            )
        check_callbacks(self.callbacks)
        weight_key = self._final_weight_key()
        dtype = self._resolve_dtype()
        n, n_features = X.shape
        _check_in_range(X, dtype)
        sample_weight = _check_sample_weight(
            sample_weight, X, dtype=np.float64, ensure_non_negative=True
        )
        if self._is_classifier:
            check_classification_targets(y)
            self.classes_, y_enc = np.unique(y, return_inverse=True)
            if len(self.classes_) < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes; got 1 class "
                    f"({self.classes_.tolist()})."
                )
            counted = np.unique(y_enc[sample_weight > 0])
            if len(counted) < 2:
                raise ValueError(
                    f"Only 1 class ({self.classes_[counted].tolist()}) has samples with a "
                    "positive sample_weight; at least 2 classes are needed."
                )
            n_outputs = len(self.classes_)
            y_fit, y_mean, y_scale = y_enc, 0.0, 1.0
        else:
            n_outputs = 1
            top = sample_weight.max()  # (a sum of weights near 1e308 overflowed)
            y_mean = float(np.average(y, weights=sample_weight / top)) if top > 0 else 0.0
            # the samples that count set the scale: zero-weight targets of 1e6 made
            # it 1.5e5 and the others' standardized targets 1e-5
            counted = y[sample_weight > 0] if (sample_weight > 0).any() else y
            y_scale = float(_rms(counted - counted.mean())) or 1.0
            y_fit = (y - y_mean) / y_scale
        train_idx, trusted_idx = self._split_trusted(y_enc if self._is_classifier else y, trusted, sample_weight)
        for part, idx, why in (
            ("trusted", trusted_idx, "the outer loss that learns the weights is their "
             "weighted mean"),
            ("training (non-trusted)", train_idx, "there is nothing to reweight: the "
             "learned weights would multiply zeros and the model would be refitted on "
             "the trusted samples alone"),
        ):
            if sample_weight[idx].sum() <= 0:
                raise ValueError(
                    f"All {len(idx)} {part} samples have zero sample_weight, so {why}. "
                    f"Give some of them a positive sample_weight (it is positive for "
                    f"{int((sample_weight > 0).sum())} of the {n} samples)."
                )
        if self._is_classifier and trusted is not None:
            self._warn_untrusted_classes(y_enc, train_idx, trusted_idx, sample_weight)
        # the torch computation's copy of the weights. Normalized losses depend on
        # their ratios only: scaled to a largest weight of 1, so that uniform
        # weights of 1e-30 (or 1e50) fit as weights of 1 do (in float32 the
        # normalizing sum fell below its floor and the model stayed at its start,
        # R^2 0 against 1.0; 1e50 overflowed to NaN)
        prior_weight = sample_weight
        if self.normalize_weights:
            prior_weight = sample_weight / sample_weight.max()

        with _seeded_global_rng(self._seed):
            module, kind, criterion = self._resolve_model(n_features, n_outputs)
            module = module.to(device=device, dtype=dtype)
            X_t = to_tensor(X, device=device, dtype=dtype)
            self._check_output_shape(module, X_t)
            weight_net = None
            if self.method == "weight_net":
                n_label = n_outputs if (self.weight_net_label and self._is_classifier) else 0
                weight_net = WeightNet(n_label, self.weight_net_hidden_size).to(device=device, dtype=dtype)
        init_state = copy.deepcopy(module.state_dict())

        y_t = torch.as_tensor(y_fit, device=device, dtype=torch.long if self._is_classifier else dtype)
        prior = torch.as_tensor(prior_weight, dtype=dtype, device=device)
        problem = _WeightedProblem(
            module, kind, criterion, X_t, y_t, prior,
            torch.as_tensor(train_idx, device=device), torch.as_tensor(trusted_idx, device=device),
            method=self.method, weight_net=weight_net, weight_label=self.weight_net_label and self._is_classifier,
            alpha=self.alpha, normalize=self.normalize_weights,
            n_classes=n_outputs if self._is_classifier else 0,
        )
        if self.method == "per_sample":
            phi = torch.zeros(len(train_idx), dtype=dtype, device=device, requires_grad=True)
        else:
            phi = {k: p.detach().clone().requires_grad_(True) for k, p in weight_net.named_parameters()}
        weight_lr = self.weight_learning_rate
        if weight_lr == "auto":
            weight_lr = 0.1 if self.method == "per_sample" else 1e-3

        n_train, n_trusted = len(train_idx), len(trusted_idx)
        batch = n_train if self.batch_size == "auto" and n_train <= 2048 else (
            256 if self.batch_size == "auto" else self.batch_size)
        batch = min(batch, n_train)
        rng = np.random.RandomState(self._seed)
        train_batches = _batches(n_train, batch, rng)
        trusted_batches = _batches(n_trusted, min(batch, n_trusted), rng)
        strategy, solver = self._strategy_and_solver()
        # One-step strategies follow MW-Net (step the model with the new weights);
        # multi-step and implicit ones warm-start the model from their inner solution.
        one_step = isinstance(solver, StepSolver) and (
            getattr(strategy, "n_steps", None) or solver.n_steps) == 1

        # frozen parameters (requires_grad=False) stay the module's own constants
        theta = {k: p.detach().clone().requires_grad_(True) for k, p in _trainable(module)}
        if strategy.family in ("implicit", "proxy"):
            ones = torch.ones(batch, dtype=dtype, device=device)
            first = torch.arange(batch, device=device)
            if self._stochastic(problem, theta, ones, first):
                # (a dropout network with "cg": 40 warnings in 20 iterations, CG at
                # negative curvature and L-BFGS's failed line searches; "evograd"
                # and "best_response" the same)
                raise ValueError(
                    f"hypergradient={self.hypergradient!r} solves the inner problem to "
                    "a tolerance by L-BFGS, but the inner module's loss is random at "
                    "fixed parameters (dropout or another random layer): its line "
                    "search fails and the solution it differentiates is not one. Use "
                    "an unrolled strategy ('lookahead', the default, 'reverse', "
                    "'truncated', 'forward', 'first_order') or 'bome', or a module "
                    "without random layers."
                )
        opt = _make_inner_optimizer(self.optimizer, list(theta.values()), self.learning_rate)
        ctx = {"pending": None, "snapshot": None, "best": None, "best_loss": math.inf, "stall": 0}

        def train_step(pos, phi_now):
            inputs = problem.weight_inputs(theta, pos)
            with torch.no_grad():
                w = problem.weights(phi_now, pos, inputs)
            opt.zero_grad(set_to_none=True)
            problem.weighted_loss(theta, w, pos).backward()
            opt.step()

        def snapshot():
            return {k: t.detach().clone() for k, t in theta.items()}

        def objective(phi_now):
            ctx["snapshot"] = snapshot()
            if ctx["pending"] is not None:
                train_step(ctx["pending"], phi_now)
                ctx["pending"] = None
            pos = torch.as_tensor(next(train_batches), device=device)
            tpos = torch.as_tensor(next(trusted_batches), device=device)
            # a copy: the model is updated in place before the backward pass runs
            init = {k: t.detach().clone() for k, t in theta.items()}
            loss, theta_new, info = _outer_objective(problem, init, phi_now, pos, tpos, strategy, solver)
            if one_step:
                ctx["pending"] = pos
            else:
                with torch.no_grad():
                    for k, t in theta.items():
                        t.copy_(theta_new[k].detach())
            return loss, info

        def early_stop(state):
            with torch.no_grad():
                value = float(problem.outer_loss(theta, torch.arange(n_trusted, device=device)))
            # the first value is an improvement (inf - tol * inf would be NaN)
            if ctx["best"] is None or value < ctx["best_loss"] - self.tol * abs(ctx["best_loss"]):
                ctx["stall"] = 0
            else:
                ctx["stall"] += 1
            if value < ctx["best_loss"]:
                ctx["best_loss"] = value
                ctx["best"] = (snapshot(), [p.detach().clone() for p in state.phi])
            return ctx["stall"] >= self.n_iter_no_change

        callbacks = list(self.callbacks or [])
        if self.early_stopping:
            callbacks.append(early_stop)

        result = fit_outer(self, objective, phi, learning_rate=weight_lr, callbacks=callbacks,
                           early_stopping=False)
        leaves = [phi] if isinstance(phi, torch.Tensor) else list(phi.values())
        if result.stop_reason == "diverged":
            with torch.no_grad():
                for k, t in theta.items():
                    t.copy_(ctx["snapshot"][k])
        elif self.early_stopping and ctx["best"] is not None:
            with torch.no_grad():
                for k, t in theta.items():
                    t.copy_(ctx["best"][0][k])
                for leaf, saved in zip(leaves, ctx["best"][1]):
                    leaf.copy_(saved)
        elif ctx["pending"] is not None:
            train_step(ctx["pending"], phi)
        if not all(bool(torch.isfinite(t).all()) for t in theta.values()):
            with torch.no_grad():
                for k, t in theta.items():
                    t.copy_(ctx["snapshot"][k])

        # Final weights of every training sample, and the fitted attributes.
        with torch.no_grad():
            all_pos = torch.arange(n_train, device=device)
            w = problem.weights(phi, all_pos, problem.weight_inputs(theta, all_pos))
        w = to_numpy(w).astype(np.float64)
        self.sample_weight_ = np.ones(n, dtype=np.float64)
        self.sample_weight_[train_idx] = w
        self.trusted_ = np.zeros(n, dtype=bool)
        self.trusted_[trusted_idx] = True
        self.stop_reason_ = result.stop_reason

        self.module_ = copy.deepcopy(load_parameters(module, theta)).cpu().eval()
        self.weight_net_ = None
        if weight_net is not None:
            self.weight_net_ = copy.deepcopy(load_parameters(weight_net, phi)).cpu().eval()
        self._kind, self._criterion = kind, criterion
        self._y_mean, self._y_scale, self._torch_dtype = y_mean, y_scale, dtype

        refit_weight = self.sample_weight_ * sample_weight
        if self.final_estimator is None:
            # (normalized: the ratios only, see prior_weight)
            self.estimator_ = self._refit_inner(
                module, init_state, problem, self.sample_weight_ * prior_weight, device,
                dtype, batch, rng)
        elif isinstance(self.final_estimator, str):  # "joint"
            self.estimator_ = _TorchModel(self.module_, kind, criterion, getattr(self, "classes_", None),
                                          y_mean, y_scale, dtype)
        else:
            self.estimator_ = clone(self.final_estimator).fit(
                X, y, **{weight_key: refit_weight}
            )
        return self

    @staticmethod
    def _stochastic(problem, theta, w, pos):
        """Whether ``problem``'s weighted loss is random at fixed parameters
        (dropout, noise layers): two evaluations at ``theta`` differ by more
        than the rounding of a nondeterministic reduction (CUDA's atomic adds)."""
        with torch.no_grad():
            a, b = (problem.weighted_loss(theta, w, pos) for _ in range(2))
            return not bool(torch.isclose(a, b, rtol=1e-5, atol=0.0, equal_nan=True))

    def _refit_inner(self, module, init_state, problem, weight, device, dtype, batch, rng):
        """Train the inner model from its initial state with the learned weights.

        All samples take part (the trusted ones at weight 1). When one batch
        holds all training samples the weighted problem is solved by L-BFGS
        (up to ``max(max_iter, 100)`` iterations), otherwise, or when the
        loss is random at fixed parameters (dropout), by ``n_iter_`` (at
        least one) steps of the inner optimizer (on mini-batches, or on all
        samples).
        """
        module.load_state_dict(init_state)
        theta0 = {k: p.detach().clone() for k, p in _trainable(module)}
        n = problem.X.shape[0]
        full = _WeightedProblem(
            module, problem.kind, problem.criterion, problem.X, problem.y,
            torch.as_tensor(weight, dtype=dtype, device=device),
            torch.arange(n, device=device), problem.trusted_idx, method="per_sample",
            weight_net=None, weight_label=False, alpha=self.alpha, normalize=True,
            n_classes=problem.n_classes,
        )
        ones = torch.ones(n, dtype=dtype, device=device)
        all_pos = torch.arange(n, device=device)
        full_batch = batch >= len(problem.train_idx)
        if full_batch and not self._stochastic(full, theta0, ones, all_pos):
            solver = LBFGS(max_iter=max(self.max_iter, 100), warn=False)
            theta, res = solver.solve(lambda t: full.weighted_loss(t, ones, all_pos), theta0)
            # The loss is a weighted mean (standardized targets): a gradient norm
            # of 1e-3 is a fit, short of the solver's own tolerance (1e-10 in
            # float64: an MLP on standardized data stopped at 2e-4). Beyond it
            # the model is not fitted (X * 1e16: training R^2 -4.7e27, silently;
            # raw wine: gradient norm 0.13, accuracy .93 against 1.0 standardized)
            if not (res.converged or res.grad_norm <= _REFIT_GRAD_NORM):
                warnings.warn(
                    f"Refitting the inner model with the learned weights stopped after "
                    f"{res.n_iter} L-BFGS iterations ({res.message}) with a gradient norm "
                    f"of {res.grad_norm:.3g} (above {_REFIT_GRAD_NORM:g}): the model may be "
                    "far from its fit. Scale X (e.g. with StandardScaler, in a Pipeline) "
                    "or raise max_iter (the refit takes max(max_iter, 100) iterations).",
                    ConvergenceWarning,
                    stacklevel=3,
                )
        else:
            # mini-batches, or a loss that is random at fixed parameters (dropout):
            # L-BFGS's line search needs a deterministic loss (a dropout network on
            # one full batch: it failed after 8 or 9 iterations and warned, mean
            # test accuracy .789 over 4 noisy-label sets against .797 by the
            # optimizer's steps)
            theta = {k: t.requires_grad_(True) for k, t in theta0.items()}
            opt = _make_inner_optimizer(self.optimizer, list(theta.values()), self.learning_rate)
            batches = _batches(n, min(batch, n), rng)
            for _ in range(max(self.n_iter_, 1)):
                pos = torch.as_tensor(next(batches), device=device)
                opt.zero_grad(set_to_none=True)
                loss = full.weighted_loss(theta, ones[: len(pos)], pos)
                prev = {k: t.detach().clone() for k, t in theta.items()}
                loss.backward()
                opt.step()
                if not (torch.isfinite(loss) and all(bool(torch.isfinite(t).all()) for t in theta.values())):
                    with torch.no_grad():
                        for k, t in theta.items():
                            t.copy_(prev[k])
                    warnings.warn(
                        "Refitting the inner model with the learned weights diverged "
                        f"(loss {float(loss):.3e}); kept its last finite parameters. "
                        "Lower learning_rate.",
                        ConvergenceWarning,
                        stacklevel=3,
                    )
                    break
        return _TorchModel(copy.deepcopy(load_parameters(module, theta)).cpu().eval(),
                           problem.kind, problem.criterion,
                           getattr(self, "classes_", None), self._y_mean, self._y_scale, dtype)

    # ------------------------------------------------------------------
    # prediction

    def _validate_X(self, X):
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def predict(self, X):
        """Predict with the refitted estimator ``estimator_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,)
        """
        X = self._validate_X(X)
        return self.estimator_.predict(X)

    def _has_weight_net(self):
        # fitted: whether a weighting network was learned, whatever set_params
        # changed since
        if hasattr(self, "weight_net_"):
            return self.weight_net_ is not None
        return self.method == "weight_net"

    @available_if(_has_weight_net)
    def weigh(self, X, y):
        """Weights that the learned weighting network gives to new samples.

        Each sample's loss under the jointly trained inner model (``module_``)
        goes through ``weight_net_``; only for ``method="weight_net"``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Their (possibly noisy) labels or targets.

        Returns
        -------
        weights : ndarray of shape (n_samples,)
            Values in (0, 1); higher means more trusted.
        """
        X = self._validate_X(X)
        y = np.asarray(y)
        if y.shape != (X.shape[0],):
            raise ValueError(f"y must have shape ({X.shape[0]},); got {y.shape}.")
        if self._is_classifier:
            unknown = np.setdiff1d(y, self.classes_)
            if unknown.size:
                raise ValueError(
                    f"Labels {unknown.tolist()} were not seen in fit (classes_ = "
                    f"{self.classes_.tolist()})."
                )
            y_t = torch.as_tensor(np.searchsorted(self.classes_, y))
        else:
            y = y.astype(np.float64)
            assert_all_finite(y, input_name="y")  # a NaN target gave a NaN weight
            y_t = torch.as_tensor((y - self._y_mean) / self._y_scale, dtype=self._torch_dtype)
        _check_in_range(X, self._torch_dtype)
        X_t = torch.as_tensor(X, dtype=self._torch_dtype)
        with torch.no_grad():
            out = self.module_(X_t)
            if self._is_classifier:
                out = _as_logits(out, len(self.classes_))
            loss = _per_sample_loss(self._kind, self._criterion, out, y_t)
            w = self.weight_net_(loss, y_t) if self.weight_net_.n_classes else self.weight_net_(loss)
        return to_numpy(w).astype(np.float64)


_COMMON_DOC = """
    Parameters
    ----------
    module : {"linear", "mlp"}, torch.nn.Module class or instance, or skorch NeuralNet, default="linear"
        The inner model. ``"linear"`` is a linear model (logistic regression
        for the classifier), ``"mlp"`` a ReLU network (one hidden layer of 100
        units; change it with ``module__hidden_layer_sizes=(64, 64)``). A
        module class is built with the ``module__*`` keywords (its
        ``n_features`` / ``in_features`` and ``n_outputs`` / ``out_features`` /
        ``n_classes`` arguments are filled from the data when not given); an
        instance is copied; its parameters with ``requires_grad=False`` are
        not trained. A skorch ``NeuralNet`` contributes its module
        (trained ``module_`` if initialized) and its criterion
        (``NLLLoss`` on probabilities or ``CrossEntropyLoss`` on logits for
        classification).
    method : {"weight_net", "per_sample"}, default="weight_net"
        ``"weight_net"``: a Meta-Weight-Net maps each sample's loss (and,
        with ``weight_net_label=True``, its label) to its weight; it has a
        fixed number of parameters whatever the data size, weighs new
        samples with :meth:`weigh`, and overfits a small trusted set less.
        ``"per_sample"``: one free weight per training sample,
        ``sigmoid(phi_i)`` (hyper-cleaning / Learning to Reweight); with
        many more samples than trusted ones it tends to fit the trusted set
        (see the benchmark).
    hypergradient : str or HypergradientStrategy, default="lookahead"
        How the weights' hypergradient is computed by
        :func:`skbilevel.hypergrad.argmin`. ``"lookahead"``: one gradient step
        of the model, as in L2RW / MW-Net. Step strategies (``"reverse"``,
        ``"truncated"``, ``"forward"``, ``"first_order"``, or an instance)
        unroll ``unroll_steps`` steps of gradient descent; implicit strategies
        (``"cg"``, ``"neumann"``, ...) solve each batch's weighted problem to
        a tolerance (use ``alpha > 0`` so that it has a unique minimum), as
        do the proxies (``"evograd"``, ``"best_response"``): a module with
        random layers (dropout) then raises a ``ValueError``.
    final_estimator : estimator, "joint" or None, default=None
        Model refitted on all samples with the learned weights (trusted
        samples at weight 1) as ``estimator_``. ``None`` retrains the inner
        model from its initialization (by L-BFGS when one batch holds all
        training samples and the module is deterministic; otherwise, as with
        dropout, by ``n_iter_`` steps of ``optimizer``); ``"joint"`` keeps
        the model trained alongside the weights; a scikit-learn estimator is
        cloned and fitted with ``sample_weight`` (a Pipeline passes it to its
        last step), so its ``fit`` must take it.
    max_iter : int, default=300
        Outer iterations; each processes one batch of training samples.
    batch_size : int or "auto", default="auto"
        Training samples per iteration (trusted batches have
        ``min(batch_size, n_trusted)`` samples). ``"auto"``: the whole
        training set up to 2048 samples, else 256.
    learning_rate : float, default=0.01
        Step size of the inner model's optimizer and of the look-ahead step.
    weight_learning_rate : float or "auto", default="auto"
        Adam step size on the weight logits (``"auto"``: 0.1) or on the
        weighting network (``"auto"``: 1e-3).
    optimizer : {"adam", "sgd"}, default="adam"
        Optimizer of the inner model (``"sgd"`` uses momentum 0.9).
    alpha : float, default=1e-4
        L2 penalty on the inner model's parameters.
    unroll_steps : int, default=5
        Gradient-descent steps unrolled by multi-step strategies.
    normalize_weights : bool, default=True
        Normalize the weights within each batch to sum to one (L2RW, MW-Net),
        which makes the weights scale-free. It needs batches of 2 samples or
        more (``batch_size=1`` is then a ``ValueError``).
    weight_net_hidden_size : int, default=100
        Hidden units of the weighting network.
    weight_net_label : bool, default=False
        Feed the one-hot label to the weighting network as well
        (class-dependent weighting, e.g. under class imbalance).
        Classification only: the regressor raises a ``ValueError``.
    validation_fraction : float, default=0.1
        Fraction held out as the trusted set when ``fit`` gets no
        ``trusted`` mask (stratified for classifiers).
    early_stopping : bool, default=False
        Track the loss of the current model on the whole trusted set after
        each iteration; stop after ``n_iter_no_change`` iterations without an
        improvement of ``tol`` (relative) and restore the best model and
        weights.
    n_iter_no_change : int, default=10
        Patience of early stopping.
    tol : float, default=1e-4
        Relative improvement that resets the patience.
    device : str or torch.device, default="cpu"
        ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"auto"``. Fitted
        modules are moved to the CPU, so a fitted estimator pickles and
        predicts anywhere.
    dtype : str or dtype, default="float32"
        Floating-point type of the computation: ``"float32"``, ``"float64"``
        or ``"bfloat16"`` (not with ``hypergradient="dense"``, which
        factorizes a matrix). ``"float16"`` is rejected: Adam's steps turn
        zero or tiny gradients into NaN in it.
    random_state : int, RandomState instance or None, default=None
        Seeds the model initialization, the validation split and the batches.
    verbose : int, default=0
        ``> 0`` shows a progress bar.
    callbacks : list of callable or None, default=None
        Called as ``cb(state)`` with a
        :class:`skbilevel.hypergrad.OuterState` after each iteration;
        returning ``True`` stops the fit.
    **kwargs
        ``module__<name>=value``: constructor arguments of the inner module.

    Attributes
    ----------
    sample_weight_ : ndarray of shape (n_samples,)
        Learned weight of each training sample of ``fit``, in (0, 1); trusted
        samples have weight 1. ``fit``'s own ``sample_weight`` is not
        included (it multiplies these in the refit).
    trusted_ : ndarray of shape (n_samples,), dtype=bool
        The trusted samples used (the mask, or the validation split).
    weight_net_ : WeightNet or None
        The learned weighting network (``method="weight_net"``), on the CPU.
    module_ : torch.nn.Module
        The inner model trained jointly with the weights, on the CPU.
    estimator_ : estimator
        The final model refitted with the learned weights; predictions come
        from it.
    n_iter_ : int
        Outer iterations completed with a finite loss. An iteration whose
        loss or hypergradient is not finite (``stop_reason_="diverged"``) is
        not counted, so ``n_iter_`` is 0 when the first one diverges.
    history_ : ndarray of shape (``n_iter_``,)
        Trusted-batch loss after the look-ahead (the outer loss) per
        iteration.
    hypergradient_info_ : dict
        Health record of the last hypergradient
        (:class:`skbilevel.hypergrad.HypergradientInfo`).
    stop_reason_ : str
        ``"max_iter"``, ``"callback"`` (including early stopping) or
        ``"diverged"``.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of shape (``n_features_in_``,)
        Defined when ``X`` has string feature names.
"""


def _final_has(name):
    """``available_if`` check: the (final) estimator has method ``name``."""

    def check(self):
        est = getattr(self, "estimator_", None)
        if est is None:
            est = self.final_estimator
            return est is None or isinstance(est, str) or hasattr(est, name)
        return hasattr(est, name)

    return check


class SampleReweighter(ClassifierMixin, _BaseSampleReweighter):
    __doc__ = (
        """Classifier that learns per-sample training weights from a trusted set.

    Learns a weight for every training sample (or a network producing the
    weights from each sample's loss) so that a model trained with those
    weights does well on a small set of trusted, clean samples (Ren et al.
    2018, "Learning to Reweight Examples for Robust Deep Learning"; Shu et
    al. 2019, "Meta-Weight-Net"). Mislabelled samples get weights near zero;
    the final model is refitted with the learned weights. The trusted set is
    passed to :meth:`fit` as a boolean mask ``trusted``, which scikit-learn's
    metadata routing forwards through pipelines (it is requested by default).
"""
        + _COMMON_DOC
        + """
    See Also
    --------
    SampleReweighterRegressor : The same for regression.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.datasets import make_classification
    >>> from skbilevel.reweighting import SampleReweighter
    >>> X, y = make_classification(n_samples=300, n_features=5, n_informative=3,
    ...                            n_redundant=0, n_clusters_per_class=1,
    ...                            class_sep=2.0, random_state=0)
    >>> rng = np.random.RandomState(0)
    >>> trusted = np.zeros(300, bool); trusted[:30] = True
    >>> flipped = ~trusted & (rng.rand(300) < 0.3)
    >>> y_noisy = np.where(flipped, 1 - y, y)
    >>> clf = SampleReweighter(max_iter=200, learning_rate=0.05, random_state=0)
    >>> clf = clf.fit(X, y_noisy, trusted=trusted)
    >>> w = clf.sample_weight_
    >>> bool(w[flipped].mean() < w[~flipped & ~trusted].mean())
    True
    >>> round(clf.score(X, y), 2)
    0.98
    """
    )

    _is_classifier = True

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y, trusted=None, sample_weight=None):
        """Learn the sample weights, then refit the final estimator with them.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, trusted samples included.
        y : array-like of shape (n_samples,)
            Labels (noisy outside the trusted set).
        trusted : array-like of bool, shape (n_samples,), default=None
            ``True`` for the trusted (clean) samples, which define the outer
            loss and are not reweighted; every class needs some (a
            ``UserWarning`` names those without). ``None``: hold out
            ``validation_fraction`` of the data, stratified by class.
            Routed as metadata (requested by default).
        sample_weight : array-like of shape (n_samples,), default=None
            Prior weights, multiplied with the learned ones.

        Returns
        -------
        self : object
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        return self._fit(X, y, trusted, sample_weight)

    def predict(self, X):
        """Predict class labels with ``estimator_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,)
        """
        return super().predict(X)

    @available_if(_final_has("predict_proba"))
    def predict_proba(self, X):
        """Class probabilities from ``estimator_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        X = self._validate_X(X)
        return self.estimator_.predict_proba(X)

    @available_if(_final_has("decision_function"))
    def decision_function(self, X):
        """Decision scores from ``estimator_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray of shape (n_samples,) or (n_samples, n_classes)
        """
        X = self._validate_X(X)
        return self.estimator_.decision_function(X)


class SampleReweighterRegressor(RegressorMixin, _BaseSampleReweighter):
    __doc__ = (
        """Regressor that learns per-sample training weights from a trusted set.

    The regression twin of :class:`SampleReweighter`: the inner loss is the
    squared error (targets are standardized internally), so samples with
    corrupted targets get weights near zero.
"""
        + _COMMON_DOC
        + """
    See Also
    --------
    SampleReweighter : The same for classification.

    Examples
    --------
    >>> import numpy as np
    >>> from skbilevel.reweighting import SampleReweighterRegressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(200, 3); y = X @ np.array([1.0, -2.0, 0.5])
    >>> bad = rng.rand(200) < 0.2
    >>> y_noisy = np.where(bad, y + 10 * rng.randn(200), y)
    >>> trusted = ~bad & (rng.rand(200) < 0.2)
    >>> reg = SampleReweighterRegressor(max_iter=200, learning_rate=0.05, random_state=0)
    >>> reg = reg.fit(X, y_noisy, trusted=trusted)
    >>> w = reg.sample_weight_
    >>> bool(w[bad].mean() < w[~bad & ~trusted].mean())
    True
    """
    )

    _is_classifier = False

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y, trusted=None, sample_weight=None):
        """Learn the sample weights, then refit the final estimator with them.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data, trusted samples included.
        y : array-like of shape (n_samples,)
            Targets (corrupted outside the trusted set).
        trusted : array-like of bool, shape (n_samples,), default=None
            ``True`` for the trusted samples; ``None`` holds out
            ``validation_fraction`` of the data. Routed as metadata.
        sample_weight : array-like of shape (n_samples,), default=None
            Prior weights, multiplied with the learned ones.

        Returns
        -------
        self : object
        """
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32], y_numeric=True)
        return self._fit(X, np.asarray(y, dtype=np.float64), trusted, sample_weight)
