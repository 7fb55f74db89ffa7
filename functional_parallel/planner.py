"""Plan a train step at cluster scale: lower it on fake tensors and account memory and traffic per rank.

Nothing is allocated and no process starts: parameters, optimizer state and the batch are
`FakeTensor`s of global shape, the mesh is abstract, and every number below is read from the
lowered per-rank graph (`Lowered.graph`: each node's global `val` and its layout, `layout_of`; each
inserted collective's `fp_collective` record) — not from a formula.

Memory per rank is split by role, with bytes per element set by a `Precision` (ZeRO's mixed
precision: 2-byte params and grads, 4-byte fp32 master copy and Adam moments):
- params: the local shard of every parameter input of the graph;
- grads: the gradient buffer, one per parameter, in the layout where the step reduces it
  (the optimizer-state layout), or the strategy's `grads` rules when it keeps a different
  buffer between micro-batches (ZeRO-1 keeps full gradients, ZeRO-2 only shards);
- optimizer: the local shard of every optimizer-state input (Adam m and v) plus the fp32
  master copy of the params, which lives in the optimizer-state layout (as in ZeRO);
- activations: forward values computed from the batch and kept alive across the
  forward/backward boundary (the loss) because backward reads them — what Korthikanti et al.
  call activation memory (under activation checkpointing, what the policy keeps); values
  computed from parameters alone that are kept the same way (all-gathered ZeRO-3 weights) are
  reported apart, as gathered_params.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from sharding import Mesh, P, shard
from sharding.cost import VIEW_OPS
from sharding.layout import Layout, layout_from_spec, layout_of
from sharding.tree import leaf_paths

from . import optim
from .models import Model, padded_vocab
from .parallel import Strategy, check_offload, compile_step, grad_specs, param_logical_axes
from .train import make_train_step


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each role; `compute_dtype` is what params, activations and collectives use."""

    name: str
    compute_dtype: torch.dtype
    param_bytes: int
    grad_bytes: int
    master_bytes: int  # fp32 master copy of the params (0: the params are the master copy)
    state_bytes: int  # each optimizer-state element (Adam m, v)


PRECISIONS = {
    # ZeRO's mixed-precision Adam: 2 + 2 + (4 + 4 + 4) = 16 bytes per parameter (K = 12).
    "bf16": Precision("bf16", torch.bfloat16, param_bytes=2, grad_bytes=2, master_bytes=4, state_bytes=4),
    # Plain fp32 Adam: 4 + 4 + (4 + 4) = 16 bytes per parameter, no master copy.
    "fp32": Precision("fp32", torch.float32, param_bytes=4, grad_bytes=4, master_bytes=0, state_bytes=4),
}

# The ZeRO paper's communication volume per rank: an all-reduce moves its buffer twice
# (reduce-scatter + all-gather), the others once (ignoring the (n - 1) / n ring factor).
VOLUME_FACTOR = {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 2}


def default_optimizer() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-4, weight_decay=0.1))


def lower_fake(model: Model, strategy: Strategy, mesh_shape: Mapping[str, int], global_batch: int,
               precision: Precision, optimizer=None, remat: str = "none"):
    """Lower the train step of `model` under `strategy` on an abstract mesh, on fake tensors only.

    `remat` is the activation-checkpointing policy (`sharding.remat`). Returns (lowered, params,
    opt_state, mesh); params and state are fake global trees.
    """
    optimizer = optimizer or default_optimizer()
    mesh = Mesh.abstract(dict(mesh_shape))
    with FakeTensorMode():
        params = model.init(0, dtype=precision.compute_dtype)
        state = optimizer.init(params)
        tokens = torch.zeros(global_batch, model.cfg.seq_len, dtype=torch.long)
        batch = {"inputs": tokens, "targets": tokens}
    # Unbucketed: a bucket's size is a byte budget, not a number of layers, so bucketed collective
    # counts would not extrapolate per layer (bytes are the same either way).
    compiled, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer), strategy, mesh,
                                                     params, state, axes=param_logical_axes(model, params),
                                                     bucket_bytes=0, remat=remat)
    with FakeTensorMode(allow_non_fake_inputs=True):
        local = (shard(params, pspecs, mesh), shard(state, sspecs, mesh), shard(batch, bspec, mesh))
    return compiled.lower(*local), params, state, mesh


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def _local_numel(node: fx.Node, axis_sizes) -> int:
    layout = layout_of(node)
    shape = node.meta["val"].shape
    return _numel(layout.local_shape(shape, axis_sizes) if isinstance(layout, Layout) else shape)


def _local_bytes(node: fx.Node, axis_sizes) -> int:
    """Bytes this rank holds for a node's value (every tensor output, at its local shape)."""
    vals, layouts = node.meta.get("val"), layout_of(node)
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    layouts = layouts if isinstance(layouts, tuple) else [layouts] * len(vals)
    total = 0
    for val, layout in zip(vals, layouts):
        if isinstance(val, torch.Tensor):
            shape = layout.local_shape(val.shape, axis_sizes) if isinstance(layout, Layout) else val.shape
            total += _numel(shape) * val.element_size()
    return total


def _storage_roots(nodes) -> dict:
    """Each node's storage owner: views alias their input, everything else owns its output."""
    root = {}
    for node in nodes:
        aliases = node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node)
        root[node] = root.get(node.args[0], node.args[0]) if aliases else node
    return root


def saved_across_backward(lowered, axis_sizes, data_placeholders: int) -> tuple[int, int]:
    """Bytes per rank of values computed up to the loss and read again after it, split into
    (activations: computed from the batch, parameter copies: computed from parameters alone,
    e.g. ZeRO-3's all-gathered weights when backward does not gather them again).

    Under activation checkpointing the recomputed values are copies placed in the backward, after
    the loss: they are not alive at the loss, so only what the policy keeps is counted (the copies'
    own lifetime is one layer's backward, a transient the peak includes and this does not)."""
    graph = lowered.graph.graph
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    root = _storage_roots(nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    data_dependent = set(placeholders[len(placeholders) - data_placeholders:])
    for node in nodes:
        if node.op == "call_function" and any(i in data_dependent for i in node.all_input_nodes):
            data_dependent.add(node)
    boundary = index[_loss_node(lowered, nodes)]
    saved = set()
    for node in nodes[boundary + 1:]:
        if node.op == "output":
            continue
        saved.update(root[i] for i in node.all_input_nodes
                     if index[root[i]] <= boundary and root[i].op == "call_function")
    activations = sum(_local_bytes(n, axis_sizes) for n in saved if n in data_dependent)
    parameter_copies = sum(_local_bytes(n, axis_sizes) for n in saved if n not in data_dependent)
    return activations, parameter_copies


def _loss_node(lowered, nodes) -> fx.Node:
    """The forward loss in the per-rank graph (found by name from the global graph's output)."""
    positions = optree.tree_unflatten(lowered.out_treedef, list(range(lowered.out_treedef.num_leaves)))
    global_nodes = list(lowered.global_graph.graph.nodes)
    loss = global_nodes[-1].args[0][positions[2]["loss"]]
    global_root = _storage_roots(global_nodes)
    by_name = {node.name: node for node in nodes}
    return by_name[global_root[loss].name]


def account(lowered, params, opt_state, strategy: Strategy, mesh: Mesh, precision: Precision) -> dict[str, int]:
    """Per-rank bytes by role and per-axis collective bytes of one lowered step (a flat dict of ints)."""
    axis_sizes = mesh.axis_sizes
    placeholders = [n for n in lowered.graph.graph.nodes if n.op == "placeholder"]
    param_paths, param_leaves, _ = leaf_paths(params)
    state_paths, state_leaves, _ = leaf_paths(opt_state)
    param_nodes = placeholders[:len(param_paths)]
    state_nodes = placeholders[len(param_paths):len(param_paths) + len(state_paths)]

    # Optimizer-state leaves that mirror a parameter (Adam m, v) and the layout of each one's first.
    mirror_layout: dict[str, Layout] = {}
    out = Counter(params=0, grads=0, optimizer=0, parameters=0)
    for path, leaf, node in zip(state_paths, state_leaves, state_nodes):
        mirrored = next((p for p, q in zip(param_paths, param_leaves)
                         if path.endswith("/" + p) and tuple(q.shape) == tuple(leaf.shape)), None)
        if mirrored is None:  # step counters: counted at their own dtype
            out["optimizer"] += _local_bytes(node, axis_sizes)
            continue
        out["optimizer"] += _local_numel(node, axis_sizes) * precision.state_bytes
        mirror_layout.setdefault(mirrored, layout_of(node))
    buffer_specs = grad_specs(strategy, params)
    for path, leaf, node, spec in zip(param_paths, param_leaves, param_nodes, buffer_specs):
        shape = tuple(leaf.shape)
        out["parameters"] += _numel(shape)
        out["params"] += _local_numel(node, axis_sizes) * precision.param_bytes
        state_layout = mirror_layout.get(path, layout_of(node))
        out["optimizer"] += _numel(state_layout.local_shape(shape, axis_sizes)) * precision.master_bytes
        grad_layout = state_layout if spec is None else layout_from_spec(spec, shape, mesh.axis_names, axis_sizes,
                                                                          where=f"grads {path!r}")
        out["grads"] += _numel(grad_layout.local_shape(shape, axis_sizes)) * precision.grad_bytes
    out["activations"], out["gathered_params"] = saved_across_backward(lowered, axis_sizes, data_placeholders=2)
    for record in lowered.collectives:
        axis = "+".join(record["axes"])  # a joint group: "dp+tp"
        out[f"comm/{axis}/{record['kind']}/bytes"] += record["bytes"]
        out[f"comm/{axis}/{record['kind']}/count"] += 1
        out[f"comm/{axis}/volume"] += VOLUME_FACTOR.get(record["kind"], 1) * record["bytes"]
        if record.get("phase") == "forward":
            out[f"comm/{axis}/{record['kind']}/forward/bytes"] += record["bytes"]
    out["graph_nodes"] = len(lowered.graph.graph.nodes)
    return dict(out)


# ZeRO-Offload's split: the optimizer role (fp32 master copy and Adam moments) lives in host memory;
# ZeRO-Infinity's parameter offload adds the parameters and gradients. Under "params" the device
# column counts no fetched copy: one window's parameters (a layer's, up to 1/L of them) come up at
# a time, and a gradient goes down as it is computed (`sharding.transfer_schedule`).
# Under "disk" the parameters and optimizer state are in files (ZeRO-Infinity's NVMe) and the
# gradients come down to host for the update there.
# A gradient goes down as soon as it is reduced under every offload level (`sharding.transfer_schedule`),
# so it is host memory, as in ZeRO-Offload.
HOST_ROLES = {"none": (), "optimizer": ("optimizer", "grads"), "params": ("optimizer", "params", "grads"),
              "disk": ("grads",)}
DISK_ROLES = {"disk": ("optimizer", "params")}
DEVICE_ROLES = ("params", "grads", "optimizer", "activations", "gathered_params")


def memory_by_kind(figures: Mapping[str, int], offload: str = "none") -> dict[str, int]:
    """Per-rank {"device", "host", "disk": bytes} of the memory roles under an offload policy
    (`offload="optimizer"`: the optimizer and gradient roles move to host; the compiler's placement
    pass runs the update there, `sharding.placement`; "params": the parameters too; "disk":
    parameters and optimizer in files, gradients on host)."""
    offload = check_offload(offload)
    host = sum(figures.get(role, 0) for role in HOST_ROLES[offload])
    disk = sum(figures.get(role, 0) for role in DISK_ROLES.get(offload, ()))
    return {"device": sum(figures.get(role, 0) for role in DEVICE_ROLES) - host - disk, "host": host, "disk": disk}


def largest_fit(figures: Mapping[str, int], per_layer: Mapping[str, int], layers: int, offload: str,
                device_bytes: int, host_bytes: int | None = None, most: int = 100_000) -> int:
    """The most layers (of this width, at most `most`) whose per-rank memory fits `device_bytes` on
    device and `host_bytes` on host (None: any) under `offload`; 0 when not even one layer does.
    `figures` are at `layers` layers and `per_layer` is one layer's worth (`plan_strategy`)."""
    def fits(count: int) -> bool:
        at = {key: figures.get(key, 0) + (count - layers) * per_layer.get(key, 0)
              for key in set(figures) | set(per_layer)}
        split = memory_by_kind(at, offload)
        return split["device"] <= device_bytes and (host_bytes is None or split["host"] <= host_bytes)

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= most and fits(high):  # memory grows with depth: double, then bisect
        low, high = high, 2 * high
    high = min(high, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def extrapolate(shallow: Mapping[str, int], deeper: Mapping[str, int], depth: int, layers: int) -> dict[str, int]:
    """Every quantity at `layers` from lowerings at `depth` and `depth + 1` (one layer's worth per layer)."""
    keys = set(shallow) | set(deeper)
    return {k: shallow.get(k, 0) + (layers - depth) * (deeper.get(k, 0) - shallow.get(k, 0)) for k in keys}


def per_layer(shallow: Mapping[str, int], deeper: Mapping[str, int]) -> dict[str, int]:
    keys = set(shallow) | set(deeper)
    return {k: deeper.get(k, 0) - shallow.get(k, 0) for k in keys}


def mesh_padded_vocab(vocab_size: int, mesh_shape: Mapping[str, int], multiple: int = 128) -> int:
    """The vocabulary padded to a multiple of `multiple` that also splits over every mesh axis."""
    return padded_vocab(vocab_size, math.lcm(multiple, math.prod(mesh_shape.values())))


def model_axes(strategy: Strategy, mesh_shape: Mapping[str, int]) -> tuple[int, bool]:
    """(t, sp) in Korthikanti's terms, read from the strategy's data: t is the product of the mesh
    axes that split a layer's activations beyond the batch (TP's heads and MLP features, Ulysses'
    sequence and heads); sp is whether the residual stream's sequence dim is split."""
    rules = strategy.constrain_rules
    split = P(*(axes for name, axes in rules.items() if name != "batch" and axes)).all_axes()
    batch = set(strategy.batch_dim_axes())
    t = math.prod(mesh_shape[axis] for axis in set(split) if axis in mesh_shape and axis not in batch)
    return t, strategy.logical.get("seq") is not None


@dataclass
class StrategyPlan:
    """One strategy's per-rank figures at the full depth, and how they were obtained."""

    strategy: str
    figures: dict[str, int]  # memory by role, "comm/<axis>/<kind>/bytes|count", "comm/<axis>/volume"
    per_layer: dict[str, int]  # the same keys: what one more layer adds
    lowered_depths: tuple[int, ...]
    seconds: float


def plan_strategy(build_model, layers: int, strategy: Strategy, mesh_shape: Mapping[str, int], global_batch: int,
                  precision: Precision, depth: int | None = 1, remat: str = "none") -> StrategyPlan:
    """Lower `build_model(n_layers)` at `depth` and `depth + 1` layers and account both: their
    difference is one layer's figures, and every figure is extrapolated linearly to `layers` (exact:
    tests/test_plan.py checks it against a full lowering). `depth=None` lowers `layers - 1` and
    `layers`, so the full-depth figures come from a full lowering. `remat`: see `lower_fake`."""
    start = time.perf_counter()
    first = max(1, layers - 1) if depth is None else depth
    depths = (first, first + 1)
    figures = []
    for n_layers in depths:
        lowered, params, state, mesh = lower_fake(build_model(n_layers), strategy, mesh_shape, global_batch,
                                                  precision, remat=remat)
        figures.append(account(lowered, params, state, strategy, mesh, precision))
        del lowered, params, state
    return StrategyPlan(strategy.name, extrapolate(figures[0], figures[1], first, layers),
                        per_layer(figures[0], figures[1]), depths, time.perf_counter() - start)
