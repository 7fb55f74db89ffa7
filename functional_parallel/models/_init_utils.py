"""Deterministic parameter creation shared by the models.

Values come from one CPU `torch.Generator` seeded by `seed`, drawn in float32 and then
cast and moved, so a seed gives the same numbers on any device, dtype or world size.
Under `torch.device("meta")` or a `FakeTensorMode` no random numbers are drawn at all:
the planner builds GPT-3-sized trees that way without allocating memory.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor


def is_abstract() -> bool:
    """True when tensors created now would be meta or fake (no storage to fill)."""
    probe = torch.empty(0)
    return probe.device.type == "meta" or isinstance(probe, FakeTensor)


class ParamFactory:
    """Creates leaves in a fixed order from one seeded generator."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.dtype = dtype
        self.abstract = is_abstract()
        self.generator = None if self.abstract else torch.Generator(device="cpu").manual_seed(seed)
        self.device = torch.empty(0).device  # the ambient default device (cpu, cuda, meta)

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        if self.abstract:
            return torch.empty(shape, dtype=self.dtype)
        values = torch.randn(shape, generator=self.generator, dtype=torch.float32, device="cpu") * std
        return values.to(device=self.device, dtype=self.dtype)

    def ones(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ones(shape, dtype=self.dtype)

    def zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype)
