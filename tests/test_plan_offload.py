"""`experiments.plan offload=...`: the offloaded roles leave the device column for the host (or disk) one,
and `fit.device_gb` finds the deepest model that fits."""
from __future__ import annotations

import pytest

from experiments import plan as plan_cli
from experiments.plan_report import markdown
from functional_parallel import planner

from .test_plan import plan_config


def test_offload_moves_the_optimizer_and_gradient_roles_to_host():
    cfg = plan_config(["model=gpt_tiny", "mesh={dp: 4, tp: 1}", "precision=fp32", "strategies=[zero3]",
                       "offload=optimizer"])
    result = plan_cli.plan(cfg)
    row = result["strategies"][0]
    figures, split = row["figures"], row["memory_by_kind"]
    psi = figures["parameters"]
    assert figures["optimizer"] == 8 * psi // 4 + 2 * 8  # Adam m, v (fp32) and two int64 counters
    assert split["host"] == figures["optimizer"] + figures["grads"]  # each gradient goes down once reduced
    assert split["device"] == figures["params"] + figures["activations"] + figures["gathered_params"]
    assert planner.memory_by_kind(figures) == {"device": split["device"] + split["host"], "host": 0, "disk": 0}
    assert "optimizer offloaded" in markdown(result)


def test_bad_offload_fails_before_lowering():
    with pytest.raises(ValueError, match=r"offload must be one of \(.*'disk'\), got 'nvme'"):
        plan_cli.plan(plan_config(["model=gpt_tiny", "offload=nvme"]))


@pytest.mark.slow
def test_parameter_offload_moves_params_grads_and_optimizer_to_host():
    cfg = plan_config(["model=gpt_tiny", "mesh={dp: 4, tp: 1}", "precision=fp32", "strategies=[zero3]",
                       "offload=params"])
    result = plan_cli.plan(cfg)
    figures, split = result["strategies"][0]["figures"], result["strategies"][0]["memory_by_kind"]
    assert split["host"] == figures["optimizer"] + figures["params"] + figures["grads"]
    assert split["device"] == figures["activations"] + figures["gathered_params"]
    assert "ZeRO-Infinity" in markdown(result)
    on_disk = plan_cli.plan(plan_config(["model=gpt_tiny", "mesh={dp: 4, tp: 1}", "precision=fp32",
                                         "strategies=[zero3]", "offload=disk"]))["strategies"][0]["memory_by_kind"]
    assert on_disk == {"device": split["device"], "host": figures["grads"],
                       "disk": figures["optimizer"] + figures["params"]}


@pytest.mark.slow
def test_zero_offload_fits_13b_on_one_32gb_gpu():
    """ZeRO-Offload's result (Ren et al. 2021): one 32 GB V100 trains a 13B GPT with the optimizer
    state and gradients on the CPU, where plain data parallelism fits about 1.4B. Width 5120 (13B at
    40 layers), seq 1024, full recompute, bf16 with fp32 masters, one rank."""
    cfg = plan_config(["model=gpt3_175b", "model.d_model=5120", "model.n_heads=40", "model.n_layers=40",
                       "model.seq_len=1024", "mesh={dp: 1, tp: 1}", "strategies=[dp]", "remat=full",
                       "fit.device_gb=32", "fit.host_gb=1500"])
    result = plan_cli.plan(cfg)
    fit = result["strategies"][0]["fit"]
    assert 1.0e9 < fit["none"]["parameters"] < 2.0e9  # 16 bytes per parameter on device
    assert fit["optimizer"]["parameters"] > 13e9  # 2 bytes per parameter on device
    assert fit["optimizer"]["parameters"] < fit["params"]["parameters"] <= fit["disk"]["parameters"]
    assert fit["params"]["parameters"] < 1500e9 / 16  # host holds 16 bytes per parameter
    assert "Largest model that fits 32 GB" in markdown(result)


def test_a_budget_no_model_fits_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not even one layer of this model fits 1e-06 GB of device memory .* "
                                         r"raise fit.device_gb"):
        plan_cli.plan(plan_config(["model=gpt_tiny", "mesh={dp: 1, tp: 1}", "strategies=[dp]", "fit.device_gb=1e-6"]))

