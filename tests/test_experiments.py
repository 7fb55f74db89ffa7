"""Hydra: the config composes, overrides work, typos and bad meshes fail before any process; `run` trains
on spawned ranks and writes its outputs."""
from __future__ import annotations

import itertools
import json
import pathlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from experiments import builders, train
from sharding import SpecError

from experiments.config import TABLE_STRATEGIES

CONF_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "conf")


def compose_config(overrides: list[str] | None = None):
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="config", overrides=overrides or [])


def test_default_config_composes():
    cfg = compose_config()
    assert cfg.model.arch == "gpt" and cfg.model.size == "small"
    assert cfg.optim.name == "adamw" and cfg.data.name == "pydoc"
    assert cfg.strategy.name == "dp" and builders.mesh_shape(cfg.mesh) == {"dp": 2}
    assert cfg.steps == 300 and OmegaConf.is_missing(cfg, "seed") is False
    assert cfg.data.global_batch % builders.mesh_shape(cfg.mesh)["dp"] == 0


def test_overrides_work():
    cfg = compose_config(["model=llama_tiny", "optim=sgd", "optim.lr=0.1", "steps=7", "model.n_layers=3"])
    assert (cfg.model.arch, cfg.model.size, cfg.model.n_layers) == ("llama", "tiny", 3)
    assert cfg.optim.name == "sgd" and cfg.optim.lr == 0.1 and cfg.steps == 7
    cfg = compose_config(["strategy=zero3", "mesh=dp4", "model=llama_tiny"])
    assert (cfg.strategy.name, builders.mesh_shape(cfg.mesh), cfg.model.arch) == ("zero3", {"dp": 4}, "llama")
    assert builders.validate(cfg).fsdp == ("dp",)


def test_mesh_is_a_file_name_or_axes_in_order():
    """`mesh=dp2_tp2` names conf/meshes/dp2_tp2.yaml; `mesh='{..}'` gives the axes and sizes, in order."""
    assert builders.mesh_shape(compose_config(["mesh=dp2_tp2"]).mesh) == {"dp": 2, "tp": 2}
    shape = builders.mesh_shape(compose_config(["mesh={tp: 2, dp: 1, pp: 2}"]).mesh)
    assert list(shape.items()) == [("tp", 2), ("dp", 1), ("pp", 2)]
    with pytest.raises(ValueError, match=r"unknown meshes 'dp3'; expected one of \[.*'dp2', 'dp2_sp2', 'dp2_tp2'"):
        builders.mesh_shape("dp3")
    with pytest.raises(ValueError, match=r"mesh.pp='two'"):
        builders.mesh_shape(compose_config(["mesh={dp: 2, pp: two}"]).mesh)


@pytest.mark.parametrize("override", ["optim.lr_rate=1", "model.n_layer=3", "stepz=3", "model=gpt_huge",
                                      "steps=many", "strategy.parms=[]", "mesh.pp=2"])
def test_bad_override_fails(override):
    with pytest.raises(ConfigCompositionException):
        compose_config([override])


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(MissingConfigException, match="zero3") as info:
        compose_config(["strategy=zero4"])
    assert "base_" not in str(info.value)  # schemas are not offered as strategies
    with pytest.raises(MissingConfigException, match="gpt_tiny") as info:
        compose_config(["model=gpt_huge"])
    assert "base_" not in str(info.value)


STRATEGIES = sorted(TABLE_STRATEGIES)  # the sequence strategies need an sp axis: below
MESHES = ("dp2", "dp4", "dp2_tp2")
MODELS = ("gpt_tiny", "gpt_small", "llama_tiny", "llama_small")
ALL_MODELS = tuple(sorted(p.stem for p in pathlib.Path(CONF_DIR, "model").glob("*.yaml")))  # + published sizes


@pytest.mark.slow
def test_every_strategy_mesh_and_model_composes_and_validates():
    """Each group option composes through Hydra; every strategy x mesh x model combination is valid.

    One compose per option (Hydra's compose is the slow part), then the combinations are merged
    the way Hydra merges group options, and `validate` checks them on meta tensors (no processes,
    no memory). The published sizes (the planner's) are checked once each, under the strategy
    that splits most (fsdp_tp on dp x tp), to keep this test fast.
    """
    def plain(cfg):
        return OmegaConf.to_container(cfg, resolve=True)

    base = plain(compose_config())
    strategies = {name: plain(compose_config([f"strategy={name}"]).strategy) for name in STRATEGIES}
    meshes = {name: builders.mesh_shape(compose_config([f"mesh={name}"]).mesh) for name in MESHES}
    models = {name: plain(compose_config([f"model={name}"]).model) for name in ALL_MODELS}
    assert {s["name"] for s in strategies.values()} == set(STRATEGIES)
    assert {(m["dp"], m.get("tp")) for m in meshes.values()} == {(2, None), (4, None), (2, 2)}
    assert set(MODELS) < set(ALL_MODELS)
    combinations = [*itertools.product(STRATEGIES, MESHES, MODELS),
                    *[("fsdp_tp", "dp2_tp2", model) for model in ALL_MODELS if model not in MODELS]]
    for strategy, mesh, model in combinations:
        cfg = train.config_from_dict({**base, "strategy": strategies[strategy], "mesh": meshes[mesh],
                                      "model": models[model]})
        if "tp" in strategies[strategy]["param_axes"].values() and "tp" not in meshes[mesh]:
            with pytest.raises(ValueError, match=r"names mesh axes \['tp'\]"):  # no silent data parallelism
                builders.validate(cfg)
            continue
        assert builders.validate(cfg).name == strategy


@pytest.mark.parametrize("strategy,mesh", [("ulysses", "dp2_sp2"), ("ulysses_zero3", "dp2_sp2"),
                                           ("ring", "{dp: 2, cp: 2}"), ("tp_cp", "{dp: 1, cp: 2, tp: 2}")])
def test_a_sequence_strategy_validates_on_a_mesh_with_its_axis(strategy, mesh):
    for model in MODELS:
        cfg = compose_config([f"strategy={strategy}", f"mesh={mesh}", f"model={model}"])
        assert builders.validate(cfg).name == strategy


def test_every_model_and_optimizer_builds():
    for model in MODELS:
        cfg = compose_config([f"model={model}"])
        assert builders.build_model(cfg.model, vocab_size=100).cfg.vocab_size == 128  # padded to vocab_multiple
    for optimizer in ("adamw", "sgd"):
        cfg = compose_config([f"optim={optimizer}"])
        assert builders.build_optimizer(cfg.optim, builders.build_schedule(cfg.optim, cfg.steps)) is not None


@pytest.mark.parametrize("overrides, error, message", [
    (["data.global_batch=7"], ValueError, r"global_batch=7 must be divisible by the dp = 2 ranks"),
    (["mesh=dp4", "data.global_batch=6"], ValueError, r"e\.g\. data\.global_batch=8"),
    (["strategy.batch=[pp]"], ValueError, r"names mesh axes \['pp'\]"),
    (["strategy=ulysses", "mesh=dp4"], ValueError, r"names mesh axes \['sp'\]"),
    (["strategy=ulysses", "mesh={dp: 1, sp: 4}", "model=llama_tiny"], ValueError,
     r"splits the model's kv_heads \(kv_heads=2\) over sp = 4 ranks"),
    (["strategy=tp", "mesh={dp: 1, tp: 3}"], SpecError, r"blocks/0/attn/wq: dim 1 .* not divisible by 3"),
    (["strategy=zero3", "model.vocab_multiple=1"], SpecError, r"wte: dim 0 has size 103, not divisible by 2"),
    (["mesh={dp: 0}"], ValueError, r"mesh.dp=0"),
    (["strategy=tp", "mesh={dp: 4, tp: 1}"], ValueError, r"strategy 'tp' splits the model over \['tp'\], of size 1 "
                                                       r"in the mesh dp=4 x tp=1: .* mesh='\{dp: 2, tp: 2\}'"),
    (["strategy=tp_sp", "mesh={dp: 4, tp: 1}"], ValueError, r"strategy 'tp_sp' splits the model over \['tp'\]"),
    (["+stepz=10"], ValueError, r"unknown config key 'stepz' \(added with \+\)"),
    (["strategy=tp", "mesh=dp4"], ValueError, r"strategy 'tp' names mesh axes \['tp'\], but the mesh has \['dp'\]"),
    (["grad_accum=3", "data.global_batch=8"], ValueError, r"4 rows per rank, .* into 3 equal micro-batches"),
    (["precision=fp8"], ValueError, r"unknown precision 'fp8'"),
    (["remat=some"], ValueError, r"remat must be one of \['none', 'full', 'selective'\], got 'some'"),
])
def test_bad_strategy_or_mesh_fails_before_spawning(overrides, error, message, tmp_path, monkeypatch):
    cfg = compose_config(overrides)
    monkeypatch.setattr(train.launch, "spawn", lambda *a, **k: pytest.fail("spawned despite a bad config"))
    with pytest.raises(error, match=message):
        train.run(cfg, tmp_path)


def test_strategy_validation_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys"):
        builders.build_strategy({"name": "x", "batch": ["dp"], "parms": []})


def test_mesh_must_match_the_torchrun_world():
    with pytest.raises(ValueError, match="mesh dp=2 = 2 ranks, but the job has 4"):
        builders.validate(compose_config(), world_size=4)


@pytest.mark.slow
def test_run_trains_on_two_ranks_and_writes_outputs(tmp_path):
    cfg = compose_config(["model=gpt_tiny", "strategy=zero3", "steps=30", "log_every=10", "eval_every=30",
                          "eval_batches=2", "progress=false", "data.global_batch=8", "optim.warmup_steps=5",
                          "remat=full"])  # ZeRO-3 with full activation recompute, end to end
    summary = train.run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert {"loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"} <= set(records[0])
    assert "val_loss" in records[-1]
    assert summary["final_loss"] < summary["first_loss"] - 0.5
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.steps == 30 and saved.model.size == "tiny" and saved.strategy.name == "zero3"
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["world_size"] == 2 and [r["rank"] for r in written["ranks"]] == [0, 1]
    assert written["remat"] == "full"
    cost = written["cost"]
    assert set(cost["bytes_by_kind"]) == {"all_gather", "reduce_scatter", "all_reduce"}  # ZeRO-3's collectives
    assert cost["bytes_moved"] == sum(cost["bytes_by_kind"].values()) > 0
    for rank in written["ranks"]:
        assert rank["peak_bytes_measured"] > 0 and rank["peak_bytes_predicted"] > 0 and rank["step_time_s"] > 0


@pytest.mark.slow
def test_torchrun_runs_one_rank_each_and_only_rank_zero_writes_the_run_dir(tmp_path):
    """Two torchrun processes (env:// rendezvous, gloo on CPU): one run dir, written by rank 0 only."""
    import os
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "experiments.train", "model=gpt_tiny", "steps=4", "log_every=2", "eval_batches=1",
               "data.global_batch=8", "progress=false"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = list((tmp_path / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert [r["step"] for r in map(json.loads, (run_dirs[0] / "metrics.jsonl").read_text().splitlines())] == [2, 4]


def test_fp16_overflow_is_left_to_the_loss_scaler():
    """An inf gradient norm under fp16 is a loss-scale overflow the step already skipped: the trainer's
    nonfinite guard must not undo it (that would undo the scale's shrink too); under fp32 it does."""
    import math
    from types import SimpleNamespace

    from experiments import trainer
    from experiments.checkpointing import NonFiniteGuard

    for precision, kept in [("fp16", True), ("fp32", False)]:
        cfg = compose_config([f"precision={precision}", "nonfinite=skip"])
        session = SimpleNamespace(cfg=cfg, guard=NonFiniteGuard(cfg), state="after the step")
        assert session.guard.keep(2, 3.0, 1.0)  # a finite first step (a non-finite one always stops)
        trainer.apply_nonfinite_policy(session, trainer.TrainState("params", "state", 3),
                                       {"loss": 3.0, "grad_norm": math.inf})
        assert (session.state == "after the step") == kept, precision


@pytest.mark.slow
def test_hugging_face_gpt2_trains_with_dropout_under_tp_sp(tmp_path):
    """`model.dropout=true`: the module's dropout is on for training (masks per block of a split
    value, `sharding.random_ops`) and off for validation; the loss falls on 4 ranks of dp x tp."""
    common = ["model=hf_gpt2", "model.hf.n_layer=1", "strategy=tp_sp", "mesh=dp2_tp2", "steps=30", "log_every=10",
              "eval_every=30", "eval_batches=2", "progress=false", "data.global_batch=8", "optim.warmup_steps=5"]
    drop = ["model.dropout=true", "model.hf.resid_pdrop=0.2", "model.hf.attn_pdrop=0.2", "model.hf.embd_pdrop=0.2"]
    with_dropout = train.run(compose_config(common + drop), tmp_path / "dropout")
    without = train.run(compose_config(common), tmp_path / "plain")
    assert with_dropout["final_loss"] < with_dropout["first_loss"] - 0.5
    assert with_dropout["first_loss"] != without["first_loss"]  # the same init and batch, dropped units
    assert with_dropout["val_loss"] < with_dropout["final_loss"]  # validation runs without dropout


@pytest.mark.slow
def test_a_config_error_is_one_line_and_its_traceback_is_behind_hydra_full_error(tmp_path):
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "experiments.train", "data.global_batch=7", f"hydra.run.dir={tmp_path}"]
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    short = subprocess.run(command, cwd=CONF_DIR + "/..", env=env, capture_output=True, text=True, timeout=120)
    assert short.returncode == 2 and "Traceback" not in short.stderr
    assert short.stderr.splitlines() == ["experiments.train: starting (loading torch and the config)...",
                                         "error: data.global_batch=7 must be divisible by the dp = 2 ranks strategy "
                                         "'dp' splits the batch over (e.g. data.global_batch=8)",
                                         "(set HYDRA_FULL_ERROR=1 for the traceback)"]
    full = subprocess.run(command, cwd=CONF_DIR + "/..", env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_the_bar_shows_no_nan_before_the_first_measurement_and_the_window_after():
    from rich.console import Console

    from experiments import metrics

    bar = metrics.progress_bar(True)
    task = metrics.new_task(bar, 300)
    console = Console(record=True, width=160, force_terminal=False)
    console.print(bar.make_tasks_table(bar.tasks))
    first = console.export_text()
    assert "nan" not in first and "loss – – tok/s – ms/step" in first, first
    bar.update(task, **metrics.bar_fields(4.1234, 12345.6, 0.0126))
    console.print(bar.make_tasks_table(bar.tasks))
    assert "loss 4.123 12,346 tok/s 13 ms/step" in console.export_text()


@pytest.mark.slow
def test_a_run_that_fails_on_its_config_leaves_no_run_dir(tmp_path):
    import subprocess
    import sys

    run_dir = tmp_path / "outputs" / "run"
    done = subprocess.run([sys.executable, "-m", "experiments.train", "data.global_batch=7",
                           f"hydra.run.dir={run_dir}"], cwd=CONF_DIR + "/..", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and not run_dir.exists(), (done.stderr, list(run_dir.parent.glob("*")))


@pytest.mark.slow
def test_train_log_holds_what_train_printed_and_each_logged_step(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "experiments.train", "model=gpt_tiny", "steps=10", "log_every=5",
                           "eval_batches=0", "progress=false", f"hydra.run.dir={tmp_path}"], cwd=CONF_DIR + "/..",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    log = (tmp_path / "train.log").read_text().splitlines()
    assert log[0] == f"train: dp on mesh dp=2; run dir {tmp_path}"
    assert [line.split(":")[0] for line in log if line.startswith("step ")] == ["step 5", "step 10"]
    assert log[-1].startswith(f"wrote {tmp_path}: summary.json") and log[-1] in done.stdout
