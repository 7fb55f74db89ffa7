"""The training loop's checkpoints and non-finite policy: resume, save every N steps, stop or skip.

Small pieces the trainer calls between steps; the mechanics are in `functional_parallel.checkpoint`
(sharded, atomic, reshardable) and `functional_parallel.nonfinite`. The data position is the
step: a batch is a pure function of (seed, step), so resuming at step k with the same seed,
corpus and global batch draws exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any, Callable

import torch

from functional_parallel import checkpoint, optim
from functional_parallel.checkpoint import CheckpointError
from functional_parallel.nonfinite import NonFiniteLossError, NonFinitePolicy, apply_update
from sharding import P, jit

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_root(cfg: Any, run_dir: str | pathlib.Path) -> pathlib.Path:
    """`checkpoint_dir` if set, else `<run dir>/checkpoints`."""
    return pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else pathlib.Path(run_dir) / CHECKPOINT_SUBDIR


def last_step(cfg: Any) -> int:
    """The step this run ends at: `steps`, or earlier with `stop_after` (the schedule still spans `steps`)."""
    return min(cfg.steps, cfg.stop_after) if cfg.stop_after is not None else cfg.steps


def prepare(cfg: Any, run_dir: str | pathlib.Path, torchrun: bool = False):
    """Checks that need no process, and the config every rank gets: `checkpoint_dir` absolute when in use.

    Fails before anything starts on a bad policy, a resume with nothing (or the wrong thing) to
    resume, or a fresh run that would write over an earlier run's checkpoints.
    """
    NonFinitePolicy(cfg.nonfinite, cfg.max_skips)
    if cfg.checkpoint_every < 0 or (cfg.stop_after is not None and cfg.stop_after < 1):
        raise ValueError(f"checkpoint_every={cfg.checkpoint_every} must be >= 0 and stop_after={cfg.stop_after} "
                         f">= 1 (or null)")
    if not (cfg.checkpoint_every or cfg.resume):
        return cfg
    if torchrun and not cfg.checkpoint_dir:
        raise ValueError("under torchrun set checkpoint_dir to a directory every rank can reach (each rank has "
                         "its own run dir)")
    root = checkpoint_root(cfg, run_dir).resolve()
    if cfg.resume and not cfg.checkpoint_dir and not (root.is_dir() and checkpoint.latest(root) is not None):
        raise CheckpointError(f"resume=true without checkpoint_dir looks in this run's own new run dir ({root}), "
                              f"which holds no checkpoint: set checkpoint_dir to the directory the earlier run "
                              f"saved into (its checkpoint_dir, or <its run dir>/{CHECKPOINT_SUBDIR}), or rerun in "
                              f"that run dir (hydra.run.dir=<its run dir>)")
    if cfg.resume:
        check_resumable(cfg, root)
    elif root.is_dir() and checkpoint.latest(root) is not None:
        raise CheckpointError(f"checkpoint_dir {root} already holds checkpoints (latest: {checkpoint.latest(root).name});"
                              f" resume=true continues from them, or choose another checkpoint_dir")
    cfg = cfg.copy()
    cfg.checkpoint_dir = str(root)
    return cfg


def data_position(cfg: Any, step: int) -> dict:
    """Where the data stream stands after `step` steps, and what it depends on."""
    return {"step": step, "seed": cfg.seed, "corpus": cfg.data.name, "global_batch": cfg.data.global_batch}


def check_resumable(cfg: Any, root: pathlib.Path) -> pathlib.Path:
    """The checkpoint `resume=true` would load, checked on disk (no processes needed); else `CheckpointError`."""
    path = checkpoint.resolve(root)
    saved = checkpoint.read_record(path)["meta"].get("data", {})
    expected = data_position(cfg, saved.get("step", 0))
    changed = {key: (saved.get(key), value) for key, value in expected.items() if saved.get(key) != value}
    if changed:
        described = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in changed.items())
        raise CheckpointError(f"{path} was trained on another data stream ({described}); resuming would not "
                              f"continue the same run. Use the checkpoint's settings, or start without resume")
    if saved["step"] >= last_step(cfg):
        raise CheckpointError(f"{path} is at step {saved['step']}: nothing left to train up to step {last_step(cfg)} "
                              f"(raise steps or stop_after)")
    return path


def norm_of(specs: tuple, mesh, pipeline=None) -> Callable:
    """params -> global norm (a float every rank agrees on: one scalar all-reduce on a mesh; under a
    pipeline, each stage's share sent on)."""
    if mesh is None:
        return lambda params: optim.global_norm(params).item()
    compiled = jit(optim.global_norm, mesh=mesh, in_specs=(specs[0],), out_specs=P(), pipeline=pipeline)
    return lambda params: compiled(params).item()


class Checkpointer:
    """Saves and restores this rank's shards under `root`; every rank holds one and calls it together."""

    def __init__(self, cfg: Any, root: pathlib.Path, specs: tuple, mesh, strategy: str = "", pipeline=None):
        self.cfg, self.root, self.specs, self.mesh, self.strategy = cfg, pathlib.Path(root), specs, mesh, strategy
        self.pipeline = pipeline
        self._norm = None

    def _trees_and_specs(self, params, opt_state):
        return {"params": params, "opt_state": opt_state}, {"params": self.specs[0], "opt_state": self.specs[1]}

    def restore(self, params, opt_state) -> tuple[Any, Any, int]:
        """The latest checkpoint in this run's layout: (params, opt_state, next step); restores torch's generator.

        `params` / `opt_state` are this rank's shards of a fresh start (they give shapes and dtypes).
        """
        check_resumable(self.cfg, self.root)
        restored = checkpoint.load(self.root, *self._trees_and_specs(params, opt_state), self.mesh)
        torch.set_rng_state(restored.rng_state)
        return restored.trees["params"], restored.trees["opt_state"], restored.meta["data"]["step"]

    def due(self, step: int, last_step: int) -> bool:
        """Save after `step` steps: every `checkpoint_every` steps, and at the run's last step."""
        return bool(self.cfg.checkpoint_every) and (step % self.cfg.checkpoint_every == 0 or step == last_step)

    def save(self, step: int, params, opt_state) -> pathlib.Path:
        """The state after `step` steps, if every parameter is finite (else `NonFiniteLossError`, nothing saved)."""
        self._norm = self._norm or norm_of(self.specs, self.mesh, self.pipeline)
        norm = self._norm(params)
        if not math.isfinite(norm):
            last = self.last_good()
            raise NonFiniteLossError(f"after step {step} the parameters are not finite (global norm {norm}); not "
                                     f"saved. {f'The last good checkpoint is {last}.' if last else ''} Lower "
                                     f"optim.lr or keep optim.clip_norm")
        meta = {"data": data_position(self.cfg, step), "strategy": self.strategy,
                "mesh": self.mesh.shape() if self.mesh is not None else None,
                "model": f"{self.cfg.model.arch}/{self.cfg.model.size}"}
        return checkpoint.save(self.root, step, *self._trees_and_specs(params, opt_state), self.mesh, meta=meta)

    def last_good(self) -> str:
        """The latest complete checkpoint's path, or "" when there is none."""
        latest = checkpoint.latest(self.root) if self.root.is_dir() else None
        return str(latest) if latest is not None else ""


class NonFiniteGuard:
    """Applies the `nonfinite` policy step by step (stop, or skip at most `max_skips` steps in a row)."""

    def __init__(self, cfg: Any, last_good: Callable[[], str] = lambda: ""):
        self.policy = NonFinitePolicy(cfg.nonfinite, cfg.max_skips)
        self.last_good = last_good
        self.skipped_in_a_row = 0
        self.first_step = True

    def keep(self, step: int, loss: float, grad_norm: float) -> bool:
        """True: take this step's new params and state; False: keep the previous ones (skipped)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if not apply_update(loss, grad_norm, step, self.policy, self.skipped_in_a_row, self.first_step,
                                self.last_good()):  # raises unless the policy skips
                self.skipped_in_a_row += 1
                return False
        self.first_step, self.skipped_in_a_row = False, 0
        return True
