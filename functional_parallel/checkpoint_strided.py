"""Chunked splits in checkpoints: a leaf split with `Strided` (a packed q|k|v's `chunked("tp", 3)`, a
tp block split again over dp) holds, on a rank, pieces that are not one contiguous block of the
global tensor, which DCP cannot store. Such a leaf is saved in its *stored* layout, the same spec
without the strided axis: each rank gathers the leaf over that axis (one leaf at a time, only at
save) and reorders; loading reads the stored layout and keeps this rank's pieces (no communication).
The file holds the global tensor either way, so it loads under any strategy.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sharding import Mesh, P
from sharding.bind import rank_index
from sharding.layout import Strided, layout_from_spec
from sharding.tree import shard


class StridedCheckpointError(ValueError):
    """A leaf with more than one strided axis (not needed by any strategy here)."""


def strided_axis(spec: P, shape, mesh: Mesh, key: str) -> tuple[str, int] | None:
    """(the strided mesh axis, the dim it splits) of a leaf, or None when its layout has no Strided."""
    layout = layout_from_spec(spec, shape, mesh.axis_names, mesh.axis_sizes, where=key)
    strided = [(mesh.axis_names[i], p.dim) for i, p in enumerate(layout.placements) if isinstance(p, Strided)]
    if len(strided) > 1:
        raise StridedCheckpointError(f"{key}: {spec} splits chunked over {[a for a, _ in strided]}; a checkpoint "
                                     f"stores a leaf with one chunked axis at most")
    return strided[0] if strided else None


def stored_spec(spec: P, axis: str, dim: int) -> P:
    """`spec` without `axis` on `dim` (the layout a chunked leaf is stored in)."""
    entries = list(spec)
    kept = tuple(str(a) for a in spec.axes_of(dim) if a != axis)
    entries[dim] = kept if len(kept) > 1 else (kept[0] if kept else None)
    return P(*entries)


def _indices(spec: P, dim: int, size: int, mesh: Mesh, rank: int) -> torch.Tensor:
    """The global indices along `dim` that `rank` holds under `spec` (placements on other dims do not move them)."""
    return shard(torch.arange(size), P(spec[dim] if dim < len(spec) else None),
                 Mesh.abstract(mesh.shape(), rank=rank))


def _positions(of: torch.Tensor, within: torch.Tensor, size: int) -> torch.Tensor:
    lookup = torch.full((size,), -1, dtype=torch.long)
    lookup[within] = torch.arange(len(within))
    return lookup[of]


def _group_ranks(mesh: Mesh, axis: str) -> list[int]:
    """The global ranks of this rank's peers along `axis`, in coordinate order."""
    index, every_axis = mesh.axis_index(axis), tuple(range(len(mesh.axis_sizes)))
    return [rank_index(every_axis, (*mesh.coordinate[:index], position, *mesh.coordinate[index + 1:]),
                       mesh.axis_sizes) for position in range(mesh.axis_sizes[index])]


def to_stored(local: torch.Tensor, spec: P, shape, mesh: Mesh, axis: str, dim: int) -> torch.Tensor:
    """This rank's block of the leaf in its stored layout: gathered over `axis`, reordered."""
    peers = _group_ranks(mesh, axis)
    parts = [torch.empty_like(local) for _ in peers]
    dist.all_gather(parts, local.contiguous(), group=mesh.device_mesh().get_group(axis))
    gathered = torch.cat(parts, dim=dim)
    held = torch.cat([_indices(spec, dim, shape[dim], mesh, r) for r in peers])
    wanted = _indices(stored_spec(spec, axis, dim), dim, shape[dim], mesh, mesh.rank)
    return gathered.index_select(dim, _positions(wanted, held, shape[dim])).contiguous()


def from_stored(stored: torch.Tensor, spec: P, shape, mesh: Mesh, axis: str, dim: int) -> torch.Tensor:
    """This rank's pieces under `spec`, kept from its block in the stored layout (no communication)."""
    held = _indices(stored_spec(spec, axis, dim), dim, shape[dim], mesh, mesh.rank)
    mine = _indices(spec, dim, shape[dim], mesh, mesh.rank)
    return stored.index_select(dim, _positions(mine, held, shape[dim])).contiguous()
