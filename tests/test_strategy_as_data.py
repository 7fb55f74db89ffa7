"""A strategy is one YAML file: a researcher's own config dir on Hydra's search path adds HSDP on a
3-axis mesh (ZeRO-3 over `fsdp`, replicated over `dp`, `tp` of size 1), and train, compare and plan
run it as they run the project's own strategies, with no code change."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from functional_parallel.models import build
from functional_parallel.parallel import Strategy, param_specs
from sharding import P

ROOT = pathlib.Path(__file__).resolve().parents[1]
HSDP = """\
# HSDP: ZeRO-3 within each fsdp group, replicated across dp; the batch split over both.
name: hsdp
example_mesh: {dp: 2, fsdp: 2, tp: 1}
batch: [[dp, fsdp]]
logical: {batch: [dp, fsdp]}
fsdp: [fsdp]
opt_state: null
"""


@pytest.fixture(scope="module")
def user_conf(tmp_path_factory) -> pathlib.Path:
    conf = tmp_path_factory.mktemp("my_conf")
    (conf / "strategy").mkdir()
    (conf / "strategy" / "hsdp.yaml").write_text(HSDP)
    return conf


def _run(module: str, overrides: list[str], conf: pathlib.Path, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", module, f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={cwd}", *overrides]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_file_alone_gives_every_leaf_its_spec():
    strategy = Strategy.from_dict(__import__("yaml").safe_load(HSDP))
    model = build("gpt", "tiny")
    params = model.init(0)
    specs = param_specs(strategy, params, model.axes(params))
    assert specs["wte"] == P("fsdp") and specs["blocks"][0]["attn"]["wo"] == P("fsdp")
    assert strategy.example_mesh == {"dp": 2, "fsdp": 2, "tp": 1} and strategy.batch == P(("dp", "fsdp"))


@pytest.mark.slow
def test_train_runs_the_new_strategy_on_its_three_axis_mesh(user_conf, tmp_path):
    _run("experiments.train", ["strategy=hsdp", "mesh={dp: 2, fsdp: 2, tp: 1}", "model=gpt_tiny", "steps=20",
                               "progress=false", "eval_batches=0", "data.global_batch=8", "optim.warmup_steps=5"],
         user_conf, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mesh"] == {"dp": 2, "fsdp": 2, "tp": 1} and summary["world_size"] == 4
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    kinds = {(c["kind"], c["axes"]) for c in summary["collectives"]}
    # parameters gathered and gradients reduce-scattered within fsdp, the shards all-reduced over dp
    assert {("all_gather", "fsdp"), ("reduce_scatter", "fsdp"), ("all_reduce", "dp")} <= kinds, kinds


@pytest.mark.slow
def test_compare_and_plan_accept_the_new_strategy(user_conf, tmp_path):
    done = _run("experiments.compare", ["strategies=[hsdp,zero3]", "steps=3"], user_conf, tmp_path / "compare")
    assert "hsdp" in done.stdout and "equivalent" in done.stdout
    report = (tmp_path / "compare" / "report.md").read_text()
    assert "| hsdp | hsdp | dp=2 × fsdp=2 |" in report
    _run("experiments.plan", ["model=gpt_tiny", "mesh={dp: 2, fsdp: 2, tp: 1}", "strategies=[hsdp,dp]",
                              "precision=fp32"], user_conf, tmp_path / "plan")
    rows = {row["strategy"]: row["figures"] for row in
            json.loads((tmp_path / "plan" / "plan.json").read_text())["strategies"]}
    # every parameter split over the 2 fsdp ranks: half of what plain data parallelism holds
    assert 2 * rows["hsdp"]["params"] == rows["dp"]["params"] > 0, rows["hsdp"]
    assert rows["hsdp"]["comm/fsdp/reduce_scatter/count"] > 0 and "comm/dp/all_reduce/count" in rows["hsdp"]
