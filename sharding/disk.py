"""The "disk" memory kind, ZeRO-Infinity's NVMe tier: a tensor whose storage is a memory-mapped
file (`torch.from_file(..., shared=True)`). The kernel pages it in when it is read and writes it
back to the file, so it holds no anonymous RAM of its own.

A disk value is never computed on. It is read into a host staging copy just before each use
(`read_disk`); for a device use that is just before its h2d, so a parameter on disk goes
disk -> host -> device once per window of use (`sharding.transfer_schedule`). A disk output is
written (`write_disk`) into a fresh file-backed tensor right after its value is computed.
Each file is unlinked as soon as it is mapped: the mapping keeps the data and nothing is left
behind when the tensor is freed or the process dies. So a checkpoint (`functional_parallel.checkpoint`)
stays a separate, complete copy, and a crash mid-step cannot corrupt it.
"""
from __future__ import annotations

import math
import os
import tempfile

import optree
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import is_fake

from .copies import wait_copy
from .errors import SpecError
from .memory_kinds import DISK, HOST, KIND_META, TRANSFER_META, running_on
from .source import source_line


def check_disk_dir(directory) -> str:
    """`directory` as a str if this process can create files in it (made if missing), else a SpecError."""
    if directory is None:
        raise SpecError("memory kind 'disk' needs a directory to store tensors in: pass jit(..., disk_dir=PATH) "
                        "(experiments.train: offload_dir=PATH)")
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise SpecError(f"the disk memory kind's directory {directory!r} is not writable ({error}); give a "
                        f"directory this process can create files in") from None
    return directory


def disk_empty(shape, dtype: torch.dtype, directory: str) -> torch.Tensor:
    """An uninitialised tensor whose storage is a memory-mapped file in `directory` (already unlinked)."""
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    descriptor, path = tempfile.mkstemp(dir=directory, prefix="fp-disk-", suffix=".bin")
    os.close(descriptor)
    try:
        with running_on(DISK):
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.unlink(path)
    return tensor.view(shape)


IO_BYTES = {"read": 0, "write": 0}  # bytes this process has read from / written to disk-kind storage


def write_disk(x: torch.Tensor, directory: str) -> torch.Tensor:
    """Host -> disk: a copy of `x` in a new file-backed tensor (a plain copy on fake tensors, which
    the cost model runs the graph on)."""
    if is_fake(x):
        with running_on(DISK):
            return x.clone()
    out = disk_empty(tuple(x.shape), x.dtype, directory)
    with running_on(DISK):
        out.copy_(x)
    IO_BYTES["write"] += x.numel() * x.element_size()
    return out


def read_disk(x: torch.Tensor) -> torch.Tensor:
    """Disk -> host: a copy of `x` in host memory (the staging buffer a use reads)."""
    if not is_fake(x):
        IO_BYTES["read"] += x.numel() * x.element_size()
    with running_on(HOST):
        return x.clone()


def io_bytes() -> dict[str, int]:
    """A copy of `IO_BYTES` (subtract two of them for what a step read and wrote)."""
    return dict(IO_BYTES)


def to_disk(tree, directory: str):
    """Every tensor of `tree` copied into file-backed storage in `directory` (for disk-kind inputs)."""
    directory = check_disk_dir(directory)
    return optree.tree_map(lambda x: write_disk(x, directory) if isinstance(x, torch.Tensor) else x, tree,
                           namespace="torch", none_is_leaf=False)


def is_on_disk(x: torch.Tensor) -> bool:
    """Whether `x`'s storage is a memory-mapped file."""
    return bool(getattr(x.untyped_storage(), "filename", None))


def _record(node: fx.Node, kind: str, example: torch.Tensor, source: str, name: str) -> None:
    node.meta[TRANSFER_META] = {"kind": kind, "axes": (), "bytes": example.numel() * example.element_size(),
                                "source": source, "shape": tuple(example.shape),
                                "dtype": str(example.dtype).replace("torch.", ""), "value": name}


def stage_disk(graph_module: fx.GraphModule, in_kinds: list[str], out_kinds: list[str], directory: str | None,
               values: dict) -> fx.GraphModule:
    """A read before every use of a disk input (one shared read for its host-side uses, which all
    lie in the update) and a write right after every value a disk output returns. `values`: each
    node's value on fake inputs of this rank's shapes (the records' bytes)."""
    if DISK not in in_kinds and DISK not in out_kinds:
        return graph_module
    directory = check_disk_dir(directory)
    graph = graph_module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    for node, kind in zip(placeholders, in_kinds):
        if kind != DISK:
            continue
        node.meta[KIND_META] = DISK
        users = sorted((user for user in node.users if user.target is not wait_copy), key=order.__getitem__)
        shared = None
        for user in users:
            if user.meta.get(TRANSFER_META, {}).get("kind") == "h2d":  # each fetch reads a fresh staging copy
                staging = _read_before(graph, node, user, values)
                for wait in [u for u in user.users if u.target is wait_copy]:  # which keeps it alive until done
                    wait.replace_input_with(node, staging)
            else:
                staging = shared = shared or _read_before(graph, node, user, values)
            user.replace_input_with(node, staging)
    output = next(node for node in graph.nodes if node.op == "output")
    written: dict[fx.Node, fx.Node] = {}
    results = list(output.args[0])
    for index, (value, kind) in enumerate(zip(results, out_kinds)):
        if kind != DISK or not isinstance(value, fx.Node):
            continue
        if value not in written:
            anchor = value if value.op != "placeholder" else placeholders[-1]
            with graph.inserting_after(anchor):
                write = graph.call_function(write_disk, (value, directory))
            write.meta[KIND_META] = DISK
            _record(write, "write", values[value], source_line(value) or value.name, value.name)
            written[value] = write
        results[index] = written[value]
    output.args = (tuple(results),)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _read_before(graph: fx.Graph, value: fx.Node, user: fx.Node, values: dict) -> fx.Node:
    with graph.inserting_before(user):
        read = graph.call_function(read_disk, (value,))
    read.meta[KIND_META] = HOST
    _record(read, "read", values[value], source_line(user) or value.name, value.name)
    return read
