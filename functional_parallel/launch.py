"""Run a function on N local ranks (spawned processes, gloo on 127.0.0.1) and collect the results.

Used by the tests and the local experiments alike. Under torchrun nothing is spawned:
`init_from_env` joins the job torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).
Every collective is bounded by a timeout, and `spawn` watches its processes, so a rank that dies
or hangs ends the job with an error on every rank instead of a hang.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How long a collective waits for its peers before raising (gloo and NCCL alike). Long enough for
# the slowest rank to finish lowering on a busy CPU; short enough that a dead rank ends the job.
DEFAULT_COLLECTIVE_TIMEOUT_S = 120.0
# After one rank fails, how much longer than the collective timeout the others get to notice.
GRACE_S = 15.0


def init_process_group(rank: int, world_size: int, init_file: str,
                       timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S, backend: str | None = None) -> None:
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def launched_by_torchrun() -> bool:
    """True when torchrun (or any env:// launcher) set this process's rank and world size."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(timeout_s: float = 600.0) -> tuple[int, int, torch.device]:
    """Join the torchrun job: NCCL on this node's GPU LOCAL_RANK when CUDA is present, else gloo.

    Returns (rank, world size, the device this rank computes on).
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device


# How often a rank checks that the process that launched it is still there.
PARENT_POLL_S = 0.5


class Interrupted(RuntimeError):
    """The launching process got SIGINT or SIGTERM: its ranks were stopped. `.signal` names it."""

    def __init__(self, signum: int, world_size: int):
        self.signal = signal.Signals(signum)
        super().__init__(f"{self.signal.name}: stopped the {world_size} rank(s) of this job")


@contextlib.contextmanager
def exit_quietly_on_interrupt():
    """For command-line entry points: an `Interrupted` job (or Ctrl-C outside one) ends the process
    with one line on stderr and the shell's code for the signal (130 for SIGINT), not a traceback."""
    try:
        yield
    except Interrupted as stopped:
        print(f"interrupted ({stopped})", file=sys.stderr, flush=True)
        raise SystemExit(128 + stopped.signal.value) from None
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT.value) from None


def _die_with_launcher(launcher_pid: int) -> None:
    """End this rank soon after the process that launched it is gone (killed, crashed), whatever
    started the rank (spawn or forkserver); SIGINT is left to the launcher, which stops every rank."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the launcher stops us

    parent = os.getppid()  # the launcher (spawn) or the forkserver, which ends with the launcher

    def watch():
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent:  # re-parented: whoever started this rank is gone
                os._exit(1)
            try:
                os.kill(launcher_pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (or its pid reused by another user)
                os._exit(1)

    threading.Thread(target=watch, name="die-with-launcher", daemon=True).start()


def _worker(rank, world_size, init_file, result_dir, fn, args, timeout_s, backend=None, launcher_pid=None):
    if launcher_pid is not None:
        _die_with_launcher(launcher_pid)
    torch.set_num_threads(1)
    init_process_group(rank, world_size, init_file, timeout_s, backend)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    ok = False
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path + ".partial")
        ok = True
    except BaseException as error:  # reported to the parent with the rank's traceback
        torch.save({"ok": False, "error": f"{type(error).__name__}: {error}",
                    "type": type(error).__name__, "traceback": traceback.format_exc()}, path + ".partial")
    finally:
        os.replace(path + ".partial", path)
        dist.destroy_process_group()
    if not ok:
        sys.exit(1)


class RankError(RuntimeError):
    """Ranks failed; `.errors` maps rank -> (exception type name, message, traceback)."""

    def __init__(self, errors: dict):
        self.errors = errors
        first = next(iter(errors.values()))
        lines = [f"rank {rank}: {message.splitlines()[0] if message else kind}"
                 for rank, (kind, message, _) in errors.items()]
        super().__init__(f"{len(errors)} rank(s) failed\n" + "\n".join(lines) +
                         f"\nrank {next(iter(errors))} in full: {first[1]}\n{first[2]}")


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _wait(processes, timeout_s: float, deadline_s: float | None) -> dict:
    """Wait for every process; never hang. Returns rank -> reason for ranks that had to be killed.

    Once a rank exits without success, the others get the collective timeout plus a grace
    period to notice (their collectives raise), then are killed.
    """
    start = time.monotonic()
    give_up = start + deadline_s if deadline_s is not None else None
    killed = {}
    while True:
        alive = [p for p in processes if p.exitcode is None]
        if not alive:
            return killed
        failed = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
        if failed and give_up is None:
            give_up = time.monotonic() + timeout_s + GRACE_S
        if give_up is not None and time.monotonic() > give_up:
            reason = (f"still running {time.monotonic() - start:.0f}s after start" if not failed else
                      f"still running {timeout_s + GRACE_S:.0f}s after rank {failed[0]} failed")
            for p in alive:
                p.kill()
                p.join()
                killed[processes.index(p)] = reason
            return killed
        wait_for = 1.0 if give_up is None else max(0.01, min(1.0, give_up - time.monotonic()))
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=wait_for)


@contextlib.contextmanager
def _stopping_ranks_on_signals(processes):
    """SIGINT (Ctrl-C) or SIGTERM while the ranks run: kill them all and raise `Interrupted`."""
    def stop(signum, _frame):
        raise Interrupted(signum, len(processes))

    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        for process in processes:
            if process.exitcode is None:
                process.kill()
        for process in processes:
            process.join()
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# How ranks start. "spawn": a fresh interpreter per rank, as torchrun gives. "forkserver": ranks
# fork from one server that imported `PRELOAD` once, so a job starts in ~0.2 s instead of seconds
# of imports per rank (step times measured the same, within this machine's noise); the test suite
# uses it (tests/conftest.py), where start-up outweighs the few steps a test runs.
START_METHOD = "spawn"
PRELOAD = ["torch", "torch.distributed", "torch.multiprocessing", "functional_parallel.launch", "sharding"]


def _start_method() -> str:
    if START_METHOD == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)  # used when it starts
    return START_METHOD


def spawn(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
          deadline_s: float | None = None, rendezvous_file: str | None = None, backend: str | None = None) -> list:
    """`fn(rank, world_size, *args)` on `world_size` new processes; returns each rank's result.

    `timeout_s` bounds every collective; `deadline_s` (optional) bounds the whole job. A rank
    that raises or dies makes this raise `RankError` naming every failed rank; it never hangs.
    `backend` defaults to NCCL when there is a GPU per rank, else gloo. The ranks meet through
    `rendezvous_file` (default: a file in a fresh temp dir); a stale file from an earlier job is
    removed first, so a run dir can be reused.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = rendezvous_file or os.path.join(tmp, "rendezvous")
        if os.path.exists(init_file):
            os.remove(init_file)
        context = mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args, timeout_s, backend,
                                                    os.getpid()),
                                     nprocs=world_size, join=False, start_method=_start_method())
        with _stopping_ranks_on_signals(context.processes):
            killed = _wait(context.processes, timeout_s, deadline_s)
        outcomes = {}
        for rank, process in enumerate(context.processes):
            path = os.path.join(tmp, f"rank{rank}.pt")
            if os.path.exists(path):
                outcomes[rank] = torch.load(path, weights_only=False)
            else:
                message = (f"rank {rank} was killed: {killed[rank]}" if rank in killed else
                           f"rank {rank} {_describe_exit(process.exitcode)} without reporting (it died)")
                outcomes[rank] = {"ok": False, "type": "RankDied", "error": message, "traceback": ""}
    errors = {r: (o["type"], o["error"], o["traceback"]) for r, o in outcomes.items() if not o["ok"]}
    if errors:
        raise RankError(errors)
    return [outcomes[r]["result"] for r in range(world_size)]
