"""Faults: a dead or stuck rank ends the job (no hang) naming the collective; non-finite losses stop or skip."""
from __future__ import annotations

import math
import time

import pytest
import torch

from functional_parallel import checkpoint
from functional_parallel.launch import RankError, spawn
from functional_parallel.nonfinite import NonFiniteLossError, NonFinitePolicy, apply_update
from functional_parallel.tree import tree_leaves
from tests import checkpoint_loop

TIMEOUT_S = 10


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_the_last_complete_checkpoint_loads(tmp_path):
    root = str(tmp_path / "ckpt")
    started = time.monotonic()
    with pytest.raises(RankError) as info:
        spawn(checkpoint_loop.train, 2, "dp", {"dp": 2}, root, 6, 3, timeout_s=TIMEOUT_S, deadline_s=180)
    errors = info.value.errors
    assert errors[1][0] == "RankDied" and "SIGKILL" in errors[1][1]
    kind, message, _ = errors[0]
    assert kind == "CollectiveError"
    assert "collective all_reduce over mesh axis 'dp' (2 ranks)" in message and "failed or timed out" in message
    assert time.monotonic() - started < 180
    template = dict(zip(("params", "opt_state"), checkpoint_loop.reference(0)))
    restored = checkpoint.load(root, template, None, None)  # the survivors' last complete save, in one process
    assert restored.step == 3 and restored.meta == {"data_step": 3}
    params, _ = checkpoint_loop.reference(3)
    for got, want in zip(tree_leaves(restored.trees["params"]), tree_leaves(params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.slow
def test_stuck_rank_times_out_naming_the_collective(tmp_path):
    root = str(tmp_path / "ckpt")
    started = time.monotonic()
    with pytest.raises(RankError) as info:  # rank 1 sleeps past the timeout before step 1
        spawn(checkpoint_loop.train, 2, "dp", {"dp": 2}, root, 2, None, 1, TIMEOUT_S + 2,
              timeout_s=TIMEOUT_S, deadline_s=180)
    kind, message, _ = info.value.errors[0]
    assert kind == "CollectiveError" and "Timed out" in message and "mesh axis 'dp'" in message
    assert time.monotonic() - started < 180
    assert checkpoint.latest(root).name == "step_00000001"  # the step before the stall was saved


def test_non_finite_policy_stop_skip_and_limits():
    stop, skip = NonFinitePolicy("stop"), NonFinitePolicy("skip", max_skips=2)
    assert apply_update(2.5, 1.0, 7, stop, 0, first_step=False)
    with pytest.raises(NonFiniteLossError, match=r"step 7: loss nan.*stopping \(nonfinite=stop\)"
                                                 r".*last good checkpoint is ck/step_5"):
        apply_update(math.nan, 1.0, 7, stop, 0, first_step=False, last_good="ck/step_5")
    assert apply_update(2.5, math.inf, 7, skip, 0, first_step=False) is False  # inf gradient: skip too
    assert apply_update(math.nan, 1.0, 8, skip, 1, first_step=False) is False
    with pytest.raises(NonFiniteLossError, match=r"after 2 skipped steps in a row"):
        apply_update(math.nan, 1.0, 9, skip, 2, first_step=False)


def test_unknown_non_finite_policy():
    with pytest.raises(ValueError, match=r"non-finite policy must be one of \('stop', 'skip'\), got 'ignore'"):
        NonFinitePolicy("ignore")


def test_skipping_keeps_the_previous_state():
    """A skipped step leaves params and state as they were: the step is pure, its inputs are untouched."""
    model, params, state, step_fn = checkpoint_loop.problem()
    before = [leaf.clone() for leaf in tree_leaves((params, state))]
    bad = dict(params, wte=params["wte"] * math.inf)
    new_params, new_state, metrics = step_fn(bad, state, checkpoint_loop.batch(model, 0))
    keep = apply_update(metrics["loss"].item(), metrics["grad_norm"].item(), 1, NonFinitePolicy("skip"), 0,
                        first_step=False)
    params, state = (new_params, new_state) if keep else (params, state)
    assert not keep and all(torch.equal(a, b) for a, b in zip(before, tree_leaves((params, state))))
