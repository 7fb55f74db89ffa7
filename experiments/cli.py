"""How the command-line entry points end on a bad config or a signal: one clear line, not a traceback.

A config error (a `ValueError`: the project's `SpecError`, `CheckpointError` and every pre-spawn
check are ones) prints `error: <message>` and exits 2; the full traceback is behind
`HYDRA_FULL_ERROR=1`, Hydra's own convention. Ctrl-C or SIGTERM stops the ranks
(`functional_parallel.launch`) and prints one line. Errors of the ranks themselves (`RankError`)
keep their tracebacks: they are what a user needs to read.
"""
from __future__ import annotations

import contextlib
import os
import sys

from functional_parallel import launch

CONFIG_ERROR_EXIT = 2


@contextlib.contextmanager
def one_line_errors():
    with launch.exit_quietly_on_interrupt():
        try:
            yield
        except ValueError as error:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {error}\n(set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr, flush=True)
            raise SystemExit(CONFIG_ERROR_EXIT) from None
