"""Stage 6, place: give every node of the per-rank graph a memory kind, "device" or "host", and
insert a transfer wherever a value crosses between them (ZeRO-Offload, with JAX's memory kinds).

Inputs and outputs carry the kind given to `jit(..., in_memory_kinds=, out_memory_kinds=)`.
Every other node goes where the fewest bytes have to move: a minimum cut of the graph in which
a value consumed on the other side costs its bytes once (one transfer serves every consumer
there); among the minimum cuts the one with the fewest host nodes is taken. Collectives and the
code around them stay on device, and so do the forward and the backward of a function that takes
a gradient: the model computes on the device, only what follows the last gradient (the update)
may run on host (with the parameters on host, the cheapest cut would otherwise move the batch
down and run the whole model there). For a train step whose optimizer state is on host this runs
the optimizer update on host: the clipped gradient goes down (d2h), Adam's moments and bias
corrections are computed on host, the update direction comes back up (h2d), and the new
parameter is computed on device, where the parameter lives.

A host node calls `on_host(op, ...)`: the op runs on the CPU (a creation op is given
device="cpu") under a marker that `sharding.memory.MemoryTracker` reads, so measured memory
splits by kind even when host and device are the same CPU. A transfer is a `to_host` /
`to_device` node whose `meta["fp_transfer"]` is a record like a collective's (kind "d2h" or
"h2d", bytes, this rank's shape, source line). On CUDA host memory is CPU memory and device
memory the GPU; on a CPU-only machine both are the CPU and a transfer is a real copy.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from . import lazy
from .errors import PropagationError
from .liveness import fake_values
from .memory_kinds import (DEVICE, DISK, HOST, KIND_META, MEMORY_KINDS, TRANSFER_META, check_kind, current_kind,
                           running_on)
from .mincut import INFINITE, FlowGraph
from .phases import BACKWARD, FORWARD
from .source import source_line

__all__ = ["DEVICE", "HOST", "KIND_META", "MEMORY_KINDS", "TRANSFER_META", "check_kind", "current_kind", "running_on",
           "on_host", "to_host", "to_device", "place", "transfer_log"]


def on_host(op, *args, **kwargs):
    """Run `op` as host compute (its tensor inputs are host tensors already)."""
    with running_on(HOST):
        return op(*args, **kwargs)


def to_host(x: torch.Tensor) -> torch.Tensor:
    """Device -> host: a copy in CPU memory (a plain copy when the device is the CPU)."""
    with running_on(HOST):
        return x.to("cpu", copy=True)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device: a copy on `device` (asynchronous on CUDA: the stream orders its use)."""
    with running_on(DEVICE):
        return x.to(device, non_blocking=device.type == "cuda", copy=True)


def _host_capable(node: fx.Node, value) -> bool:
    """Only plain aten ops with a tensor result may run on host; collectives and their helpers may not."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "aten" and isinstance(value, torch.Tensor))


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


MODEL_PHASES = (FORWARD, BACKWARD)


def choose_kinds(graph: fx.Graph, values: dict, in_kinds: list[str], out_kinds: list[str]) -> dict[fx.Node, str]:
    """Every node's memory kind: the minimum-bytes cut with fixed input/output kinds (see module doc).

    Vertices: node i; `i + n` is "i is read on the other side from a host i" and `i + 2n` the
    reverse (each costs i's bytes once, whatever the number of readers); `3n` host, `3n + 1` device.
    """
    nodes = [node for node in graph.nodes if node.op != "output"]
    index = {node: i for i, node in enumerate(nodes)}
    n = len(nodes)
    host, device = 3 * n, 3 * n + 1
    flow = FlowGraph(3 * n + 2)
    placeholders = [node for node in nodes if node.op == "placeholder"]
    differentiates = any(node.meta.get("phase") == BACKWARD for node in nodes)
    for node, kind in zip(placeholders, in_kinds):
        flow.add_edge(*((host, index[node]) if kind == HOST else (index[node], device)), INFINITE)

    def reads(value: fx.Node, reader: int) -> None:
        i = index[value]
        flow.add_edge(i + n, reader, INFINITE)
        flow.add_edge(reader, i + 2 * n, INFINITE)

    for node in nodes:
        i = index[node]
        nbytes = _nbytes(values.get(node))
        flow.add_edge(i, i + n, nbytes)
        flow.add_edge(i + 2 * n, i, nbytes)
        if node.op != "placeholder" and (not _host_capable(node, values.get(node))
                                         or (differentiates and node.meta.get("phase") in MODEL_PHASES)):
            flow.add_edge(i, device, INFINITE)
        for value in node.all_input_nodes:
            reads(value, i)
    output = next(node for node in graph.nodes if node.op == "output")
    for value, kind in zip(output.args[0], out_kinds):
        if isinstance(value, fx.Node):
            reads(value, host if kind == HOST else device)
    on_host_side = flow.source_side(host, device)
    return {node: HOST if index[node] in on_host_side else DEVICE for node in nodes}


def sizing_values(graph_module: fx.GraphModule, example_inputs, compute_device: torch.device) -> dict:
    """Each node's value on fake inputs of this rank's shapes, all on the compute device (the
    graph was traced with every input there; host inputs move only when placement says so)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fakes = [torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=compute_device)
                 if isinstance(x, torch.Tensor) else x for x in example_inputs]
    return fake_values(graph_module, fakes)


def place(graph_module: fx.GraphModule, in_kinds: list[str], out_kinds: list[str], example_inputs,
          compute_device: torch.device) -> fx.GraphModule:
    """The graph with every node's kind in `meta["fp_memory_kind"]`, host ops wrapped in `on_host`
    and a transfer node per value that crosses kinds. All-device kinds: the graph unchanged."""
    # A disk value is placed as a host one; `sharding.disk.stage_disk` then adds its reads and writes.
    in_kinds, out_kinds = ([HOST if kind == DISK else kind for kind in kinds] for kinds in (in_kinds, out_kinds))
    if HOST not in in_kinds and HOST not in out_kinds:
        return graph_module
    values = sizing_values(graph_module, example_inputs, compute_device)
    kinds = choose_kinds(graph_module.graph, values, in_kinds, out_kinds)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    transfers: dict[tuple, fx.Node] = {}

    def fetch(value: fx.Node, kind: str, reader: fx.Node) -> fx.Node:
        if kinds[value] == kind:
            return env[value]
        if (value, kind) not in transfers:
            transfers[value, kind] = _transfer(graph, env[value], values.get(value), kind, compute_device,
                                               source_line(reader) or source_line(value), value.name)
        return transfers[value, kind]

    for node in graph_module.graph.nodes:
        if node.op == "output":
            outputs = [fetch(value, kind, node) if isinstance(value, fx.Node) else value
                       for value, kind in zip(node.args[0], out_kinds)]
            graph.output(tuple(outputs))
            continue
        kind = kinds[node]
        new = graph.node_copy(node, lambda value: fetch(value, kind, node))
        new.meta[KIND_META] = kind
        if kind == HOST and node.op == "call_function":
            kwargs = dict(new.kwargs)
            if "device" in kwargs:
                kwargs["device"] = torch.device("cpu")
            new.target, new.args, new.kwargs = on_host, (node.target, *new.args), kwargs
        env[node] = new
    return lazy.module(graph_module, graph)


def _transfer(graph: fx.Graph, value: fx.Node, example, kind: str, compute_device: torch.device,
              source: str, name: str) -> fx.Node:
    if not isinstance(example, torch.Tensor):
        raise PropagationError(f"{name} ({type(example).__name__}) would have to move between host and device; "
                               f"only tensors can")
    node = (graph.call_function(to_host, (value,)) if kind == HOST else
            graph.call_function(to_device, (value, compute_device)))
    node.meta[KIND_META] = kind
    node.meta[TRANSFER_META] = {"kind": "d2h" if kind == HOST else "h2d", "axes": (), "bytes": _nbytes(example),
                                "source": source, "shape": tuple(example.shape),
                                "dtype": str(example.dtype).replace("torch.", ""), "value": name}
    return node


def transfer_log(graph_module: fx.GraphModule) -> list[dict]:
    """Every host<->device transfer, in program order: kind ("d2h"/"h2d"), bytes, local shape, source line."""
    return [dict(node.meta[TRANSFER_META]) for node in graph_module.graph.nodes if TRANSFER_META in node.meta]
