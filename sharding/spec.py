"""`P`, the PartitionSpec: one entry per leading tensor dim, JAX semantics."""
from __future__ import annotations


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

    Missing trailing dims are replicated. `P()` replicates the whole tensor.
    """

    def __new__(cls, *entries):
        return super().__new__(cls, tuple(_normalize(e) for e in entries))

    def __repr__(self) -> str:
        return "P(" + ", ".join(repr(e) for e in self) + ")"

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
