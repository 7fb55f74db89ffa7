"""A Hydra callback that writes `sweep_summary.csv` into a multirun's sweep dir: one row per job.

Rows come from the job dirs (`.hydra/overrides.yaml` and the run's `summary.json`), so the CSV
is rewritten after every job (a sweep stopped halfway still has one) and a job that failed
shows up as `failed` instead of vanishing.
"""
from __future__ import annotations

import csv
import json
import pathlib
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

FILENAME = "sweep_summary.csv"
COLUMNS = ("job", "overrides", "status", "strategy", "mesh", "final_loss", "val_loss", "step_time_s",
           "tokens_per_s", "bytes_moved", "peak_bytes_predicted", "peak_bytes_measured")


def job_row(job_dir: pathlib.Path) -> dict[str, Any]:
    """One job's row: its overrides and, when it finished, the figures from its `summary.json`."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides or []), "status": "failed"}
    summary_file = job_dir / "summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        measured = [r.get("peak_bytes_measured") for r in summary.get("ranks", [])]
        row.update(status="done", strategy=summary["strategy"],
                   mesh="x".join(f"{axis}{size}" for axis, size in summary["mesh"].items()),
                   final_loss=summary["final_loss"], val_loss=summary["val_loss"],
                   step_time_s=summary["step_time_s"], tokens_per_s=summary["tokens_per_s"],
                   bytes_moved=summary["cost"]["bytes_moved"],
                   peak_bytes_predicted=summary["cost"]["peak_bytes_predicted"],
                   peak_bytes_measured=max(measured) if measured and None not in measured else None)
    return row


def write_sweep_summary(sweep_dir: str | pathlib.Path) -> pathlib.Path:
    """(Re)write `sweep_summary.csv` from every job dir under `sweep_dir` (job order)."""
    sweep_dir = pathlib.Path(sweep_dir)
    job_dirs = sorted((d for d in sweep_dir.iterdir() if (d / ".hydra").is_dir()),
                      key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else 0, d.name))
    path = sweep_dir / FILENAME
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for job_dir in job_dirs:
            writer.writerow(job_row(job_dir))
    return path


class SweepSummary(Callback):
    """Configured under `hydra.callbacks` in conf/config.yaml; active in multirun mode only."""

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            write_sweep_summary(HydraConfig.get().sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_sweep_summary(config.hydra.sweep.dir)
        print(f"sweep: wrote {path} (one row per job)", flush=True)
