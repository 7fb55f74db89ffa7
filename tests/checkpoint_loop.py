"""A small sharded training loop with checkpoints, run on spawned gloo ranks by the checkpoint tests."""
from __future__ import annotations

import os
import signal
import time

import torch

from functional_parallel import checkpoint, optim
from functional_parallel.models import build
from functional_parallel.parallel import Strategy, compile_step
from functional_parallel.train import make_train_step
from sharding import Mesh, shard, unshard

GLOBAL_BATCH = 8


def problem(seed: int = 0):
    """One-layer tiny GPT in float64, AdamW with clipping, and its pure train step."""
    model = build("gpt", "tiny", n_layers=1)
    params = model.init(seed, dtype=torch.float64)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    return model, params, optimizer.init(params), make_train_step(model.loss, optimizer)


def batch(model, step: int) -> dict:
    """The global batch of `step`: a pure function of the step (the data position is the step)."""
    generator = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, model.cfg.vocab_size, (GLOBAL_BATCH, model.cfg.seq_len + 1), generator=generator)
    return {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}


def reference(steps: int):
    """`steps` single-process steps from the initial state: (params, opt_state)."""
    model, params, state, step_fn = problem()
    for step in range(steps):
        params, state, _ = step_fn(params, state, batch(model, step))
    return params, state


def train(rank: int, world: int, strategy_name: str, mesh_shape: dict, root: str, stop: int,
          die_at: int | None = None, stall_at: int | None = None, stall_s: float = 0.0) -> dict:
    """Resume from the latest checkpoint under `root` (if any), train to step `stop`, saving after each step.

    `die_at` / `stall_at`: rank 1 kills itself / sleeps before that step (fault injection).
    Returns the global trees as loaded and as finished, for exact comparisons.
    """
    model, params, state, step_fn = problem()
    mesh = Mesh(mesh_shape)
    compiled, (pspecs, sspecs, bspec) = compile_step(step_fn, Strategy.load(strategy_name), mesh, params, state,
                                                     axes=model.axes(params))
    specs = {"params": pspecs, "opt_state": sspecs}
    trees = {"params": shard(params, pspecs, mesh), "opt_state": shard(state, sspecs, mesh)}
    start = 0
    if os.path.isdir(root) and checkpoint.latest(root) is not None:
        restored = checkpoint.load(root, trees, specs, mesh)
        trees, start = restored.trees, restored.meta["data_step"]
    loaded = {name: unshard(tree, specs[name], mesh) for name, tree in trees.items()}
    for step in range(start, stop):
        if rank == 1 and step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if rank == 1 and step == stall_at:
            time.sleep(stall_s)
        params_local, state_local, _ = compiled(trees["params"], trees["opt_state"],
                                                shard(batch(model, step), bspec, mesh))
        trees = {"params": params_local, "opt_state": state_local}
        checkpoint.save(root, step + 1, trees, specs, mesh, meta={"data_step": step + 1})
    return {"start": start, "loaded": loaded,
            "final": {name: unshard(tree, specs[name], mesh) for name, tree in trees.items()}}
