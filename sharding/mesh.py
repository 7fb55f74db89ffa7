"""`Mesh`: named axes over the ranks of torch.distributed; the last axis varies fastest."""
from __future__ import annotations

import itertools
import math
from typing import Mapping

import torch.distributed as dist

from .errors import MeshError


class Mesh:
    """Axis names and sizes, this rank's coordinate on each axis, and one process group per axis.

    `Mesh({"dp": 2, "tp": 2})` needs torch.distributed initialised with world size 4.
    `Mesh.abstract(...)` has names and sizes only (rank 0's view, or `rank`'s): enough to trace
    and plan at any size without processes; running on it is an error.
    """

    def __init__(self, axes: Mapping[str, int], *, _abstract: bool = False, _rank: int = 0):
        if not axes:
            raise MeshError("a Mesh needs at least one axis, e.g. Mesh({'dp': 2})")
        for name, size in axes.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise MeshError(f"mesh axis names must be identifiers, got {name!r}")
            if not isinstance(size, int) or size < 1:
                raise MeshError(f"mesh axis {name!r} must have a positive int size, got {size!r}")
        self.axis_names: tuple[str, ...] = tuple(axes)
        self.axis_sizes: tuple[int, ...] = tuple(int(s) for s in axes.values())
        self.size = math.prod(self.axis_sizes)
        self.abstract_only = _abstract
        self._device_mesh = None
        self._joint_groups: dict[tuple, str] = {}  # axis indices -> group name, made on first use
        if _abstract:
            if not 0 <= _rank < self.size:
                raise MeshError(f"rank {_rank} is not on Mesh({dict(axes)}), which has ranks 0..{self.size - 1}")
            self.rank = _rank
        else:
            if not dist.is_available() or not dist.is_initialized():
                raise MeshError(f"Mesh({dict(axes)}) needs torch.distributed initialised with world size "
                                f"{self.size}; call dist.init_process_group first (or use Mesh.abstract "
                                f"to trace and plan without processes)")
            world = dist.get_world_size()
            if world != self.size:
                raise MeshError(f"Mesh({dict(axes)}) has {self.size} devices but the world size is {world}; "
                                f"the product of the axis sizes must equal the world size")
            self.rank = dist.get_rank()
        self.coordinate = self._coordinate_of(self.rank)

    @classmethod
    def abstract(cls, axes: Mapping[str, int], rank: int = 0) -> "Mesh":
        return cls(axes, _abstract=True, _rank=rank)

    def shape_only(self) -> "Mesh":
        """The abstract mesh of the same axes: what every compiler stage but the last sees."""
        return self if self.abstract_only and self.rank == 0 else Mesh.abstract(self.shape())

    def _coordinate_of(self, rank: int) -> tuple[int, ...]:
        coordinate = []
        for size in reversed(self.axis_sizes):
            coordinate.append(rank % size)
            rank //= size
        return tuple(reversed(coordinate))

    def axis_index(self, axis: str) -> int:
        return self.axis_names.index(axis)

    def axis_size(self, axis: str) -> int:
        return self.axis_sizes[self.axis_index(axis)]

    def global_shape(self, local_shape, spec) -> list[int]:
        """The global shape of a tensor whose local block is `local_shape` under `spec` (a P)."""
        shape = list(local_shape)
        for dim in range(min(len(spec), len(shape))):
            for axis in spec.axes_of(dim):
                if axis in self.axis_names:
                    shape[dim] *= self.axis_size(axis)
        return shape

    def shape(self) -> dict[str, int]:
        return dict(zip(self.axis_names, self.axis_sizes))

    def device_mesh(self):
        """The torch `DeviceMesh` with the same axes (created on first use; DTensor and DCP take it)."""
        if self.abstract_only:
            raise MeshError("an abstract mesh has no process groups: lower on it, run on a real Mesh")
        if self._device_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            backend = dist.get_backend()
            device_type = "cuda" if backend == "nccl" else "cpu"
            self._device_mesh = init_device_mesh(device_type, self.axis_sizes, mesh_dim_names=self.axis_names)
        return self._device_mesh

    def group_name(self, axis_index) -> str:
        """The process group of this rank's peers along one axis, or along several axes jointly
        (a tuple of indices: the ranks that differ only on those axes), created on first use."""
        if isinstance(axis_index, tuple) and len(axis_index) == 1:
            axis_index = axis_index[0]
        if not isinstance(axis_index, tuple):
            return self.device_mesh().get_group(self.axis_names[axis_index]).group_name
        if self.abstract_only:
            raise MeshError("an abstract mesh has no process groups: lower on it, run on a real Mesh")
        if axis_index not in self._joint_groups:
            mine = None
            others = [a for a in range(len(self.axis_sizes)) if a not in axis_index]
            # Every rank creates every group of this axis set, in the same order (new_group's contract).
            for fixed in itertools.product(*(range(self.axis_sizes[a]) for a in others)):
                ranks = [r for r in range(self.size)
                         if tuple(self._coordinate_of(r)[a] for a in others) == fixed]
                group = dist.new_group(ranks)
                if self.rank in ranks:
                    mine = group
            self._joint_groups[axis_index] = mine.group_name
        return self._joint_groups[axis_index]

    def __repr__(self) -> str:
        return f"Mesh({self.shape()})"
