"""Measured collective traffic and memory for any step, ours or torch's (DDP, FSDP2).

`CollectiveCounter` is a `TorchDispatchMode` that sees every collective op dispatched while
it is active: the functional ones our compiled graph calls (`_c10d_functional.*`) and the
c10d ops that DDP's reducer and FSDP2 call (`c10d.allreduce_`, `c10d._allgather_base_`, ...).
Bytes follow the compiler's log (`lower().cost["bytes_by_kind"]`): an all-gather counts its
gathered output, a reduce-scatter its full input, an all-reduce its tensor.

`LocalMemoryTracker` is `sharding.memory.MemoryTracker` that also counts the local shard of
a DTensor (FSDP2's parameters, gradients and optimizer state are DTensors).
"""
from __future__ import annotations

from collections import Counter

import optree
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from sharding.memory import DEVICE, MemoryTracker

# op name (without namespace and trailing "_") -> (kind, which tensors count: "in" or "out")
KINDS = {
    "all_reduce": ("all_reduce", "in"), "allreduce": ("all_reduce", "in"),
    "all_reduce_coalesced": ("all_reduce", "in"), "allreduce_coalesced": ("all_reduce", "in"),
    "all_gather_into_tensor": ("all_gather", "out"), "_allgather_base": ("all_gather", "out"),
    "allgather": ("all_gather", "out"), "allgather_into_tensor_coalesced": ("all_gather", "out"),
    "all_gather_into_tensor_coalesced": ("all_gather", "out"),
    "reduce_scatter_tensor": ("reduce_scatter", "in"), "_reduce_scatter_base": ("reduce_scatter", "in"),
    "reduce_scatter": ("reduce_scatter", "in"), "reduce_scatter_tensor_coalesced": ("reduce_scatter", "in"),
    "all_to_all_single": ("all_to_all", "in"), "alltoall_base": ("all_to_all", "in"),
    "broadcast": ("broadcast", "in"),
}
NAMESPACES = ("c10d", "_c10d_functional")


def _tensor_bytes(tree) -> int:
    leaves = optree.tree_leaves(tree, none_is_leaf=False, namespace="torch")
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class CollectiveCounter(TorchDispatchMode):
    """`with CollectiveCounter() as traffic: step()` then `traffic.bytes_by_kind`, `traffic.count_by_kind`."""

    def __init__(self):
        super().__init__()
        self.bytes_by_kind: Counter = Counter()
        self.count_by_kind: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace in NAMESPACES:
            name = func._schema.name.split("::")[-1]
            kind, side = KINDS.get(name.rstrip("_"), KINDS.get(name, (None, None)))
            if kind is not None:
                # c10d ops take (output, input) lists first; functional ops take the input and return the output
                if func.namespace == "c10d":
                    tensors = args[0] if side == "out" or kind == "all_reduce" or kind == "broadcast" else args[1]
                else:
                    tensors = out if side == "out" else args[0]
                self.bytes_by_kind[kind] += _tensor_bytes(tensors)
                self.count_by_kind[kind] += 1
        return out


class LocalMemoryTracker(MemoryTracker):
    """A `MemoryTracker` that counts a DTensor as its local shard."""

    def _add(self, tensor: torch.Tensor, kind: str = DEVICE) -> None:
        super()._add(tensor._local_tensor if isinstance(tensor, DTensor) else tensor, kind)
