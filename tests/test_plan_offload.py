"""`experiments.plan offload=optimizer`: the optimizer role leaves the device column for the host one."""
from __future__ import annotations

import pytest

from experiments import plan as plan_cli
from experiments.plan_report import markdown
from functional_parallel import planner

from .test_plan import plan_config


def test_offload_moves_the_optimizer_role_to_host():
    cfg = plan_config(["model=gpt_tiny", "mesh={dp: 4, tp: 1}", "precision=fp32", "strategies=[zero3]",
                       "offload=optimizer"])
    result = plan_cli.plan(cfg)
    row = result["strategies"][0]
    figures, split = row["figures"], row["memory_by_kind"]
    psi = figures["parameters"]
    assert split["host"] == figures["optimizer"] == 8 * psi // 4 + 2 * 8  # Adam m, v (fp32) and two int64 counters
    assert split["device"] == figures["params"] + figures["grads"] + figures["activations"] + \
        figures["gathered_params"]
    assert planner.memory_by_kind(figures) == {"device": split["device"] + split["host"], "host": 0, "disk": 0}
    assert "optimizer offloaded" in markdown(result)


def test_bad_offload_fails_before_lowering():
    with pytest.raises(ValueError, match=r"offload must be one of \(.*'disk'\), got 'nvme'"):
        plan_cli.plan(plan_config(["model=gpt_tiny", "offload=nvme"]))


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
