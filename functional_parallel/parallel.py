"""From a strategy (data: YAML rules) to specs and one compiled train step. No strategy is code.

A strategy names its example mesh, a batch spec, logical-axis rules for `constrain`
(activations; a name they lack falls back to `param_axes`), parameter rules and (optionally) optimizer-state rules. A parameter's spec comes
from, in order: the first `params` rule whose leaf-path regex matches (the whole spec); else its
model's logical axes (`Model.axes`: `("embed", "heads")` for a q projection) mapped through
`param_axes` (logical name -> mesh axes; a mesh axis is used once per leaf, by its first dim);
then `fsdp`: its axes split the first dim the rules above left whole (ZeRO-3), or, where every dim
is split already, nest inside dim 0's split (FSDP over TP: the tp block split over dp).
State leaves that mirror a parameter (Adam's mu/nu, SGD momentum) take the state rules if given,
else that parameter's spec; other state is replicated. Optional `grads` rules name the layout of
the gradient buffer a strategy keeps between micro-batches; only the planner reads them (one
compiled step reduces each gradient straight into the optimizer-state layout, so ZeRO-1 and ZeRO-2
lower to the same program). Strategies are discovered as `conf/strategy/*.yaml` (and the
`strategy/` folder of every config dir on Hydra's search path).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Mapping, Optional

import optree

from sharding import Mesh, P, Pipeline, chunked, jit, striped
from sharding.tree import NAMESPACE, leaf_paths

from . import config_dirs
from .tree import tree_unflatten


@dataclass
class StrategyConfig:
    """The schema of a strategy file (`conf/strategy/*.yaml`): Hydra checks every file and override
    against it, and `Strategy.from_dict` accepts its keys only.

    `params` rules are `[leaf-path regex, spec]`; a spec lists one entry per tensor dim: a mesh
    axis, a list of axes, `{striped: axis}` (the dim dealt out element by element), or null (replicated). `param_axes` maps the model's logical parameter
    axes to mesh axes; `fsdp` splits what those leave whole. `example_mesh` is the mesh the
    strategy is shown, compared and tested on.
    """

    name: str = "dp"
    example_mesh: Dict[str, int] = field(default_factory=dict)
    batch: List[Any] = field(default_factory=lambda: ["dp"])
    logical: Dict[str, Any] = field(default_factory=lambda: {"batch": "dp"})
    param_axes: Dict[str, Any] = field(default_factory=dict)
    fsdp: List[str] = field(default_factory=list)
    params: List[Any] = field(default_factory=list)
    opt_state: Optional[List[Any]] = None  # null: optimizer state follows the parameter rules
    grads: Optional[List[Any]] = None  # the gradient buffer's layout (read by the planner); null: as opt_state
    # A pipeline over a mesh axis: {axis: pp, layers: <regex whose group 1 is a leaf's layer index>,
    # first: <regex of the leaves before the first layer (embeddings)>}; null: no pipeline.
    pipeline: Optional[Dict[str, Any]] = None
    # Mesh axes that split each optimizer-state leaf further than its parameter's layout (on its first
    # whole dim, as `fsdp` does for parameters): ZeRO-1 over any parameter layout (BLOOM: ZeRO-1 over TP).
    state_fsdp: List[str] = field(default_factory=list)


STRATEGY_KEYS = tuple(f.name for f in fields(StrategyConfig))


def available_strategies() -> list[str]:
    """Every strategy file's name (sorted): `conf/strategy/*.yaml` and those on Hydra's search path."""
    return config_dirs.names("strategy")


def example_mesh(name: str) -> dict[str, int]:
    """The mesh strategy `name` is shown and tested on (its file's `example_mesh`)."""
    return dict(Strategy.load(name).example_mesh)


def _entry(value):
    """A spec entry from YAML: an axis, a list of axes, or `{striped: axis}` (`sharding.striped`)."""
    if isinstance(value, Mapping):
        if set(value) != {"striped"}:
            raise ValueError(f"a spec entry given as a mapping must be {{striped: <axis>}}, got {dict(value)}")
        return striped(value["striped"])
    return tuple(_entry(v) for v in value) if isinstance(value, (list, tuple)) else value


def _spec(entries) -> P:
    if isinstance(entries, P):
        return entries
    return P(*[_entry(e) for e in (entries or [])])


def _rules(raw) -> list[tuple[str, P]]:
    return [(pattern, _spec(entries)) for pattern, entries in (raw or [])]


def _axes_list(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class Strategy:
    name: str
    batch: P
    logical: Mapping[str, Any] = field(default_factory=dict)
    params: tuple = ()
    opt_state: tuple | None = None
    grads: tuple | None = None
    param_axes: Mapping[str, tuple] = field(default_factory=dict)  # logical parameter axis -> mesh axes
    fsdp: tuple = ()  # mesh axes that split what the rules leave whole (ZeRO-3)
    example_mesh: Mapping[str, int] = field(default_factory=dict)
    pipeline: Mapping[str, str] | None = None  # {axis, layers, first}: see StrategyConfig
    state_fsdp: tuple = ()  # mesh axes that split the optimizer state further than its parameter (ZeRO-1/2)

    @property
    def pipeline_axis(self) -> str | None:
        return self.pipeline["axis"] if self.pipeline else None

    @property
    def constrain_rules(self) -> dict:
        """What a logical name in a model's `constrain` means: `logical`, else `param_axes` (a name
        means the same for activations and parameters, as in Flax's logical axis rules: tp's
        `heads` splits q's heads as it splits the q projection's columns)."""
        return {**self.param_axes, **self.logical}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Strategy":
        unknown = set(d) - set(STRATEGY_KEYS)
        if unknown:
            raise ValueError(f"strategy {d.get('name')!r}: unknown keys {sorted(unknown)}; "
                             f"expected {list(STRATEGY_KEYS)}")
        logical = {k: _entry(v) for k, v in dict(d.get("logical") or {}).items()}
        mesh = dict(d.get("example_mesh") or {})
        bad = {axis: size for axis, size in mesh.items() if not isinstance(size, int) or size < 1}
        if bad:
            raise ValueError(f"strategy {d.get('name')!r}: example_mesh sizes must be positive ints, got {bad}")
        return cls(name=d["name"], batch=_spec(d.get("batch")), logical=logical, params=tuple(_rules(d.get("params"))),
                   opt_state=None if d.get("opt_state") is None else tuple(_rules(d["opt_state"])),
                   grads=None if d.get("grads") is None else tuple(_rules(d["grads"])),
                   param_axes={k: _axes_list(v) for k, v in dict(d.get("param_axes") or {}).items()},
                   fsdp=_axes_list(d.get("fsdp")), example_mesh=mesh, pipeline=_pipeline(d),
                   state_fsdp=_axes_list(d.get("state_fsdp")))

    @classmethod
    def load(cls, name: str) -> "Strategy":
        return cls.from_dict(config_dirs.load("strategy", name))

    def param_mesh_axes(self) -> list[str]:
        """The mesh axes parameters may be split over (regex rules, logical axes, fsdp), sorted."""
        axes = {axis for _, spec in self.params for axis in spec.all_axes()} | set(self.fsdp)
        return sorted(axes.union(*self.param_axes.values()))

    def state_mesh_axes(self) -> list[str]:
        """The mesh axes optimizer state may be split over, sorted."""
        if self.opt_state is None:
            return sorted(set(self.param_mesh_axes()) | set(self.state_fsdp))
        return sorted({axis for _, spec in self.opt_state for axis in spec.all_axes()})

    def batch_dim_axes(self) -> tuple[str, ...]:
        """The mesh axes that split the batch dim (a later dim of `batch`, the sequence under
        Ulysses or ring attention, is not the batch)."""
        return self.batch.axes_of(0) if len(self.batch) else ()

    def model_axes(self) -> list[str]:
        """The mesh axes that split the model (parameters or activations) but not the batch, sorted."""
        activations = P(*(axes for name, axes in self.logical.items() if name != "batch")).all_axes()
        return sorted((set(self.param_mesh_axes()) | set(activations)) - set(self.batch.all_axes()))

    def mesh_axes(self) -> set[str]:
        """Every mesh axis the strategy names (its batch, logical and parameter rules)."""
        named = set(self.batch.all_axes()) | set(P(*self.logical.values()).all_axes()) | set(self.fsdp)
        named |= ({self.pipeline_axis} if self.pipeline_axis else set()) | set(self.state_fsdp)
        for axes in self.param_axes.values():
            named.update(axes)
        for _, spec in (*self.params, *(self.opt_state or ()), *(self.grads or ())):
            named.update(spec.all_axes())
        return named


PIPELINE_KEYS = ("axis", "layers", "first")


def _pipeline(d: Mapping) -> dict | None:
    raw = d.get("pipeline")
    if raw is None:
        return None
    raw = dict(raw)
    if set(raw) != set(PIPELINE_KEYS):
        raise ValueError(f"strategy {d.get('name')!r}: pipeline must give exactly {list(PIPELINE_KEYS)}, got "
                         f"{sorted(raw)}")
    for key in ("layers", "first"):
        try:
            pattern = re.compile(raw[key])
        except re.error as error:
            raise ValueError(f"strategy {d.get('name')!r}: pipeline.{key} is not a regex: {error}") from None
        if key == "layers" and pattern.groups < 1:
            raise ValueError(f"strategy {d.get('name')!r}: pipeline.layers needs a group that captures the "
                             f"layer index, e.g. 'blocks/(\\d+)/'")
    return raw


def param_stages(strategy: Strategy, paths: list[str], stages: int) -> list[int]:
    """Each parameter's pipeline stage: a leaf of layer i (of L, `pipeline.layers`) on stage
    floor(i * stages / L); a leaf before the layers (`pipeline.first`, the embeddings) on stage 0;
    every other leaf (the final norm, the head) on the last stage."""
    layers = re.compile(strategy.pipeline["layers"])
    first = re.compile(strategy.pipeline["first"])
    index = {path: int(found.group(1)) for path in paths if (found := layers.search(path))}
    count = len(set(index.values()))
    if count < stages:
        raise ValueError(f"strategy {strategy.name!r} pipelines the model over {stages} stages, but it has "
                         f"{count} layers (leaves matching pipeline.layers {strategy.pipeline['layers']!r}); "
                         f"use at most {count} stages (pipeline axis x virtual stages)")
    order = {layer: rank for rank, layer in enumerate(sorted(set(index.values())))}
    return [order[index[path]] * stages // count if path in index else 0 if first.search(path) else stages - 1
            for path in paths]


def _first_match(rules, path: str) -> P | None:
    return next((spec for pattern, spec in rules if re.search(pattern, path)), None)


def _from_logical(strategy: Strategy, names: tuple) -> list:
    """Spec entries for one leaf's logical axes: each dim's mesh axes, a mesh axis used once (first dim wins)."""
    used: set[str] = set()
    entries: list = []
    for name in names:
        blocks = 1
        if isinstance(name, (tuple, list)):
            name, blocks = name
        axes = strategy.param_axes.get(name, ()) if name is not None else ()
        if not axes or used & set(axes):
            entries.append(None)
            continue
        used.update(axes)
        if blocks > 1:
            if len(axes) > 1:
                raise ValueError(f"strategy {strategy.name!r}: logical axis {name!r} of {blocks} packed blocks maps "
                                 f"to {list(axes)}; a packed dim splits over one mesh axis")
            entries.append(chunked(axes[0], blocks))
        else:
            entries.append(axes if len(axes) > 1 else axes[0])
    return entries


def _with_fsdp(strategy: Strategy, entries: list, axes: tuple | None = None) -> list:
    """`fsdp` axes (or `axes`) on the first whole dim; where none is whole, nested inside dim 0's split."""
    fsdp = tuple(a for a in (strategy.fsdp if axes is None else axes) if a not in P(*entries).all_axes())
    if not fsdp or not entries:
        return entries
    free = next((dim for dim, entry in enumerate(entries) if entry is None), None)
    if free is not None:
        entries[free] = fsdp if len(fsdp) > 1 else fsdp[0]
    elif not isinstance(entries[0], chunked):  # a packed split keeps its blocks whole: no nesting
        entries[0] = (*P(entries[0]).axes_of(0), *fsdp)
    return entries


def leaf_spec(strategy: Strategy, path: str, ndim: int, names: tuple | None) -> P:
    """One parameter's spec (the order of the module docstring)."""
    matched = _first_match(strategy.params, path)
    if matched is not None:
        return matched
    names = tuple(names) if names is not None else (None,) * ndim
    if len(names) != ndim:
        raise ValueError(f"parameter {path!r} has {ndim} dims but its model names {len(names)} logical axes {names}")
    entries = _with_fsdp(strategy, _from_logical(strategy, names))
    while entries and entries[-1] is None:  # P() for a replicated leaf, as a regex rule writes it
        entries.pop()
    return P(*entries)


def param_specs(strategy: Strategy, params, axes=None, stages: int | None = None):
    """Every parameter's spec; `axes`: the model's logical axes (`Model.axes(params)`), needed when
    the strategy has `param_axes`; `stages`: the pipeline's stage count (its axis size times the
    virtual stages per rank), needed when the strategy has a pipeline."""
    paths, leaves, treedef = leaf_paths(params)
    names = _axes_by_path(strategy, params, axes)
    specs = [leaf_spec(strategy, path, leaf.dim(), names.get(path)) for path, leaf in zip(paths, leaves)]
    if strategy.pipeline:
        if stages is None:
            raise ValueError(f"strategy {strategy.name!r} is a pipeline over {strategy.pipeline_axis!r}: give "
                             f"its stage count (the axis size x virtual stages per rank)")
        axis = strategy.pipeline_axis
        specs = [spec.on_stage((axis, stage)) for spec, stage in zip(specs, param_stages(strategy, paths, stages))]
    return tree_unflatten(treedef, specs)


def _axes_by_path(strategy: Strategy, params, axes) -> dict:
    if axes is None:
        if strategy.param_axes:
            raise ValueError(f"strategy {strategy.name!r} maps logical parameter axes ({sorted(strategy.param_axes)}) "
                             f"but no axes were given: pass the model's `axes(params)` (Model.axes)")
        return {}
    paths, _, _ = leaf_paths(params)
    axis_paths, named, _ = optree.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple),
                                                         namespace=NAMESPACE, none_is_leaf=False)
    by_path = {"/".join(str(k) for k in path): names for path, names in zip(axis_paths, named)}
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ValueError(f"the model's axes name no logical axes for parameters {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}; axes(params) must mirror params")
    return by_path


def param_logical_axes(model, params):
    """The model's logical parameter axes (`Model.axes(params)`), or None for a model that names none."""
    axes = getattr(model, "axes", None)
    return axes(params) if axes is not None else None


def grad_specs(strategy: Strategy, params) -> list[P | None]:
    """One spec per parameter leaf (flat) for the gradient buffer, or None everywhere when the
    strategy keeps gradients in the optimizer-state layout (no `grads` rules)."""
    paths = leaf_paths(params)[0]
    if strategy.grads is None:
        return [None] * len(paths)
    return [_first_match(strategy.grads, path) or P() for path in paths]


def state_specs(strategy: Strategy, opt_state, params, axes=None, stages: int | None = None):
    """Specs for the optimizer state: a leaf that mirrors a parameter (its path ends with the
    parameter's, same shape) takes the `opt_state` rules, or without them the parameter's spec;
    under a pipeline it lives on its parameter's stage."""
    param_paths, param_leaves, _ = leaf_paths(params)
    shapes = {path: tuple(leaf.shape) for path, leaf in zip(param_paths, param_leaves)}
    pspecs = dict(zip(param_paths, leaf_paths(param_specs(strategy, params, axes, stages))[1]))
    if strategy.opt_state is None and strategy.state_fsdp:
        def spec_of(path):  # the parameter's layout, then split further over `state_fsdp` (ZeRO-1 over TP)
            entries = list(pspecs[path]) + [None] * (len(shapes[path]) - len(pspecs[path]))
            return P(*_with_fsdp(strategy, entries, strategy.state_fsdp), stage=pspecs[path].stage)
    elif strategy.opt_state is None:
        spec_of = pspecs.__getitem__
    else:
        spec_of = lambda path: (_first_match(strategy.opt_state, path) or P()).on_stage(  # noqa: E731
            pspecs[path].stage)
    paths, leaves, treedef = leaf_paths(opt_state)
    specs = []
    for path, leaf in zip(paths, leaves):
        mirrored = next((p for p in param_paths if path.endswith("/" + p) and shapes[p] == tuple(leaf.shape)), None)
        specs.append(spec_of(mirrored) if mirrored is not None else P())
    return tree_unflatten(treedef, specs)


OFFLOAD = ("none", "optimizer", "params", "disk")  # params: parameters too; disk: both in files (ZeRO-Infinity)


def check_offload(offload: str) -> str:
    """`offload` if it is one of OFFLOAD, else a ValueError saying what is allowed."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    return offload


def state_memory_kind(offload: str) -> str:
    """The memory kind of every optimizer-state leaf: "host" (ZeRO-Offload), "disk" with offload="disk"."""
    return {"none": "device", "disk": "disk"}.get(check_offload(offload), "host")


def param_memory_kind(offload: str) -> str:
    """The memory kind of every parameter leaf: "host" with offload="params", "disk" with "disk" (ZeRO-Infinity)."""
    return {"params": "host", "disk": "disk"}.get(check_offload(offload), "device")


def compile_step(step: Callable, strategy: Strategy, mesh: Mesh, params, opt_state, offload: str = "none",
                 axes=None, schedule: str = "1f1b", virtual: int = 1, offload_dir=None, **jit_options):
    """`jit` of `step(params, opt_state, batch) -> (params, opt_state, metrics)` under `strategy`.

    `jit_options` go to `jit` (the schedule passes' settings, `remat`: the activation-checkpointing
    policy). Returns (compiled step,
    (param specs, state specs, batch spec)). A step built with `grad_accum=N` first checks that
    each rank's share of the batch splits into N micro-batches (at trace time, before any
    collective runs). `offload="optimizer"` gives every optimizer-state leaf, in and out, the
    memory kind "host": the state stays in CPU memory and its update runs there
    (`sharding.placement`); pass the state as CPU tensors. `offload="params"` also keeps the
    parameters there: each comes up once per window of use, its gradient goes down; "disk" keeps
    both in memory-mapped files in `offload_dir` (`sharding.disk`; pass them made by
    `sharding.disk.to_disk`). `axes`: the
    model's logical parameter axes (`Model.axes(params)`), read by the strategy's `param_axes`. A
    strategy with a pipeline runs the step's micro-batches (its `grad_accum`) by `schedule` with
    `virtual` stages per rank.
    """
    stages, pipelined = pipeline_of(strategy, mesh, schedule, virtual)
    pspecs = param_specs(strategy, params, axes, stages)
    sspecs = state_specs(strategy, opt_state, params, axes, stages)
    step = _with_local_batch_check(step, strategy.batch, mesh)
    kinds = (param_memory_kind(offload), state_memory_kind(offload), "device")
    compiled = jit(step, mesh=mesh, in_specs=(pspecs, sspecs, strategy.batch), out_specs=(pspecs, sspecs, P()),
                   logical_rules=strategy.constrain_rules, in_memory_kinds=kinds, out_memory_kinds=kinds,
                   data_argnums=2, pipeline=pipelined, disk_dir=offload_dir if offload == "disk" else None,
                   **jit_options)
    return compiled, (pspecs, sspecs, strategy.batch)


def pipeline_of(strategy: Strategy, mesh: Mesh, schedule: str = "1f1b", virtual: int = 1):
    """(stage count, `sharding.Pipeline`) of a pipelined strategy on `mesh`; (None, None) otherwise."""
    if not strategy.pipeline:
        return None, None
    axis = strategy.pipeline_axis
    if axis not in mesh.axis_names:
        raise ValueError(f"strategy {strategy.name!r} pipelines over {axis!r}, which is not a mesh axis {mesh.axis_names}")
    return mesh.axis_size(axis) * virtual, Pipeline(axis=axis, schedule=schedule, virtual=virtual)


def _with_local_batch_check(step: Callable, batch_spec: P, mesh: Mesh) -> Callable:
    grad_accum = getattr(step, "grad_accum", 1)
    if grad_accum == 1:
        return step
    from .train import check_local_batch
    from .tree import tree_leaves

    shards = math.prod(mesh.axis_size(a) for a in batch_spec.axes_of(0)) if len(batch_spec) else 1

    def checked(params, opt_state, batch):
        for leaf in tree_leaves(batch):
            check_local_batch(leaf.shape[0], shards, grad_accum)
        return step(params, opt_state, batch)

    checked.grad_accum = grad_accum
    return checked


def lower_abstract(arch: str, size: str, strategy_name: str, mesh_shape: Mapping[str, int], global_batch: int,
                   optimizer=None, seed: int = 0, grad_accum: int = 1, offload: str = "none", **jit_options):
    """Lower the AdamW train step of a named model under a strategy on an abstract mesh.

    No processes and no collectives run: the result's `.collectives` and `.cost` are what the
    step would do on rank 0 of that mesh. Returns (model, params, lowered).
    """
    import torch

    from sharding import shard

    from . import optim
    from .models import build
    from .train import make_train_step

    model = build(arch, size)
    params = model.init(seed)
    optimizer = optimizer or optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = optimizer.init(params)
    mesh = Mesh.abstract(dict(mesh_shape))
    compiled, (pspecs, sspecs, bspec) = compile_step(make_train_step(model.loss, optimizer, grad_accum),
                                                     Strategy.load(strategy_name), mesh, params, state,
                                                     offload=offload, axes=param_logical_axes(model, params),
                                                     **jit_options)
    tokens = torch.zeros(global_batch, model.cfg.seq_len, dtype=torch.long)
    batch = {"inputs": tokens, "targets": tokens}
    lowered = compiled.lower(shard(params, pspecs, mesh), shard(state, sspecs, mesh), shard(batch, bspec, mesh))
    return model, params, lowered
