"""Predicted memory of a lowered step: the peak of live storage bytes per rank, node by node.

What is counted is what `sharding.memory.MemoryTracker` measures: every storage the step's
inputs hold (the caller keeps them alive for the whole call), and every storage an op allocates,
from that op until the last use of any value that refers to it (the generated code drops a
name right after its last use; outputs stay alive to the end). Views and ops that hand back their
input (`wait`, `contiguous` of a contiguous tensor) share their input's storage. An issued
collective's input stays alive until its `wait` (the wait node takes it as an argument).

The sizes and the aliasing come from running the per-rank graph on fake tensors of local shape
(a `FakeTensorMode`: nothing is allocated and no collective runs), so what the cost model
counts is what the real kernels return, strides and views included.

Each storage has the memory kind of the node that made it (`sharding.placement`: a host input,
a host op or a `to_host` make host storages), so the device and host peaks can be read apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from .bind import as_rank_zero
from .collectives import WAIT
from .memory_kinds import DEVICE, KIND_META, MEMORY_KINDS


@dataclass(frozen=True)
class Storage:
    """One allocation: its bytes, the node that made it, the node indices it is alive over, and
    its memory kind ("device", or "host" for a storage made by a host node or a host input)."""

    nbytes: int
    allocated_by: str
    start: int
    end: int
    kind: str = DEVICE


def _tensors(value) -> list[torch.Tensor]:
    return [leaf for leaf in optree.tree_leaves(value, none_is_leaf=False, namespace="torch")
            if isinstance(leaf, torch.Tensor)]


def fake_values(graph_module: fx.GraphModule, inputs) -> dict[fx.Node, object]:
    """Every node's value on fake tensors shaped like `inputs` (this rank's local tensors, real or fake).
    A program not yet bound to a rank (`sharding.bind`) runs as if it were rank 0: shapes are the same."""
    given = [x for x in inputs if isinstance(x, FakeTensor)]
    mode = given[0].fake_mode if given else FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [mode.from_tensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor) else x
             for x in inputs]
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            # The real wait_tensor returns its argument; its fake kernel returns a copy.
            if node.target is WAIT:
                out = self.env[node.args[0]]
            else:
                with self._set_current_node(node):
                    args, kwargs = as_rank_zero(self.fetch_args_kwargs_from_env(node))
                    out = getattr(self, node.op)(node.target, args, kwargs)
            values[node] = out
            return out

    with mode:
        Recorder(graph_module, garbage_collect_values=False).run(*fakes)
    return values


def storages(graph_module: fx.GraphModule, inputs) -> list[Storage]:
    """Each storage a run of the graph holds, with the node interval it is alive over."""
    nodes = list(graph_module.graph.nodes)
    values = fake_values(graph_module, inputs)
    end_of_program = len(nodes)
    index = {node: i for i, node in enumerate(nodes)}
    found: dict[int, list] = {}  # storage key -> [nbytes, first node, start, end, kind]
    for i, node in enumerate(nodes):
        if node.op == "output":
            continue
        if node.op == "placeholder":
            end = end_of_program  # the caller holds the inputs for the whole call
        elif any(user.op == "output" for user in node.users):
            end = end_of_program
        else:
            end = max((index[user] for user in node.users), default=i)
        for tensor in _tensors(values.get(node)):
            if tensor.device.type == "meta":  # a value another pipeline stage holds: no storage here
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in found:
                found[key] = [storage.nbytes(), node.name, -1 if node.op == "placeholder" else i, end,
                              node.meta.get(KIND_META, DEVICE)]
            else:
                found[key][3] = max(found[key][3], end)
    return [Storage(*entry) for entry in found.values()]


def peak_bytes(graph_module: fx.GraphModule, inputs) -> int:
    """The largest total of live storage bytes while any one node runs (inputs included)."""
    return peak_of(storages(graph_module, inputs))


def peaks_by_kind(graph_module: fx.GraphModule, inputs) -> dict[str, int]:
    """{"all": peak of every storage, and per memory kind ("device", "host", "disk") the peak of its storages}."""
    found = storages(graph_module, inputs)
    return {"all": peak_of(found), **{kind: peak_of([s for s in found if s.kind == kind]) for kind in MEMORY_KINDS}}


def peak_of(found: list[Storage]) -> int:
    """The largest total of bytes of `found` alive at one node."""
    delta: dict[int, int] = {}
    for storage in found:
        delta[storage.start] = delta.get(storage.start, 0) + storage.nbytes
        delta[storage.end + 1] = delta.get(storage.end + 1, 0) - storage.nbytes
    live = peak = 0
    for position in sorted(delta):
        live += delta[position]
        peak = max(peak, live)
    return peak
