"""The per-rank functions the inserted graph nodes call: one collective or local slice each.

They wrap `torch.ops._c10d_functional` (gloo on CPU, NCCL on CUDA). Those ops work on dim 0,
so a collective on another dim moves it to the front and back; results are contiguous because
the traced ops after them (views) were recorded on contiguous tensors.

A collective that fails (a peer died, hung past the process group's timeout, or runs other
code) raises `CollectiveError` naming it: kind, mesh axis, value and the model source line
(`label`, written by the insert pass).
"""
from __future__ import annotations

import contextlib

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


def _to_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    return (x.movedim(dim, 0) if dim else x).contiguous()


def _from_front(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.movedim(0, dim).contiguous() if dim else x


def all_gather(x: torch.Tensor, dim: int, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Shard(dim) -> Replicate: concatenate every rank's block along `dim`."""
    with _named("all_gather", group_size, label):
        out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(_to_front(x, dim), group_size, group_name))
    return _from_front(out, dim)


def reduce_scatter(x: torch.Tensor, dim: int, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Partial -> Shard(dim): sum over ranks and keep this rank's block along `dim`."""
    with _named("reduce_scatter", group_size, label):
        out = _c10d.wait_tensor(_c10d.reduce_scatter_tensor(_to_front(x, dim), "sum", group_size, group_name))
    return _from_front(out, dim)


def all_reduce(x: torch.Tensor, group_size: int, group_name: str, label: str = "") -> torch.Tensor:
    """Partial -> Replicate: sum over ranks."""
    with _named("all_reduce", group_size, label):
        return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def all_to_all(x: torch.Tensor, from_dim: int, to_dim: int, group_size: int, group_name: str,
               label: str = "") -> torch.Tensor:
    """Shard(from_dim) -> Shard(to_dim) in one exchange: split `to_dim`, send block i to rank i."""
    chunks = [c.contiguous() for c in x.chunk(group_size, dim=to_dim)]
    send = torch.cat([c.reshape(-1) for c in chunks])
    with _named("all_to_all", group_size, label):
        received = _c10d.wait_tensor(_c10d.all_to_all_single(send, None, None, group_name))
    parts = received.chunk(group_size)
    return torch.cat([p.view(chunks[0].shape) for p in parts], dim=from_dim)


def local_slice(x: torch.Tensor, dim: int, index: int, count: int) -> torch.Tensor:
    """Replicate -> Shard(dim): keep block `index` of `count` along `dim` (no communication)."""
    size = x.shape[dim] // count
    return x.narrow(dim, index * size, size).clone(memory_format=torch.contiguous_format)


def mask_partial(x: torch.Tensor, keep: bool) -> torch.Tensor:
    """Replicate -> Partial: one rank keeps the value, the others contribute zeros (no communication)."""
    return x.clone() if keep else torch.zeros_like(x)
