"""Small torch modules and skorch-style ``module__*`` plumbing for estimators.

Estimators that wrap a torch model accept it the way skorch does: a
``module`` parameter (a built-in name, a :class:`torch.nn.Module` subclass or
instance, or a skorch ``NeuralNet``) plus ``module__<name>`` keyword
parameters routed to the module's constructor. This file holds the pieces
shared by those estimators: the built-in :class:`MLP` and :class:`WeightNet`,
the resolver :func:`build_module`, the prefix helpers that let
``get_params`` / ``set_params`` see ``module__*`` keywords, and
:func:`functional_forward` to evaluate a module at a given set of parameters,
and :func:`load_parameters` to store such a set in the module once fitted.
"""

import copy
import inspect

import torch
from torch import nn

__all__ = [
    "MLP",
    "WeightNet",
    "build_module",
    "check_forward",
    "functional_forward",
    "load_parameters",
    "module_params",
    "prefixed_params",
    "skorch_parts",
]

#: constructor argument names filled with the number of input features
_IN_NAMES = ("n_features", "in_features", "input_dim", "n_inputs")
#: constructor argument names filled with the number of outputs
_OUT_NAMES = ("n_outputs", "out_features", "output_dim", "n_classes")

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "logistic": nn.Sigmoid,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


class MLP(nn.Module):
    """Fully connected network; with no hidden layer it is a linear model.

    Parameters
    ----------
    n_features : int
        Number of input features.
    n_outputs : int
        Number of outputs (classes for a classifier, 1 for a regressor).
    hidden_layer_sizes : tuple of int, default=()
        Width of each hidden layer. ``()`` gives a linear (or, with a
        cross-entropy loss, logistic) model.
    activation : {"relu", "tanh", "logistic", "gelu", "identity"}, default="relu"
        Non-linearity after each hidden layer.
    dropout : float, default=0.0
        Dropout probability after each hidden activation.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.utils._modules import MLP
    >>> net = MLP(4, 3, hidden_layer_sizes=(8,))
    >>> net(torch.zeros(5, 4)).shape
    torch.Size([5, 3])
    """

    def __init__(self, n_features, n_outputs, hidden_layer_sizes=(), activation="relu", dropout=0.0):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation={activation!r} is not supported; use one of {sorted(_ACTIVATIONS)}."
            )
        sizes = [int(n_features), *(int(h) for h in hidden_layer_sizes)]
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers.append(nn.Linear(fan_in, fan_out))
            layers.append(_ACTIVATIONS[activation]())
            if dropout:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(sizes[-1], int(n_outputs)))
        self.layers = nn.Sequential(*layers)

    def forward(self, X):
        return self.layers(X)


class WeightNet(nn.Module):
    """Meta-Weight-Net: maps a sample's loss (and label) to a weight in (0, 1).

    Shu et al. (2019) use one hidden layer of 100 ReLU units and a sigmoid
    output; the input is the sample's training loss. With ``n_classes > 0``
    the one-hot label is appended to the input, so the learned weighting
    function may differ per class (useful under class imbalance).

    Parameters
    ----------
    n_classes : int, default=0
        Number of classes whose one-hot label is appended (0: loss only).
    hidden_size : int, default=100
        Width of the hidden layer.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.utils._modules import WeightNet
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> w = WeightNet()(torch.tensor([0.1, 2.0]))
    >>> w.shape, bool(((w > 0) & (w < 1)).all())
    (torch.Size([2]), True)
    """

    def __init__(self, n_classes=0, hidden_size=100):
        super().__init__()
        self.n_classes = int(n_classes)
        self.hidden = nn.Linear(1 + self.n_classes, int(hidden_size))
        self.out = nn.Linear(int(hidden_size), 1)

    def forward(self, loss, label=None):
        """Weights of samples with per-sample ``loss`` (n,) and integer ``label`` (n,)."""
        inputs = loss.reshape(-1, 1)
        if self.n_classes:
            if label is None:
                raise ValueError("This WeightNet uses labels; pass label=...")
            onehot = nn.functional.one_hot(label.long(), self.n_classes).to(inputs.dtype)
            inputs = torch.cat([inputs, onehot], dim=1)
        return torch.sigmoid(self.out(torch.relu(self.hidden(inputs)))).reshape(-1)


def prefixed_params(params, prefix):
    """Return the entries ``prefix__name`` of ``params`` as ``{name: value}``.

    Examples
    --------
    >>> from skbilevel.utils._modules import prefixed_params
    >>> prefixed_params({"module__hidden": 8, "max_iter": 3}, "module")
    {'hidden': 8}
    """
    start = prefix + "__"
    return {key[len(start):]: value for key, value in params.items() if key.startswith(start)}


def module_params(estimator, prefix="module"):
    """The ``prefix__*`` keyword parameters stored on ``estimator``.

    Estimators accept them as ``**kwargs`` (skorch's convention) and store
    them as attributes; this collects them for ``get_params`` and for the
    module constructor.

    Examples
    --------
    >>> from skbilevel.utils._modules import module_params
    >>> class Est:
    ...     module__hidden_layer_sizes = (8,)
    ...     max_iter = 10
    >>> module_params(Est())
    {'hidden_layer_sizes': (8,)}
    """
    names = set(vars(estimator)) | {n for n in dir(type(estimator)) if not n.startswith("_")}
    return {
        name[len(prefix) + 2 :]: getattr(estimator, name)
        for name in sorted(names)
        if name.startswith(prefix + "__")
    }


def _accepts(cls, name):
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _is_skorch_net(obj):
    """Whether ``obj`` is a skorch ``NeuralNet`` (without importing skorch eagerly)."""
    return any(
        cls.__name__ == "NeuralNet" and cls.__module__.startswith("skorch")
        for cls in type(obj).__mro__
    )


def build_module(module, params, n_features, n_outputs, builtin=None, skorch=False):
    """Instantiate the inner torch module an estimator was given.

    Parameters
    ----------
    module : str, torch.nn.Module subclass or instance
        ``"linear"`` or ``"mlp"`` (:class:`MLP`; ``"mlp"`` defaults to one
        hidden layer of 100 units), a module class (instantiated with
        ``params``; its constructor arguments named like ``n_features`` /
        ``in_features`` and ``n_outputs`` / ``out_features`` / ``n_classes``
        are filled from the data when not given), or an instance (deep-copied,
        so the user's object is never trained in place; ``params`` must then
        be empty).
    params : dict
        Constructor keywords (the ``module__*`` parameters without prefix).
    n_features, n_outputs : int
        Input and output sizes derived from the data.
    builtin : dict, optional
        Extra built-in names mapped to ``(class, default_params)``.
    skorch : bool, default=False
        Whether the estimator takes a skorch ``NeuralNet`` (it splits one
        with :func:`skorch_parts` first); only then do the messages offer
        one, and a net given elsewhere is refused with the way to its module.

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> from skbilevel.utils._modules import build_module
    >>> build_module("mlp", {"hidden_layer_sizes": (5,)}, 3, 2)(torch.zeros(1, 3)).shape
    torch.Size([1, 2])
    """
    registry = {
        "linear": (MLP, {"hidden_layer_sizes": ()}),
        "mlp": (MLP, {"hidden_layer_sizes": (100,)}),
    }
    registry.update(builtin or {})
    params = dict(params)
    others = "a torch.nn.Module class or instance" + (", or a skorch NeuralNet" if skorch else "")
    if isinstance(module, str):
        if module not in registry:
            raise ValueError(
                f"module={module!r} is not a built-in model; use one of {sorted(registry)}, "
                f"{others}."
            )
        cls, defaults = registry[module]
        kwargs = {**defaults, **params}
        try:
            return cls(n_features, n_outputs, **kwargs)
        except TypeError as exc:
            raise ValueError(f"Invalid module__* parameters for module={module!r}: {exc}") from exc
    if isinstance(module, nn.Module):
        if params:
            raise ValueError(
                "module__* parameters were given with a module instance; pass the "
                f"module class instead to use them (got {sorted(params)})."
            )
        return copy.deepcopy(module)
    if isinstance(module, type) and issubclass(module, nn.Module):
        for names, value in ((_IN_NAMES, n_features), (_OUT_NAMES, n_outputs)):
            if not any(name in params for name in names):
                for name in names:
                    if _accepts(module, name):
                        params[name] = value
                        break
        try:
            return module(**params)
        except TypeError as exc:
            raise ValueError(
                f"Could not build {module.__name__} from module__* parameters "
                f"{sorted(params)}: {exc}"
            ) from exc
    if _is_skorch_net(module):
        raise ValueError(
            f"module is a skorch {type(module).__name__}, which this estimator does not "
            "take: give its torch module instead, net.module (a class, with its "
            "module__* parameters) or, once the net is initialized, net.module_."
        )
    raise ValueError(
        f"module={module!r} is not supported; use one of {sorted(registry)}, {others}."
    )


def check_forward(module, X, name="module"):
    """The outputs of ``module`` on the first two rows of ``X`` (no graph).

    A module instance given by the user may not take ``X``'s features: the
    failure of this one small forward pass becomes a ``ValueError`` that
    names the module's input size (its first ``in_features``) and ``X``'s,
    instead of a matrix-shape error deep inside a fit. So does an output
    that is not a floating-point tensor (a tuple such as ``(logits,
    features)``, or integer labels), which failed later with
    ``AttributeError: 'tuple' object has no attribute 'dim'``.

    Parameters
    ----------
    module : torch.nn.Module
    X : tensor of shape (n_samples, n_features)
    name : str, default="module"
        What the message calls the module.

    Returns
    -------
    tensor
        ``module(X[:2])``.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.utils._modules import check_forward
    >>> check_forward(torch.nn.Linear(3, 2), torch.zeros(5, 3)).shape
    torch.Size([2, 2])
    >>> check_forward(torch.nn.Linear(4, 2), torch.zeros(5, 3))
    Traceback (most recent call last):
    ...
    ValueError: The module takes 4 input features but X has 3 features: ...
    """
    try:
        with torch.no_grad():
            out = module(X[:2])
    except RuntimeError as exc:
        expected = next(
            (
                m.in_features
                for m in module.modules()
                if isinstance(getattr(m, "in_features", None), int)
            ),
            None,
        )
        takes = f" takes {expected} input features" if expected is not None else ""
        raise ValueError(
            f"The {name}{takes} but X has {X.shape[1]} features: calling it on two "
            f"rows of X failed with {type(exc).__name__}: {exc}. Give a module whose "
            f"input size is {X.shape[1]}, or a module class or name, which is built "
            "with the data's sizes."
        ) from exc
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()):
        got = (
            f"a {str(out.dtype).replace('torch.', '')} tensor"
            if isinstance(out, torch.Tensor)
            else f"a {type(out).__name__}"
        )
        raise ValueError(
            f"The {name} must return a floating-point tensor of outputs; it returned "
            f"{got} on two rows of X. Return the outputs alone (e.g. the logits, not "
            "a tuple)."
        )
    return out


def skorch_parts(net):
    """Split a skorch ``NeuralNet`` into its module and criterion specifications.

    Parameters
    ----------
    net : skorch.NeuralNet
        Initialized or not. An initialized net contributes its trained
        ``module_`` as the starting point; otherwise its ``module`` and
        ``module__*`` parameters are used.

    Returns
    -------
    module : torch.nn.Module subclass or instance
    params : dict
        ``module__*`` parameters (empty for an instance).
    criterion : torch.nn.Module
        The net's criterion built with ``reduction="none"`` (per-sample losses).

    Examples
    --------
    >>> from skorch import NeuralNetClassifier
    >>> from skbilevel.utils._modules import MLP, skorch_parts
    >>> module, params, criterion = skorch_parts(
    ...     NeuralNetClassifier(MLP, module__n_features=4, module__n_outputs=2))
    >>> module.__name__, params["n_features"], type(criterion).__name__
    ('MLP', 4, 'NLLLoss')
    """
    if getattr(net, "initialized_", False):
        module, params = net.module_, {}
    else:
        module, params = net.module, net.get_params_for("module")
    crit = net.criterion
    crit_params = dict(net.get_params_for("criterion"))
    crit_params["reduction"] = "none"
    if isinstance(crit, nn.Module):
        crit = copy.deepcopy(crit)
        crit.reduction = "none"
    else:
        crit = crit(**crit_params)
    return module, params, crit


def functional_forward(module, params, *args):
    """Evaluate ``module(*args)`` with its parameters replaced by ``params``.

    ``params`` maps parameter names (as in ``module.named_parameters()``) to
    tensors, typically tensors that carry an autograd graph from an inner
    solver. Buffers are taken from the module itself. This is a call, not a
    derivative: differentiation stays in :mod:`skbilevel.hypergrad`.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.utils._modules import functional_forward
    >>> lin = torch.nn.Linear(2, 1)
    >>> p = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    >>> functional_forward(lin, p, torch.ones(3, 2)).reshape(-1)
    tensor([2., 2., 2.])
    """
    return torch.func.functional_call(module, params, args)


def load_parameters(module, params):
    """Copy ``params`` into ``module``'s parameters in place, and return the module.

    ``params`` maps parameter names (as in ``module.named_parameters()``) to
    tensors on any device and in any floating dtype, typically the fitted
    values of a functional fit; they are detached and cast to each
    parameter's device and dtype. Parameters not named keep their values.

    Examples
    --------
    >>> import torch
    >>> from skbilevel.utils._modules import load_parameters
    >>> lin = torch.nn.Linear(2, 1)
    >>> w = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    >>> load_parameters(lin, {"weight": w}).weight
    Parameter containing:
    tensor([[1., 1.]], requires_grad=True)
    """
    with torch.no_grad():
        module.load_state_dict({**module.state_dict(), **{k: v.detach() for k, v in params.items()}})
    return module
