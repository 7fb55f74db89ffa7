"""experiments.train: 5 steps + resume + 5 steps equals 10 uninterrupted steps bit for bit; non-finite losses."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch
from hydra import compose, initialize_config_dir

from experiments import train
from functional_parallel import checkpoint
from functional_parallel.launch import RankError
from tests import checkpoint_loop

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
TINY = ["strategy=zero3", "model=gpt_tiny", "model.n_layers=1", "steps=10", "log_every=5", "eval_batches=0",
        "progress=false", "data.global_batch=8", "optim.warmup_steps=2", "checkpoint_every=5"]


def compose_config(overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=overrides)


def losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


# A Hugging Face GPT-2 (its parameters named by transformers, its lm_head tied) under ZeRO-3 x TP on 4 ranks.
HF_GPT2 = ["model=hf_gpt2", "model.hf.n_layer=1", "strategy=fsdp_tp", "mesh=dp2_tp2"]


@pytest.mark.slow
@pytest.mark.parametrize("model", [[], HF_GPT2], ids=["gpt_tiny-zero3", "hf_gpt2-fsdp_tp"])
def test_five_steps_resume_five_steps_equals_ten_steps_bit_for_bit(tmp_path, model):
    """Params and optimizer state are sharded on disk and in memory."""
    tiny = TINY + model
    train.run(compose_config(tiny + [f"checkpoint_dir={tmp_path / 'ck_a'}"]), tmp_path / "a")
    train.run(compose_config(tiny + [f"checkpoint_dir={tmp_path / 'ck_b'}", "stop_after=5"]), tmp_path / "b1")
    assert checkpoint.latest(tmp_path / "ck_b").name == "step_00000005"
    train.run(compose_config(tiny + [f"checkpoint_dir={tmp_path / 'ck_b'}", "resume=true"]), tmp_path / "b2")
    record_a, uninterrupted = checkpoint.read_global(tmp_path / "ck_a")
    record_b, resumed = checkpoint.read_global(tmp_path / "ck_b")
    assert record_a["step"] == record_b["step"] == 10 and uninterrupted.keys() == resumed.keys()
    assert all(torch.equal(uninterrupted[key], resumed[key]) for key in uninterrupted)
    assert losses(tmp_path / "b2")[10] == losses(tmp_path / "a")[10]
    assert losses(tmp_path / "b1")[5] == losses(tmp_path / "a")[5]


@pytest.mark.slow
def test_diverging_run_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    overrides = TINY + [f"checkpoint_dir={tmp_path / 'ck'}", "checkpoint_every=1", "optim=sgd", "optim.lr=1e12",
                        "optim.clip_norm=null", "optim.warmup_steps=0"]
    with pytest.raises(RankError, match=r"rank 0: NonFiniteLossError: step \d+: loss nan, grad_norm nan; stopping "
                                        r"\(nonfinite=stop\)\. The last good checkpoint is .*ck/step_\d+\.") as info:
        train.run(compose_config(overrides), tmp_path / "run")
    assert {kind for kind, _, _ in info.value.errors.values()} == {"NonFiniteLossError"}  # every rank stops
    record, values = checkpoint.read_global(tmp_path / "ck")
    assert record["step"] >= 1 and all(torch.isfinite(value).all() for value in values.values())


@pytest.mark.parametrize("overrides, error, message", [
    (["resume=true"], "CheckpointError", r"resume=true without checkpoint_dir looks in this run's own new run dir "
                                         r"\(.*checkpoints\), which holds no checkpoint: set checkpoint_dir"),
    (["nonfinite=ignore"], "ValueError", r"non-finite policy must be one of \('stop', 'skip'\), got 'ignore'"),
    (["checkpoint_every=-1"], "ValueError", r"checkpoint_every=-1 must be >= 0"),
])
def test_bad_checkpoint_settings_fail_before_spawning(overrides, error, message, tmp_path, monkeypatch):
    monkeypatch.setattr(train.launch, "spawn", lambda *a, **k: pytest.fail("spawned despite a bad config"))
    with pytest.raises(Exception, match=message) as info:
        train.run(compose_config(TINY + overrides), tmp_path)
    assert type(info.value).__name__ == error


def test_a_fresh_run_never_writes_over_earlier_checkpoints(tmp_path, monkeypatch):
    params, state = checkpoint_loop.reference(0)
    checkpoint.save(tmp_path / "ck", 5, {"params": params, "opt_state": state}, None, None)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    monkeypatch.setattr(train.launch, "spawn", lambda *a, **k: pytest.fail("spawned despite a bad config"))
    with pytest.raises(checkpoint.CheckpointError, match=r"already holds checkpoints \(latest: step_00000005\); "
                                                        r"resume=true continues from them"):
        train.run(compose_config(TINY + [f"checkpoint_dir={tmp_path / 'ck'}"]), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
