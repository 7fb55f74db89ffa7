"""The first line an entry point prints, before its imports: torch, Hydra and the compiler take
seconds to import on a cold start, and a blank terminal for that long reads as a hang."""
from __future__ import annotations

import sys


def starting(command: str) -> None:
    print(f"{command}: starting (loading torch and the config)...", file=sys.stderr, flush=True)
