"""`jit`: trace once per input signature, partition for this rank, run with real collectives."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .cost import collective_log, estimate
from .errors import SpecError
from .insert import insert
from .layout import layout_from_spec
from .localize import localize
from .mesh import Mesh
from .propagate import propagate
from .remat import check_policy, remat
from .schedule import DEFAULT_BUCKET_BYTES, schedule
from .spec import P
from .trace import trace
from .tree import NAMESPACE, flat_specs, leaf_paths


@dataclass
class Lowered:
    """One partitioned step for this rank: its graph, its collectives and their cost.

    `cost` is computed on first use (the liveness analysis runs the graph on fake tensors shaped
    like `example_inputs`, fake copies of this rank's inputs that hold no memory).
    """

    graph: fx.GraphModule
    collectives: list[dict]
    out_treedef: Any
    global_graph: fx.GraphModule
    timings: dict = field(default_factory=dict)
    example_inputs: list = field(default_factory=list, repr=False)

    @functools.cached_property
    def cost(self) -> dict:
        started = time.perf_counter()
        cost = estimate(self.graph, self.example_inputs)
        self.timings["cost_s"] = time.perf_counter() - started
        return cost

    def run(self, *args):
        flat = optree.tree_leaves(tuple(args), namespace=NAMESPACE, none_is_leaf=False)
        outputs = self.graph(*flat)
        return optree.tree_unflatten(self.out_treedef, list(outputs))

    def summary(self) -> str:
        lines = [f"{len(self.collectives)} collectives, {self.cost['bytes_moved']:,} bytes moved per rank, "
                 f"peak {self.cost['peak_bytes']:,} bytes"]
        for record in self.collectives:
            lines.append(f"  {record['kind']:<15} {'/'.join(record['axes']):<6} {record['bytes']:>12,} B  "
                         f"{record['source']}")
        return "\n".join(lines)


class jit:
    """Compile `fn` for `mesh`: local shards in, local shards out.

    `in_specs` has one entry per argument (a P for every leaf, or a tree of P's); `out_specs`
    likewise for the outputs. `logical_rules` maps logical axis names used by `constrain` to
    mesh axes. `data_axes` defaults to the axes that split integer inputs (token ids).
    The schedule passes (`sharding.schedule`) are on by default: `regather` (ZeRO-3 gathers a
    parameter again for its backward use), `bucket_bytes` (merge small collectives up to this
    many bytes per bucket; 0 disables) and `overlap` (issue early, wait late, prefetch gathers).
    `remat` is the activation-checkpointing policy applied to the traced step before propagation
    (`sharding.remat`: "none", "full" or "selective").
    """

    def __init__(self, fn: Callable, *, mesh: Mesh, in_specs: Sequence, out_specs,
                 logical_rules: Mapping[str, Any] | None = None, data_axes: Sequence[str] | None = None,
                 regather: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True,
                 remat: str = "none"):
        self.fn = fn
        self.remat = check_policy(remat)
        self.mesh = mesh
        self.in_specs = tuple(in_specs) if isinstance(in_specs, (list, tuple)) and not isinstance(in_specs, P) \
            else (in_specs,)
        self.out_specs = out_specs
        self.logical_rules = dict(logical_rules or {})
        self.data_axes = data_axes
        self.schedule_options = {"regather_params": regather, "bucket_bytes": bucket_bytes,
                                 "overlap_communication": overlap}
        self._cache: dict = {}

    def _signature(self, args) -> tuple:
        paths, leaves, treedef = leaf_paths(tuple(args))
        return (treedef, tuple((tuple(x.shape), x.dtype, x.device.type) if isinstance(x, torch.Tensor) else x
                               for x in leaves))

    def lower(self, *args) -> Lowered:
        key = self._signature(args)
        if key not in self._cache:
            self._cache[key] = self._lower(args)
        return self._cache[key]

    def __call__(self, *args):
        return self.lower(*args).run(*args)

    def _lower(self, args) -> Lowered:
        mesh = self.mesh
        start = time.perf_counter()
        traced = trace(self.fn, tuple(args), self.in_specs, mesh, self.logical_rules)
        traced_at = time.perf_counter()
        out_layouts = self._out_layouts(traced)
        data_axes = self.data_axes
        unknown = [a for a in data_axes or () if a not in mesh.axis_names]
        if unknown:
            raise SpecError(f"data_axes {tuple(unknown)} are not mesh axes {mesh.axis_names}")
        graph_module = remat(traced.graph_module, self.remat)
        ctx = propagate(graph_module.graph, traced.in_layouts, out_layouts, mesh.axis_names, mesh.axis_sizes,
                        data_axes)
        local = schedule(localize(insert(graph_module, ctx, mesh), mesh.axis_sizes), mesh.axis_sizes,
                         **self.schedule_options)
        done = time.perf_counter()
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        example_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                          for x in optree.tree_leaves(tuple(args), namespace=NAMESPACE, none_is_leaf=False)]
        return Lowered(graph=local, collectives=collective_log(local), out_treedef=traced.out_treedef,
                       global_graph=graph_module, example_inputs=example_inputs,
                       timings={"trace_s": traced_at - start, "partition_s": done - traced_at})

    def _out_layouts(self, traced) -> list:
        output = next(n for n in traced.graph_module.graph.nodes if n.op == "output")
        vals = [n.meta["val"] if isinstance(n, fx.Node) else n for n in output.args[0]]
        out_tree = optree.tree_unflatten(traced.out_treedef, vals)
        out_specs = self.out_specs
        if isinstance(out_tree, tuple) and isinstance(out_specs, list):
            out_specs = tuple(out_specs)
        specs = flat_specs(out_specs, out_tree, "out_specs")
        return [layout_from_spec(spec, tuple(val.shape), self.mesh.axis_names, self.mesh.axis_sizes,
                                 where=f"output {path!r}")
                for spec, val, path in zip(specs, vals, traced.out_paths)]
