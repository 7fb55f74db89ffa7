"""The project's one pytree convention: optree in the "torch" namespace, dicts in insertion order.

Importing `torch.utils._cxx_pytree` permanently switches optree's "torch" namespace to
insertion-ordered dicts (torch does this globally on import, and e.g. `torch.optim` triggers
it). Left to chance, `tree_leaves` would return sorted-key order before that import and
insertion order after it. We import it here, first, so the order is always insertion order:
the same order as `torch.utils._pytree`, `torch.func` and `make_fx`.
"""
from __future__ import annotations

from typing import Any, Callable

import optree
import torch.utils._cxx_pytree  # noqa: F401  (side effect: insertion-ordered dicts in namespace "torch")

NAMESPACE = "torch"
Tree = Any


def tree_map(fn: Callable, tree: Tree, *rest: Tree) -> Tree:
    return optree.tree_map(fn, tree, *rest, namespace=NAMESPACE)


def tree_leaves(tree: Tree) -> list:
    return optree.tree_leaves(tree, namespace=NAMESPACE)


def tree_flatten(tree: Tree) -> tuple[list, optree.PyTreeSpec]:
    return optree.tree_flatten(tree, namespace=NAMESPACE)


def tree_unflatten(spec: optree.PyTreeSpec, leaves: list) -> Tree:
    return optree.tree_unflatten(spec, leaves)


def leaf_paths(tree: Tree) -> list[str]:
    """"/"-joined key paths of the leaves, in leaf order, e.g. "blocks/0/attn/wq"."""
    paths = optree.tree_paths(tree, namespace=NAMESPACE)
    return ["/".join(str(key) for key in path) for path in paths]
