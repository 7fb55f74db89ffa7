"""Hydra: the config composes, overrides work, typos fail; `run` trains and writes its outputs."""
from __future__ import annotations

import json
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from experiments import train

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=overrides or [])


def test_default_config_composes():
    cfg = compose_config()
    assert cfg.model.arch == "gpt" and cfg.model.size == "small"
    assert cfg.optim.name == "adamw" and cfg.data.name == "pydoc"
    assert cfg.steps == 300 and OmegaConf.is_missing(cfg, "seed") is False


def test_overrides_work():
    cfg = compose_config(["model=llama_tiny", "optim=sgd", "optim.lr=0.1", "steps=7", "model.n_layers=3"])
    assert (cfg.model.arch, cfg.model.size, cfg.model.n_layers) == ("llama", "tiny", 3)
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.steps == 7


@pytest.mark.parametrize("override", ["optim.lr_rate=1", "model.n_layer=3", "stepz=3", "model=gpt_huge",
                                      "steps=many"])
def test_bad_override_fails(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_every_group_option_composes_and_builds():
    for model in ("gpt_tiny", "gpt_small", "llama_tiny", "llama_small"):
        cfg = compose_config([f"model={model}"])
        assert train.build_model(cfg.model, vocab_size=100).cfg.vocab_size == 100
    for optimizer in ("adamw", "sgd"):
        cfg = compose_config([f"optim={optimizer}"])
        assert train.build_optimizer(cfg.optim, train.build_schedule(cfg.optim, cfg.steps)) is not None


def test_run_trains_and_writes_outputs(tmp_path):
    cfg = compose_config(["model=gpt_tiny", "steps=30", "log_every=10", "eval_every=30", "eval_batches=2",
                          "progress=false", "data.global_batch=8", "optim.warmup_steps=5"])
    summary = train.run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= set(records[0]) and "val_loss" in records[-1]
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.steps == 30 and saved.model.size == "tiny"
