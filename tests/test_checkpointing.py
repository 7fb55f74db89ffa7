"""experiments.checkpointing: resume checks, saves that refuse non-finite params, the non-finite guard."""
from __future__ import annotations

import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from experiments.checkpointing import Checkpointer, NonFiniteGuard, check_resumable, prepare
from functional_parallel.checkpoint import CheckpointError
from functional_parallel.nonfinite import NonFiniteLossError
from functional_parallel.tree import tree_leaves
from tests import checkpoint_loop


def _cfg(**overrides):
    cfg = {"seed": 0, "steps": 10, "data": {"name": "pydoc", "global_batch": 8}, "model": {"arch": "gpt", "size": "tiny"},
           "checkpoint_every": 5, "nonfinite": "skip", "max_skips": 1, "stop_after": None}
    return OmegaConf.merge(OmegaConf.create(cfg), OmegaConf.create(overrides))


def test_save_then_restore_in_one_process(tmp_path):
    params, state = checkpoint_loop.reference(1)
    saver = Checkpointer(_cfg(), tmp_path, (None, None), None, strategy="none")
    assert saver.due(5, 10) and saver.due(7, 7) and not saver.due(6, 10)
    saver.save(5, params, state)
    fresh = checkpoint_loop.reference(0)
    got_params, got_state, step = Checkpointer(_cfg(), tmp_path, (None, None), None).restore(*fresh)
    assert step == 5 and saver.last_good() == str(tmp_path / "step_00000005")
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves((got_params, got_state)), tree_leaves((params, state))))


def test_resume_with_another_seed_is_refused(tmp_path):
    Checkpointer(_cfg(), tmp_path, (None, None), None).save(5, *checkpoint_loop.reference(0))
    with pytest.raises(CheckpointError, match=r"another data stream \(seed: 0 in the checkpoint, 1 now\)"):
        check_resumable(_cfg(seed=1), tmp_path)
    with pytest.raises(CheckpointError, match=r"is at step 5: nothing left to train up to step 5"):
        check_resumable(_cfg(steps=10, stop_after=5), tmp_path)


def test_non_finite_params_are_never_saved(tmp_path):
    params, state = checkpoint_loop.reference(0)
    saver = Checkpointer(_cfg(), tmp_path, (None, None), None)
    saver.save(1, params, state)
    with pytest.raises(NonFiniteLossError, match=r"after step 2 the parameters are not finite \(global norm inf\); "
                                                 r"not saved\. The last good checkpoint is .*step_00000001"):
        saver.save(2, dict(params, wpe=params["wpe"] * math.inf), state)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_00000001"]


def test_guard_skips_then_stops_and_finite_steps_reset_the_count():
    guard = NonFiniteGuard(_cfg(), lambda: "ck/step_00000005")
    assert guard.keep(0, 3.0, 1.0)
    assert not guard.keep(1, math.nan, 1.0)
    assert guard.keep(2, 3.0, 1.0)
    assert not guard.keep(3, 3.0, math.inf)
    with pytest.raises(NonFiniteLossError, match=r"step 4: .*after 1 skipped steps in a row.*ck/step_00000005"):
        guard.keep(4, math.inf, 1.0)


def test_resume_without_checkpoint_dir_says_to_set_it_unless_the_run_dir_holds_checkpoints(tmp_path):
    cfg = _cfg(checkpoint_dir=None, resume=True)
    with pytest.raises(CheckpointError, match=r"looks in this run's own new run dir \(.*new_run/checkpoints\).*"
                                              r"set checkpoint_dir"):
        prepare(cfg, tmp_path / "new_run")
    Checkpointer(_cfg(), tmp_path / "same_run" / "checkpoints", (None, None), None).save(5, *checkpoint_loop.reference(0))
    assert prepare(cfg, tmp_path / "same_run").checkpoint_dir == str((tmp_path / "same_run" / "checkpoints").resolve())
