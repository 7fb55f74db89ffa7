"""Optional: `torch.compile` of a lowered per-rank graph (inductor fuses the elementwise ops of
the optimizer and the model into a few kernels; the collectives stay as they are).

Off by default: on CPU it needs a C++ compiler and takes tens of seconds per strategy per rank,
and a CPU step of a small model is dominated by collective latency, not by kernels. On CUDA it
removes most kernel launches. Use as `compile_lowered(step.lower(*args)).run(*args)`.
"""
from __future__ import annotations

import dataclasses

import torch

from .api import Lowered


def compile_lowered(lowered: Lowered, **compile_options) -> Lowered:
    """The same lowered step whose `run` calls a `torch.compile`d copy of the per-rank graph."""
    options = {"fullgraph": True, "dynamic": False, **compile_options}
    return dataclasses.replace(lowered, graph=torch.compile(lowered.graph, **options))
