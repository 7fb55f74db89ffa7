"""Memory kinds, JAX's names for where a value lives: "device" (the accelerator, or the CPU on a
CPU-only machine) and "host" (CPU memory). `sharding.placement` assigns them; `sharding.liveness`
and `sharding.memory` read them; `running_on` marks what an allocation happening now belongs to.
"""
from __future__ import annotations

import contextlib
import contextvars

from .errors import SpecError

DEVICE, HOST = "device", "host"
MEMORY_KINDS = (DEVICE, HOST)
KIND_META = "fp_memory_kind"
TRANSFER_META = "fp_transfer"

_running_on = contextvars.ContextVar("fp_memory_kind", default=DEVICE)


def check_kind(kind, where: str) -> str:
    """`kind` if it is a memory kind ("device", "host"; None means "device"), else a SpecError naming `where`."""
    if kind is None:
        return DEVICE
    if kind not in MEMORY_KINDS:
        raise SpecError(f"{where}: memory kind {kind!r} is not one of {MEMORY_KINDS}")
    return kind


def current_kind() -> str:
    """The memory kind of what is allocated now: "host" inside `on_host` / `to_host`, else "device"."""
    return _running_on.get()


@contextlib.contextmanager
def running_on(kind: str):
    token = _running_on.set(kind)
    try:
        yield
    finally:
        _running_on.reset(token)
