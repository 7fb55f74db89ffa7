"""Point-to-point transfers between pipeline stages, as graph nodes and as the functions they call.

A value made on one stage and read on another is sent once per reading rank: `send` starts an
`isend` on the sender right after the value exists, `recv` receives it on the reader just before
its first use, and `wait_sends` (the sender's last node) waits for every send, holding the sent
tensors until then so their memory is freed at a known point. Each transfer has its own tag, so
two values between the same two ranks never meet the wrong receive. On fake tensors (the memory
and cost walks) only shapes flow.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed.distributed_c10d import _resolve_process_group

from . import timeline


def _peer(group_name: str, coordinate: int) -> tuple:
    group = _resolve_process_group(group_name)
    return group, dist.get_global_rank(group, coordinate)


def send(value: torch.Tensor, to: int, tag: int, group_name: str):
    """Start sending `value` to the rank at coordinate `to` of the pipeline axis group."""
    if isinstance(value, FakeTensor):
        return None
    group, peer = _peer(group_name, to)
    return dist.isend(value.contiguous(), peer, group=group, tag=tag)


def recv(shape: tuple, dtype: torch.dtype, device: torch.device, source: int, tag: int,
         group_name: str) -> torch.Tensor:
    """The value the rank at coordinate `source` sends with `tag` (blocks until it is here)."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if isinstance(buffer, FakeTensor):
        return buffer
    group, peer = _peer(group_name, source)
    started = time.perf_counter()
    dist.recv(buffer, peer, group=group, tag=tag)
    timeline.waited(started)
    return buffer


def wait_sends(requests: list, sent: list) -> None:
    """Wait for every send this rank started (`sent`: the tensors, alive until here)."""
    for request in requests:
        if request is not None:
            request.wait()


# Kept by dead-code elimination although nothing reads their results.
fx.node._side_effectful_functions.update({send, wait_sends})
