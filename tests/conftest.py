"""Shared test settings: deterministic seeds and small shared fixtures for the top-level tests."""
from __future__ import annotations

import pytest
import torch

from functional_parallel import launch

# Ranks fork from a server that imported torch once: a test's job starts in ~0.2 s instead of
# seconds of imports per rank (real processes and real gloo collectives either way).
launch.START_METHOD = "forkserver"


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same global RNG state (the code under test uses its own generators)."""
    torch.manual_seed(0)
    yield


def make_tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Seeded random int64 tokens [batch, seq]."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def random_tokens():
    """The `make_tokens` helper, as a fixture (test modules do not import conftest)."""
    return make_tokens
