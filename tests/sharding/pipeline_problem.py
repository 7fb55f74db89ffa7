"""A pipelined train step of a tiny project model under a strategy file, and its single-process reference.

The step accumulates gradients over `microbatches` micro-batches (each under `sharding.microbatch`),
as `functional_parallel.train` does, and also returns the mean gradient, so a test can compare
loss, gradients and parameters after a few steps with the reference.
"""
from __future__ import annotations

import time

import torch

from functional_parallel import optim
from functional_parallel.models import build
from functional_parallel.parallel import Strategy, param_logical_axes, param_specs, pipeline_of, state_specs
from functional_parallel.train import microbatches as split_batch
from functional_parallel.tree import tree_map
from sharding import Mesh, P, jit, microbatch, shard, unshard


def make_problem(arch: str, microbatches: int, n_layers: int = 2, rows_per_microbatch: int = 4):
    """Model, float64 params, AdamW state, a fixed batch and the step (also returning the mean gradient)."""
    model = build(arch, "tiny", n_layers=n_layers)
    params = model.init(0, dtype=torch.float64)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    opt_state = optimizer.init(params)
    generator = torch.Generator().manual_seed(1)
    rows = rows_per_microbatch * microbatches
    tokens = torch.randint(0, model.cfg.vocab_size, (rows, model.cfg.seq_len + 1), generator=generator)
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    grad_and_loss = torch.func.grad_and_value(model.loss)

    def step(params, opt_state, batch):
        grads = loss = None
        for index, micro in enumerate(split_batch(batch, microbatches)):
            with microbatch(index):
                g, l = grad_and_loss(params, micro)
                grads = g if grads is None else tree_map(torch.add, grads, g)
                loss = l if loss is None else loss + l
        grads = tree_map(lambda g: g / microbatches, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state, {"loss": loss / microbatches, "grads": grads}

    return model, step, params, opt_state, batch


def reference(arch: str, microbatches: int, n_layers: int = 2, steps: int = 3) -> dict:
    from .equivalence import run_single_process

    return run_single_process(*make_problem(arch, microbatches, n_layers)[1:], steps)


def compile_pipeline(arch: str, strategy_name: str, mesh: Mesh, schedule: str, microbatches: int,
                     virtual: int = 1, n_layers: int = 2, **jit_options):
    """The compiled step on `mesh` (real or abstract) and this rank's local inputs."""
    model, step, params, opt_state, batch = make_problem(arch, microbatches, n_layers)
    strategy = Strategy.load(strategy_name)
    stages, pipeline = pipeline_of(strategy, mesh, schedule, virtual)
    axes = param_logical_axes(model, params)
    pspecs = param_specs(strategy, params, axes, stages)
    sspecs = state_specs(strategy, opt_state, params, axes, stages)
    compiled = jit(step, mesh=mesh, in_specs=(pspecs, sspecs, strategy.batch),
                   out_specs=(pspecs, sspecs, {"loss": P(), "grads": pspecs}),
                   logical_rules=strategy.constrain_rules, pipeline=pipeline, **jit_options)
    local = (shard(params, pspecs, mesh), shard(opt_state, sspecs, mesh), shard(batch, strategy.batch, mesh))
    return compiled, local, pspecs


def run_pipeline(rank: int, world: int, runs: list, steps: int = 3) -> list:
    """On each rank: every (arch, strategy, mesh shape, schedule, microbatches, virtual, n_layers) of
    `runs`, `steps` steps each; loss, gradients and parameters unsharded, in the order of `runs`."""
    results = []
    for run in runs:
        arch, strategy, shape, schedule, microbatches, virtual, n_layers = run
        started = time.perf_counter()
        mesh = Mesh(shape)
        compiled, (params, state, batch), pspecs = compile_pipeline(arch, strategy, mesh, schedule, microbatches,
                                                                    virtual, n_layers)
        lowered = compiled.lower(params, state, batch)
        losses, grads = [], None
        for _ in range(steps):
            params, state, metrics = compiled(params, state, batch)
            losses.append(metrics["loss"])
            grads = grads or unshard(metrics["grads"], pspecs, mesh)
        results.append({"losses": losses, "grads": grads, "params": unshard(params, pspecs, mesh),
                        "collectives": lowered.collectives, "seconds": time.perf_counter() - started})
    return results
