"""The compiler as a value: `STAGES`, in order, each a `Program -> Program`.

trace -> remat -> propagate -> insert -> localize -> split -> schedule -> place -> bind. Every stage but
`bind` reads only the mesh's axis names and sizes (`Program.shape`, an abstract mesh), so a step
lowered for any rank, or on `Mesh.abstract`, is one program; `bind` writes in this rank's
position and process groups (`Program.mesh`). Each stage's module can be used and tested alone;
the functions here only say what each takes from the program and what it adds.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from . import lazy
from .bind import AxisGroup, bind, placeholders
from .errors import SpecError
from .insert import insert
from .layout import layout_from_spec
from .localize import localize
from .memory_kinds import DISK, HOST, flat_kinds
from .mesh import Mesh
from .disk import stage_disk
from .placement import place, sizing_values
from .propagate import propagate
from .remat import remat
from .schedule import schedule
from .pipelining import Pipeline, select_rank, split_stages
from .trace import Traced, trace
from .transfer_schedule import schedule_transfers
from .tree import NAMESPACE, flat_specs


@dataclass(frozen=True)
class Options:
    """What `jit` was asked for: everything a stage may read besides the program itself."""

    in_specs: tuple
    out_specs: Any
    logical_rules: dict
    data_axes: tuple | None
    data_leaves: list[bool]
    remat: str
    schedule: dict
    in_kinds: list[str]
    out_memory_kinds: Any
    compute_device: torch.device
    pipeline: Pipeline | None = None
    in_stages: list = field(default_factory=list)
    meta_inputs: bool = False
    disk_dir: str | None = None

    @property
    def fake_device(self) -> torch.device | None:
        """Where to trace every input: the compute device when some inputs live on host (placement
        decides later what runs there) or on another pipeline stage (meta tensors here), else each
        input's own device."""
        return self.compute_device if HOST in self.in_kinds or DISK in self.in_kinds or self.meta_inputs else None


@dataclass(frozen=True)
class Program:
    """The step as it goes through the stages. `graph` is the current graph (global shapes until
    insert, this rank's after); the other fields are filled in by the stage that knows them."""

    fn: Callable
    args: tuple
    mesh: Mesh
    options: Options
    graph: fx.GraphModule | None = None
    traced: Traced | None = None
    global_graph: fx.GraphModule | None = None
    context: Any = None
    out_layouts: list | None = None
    example_inputs: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def shape(self) -> Mesh:
        """The mesh as the stages before `bind` see it: axis names and sizes only."""
        return self.mesh.shape_only()


def trace_stage(p: Program) -> Program:
    traced = trace(p.fn, p.args, p.options.in_specs, p.shape, p.options.logical_rules,
                   fake_device=p.options.fake_device)
    return dataclasses.replace(p, graph=traced.graph_module, traced=traced,
                               out_layouts=_out_layouts(traced, p.options.out_specs, p.shape))


def remat_stage(p: Program) -> Program:
    graph = remat(p.graph, p.options.remat)
    return dataclasses.replace(p, graph=graph, global_graph=graph)


def propagate_stage(p: Program) -> Program:
    unknown = [a for a in p.options.data_axes or () if a not in p.shape.axis_names]
    if unknown:
        raise SpecError(f"data_axes {tuple(unknown)} are not mesh axes {p.shape.axis_names}")
    context = propagate(p.graph.graph, p.traced.in_layouts, p.out_layouts, p.shape.axis_names,
                        p.shape.axis_sizes, p.options.data_axes, p.options.data_leaves)
    return dataclasses.replace(p, context=context)


def insert_stage(p: Program) -> Program:
    return dataclasses.replace(p, graph=insert(p.graph, p.context, p.shape))


def localize_stage(p: Program) -> Program:
    return dataclasses.replace(p, graph=localize(p.graph, p.shape.axis_sizes))


def split_stage(p: Program) -> Program:
    """With a pipeline: every op on its stage, sends and receives, the schedule's order (`sharding.pipelining`)."""
    pipeline = p.options.pipeline
    if pipeline is None:
        return p
    output = next(n for n in p.traced.graph_module.graph.nodes if n.op == "output")
    vals = [n.meta["val"] if isinstance(n, fx.Node) else n for n in output.args[0]]
    out_tree = optree.tree_unflatten(p.traced.out_treedef, vals)
    out_specs = p.options.out_specs
    if isinstance(out_tree, tuple) and isinstance(out_specs, list):
        out_specs = tuple(out_specs)
    out_stages = stage_indices(flat_specs(out_specs, out_tree, "out_specs"), pipeline, "out_specs")
    axis = p.shape.axis_names.index(pipeline.axis)
    graph = split_stages(p.graph, p.options.in_stages, out_stages, pipeline, axis, p.shape.axis_sizes)
    return dataclasses.replace(p, graph=graph)


def schedule_stage(p: Program) -> Program:
    data_inputs = frozenset(i for i, is_data in enumerate(p.options.data_leaves) if is_data)
    return dataclasses.replace(p, graph=schedule(p.graph, p.shape.axis_sizes, **p.options.schedule,
                                                 data_inputs=data_inputs))


def place_stage(p: Program) -> Program:
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    example_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
                      for x in optree.tree_leaves(p.args, namespace=NAMESPACE, none_is_leaf=False)]
    out_tree = optree.tree_unflatten(p.traced.out_treedef, list(range(len(p.traced.out_paths))))
    out_kinds = flat_kinds(p.options.out_memory_kinds, out_tree, "out_memory_kinds")
    graph = place(p.graph, p.options.in_kinds, out_kinds, example_inputs, p.options.compute_device)
    if graph is not p.graph:  # something moves between kinds: when each transfer happens, the disk's reads/writes
        graph = schedule_transfers(graph)
        if DISK in p.options.in_kinds or DISK in out_kinds:  # its reads' and writes' sizes need one fake run
            graph = stage_disk(graph, p.options.in_kinds, out_kinds, p.options.disk_dir,
                               sizing_values(graph, example_inputs, p.options.compute_device))
    return dataclasses.replace(p, graph=graph, example_inputs=example_inputs)


def bind_stage(p: Program) -> Program:
    graph = p.graph
    pipeline = p.options.pipeline
    if pipeline is not None:
        axis = p.mesh.axis_names.index(pipeline.axis)
        if not p.mesh.abstract_only:  # every rank makes every group, in one order, before it keeps its stages
            for group in placeholders(graph):
                if isinstance(group, AxisGroup):
                    p.mesh.group_name(group.axes)
        graph = select_rank(graph, p.mesh.coordinate[axis], p.mesh.axis_sizes[axis])
    return dataclasses.replace(p, graph=bind(graph, p.mesh))


def stage_indices(specs: list, pipeline: Pipeline | None, where: str) -> list:
    """Each flat spec's model stage (None: every stage), checked against the pipeline's axis."""
    found = []
    for spec in specs:
        stage = getattr(spec, "stage", None)
        if stage is not None and pipeline is None:
            raise SpecError(f"{where}: {spec!r} places a value on a pipeline stage, but jit was not given a "
                            f"pipeline; pass pipeline=sharding.Pipeline(axis={stage.axis!r}, ...)")
        if pipeline is not None and pipeline.axis in spec.all_axes():
            raise SpecError(f"{where}: {spec!r} splits a dim over {pipeline.axis!r}, the pipeline axis; a value "
                            f"lives on one stage of it (P(..., stage=({pipeline.axis!r}, k))), it is not split")
        if stage is not None and stage.axis != pipeline.axis:
            raise SpecError(f"{where}: {spec!r} names stage axis {stage.axis!r}, but the pipeline runs over "
                            f"{pipeline.axis!r}")
        found.append(stage.index if stage is not None else None)
    return found


STAGES: tuple[tuple[str, Callable[[Program], Program]], ...] = (
    ("trace", trace_stage), ("remat", remat_stage), ("propagate", propagate_stage),
    ("insert", insert_stage), ("localize", localize_stage), ("split", split_stage), ("schedule", schedule_stage),
    ("place", place_stage), ("bind", bind_stage),
)


def run_stages(program: Program, stages=STAGES) -> Program:
    """`program` through `stages` in order; `timings` gets each stage's seconds (`<name>_s`)."""
    timings = dict(program.timings)
    with lazy.lazily():
        for name, stage in stages:
            started = time.perf_counter()
            program = stage(program)
            timings[f"{name}_s"] = time.perf_counter() - started
    if program.graph is not None:
        started = time.perf_counter()
        lazy.generated(program.graph)
        timings["codegen_s"] = time.perf_counter() - started
    return dataclasses.replace(program, timings=timings)


def _out_layouts(traced: Traced, out_specs, mesh: Mesh) -> list:
    output = next(n for n in traced.graph_module.graph.nodes if n.op == "output")
    vals = [n.meta["val"] if isinstance(n, fx.Node) else n for n in output.args[0]]
    out_tree = optree.tree_unflatten(traced.out_treedef, vals)
    if isinstance(out_tree, tuple) and isinstance(out_specs, list):
        out_specs = tuple(out_specs)
    specs = flat_specs(out_specs, out_tree, "out_specs")
    return [layout_from_spec(spec, tuple(val.shape), mesh.axis_names, mesh.axis_sizes, where=f"output {path!r}")
            for spec, val, path in zip(specs, vals, traced.out_paths)]
