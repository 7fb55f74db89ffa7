"""From a strategy (data: YAML rules) to specs and one compiled train step. No strategy is code.

A strategy names a batch spec, logical-axis rules for `constrain`, parameter rules and
(optionally) optimizer-state rules. State leaves that mirror a parameter (Adam's mu/nu, SGD
momentum) take the state rules if given, else that parameter's rule; other state is replicated.
Optional `grads` rules name the layout of the gradient buffer a strategy keeps between
micro-batches; only the planner reads them (one compiled step reduces each gradient straight
into the optimizer-state layout, so ZeRO-1 and ZeRO-2 lower to the same program).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from sharding import Mesh, P, jit
from sharding.tree import leaf_paths

from .tree import tree_unflatten

STRATEGY_DIR = Path(__file__).resolve().parent.parent / "conf" / "strategy"
# The 4-rank mesh each strategy is shown and tested on (dp-only strategies use all 4 ranks for dp).
EXAMPLE_MESHES = {"dp": {"dp": 4, "tp": 1}, "zero1": {"dp": 4, "tp": 1}, "zero2": {"dp": 4, "tp": 1},
                  "zero3": {"dp": 4, "tp": 1}, "tp": {"dp": 2, "tp": 2}, "tp_sp": {"dp": 2, "tp": 2},
                  "fsdp_tp": {"dp": 2, "tp": 2}}


def _spec(entries) -> P:
    if isinstance(entries, P):
        return entries
    return P(*[tuple(e) if isinstance(e, (list, tuple)) else e for e in (entries or [])])


def _rules(raw) -> list[tuple[str, P]]:
    return [(pattern, _spec(entries)) for pattern, entries in (raw or [])]


@dataclass(frozen=True)
class Strategy:
    name: str
    batch: P
    logical: Mapping[str, Any] = field(default_factory=dict)
    params: tuple = ()
    opt_state: tuple | None = None
    grads: tuple | None = None

    @classmethod
    def from_dict(cls, d: Mapping) -> "Strategy":
        known = {"name", "batch", "logical", "params", "opt_state", "grads"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"strategy {d.get('name')!r}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
        logical = {k: (tuple(v) if isinstance(v, list) else v) for k, v in dict(d.get("logical") or {}).items()}
        return cls(name=d["name"], batch=_spec(d.get("batch")), logical=logical, params=tuple(_rules(d.get("params"))),
                   opt_state=None if d.get("opt_state") is None else tuple(_rules(d["opt_state"])),
                   grads=None if d.get("grads") is None else tuple(_rules(d["grads"])))

    @classmethod
    def load(cls, name: str) -> "Strategy":
        path = STRATEGY_DIR / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in STRATEGY_DIR.glob("*.yaml"))
            raise ValueError(f"unknown strategy {name!r}; expected one of {known}")
        return cls.from_dict(yaml.safe_load(path.read_text()))


def _first_match(rules, path: str) -> P | None:
    return next((spec for pattern, spec in rules if re.search(pattern, path)), None)


def param_specs(strategy: Strategy, params):
    paths, leaves, treedef = leaf_paths(params)
    specs = [_first_match(strategy.params, path) or P() for path in paths]
    return tree_unflatten(treedef, specs)


def grad_specs(strategy: Strategy, params) -> list[P | None]:
    """One spec per parameter leaf (flat) for the gradient buffer, or None everywhere when the
    strategy keeps gradients in the optimizer-state layout (no `grads` rules)."""
    paths = leaf_paths(params)[0]
    if strategy.grads is None:
        return [None] * len(paths)
    return [_first_match(strategy.grads, path) or P() for path in paths]


def state_specs(strategy: Strategy, opt_state, params):
    """Specs for the optimizer state: leaves that mirror a parameter follow the strategy's rules."""
    param_paths = {path: leaf for path, leaf in zip(*leaf_paths(params)[:2])}
    paths, leaves, treedef = leaf_paths(opt_state)
    rules = strategy.opt_state if strategy.opt_state is not None else strategy.params
    specs = []
    for path, leaf in zip(paths, leaves):
        mirrored = next((p for p in param_paths if path.endswith("/" + p) and
                         tuple(param_paths[p].shape) == tuple(leaf.shape)), None)
        spec = (_first_match(rules, mirrored) or P()) if mirrored is not None else P()
        specs.append(spec)
    return tree_unflatten(treedef, specs)


OFFLOAD = ("none", "optimizer")


def check_offload(offload: str) -> str:
    """`offload` if it is one of OFFLOAD, else a ValueError saying what is allowed."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    return offload


def state_memory_kind(offload: str) -> str:
    """The memory kind of every optimizer-state leaf: "host" with offload="optimizer" (ZeRO-Offload)."""
    return "host" if check_offload(offload) == "optimizer" else "device"


def compile_step(step: Callable, strategy: Strategy, mesh: Mesh, params, opt_state, offload: str = "none",
                 **jit_options):
    """`jit` of `step(params, opt_state, batch) -> (params, opt_state, metrics)` under `strategy`.

    `jit_options` go to `jit` (the schedule passes' settings, `remat`: the activation-checkpointing
    policy). Returns (compiled step,
    (param specs, state specs, batch spec)). A step built with `grad_accum=N` first checks that
    each rank's share of the batch splits into N micro-batches (at trace time, before any
    collective runs). `offload="optimizer"` gives every optimizer-state leaf, in and out, the
    memory kind "host": the state stays in CPU memory and its update runs there
    (`sharding.placement`); pass the state as CPU tensors.
    """
    state_kind = state_memory_kind(offload)
    pspecs, sspecs = param_specs(strategy, params), state_specs(strategy, opt_state, params)
    step = _with_local_batch_check(step, strategy.batch, mesh)
    kinds = ("device", state_kind, "device")
    compiled = jit(step, mesh=mesh, in_specs=(pspecs, sspecs, strategy.batch), out_specs=(pspecs, sspecs, P()),
                   logical_rules=strategy.logical, in_memory_kinds=kinds, out_memory_kinds=kinds,
                   data_argnums=2, **jit_options)
    return compiled, (pspecs, sspecs, strategy.batch)


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
                                                     offload=offload, **jit_options)
    tokens = torch.zeros(global_batch, model.cfg.seq_len, dtype=torch.long)
    batch = {"inputs": tokens, "targets": tokens}
    lowered = compiled.lower(shard(params, pspecs, mesh), shard(state, sspecs, mesh), shard(batch, bspec, mesh))
    return model, params, lowered
