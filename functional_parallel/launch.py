"""Run a function on N local ranks (spawned processes, gloo on 127.0.0.1) and collect the results.

Used by the tests and the local experiments alike. Under torchrun nothing is spawned:
`init_from_env` joins the job torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).
"""
from __future__ import annotations

import os
import socket
import tempfile
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


def init_process_group(rank: int, world_size: int, init_file: str, timeout_s: float = 120.0,
                       backend: str | None = None) -> None:
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


def _worker(rank, world_size, init_file, result_dir, fn, args, timeout_s, backend=None):
    torch.set_num_threads(1)
    init_process_group(rank, world_size, init_file, timeout_s, backend)
    path = os.path.join(result_dir, f"rank{rank}.pt")
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException as error:  # reported to the parent with the rank's traceback
        torch.save({"ok": False, "error": f"{type(error).__name__}: {error}",
                    "type": type(error).__name__, "traceback": traceback.format_exc()}, path)
    finally:
        dist.destroy_process_group()


class RankError(RuntimeError):
    """A rank raised; `.errors` maps rank -> (exception type name, message)."""

    def __init__(self, errors: dict):
        self.errors = errors
        first = next(iter(errors.values()))
        super().__init__(f"{len(errors)} rank(s) failed; rank {next(iter(errors))}: {first[1]}\n{first[2]}")


def spawn(fn: Callable[..., Any], world_size: int, *args, timeout_s: float = 120.0,
          rendezvous_file: str | None = None, backend: str | None = None) -> list:
    """`fn(rank, world_size, *args)` on `world_size` fresh processes; returns each rank's result.

    `backend` defaults to NCCL when there is a GPU per rank, else gloo. The ranks meet through
    `rendezvous_file` (default: a file in a fresh temp dir); a stale file from an earlier job is
    removed first, so a run dir can be reused.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = rendezvous_file or os.path.join(tmp, "rendezvous")
        if os.path.exists(init_file):
            os.remove(init_file)
        mp.start_processes(_worker, args=(world_size, init_file, tmp, fn, args, timeout_s, backend),
                           nprocs=world_size, join=True, start_method="spawn")
        outcomes = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    errors = {r: (o["type"], o["error"], o["traceback"]) for r, o in enumerate(outcomes) if not o["ok"]}
    if errors:
        raise RankError(errors)
    return [o["result"] for o in outcomes]
