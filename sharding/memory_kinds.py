"""Memory kinds, JAX's names for where a value lives: "device" (the accelerator, or the CPU on a
CPU-only machine), "host" (CPU memory) and, as ZeRO-Infinity's NVMe tier, "disk" (a file-backed,
memory-mapped storage, `sharding.disk`). `sharding.placement` assigns them; `sharding.liveness`
and `sharding.memory` read them; `running_on` marks what an allocation happening now belongs to.
"""
from __future__ import annotations

import contextlib
import contextvars

import optree

from .errors import SpecError
from .tree import NAMESPACE

DEVICE, HOST, DISK = "device", "host", "disk"
MEMORY_KINDS = (DEVICE, HOST, DISK)
KIND_META = "fp_memory_kind"
TRANSFER_META = "fp_transfer"

_running_on = contextvars.ContextVar("fp_memory_kind", default=DEVICE)


def check_kind(kind, where: str) -> str:
    """`kind` if it is a memory kind ("device", "host", "disk"; None means "device"), else a SpecError naming `where`."""
    if kind is None:
        return DEVICE
    if kind not in MEMORY_KINDS:
        raise SpecError(f"{where}: memory kind {kind!r} is not one of {MEMORY_KINDS}")
    return kind


def flat_kinds(kinds, tree, what: str) -> list[str]:
    """One memory kind per leaf of `tree`: `kinds` is a kind for every leaf, or a tree prefix of kinds."""
    count = len(optree.tree_leaves(tree, namespace=NAMESPACE, none_is_leaf=False))
    if kinds is None or isinstance(kinds, str):
        return [check_kind(kinds, what)] * count
    is_kind = lambda x: x is None or isinstance(x, str)
    try:
        broadcast = optree.tree_broadcast_prefix(kinds, tree, is_leaf=is_kind, namespace=NAMESPACE)
    except ValueError as error:
        raise SpecError(f"{what}: the tree of memory kinds does not match the value tree; {error}") from None
    leaves = optree.tree_leaves(broadcast, is_leaf=is_kind, none_is_leaf=True, namespace=NAMESPACE)
    return [check_kind(kind, what) for kind in leaves]


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
