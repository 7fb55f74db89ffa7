"""What a rank keeps from step to step, and where it lives: on the device, in host memory or in
files, by the run's `offload` level (`functional_parallel.parallel.param_memory_kind`, `state_memory_kind`)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from functional_parallel.parallel import param_memory_kind, state_memory_kind
from functional_parallel.tree import tree_map
from sharding import Mesh, shard
from sharding.disk import to_disk


@dataclasses.dataclass
class TrainState:
    """What changes from step to step: this rank's shards of params and optimizer state, the next step."""

    params: Any
    opt_state: Any
    step: int = 0


def state_device(offload: str, device: torch.device) -> torch.device:
    """Where the optimizer state lives: the CPU (host memory) when offloaded, else `device`."""
    return torch.device("cpu") if state_memory_kind(offload) != "device" else device


def params_device(offload: str, device: torch.device) -> torch.device:
    """Where the parameters live: the CPU (host memory, or files) with `offload="params"` or "disk", else `device`."""
    return torch.device("cpu") if param_memory_kind(offload) != "device" else device


def kept_where_offloaded(state: TrainState, cfg: Any) -> TrainState:
    """Parameters and state in files under `offload=disk` (fresh or restored: DCP loads into RAM)."""
    if cfg.offload != "disk":
        return state
    return dataclasses.replace(state, params=to_disk(state.params, cfg.offload_dir),
                               opt_state=to_disk(state.opt_state, cfg.offload_dir))


def initial_state(params, opt_state, specs: tuple, mesh: Mesh, device: torch.device,
                  offload: str = "none") -> TrainState:
    """Step 0: this rank's shards of the freshly initialised global params and optimizer state
    (the state in host memory with `offload="optimizer"`, the parameters too with "params"; they
    stay there, step after step)."""
    where, params_where = state_device(offload, device), params_device(offload, device)
    return TrainState(params=tree_map(lambda x: _placed(x, params_where), shard(params, specs[0], mesh)),
                      opt_state=tree_map(lambda x: _placed(x, where), shard(opt_state, specs[1], mesh)), step=0)


def _placed(x: torch.Tensor, device) -> torch.Tensor:
    """`x` on `device`; a meta tensor (a leaf another pipeline stage holds) stays as it is."""
    return x if x.device.type == "meta" else x.to(device)
