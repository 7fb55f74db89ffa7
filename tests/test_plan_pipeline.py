"""The pipeline planner at published scale: GPT-3 175B as Megatron trained it (t=8, p=16, d=12), its
first stage's rank against the formulas, and Korthikanti et al.'s first-stage statement."""
from __future__ import annotations

import pathlib

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from experiments import plan as plan_cli
from experiments.plan_report import markdown
from functional_parallel import published

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")
pytestmark = pytest.mark.slow  # each plan lowers a 175B stage on fake tensors (seconds)


def plan(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose(config_name="plan_pipeline", overrides=["doc_block=unused", *overrides]))
    return plan_cli.plan(cfg)


@pytest.fixture(scope="module")
def megatron_175b():
    return plan([])


def test_first_stage_holds_p_micro_batches_of_its_layers(megatron_175b):
    row = megatron_175b["strategies"][0]
    s, b, h, a = 2048, 1, 12288, 96
    layer = published.our_layer_bytes(s, b, h, a, t=8)
    assert (row["rank_layers"], row["chunks_alive_first_rank"], row["microbatches"]) == (6, 16, 128)
    assert row["figures"]["activations"] == 16 * 6 * layer == 96 * layer  # L layers' worth
    assert row["layer_activation_bytes"] == layer  # the lowered layer is the formula plus its differences


def test_first_stage_model_states_are_its_layers_and_the_embeddings(megatron_175b):
    """Megatron's mixed-precision Adam without ZeRO: 2 + 2 + 12 bytes per local parameter: the 6 layers'
    12h^2 (+ biases and norms) split over t = 8, the vocab-parallel token table, the positions whole."""
    row = megatron_175b["strategies"][0]
    h, vocab, s = 12288, megatron_175b["model"]["config"]["vocab_size"], 2048
    split = 12 * h * h + 4 * h  # q, k, v, o and the MLP's weights, the MLP's input bias: split over tp
    whole = 5 * h  # the MLP's output bias, two norms' weights and biases
    local = 6 * (split // 8 + whole) + vocab * h // 8 + s * h
    assert row["figures"]["params"] == 2 * local
    assert row["figures"]["grads"] == 2 * local and row["figures"]["optimizer"] == 12 * local


def test_first_stage_activations_do_not_depend_on_p(megatron_175b):
    deeper = plan(["mesh={dp: 24, pp: 8, tp: 8}", "global_batch=1536"])["strategies"][0]
    row = megatron_175b["strategies"][0]
    assert (deeper["rank_layers"], deeper["chunks_alive_first_rank"]) == (12, 8)
    assert deeper["figures"]["activations"] == row["figures"]["activations"]
    assert "| dp_tp_pp |" in markdown(megatron_175b)


def test_gpipe_keeps_every_micro_batch_alive():
    row = plan(["pipeline.schedule=gpipe", "global_batch=192"])["strategies"][0]  # 16 micro-batches
    assert row["chunks_alive_first_rank"] == row["microbatches"] == 16
