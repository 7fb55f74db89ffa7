"""Measured memory: the peak of live tensor bytes on this rank while a block of code runs.

The cost model's `peak_bytes` is a prediction from the graph; this is the measurement it is
checked against. On CPU every storage created by an op inside the block is counted from the
moment it is allocated until it is freed (a weakref finalizer on the storage: torch keeps one
Python object per live storage). Views share their base's storage and are not counted twice.
Tensors that exist before the block (the step's inputs) are added with `track`. On CUDA the
allocator's own counter (`torch.cuda.max_memory_allocated`) is the measurement.

With optimizer offload (`sharding.placement`) host and device can be the same CPU; a storage
is then counted as host memory when a host-kind input holds it (`track(..., kind="host")`) or a
host node or a copy down (`to_host`, `sharding.copies`) made it (`sharding.placement.current_kind()`), so the device peak
(`device_peak_bytes`) is measured apart from the host one (`host_peak_bytes`). On CUDA the
device peak is the allocator's and host memory is not measured. A file-backed storage
(`sharding.disk`) counts as "disk": tracked so, or made by `write_disk`.
"""
from __future__ import annotations

import weakref

import optree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .memory_kinds import DEVICE, DISK, HOST, MEMORY_KINDS, current_kind


class MemoryTracker(TorchDispatchMode):
    """`with MemoryTracker() as mem: mem.track(inputs); step(*inputs)` then `mem.peak_bytes`.

    `live_bytes` is what is still alive (counted) now; `peak_bytes` the largest it has been.
    `device="cuda"` reads the CUDA allocator instead of counting storages.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.live_bytes = 0
        self.peak_bytes = 0
        self.live_by_kind = {kind: 0 for kind in MEMORY_KINDS}
        self.peak_by_kind = {kind: 0 for kind in MEMORY_KINDS}
        self._sizes: dict[int, tuple[int, str]] = {}

    @property
    def device_peak_bytes(self) -> int:
        """The peak of device-kind bytes (all of `peak_bytes` when nothing is on host)."""
        return self.peak_by_kind[DEVICE]

    @property
    def host_peak_bytes(self) -> int | None:
        """The peak of host-kind bytes (None on CUDA, where only the device is measured)."""
        return None if self.device.type == "cuda" else self.peak_by_kind[HOST]

    @property
    def disk_peak_bytes(self) -> int | None:
        """The peak of disk-kind (file-backed) bytes (None on CUDA)."""
        return None if self.device.type == "cuda" else self.peak_by_kind[DISK]

    def track(self, tree, kind: str = DEVICE) -> None:
        """Count the tensors in `tree` (each storage once) as live from now until they are freed."""
        for leaf in optree.tree_leaves(tree, none_is_leaf=False, namespace="torch"):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf, kind)

    def reset_peak(self) -> None:
        """Start a new peak from what is live now."""
        self.peak_bytes = self.live_bytes
        self.peak_by_kind = dict(self.live_by_kind)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        return super().__enter__()

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.live_bytes = torch.cuda.memory_allocated(self.device)
            self.peak_by_kind[DEVICE], self.live_by_kind[DEVICE] = self.peak_bytes, self.live_bytes
            return False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        kind = current_kind()
        for leaf in optree.tree_leaves(out, none_is_leaf=False, namespace="torch"):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf, kind)
        return out

    def _add(self, tensor: torch.Tensor, kind: str = DEVICE) -> None:
        if tensor.device.type == "meta" or tensor.device.type != self.device.type:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = (size, kind)
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.live_by_kind[kind] += size
        self.peak_by_kind[kind] = max(self.peak_by_kind[kind], self.live_by_kind[kind])
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size, kind = self._sizes.pop(key, (0, DEVICE))
        self.live_bytes -= size
        self.live_by_kind[kind] -= size
