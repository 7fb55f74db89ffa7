"""Plan a pipelined strategy at cluster scale: one stage's memory and traffic per rank.

A pipeline stage is the strategy without its pipeline on the mesh without its pipeline axis,
holding its share of the layers. So the stage model is lowered as `planner.plan_strategy` lowers
any strategy (one micro-batch, on fake tensors, depth d and d + 1, extrapolated per layer), and the
first stage's figures are composed from what that lowering reads:
- model states: each parameter leaf on the first rank (its layers by the strategy's `pipeline`
  rule, and the embeddings) at its local layout, bytes by role as `planner.account` counts them;
- activations: one layer's saved activations per micro-batch (the lowered per-layer figure), times
  the layers of one chunk, times the micro-batch chunks the schedule keeps alive on the first rank
  at once (`sharding.schedules.in_flight`, which the lowered pipelines match:
  tests/sharding/test_pipeline_split.py);
- point-to-point traffic: the residual stream of one micro-batch sent forward and its gradient
  received back, once per micro-batch and stage boundary (the lowered pipelines send exactly this);
  tensor parallelism's collectives: the lowered per-layer bytes, per micro-batch and layer of the rank.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import torch

from sharding import Mesh
from sharding.layout import layout_from_spec
from sharding.schedules import bubble_formula, build as build_schedule, in_flight
from sharding.tree import flat_specs, leaf_paths

from .parallel import Strategy, param_logical_axes, param_specs, param_stages, state_specs
from .planner import Precision, plan_strategy

ROLES = ("params", "grads", "optimizer")


def _local_numel(shape, spec, mesh: Mesh) -> int:
    layout = layout_from_spec(spec, tuple(shape), mesh.axis_names, mesh.axis_sizes)
    return math.prod(layout.local_shape(tuple(shape), mesh.axis_sizes))


def model_states(model, strategy: Strategy, stage_mesh: Mapping[str, int], precision: Precision,
                 keep) -> dict[str, int]:
    """Bytes per rank by role of the parameter leaves `keep(path)` selects: params; the gradient
    buffer, in the parameter's layout (the micro-batches' gradients add up there and are reduced once
    per step, into the optimizer state's layout: ZeRO-1's full gradients); optimizer state (master
    copy and Adam m, v)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from . import optim

    mesh = Mesh.abstract(dict(stage_mesh))
    with FakeTensorMode():
        params = model.init(0, dtype=precision.compute_dtype)
        state = optim.adamw(1e-4).init(params)
    axes = param_logical_axes(model, params)
    paths, leaves, _ = leaf_paths(params)
    pspecs = flat_specs(param_specs(strategy, params, axes), params)
    state_paths, state_leaves, _ = leaf_paths(state)
    sspecs = dict(zip(state_paths, flat_specs(state_specs(strategy, state, params, axes), state)))
    out = dict.fromkeys(ROLES, 0)
    for path, leaf, spec in zip(paths, leaves, pspecs):
        if not keep(path):
            continue
        mirror = next(sspecs[p] for p, x in zip(state_paths, state_leaves)
                      if p.endswith("/" + path) and tuple(x.shape) == tuple(leaf.shape))
        state_numel, param_numel = _local_numel(leaf.shape, mirror, mesh), _local_numel(leaf.shape, spec, mesh)
        out["params"] += param_numel * precision.param_bytes
        out["grads"] += param_numel * precision.grad_bytes  # summed over the micro-batches, reduced once per step
        out["optimizer"] += state_numel * (precision.master_bytes + 2 * precision.state_bytes)
    return out


def plan_pipeline(build_model, layers: int, strategy: Strategy, mesh_shape: Mapping[str, int], micro_batch: int,
                  precision: Precision, schedule: str, microbatches: int, virtual: int = 1, depth: int | None = 1,
                  remat: str = "none") -> dict:
    """The first pipeline rank's figures (memory by role, p2p bytes per step) and how they were composed."""
    axis = strategy.pipeline_axis
    p = mesh_shape[axis]
    stages = p * virtual
    stage_mesh = {a: n for a, n in mesh_shape.items() if a != axis}
    flat = dataclasses.replace(strategy, pipeline=None)
    dp = math.prod(stage_mesh[a] for a in flat.batch_dim_axes() if a in stage_mesh)
    lowered = plan_strategy(build_model, layers, flat, stage_mesh, micro_batch * dp, precision, depth, remat)
    model = build_model(layers)
    with torch.device("meta"):
        paths = leaf_paths(model.init(0))[0]
    placed = dict(zip(paths, param_stages(strategy, paths, stages)))
    first_rank = {path for path, stage in placed.items() if stage % p == 0}
    layer_of = re.compile(strategy.pipeline["layers"])
    rank_layers = len({int(m.group(1)) for path in first_rank if (m := layer_of.search(path))})
    states = model_states(model, flat, stage_mesh, precision, first_rank.__contains__)
    chunks_alive = in_flight(build_schedule(schedule, p, microbatches, virtual))[0]
    layer_activations = lowered.per_layer["activations"]  # one layer, one micro-batch
    activations = chunks_alive * (rank_layers // virtual) * layer_activations
    stream = micro_batch * model.cfg.seq_len * model.cfg.d_model * precision.param_bytes
    figures = {**states, "activations": activations,
               "comm/pp/p2p/bytes": microbatches * stream * (1 if p > 1 else 0),
               "comm/pp/p2p/count": microbatches * (1 if p > 1 else 0)}
    for key, per_layer in lowered.per_layer.items():  # tensor parallelism's collectives: per layer, per micro-batch
        if key.startswith("comm/tp/") and key.endswith("/bytes") and "/forward/" not in key:
            figures[key] = microbatches * rank_layers * per_layer
    return {"strategy": strategy.name, "mesh": dict(mesh_shape), "schedule": schedule, "microbatches": microbatches,
            "virtual": virtual, "stages": stages, "rank_layers": rank_layers, "layers": layers,
            "chunks_alive_first_rank": chunks_alive, "layer_activation_bytes": layer_activations,
            "figures": figures, "total_bytes": sum(figures[r] for r in (*ROLES, "activations")),
            "bubble_formula": bubble_formula(schedule, p, microbatches, virtual),
            "stage_lowering_s": round(lowered.seconds, 2), "lowered_depths": list(lowered.lowered_depths)}
