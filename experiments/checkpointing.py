"""The training loop's checkpoints and non-finite policy: resume, save every N steps, stop or skip.

Small functions the trainer calls between steps; the mechanics are in
`functional_parallel.checkpoint` (sharded, atomic, reshardable) and `functional_parallel.nonfinite`.
The data position is the step: a batch is a pure function of (seed, step), so resuming at step k
with the same seed, corpus and global batch draws exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import math
import pathlib
from typing import Any

import torch

from functional_parallel import checkpoint
from functional_parallel.checkpoint import CheckpointError
from functional_parallel.nonfinite import NonFinitePolicy, apply_update

CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_root(cfg: Any, run_dir: str | pathlib.Path) -> pathlib.Path:
    """`checkpoint_dir` if set, else `<run dir>/checkpoints`."""
    return pathlib.Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else pathlib.Path(run_dir) / CHECKPOINT_SUBDIR


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
    if saved["step"] > cfg.steps:
        raise CheckpointError(f"{path} is at step {saved['step']}, past steps={cfg.steps}")
    return path


def restore(cfg: Any, root: pathlib.Path, params, opt_state, specs: tuple, mesh) -> tuple[Any, Any, int]:
    """Load the latest checkpoint into this run's layout: (params, opt_state, next step).

    `params` / `opt_state` are this rank's shards (they give shapes and dtypes); `specs` is
    (param specs, state specs, ...) on `mesh`. Also restores torch's global generator.
    """
    check_resumable(cfg, root)
    restored = checkpoint.load(root, {"params": params, "opt_state": opt_state},
                               {"params": specs[0], "opt_state": specs[1]}, mesh)
    torch.set_rng_state(restored.rng_state)
    return restored.trees["params"], restored.trees["opt_state"], restored.meta["data"]["step"]


def save_due(cfg: Any, step: int, last_step: int) -> bool:
    """Save after `step` steps: every `checkpoint_every` steps, and at the run's last step."""
    return bool(cfg.checkpoint_every) and (step % cfg.checkpoint_every == 0 or step == last_step)


def save(cfg: Any, root: pathlib.Path, step: int, params, opt_state, specs: tuple, mesh, strategy: str = "") -> pathlib.Path:
    """This rank's shards after `step` steps (every rank calls it)."""
    meta = {"data": data_position(cfg, step), "strategy": strategy, "mesh": mesh.shape(),
            "model": f"{cfg.model.arch}/{cfg.model.size}"}
    return checkpoint.save(root, step, {"params": params, "opt_state": opt_state},
                           {"params": specs[0], "opt_state": specs[1]}, mesh, meta=meta)


class NonFiniteGuard:
    """Applies the `nonfinite` policy step by step; remembers the last good checkpoint for its message."""

    def __init__(self, cfg: Any, root: pathlib.Path | None):
        self.policy = NonFinitePolicy(cfg.nonfinite, cfg.max_skips)
        self.root = root
        self.skipped_in_a_row = 0
        self.first_step = True

    def keep(self, step: int, loss: float, grad_norm: float) -> bool:
        """True: take this step's new params and state; False: keep the previous ones (skipped)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            if not apply_update(loss, grad_norm, step, self.policy, self.skipped_in_a_row, self.first_step,
                                self._last_good()):  # raises unless the policy skips
                self.skipped_in_a_row += 1
                return False
        self.first_step, self.skipped_in_a_row = False, 0
        return True

    def _last_good(self) -> str:
        if self.root is None or not self.root.is_dir():
            return ""
        latest = checkpoint.latest(self.root)
        return str(latest) if latest is not None else ""
