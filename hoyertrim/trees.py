"""Paths and leaves of parameter pytrees, alike for linen params, NNX ``State`` and plain trees.

A linen kernel's path is ``('dense0', 'kernel')``; the same kernel in an ``nnx.State`` is
``('dense0', 'kernel', .value)`` — NNX stores each parameter in a variable whose array sits
behind a ``value`` attribute. Every rule that reads a leaf's name goes through `path_keys`, which
drops that attribute, so a rule selects the same leaves in either kind of tree. Depends on
nothing else in hoyertrim.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

__all__ = ["layer_name", "leaf_name", "path_keys", "path_string", "replace_leaves"]


def path_keys(path: tuple) -> tuple[str, ...]:
    """The names along a pytree path, without NNX's trailing ``.value`` attribute."""
    keys = []
    for entry in path:
        if isinstance(entry, jax.tree_util.GetAttrKey) and entry.name == "value":
            continue  # the array inside an nnx.Variable
        key = getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))
        keys.append(str(key))
    return tuple(keys)


def leaf_name(path: tuple) -> str | None:
    """The leaf's own name: ``'kernel'`` for ``('dense0', 'kernel')`` (None for a bare leaf)."""
    keys = path_keys(path)
    return keys[-1] if keys else None


def path_string(path: tuple) -> str:
    """``'block0/attn/query/kernel'``: the whole path, '/'-joined."""
    return "/".join(path_keys(path))


def layer_name(path: tuple) -> str:
    """The name of the layer a leaf belongs to: its module's path for a leaf named ``kernel`` or
    ``bias`` (``'dense0/kernel'`` → ``'dense0'``); otherwise the leaf's own path (a plain
    function's ``{'w1': ...}`` → ``'w1'``), so that two weights of one module never share a name."""
    keys = path_keys(path)
    if len(keys) > 1 and keys[-1] in ("kernel", "bias"):
        return "/".join(keys[:-1])
    return "/".join(keys)


def replace_leaves(tree: Any, new: Mapping[int, Any]) -> Any:
    """``tree`` with its leaves at flat indices ``new`` (as in ``jax.tree.leaves``) replaced,
    functionally; the tree's own types (dict, FrozenDict, nnx.State) come back."""
    leaves, structure = jax.tree.flatten(tree)
    for index, value in new.items():
        leaves[index] = value
    return jax.tree.unflatten(structure, leaves)
