"""Pytrees of specs: `match` rules to leaves, and `shard` / `unshard` global <-> local trees."""
from __future__ import annotations

import re
from typing import Any, Sequence

import optree
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
import torch.utils._cxx_pytree  # noqa: F401  (insertion-ordered dicts in optree's "torch" namespace, as make_fx)

from . import collectives
from .errors import SpecError
from .layout import Strided, layout_from_spec
from .mesh import Mesh
from .spec import P

NAMESPACE = "torch"


def _is_spec(x) -> bool:
    return isinstance(x, P)


def leaf_paths(tree) -> tuple[list[str], list[Any], Any]:
    """Flatten with "a/0/b" paths; one convention (optree, namespace "torch") everywhere."""
    paths, leaves, treedef = optree.tree_flatten_with_path(tree, namespace=NAMESPACE, none_is_leaf=False)
    return ["/".join(str(k) for k in path) for path in paths], leaves, treedef


def match(tree, rules: Sequence[tuple[str, P]]):
    """A spec for every leaf: the first rule whose regex is found in the leaf path; else `P()`."""
    compiled = [(re.compile(pattern), spec if isinstance(spec, P) else P(*spec)) for pattern, spec in rules]
    paths, leaves, treedef = leaf_paths(tree)
    specs = [next((spec for regex, spec in compiled if regex.search(path)), P()) for path in paths]
    return optree.tree_unflatten(treedef, specs)


def flat_specs(specs, tree, what: str = "argument") -> list[P]:
    """One spec per leaf of `tree`: `specs` is a P for every leaf, or a tree (prefix) of P's."""
    if _is_spec(specs):
        return [specs] * len(leaf_paths(tree)[1])
    if specs is None:
        return [P()] * len(leaf_paths(tree)[1])
    try:
        broadcast = optree.tree_broadcast_prefix(specs, tree, is_leaf=_is_spec, namespace=NAMESPACE)
    except ValueError as error:
        spec_paths = leaf_paths_of_specs(specs)
        tree_paths = leaf_paths(tree)[0]
        missing = sorted(set(tree_paths) - set(spec_paths))[:5]
        extra = sorted(set(spec_paths) - set(tree_paths))[:5]
        raise SpecError(f"{what}: the spec tree does not match the value tree "
                        f"(leaves without a spec: {missing}; specs without a leaf: {extra}); {error}") from None
    return optree.tree_leaves(broadcast, is_leaf=_is_spec, namespace=NAMESPACE)


def leaf_paths_of_specs(specs) -> list[str]:
    paths, _, _ = optree.tree_flatten_with_path(specs, is_leaf=_is_spec, namespace=NAMESPACE)
    return ["/".join(str(k) for k in path) for path in paths]


def shard(tree, specs, mesh: Mesh):
    """This rank's slice of every global tensor in `tree`; for a value on another pipeline stage
    (`P(..., stage=...)`), a meta tensor of the slice's shape (no storage)."""
    paths, leaves, treedef = leaf_paths(tree)
    out = []
    for path, leaf, spec in zip(paths, leaves, flat_specs(specs, tree, "shard")):
        layout = layout_from_spec(spec, leaf.shape, mesh.axis_names, mesh.axis_sizes, where=path or "value")
        # Outer axes first: each splits the block the axes before it left.
        for axis_index, placement in enumerate(layout.placements):
            size, index = mesh.axis_sizes[axis_index], mesh.coordinate[axis_index]
            if isinstance(placement, Strided):
                leaf = collectives.strided_slice(leaf, placement.dim, placement.chunks, index, size)
            elif isinstance(placement, int):
                leaf = collectives.local_slice(leaf, placement, index, size)
        if not holds(spec, mesh):
            leaf = torch.empty(leaf.shape, dtype=leaf.dtype, device="meta")
        out.append(leaf)
    return optree.tree_unflatten(treedef, out)


def holds(spec: P, mesh: Mesh) -> bool:
    """Whether this rank holds a value of `spec`: every rank does, but for a value on a pipeline
    stage, only that stage's ranks."""
    stage = getattr(spec, "stage", None)
    if stage is None:
        return True
    if stage.axis not in mesh.axis_names:
        raise SpecError(f"{spec!r} is on a stage of axis {stage.axis!r}, which is not a mesh axis {mesh.axis_names}")
    axis = mesh.axis_index(stage.axis)
    return mesh.coordinate[axis] == stage.rank(mesh.axis_sizes[axis])


def _from_stage(leaf: torch.Tensor, shape, spec: P, mesh: Mesh) -> torch.Tensor:
    """A value of one pipeline stage on every rank: its rank broadcasts it along the pipeline axis."""
    axis = mesh.axis_index(spec.stage.axis)
    group = _resolve_process_group(mesh.group_name(axis))
    owner = dist.get_global_rank(group, spec.stage.rank(mesh.axis_sizes[axis]))
    if leaf.device.type == "meta":
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        leaf = torch.empty(shape, dtype=leaf.dtype, device=device)
    leaf = leaf.contiguous()
    dist.broadcast(leaf, owner, group=group)
    return leaf


def unshard(tree, specs, mesh: Mesh):
    """The global tensors, on every rank, from each rank's local slices."""
    paths, leaves, treedef = leaf_paths(tree)
    out = []
    for path, leaf, spec in zip(paths, leaves, flat_specs(specs, tree, "unshard")):
        layout = layout_from_spec(spec, mesh.global_shape(leaf.shape, spec), mesh.axis_names, mesh.axis_sizes, where=path or "value")
        if not holds(spec, mesh):  # another stage's value: only its shape here, then its owner's bytes
            out.append(_from_stage(leaf, mesh.global_shape(leaf.shape, spec), spec, mesh))
            continue
        # Gather inner axes first so nested blocks reassemble in mesh order.
        for axis_index in reversed(range(len(mesh.axis_names))):
            placement = layout.placements[axis_index]
            if isinstance(placement, int):
                leaf = collectives.all_gather(leaf, placement, mesh.axis_sizes[axis_index],
                                              mesh.group_name(axis_index))
            elif isinstance(placement, Strided):
                size = mesh.axis_sizes[axis_index]
                leaf = collectives.interleave(collectives.all_gather(leaf, placement.dim, size,
                                                                     mesh.group_name(axis_index)),
                                              placement.dim, placement.chunks, size)
        if getattr(spec, "stage", None) is not None:
            leaf = _from_stage(leaf, leaf.shape, spec, mesh)
        out.append(leaf)
    return optree.tree_unflatten(treedef, out)
