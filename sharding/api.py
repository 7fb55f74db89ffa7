"""`jit`: trace once per input signature, partition for this rank, run with real collectives."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import optree
import torch
import torch.fx as fx

from .cost import collective_log, estimate
from .errors import SpecError
from .disk import check_disk_dir
from .memory_kinds import DEVICE, DISK, HOST, check_kind, flat_kinds
from .mesh import Mesh
from .pipeline import Options, Program, run_stages, stage_indices
from .placement import transfer_log
from .propagate import is_integer
from .remat import check_policy
from .schedule import DEFAULT_BUCKET_BYTES
from .spec import P
from .pipelining import Pipeline
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
    transfers: list = field(default_factory=list)
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

    def summary(self, verbose: bool = False) -> str:
        """One line per collective: phase, kind, mesh axes, bytes per rank, the input leaf it moves
        (a parameter, or "grad of" one) and the source line that needs it (for the backward, the
        forward line it differentiates). `verbose` also lists each bucket's members."""
        lines = [f"{len(self.collectives)} collectives, {self.cost['bytes_moved']:,} bytes moved per rank, "
                 f"peak {self.cost['peak_bytes']:,} bytes"]
        for record in self.collectives:
            kind = record["kind"] + (f"({record['op']})" if record.get("op") else "")  # a max or min
            lines.append(f"  {record.get('phase', ''):<9} {kind:<15} {'+'.join(record['axes']):<6} "
                         f"{record['bytes']:>12,} B  {_what(record, verbose)}")
            if verbose:
                for member in record.get("members", ()):
                    lines.append(f"  {'':<9} {'':<15} {'':<6} {member['bytes']:>12,} B    {_what(member, False)}")
        if self.transfers:
            moved = self.cost["transfer_bytes"]
            lines.append(f"{len(self.transfers)} host<->device transfers, {moved['d2h']:,} bytes d2h and "
                         f"{moved['h2d']:,} bytes h2d per rank; device peak {self.cost['device_peak_bytes']:,}, "
                         f"host peak {self.cost['host_bytes']:,} bytes")
            for record in self.transfers:
                lines.append(f"  {'':<9} {record['kind']:<15} {'':<6} {record['bytes']:>12,} B  {record['source']}")
        return "\n".join(lines)


def _what(record: dict, verbose: bool) -> str:
    """The leaf and source of a collective; a bucket's member leaves (all of them when `verbose`)."""
    members = record.get("members")
    if members:
        names = list(dict.fromkeys(m.get("leaf") or m["source"].split(" in ")[0] or m["value"] for m in members))
        shown = names if verbose or len(names) <= 3 else names[:3] + [f"... {len(names) - 3} more"]
        return f"bucket of {len(members)}: " + ", ".join(shown)
    leaf = record.get("leaf")
    return f"{leaf} at {record['source']}" if leaf else record["source"]


class jit:
    """Compile `fn` for `mesh`: local shards in, local shards out.

    `in_specs` has one entry per argument (a P for every leaf, or a tree of P's); `out_specs`
    likewise for the outputs. `logical_rules` maps logical axis names used by `constrain` to
    mesh axes. `data_argnums` names the arguments that are data (the batch: tokens, float masks,
    pixels; every leaf in them); by default the arguments holding an integer tensor of at least one
    dim (token ids; not a 0-dim step counter).
    `data_axes` defaults to the axes that split a data argument; every other axis is a model axis.
    The schedule passes (`sharding.schedule`) are on by default: `regather` (ZeRO-3 gathers a
    parameter again for its backward use), `bucket_bytes` (merge small collectives up to this
    many bytes per bucket; 0 disables; `bucket_per_layer`: a bucket never mixes two layers' leaves,
    FSDP2's per-block unit) and `overlap` (issue early, wait late, prefetch gathers).
    `remat` is the activation-checkpointing policy applied to the traced step before propagation
    (`sharding.remat`: "none", "full" or "selective"); under "full" or "selective" an activation
    all-gathered for the forward (sequence parallelism's norm output) is also gathered again for
    its backward use instead of kept (`schedule.regather`, as Megatron-LM does).

    `in_memory_kinds` / `out_memory_kinds` give each leaf a memory kind, "device" (the default,
    also for None) or "host", as a tree prefix like the specs (a str for a whole argument). A
    host input is a CPU tensor that stays there; the placement pass (`sharding.placement`) runs
    the ops that update it on host and inserts the device<->host copies (ZeRO-Offload). "disk"
    (ZeRO-Infinity's NVMe tier) is a host value stored in a memory-mapped file in `disk_dir`
    (`sharding.disk`: read into host memory before each use, outputs written to new files).

    `pipeline` (`sharding.Pipeline`) runs the step as a pipeline over one mesh axis: specs place
    values on its stages (`P(..., stage=("pp", k))`), each op runs on the stage of its inputs, a
    value read on another rank is sent there, and the step's `sharding.microbatch` blocks run in
    the schedule's order (`sharding.stages`). A rank passes, and gets back, a meta tensor for a
    value another stage holds (what `shard` gives it).
    """

    def __init__(self, fn: Callable, *, mesh: Mesh, in_specs: Sequence, out_specs,
                 logical_rules: Mapping[str, Any] | None = None, data_axes: Sequence[str] | None = None,
                 data_argnums: int | Sequence[int] | None = None,
                 regather: bool = True, bucket_bytes: int = DEFAULT_BUCKET_BYTES, overlap: bool = True,
                 in_memory_kinds: Sequence | None = None, out_memory_kinds=None, remat: str = "none",
                 pipeline: Pipeline | None = None, disk_dir=None, bucket_per_layer: bool = False):
        self.fn = fn
        self.pipeline = pipeline
        if pipeline is not None and pipeline.axis not in mesh.axis_names:
            raise SpecError(f"the pipeline runs over axis {pipeline.axis!r}, which is not a mesh axis "
                            f"{mesh.axis_names}")
        self.remat = check_policy(remat)
        self.mesh = mesh
        self.in_specs = tuple(in_specs) if isinstance(in_specs, (list, tuple)) and not isinstance(in_specs, P) \
            else (in_specs,)
        self.out_specs = out_specs
        self.logical_rules = dict(logical_rules or {})
        self.data_axes = data_axes
        self.data_argnums = (data_argnums,) if isinstance(data_argnums, int) else data_argnums
        for argnum in self.data_argnums or ():
            if not 0 <= argnum < len(self.in_specs):
                raise SpecError(f"data_argnums names argument {argnum}, but the function has "
                                f"{len(self.in_specs)} arguments (one per in_specs entry)")
        self.schedule_options = {"regather_params": regather, "regather_activations": self.remat != "none",
                                 "bucket_bytes": bucket_bytes, "overlap_communication": overlap,
                                 "bucket_per_layer": bucket_per_layer}
        self.in_memory_kinds = tuple(in_memory_kinds) if isinstance(in_memory_kinds, (list, tuple)) \
            else (in_memory_kinds,) * len(self.in_specs)
        if len(self.in_memory_kinds) != len(self.in_specs):
            raise SpecError(f"in_memory_kinds has {len(self.in_memory_kinds)} entries but in_specs has "
                            f"{len(self.in_specs)}; give one kind (or tree of kinds) per argument")
        self.out_memory_kinds = out_memory_kinds
        for where, kinds in (("in_memory_kinds", self.in_memory_kinds), ("out_memory_kinds", out_memory_kinds)):
            for kind in optree.tree_leaves(kinds, namespace=NAMESPACE, none_is_leaf=False):
                check_kind(kind, where)
        uses_disk = DISK in optree.tree_leaves((self.in_memory_kinds, out_memory_kinds), namespace=NAMESPACE)
        self.disk_dir = check_disk_dir(disk_dir) if uses_disk else None
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

    def program(self, *args) -> Program:
        """The step before any stage has run: what `sharding.pipeline.run_stages` takes."""
        given = optree.tree_leaves(self.in_memory_kinds, none_is_leaf=True, namespace=NAMESPACE)
        in_kinds = (flat_kinds(self.in_memory_kinds, tuple(args), "in_memory_kinds") if {HOST, DISK} & set(given) else
                    [DEVICE] * len(optree.tree_leaves(tuple(args), namespace=NAMESPACE, none_is_leaf=False)))
        compute_device = _compute_device(args, in_kinds)
        in_stages = stage_indices(flat_in_specs(self.in_specs, args), self.pipeline, "in_specs")
        leaves = optree.tree_leaves(tuple(args), namespace=NAMESPACE, none_is_leaf=False)
        meta_inputs = any(isinstance(x, torch.Tensor) and x.device.type == "meta" for x in leaves)
        if {HOST, DISK} & set(in_kinds) and self.pipeline is not None:
            raise SpecError("memory kinds 'host' and 'disk' (offload) under a pipeline are not supported yet; "
                            "use in_memory_kinds='device' with a pipeline")
        options = Options(
            in_specs=self.in_specs, out_specs=self.out_specs, logical_rules=self.logical_rules,
            data_axes=self.data_axes, data_leaves=data_leaves(args, self.data_argnums), remat=self.remat,
            schedule=self.schedule_options, in_kinds=in_kinds, out_memory_kinds=self.out_memory_kinds,
            compute_device=compute_device, pipeline=self.pipeline, in_stages=in_stages, meta_inputs=meta_inputs,
            disk_dir=self.disk_dir)
        return Program(fn=self.fn, args=tuple(args), mesh=self.mesh, options=options)

    def _lower(self, args) -> Lowered:
        program = run_stages(self.program(*args))
        timings = dict(program.timings)
        timings["partition_s"] = sum(seconds for key, seconds in timings.items() if key != "trace_s")
        return Lowered(graph=program.graph, collectives=collective_log(program.graph),
                       out_treedef=program.traced.out_treedef, global_graph=program.global_graph,
                       transfers=transfer_log(program.graph), example_inputs=program.example_inputs,
                       timings=timings)


def data_leaves(args, data_argnums) -> list[bool]:
    """Per input leaf: is it data? Every leaf of a data argument is; by default the data arguments
    are those holding an integer tensor with at least one dim (token ids; a float mask beside them is
    data too). A 0-dim integer is a counter, not data: AdamW's step count does not make the
    optimizer state data, which would gather every weight its moments meet."""
    per_argument = [optree.tree_leaves(arg, namespace=NAMESPACE, none_is_leaf=False) for arg in args]
    if data_argnums is None:
        data_argnums = [i for i, leaves in enumerate(per_argument) if any(is_integer(x) and x.dim() > 0
                                                                           for x in leaves)]
    return [i in data_argnums for i, leaves in enumerate(per_argument) for _ in leaves]


def _compute_device(args, in_kinds: list[str]) -> torch.device:
    """Where device compute runs: the device of the device-kind inputs (their common one).

    Host inputs must be CPU tensors: a host leaf on an accelerator would run the host update there.
    """
    leaves = optree.tree_leaves(tuple(args), namespace=NAMESPACE, none_is_leaf=False)
    paths = leaf_paths(tuple(args))[0]
    devices = {x.device for x, kind in zip(leaves, in_kinds)
               if kind == DEVICE and isinstance(x, torch.Tensor) and x.device.type != "meta"}
    for path, x, kind in zip(paths, leaves, in_kinds):
        if kind in (HOST, DISK) and isinstance(x, torch.Tensor) and x.device.type != "cpu":
            raise SpecError(f"input {path!r} has memory kind {kind!r} but lives on {x.device}; host "
                            f"and disk tensors are CPU tensors (move it with .cpu(), or sharding.disk.to_disk)")
    accelerators = {d for d in devices if d.type != "cpu"}
    return next(iter(accelerators)) if accelerators else torch.device("cpu")


def flat_in_specs(in_specs: tuple, args) -> list:
    """One spec per flat input leaf."""
    return [spec for position, (arg, specs) in enumerate(zip(args, in_specs))
            for spec in flat_specs(specs, arg, f"argument {position}")]
