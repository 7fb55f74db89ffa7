"""A model's logical parameter axes from a table keyed by a leaf's own name (its last path key)."""
from __future__ import annotations

from typing import Mapping

from functional_parallel.tree import tree_unflatten
from sharding.tree import leaf_paths


def by_leaf_name(params, table: Mapping[str, tuple]):
    """The params tree with each leaf replaced by `table[<its last path key>]` (one name per dim)."""
    paths, leaves, treedef = leaf_paths(params)
    axes = []
    for path, leaf in zip(paths, leaves):
        names = table.get(path.rsplit("/", 1)[-1])
        if names is None or len(names) != leaf.dim():
            raise KeyError(f"no logical axes for the {leaf.dim()}-dim parameter {path!r} (table: {names})")
        axes.append(names)
    return tree_unflatten(treedef, axes)
