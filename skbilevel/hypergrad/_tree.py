"""Minimal pytree helpers for the solver core.

Inner parameters θ and outer variables φ are a tensor, or a dict, tuple or
list of tensors (nested). The strategies need three operations on them:
list their leaves, rebuild a tree from leaves, and move between a tree and
one flat vector (for linear solves).
"""

import torch

__all__ = [
    "tree_flatten",
    "tree_unflatten",
    "tree_map",
    "tree_to_vector",
    "vector_to_tree",
    "tree_dot",
    "tree_detach",
]


def tree_flatten(tree):
    """Return ``(leaves, spec)`` for a tensor or nested dict/tuple/list of tensors.

    Tuples and lists keep their type (a namedtuple comes back a namedtuple)."""
    if isinstance(tree, torch.Tensor):
        return [tree], None
    if isinstance(tree, dict):
        leaves, specs = [], []
        for key in tree:
            sub, spec = tree_flatten(tree[key])
            leaves.extend(sub)
            specs.append((key, len(sub), spec))
        return leaves, ("dict", specs)
    if isinstance(tree, (tuple, list)):
        leaves, specs = [], []
        for item in tree:
            sub, spec = tree_flatten(item)
            leaves.extend(sub)
            specs.append((None, len(sub), spec))
        # the type itself: a namedtuple rebuilt as a list (its name is not
        # "tuple") lost its fields, and the inner loss failed on theta.w
        return leaves, (type(tree), specs)
    raise TypeError(
        "Expected a torch.Tensor or a dict, tuple or list of tensors, got "
        f"{type(tree).__name__}."
    )


def tree_unflatten(spec, leaves):
    """Inverse of :func:`tree_flatten`."""
    leaves = list(leaves)
    if spec is None:
        if len(leaves) != 1:
            # ("not enough values to unpack (expected 1, got 0)")
            raise ValueError(f"A single-tensor tree needs 1 leaf; got {len(leaves)}.")
        return leaves[0]
    kind, specs = spec
    out, start = [], 0
    for key, n, sub in specs:
        out.append((key, tree_unflatten(sub, leaves[start : start + n])))
        start += n
    if kind == "dict":
        return {key: value for key, value in out}
    values = [value for _, value in out]
    if hasattr(kind, "_fields"):  # a namedtuple
        return kind(*values)
    return kind(values)


def tree_map(fn, tree, *rest):
    """Apply ``fn`` leafwise to one or more trees of the same structure."""
    leaves, spec = tree_flatten(tree)
    others = [tree_flatten(t)[0] for t in rest]
    for other in others:
        if len(other) != len(leaves):
            # (zip dropped the extra leaves silently)
            raise ValueError(
                f"tree_map: the trees have {len(leaves)} and {len(other)} leaves; they "
                "must have the same structure."
            )
    return tree_unflatten(spec, [fn(*args) for args in zip(leaves, *others)])


def tree_to_vector(tree):
    """Concatenate the leaves of ``tree`` into one 1-D tensor."""
    leaves, _ = tree_flatten(tree)
    if not leaves:
        raise ValueError("tree_to_vector: the tree has no tensors.")
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


def vector_to_tree(vector, like):
    """Split a 1-D ``vector`` into a tree shaped like ``like``."""
    leaves, spec = tree_flatten(like)
    total = sum(leaf.numel() for leaf in leaves)
    if vector.ndim > 1 or vector.numel() != total:
        # (a short or 2-D vector was torch's "shape '[2, 3]' is invalid for input")
        raise ValueError(
            f"Vector of shape {tuple(vector.shape)} does not match a tree with {total} "
            f"entries; pass a 1-D tensor of length {total}."
        )
    out, start = [], 0
    for leaf in leaves:
        n = leaf.numel()
        out.append(vector[start : start + n].reshape(leaf.shape))
        start += n
    return tree_unflatten(spec, out)


def _cat_flat(tensors, like):
    """Concatenate flattened ``tensors``, with zeros (shaped like ``like``) for ``None``.

    For gradients of several leaves, some of which a loss does not use.
    """
    return torch.cat(
        [
            (torch.zeros_like(t) if x is None else x).reshape(-1)
            for x, t in zip(tensors, like)
        ]
    )


def tree_dot(a, b):
    """Sum over leaves of the elementwise product: the inner product of two trees."""
    xs, ys = tree_flatten(a)[0], tree_flatten(b)[0]
    if len(xs) != len(ys) or any(x.shape != y.shape for x, y in zip(xs, ys)):
        # (a tree with fewer leaves was zip-truncated to a partial product, silently)
        raise ValueError(
            "tree_dot: the trees must have the same structure and leaf shapes; got "
            f"{[tuple(x.shape) for x in xs]} and {[tuple(y.shape) for y in ys]}."
        )
    return sum((x * y).sum() for x, y in zip(xs, ys))


def tree_detach(tree):
    """Detached copy of every leaf (shares storage)."""
    return tree_map(lambda t: t.detach(), tree)


def _detach_graph(tree):
    """Every leaf in a graph detached, the others as they are (the same
    objects): caches keyed on the leaves, such as the logistic folds'
    curvature at an inner solution, still recognize them. (Re-created by
    :func:`tree_detach`, the solution's leaves missed that cache and its
    probabilities were computed again: make_classification 2.4% faster.)"""
    return tree_map(
        lambda t: t if t.grad_fn is None and not t.requires_grad else t.detach(), tree
    )
