"""Shared multi-rank check: one strategy's compiled step against the single-process reference."""
from __future__ import annotations

import time

import torch

from experiments.config import SEQUENCE_STRATEGIES, TABLE_STRATEGIES
from functional_parallel import optim
from functional_parallel.models import build
from functional_parallel.parallel import Strategy, example_mesh, param_logical_axes, param_specs, state_specs
from functional_parallel.tree import leaf_paths, tree_leaves
from sharding import Mesh, P, jit, shard, unshard

GLOBAL_BATCH = 8
# The project's strategy files, each tested on its example_mesh.
PROJECT_STRATEGIES = TABLE_STRATEGIES + SEQUENCE_STRATEGIES
MESHES = {name: example_mesh(name) for name in PROJECT_STRATEGIES}


def make_problem(arch: str, seed: int = 0, model_overrides: dict | None = None):
    """Model, float64 params, AdamW state, a fixed global batch, and the step that also returns grads.

    `model_overrides` change fields of the tiny config (e.g. `{"attention": "math"}`)."""
    model = build(arch, "tiny", **(model_overrides or {}))
    params = model.init(seed, dtype=torch.float64)
    optimizer = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    opt_state = optimizer.init(params)
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, model.cfg.vocab_size, (GLOBAL_BATCH, model.cfg.seq_len + 1), generator=generator)
    batch = {"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()}
    grad_and_loss = torch.func.grad_and_value(model.loss)

    def step(params, opt_state, batch):
        grads, loss = grad_and_loss(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grads": grads}

    return step, params, opt_state, batch


def reference(arch: str, steps: int = 3, model_overrides: dict | None = None):
    return run_single_process(*make_problem(arch, model_overrides=model_overrides), steps)


def run_single_process(step, params, opt_state, batch, steps: int) -> dict:
    """`steps` steps of a step returning {"loss", "grads"} metrics: each loss, the first grads, the final params."""
    losses, grads = [], None
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch)
        losses.append(metrics["loss"])
        grads = grads or metrics["grads"]
    return {"losses": losses, "grads": grads, "params": params}


def compile_strategy(arch: str, strategy_name: str, model_overrides: dict | None = None, **jit_options):
    """On this rank: the compiled step of `make_problem(arch)` under a strategy, and its local inputs."""
    step, params, opt_state, batch = make_problem(arch, model_overrides=model_overrides)
    strategy = Strategy.load(strategy_name)
    mesh = Mesh(MESHES[strategy_name])
    axes = param_logical_axes(build(arch), params)
    pspecs, sspecs, bspec = param_specs(strategy, params, axes), state_specs(strategy, opt_state, params, axes), \
        strategy.batch
    # Grads come out in the parameter layout, so they unshard like the parameters.
    compiled = jit(step, mesh=mesh, in_specs=(pspecs, sspecs, bspec),
                   out_specs=(pspecs, sspecs, {"loss": P(), "grads": pspecs}), logical_rules=strategy.constrain_rules,
                   **jit_options)
    local = (shard(params, pspecs, mesh), shard(opt_state, sspecs, mesh), shard(batch, bspec, mesh))
    return compiled, local


def run_strategy(rank: int, world: int, arch: str, strategy_name: str, steps: int = 3,
                 model_overrides: dict | None = None, **jit_options):
    """On each rank: compile, run `steps` steps, unshard; returns what the test compares."""
    started = time.perf_counter()
    compiled, local = compile_strategy(arch, strategy_name, model_overrides, **jit_options)
    mesh, pspecs = compiled.mesh, compiled.in_specs[0]
    lowered = compiled.lower(*local)
    compile_s = time.perf_counter() - started
    losses, grads = [], None
    p, s = local[0], local[1]
    for _ in range(steps):
        p, s, metrics = compiled(p, s, local[2])
        losses.append(metrics["loss"])
        grads = grads or unshard(metrics["grads"], pspecs, mesh)
    return {"losses": losses, "grads": grads, "params": unshard(p, pspecs, mesh),
            "collectives": lowered.collectives, "compile_s": compile_s, "timings": lowered.timings}


def measured_peaks(lowered, local, runs: int = 3) -> list[int]:
    """`MemoryTracker`'s peak over `runs` runs of a lowered step. Take the least as the program's peak:
    gloo's worker thread drops its reference to a finished collective's tensors a moment after `wait`
    returns, so a tensor freed inside that window is really freed a little later and one run can read
    high (see tests/sharding/test_memory_peak.py)."""
    from sharding.memory import MemoryTracker

    measured = []
    for _ in range(runs):
        with MemoryTracker() as mem:
            mem.track(local)
            out = lowered.run(*local)
        del out
        measured.append(mem.peak_bytes)
    return measured


def max_error(a_tree, b_tree) -> tuple[float, str]:
    """The largest elementwise difference between two trees of tensors, and the leaf path where it is."""
    worst, where = 0.0, ""
    for path, a, b in zip(leaf_paths(b_tree), tree_leaves(a_tree), tree_leaves(b_tree)):
        error = (a - b).abs().max().item()
        if error > worst:
            worst, where = error, path
    return worst, where


def assert_equals_reference(per_rank, ref_loss, ref_grads, tolerance: float, where: str = "") -> None:
    """Every rank's (loss, grads) equals the single-process reference within `tolerance`; grads are
    dicts (or single tensors) of global tensors."""
    ref = ref_grads if isinstance(ref_grads, dict) else {"grad": ref_grads}
    for rank, (loss, grads) in enumerate(per_rank):
        got = grads if isinstance(grads, dict) else {"grad": grads}
        assert abs(loss.item() - ref_loss.item()) < tolerance, f"{where} rank {rank}: loss {loss} vs {ref_loss}"
        for name, grad in ref.items():
            error = (got[name] - grad).abs().max().item()
            assert error < tolerance, f"{where} rank {rank}: grad {name} off by {error}"


def assert_run_matches(got: dict, expected: dict) -> None:
    """A run's losses, params and grads after its steps (`run_strategy`'s dict) equal the reference's
    (`reference`) to 1e-9 relative (float64)."""
    for a, b in zip(got["losses"], expected["losses"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for a, b in zip(tree_leaves(got["params"]) + tree_leaves(got["grads"]),
                    tree_leaves(expected["params"]) + tree_leaves(expected["grads"])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
