"""Ranks die with their launcher: `python -m experiments.train` sent SIGINT or SIGTERM stops its ranks
and exits with one line (no traceback); killed outright (SIGKILL), its ranks notice and exit."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")


def _state(pid: int) -> str | None:
    """The process state letter (R, S, Z for a dead one not yet reaped), or None once it is gone."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _ranks(parent: int) -> list[int]:
    """The launcher's rank processes (spawned interpreters running `spawn_main`)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _wait_until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_ranks_do_not_outlive_the_launcher(signum, tmp_path):
    command = [sys.executable, "-m", "experiments.train", "model=gpt_tiny", "steps=100000", "log_every=1",
               "eval_batches=0", "progress=false", f"hydra.run.dir={tmp_path}"]
    parent = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ranks = _wait_until(lambda: len(_ranks(parent.pid)) == 2 and _ranks(parent.pid), 120, "2 ranks")
        _wait_until(lambda: (tmp_path / "metrics.jsonl").exists(), 120, "the first step")  # ranks are training
        parent.send_signal(signum)
        _, stderr = parent.communicate(timeout=15)
        _wait_until(lambda: not any(_alive(pid) for pid in ranks), 5, "every rank to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
    if signum != signal.SIGKILL:
        assert parent.returncode == 128 + signum.value, stderr[-2000:]
        assert "Traceback" not in stderr, stderr[-2000:]
        assert stderr.strip().splitlines()[-1] == f"interrupted ({signum.name}: stopped the 2 rank(s) of this job)"
