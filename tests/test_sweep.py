"""The sweep callback: `sweep_summary.csv` has one row per job dir, finished or failed."""
from __future__ import annotations

import csv
import json
import pathlib

import yaml
from omegaconf import OmegaConf

from experiments.sweep import COLUMNS, FILENAME, SweepSummary


def make_job(sweep_dir, name, overrides, summary=None):
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))


def summary_of(strategy, final_loss, bytes_moved, peaks):
    return {"strategy": strategy, "mesh": {"dp": 2, "tp": 1}, "final_loss": final_loss, "val_loss": final_loss + 0.1,
            "step_time_s": 0.05, "tokens_per_s": 1000.0,
            "cost": {"bytes_moved": bytes_moved, "peak_bytes_predicted": max(peaks)},
            "ranks": [{"rank": r, "peak_bytes_measured": p} for r, p in enumerate(peaks)]}


def test_callback_writes_one_row_per_job_in_job_order(tmp_path):
    make_job(tmp_path, "0", ["strategy=dp"], summary_of("dp", 2.5, 100, [10, 12]))
    make_job(tmp_path, "1", ["strategy=zero3"])  # failed: no summary.json
    make_job(tmp_path, "10", ["strategy=tp_sp"], summary_of("tp_sp", 2.4, 300, [7, 7]))
    make_job(tmp_path, "2", ["strategy=zero1"], summary_of("zero1", 2.5, 200, [9, 9]))
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    with open(tmp_path / FILENAME) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]
    assert [r["status"] for r in rows] == ["done", "failed", "done", "done"]
    assert rows[0]["overrides"] == "strategy=dp" and rows[1]["overrides"] == "strategy=zero3"
    assert float(rows[0]["final_loss"]) == 2.5 and float(rows[0]["val_loss"]) == 2.6
    assert int(rows[2]["bytes_moved"]) == 200 and int(rows[3]["peak_bytes_predicted"]) == 7
    assert int(rows[0]["peak_bytes_measured"]) == 12 and rows[0]["mesh"] == "dp2xtp1"


def test_callback_is_configured_in_the_train_config():
    config = OmegaConf.load(pathlib.Path(__file__).resolve().parents[1] / "conf" / "config.yaml")
    assert config.hydra.callbacks.sweep_summary._target_ == "experiments.sweep.SweepSummary"
