"""Shared test settings: deterministic seeds and small shared fixtures for the top-level tests."""
from __future__ import annotations

import pytest
import torch


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
