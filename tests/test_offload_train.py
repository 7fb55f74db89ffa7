"""experiments.train with `offload=optimizer` (the optimizer state in host memory),
`offload=params` (the parameters too) and `offload=disk` (both in memory-mapped files): checkpoints save and resume them, the run equals one without offload bit for bit (on CPU host and device
compute alike), and the summary reports device and host bytes (predicted == measured)."""
from __future__ import annotations

import json

import pytest
import torch

from experiments import train
from functional_parallel import checkpoint
from sharding import SpecError

from .test_resume import compose_config, losses

TINY = ["strategy=zero3", "model=gpt_tiny", "model.n_layers=1", "steps=4", "log_every=2", "eval_batches=0",
        "progress=false", "data.global_batch=8", "optim.warmup_steps=1", "checkpoint_every=2"]


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["optimizer", "params", "disk"])
def test_offloaded_run_resumes_and_equals_the_run_without_offload(tmp_path, offload):
    train.run(compose_config(TINY + [f"checkpoint_dir={tmp_path / 'ck_a'}"]), tmp_path / "a")
    offloaded = TINY + [f"offload={offload}", f"checkpoint_dir={tmp_path / 'ck_b'}"]
    train.run(compose_config(offloaded + ["stop_after=2"]), tmp_path / "b1")
    train.run(compose_config(offloaded + ["resume=true"]), tmp_path / "b2")
    record_a, plain = checkpoint.read_global(tmp_path / "ck_a")
    record_b, resumed = checkpoint.read_global(tmp_path / "ck_b")
    assert record_a["step"] == record_b["step"] == 4 and plain.keys() == resumed.keys()
    assert all(torch.equal(plain[key], resumed[key]) for key in plain)
    assert losses(tmp_path / "b2")[4] == losses(tmp_path / "a")[4]
    summary = json.loads((tmp_path / "b2" / "summary.json").read_text())
    assert summary["offload"] == offload and summary["cost"]["transfer_bytes"]["d2h"] > 0
    for rank in summary["ranks"]:
        assert rank["device_peak_bytes_measured"] == rank["device_peak_bytes_predicted"]
        assert rank["host_bytes_measured"] == rank["host_bytes_predicted"] > 0
        assert rank["disk_bytes_measured"] == rank["disk_bytes_predicted"]
        assert (rank["disk_bytes_predicted"] > 0) == (offload == "disk")
        assert rank["disk_io_bytes_measured"] == summary["cost"]["disk_io_bytes"]  # read and written, one step
    for rank in summary["ranks"]:  # one step's copies, each issued before it was waited on
        spans = rank["copies"]["spans"]
        assert rank["copies"]["count"] == len(spans) > 0 and 0.0 <= rank["copies"]["hidden_fraction"] <= 1.0
        assert all(s["issue"] <= s["start"] <= s["end"] <= s["ready"] and s["wait"] <= s["ready"] for s in spans)
    io = summary["cost"]["disk_io_bytes"]
    assert (io["read"] > io["write"] > 0) if offload == "disk" else io == {"read": 0, "write": 0}
    plain_summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert all(r["host_bytes_predicted"] == 0 for r in plain_summary["ranks"])
    assert max(r["device_peak_bytes_predicted"] for r in summary["ranks"]) < \
        min(r["device_peak_bytes_predicted"] for r in plain_summary["ranks"])


def test_an_unwritable_offload_dir_fails_before_any_rank_starts(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SpecError, match="offload.* is not writable"):
        train.run(compose_config(TINY + ["offload=disk", f"offload_dir={tmp_path / 'a_file' / 'offload'}"]),
                  tmp_path / "run")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_bad_offload_fails_before_any_rank_starts(tmp_path):
    with pytest.raises(ValueError, match=r"offload must be one of \('none', 'optimizer', 'params', 'disk'\), got 'gpu'"):
        train.run(compose_config(TINY + ["offload=gpu"]), tmp_path / "run")


@pytest.mark.slow
def test_parameter_offload_under_bf16_equals_the_run_without_offload(tmp_path):
    """Mixed precision with the parameters offloaded: fp32 masters stay on host with the state, the
    bf16 compute copies come up per window; the run equals plain bf16 bit for bit."""
    bf16 = TINY + ["precision=bf16", "checkpoint_every=0"]
    plain = train.run(compose_config(bf16), tmp_path / "a")
    offloaded = train.run(compose_config(bf16 + ["offload=params"]), tmp_path / "b")
    assert losses(tmp_path / "b") == losses(tmp_path / "a") and offloaded["final_loss"] == plain["final_loss"]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    for rank in summary["ranks"]:
        assert rank["device_peak_bytes_measured"] == rank["device_peak_bytes_predicted"]
    assert summary["cost"]["transfer_bytes"]["h2d"] > 0
