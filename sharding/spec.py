"""`P`, the PartitionSpec: one entry per leading tensor dim, JAX semantics; and a pipeline `Stage`."""
from __future__ import annotations

from typing import NamedTuple


class Stage(NamedTuple):
    """A value that lives on one pipeline stage: model stage `index` of the mesh axis `axis`.

    With `v` virtual stages per rank (`sharding.Pipeline(virtual=v)`) there are `v * size(axis)`
    model stages; stage k lives on the rank whose coordinate on `axis` is `k % size(axis)`. Other
    ranks hold no data for it: `shard` gives them a meta tensor (shape and dtype, no storage).
    """

    axis: str
    index: int

    def rank(self, axis_size: int) -> int:
        """The coordinate on `axis` of the rank that holds this stage."""
        return self.index % axis_size


class chunked(str):
    """A mesh axis that splits each of `chunks` equal pieces of a dim: `P(None, chunked("tp", 3))`
    splits a fused [d, 3d] q/k/v weight so every tp rank holds its q, k and v columns."""

    def __new__(cls, axis: str, chunks: int):
        if not isinstance(chunks, int) or chunks < 1:
            raise TypeError(f"chunked({axis!r}, ...) needs a positive int count of chunks, got {chunks!r}")
        value = super().__new__(cls, axis)
        value.chunks = chunks
        return value

    def __repr__(self) -> str:
        return f"chunked({str(self)!r}, {self.chunks})"

    # Equal to (and hashed as) its axis name, so mesh-axis lookups treat it as that axis.


class striped(chunked):
    """A mesh axis that deals a dim out element by element: rank r of n holds elements r, r + n,
    r + 2n, ... (`chunked` with one element per rank in each piece; the count of pieces follows
    from the dim's size). Striped attention's sequence layout: under a causal mask every rank of a
    ring then does the same work."""

    def __new__(cls, axis: str):
        value = str.__new__(cls, axis)
        value.chunks = 0  # resolved from the dim's size by `layout_from_spec`
        return value

    def __repr__(self) -> str:
        return f"striped({str(self)!r})"


class P(tuple):
    """PartitionSpec. Each entry is `None`, a mesh axis name, or a tuple of axis names.

    Missing trailing dims are replicated. `P()` replicates the whole tensor. `stage` (a `Stage`
    or an `(axis, index)` pair) places the value on one pipeline stage: its dims are split as the
    entries say among the ranks of that stage, and the other stages do not hold it.
    """

    def __new__(cls, *entries, stage=None):
        value = super().__new__(cls, tuple(_normalize(e) for e in entries))
        value.stage = _stage(stage)
        return value

    def __repr__(self) -> str:
        staged = [f"stage={self.stage!r}"] if self.stage is not None else []
        return "P(" + ", ".join([repr(e) for e in self] + staged) + ")"

    def __eq__(self, other) -> bool:
        if not isinstance(other, tuple):
            return NotImplemented
        return tuple.__eq__(self, other) and getattr(other, "stage", None) == self.stage

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((tuple(self), self.stage))

    def __reduce__(self):
        return _rebuild, (tuple(self), self.stage)

    def on_stage(self, stage) -> "P":
        """This spec placed on pipeline `stage` (None: on every stage)."""
        return P(*self, stage=stage)

    def axes_of(self, dim: int) -> tuple[str, ...]:
        """Mesh axes that shard tensor dim `dim` (empty when replicated)."""
        if dim >= len(self) or self[dim] is None:
            return ()
        entry = self[dim]
        return entry if isinstance(entry, tuple) else (entry,)

    def all_axes(self) -> list[str]:
        """Every axis named by this spec, in order of appearance (duplicates kept)."""
        return [axis for dim in range(len(self)) for axis in self.axes_of(dim)]


def _normalize(entry):
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, (tuple, list)):
        entry = tuple(entry)
        if not all(isinstance(a, str) for a in entry):
            raise TypeError(f"P entries must be None, an axis name or a tuple of axis names; got {entry!r}")
        if len(entry) == 0:
            return None
        return entry[0] if len(entry) == 1 else entry
    raise TypeError(f"P entries must be None, an axis name or a tuple of axis names; got {entry!r}")


def _rebuild(entries: tuple, stage) -> P:
    return P(*entries, stage=stage)


def _stage(stage) -> Stage | None:
    if stage is None or isinstance(stage, Stage):
        return stage
    if isinstance(stage, (tuple, list)) and len(stage) == 2 and isinstance(stage[0], str) \
            and isinstance(stage[1], int) and stage[1] >= 0:
        return Stage(stage[0], stage[1])
    raise TypeError(f"P(stage=...) takes a Stage or an (axis, index >= 0) pair, got {stage!r}")
