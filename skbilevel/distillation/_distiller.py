"""Dataset distillation: learn a tiny synthetic training set.

The synthetic inputs (and optionally their labels) are the outer variables
``phi`` of a bi-level problem: the inner problem fits a model on the
synthetic set, the outer loss is that model's error on (mini-batches of)
the real data. Two inner models:

- ``method="kip"`` (kernel inducing points, Nguyen et al. 2021): kernel
  ridge regression, solved exactly inside autograd
  (:class:`~skbilevel.hypergrad.KernelRidgeSolver` and the ``closed_form``
  strategy);
- ``method="unrolled"`` (Wang et al. 2018): a small network trained for a
  few gradient steps from a fresh random initialization at every outer
  step, differentiated by reverse mode through the steps.
"""

import math
import numbers
import warnings

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.metrics import accuracy_score, r2_score
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from ..hypergrad import (
    FunctionalModel,
    GradientDescent,
    HypergradientStrategy,
    argmin,
    available_kernels,
    available_strategies,
    get_strategy,
    kernel_ridge_coef,
    kip_loss,
    pairwise_kernel,
)
from ..utils import resolve_device, to_numpy, torch_generator
from ..utils._fit import fit_outer, keep_state_on_error
from ..utils._modules import MLP
from ..utils._stats import _rms, _softmax
from ..utils._torch import _resolve_adam_dtype, _seeded_global_rng
from ..utils._validation import check_callbacks, check_hidden_layer_sizes

__all__ = ["DatasetDistiller"]

_PREDICT_CHUNK = 2048
#: the final network diverged when its training loss ends this many times higher
#: than at its initialization
_DIVERGED = 1e4


def _kernel_specs(kernel, kernel_params):
    """Normalize ``kernel`` / ``kernel_params`` to a list of ``(kernel, params)``."""
    if isinstance(kernel, (list, tuple)):
        if kernel_params:
            raise ValueError(
                "kernel_params applies to a single kernel; with a list of kernels give "
                "(name, params) pairs, e.g. kernel=[('ntk', {'depth': 3}), 'rbf']."
            )
        if len(kernel) == 0:
            raise ValueError("kernel is an empty list; give at least one kernel.")
        items = list(kernel)
    else:
        items = [(kernel, dict(kernel_params or {}))]
    specs = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict):
            name, params = item
        else:
            name, params = item, {}
        if isinstance(name, str):
            if name not in available_kernels():
                raise ValueError(
                    f"Unknown kernel {name!r}; use one of {available_kernels()}, a "
                    "callable kernel(A, B) -> Gram matrix, or a list of them."
                )
        elif not callable(name):
            raise ValueError(
                f"kernel entries must be a kernel name, a callable or a (name, params) "
                f"pair; got {item!r}."
            )
        degree = params.get("degree")
        if name == "poly" and degree is not None and not (
            isinstance(degree, numbers.Integral) and degree >= 1
        ):
            # a fractional power of a negative inner product is NaN
            raise ValueError(
                f"The 'poly' kernel's degree must be an integer >= 1; got {degree!r}."
            )
        specs.append((name, dict(params)))
    return specs


def _check_kernels(specs, Xz, dtype):
    """Call each kernel on 2 x 3 rows of ``Xz``: a callable must return a torch
    Gram matrix of shape (2, 3), which autograd can differentiate, and every
    kernel must be finite there."""
    A = torch.as_tensor(Xz[:2], dtype=dtype)
    B = torch.as_tensor(Xz[:3], dtype=dtype)
    for i, (kernel, params) in enumerate(specs):
        params = {k: v for k, v in params.items() if k != "reg"}
        if isinstance(kernel, str):
            with torch.no_grad():
                K = pairwise_kernel(A, B, kernel=kernel, **params)
        else:
            K = kernel(A, B, **params)
        if not isinstance(K, torch.Tensor) or K.shape != (len(A), len(B)):
            got = (
                f"a {type(K).__name__}" if not isinstance(K, torch.Tensor)
                else f"shape {tuple(K.shape)}"
            )
            raise ValueError(
                f"A callable kernel must return the torch Gram matrix kernel(A, B) of "
                f"shape (len(A), len(B)), built with torch operations so that it can "
                f"be differentiated; {kernel!r} returned {got} for A with {len(A)} "
                f"rows and B with {len(B)}."
            )
        _check_gram_finite(K, specs, i, "the first rows of the (standardized) data")


def _check_gram_finite(K, specs, i, where, cause=None):
    """Raise a ValueError naming kernel ``specs[i]`` when its Gram matrix ``K``
    holds NaN or infinity.

    The ridge penalty is ``reg`` times the mean diagonal of the kernel, so a
    non-finite kernel surfaced as 'kernel_ridge_fit: reg must be a finite
    number >= 0; got tensor(nan)', blaming ``reg``.
    """
    K = K.detach()
    finite = torch.isfinite(K)
    if bool(finite.all()):
        return
    kernel, params = specs[i]
    which = f"kernel[{i}] " if len(specs) > 1 else "kernel "
    shown = {k: v for k, v in params.items() if k != "reg"}
    raise ValueError(
        f"{which}{kernel!r}{f' with params {shown}' if shown else ''} returned "
        f"non-finite values (NaN or infinity) in {int((~finite).sum())} of "
        f"{K.numel()} Gram matrix entries on {where}. The kernel is called on the "
        "standardized data (centred, unit RMS) and the synthetic samples, and must "
        "be finite there: e.g. lower the scale inside an exponential or a high "
        "power (they overflow), or use a named kernel."
    ) from cause


def _raise_if_gram_not_finite(specs, i, Xs, Xb, cause=None):
    """After a failed KIP step: if kernel ``specs[i]`` is not finite on the
    synthetic samples ``Xs`` or between them and the real batch ``Xb``, raise
    the error naming it (see :func:`_check_gram_finite`)."""
    kernel, params = specs[i]
    params = {k: v for k, v in params.items() if k != "reg"}
    with torch.no_grad():
        Xs = Xs.detach()
        for A, B, where in (
            (Xs, Xs, "the synthetic samples"),
            (Xb, Xs, "the real samples against the synthetic ones"),
        ):
            K = pairwise_kernel(A, B, kernel=kernel, **params)
            _check_gram_finite(K, specs, i, where, cause)


class DatasetDistiller(BaseEstimator):
    """Distill a training set into a few synthetic samples that teach as well.

    The synthetic inputs ``X_distilled_`` (and, with ``learn_labels=True``,
    soft labels) are learned by hypergradient descent so that a model fitted
    on them alone does well on the real data. With ``method="kip"`` the model
    is kernel ridge regression, fitted in closed form inside autograd (KIP,
    Nguyen et al. 2021); with ``method="unrolled"`` it is a small ReLU
    network trained for ``n_inner_steps`` gradient steps from a fresh random
    initialization at every outer step (Wang et al. 2018), differentiated in
    reverse mode through the steps.

    Inputs are centred and divided by one global standard deviation before
    distillation (distances keep their geometry, so the distilled set suits
    learners that work on the raw features); ``X_distilled_`` is returned in
    the original units.

    Parameters
    ----------
    n_per_class : int or dict, default=10
        Synthetic samples per class (classification). A dict maps each class
        label to its own count; every label must occur in ``y``.
    n_distilled : int, default=None
        Number of synthetic samples for regression targets (default:
        ``n_per_class`` when it is an int). Float targets whose values are all
        whole numbers (``load_diabetes``, counts) read as class labels unless
        it is set; with integer, string or boolean labels it is an error.
    method : {"kip", "unrolled"}, default="kip"
        Inner model: kernel ridge regression in closed form, or a network
        trained by unrolled gradient descent.
    kernel : str, callable or list, default="ntk"
        Kernel of ``method="kip"``: ``"ntk"`` (fully-connected ReLU network
        in closed form), ``"nngp"``, ``"rbf"``, ``"poly"``, ``"linear"``, or a
        callable ``kernel(A, B)`` returning a differentiable torch Gram
        matrix. A list of kernels (names, callables or ``(name, params)``
        pairs) draws one at random at every outer step, so the synthetic set
        does not specialize to one kernel (better transfer to other
        learners); ``predict`` uses the first. A pair's params may hold its
        own ``"reg"``, e.g. ``("rbf", {"reg": 0.1})`` to mimic a strongly
        regularized learner.
    kernel_params : dict, default=None
        Parameters of a single named kernel (``depth``, ``weight_var``,
        ``bias_var`` for ``"ntk"``; ``gamma``; ``degree``, ``coef0``).
    learn_labels : bool, default=False
        Also learn the synthetic targets (soft labels). Improves the kernel
        model with very few samples but hurts transfer to learners trained
        on the hard labels.
    init : {"kmeans", "random"}, default="kmeans"
        Start from the k-means centroids of each class (of ``X`` for
        regression, with the mean target of each cluster), or from random
        real samples of each class. Centroids start closer to a good set and
        transfer better.
    clip : bool, default=True
        Keep synthetic inputs inside the per-feature range of the real data
        (a projection after every outer step), so they stay valid images,
        counts, etc.
    batch_size : int, default=256
        Real samples in the mini-batch of each outer loss; the full data
        when larger than the data.
    max_iter : int, default=300
        Outer iterations (Adam steps on the synthetic set). The outer loss
        is stochastic, so all of them are run.
    learning_rate : float, default=0.01
        Adam step size, in units of the standardized inputs.
    reg : float, default=1e-6
        Kernel ridge penalty relative to the mean diagonal of the kernel
        (``method="kip"``), or the weight decay of the inner network
        (``method="unrolled"``).
    hypergradient : str or HypergradientStrategy, default="auto"
        How the inner solution is differentiated: ``"auto"`` is
        ``"closed_form"`` for KIP and ``"reverse"`` for unrolled. KIP also
        takes implicit (``"dense"``, ``"cg"``, ...) and proxy strategies
        (``"evograd"``, ``"best_response"``); unrolled takes the other
        unrolled strategies (``"truncated"``, ``"forward"``, ...), and
        implicit, proxy and penalty ones, though the network is not trained
        to an optimum that implicit ones assume (they warn).
    hidden_layer_sizes : tuple of int, default=(100,)
        Network of ``method="unrolled"``.
    n_inner_steps : int, default=20
        Gradient steps of the inner network (``method="unrolled"``).
    inner_learning_rate : float, default=0.1
        Step size of those steps; ``inner_learning_rate * reg`` must not
        exceed 2 (the weight decay alone would diverge). If the network
        trained on the distilled set diverges (non-finite parameters, or a
        training loss 1e4 times its initial one), ``fit`` raises a ValueError.
    device : str, default="cpu"
        Torch device (``"cuda"``, ``"auto"``...). Fitted state is stored on
        the CPU.
    dtype : str, numpy or torch dtype, default="float64"
        Torch dtype of the computation: ``"float64"`` or ``"float32"``;
        ``method="unrolled"`` also runs in ``"bfloat16"``. Kernel ridge has no
        half-precision Cholesky, and Adam fails in ``"float16"``.
    random_state : int, RandomState instance or None, default=None
        Seeds the initial samples, the mini-batches, kernel draws and network
        initializations.
    verbose : int, default=0
        Show a progress bar of the outer loop.
    callbacks : list of callable, default=None
        Called as ``cb(state)`` after each outer iteration (see
        :func:`~skbilevel.hypergrad.minimize_outer`); returning ``True`` stops.

    Attributes
    ----------
    X_distilled_ : ndarray of shape (n_distilled, n_features)
        Synthetic inputs, in the units of ``X``.
    y_distilled_ : ndarray of shape (n_distilled,) or (n_distilled, n_targets)
        Hard labels (the argmax of the soft labels) for classification; the
        targets for regression.
    y_distilled_soft_ : ndarray of shape (n_distilled, n_classes) or (n_distilled, n_targets)
        Learned soft labels: one-hot scale for KIP (kernel ridge targets),
        probabilities for the unrolled network; regression targets otherwise.
    classes_ : ndarray of shape (n_classes,)
        Class labels (classification only).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when ``X`` has string feature names.
    n_iter_ : int
        Outer iterations run.
    history_ : ndarray of shape (``n_iter_``,)
        Outer (mini-batch) loss per iteration.
    hypergradient_info_ : dict
        Health record of the last hypergradient.
    dual_coef_ : ndarray of shape (n_distilled, n_outputs)
        Kernel ridge coefficients on the distilled set (``method="kip"``).
    network_params_ : dict of ndarray
        Parameters of the network trained on the distilled set
        (``method="unrolled"``).

    Notes
    -----
    One estimator serves class labels and continuous targets, so
    scikit-learn does not take it for a classifier: ``cross_val_score`` and
    ``GridSearchCV`` with an integer ``cv`` split it with unshuffled
    ``KFold``, not ``StratifiedKFold``. On data sorted by class (iris as
    loaded) every test fold then holds a class its training part never saw,
    and scores 0. Pass ``cv=StratifiedKFold(5, shuffle=True)`` (or shuffle
    the data) for class labels.

    See Also
    --------
    skbilevel.hypergrad.KernelRidgeSolver : the KIP inner problem.
    skbilevel.hypergrad.ntk_kernel : the closed-form NTK.

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from skbilevel.distillation import DatasetDistiller
    >>> X, y = load_iris(return_X_y=True)
    >>> dd = DatasetDistiller(n_per_class=1, max_iter=30, random_state=0)
    >>> X_small, y_small = dd.fit_resample(X, y)
    >>> X_small.shape, y_small.tolist()
    ((3, 4), [0, 1, 2])
    >>> round(dd.score(X, y), 2) >= 0.9
    True
    """

    _parameter_constraints = {
        "n_per_class": [Interval(numbers.Integral, 1, None, closed="left"), dict],
        "n_distilled": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "method": [StrOptions({"kip", "unrolled"})],
        "kernel": [str, callable, list, tuple],
        "kernel_params": [dict, None],
        "learn_labels": ["boolean"],
        "init": [StrOptions({"random", "kmeans"})],
        "clip": ["boolean"],
        "batch_size": [Interval(numbers.Integral, 1, None, closed="left")],
        "max_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "reg": [Interval(numbers.Real, 0, None, closed="left")],
        "hypergradient": [str, HypergradientStrategy],
        "hidden_layer_sizes": [tuple, list],
        "n_inner_steps": [Interval(numbers.Integral, 1, None, closed="left")],
        "inner_learning_rate": [Interval(numbers.Real, 0, None, closed="neither")],
        "device": [str, torch.device, None],
        "dtype": [str, torch.dtype, np.dtype, type, None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "callbacks": [list, None],
    }

    def __init__(
        self,
        n_per_class=10,
        *,
        n_distilled=None,
        method="kip",
        kernel="ntk",
        kernel_params=None,
        learn_labels=False,
        init="kmeans",
        clip=True,
        batch_size=256,
        max_iter=300,
        learning_rate=0.01,
        reg=1e-6,
        hypergradient="auto",
        hidden_layer_sizes=(100,),
        n_inner_steps=20,
        inner_learning_rate=0.1,
        device="cpu",
        dtype="float64",
        random_state=None,
        verbose=0,
        callbacks=None,
    ):
        self.n_per_class = n_per_class
        self.n_distilled = n_distilled
        self.method = method
        self.kernel = kernel
        self.kernel_params = kernel_params
        self.learn_labels = learn_labels
        self.init = init
        self.clip = clip
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.reg = reg
        self.hypergradient = hypergradient
        self.hidden_layer_sizes = hidden_layer_sizes
        self.n_inner_steps = n_inner_steps
        self.inner_learning_rate = inner_learning_rate
        self.device = device
        self.dtype = dtype
        self.random_state = random_state
        self.verbose = verbose
        self.callbacks = callbacks

    # ------------------------------------------------------------------ fit

    @_fit_context(prefer_skip_nested_validation=True)
    @keep_state_on_error
    def fit(self, X, y):
        """Learn the synthetic set from ``(X, y)`` and fit the model on it.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Class labels, or continuous targets (regression).

        Returns
        -------
        self : DatasetDistiller
        """
        # fitted state that only some methods / tasks set must not survive a refit
        for name in ("classes_", "dual_coef_", "network_params_"):
            self.__dict__.pop(name, None)
        X, y = validate_data(
            self, X, y, dtype=[np.float64, np.float32], multi_output=True, y_numeric=False
        )
        device = resolve_device(self.device)
        dtype = self._resolve_dtype()
        self._check_hypergradient()
        check_callbacks(self.callbacks)
        specs = _kernel_specs(self.kernel, self.kernel_params)
        if self.method == "unrolled":
            check_hidden_layer_sizes(self.hidden_layer_sizes, "hidden_layer_sizes")
            if self.inner_learning_rate * self.reg > 2:
                # each step scales the weights by (1 - lr * reg) on top of the loss
                raise ValueError(
                    "Gradient descent on the weight decay alone diverges when "
                    "inner_learning_rate * reg > 2; got "
                    f"{self.inner_learning_rate:g} * {self.reg:g}. Lower reg (the "
                    "weight decay of method='unrolled') or inner_learning_rate."
                )
        if self.method == "kip" and self.reg <= 0:
            raise ValueError(
                f"reg must be > 0 for method='kip' (kernel ridge); got {self.reg}."
            )
        rng = check_random_state(self.random_state)
        gen = torch_generator(rng)

        task = self._target_task(y)
        self._task = task
        if task == "classification" and y.ndim == 2:
            y = column_or_1d(y, warn=True)  # labels as a column, as classifiers do
        # one global scale: keeps the geometry of the inputs (see class docstring)
        self._x_mean = X.mean(axis=0)
        scale = float(_rms(X - self._x_mean))
        self._x_scale = scale if scale > 0 and np.isfinite(scale) else 1.0
        Xz = (X - self._x_mean) / self._x_scale
        if self.method == "kip":
            _check_kernels(specs, Xz, dtype)

        if task == "classification":
            self.classes_, y_idx = np.unique(y, return_inverse=True)
            if len(self.classes_) < 2:
                raise ValueError(
                    "DatasetDistiller needs samples of at least 2 classes; got 1 class "
                    f"({self.classes_.tolist()})."
                )
            counts = self._class_counts(y_idx)
            T = np.eye(len(self.classes_))[y_idx]  # one-hot targets
            Xs0, Ts0 = self._init_classification(Xz, y_idx, T, counts, rng)
            self._t_offset = 1.0 / len(self.classes_)  # centred one-hot (KIP)
        else:
            Y = y.reshape(len(y), -1).astype(np.float64)
            self._y_mean = Y.mean(axis=0)
            ysd = _rms(Y - self._y_mean, axis=0)
            self._y_scale = np.where(ysd > 0, ysd, 1.0)
            T = (Y - self._y_mean) / self._y_scale
            Xs0, Ts0 = self._init_regression(Xz, T, rng)
            self._t_offset = 0.0
        self._y_ndim = y.ndim

        to = dict(device=device, dtype=dtype)
        Xr = torch.as_tensor(Xz, **to)
        Tr = torch.as_tensor(T - self._t_offset, **to)
        phi = {"X": torch.as_tensor(Xs0, **to).clone().requires_grad_(True)}
        targets0 = torch.as_tensor(Ts0 - self._t_offset, **to)
        if self.learn_labels:
            if self.method == "unrolled" and task == "classification":
                # soft labels as logits; start sharply at the one-hot labels
                phi["y"] = (targets0 + self._t_offset).mul(5.0).clone().requires_grad_(True)
            else:
                phi["y"] = targets0.clone().requires_grad_(True)

        lo = torch.as_tensor(Xz.min(axis=0), **to)
        hi = torch.as_tensor(Xz.max(axis=0), **to)

        def project(leaves):
            leaves[0].copy_(torch.maximum(torch.minimum(leaves[0], hi), lo))

        n = Xr.shape[0]
        batch = min(self.batch_size, n)

        def draw_batch():
            if batch >= n:
                return Xr, Tr, y_idx_t
            idx = torch.randperm(n, generator=gen)[:batch].to(device)
            return Xr[idx], Tr[idx], None if y_idx_t is None else y_idx_t[idx]

        y_idx_t = (
            torch.as_tensor(y_idx, device=device) if task == "classification" else None
        )
        if self.method == "kip":
            objective = self._kip_objective(specs, targets0, draw_batch, gen)
            deterministic = batch >= n and len(specs) == 1
        else:
            objective, model = self._unrolled_objective(targets0, draw_batch, gen, task, to)
            deterministic = False

        # strategies that draw from torch's global generator (the proxy ones:
        # 'evograd', 'best_response') draw from one seeded by random_state, so two
        # fits with the same seed are identical; the caller's stream is left alone
        torch_seed = int(rng.randint(0, 2**31 - 1))  # rng's last use: init is done
        with _seeded_global_rng(torch_seed, device):
            fit_outer(
                self,
                objective,
                phi,
                early_stopping=False,
                restore_best=deterministic,
                projection=project if self.clip else None,
                desc="distill",
            )

        Xs = phi["X"].detach()
        targets = self._current_targets(phi, targets0, task).detach()
        if self.method == "unrolled":
            network_params = self._train_final_network(model, Xs, targets, gen, task)
        # back to X's units in float64: the scale need not fit the computing dtype
        Xs_np = to_numpy(Xs).astype(np.float64)
        self.X_distilled_ = Xs_np * self._x_scale + self._x_mean
        self.X_distilled_ = self.X_distilled_.astype(X.dtype, copy=False)
        self._Xs_scaled = to_numpy(Xs)
        # what predict uses: the fitted model, whatever set_params changes later
        self._predict_dtype = dtype
        self._hidden = tuple(self.hidden_layer_sizes)
        if self.method == "kip":
            name, params = specs[0]
            params = dict(params)
            self._predict_reg = float(params.pop("reg", self.reg))
            with torch.no_grad():
                K = pairwise_kernel(Xs, kernel=name, **params)
                _check_gram_finite(K, specs, 0, "the distilled samples")
                dual = kernel_ridge_coef(K, targets, self._predict_reg)
            self.dual_coef_ = to_numpy(dual)
            self._predict_kernel = (name, params)
            soft = to_numpy(targets) + self._t_offset
        else:
            self.network_params_ = network_params
            if task == "classification" and self.learn_labels:
                soft = to_numpy(torch.softmax(targets, dim=1))
            else:
                soft = to_numpy(targets) + self._t_offset
        self.y_distilled_soft_ = soft
        if task == "classification":
            self.y_distilled_ = self.classes_[np.argmax(soft, axis=1)]
        else:
            y_out = soft * self._y_scale + self._y_mean
            self.y_distilled_ = y_out[:, 0] if self._y_ndim == 1 else y_out
            self.y_distilled_soft_ = self.y_distilled_
        return self

    def fit_resample(self, X, y):
        """Fit, then return the distilled set ``(X_distilled_, y_distilled_)``.

        Follows imbalanced-learn's convention, so the result feeds any
        estimator: ``LogisticRegression().fit(*dd.fit_resample(X, y))``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)

        Returns
        -------
        X_distilled : ndarray of shape (n_distilled, n_features)
        y_distilled : ndarray of shape (n_distilled,) or (n_distilled, n_targets)
        """
        self.fit(X, y)
        return self.X_distilled_.copy(), self.y_distilled_.copy()

    # ----------------------------------------------------------- fit helpers

    def _check_hypergradient(self):
        """Reject strategy families that cannot differentiate this method's inner
        model, listing those that can (each checked on iris)."""
        default = "closed_form" if self.method == "kip" else "reverse"
        spec = default if self.hypergradient == "auto" else self.hypergradient
        family = get_strategy(spec).family
        if self.method == "kip":
            families = ("closed_form", "implicit", "proxy")
            why = {
                "unrolled": "kernel ridge is solved in closed form, with no gradient "
                "steps to unroll",
                # measured on iris: the outer loss stays at 0.222 for 40 iterations
                "penalty": "with kernel ridge BOME's outer loss stays at that of a "
                "zero predictor, so the synthetic set does not learn",
            }.get(family)
        else:
            families = ("unrolled", "implicit", "proxy", "penalty")
            why = "the network's training has no closed form"
        if family in families:
            return
        names = [
            n for n in available_strategies() if get_strategy(n).family in families
        ]
        raise ValueError(
            f"hypergradient={self.hypergradient!r} ({family} family) does not fit "
            f"method={self.method!r}: {why}. Use 'auto' or one of {names}."
        )

    def _resolve_dtype(self):
        """The computing dtype; half precision only where it works."""
        kip = "Kernel ridge (method='kip') needs a Cholesky factorization"
        return _resolve_adam_dtype(self.dtype, kip if self.method == "kip" else None)

    def _target_task(self, y):
        # type_of_target casts floats to int64 to find whole numbers: beyond 9.2e18
        # numpy warns 'invalid value encountered in cast' (the answer is right)
        with np.errstate(invalid="ignore"):
            kind = type_of_target(y, input_name="y", raise_unknown=True)
        whole_floats = y.dtype.kind == "f" and kind in (
            "binary", "multiclass", "multiclass-multioutput")
        if whole_floats and self.n_distilled is not None:
            # floats of whole values (load_diabetes, load_linnerud): n_distilled
            # says they are regression targets
            return "regression"
        if kind in ("binary", "multiclass"):
            if self.n_distilled is not None:
                raise ValueError(
                    "n_distilled is for regression targets, but y holds class labels "
                    f"({len(np.unique(y))} distinct {y.dtype} values). For class labels "
                    "set n_per_class (an int, or a dict label -> count); for a "
                    "regression target of whole numbers pass y as floats "
                    "(y.astype(float))."
                )
            return "classification"
        if kind in ("continuous", "continuous-multioutput"):
            return "regression"
        hint = (" Its values are whole numbers: set n_distilled to distill them as "
                "regression targets." if whole_floats else "")
        raise ValueError(
            f"Unknown label type: y has target type {kind!r}; DatasetDistiller "
            f"supports class labels (binary or multiclass) and continuous targets.{hint}"
        )

    def _class_counts(self, y_idx):
        """Synthetic samples per class index, checked against the class sizes."""
        sizes = np.bincount(y_idx, minlength=len(self.classes_))
        if isinstance(self.n_per_class, dict):
            known = {_plain(c) for c in self.classes_}
            absent = [k for k in self.n_per_class if k not in known]
            if absent:
                raise ValueError(
                    f"n_per_class lists class(es) {absent} that have no samples in y "
                    f"(classes present: {sorted(known)}); remove them or add samples."
                )
            missing = [c for c in known if c not in self.n_per_class]
            if missing:
                raise ValueError(
                    f"n_per_class has no count for class(es) {missing}; give every class "
                    "in y a count, or pass an int."
                )
            counts = []
            for c in self.classes_:
                k = self.n_per_class[_plain(c)]
                if not isinstance(k, numbers.Integral) or k < 1:
                    raise ValueError(
                        f"n_per_class[{_plain(c)!r}] must be an integer >= 1; got {k!r}."
                    )
                counts.append(int(k))
            counts = np.asarray(counts)
        else:
            counts = np.full(len(self.classes_), int(self.n_per_class))
        too_many = counts > sizes
        if too_many.any():
            i = int(np.argmax(too_many))
            hint = ""
            if self.classes_.dtype.kind == "f":
                hint = (
                    f" y's {len(self.classes_)} distinct values are whole numbers, so "
                    "they were taken for class labels; for a regression target set "
                    "n_distilled."
                )
            raise ValueError(
                f"n_per_class asks for {counts[i]} synthetic samples of class "
                f"{_plain(self.classes_[i])!r}, which has only {sizes[i]} sample(s); lower "
                f"n_per_class (or give that class a smaller count with a dict).{hint}"
            )
        return counts

    def _init_classification(self, Xz, y_idx, T, counts, rng):
        Xs, Ts = [], []
        for c, k in enumerate(counts):
            rows = np.flatnonzero(y_idx == c)
            n_distinct = len(np.unique(Xz[rows], axis=0))
            _warn_copies(
                f"Class {_plain(self.classes_[c])!r} has", n_distinct, k,
                "it", "(n_per_class, or a dict of counts)",
            )
            if self.init == "random":
                Xs.append(Xz[rng.choice(rows, size=k, replace=False)])
            else:
                Xs.append(self._kmeans(Xz[rows], k, rng)[0])
            Ts.append(np.repeat(T[rows[:1]], k, axis=0))
        return np.concatenate(Xs), np.concatenate(Ts)

    def _init_regression(self, Xz, T, rng):
        k = self.n_distilled
        if k is None:
            if isinstance(self.n_per_class, dict):
                raise ValueError("Set n_distilled for regression targets.")
            k = int(self.n_per_class)
        if k > Xz.shape[0]:
            raise ValueError(
                f"n_distilled={k} is larger than the number of samples "
                f"({Xz.shape[0]}); lower it."
            )
        # point[i]: which distinct row row i is a copy of
        _, point = np.unique(Xz, axis=0, return_inverse=True)
        point = point.ravel()
        n_distinct = int(point.max()) + 1
        _warn_copies("X has", n_distinct, k, "", "(n_distilled)")
        if self.init == "random":
            rows = rng.choice(Xz.shape[0], size=k, replace=False)
            start = Xz[rows]
            members = [rows[j : j + 1] for j in range(k)]
        else:
            start, labels = self._kmeans(Xz, k, rng)
            members = [np.flatnonzero(labels == j) for j in range(k)]
        if n_distinct < Xz.shape[0]:
            # each synthetic sample starts at the mean target of all the copies of
            # its rows: with fewer distinct rows than n_distilled, _kmeans splits
            # a point's copies into clusters (random init draws single copies), and
            # each of those samples took the mean target of its own share, a few
            # rows or one. Kernel ridge on copies averages their targets with equal
            # weights, so the point's prediction was skewed: 2 distinct rows x 20,
            # n_distilled=4, predicted -0.733 at a point whose 20 targets average
            # -0.086 (0.220 at the other, kept whole); now -0.086 and 0.220.
            members = [np.flatnonzero(np.isin(point, point[m])) for m in members]
        Ts = np.stack([T[m].mean(axis=0) for m in members])
        return start, Ts

    @staticmethod
    def _kmeans(Xz, k, rng):
        """k-means centroids and labels of ``Xz``, with no empty cluster.

        With fewer distinct rows than ``k`` some clusters are empty; each is
        seeded with a real row moved out of a cluster that has others (the
        row farthest from its centroid, ties at random), so every cluster
        has a member and a finite mean target.
        """
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, n_init=3, random_state=rng.randint(0, 2**31 - 1))
        with warnings.catch_warnings():
            # 'Number of distinct clusters (2) found smaller than n_clusters (3)':
            # the empty clusters are filled below (and fit said why)
            warnings.filterwarnings("ignore", "Number of distinct clusters")
            labels = km.fit_predict(Xz)
        centers = km.cluster_centers_
        sizes = np.bincount(labels, minlength=k)
        if sizes.all():
            return centers, labels
        labels = labels.copy()
        dist = ((Xz - centers[labels]) ** 2).sum(axis=1)
        # random order first, then a stable sort: ties are broken at random
        order = rng.permutation(len(Xz))
        order = order[np.argsort(-dist[order], kind="stable")]
        for j in np.flatnonzero(sizes == 0):
            # k <= n_samples, so a row in a cluster of size >= 2 always remains
            row = next(i for i in order if sizes[labels[i]] >= 2)
            sizes[labels[row]] -= 1
            labels[row], sizes[j] = j, 1
        centers = np.stack([Xz[labels == j].mean(axis=0) for j in range(k)])
        return centers, labels

    def _current_targets(self, phi, targets0, task):
        if not self.learn_labels:
            return targets0
        return phi["y"]

    def _kip_objective(self, specs, targets0, draw_batch, gen):
        strategy = "closed_form" if self.hypergradient == "auto" else self.hypergradient
        reg = float(self.reg)

        def objective(phi):
            i = int(torch.randint(len(specs), (1,), generator=gen))
            name, params = specs[i]
            params = dict(params)
            step_reg = float(params.pop("reg", reg))
            Xb, Tb, _ = draw_batch()
            ys = phi["y"] if "y" in phi else targets0
            # _check_kernels saw a few rows only: a kernel that overflows on the
            # rest of the data (or where the synthetic samples move) failed here
            # as 'kernel_ridge_fit: reg must be a finite number' (the penalty is
            # scaled by the kernel's diagonal), or gave a NaN loss that stopped
            # fit at iteration 0 with a ConvergenceWarning blaming the learning
            # rate. The kernel is recomputed after a failure only.
            try:
                loss, info = kip_loss(
                    phi["X"], ys, Xb, Tb, kernel=name, reg=step_reg,
                    hypergradient=strategy, **params,
                )
            except ValueError as exc:
                _raise_if_gram_not_finite(specs, i, phi["X"], Xb, exc)
                raise
            if not bool(torch.isfinite(loss.detach())):
                _raise_if_gram_not_finite(specs, i, phi["X"], Xb)
            return loss, info

        return objective

    def _unrolled_objective(self, targets0, draw_batch, gen, task, to):
        n_out = targets0.shape[1]
        module = _mlp(self.n_features_in_, n_out, tuple(self.hidden_layer_sizes)).to(**to)
        model = FunctionalModel(module, "cross_entropy" if task == "classification" else "mse")
        strategy = "reverse" if self.hypergradient == "auto" else self.hypergradient
        solver = GradientDescent(lr=self.inner_learning_rate, n_steps=self.n_inner_steps)
        weight_decay = float(self.reg)
        shapes = {k: v.shape for k, v in model.init_params().items()}

        def inner_targets(phi):
            return _network_targets(phi.get("y"), targets0 + self._t_offset, task)

        def objective(phi):
            init = _fresh_params(shapes, gen, to)

            def inner_loss(theta, p):
                out = model.forward(theta, p["X"])
                loss = model.loss_from_outputs(out, inner_targets(p))
                if weight_decay > 0:
                    loss = loss + 0.5 * weight_decay * _sq_norm(theta)
                return loss

            theta, info = argmin(inner_loss, phi, init, hypergradient=strategy, solver=solver)
            Xb, Tb, yb = draw_batch()
            out = model.forward(theta, Xb)
            if task == "classification":
                return model.loss_from_outputs(out, yb), info
            return model.loss_from_outputs(out, Tb), info

        return objective, (model, solver, shapes, to)

    def _train_final_network(self, model_parts, Xs, targets, gen, task):
        model, solver, shapes, to = model_parts
        learned = targets if self.learn_labels else None
        targets_used = _network_targets(learned, targets + self._t_offset, task)
        weight_decay = float(self.reg)

        def fun(theta):
            loss = model.loss_from_outputs(model.forward(theta, Xs), targets_used)
            if weight_decay > 0:
                loss = loss + 0.5 * weight_decay * _sq_norm(theta)
            return loss

        theta0 = _fresh_params(shapes, gen, to)
        with torch.no_grad():
            start = float(fun(theta0))
        theta, _ = solver.solve(fun, theta0)
        with torch.no_grad():
            end = float(fun(theta))
        finite = all(bool(torch.isfinite(v).all()) for v in theta.values())
        if not (finite and math.isfinite(end) and end <= _DIVERGED * max(start, 1e-12)):
            # the last finite iterate of a diverging descent is no model either
            # (inner_learning_rate * reg > 2 was rejected before the outer loop)
            what = (
                "its parameters are not finite" if not finite else
                f"its training loss rose from {start:.3g} to {end:.3g}"
            )
            raise ValueError(
                f"The network trained on the distilled set diverged: {what} after "
                f"n_inner_steps={self.n_inner_steps} gradient steps with "
                f"inner_learning_rate={self.inner_learning_rate:g} and "
                f"reg={self.reg:g}; lower inner_learning_rate."
            )
        return {k: to_numpy(v) for k, v in theta.items()}

    # -------------------------------------------------------------- predict

    def _decision(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        Xz = (X - self._x_mean) / self._x_scale
        dtype = self._predict_dtype
        out = []
        with torch.no_grad():
            Xs = torch.as_tensor(self._Xs_scaled, dtype=dtype)
            if self._fitted_kip():
                name, params = self._predict_kernel
                dual = torch.as_tensor(self.dual_coef_, dtype=dtype)
                for start in range(0, Xz.shape[0], _PREDICT_CHUNK):
                    Xc = torch.as_tensor(Xz[start : start + _PREDICT_CHUNK], dtype=dtype)
                    out.append(to_numpy(pairwise_kernel(Xc, Xs, kernel=name, **params) @ dual))
            else:
                params = {
                    k: torch.as_tensor(v, dtype=dtype) for k, v in self.network_params_.items()
                }
                module = _mlp(
                    self.n_features_in_, next(iter(reversed(params.values()))).shape[0],
                    self._hidden,
                ).to(dtype=dtype)
                module.load_state_dict(params)
                for start in range(0, Xz.shape[0], _PREDICT_CHUNK):
                    Xc = torch.as_tensor(Xz[start : start + _PREDICT_CHUNK], dtype=dtype)
                    out.append(to_numpy(module(Xc)))
        if not out:
            return np.zeros((0, len(getattr(self, "classes_", [0]))))
        F = np.concatenate(out).reshape(Xz.shape[0], -1)
        bad = ~np.isfinite(F).all(axis=1)
        if bad.any():
            # NaN scores gave class 0 (argmax) and NaN regression values, silently
            raise ValueError(
                f"The model's outputs on {int(bad.sum())} of {len(F)} samples are not "
                "finite: those samples lie far outside the data fitted (up to "
                f"{float(np.abs(Xz[bad]).max()):.3g} standard deviations from its mean, "
                f"where the kernel or network overflows in "
                f"{str(dtype).replace('torch.', '')}). Check them for corrupt values, or "
                "scale them as the training data."
            )
        return F

    def _fitted_kip(self):
        """Whether the fitted model is kernel ridge (KIP) rather than a network."""
        return hasattr(self, "dual_coef_")

    def predict(self, X):
        """Predict with the model trained on the distilled set.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_targets)
            Class labels, or regression predictions.
        """
        F = self._decision(X)
        if self._task == "classification":
            return self.classes_[np.argmax(F, axis=1)]
        Y = F * self._y_scale + self._y_mean
        return Y[:, 0] if self._y_ndim == 1 else Y

    def _is_classification(self):
        return getattr(self, "_task", "classification") == "classification"

    @available_if(_is_classification)
    def predict_proba(self, X):
        """Class scores of the model trained on the distilled set.

        For ``method="unrolled"`` the softmax of the network. For KIP, the
        kernel ridge outputs (regressions on one-hot targets) are clipped at
        zero and normalized; they rank classes but are not calibrated.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
        """
        # in float64 whatever the computing dtype (float32 rows summed to 1 within 1e-7)
        F = self._decision(X).astype(np.float64)
        if not self._fitted_kip():
            return _softmax(F)
        # floor below zero keeps argmax(proba) == predict where all scores are <= 0
        F = F + self._t_offset
        P = np.clip(F, 0, None) + 1e-12 * np.exp(F - F.max(axis=1, keepdims=True))
        return P / P.sum(axis=1, keepdims=True)

    def score(self, X, y, sample_weight=None):
        """Accuracy (classification) or R^2 (regression) of :meth:`predict`.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the samples in the score.

        Returns
        -------
        float
        """
        pred = self.predict(X)
        if self._task == "classification":
            return float(accuracy_score(y, pred, sample_weight=sample_weight))
        return float(r2_score(y, pred, sample_weight=sample_weight))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags


def _mlp(n_features, n_outputs, hidden_layer_sizes):
    """The network of ``method="unrolled"``, built without drawing from torch's
    global generator: its initial values are never used (each training starts
    from :func:`_fresh_params`, drawn from the estimator's own generator, and
    predict loads the fitted ones), and the caller's random stream must not
    move."""
    with torch.random.fork_rng(devices=[]):
        return MLP(n_features, n_outputs, hidden_layer_sizes)


def _warn_copies(subject, n_distinct, k, target, knob):
    """Warn that ``k`` synthetic samples start from ``n_distinct < k`` distinct
    rows, so that some start as copies of others."""
    if n_distinct >= k:
        return
    warnings.warn(
        f"{subject} {n_distinct} distinct sample(s), fewer than the {k} synthetic "
        f"samples asked for{' ' + target if target else ''}, so some start as copies "
        "of others; copies get the same gradients and separate by rounding only, "
        f"adding little. Ask for at most {n_distinct} {knob}.",
        UserWarning,
        # the caller of fit: fit's two decorators, fit, the _init_* method, here
        stacklevel=6,
    )


def _sq_norm(params):
    """Squared Euclidean norm of a dict of tensors (weight decay)."""
    return sum((w**2).sum() for w in params.values())


def _plain(label):
    """A numpy scalar label as the Python value (for messages and dict keys)."""
    return label.item() if isinstance(label, np.generic) else label


def _network_targets(learned, fixed, task):
    """Targets of the inner network: fixed one-hot / standardized, or learned."""
    if learned is None:
        return fixed
    return torch.softmax(learned, dim=1) if task == "classification" else learned


def _fresh_params(shapes, gen, to):
    """PyTorch's default ``nn.Linear`` initialization, drawn from ``gen``."""
    params = {}
    for name, shape in shapes.items():
        fan_in = shape[1] if len(shape) == 2 else None
        if fan_in is None:
            # a bias: its layer's weight was drawn just before it
            fan_in = params[name.replace("bias", "weight")].shape[1]
        bound = 1.0 / math.sqrt(fan_in)
        u = torch.rand(shape, generator=gen, dtype=to["dtype"])
        params[name] = ((2 * u - 1) * bound).to(to["device"])
    return params
