"""Few-shot meta-learning estimators: MetaLearnerClassifier and MetaLearnerRegressor.

The estimators sample tasks (few-shot episodes) from the training data, hand
meta-batches of them to a meta-learning method of the solver core
(:mod:`skbilevel.hypergrad`, which holds all differentiation) and run the
outer loop with :func:`~skbilevel.hypergrad.minimize_outer`. A new task is
learned with :meth:`~MetaLearnerClassifier.adapt`, which returns an ordinary
fitted scikit-learn estimator.
"""

import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.frozen import FrozenEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..hypergrad import (
    FunctionalModel,
    MetaMethod,
    available_meta_methods,
    get_meta_method,
)
from ..hypergrad._checks import _did_you_mean
from ..utils import core_warnings_as_sklearn, resolve_device, resolve_dtype, to_numpy, to_tensor
from ..utils._fit import fit_outer, keep_state_on_error
from ..utils._stats import _softmax
from ..utils._torch import _resolve_adam_dtype, _seeded_global_rng
from ..utils._validation import check_callbacks, check_hidden_layer_sizes
from ..utils._modules import (
    MLP,
    build_module,
    check_forward,
    load_parameters,
    module_params,
)

__all__ = [
    "MetaLearnerClassifier",
    "MetaLearnerRegressor",
    "AdaptedClassifier",
    "AdaptedRegressor",
]

#: adaptation diverged when it makes the support loss this many times worse than
#: both the meta-initialization and the constant zero output
_DIVERGED = 1e4
#: meta-training failed when its last query losses average this many times those
#: of a guess (uniform over the classes, or 0 for regression)
_WORSE_THAN_GUESS = 10.0
#: default adaptation steps (inner_steps=None), and iMAML's (see _inner_steps)
_INNER_STEPS, _IMAML_INNER_STEPS = 5, 20

#: the default backbone: the sinusoid-regression MLP of the MAML paper
_BUILTIN = {"mlp": (MLP, {"hidden_layer_sizes": (40, 40)})}


def _unfreeze(estimator):
    return estimator.estimator if isinstance(estimator, FrozenEstimator) else estimator


class _MetaLearnerMixin:
    """Shared machinery of the two meta-learners (task sampling, outer loop, runtime)."""

    _common_constraints = {
        "module": "no_validation",
        "method": [StrOptions(set(available_meta_methods())), MetaMethod],
        "k_shot": [Interval(Integral, 1, None, closed="left")],
        "n_query": [Interval(Integral, 1, None, closed="left")],
        "inner_steps": [Interval(Integral, 0, None, closed="left"), None],
        "inner_lr": [Interval(Real, 0, None, closed="left")],
        "meta_batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "method_params": [dict, None],
        "device": "no_validation",
        "dtype": "no_validation",
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callbacks": [list, None],
    }

    def _store_module_kwargs(self, kwargs):
        # Validation happens in fit (scikit-learn's convention: __init__ never raises).
        # ``module__*`` keywords are attributes (skorch's convention). Any other
        # keyword is a parameter too, so that clone keeps it and every fit rejects
        # it: held only in a list that get_params did not return, a typo
        # (max_iters=2) was dropped by clone and cross_val_score ran every fold
        # without it. It is kept aside, not stored as an attribute as
        # SampleReweighter stores it: as an attribute it could pass for a fitted
        # attribute (n_iter_=3) or hide a method (fit=1).
        self._unknown_params = {k: v for k, v in kwargs.items()
                                if not k.startswith("module__")}
        for key, value in kwargs.items():
            if key.startswith("module__"):
                setattr(self, key, value)

    def _check_kwargs(self):
        unknown = sorted(getattr(self, "_unknown_params", {}))
        if unknown:
            hint = _did_you_mean(unknown, self._get_param_names())
            raise TypeError(
                f"{type(self).__name__} got unexpected keyword argument(s) "
                f"{unknown}{hint}; only module__* keywords are passed through to the "
                "module. Correct or remove them."
            )

    # skorch's convention: ``module__*`` keywords are parameters too, and so are
    # the unknown keywords given to __init__ (rejected in fit).
    def get_params(self, deep=True):
        params = super().get_params(deep=deep)
        params.update({f"module__{k}": v for k, v in module_params(self).items()})
        params.update(getattr(self, "_unknown_params", {}))
        return params

    def set_params(self, **params):
        # an unknown name that __init__ was not given goes to scikit-learn's
        # set_params, which rejects it at once
        unknown = dict(getattr(self, "_unknown_params", {}))
        for key in list(params):
            if key.startswith("module__"):
                setattr(self, key, params.pop(key))
            elif key in unknown:
                unknown[key] = params.pop(key)
        self._unknown_params = unknown
        return super().set_params(**params)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

    # -- building blocks ---------------------------------------------------
    def _inner_steps(self):
        """``inner_steps``, or its default: 5, and 20 for iMAML."""
        if self.inner_steps is not None:
            return self.inner_steps
        # iMAML's meta-gradient holds only at the solution of the proximal problem:
        # 20 steps bring theta - phi within (1 - inner_lr * lam)^20 of it (12% at
        # the classifier's inner_lr=0.1 and lam=1), 5 steps only within 59%.
        return _IMAML_INNER_STEPS if self.method == "imaml" else _INNER_STEPS

    def _method(self):
        spec = self.method
        if isinstance(spec, MetaMethod):
            return copy.deepcopy(spec)
        own = {"inner_steps": self._inner_steps(), "inner_lr": self.inner_lr}
        params = dict(self.method_params or {})
        # a key that the estimator passes itself reached the method twice: "TypeError:
        # get_meta_method() got multiple values for keyword argument 'inner_lr'"
        twice = sorted(set(own) & set(params))
        if twice:
            name = type(self).__name__
            example = ", ".join(f"{k}={params[k]!r}" for k in twice)
            raise ValueError(
                f"method_params sets {' and '.join(twice)}, which {name} passes to the "
                f"method itself: set {'it' if len(twice) == 1 else 'them'} on the "
                f"estimator, e.g. {name}({example}), "
                "not in method_params."
            )
        return get_meta_method(spec, **own, **params)

    def _build_module(self, n_features, n_outputs, is_r2d2):
        params = module_params(self)
        if (isinstance(self.module, str) or self.module is MLP) and (
            "hidden_layer_sizes" in params
        ):
            check_hidden_layer_sizes(
                params["hidden_layer_sizes"], "module__hidden_layer_sizes"
            )
        if is_r2d2:
            # R2D2: the backbone's output is the feature map of the ridge head: as
            # wide as the last hidden layer, or as X for a linear backbone ("linear",
            # or MLP left at its default of no hidden layer)
            linear = (isinstance(self.module, str) and self.module == "linear") or (
                self.module is MLP)
            default = () if linear else _BUILTIN["mlp"][1]["hidden_layer_sizes"]
            sizes = params.get("hidden_layer_sizes", default)
            n_outputs = int(sizes[-1]) if len(sizes) else int(n_features)
        return build_module(self.module, params, n_features, n_outputs, builtin=_BUILTIN)

    def _resolve_dtype(self, method):
        """The computing dtype; half precision only where it works."""
        r2d2 = "R2D2's ridge head solves a linear system"
        return _resolve_adam_dtype(self.dtype, r2d2 if method.name == "r2d2" else None)

    def _runtime(self):
        """FunctionalModel, method and meta-parameter tree on a usable device.

        Adaptation and prediction run on ``device`` when it exists here (else
        on the CPU); on the CPU they run in float64, so that a sample's
        prediction does not depend on the batch it comes in.
        """
        try:
            device = resolve_device(self.device)
        except ValueError:
            warnings.warn(
                f"device={self.device!r} is not available here; adapting and predicting "
                "on the CPU.",
                UserWarning,
            )
            device = torch.device("cpu")
        dtype = torch.float64 if device.type == "cpu" else resolve_dtype(self.dtype)
        module = copy.deepcopy(self.module_).to(device=device, dtype=dtype)
        module.eval()
        model = FunctionalModel(module, self._loss)
        # the fitted method and its settings, whatever set_params changes later
        fitted = getattr(self, "_fitted_method", None)
        method = self._method() if fitted is None else copy.deepcopy(fitted)
        meta = method.load_state_dict(
            model, {k: v.to(device=device, dtype=dtype) for k, v in self.meta_params_.items()})
        return model, method, meta, device, dtype

    # -- fitting -----------------------------------------------------------
    def _check_task_sizes(self, sizes, what):
        need = self.k_shot + self.n_query
        for name, n in sizes:
            name = name.item() if isinstance(name, np.generic) else name
            if n < need:
                raise ValueError(
                    f"{type(self).__name__} needs at least k_shot + n_query = "
                    f"{self.k_shot} + {self.n_query} = {need} samples per {what}; {what} "
                    f"{name!r} has {n} sample{'s' if n != 1 else ''}. "
                    "Lower k_shot or n_query, or give that "
                    f"{what} more samples."
                )

    def _seeds(self):
        """Seeds of the backbone initialization and of the task sampler."""
        rng = check_random_state(self.random_state)
        torch_seed = int(rng.randint(0, 2**31 - 1))
        return torch_seed, np.random.RandomState(rng.randint(0, 2**31 - 1))

    def _group_sampler(self, groups, n_samples, rng):
        """Sampler of the tasks given by ``groups`` (all samples are one task when
        ``None``), after checking that each has ``k_shot + n_query`` samples."""
        if groups is None:
            names, task_indices = ["all samples"], [np.arange(n_samples)]
        else:
            names, task_indices = _groups_indices(groups, n_samples)
        self._check_task_sizes(list(zip(names, map(len, task_indices))), "task")
        return _task_sampler(task_indices, self.k_shot, self.n_query, self.meta_batch_size, rng)

    def _fit_meta(self, X, y_t, sampler, n_outputs_head, n_outputs_task, torch_seed):
        """Build the backbone, run the outer loop, store the fitted state."""
        n_features = X.shape[1]
        device = resolve_device(self.device)
        method = self._method()
        dtype = self._resolve_dtype(method)
        is_r2d2 = method.name == "r2d2"
        fitted_method = copy.deepcopy(method)  # before the fit can touch it
        with _seeded_global_rng(torch_seed, device):
            module = self._build_module(n_features, n_outputs_head, is_r2d2)
            _reject_batch_norm(module)
            module_dev = copy.deepcopy(module).to(device=device, dtype=dtype)
            module_dev.train()
            X_t, y_dev = _task_tensors(X, y_t, device, dtype)
            self._check_module_shapes(module_dev, X_t,
                                      None if is_r2d2 else n_outputs_head)
            model = FunctionalModel(module_dev, self._loss)
            meta = method.init_meta(model)
            for leaf in _leaves(meta):
                leaf.requires_grad_(True)

            curvature = {"tasks": 0, "negative": 0, "min_rayleigh": math.inf}

            def objective(phi):
                batch = sampler(X_t, y_dev)
                loss, info = method.meta_loss(model, phi, batch,
                                              n_outputs=n_outputs_task)
                extra = info.extra
                if "cg_negative_curvature" in extra:  # iMAML
                    curvature["tasks"] += extra["n_tasks"]
                    curvature["negative"] += extra["cg_negative_curvature"]
                    if extra["cg_min_rayleigh"] < curvature["min_rayleigh"]:
                        curvature["min_rayleigh"] = extra["cg_min_rayleigh"]
                return loss, info

            fit_outer(self, objective, meta, early_stopping=False,
                      desc=f"{type(self).__name__}({method.name})")
        # module_ carries the meta-learned backbone weights (in the module's own dtype)
        self.module_ = load_parameters(module, meta["params"])
        self.meta_params_ = {k: v.detach().to("cpu").clone()
                             for k, v in method.state_dict(meta).items()}
        self._fitted_method = fitted_method
        if curvature["tasks"]:
            self._check_imaml_curvature(method, curvature)
        if not is_r2d2:
            self._check_query_loss(method, y_t, n_outputs_task)

    def _check_query_loss(self, method, y_t, n_outputs_task):
        """Warn when meta-training ends far worse than a guess: inner steps that
        overshoot keep the fit finite, and silent (raw digits at
        ``inner_lr=0.5``: query loss 2.2e4, new tasks at chance); so does a fit
        cut short on targets of a small scale."""
        if y_t.dtype == torch.long:
            reference = math.log(n_outputs_task)
            what = f"that of a uniform guess over {n_outputs_task} classes"
            scale = "Standardize X"
        else:
            reference = float(y_t.double().pow(2).mean())
            what = "that of predicting 0 (the mean square of y)"
            scale = "Standardize X and y"
        tail = self.history_[-max(1, len(self.history_) // 10):]
        if not (tail.size and reference > 0):
            return
        level = float(np.mean(tail))
        if level <= _WORSE_THAN_GUESS * reference:
            return
        warnings.warn(
            f"Meta-training did not learn to adapt: the query loss after adaptation "
            f"averaged {level:.3g} over the last {tail.size} meta-iteration(s), "
            f"{level / reference:.3g} times {what} ({reference:.3g}). {scale}; lower "
            f"inner_lr (now {method.inner_lr:g}) where the inner steps overshoot, or "
            f"raise max_iter (now {self.max_iter}) where meta-training is cut short.",
            ConvergenceWarning,
        )

    def _check_imaml_curvature(self, method, curvature):
        """Record how often iMAML's system was indefinite; warn when it mostly was.

        A few CG steps and an occasional indefinite ``I + H/lam`` are part of
        the method (the record has them); an indefinite system in most tasks
        means the proximal inner problem is not convex where the tasks adapt,
        so the implicit meta-gradient does not apply there.
        """
        tasks, negative = curvature["tasks"], curvature["negative"]
        lowest = curvature["min_rayleigh"]
        extra = self.hypergradient_info_.setdefault("extra", {})
        extra["fit_cg_negative_curvature"] = negative
        extra["fit_n_tasks"] = tasks
        if negative <= tasks / 2:
            return
        lam = float(method.lam)
        bound = lam * (lowest - 1.0)  # H has an eigenvalue at most this
        warnings.warn(
            f"iMAML's system I + H/lam (lam={lam:g}) was not positive definite in "
            f"{negative} of {tasks} tasks ({100 * negative / tasks:.0f}%) over the "
            "fit: "
            f"the support loss has curvature down to {bound:.3g} or below, so the "
            "proximal inner problem is not convex where the tasks adapt and those "
            "tasks fell back to a truncated (first-order at worst) meta-gradient. "
            f"Raise method_params['lam'] above {-bound:.3g} (keeping inner_lr * lam "
            "< 1), or use method='maml'.",
            ConvergenceWarning,
        )

    def _check_module_shapes(self, module, X_t, n_outputs):
        """One forward pass on two rows of ``X``: the backbone must take
        ``n_features_in_`` inputs and give ``n_outputs`` outputs (any number when
        ``None``, as R2D2's feature map)."""
        out = check_forward(module, X_t)
        width = out.shape[1] if out.dim() == 2 else (1 if out.dim() == 1 else None)
        if n_outputs is None or width == n_outputs or (
            width is not None and self._loss == "cross_entropy" and width > n_outputs
        ):
            return
        need = ("one logit per class of a task: at least n_way_ = "
                if self._loss == "cross_entropy" else "one output per target: ")
        found = (f"{width} outputs" if width is not None
                 else f"outputs of shape {tuple(out.shape)}")
        raise ValueError(
            f"The module gives {found} on two rows of X but {type(self).__name__} "
            f"needs {need}{n_outputs}. Give a module whose output width is "
            f"{n_outputs}, or a module class or name, which is built with the data's "
            "sizes."
        )

    def _adapt_state(self, X, y_t, n_outputs, inner_steps=None):
        """Task state (CPU tensors) of the meta-learner adapted on ``(X, y)``."""
        model, method, meta, device, dtype = self._runtime()
        X_t, y_dev = _task_tensors(X, y_t, device, dtype)
        with core_warnings_as_sklearn():
            task = method.adapt(model, meta, X_t, y_dev, n_outputs=n_outputs, steps=inner_steps)
            with torch.no_grad():
                out = method.predict(model, meta, task, X_t, n_outputs=n_outputs)
                loss = float(model.loss_from_outputs(out, y_dev))
                # What adaptation must not be much worse than: the meta-initialization
                # and the constant zero output (the targets' mean square, or log C).
                start = method.adapt(model, meta, X_t, y_dev, n_outputs=n_outputs,
                                     steps=0)
                start_out = method.predict(model, meta, start, X_t, n_outputs=n_outputs)
                start_loss = float(model.loss_from_outputs(start_out, y_dev))
                zero_loss = float(model.loss_from_outputs(torch.zeros_like(out), y_dev))
        state = {k: v.detach().to("cpu") for k, v in _flat_task(task).items()}
        # Finite parameters can still overflow the outputs (weights of 1e244 do), or
        # give finite garbage (outputs of 1e19 for targets of 1e3).
        if not (all(bool(torch.isfinite(v).all()) for v in state.values())
                and bool(torch.isfinite(out).all()) and math.isfinite(loss)
                and loss <= _DIVERGED * max(start_loss, zero_loss, 1e-12)):
            steps = method.inner_steps if inner_steps is None else inner_steps
            hint = "Lower inner_lr or standardize X."
            if y_t.dtype != torch.long:
                hint = (
                    "Lower inner_lr or standardize X and y (the targets here reach "
                    f"|y| = {float(y_t.abs().max()):.3g}; the losses and gradients "
                    "grow with their square, so standardize them, e.g. with "
                    "sklearn.compose.TransformedTargetRegressor and a StandardScaler)."
                )
            raise ValueError(
                f"Adaptation on {X.shape[0]} samples diverged: after {steps} steps "
                f"with inner_lr={method.inner_lr} the adapted model's loss on them is "
                f"{loss:.3g} (at the meta-initialization: {start_loss:.3g}); its "
                f"parameters or outputs overflowed or exploded. {hint}"
            )
        return state

    def _outputs(self, X, task_state, n_outputs):
        model, method, meta, device, dtype = self._runtime()
        task = _unflat_task({k: v.to(device=device, dtype=dtype) for k, v in task_state.items()})
        X_t = to_tensor(X, device=device, dtype=dtype)
        with torch.no_grad():
            out = method.predict(model, meta, task, X_t, n_outputs=n_outputs)
        if not bool(torch.isfinite(out).all()):
            # the adapted parameters were finite when adapt checked them: say which
            # of them and X is out of scale
            bad = ~torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
            x_max = float(np.abs(np.asarray(X)[to_numpy(bad)]).max())
            w_max = max((float(v.abs().max()) for v in task_state.values() if v.numel()),
                        default=0.0)
            raise ValueError(
                f"The adapted model's outputs on {int(bad.sum())} of {X.shape[0]} "
                f"samples are not finite (they overflow): those samples reach |x| = "
                f"{x_max:.3g}, and the adapted parameters |w| = {w_max:.3g}. Scale X "
                "as in fit (standardize it, and y for regression), or lower inner_lr "
                "and refit if the parameters are the large ones."
            )
        return to_numpy(out).astype(np.float64)


def _reject_batch_norm(module):
    """Batch-norm layers normalize with the statistics of the batch they see:
    each task is adapted on its own small support set and predictions would
    depend on the batch a sample comes in (and fail for a single sample)."""
    found = [f"{name or 'the module'}: {type(m).__name__}"
             for name, m in module.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if found:
        raise ValueError(
            f"The module has batch-norm layers ({', '.join(found)}), which "
            "meta-learning cannot use: tasks are adapted one by one on small support "
            "sets, and batch statistics would make a prediction depend on the other "
            "samples of its batch (a single sample could not be predicted at all). Use "
            "torch.nn.LayerNorm or torch.nn.GroupNorm instead, which normalize each "
            "sample on its own."
        )


def _task_tensors(X, y_t, device, dtype):
    """``X`` and the targets on ``device``: labels stay integer, targets take ``dtype``."""
    X_t = to_tensor(X, device=device, dtype=dtype)
    if y_t.dtype == torch.long:
        return X_t, y_t.to(device)
    return X_t, y_t.to(device=device, dtype=dtype)


def _leaves(tree):
    if isinstance(tree, dict):
        out = []
        for v in tree.values():
            out.extend(_leaves(v))
        return out
    return [tree]


def _flat_task(task):
    out = {}
    for k, v in task.items():
        if isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _unflat_task(flat):
    out = {}
    for k, v in flat.items():
        group, sep, rest = k.partition("/")
        if sep:
            out.setdefault(group, {})[rest] = v
        else:
            out[k] = v
    return out


def _episode_sampler(class_indices, n_way, k_shot, n_query, batch_size, rng):
    """N-way K-shot episodes; labels 0..n_way-1 in a random class order per episode."""
    n_classes = len(class_indices)

    def sample(X_t, y_t):
        sup = np.empty((batch_size, n_way * k_shot), dtype=np.int64)
        qry = np.empty((batch_size, n_way * n_query), dtype=np.int64)
        for b in range(batch_size):
            chosen = rng.choice(n_classes, n_way, replace=False)
            for j, c in enumerate(chosen):
                idx = rng.choice(class_indices[c], k_shot + n_query, replace=False)
                sup[b, j * k_shot:(j + 1) * k_shot] = idx[:k_shot]
                qry[b, j * n_query:(j + 1) * n_query] = idx[k_shot:]
        labels_s = np.repeat(np.arange(n_way), k_shot)
        labels_q = np.repeat(np.arange(n_way), n_query)
        dev = X_t.device
        ys = torch.as_tensor(labels_s, device=dev).expand(batch_size, -1)
        yq = torch.as_tensor(labels_q, device=dev).expand(batch_size, -1)
        return (X_t[torch.as_tensor(sup, device=dev)], ys,
                X_t[torch.as_tensor(qry, device=dev)], yq)

    return sample


def _task_sampler(task_indices, k_shot, n_query, batch_size, rng):
    """Tasks drawn uniformly (with replacement across the batch); k_shot + n_query samples each."""
    n_tasks = len(task_indices)

    def sample(X_t, y_t):
        sup = np.empty((batch_size, k_shot), dtype=np.int64)
        qry = np.empty((batch_size, n_query), dtype=np.int64)
        for b in range(batch_size):
            idx = rng.choice(task_indices[rng.randint(n_tasks)], k_shot + n_query, replace=False)
            sup[b], qry[b] = idx[:k_shot], idx[k_shot:]
        dev = X_t.device
        sup_t, qry_t = torch.as_tensor(sup, device=dev), torch.as_tensor(qry, device=dev)
        return X_t[sup_t], y_t[sup_t], X_t[qry_t], y_t[qry_t]

    return sample


def _isnan(groups):
    """Which entries of ``groups`` are NaN (float arrays, and floats of object arrays)."""
    if groups.dtype.kind in "fc":
        return np.isnan(groups)
    if groups.dtype == object:
        return [isinstance(g, Real) and g != g for g in groups]
    return []


def _id_kind(value):
    """What a task id is, for the message on mixed ``groups``."""
    if isinstance(value, str):
        return "str"
    if isinstance(value, Integral):
        return "int"
    if isinstance(value, Real):
        return "float"
    return type(value).__name__


def _groups_indices(groups, n_samples):
    """Names of the tasks in ``groups`` and the sample indices of each."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or groups.shape[0] != n_samples:
        raise ValueError(
            f"groups must be a 1-D array with one task id per sample: expected shape "
            f"({n_samples},), got {groups.shape}."
        )
    # np.unique sorts the ids: None among integers raised "'<' not supported
    # between instances of 'int' and 'NoneType'", a string numpy's UFuncTypeError;
    # NaN ids became a task named nan (one per NaN in an object array)
    for what, missing in (
        ("None", [g is None for g in groups] if groups.dtype == object else []),
        ("NaN", _isnan(groups)),
    ):
        missing = np.flatnonzero(missing)
        if missing.size:
            raise ValueError(
                f"groups has no task id ({what}) for {missing.size} sample(s), the "
                f"first at index {missing[0]}; give every sample the id of its task, "
                "or leave those samples out."
            )
    try:
        names, inverse = np.unique(groups, return_inverse=True)
    except TypeError as exc:
        first = {}
        for i, g in enumerate(groups):
            first.setdefault(_id_kind(g), (i, g))
        shown = ", ".join(f"sample {i}: {g!r}" for i, g in sorted(first.values()))
        got = (f"a mix of {' and '.join(sorted(first))}" if len(first) > 1
               else f"ids of type {next(iter(first))}, which cannot be compared")
        raise ValueError(
            "groups must be task ids of one kind, all strings or all numbers, that "
            f"can be sorted; got {got} ({shown}). Convert them to one type, e.g. "
            "groups.astype(str)."
        ) from exc
    return names, [np.flatnonzero(inverse == i) for i in range(len(names))]


_DOC_COMMON = """
    module : str, torch.nn.Module subclass or instance, default="mlp"
        The backbone. ``"mlp"`` is :class:`skbilevel.utils._modules.MLP` with
        two hidden layers of 40 ReLU units (the sinusoid network of the MAML
        paper); ``"linear"`` a linear model; a module class is built with the
        ``module__*`` keyword parameters (constructor arguments named
        ``n_features`` / ``n_outputs`` and alike are filled from the data); an
        instance is deep-copied and used as the starting point (its
        parameters with ``requires_grad=False`` are neither meta-learned nor
        adapted), and must take
        ``n_features_in_`` inputs and give one output per target (regression)
        or at least ``n_way`` logits (classification). For
        ``method="r2d2"`` the backbone's output is the feature map of the
        ridge head (the built-in MLP then outputs as many features as its
        last hidden layer has units, ``"linear"`` as many as ``X`` has,
        another module class 40 when it takes ``n_outputs``). Batch-norm
        layers are rejected: tasks are adapted on small support sets one by
        one, and batch statistics would make a prediction depend on the other
        samples of its batch; use ``torch.nn.LayerNorm`` or
        ``torch.nn.GroupNorm``.
    method : {"maml", "fomaml", "reptile", "anil", "metasgd", "imaml", "r2d2"} \
or MetaMethod, default="maml"
        How the meta-parameters are learned; see
        :mod:`skbilevel.hypergrad` (``MAML``, ``FOMAML``, ``Reptile``,
        ``ANIL``, ``MetaSGD``, ``IMAML``, ``R2D2``). An instance is used with
        its own settings (``inner_steps``, ``inner_lr`` and ``method_params``
        are then ignored).
    inner_steps : int, default=None
        Gradient steps of the task adaptation (unused by ``"r2d2"``). ``None``
        uses 5, and 20 for ``"imaml"``, whose implicit meta-gradient is exact
        only at the solution of its proximal inner problem: at the default
        ``lam=1`` the steps then bring ``theta - phi`` within
        ``(1 - inner_lr)^20`` of it (12% at the classifier's ``inner_lr``).
    meta_batch_size : int, default=16
        Tasks per meta-iteration, processed together with ``torch.func.vmap``.
    max_iter : int, default=1000
        Meta-iterations (outer Adam steps).
    learning_rate : float, default=1e-3
        Step size of the outer Adam optimizer.
    method_params : dict, optional
        Extra arguments of the method: ``{"lam": 1.0, "cg_maxiter": 5,
        "cg_tol": 1e-3}`` for ``"imaml"``, ``{"alpha": 1.0, "scale": 1.0}``
        (initial ridge penalty and logit scale) for ``"r2d2"``.
        ``inner_steps`` and ``inner_lr`` are parameters of the estimator, not
        keys here.
    device : str or torch.device, default="cpu"
        Where meta-training runs (``"cuda"``, ``"auto"``, ...). Fitted state is
        kept on the CPU, so a fitted model pickles and predicts anywhere.
    dtype : {"float32", "float64", "bfloat16"}, default="float32"
        Floating-point type of meta-training. ``"bfloat16"`` is not available
        with ``method="r2d2"``, whose ridge head solves a linear system (torch
        does that only in float32 and float64); ``"float16"`` is rejected, as
        the outer Adam steps turn zero or tiny gradients into NaN in it.
    random_state : int, RandomState instance or None, default=None
        Seeds the backbone initialization and the task sampling.
    verbose : int, default=0
        ``> 0`` shows a progress bar.
    callbacks : list of callable, optional
        Called as ``cb(state)`` after each meta-iteration with a
        :class:`~skbilevel.hypergrad.OuterState`; returning ``True`` stops.
    **kwargs
        ``module__*`` parameters for the backbone's constructor, e.g.
        ``module__hidden_layer_sizes=(64, 64)``.
"""

_DOC_FITTED = """
    meta_params_ : dict of str to torch.Tensor
        Meta-learned parameters on the CPU: the backbone's state dict plus
        the method's own entries (``lr.<name>`` step sizes for Meta-SGD,
        ``log_alpha`` / ``log_scale`` for R2D2).
    module_ : torch.nn.Module
        The backbone on the CPU, holding the meta-learned weights (the
        meta-initialization, before any adaptation).
    history_ : ndarray of shape (``n_iter_``,)
        Mean query loss after adaptation of each meta-batch (noisy: each
        iteration draws new tasks).
    n_iter_ : int
        Meta-iterations performed.
    hypergradient_info_ : dict
        Health record of the last meta-gradient (for iMAML: the conjugate
        gradient's iterations and residual).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when ``X`` has string feature names.
"""


class MetaLearnerClassifier(_MetaLearnerMixin, ClassifierMixin, BaseEstimator):
    __doc__ = """Few-shot classifier meta-learned over many tasks (MAML and kin).

    ``fit`` meta-learns how to learn a classification task from a few
    labelled examples; :meth:`adapt` then learns a new task from its support
    set and returns an ordinary fitted classifier.

    Tasks come from ``fit(X, y, groups=None)``:

    - without ``groups``, N-way K-shot *episodes* are sampled from the
      classes of ``y``: ``n_way`` classes, ``k_shot`` support and ``n_query``
      query samples per class, labels relabelled ``0..n_way-1`` in random
      order. The meta-learned model then adapts to *new* classes, so
      :meth:`adapt` accepts any labels (at most ``n_way`` of them, any
      number for ``"r2d2"``);
    - with ``groups``, every group is a task sharing the global label set
      ``classes_``; ``k_shot`` and ``n_query`` are samples *per task*.

    ``predict`` / ``predict_proba`` on the meta-learner itself use the
    meta-learned model adapted (``inner_steps`` steps, or the ridge head for
    ``"r2d2"``) on the whole training set given to ``fit``, i.e. they equal
    ``adapt(X, y)`` on the training data, which keeps the scikit-learn
    contract. With episodes this requires that the training set has at most
    ``n_way`` classes (``n_way=None``, the default, uses all classes), except
    for ``"r2d2"`` whose head takes any number of classes.

    Parameters
    ----------
    n_way : int, default=None
        Classes per episode (and outputs of the backbone); ``None`` uses all
        classes of ``y``. Ignored with ``groups``.
    k_shot : int, default=5
        Support samples per class of an episode (per task with ``groups``).
    n_query : int, default=5
        Query samples per class of an episode (per task with ``groups``).
    inner_lr : float, default=0.1
        Step size of the task adaptation (Meta-SGD: initial value).
""" + _DOC_COMMON + """
    Attributes
    ----------
    classes_ : ndarray
        Labels seen in ``fit``.
""" + _DOC_FITTED + """
    See Also
    --------
    MetaLearnerRegressor : the regression twin.
    AdaptedClassifier : what :meth:`adapt` returns.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skbilevel.meta import MetaLearnerClassifier
    >>> X, y = load_digits(return_X_y=True)
    >>> X = X / 16.0
    >>> train, test = y < 6, y >= 6
    >>> meta = MetaLearnerClassifier(n_way=4, k_shot=5, n_query=5, inner_lr=0.5,
    ...                              max_iter=50, random_state=0)
    >>> meta = meta.fit(X[train], y[train])
    >>> task = meta.adapt(X[test][:40], y[test][:40])  # four new classes
    >>> task.classes_
    array([6, 7, 8, 9])
    >>> bool(task.score(X[test][40:], y[test][40:]) > 0.5)
    True
    """

    _parameter_constraints = {
        **_MetaLearnerMixin._common_constraints,
        "n_way": [Interval(Integral, 2, None, closed="left"), None],
    }
    _loss = "cross_entropy"

    def __init__(
        self,
        module="mlp",
        *,
        method="maml",
        n_way=None,
        k_shot=5,
        n_query=5,
        inner_steps=None,
        inner_lr=0.1,
        meta_batch_size=16,
        max_iter=1000,
        learning_rate=1e-3,
        method_params=None,
        device="cpu",
        dtype="float32",
        random_state=None,
        verbose=0,
        callbacks=None,
        **kwargs,
    ):
        self.module = module
        self.method = method
        self.n_way = n_way
        self.k_shot = k_shot
        self.n_query = n_query
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.meta_batch_size = meta_batch_size
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.method_params = method_params
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.callbacks = callbacks
        self._store_module_kwargs(kwargs)

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y, groups=None):
        """Meta-learn from tasks drawn from ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        groups : array-like of shape (n_samples,), optional
            Task id of every sample. Without it, N-way K-shot episodes are
            sampled from the classes of ``y``.

        Returns
        -------
        self : MetaLearnerClassifier
        """
        self._check_kwargs()
        check_callbacks(self.callbacks)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        n_classes = len(self.classes_)
        if n_classes < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes in y; got 1 class "
                f"({self.classes_.tolist()})."
            )
        torch_seed, sampler_rng = self._seeds()
        self._episodic = groups is None
        if self._episodic:
            n_way = n_classes if self.n_way is None else self.n_way
            if n_way > n_classes:
                raise ValueError(
                    f"n_way={n_way} but y has only {n_classes} classes; lower n_way to at "
                    f"most {n_classes}."
                )
            class_indices = [np.flatnonzero(y_enc == c) for c in range(n_classes)]
            self._check_task_sizes(
                [(c, len(idx)) for c, idx in zip(self.classes_, class_indices)], "class")
            sampler = _episode_sampler(class_indices, n_way, self.k_shot, self.n_query,
                                       self.meta_batch_size, sampler_rng)
            self.n_way_ = n_way
            n_task_outputs = n_way
        else:
            sampler = self._group_sampler(groups, X.shape[0], sampler_rng)
            self.n_way_ = n_classes
            n_task_outputs = n_classes
        y_t = torch.as_tensor(y_enc, dtype=torch.long)
        self._fit_meta(X, y_t, sampler, self.n_way_, n_task_outputs, torch_seed)
        # What predict uses: the meta-learned model adapted on the training set.
        self._fit_state = None
        if n_classes <= self.n_way_ or self._fitted_method.name == "r2d2":
            self._fit_state = self._adapt_state(X, y_t, n_classes)
        return self

    def _check_predictable(self):
        check_is_fitted(self)
        if self._fit_state is None:
            raise ValueError(
                f"This {type(self).__name__} was meta-trained for {self.n_way_}-way tasks "
                f"but its training set has {len(self.classes_)} classes, so it cannot "
                "predict all of them. Use adapt(X_support, y_support) with at most "
                f"{self.n_way_} classes, or fit with n_way=None."
            )

    def _logits(self, X):
        """Logits of the meta-learned model adapted on the training set."""
        self._check_predictable()
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return self._outputs(X, self._fit_state, len(self.classes_))

    def predict_proba(self, X):
        """Class probabilities of the model adapted on the training set.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return _softmax(self._logits(X))

    def predict(self, X):
        """Labels predicted by the meta-learned model adapted on the training set.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]

    def adapt(self, X_support, y_support, *, inner_steps=None):
        """Learn a new task from its support set; the meta-learner is unchanged.

        Parameters
        ----------
        X_support : array-like of shape (n_support, n_features)
        y_support : array-like of shape (n_support,)
            With episodes: any labels, at most ``n_way`` distinct (any number
            with ``method="r2d2"``). With ``groups``: labels from ``classes_``.
        inner_steps : int, optional
            Adaptation steps (default: the meta-learner's ``inner_steps``).

        Returns
        -------
        AdaptedClassifier
            A fitted classifier for the task.
        """
        check_is_fitted(self)
        return AdaptedClassifier(FrozenEstimator(self), inner_steps=inner_steps).fit(
            X_support, y_support)


class MetaLearnerRegressor(_MetaLearnerMixin, RegressorMixin, BaseEstimator):
    __doc__ = """Few-shot regressor meta-learned over many tasks (MAML and kin).

    ``fit(X, y, groups=task_ids)`` meta-learns from tasks (one per group):
    every meta-iteration draws ``meta_batch_size`` tasks and, from each,
    ``k_shot`` support and ``n_query`` query samples. Without ``groups`` the
    whole training set is one task. :meth:`adapt` learns a new task from
    ``k_shot``-sized (or any) support sets and returns an ordinary fitted
    regressor.

    ``predict`` on the meta-learner itself uses the meta-learned model
    adapted (``inner_steps`` steps, or the ridge head for ``"r2d2"``) on the
    whole training set given to ``fit``; it equals ``adapt(X, y).predict``.

    Targets are used as given, and the inner steps' size scales with their
    square: standardize ``y`` when its scale is far from 1 (for instance with
    :class:`~sklearn.compose.TransformedTargetRegressor` and a
    :class:`~sklearn.preprocessing.StandardScaler`). An adaptation that
    diverges (non-finite outputs, or a loss exploding far beyond that of the
    meta-initialization) raises a ``ValueError`` from ``fit`` and
    :meth:`adapt` rather than giving infinite predictions.

    Parameters
    ----------
    k_shot : int, default=10
        Support samples per task.
    n_query : int, default=10
        Query samples per task.
    inner_lr : float, default=0.01
        Step size of the task adaptation (Meta-SGD: initial value).
""" + _DOC_COMMON + """
    Attributes
    ----------""" + _DOC_FITTED + """
    See Also
    --------
    MetaLearnerClassifier : the classification twin.
    AdaptedRegressor : what :meth:`adapt` returns.

    Examples
    --------
    Sinusoids ``A sin(x - phase)``, one task per (amplitude, phase):

    >>> import numpy as np
    >>> from skbilevel.meta import MetaLearnerRegressor
    >>> rng = np.random.RandomState(0)
    >>> amp, phase = rng.uniform(0.1, 5, 200), rng.uniform(0, np.pi, 200)
    >>> X = rng.uniform(-5, 5, (200, 20, 1))
    >>> y = amp[:, None] * np.sin(X[..., 0] - phase[:, None])
    >>> groups = np.repeat(np.arange(200), 20)
    >>> meta = MetaLearnerRegressor(method="r2d2", k_shot=10, max_iter=100, random_state=0)
    >>> meta = meta.fit(X.reshape(-1, 1), y.ravel(), groups=groups)
    >>> x_new = rng.uniform(-5, 5, (10, 1))
    >>> task = meta.adapt(x_new, 2.0 * np.sin(x_new[:, 0] - 1.0))
    >>> task.predict(np.array([[0.5]])).shape
    (1,)
    """

    _parameter_constraints = dict(_MetaLearnerMixin._common_constraints)
    _loss = "mse"

    def __init__(
        self,
        module="mlp",
        *,
        method="maml",
        k_shot=10,
        n_query=10,
        inner_steps=None,
        inner_lr=0.01,
        meta_batch_size=16,
        max_iter=1000,
        learning_rate=1e-3,
        method_params=None,
        device="cpu",
        dtype="float32",
        random_state=None,
        verbose=0,
        callbacks=None,
        **kwargs,
    ):
        self.module = module
        self.method = method
        self.k_shot = k_shot
        self.n_query = n_query
        self.inner_steps = inner_steps
        self.inner_lr = inner_lr
        self.meta_batch_size = meta_batch_size
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.method_params = method_params
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.callbacks = callbacks
        self._store_module_kwargs(kwargs)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y, groups=None):
        """Meta-learn from the tasks in ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        groups : array-like of shape (n_samples,), optional
            Task id of every sample; without it, all samples form one task.

        Returns
        -------
        self : MetaLearnerRegressor
        """
        self._check_kwargs()
        check_callbacks(self.callbacks)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=[np.float64, np.float32])
        self._y_1d = y.ndim == 1
        y2 = y.reshape(len(y), -1).astype(np.float64)
        torch_seed, sampler_rng = self._seeds()
        sampler = self._group_sampler(groups, X.shape[0], sampler_rng)
        self.n_outputs_ = y2.shape[1]
        y_t = torch.as_tensor(y2)
        self._fit_meta(X, y_t, sampler, self.n_outputs_, None, torch_seed)
        self._fit_state = self._adapt_state(X, y_t, None)
        return self

    def predict(self, X):
        """Predictions of the meta-learned model adapted on the training set.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        out = self._outputs(X, self._fit_state, None)
        return out[:, 0] if self._y_1d else out

    def adapt(self, X_support, y_support, *, inner_steps=None):
        """Learn a new task from its support set; the meta-learner is unchanged.

        Parameters
        ----------
        X_support : array-like of shape (n_support, n_features)
        y_support : array-like of shape (n_support,) or (n_support, n_outputs)
        inner_steps : int, optional
            Adaptation steps (default: the meta-learner's ``inner_steps``).

        Returns
        -------
        AdaptedRegressor
            A fitted regressor for the task.
        """
        check_is_fitted(self)
        return AdaptedRegressor(FrozenEstimator(self), inner_steps=inner_steps).fit(
            X_support, y_support)


class _AdaptedMixin:
    _parameter_constraints = {
        "meta_learner": "no_validation",
        "inner_steps": [Interval(Integral, 0, None, closed="left"), None],
    }

    def _meta(self, kind):
        meta = _unfreeze(self.meta_learner)
        if not isinstance(meta, kind):
            raise ValueError(
                f"meta_learner must be a fitted {kind.__name__} (optionally wrapped in "
                f"FrozenEstimator); got {type(meta).__name__}."
            )
        check_is_fitted(meta)
        return meta

    @staticmethod
    def _check_support_features(meta, X):
        if X.shape[1] != meta.n_features_in_:
            raise ValueError(
                f"X_support has {X.shape[1]} features but the meta-learner was fitted "
                f"with {meta.n_features_in_}."
            )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class AdaptedClassifier(_AdaptedMixin, ClassifierMixin, BaseEstimator):
    """A task-specific classifier: a fitted meta-learner adapted on a support set.

    ``fit(X_support, y_support)`` runs the meta-learner's adaptation (its
    inner steps, or the R2D2 ridge head) from the meta-learned parameters;
    the meta-learner is not modified. Usually obtained from
    :meth:`MetaLearnerClassifier.adapt`; since ``meta_learner`` is held in a
    :class:`~sklearn.frozen.FrozenEstimator`, ``clone`` keeps it fitted and
    the adapted classifier can be cross-validated like any other.

    Parameters
    ----------
    meta_learner : MetaLearnerClassifier or FrozenEstimator
        A fitted meta-learner.
    inner_steps : int, optional
        Adaptation steps (default: the meta-learner's ``inner_steps``).

    Attributes
    ----------
    classes_ : ndarray
        The support set's labels (episodic meta-learner) or the
        meta-learner's ``classes_`` (meta-learner fitted with ``groups``).
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.frozen import FrozenEstimator
    >>> from skbilevel.meta import AdaptedClassifier, MetaLearnerClassifier
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(60, 2); y = (X[:, 0] > 0).astype(int)
    >>> meta = MetaLearnerClassifier(k_shot=2, n_query=2, max_iter=3, random_state=0).fit(X, y)
    >>> clf = AdaptedClassifier(FrozenEstimator(meta)).fit(X[:6], ["a", "b"] * 3)
    >>> clf.classes_
    array(['a', 'b'], dtype='<U1')
    """

    def __init__(self, meta_learner, *, inner_steps=None):
        self.meta_learner = meta_learner
        self.inner_steps = inner_steps

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y):
        """Adapt the meta-learner on the support set ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_support, n_features)
        y : array-like of shape (n_support,)

        Returns
        -------
        self : AdaptedClassifier
        """
        meta = self._meta(MetaLearnerClassifier)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        self._check_support_features(meta, X)
        check_classification_targets(y)
        if meta._episodic:
            self.classes_, y_enc = np.unique(y, return_inverse=True)
            # R2D2's ridge head takes any number of classes (as fit's predict does)
            if len(self.classes_) > meta.n_way_ and meta._fitted_method.name != "r2d2":
                raise ValueError(
                    f"The support set has {len(self.classes_)} classes but the "
                    f"meta-learner was trained on {meta.n_way_}-way tasks; pass at most "
                    f"{meta.n_way_} classes."
                )
        else:
            missing = np.setdiff1d(np.unique(y), meta.classes_)
            if missing.size:
                raise ValueError(
                    f"Support labels {missing.tolist()} are not among the classes the "
                    f"meta-learner was trained on ({meta.classes_.tolist()}); a "
                    "meta-learner fitted with groups adapts to tasks over those classes."
                )
            self.classes_ = meta.classes_
            y_enc = np.searchsorted(meta.classes_, y)
        self._n_outputs = len(self.classes_)
        self._state = meta._adapt_state(X, torch.as_tensor(y_enc, dtype=torch.long),
                                        self._n_outputs, self.inner_steps)
        return self

    def _logits(self, X):
        check_is_fitted(self)
        meta = _unfreeze(self.meta_learner)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        return meta._outputs(X, self._state, self._n_outputs)

    def predict_proba(self, X):
        """Class probabilities of the adapted model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        return _softmax(self._logits(X))

    def predict(self, X):
        """Labels predicted by the adapted model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,)
        """
        logits = self._logits(X)
        return self.classes_[np.argmax(logits, axis=1)]


class AdaptedRegressor(_AdaptedMixin, RegressorMixin, BaseEstimator):
    """A task-specific regressor: a fitted meta-learner adapted on a support set.

    See :class:`AdaptedClassifier`; usually obtained from
    :meth:`MetaLearnerRegressor.adapt`.

    Parameters
    ----------
    meta_learner : MetaLearnerRegressor or FrozenEstimator
        A fitted meta-learner.
    inner_steps : int, optional
        Adaptation steps (default: the meta-learner's ``inner_steps``).

    Attributes
    ----------
    n_features_in_ : int

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.frozen import FrozenEstimator
    >>> from skbilevel.meta import AdaptedRegressor, MetaLearnerRegressor
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(40, 1); y = 2 * X[:, 0]
    >>> meta = MetaLearnerRegressor(max_iter=3, random_state=0).fit(X, y)
    >>> AdaptedRegressor(FrozenEstimator(meta)).fit(X[:5], y[:5]).predict(X[:2]).shape
    (2,)
    """

    def __init__(self, meta_learner, *, inner_steps=None):
        self.meta_learner = meta_learner
        self.inner_steps = inner_steps

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y):
        """Adapt the meta-learner on the support set ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_support, n_features)
        y : array-like of shape (n_support,) or (n_support, n_outputs)

        Returns
        -------
        self : AdaptedRegressor
        """
        meta = self._meta(MetaLearnerRegressor)
        X, y = validate_data(self, X, y, multi_output=True, y_numeric=True,
                             dtype=[np.float64, np.float32])
        self._check_support_features(meta, X)
        y2 = y.reshape(len(y), -1)
        if y2.shape[1] != meta.n_outputs_:
            raise ValueError(
                f"y_support has {y2.shape[1]} outputs but the meta-learner was fitted "
                f"with {meta.n_outputs_}."
            )
        self._y_1d = y.ndim == 1
        self._state = meta._adapt_state(X, torch.as_tensor(y2.astype(np.float64)), None,
                                        self.inner_steps)
        return self

    def predict(self, X):
        """Predictions of the adapted model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        check_is_fitted(self)
        meta = _unfreeze(self.meta_learner)
        X = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        out = meta._outputs(X, self._state, None)
        return out[:, 0] if self._y_1d else out
