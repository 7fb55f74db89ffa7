"""`Layout`: how one global tensor lies on the mesh, one placement per mesh axis.

A placement is one of the typed values below: `Replicate()`, `Partial("sum" | "max" | "min")`
(each rank holds a summand, or a candidate of a max/min), `Shard(dim)` (the tensor is split into
equal contiguous blocks along that dim) or `Strided(dim, chunks)` (the dim is `chunks` equal
pieces and each is split: a fused q/k/v weight whose every rank holds its q, k and v columns).
Several axes may shard one dim; each splits the block the axes before it in mesh order left
(outer axis first), as `P(("dp", "tp"))` does. A spec may list them in the other order
(`P(("tp", "dp"))`: tp's block split over dp); the mesh-earlier axis is then `Strided` over the
later one's blocks (`_nest_out_of_mesh_order`), which every rank's local tensor sees as a plain
innermost split (`nested_as_plain`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from .errors import SpecError
from .spec import P, chunked


class Shard(int):
    """Equal contiguous blocks along tensor dim `dim`. An `int` too, so dims compare and index as
    numbers (`Shard(1) == 1`); every placement in a `Layout` is typed."""

    def __new__(cls, dim: int):
        return super().__new__(cls, dim)

    @property
    def dim(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"Shard({int(self)})"

    __str__ = __repr__


@dataclass(frozen=True)
class Replicate:
    """Every rank holds the whole tensor."""

    def __repr__(self) -> str:
        return "Replicate()"


REDUCE_OPS = ("sum", "max", "min")


@dataclass(frozen=True)
class Partial:
    """Every rank holds a part that `op` over the axis combines: a summand ("sum") or a candidate
    ("max", "min": a max over a split dim, as the max logit of a vocab-parallel softmax)."""

    op: str = "sum"

    def __post_init__(self):
        if self.op not in REDUCE_OPS:
            raise ValueError(f"Partial op must be one of {REDUCE_OPS}, got {self.op!r}")

    def __repr__(self) -> str:
        return f"Partial({self.op!r})"


REPLICATE = Replicate()
PARTIAL = Partial("sum")    # the Partial of sums: linear ops keep it (rules compare against it)
PARTIAL_MAX = Partial("max")
PARTIAL_MIN = Partial("min")


def is_partial(placement) -> bool:
    """Any Partial (sum, max or min); `placement == PARTIAL` is the sum only."""
    return isinstance(placement, Partial)


def typed(placement):
    """A placement as its typed value (a bare dim `int` from a rule becomes `Shard`)."""
    if isinstance(placement, bool):
        raise TypeError(f"not a placement: {placement!r}")
    if isinstance(placement, int) and not isinstance(placement, Shard):
        return Shard(placement)
    if isinstance(placement, (Shard, Replicate, Partial, Strided)):
        return placement
    raise TypeError(f"not a placement: {placement!r} (expected Shard, Replicate, Partial or Strided)")


@dataclass(frozen=True)
class Strided:
    """Shard(dim) of each of `chunks` equal pieces of the dim (DTensor's `_StridedShard` analogue)."""

    dim: int
    chunks: int


def is_shard(placement) -> bool:
    """A plain (contiguous) split along a dim."""
    return isinstance(placement, int) and not isinstance(placement, bool)


def split_dim(placement):
    """The dim a plain or strided split cuts, else None."""
    if isinstance(placement, Strided):
        return placement.dim
    return int(placement) if is_shard(placement) else None


def describe(placement) -> str:
    if isinstance(placement, Strided):
        return f"Shard({placement.dim}, chunks={placement.chunks})"
    if isinstance(placement, Partial):
        return f"Partial({placement.op})"
    return "Replicate" if placement == REPLICATE else f"Shard({int(placement)})"


@dataclass(frozen=True)
class Layout:
    """Placements in mesh-axis order; hashable so redistributions can be cached."""

    placements: tuple

    def __post_init__(self):
        object.__setattr__(self, "placements", tuple(typed(p) for p in self.placements))

    @staticmethod
    def replicated(num_axes: int) -> "Layout":
        return Layout((REPLICATE,) * num_axes)

    def with_axis(self, axis_index: int, placement) -> "Layout":
        placements = list(self.placements)
        placements[axis_index] = placement
        return Layout(tuple(placements))

    def shard_count(self, dim: int, axis_sizes: Sequence[int]) -> int:
        """How many blocks tensor dim `dim` is cut into."""
        count = 1
        for placement, size in zip(self.placements, axis_sizes):
            if split_dim(placement) == dim:
                count *= size
        return count

    def has_strided(self) -> bool:
        return any(isinstance(p, Strided) for p in self.placements)

    def local_shape(self, global_shape: Sequence[int], axis_sizes: Sequence[int]) -> list[int]:
        return [size // self.shard_count(dim, axis_sizes) for dim, size in enumerate(global_shape)]

    def has_partial(self) -> bool:
        return any(isinstance(p, Partial) for p in self.placements)

    def to_spec(self, ndim: int, axis_names: Sequence[str], axis_sizes: Sequence[int] | None = None) -> P:
        entries = []
        for dim in range(ndim):
            axes = tuple(chunked(name, pl.chunks) if isinstance(pl, Strided) else name
                         for name, pl in zip(axis_names, self.placements) if split_dim(pl) == dim)
            nested = next((a for a, pl in enumerate(self.placements) if split_dim(pl) == dim and axis_sizes
                           and nested_as_plain(self.placements, a, axis_sizes) is not None), None)
            if nested is not None:  # an out-of-mesh-order nesting: the nested axis is listed last
                inner = axis_names[nested]
                axes = tuple(a for a in axes if a != inner) + (inner,)
            entries.append(axes if axes else None)
        while entries and entries[-1] is None:
            entries.pop()
        return P(*entries)

    def pretty(self, axis_names: Sequence[str]) -> str:
        return ", ".join(f"{name}:{describe(pl)}" for name, pl in zip(axis_names, self.placements))


def layout_from_spec(spec: P, shape: Sequence[int], axis_names: Sequence[str], axis_sizes: Sequence[int],
                     where: str = "tensor") -> Layout:
    """Validate `spec` against a global `shape` and the mesh, and convert it to a `Layout`.

    `where` names the leaf (its path) in every error message.
    """
    if not isinstance(spec, P):
        raise SpecError(f"{where}: expected a P(...) PartitionSpec, got {spec!r}")
    if len(spec) > len(shape):
        raise SpecError(f"{where}: spec {spec} has {len(spec)} entries but the tensor has only "
                        f"{len(shape)} dims (shape {tuple(shape)})")
    placements = [REPLICATE] * len(axis_names)
    seen: set[str] = set()
    for dim in range(len(spec)):
        axes = spec.axes_of(dim)
        axes = tuple(_resolve_striped(axis, axes, shape[dim], axis_names, axis_sizes, spec, where) for axis in axes)
        positions = []
        for axis in axes:
            if axis not in axis_names:
                raise SpecError(f"{where}: spec {spec} names mesh axis {axis!r}, which the mesh does not "
                                f"have (mesh axes: {tuple(axis_names)})")
            if axis in seen:
                raise SpecError(f"{where}: spec {spec} uses mesh axis {axis!r} twice; an axis can shard "
                                f"at most one dim")
            seen.add(axis)
            positions.append(axis_names.index(axis))
            chunks = getattr(axis, "chunks", 1)
            if axis_sizes[axis_names.index(axis)] > 1:  # a size-1 axis splits nothing
                placements[axis_names.index(axis)] = Strided(dim, chunks) if chunks > 1 else dim
        if positions != sorted(positions):
            if any(getattr(axis, "chunks", 1) > 1 for axis in axes):
                raise SpecError(f"{where}: spec {spec} lists axes {axes} for dim {dim} out of mesh order "
                                f"{tuple(axis_names)} and chunks one of them; a chunked axis is listed "
                                f"in mesh order")
            _nest_out_of_mesh_order(placements, dim, axes, axis_names, axis_sizes)
        count = 1
        for axis in axes:
            count *= axis_sizes[axis_names.index(axis)] * getattr(axis, "chunks", 1)
        if shape[dim] % count:
            raise SpecError(f"{where}: dim {dim} has size {shape[dim]}, not divisible by {count} "
                            f"(mesh axes {axes} of sizes "
                            f"{tuple(axis_sizes[axis_names.index(a)] for a in axes)}); spec {spec}, "
                            f"shape {tuple(shape)}")
    return Layout(tuple(placements))


def _resolve_striped(axis, axes, size: int, axis_names, axis_sizes, spec, where: str):
    """A `striped` axis as the `chunked` one it is on a dim of this size (one element per rank per piece)."""
    if getattr(axis, "chunks", 1) != 0:
        return axis
    if len(axes) != 1:
        raise SpecError(f"{where}: spec {spec} stripes a dim over {axes}; a striped dim has one mesh axis")
    if axis not in axis_names:
        return axis  # reported by the caller with the mesh's axes
    count = axis_sizes[axis_names.index(axis)]
    if size % count:
        raise SpecError(f"{where}: dim of size {size} cannot be striped over mesh axis {str(axis)!r} of size "
                        f"{count}; spec {spec}")
    return chunked(str(axis), size // count) if size // count > 1 else str(axis)


def _nest_out_of_mesh_order(placements: list, dim: int, axes, axis_names, axis_sizes) -> None:
    """Axes listed for one dim outer first but not in mesh order (`P(("tp", "dp"))` on a
    `("dp", "tp")` mesh: tp's block, split over dp, as FSDP over TP keeps a bias). Placements
    apply in mesh order, so an axis listed after an axis that comes later in the mesh splits each
    of that axis's blocks: `Strided(dim, chunks)`, chunks the product of their sizes."""
    for position, axis in enumerate(axes):
        index = axis_names.index(axis)
        chunks = math.prod(axis_sizes[axis_names.index(a)] for a in axes[:position] if axis_names.index(a) > index)
        if axis_sizes[index] > 1 and chunks > 1:
            placements[index] = Strided(dim, chunks)


def nested_as_plain(placements: Sequence, axis: int, axis_sizes: Sequence[int]):
    """`Shard(dim)` when axis `axis`'s `Strided(dim, chunks)` is an out-of-mesh-order nesting
    (no earlier axis splits the dim, the later ones split it plainly into `chunks` blocks): on
    every rank's local tensor it is then a plain innermost split, gathered, sliced and
    reduce-scattered as one. None otherwise."""
    placement = placements[axis]
    if not isinstance(placement, Strided) or any(split_dim(p) == placement.dim for p in placements[:axis]):
        return None
    inner = [b for b in range(axis + 1, len(placements)) if split_dim(placements[b]) == placement.dim]
    if not inner or any(not is_shard(placements[b]) for b in inner) or \
            math.prod(axis_sizes[b] for b in inner) != placement.chunks:
        return None
    return Shard(placement.dim)


ANNOTATION = "fp"  # the node.meta key of a node's `Annotation`


@dataclass
class Annotation:
    """What propagation decided for one graph node, the one typed record later stages read:
    `layout` (a `Layout`, or one per output of a multi-output op), `requires` (input node -> the
    layout it is redistributed to before this node reads it) and `local` (mesh axis -> a local
    computation that differs from the global op there: "vocab_parallel")."""

    layout: object
    requires: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)


def annotate(node, layout, requires=None, local=None) -> Annotation:
    node.meta[ANNOTATION] = Annotation(layout, dict(requires or {}), dict(local or {}))
    return node.meta[ANNOTATION]


def annotation(node) -> Annotation | None:
    return node.meta.get(ANNOTATION)


def layout_of(node):
    """The node's layout (None for a node propagation did not place)."""
    found = node.meta.get(ANNOTATION)
    return found.layout if found is not None else None
