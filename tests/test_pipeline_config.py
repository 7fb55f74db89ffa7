"""A pipelined train config: a bad one is a one-line error before any rank starts; a good one trains
(pp on 2 ranks equals dp with the same micro-batches step for step) and resumes from its checkpoint."""
from __future__ import annotations

import json
import pathlib

import pytest
from hydra import compose, initialize_config_dir

from experiments import builders, config  # noqa: F401  (config registers the schemas Hydra composes)
from sharding.schedules import ScheduleError

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("overrides,match", [
    (["mesh={dp: 1, pp: 4}"], "over 4 stages, but it has 2 layers"),
    (["mesh={dp: 1, pp: 2}", "pipeline.microbatches=3"], "does not split into 3 equal micro-batches"),
    (["mesh={dp: 1, pp: 2}", "pipeline.schedule=round_robin"], "is not one of"),
    (["mesh={dp: 1, pp: 2}", "pipeline.schedule=1f1b", "pipeline.virtual=2"], "interleaved_1f1b"),
    (["mesh={dp: 1, pp: 2}", "pipeline.schedule=interleaved_1f1b", "pipeline.virtual=2",
      "pipeline.microbatches=3", "data.global_batch=6"], "divisible"),
    (["mesh={dp: 1, pp: 2}", "grad_accum=2"], "leave grad_accum at 1"),
    (["mesh={dp: 2}"], "names mesh axes \\['pp'\\]"),
])
def test_bad_pipeline_config_is_a_clear_error_before_any_rank_starts(overrides, match):
    cfg = compose_config(["strategy=pp", "model=gpt_tiny", "data.global_batch=8", *overrides])
    with pytest.raises((ValueError, ScheduleError), match=match):
        builders.validate(cfg)


@pytest.mark.slow
def test_pp_trains_as_dp_with_the_same_micro_batches_and_resumes(tmp_path, monkeypatch):
    from experiments import train

    def run(name, overrides):
        monkeypatch.chdir(tmp_path)
        with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=["model=gpt_tiny", "model.dtype=float64", "steps=9",
                                                          "eval_every=3",
                                                          "progress=false", *overrides])
        out = tmp_path / name
        return train.run(cfg, out)

    pp = run("pp", ["strategy=pp", "mesh={dp: 1, pp: 2}", "pipeline.microbatches=2", "checkpoint_every=3",
                    f"checkpoint_dir={tmp_path / 'ckpt'}", "stop_after=6"])
    dp = run("dp", ["strategy=dp", "mesh={dp: 2}", "grad_accum=2", "stop_after=6"])
    assert pp["final_loss"] == pytest.approx(dp["final_loss"], rel=1e-12)  # float64: reduction order only
    assert pp["val_loss"] == pytest.approx(dp["val_loss"], rel=1e-12)
    assert pp["pipeline"]["schedule"] == "1f1b" and 0 <= pp["pipeline"]["bubble_measured"] < 1
    assert [len(r) for r in pp["pipeline"]["timeline"]] == [5, 5]  # F0 F1 B0 B1 and the update, per rank
    resumed = run("resumed", ["strategy=pp", "mesh={dp: 1, pp: 2}", "pipeline.microbatches=2", "resume=true",
                              f"checkpoint_dir={tmp_path / 'ckpt'}", "checkpoint_every=3"])
    straight = run("straight", ["strategy=pp", "mesh={dp: 1, pp: 2}", "pipeline.microbatches=2"])
    assert resumed["val_loss"] == straight["val_loss"]  # bit for bit (the logged loss averages a window)
    assert json.loads(pathlib.Path(tmp_path / "pp" / "summary.json").read_text())["strategy"] == "pp"
