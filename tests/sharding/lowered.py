"""One cached lowering per (strategy, schedule options) of the tiny GPT on its example mesh (abstract: no processes)."""
from __future__ import annotations

import functools

from functional_parallel.parallel import example_mesh, lower_abstract


@functools.lru_cache(maxsize=None)
def _cached(arch, strategy, options):
    return lower_abstract(arch, "tiny", strategy, example_mesh(strategy), global_batch=8, **dict(options))


def lower(strategy: str, arch: str = "gpt", **options):
    """(model, params, lowered) — shared between test files, so treat it as read-only."""
    return _cached(arch, strategy, tuple(sorted(options.items())))
