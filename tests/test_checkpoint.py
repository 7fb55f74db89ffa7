"""Sharded checkpoints: exact round trips, resharding across strategies and meshes, atomic saves."""
from __future__ import annotations

import os

import pytest
import torch

from functional_parallel import checkpoint
from functional_parallel.launch import spawn
from functional_parallel.tree import tree_leaves
from tests import checkpoint_loop


def assert_identical(a, b):
    leaves_a, leaves_b = tree_leaves(a), tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def _trees(steps: int = 0):
    params, state = checkpoint_loop.reference(steps)
    return {"params": params, "opt_state": state}


def test_single_process_round_trip_is_exact_and_restores_step_meta_and_rng(tmp_path):
    trees = _trees(1)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    path = checkpoint.save(tmp_path, 1, trees, None, None, meta={"data_step": 1, "strategy": "none"})
    torch.rand(3)  # moves the global generator on
    restored = checkpoint.load(tmp_path, _trees(0), None, None)
    assert path == tmp_path / "step_00000001" and restored.path == path
    assert restored.step == 1 and restored.meta == {"data_step": 1, "strategy": "none"}
    assert torch.equal(restored.rng_state, rng)
    assert_identical(restored.trees, trees)


def test_read_global_needs_no_template(tmp_path):
    trees = _trees(1)
    checkpoint.save(tmp_path, 1, trees, None, None, meta={"data_step": 1})
    record, flat = checkpoint.read_global(tmp_path)
    assert record["step"] == 1 and record["meta"] == {"data_step": 1}
    assert torch.equal(flat["params/wte"], trees["params"]["wte"])
    assert len(flat) == len(tree_leaves(trees))


def test_latest_points_at_the_newest_complete_checkpoint_only(tmp_path):
    trees = _trees(0)
    checkpoint.save(tmp_path, 1, trees, None, None)
    checkpoint.save(tmp_path, 2, trees, None, None)
    (tmp_path / ".tmp-step_00000003").mkdir()  # a save that crashed half-way
    (tmp_path / ".tmp-step_00000003" / "__0_0.distcp").write_bytes(b"half")
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000002"
    assert checkpoint.load(tmp_path, trees, None, None).step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_00000003", "latest", "step_00000001",
                                                         "step_00000002"]


def test_a_save_that_crashes_half_way_is_never_the_latest(tmp_path, monkeypatch):
    trees = _trees(0)
    checkpoint.save(tmp_path, 1, trees, None, None)
    real_save = checkpoint.dcp.save

    def crash_after_writing(state, checkpoint_id, **kwargs):
        real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(checkpoint.dcp, "save", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, trees, None, None)
    assert (tmp_path / ".tmp-step_00000002" / ".metadata").exists()  # all the bytes, but not complete
    assert checkpoint.latest(tmp_path).name == "step_00000001"
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    checkpoint.save(tmp_path, 2, trees, None, None)  # the next attempt replaces the leftover
    assert checkpoint.latest(tmp_path).name == "step_00000002"
    assert not (tmp_path / ".tmp-step_00000002").exists()


def test_load_does_not_write_into_the_template(tmp_path):
    checkpoint.save(tmp_path, 1, _trees(1), None, None)
    template = _trees(0)
    before = [leaf.clone() for leaf in tree_leaves(template)]
    checkpoint.load(tmp_path, template, None, None)
    assert all(torch.equal(a, b) for a, b in zip(before, tree_leaves(template)))


@pytest.mark.slow
def test_zero3_dp4_to_tp_sp_to_fsdp_tp_to_single_process_is_exact(tmp_path):
    root = str(tmp_path / "ckpt")
    first = spawn(checkpoint_loop.train, 4, "zero3", {"dp": 4}, root, 2, timeout_s=60, deadline_s=240)
    assert first[0]["start"] == 0 and checkpoint.latest(root).name == "step_00000002"
    second = spawn(checkpoint_loop.train, 4, "tp_sp", {"dp": 2, "tp": 2}, root, 3, timeout_s=60, deadline_s=240)
    for rank in range(4):  # every rank of the new mesh holds exactly the bytes the old mesh saved
        assert second[rank]["start"] == 2
        assert_identical(second[rank]["loaded"], first[0]["final"])
    # fsdp_tp holds mlp/b_in as a chunked split (its tp block split again over dp): stored gathered over dp
    third = spawn(checkpoint_loop.train, 4, "fsdp_tp", {"dp": 2, "tp": 2}, root, 4, timeout_s=60, deadline_s=240)
    for rank in range(4):
        assert third[rank]["start"] == 3
        assert_identical(third[rank]["loaded"], second[0]["final"])
    restored = checkpoint.load(root, _trees(0), None, None)  # one process, global tensors
    assert restored.step == 4 and restored.meta == {"data_step": 4}
    assert_identical(restored.trees, third[0]["final"])
    # and the resumed strategies computed the same training as one process (float64, 1e-9)
    reference = _trees(4)
    for got, want in zip(tree_leaves(restored.trees), tree_leaves(reference)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not [p for p in os.listdir(root) if p.startswith(".tmp")]
