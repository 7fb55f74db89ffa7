"""The per-rank pieces of a collective, as graph nodes and as eager functions.

In a lowered graph a collective is up to four nodes: `to_front` (contiguous, the collective's
dim first), the issuing `torch.ops._c10d_functional` op (gloo on CPU, NCCL on CUDA; it returns
at once), `wait` (blocks until the result is there) and `from_front`. Keeping issue and wait
apart lets the schedule passes overlap communication with compute. The eager functions below
(`all_gather`, ...) issue and wait in one call; `shard`/`unshard` use them.

A collective that fails (a peer died, hung past the process group's timeout, or runs other
code) raises `CollectiveError` naming it: kind, mesh axis, value and the model source line
(`label`, written by the insert pass).
"""
from __future__ import annotations

import contextlib
import math

import torch

from .errors import CollectiveError

_c10d = torch.ops._c10d_functional


@contextlib.contextmanager
def _named(kind: str, group_size: int, label: str):
    try:
        yield
    except RuntimeError as error:
        where = label or f"over {group_size} ranks"
        raise CollectiveError(
            f"collective {kind} {where} failed or timed out: {error}\n"
            f"A peer rank died, is stuck, or runs a different step; its own error (above or in its log) "
            f"says why. The wait is bounded by the process group timeout (`timeout_s` of experiments.train).") from error


ISSUE_OPS = {"all_gather": _c10d.all_gather_into_tensor.default, "reduce_scatter": _c10d.reduce_scatter_tensor.default,
             "all_reduce": _c10d.all_reduce.default, "all_to_all": _c10d.all_to_all_single.default}


def wait(result: torch.Tensor, keep_alive: torch.Tensor | None = None, kind: str = "collective",
         label: str = "") -> torch.Tensor:
    """Block until the collective that returns `result` is done (a failure names it: `kind`, `label`).

    `keep_alive` is the collective's input: the graph holds it until here, so it is freed at a
    known point (the in-flight work may or may not still hold it, depending on timing).
    """
    with _named(kind, 0, label or "(unlabelled)"):
        return _c10d.wait_tensor(result)


WAIT = wait


def to_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The contiguous tensor a dim-0 collective takes: `dim` moved to the front (no copy if already so)."""
    return (x.movedim(dim, 0) if dim else x).contiguous()


def from_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Undo `to_front` on a collective's result: dim 0 goes back to `dim`, contiguous."""
    return x.movedim(0, dim).contiguous() if dim else x



def all_gather(x: torch.Tensor, dim: int, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Shard(dim) -> Replicate: concatenate every rank's block along `dim`."""
    with _named("all_gather", group_size, label):
        out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(to_front(x, dim), group_size, group_name))
    return from_front(out, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Partial -> Shard(dim): sum over ranks and keep this rank's block along `dim`."""
    with _named("reduce_scatter", group_size, label):
        out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(to_front(x, dim), "sum", group_size, group_name))
    return from_front(out, dim)


def all_reduce(x: torch.Tensor, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Partial -> Replicate: sum over ranks."""
    with _named("all_reduce", group_size, label):
        return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def to_all_to_all(x: torch.Tensor, to_dim: int, group_size: int) -> torch.Tensor:
    """The flat send buffer of Shard(from) -> Shard(to): block i of `to_dim` goes to rank i."""
    return torch.cat([c.reshape(-1) for c in x.chunk(group_size, dim=to_dim)])


def from_all_to_all(received: torch.Tensor, from_dim: int, block_shape: list[int], group_size: int) -> torch.Tensor:
    """Rank i's block (of shape `block_shape`) received i-th, joined along `from_dim`."""
    return torch.cat([p.view(block_shape) for p in received.chunk(group_size)], dim=from_dim)


def local_slice(x: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    """Replicate -> Shard(dim): keep block `index` of `count` along `dim` (no communication)."""
    size = x.shape[dim] // count
    return x.narrow(dim, index * size, size).clone(memory_format=torch.contiguous_format)


def strided_slice(x: torch.Tensor, dim: int, chunks: int, index: int, count: int) -> torch.Tensor:
    """Replicate -> Strided(dim, chunks): block `index` of `count` of every one of `chunks` pieces."""
    pieces = x.unflatten(dim, (chunks, -1))
    size = pieces.shape[dim + 1] // count
    return pieces.narrow(dim + 1, index * size, size).flatten(dim, dim + 1).contiguous()


def interleave(x: torch.Tensor, dim: int, chunks: int, count: int) -> torch.Tensor:
    """After an all-gather of Strided(dim, chunks) blocks (rank after rank): piece after piece."""
    return x.unflatten(dim, (count, chunks, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2).contiguous()


def deinterleave(x: torch.Tensor, dim: int, chunks: int, count: int) -> torch.Tensor:
    """Before a reduce-scatter into Strided(dim, chunks): every rank's blocks made contiguous."""
    return x.unflatten(dim, (chunks, count, -1)).transpose(dim, dim + 1).flatten(dim, dim + 2).contiguous()


def _in_block(ids: torch.Tensor, start: int, size: int, outside: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids as positions in this rank's block [start, start + size), with `outside` for the ids
    that fall elsewhere; which ids fall inside)."""
    local = ids - start
    inside = (local >= 0) & (local < size)
    return torch.where(inside, local, torch.full_like(local, outside)), inside


def vocab_parallel_index(table: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """`table[ids]` where this rank holds rows [start, start + len(table)): other ids give zeros."""
    local, inside = _in_block(ids, start, table.shape[0])
    rows = table[local]
    return torch.where(inside.view(*ids.shape, *([1] * (table.dim() - 1))), rows, torch.zeros_like(rows))


def vocab_parallel_gather(x: torch.Tensor, dim: int, ids: torch.Tensor, start: int) -> torch.Tensor:
    """`x.gather(dim, ids)` where this rank holds [start, start + x.shape[dim]) of `dim`: other ids give zeros."""
    local, inside = _in_block(ids, start, x.shape[dim])
    picked = x.gather(dim, local)
    return torch.where(inside, picked, torch.zeros_like(picked))


def vocab_parallel_scatter(x: torch.Tensor, dim: int, ids: torch.Tensor, src, start: int) -> torch.Tensor:
    """`x.scatter(dim, ids, src)` where this rank holds [start, start + x.shape[dim]) of `dim`: other
    ids write nowhere (they land in one spare slot past the end, dropped after)."""
    size = x.shape[dim]
    local, _ = _in_block(ids, start, size, outside=size)
    spare = torch.cat([x, x.narrow(dim, 0, 1)], dim)
    return spare.scatter(dim, local, src).narrow(dim, 0, size)


def mask_partial(x: torch.Tensor, index: int) -> torch.Tensor:
    """Replicate -> Partial: the rank at `index` 0 of the axis keeps the value, the others
    contribute zeros (no communication)."""
    return x.clone() if index == 0 else torch.zeros_like(x)


def pack(xs: list[torch.Tensor], dims: list[int], group_size: int, kind: str) -> torch.Tensor:
    """The flat buffer one bucketed collective moves for several tensors of one dtype.

    all_gather / all_reduce: the members' elements one after another. reduce_scatter: rank r's
    block of every member, then rank r+1's, so that rank r receives exactly its own blocks; a 0-dim
    member is an all-reduce riding along: every rank's block holds it, so every rank gets the sum.
    """
    fronts = [to_front(x, dim) for x, dim in zip(xs, dims)]
    if kind == "reduce_scatter":
        blocks = [f.reshape(1, 1).expand(group_size, 1) if f.dim() == 0 else f.view(group_size, -1) for f in fronts]
        return torch.cat(blocks, dim=1).view(-1)
    return torch.cat([f.view(-1) for f in fronts])


def unpack(flat: torch.Tensor, shapes: list[list[int]], dims: list[int], group_size: int, kind: str) -> tuple:
    """Split a bucket's result back into its members (`shapes`: each member's result, dim first).

    reduce_scatter / all_reduce members are views of `flat` (but a scalar riding in a reduce-scatter,
    copied: the loss is read at the step's end, long after the gradients); all_gather members are
    copies, because every rank's block of one member lies apart from the next rank's in the flat result.
    """
    sizes = [math.prod(shape) for shape in shapes]
    if kind == "all_gather":
        blocks = flat.view(group_size, -1).split([size // group_size for size in sizes], dim=1)
        return tuple(from_front(block.reshape(shape), dim) if dim else block.reshape(shape)
                     for block, shape, dim in zip(blocks, shapes, dims))
    parts = [from_front(part.view(shape), dim) for part, shape, dim in zip(flat.split(sizes), shapes, dims)]
    if kind == "reduce_scatter":  # a riding scalar is copied out: its view would keep the whole bucket alive
        parts = [part.clone() if not shape else part for part, shape in zip(parts, shapes)]
    return tuple(parts)
