"""Bad input across the product (strategies, models, data, checkpoints, losses) is a clear error.

Each case asserts the message; the checkpoint cases also assert that nothing on disk changed.
The compiler's own spec/mesh/op errors are in tests/sharding/test_errors.py; the last test
here checks on real ranks that every rank raises before any collective and the group still works.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from functional_parallel import checkpoint, data, models
from functional_parallel.checkpoint import CheckpointError
from functional_parallel.launch import spawn
from functional_parallel.nonfinite import NonFiniteLossError, NonFinitePolicy, apply_update
from functional_parallel.parallel import Strategy, lower_abstract
from sharding import Mesh, MeshError, SpecError
from tests import checkpoint_loop


def snapshot(root) -> dict:
    """Every file under `root` with its bytes: to assert that a failed call changed nothing."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


@pytest.fixture
def saved(tmp_path):
    """A root with one complete single-process checkpoint of the tiny float64 GPT + AdamW at step 1."""
    trees = dict(zip(("params", "opt_state"), checkpoint_loop.reference(1)))
    checkpoint.save(tmp_path, 1, trees, None, None, meta={"data_step": 1})
    return tmp_path, trees


def _load_fails(root, like, match):
    before = snapshot(root) if os.path.isdir(root) else None
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(root, like, None, None)
    if before is not None:
        assert snapshot(root) == before


# --- strategies, models, data -------------------------------------------------------------

def test_strategy_yaml_typo():
    with pytest.raises(ValueError, match=r"strategy 'zero3': unknown keys \['parmas'\]; expected \["):
        Strategy.from_dict({"name": "zero3", "batch": ["dp"], "parmas": [[".*", ["dp"]]]})


def test_unknown_strategy_name():
    with pytest.raises(ValueError, match=r"unknown strategy 'zero4'; expected one of \[.*'zero3'"):
        Strategy.load("zero4")


def test_unknown_model_architecture_and_size():
    with pytest.raises(ValueError, match=r"unknown architecture 'gtp'; expected one of \['gpt', 'llama'\]"):
        models.build("gtp", "tiny")
    with pytest.raises(ValueError, match=r"unknown GPT size 'tiyn'; expected one of \["):
        models.build("gpt", "tiyn")


def test_model_heads_not_dividing_width():
    with pytest.raises(ValueError, match=r"d_model=100 is not divisible by n_heads=3"):
        models.build("gpt", "tiny", d_model=100, n_heads=3)


def test_unknown_corpus():
    with pytest.raises(ValueError, match=r"unknown corpus 'wikipedia'; expected one of \('pydoc', 'shakespeare'\)"):
        data.load_dataset("wikipedia")


def test_batch_not_divisible_by_dp_in_the_compiled_step():
    with pytest.raises(SpecError, match=r"inputs: dim 0 has size 6, not divisible by 4 \(mesh axes \('dp',\)"):
        lower_abstract("gpt", "tiny", "zero3", {"dp": 4, "tp": 1}, global_batch=6)


def test_batch_not_divisible_by_world_in_the_data():
    with pytest.raises(ValueError, match=r"global_batch=6 must divide over world=4"):
        data.get_batch("train", 0, 6, 16, 0, rank=0, world=4)


def test_strategy_needs_an_axis_the_mesh_lacks():
    with pytest.raises(SpecError, match=r"names mesh axis 'tp', which the mesh does not have \(mesh axes: \('dp',\)\)"):
        lower_abstract("gpt", "tiny", "tp", {"dp": 4}, global_batch=8)


def test_mesh_axis_size_not_a_positive_int():
    with pytest.raises(MeshError, match=r"mesh axis 'dp' must have a positive int size, got 0"):
        Mesh.abstract({"dp": 0})


def test_non_finite_initial_loss():
    model, params, state, step_fn = checkpoint_loop.problem()
    broken = dict(params, wte=torch.full_like(params["wte"], math.nan))
    _, _, metrics = step_fn(broken, state, checkpoint_loop.batch(model, 0))
    with pytest.raises(NonFiniteLossError, match=r"step 0: the loss is not finite before any update \(loss nan"):
        apply_update(metrics["loss"].item(), metrics["grad_norm"].item(), 0, NonFinitePolicy("skip"), 0,
                     first_step=True)


# --- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_of_another_model_shape(saved):
    root, _ = saved
    model = models.build("gpt", "tiny", n_layers=1, d_model=64)
    params = model.init(0, dtype=torch.float64)
    like = {"params": params, "opt_state": checkpoint_loop.problem()[2]}
    _load_fails(root, like, r"leaf params/wte has global shape \(64, 32\) in the checkpoint but \(64, 64\) in "
                            r"this run; the checkpoint was written for another model shape")


def test_checkpoint_of_another_optimizer(saved):
    root, trees = saved
    _load_fails(root, {"params": trees["params"]}, r"holds other leaves than this run: missing \[\], "
                                                   r"unexpected \['opt_state/.*written for another model or optimizer")


def test_checkpoint_in_another_dtype(saved):
    root, trees = saved
    float_like = {"params": checkpoint_loop.problem()[0].init(0, dtype=torch.float32), "opt_state": trees["opt_state"]}
    _load_fails(root, float_like, r"leaf params/wte is float64 in the checkpoint but float32 in this run")


def test_checkpoint_directory_missing(tmp_path):
    _load_fails(tmp_path / "nowhere", {}, r"checkpoint directory .*nowhere does not exist")


def test_checkpoint_root_without_a_complete_checkpoint(tmp_path):
    (tmp_path / ".tmp-step_00000004").mkdir()
    _load_fails(tmp_path, {}, r"holds no complete checkpoint \(no step_\* directory with a `latest` marker\)")


def test_checkpoint_latest_marker_names_a_missing_directory(saved):
    root, trees = saved
    (root / "latest").write_text("step_00000009")
    _load_fails(root, trees, r"latest names step_00000009, which does not exist")


def test_checkpoint_metadata_missing(saved):
    root, trees = saved
    os.remove(root / "step_00000001" / ".metadata")
    _load_fails(root, trees, r"step_00000001 is not a complete checkpoint: \.metadata is missing")


def test_checkpoint_metadata_garbled(saved):
    root, trees = saved
    (root / "step_00000001" / ".metadata").write_bytes(b"not a pickle")
    _load_fails(root, trees, r"step_00000001 is corrupt: cannot read its metadata")


def test_checkpoint_shard_file_truncated(saved):
    root, trees = saved
    shard = root / "step_00000001" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    _load_fails(root, trees, r"is corrupt: shard file __0_0\.distcp is truncated or missing \(needs \d+ bytes, "
                             r"has 100\)")


def test_checkpoint_save_never_overwrites(saved):
    root, trees = saved
    before = snapshot(root)
    with pytest.raises(CheckpointError, match=r"step_00000001 already exists; refusing to overwrite it"):
        checkpoint.save(root, 1, trees, None, None)
    assert snapshot(root) == before


# --- on real ranks: every rank raises, before any collective ---------------------------------

def _every_rank_rejects(rank, world, root):
    model, params, state, step_fn = checkpoint_loop.problem()
    other = models.build("gpt", "tiny", n_layers=2).init(0, dtype=torch.float64)
    failures = []
    for bad in (lambda: checkpoint.load(root, {"params": other, "opt_state": state}, None, Mesh({"dp": world})),
                lambda: checkpoint.load(os.path.join(root, "nowhere"), {"params": params}, None, Mesh({"dp": world})),
                lambda: lower_abstract("gpt", "tiny", "zero3", {"dp": world}, global_batch=3)):
        try:
            bad()
        except (CheckpointError, SpecError) as error:
            failures.append(type(error).__name__)
    total = torch.ones(1)
    dist.all_reduce(total)  # no rank is left inside a collective: the group is still in step
    return failures, total.item()


@pytest.mark.slow
def test_every_rank_raises_before_any_collective(saved):
    root, _ = saved
    before = snapshot(root)
    results = spawn(_every_rank_rejects, 2, str(root), timeout_s=30, deadline_s=120)
    assert results == [(["CheckpointError", "CheckpointError", "SpecError"], 2.0)] * 2
    assert snapshot(root) == before
    shutil.rmtree(root)
