"""Each entry point prints a status line before it imports torch or Hydra (seconds on a cold
start): `-X importtime` logs every import to stderr in order, so the line must come first."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", ["experiments.train", "experiments.compare", "experiments.strategies",
                                    "experiments.plan", "benchmarks.strategies"])
def test_status_line_comes_before_torch_and_hydra(module, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", module], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    before = []
    try:
        for line in process.stderr:
            if line.startswith(f"{module}: starting"):
                break
            before.append(line)
        else:
            pytest.fail(f"{module} printed no status line:\n{''.join(before)[-2000:]}")
    finally:
        process.kill()
        process.wait()
    imported = [line.rsplit("|", 1)[-1].strip() for line in before if line.startswith("import time:")]
    assert imported and not {"torch", "hydra", "omegaconf"} & set(imported), imported
