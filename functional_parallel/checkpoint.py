"""Sharded checkpoints (torch.distributed.checkpoint) that load under any strategy and mesh.

Each rank hands in its local shards and the specs + mesh that describe them; every leaf is
saved as a DTensor of its *global* shape, so DCP can cut the same bytes differently on load:
a checkpoint written by `zero3` on dp=4 loads under `tp_sp` on dp=2 x tp=2, or in one process.

On disk, under a root directory:

    step_00000005/   .metadata, __<rank>_0.distcp, meta.json (step, data position, leaf shapes)
    latest           the name of the newest *complete* checkpoint
    .tmp-step_.../   a save in progress (or one that crashed): never read

A save writes into `.tmp-step_N`, then renames it to `step_N` and only then points `latest` at
it (both renames are atomic), so an interrupted save is never taken as the latest. Loading
checks the files, keys, shapes and dtypes first and raises `CheckpointError` on every rank
before any collective runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, Replicate, Shard

from sharding import Mesh, P
from sharding.layout import REPLICATE, layout_from_spec
from sharding.tree import flat_specs, holds, leaf_paths

from .checkpoint_strided import from_stored, strided_axis, stored_spec, to_stored
from .tree import tree_unflatten

LATEST = "latest"
META = "meta.json"
FORMAT = 1
RNG_KEY = "rng/torch"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupt, or written for another model."""


@dataclass
class Restored:
    """What `load` returns: the trees (local shards for the given mesh), step and saved extras."""

    step: int
    trees: dict
    meta: dict  # the JSON-able extras given to `save` (data position, strategy, ...)
    rng_state: torch.Tensor  # torch's global CPU generator state at save time (set it to resume exactly)
    path: Path


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it assumes one process when torch.distributed is off; here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _flat(trees: Mapping[str, Any], specs: Mapping[str, Any] | None):
    """[(key, local tensor, spec)] over every tree, keys like "params/blocks/0/attn/wq"."""
    out = []
    for name, tree in trees.items():
        paths, leaves, _ = leaf_paths(tree)
        tree_specs = flat_specs(specs[name], tree, f"checkpoint specs[{name!r}]") if specs is not None \
            else [P()] * len(leaves)
        for path, leaf, spec in zip(paths, leaves, tree_specs):
            if not isinstance(leaf, torch.Tensor):
                raise CheckpointError(f"{name}/{path}: checkpoints hold tensors only, got {type(leaf).__name__}")
            out.append((f"{name}/{path}", leaf, spec))
    return out


def _held(spec: P, mesh: Mesh | None) -> bool:
    """Whether this rank holds the leaf (under a pipeline, only its stage's ranks do)."""
    return mesh is None or holds(spec, mesh)


def _global_shape(leaf: torch.Tensor, spec: P, mesh: Mesh | None) -> tuple[int, ...]:
    return tuple(mesh.global_shape(leaf.shape, spec)) if mesh is not None else tuple(leaf.shape)


def _chunked(key: str, local: torch.Tensor, spec: P, mesh: Mesh | None):
    """(global shape, (axis, dim)) of a leaf split chunked over one mesh axis, else None."""
    if mesh is None:
        return None
    shape = _global_shape(local, spec, mesh)
    found = strided_axis(spec, shape, mesh, key)
    return None if found is None else (shape, found)


def _stored(key: str, local: torch.Tensor, spec: P, mesh: Mesh | None):
    """(tensor, spec) as DCP stores the leaf: a chunked split is first gathered over its axis
    (`checkpoint_strided`); anything else as it is."""
    chunked = _chunked(key, local, spec, mesh)
    if chunked is None:
        return local, spec
    shape, found = chunked
    return to_stored(local, spec, shape, mesh, *found), stored_spec(spec, *found)


def _stored_like(key: str, like: torch.Tensor, spec: P, mesh: Mesh | None):
    """An empty tensor of the stored block's shape (the load target), its spec, and how to turn
    the loaded block back into this rank's layout."""
    chunked = _chunked(key, like, spec, mesh)
    if chunked is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format), spec, None
    shape, found = chunked
    kept = stored_spec(spec, *found)
    layout = layout_from_spec(kept, shape, mesh.axis_names, mesh.axis_sizes, where=key)
    block = torch.empty(layout.local_shape(shape, mesh.axis_sizes), dtype=like.dtype, device=like.device)
    return block, kept, lambda stored: from_stored(stored, spec, shape, mesh, *found)


def _as_global(key: str, local: torch.Tensor, spec: P, mesh: Mesh | None):
    """The local shard as a DTensor of its global shape (a plain tensor without a mesh)."""
    if mesh is None:
        return local
    shape = _global_shape(local, spec, mesh)
    layout = layout_from_spec(spec, shape, mesh.axis_names, mesh.axis_sizes, where=key)
    if layout.has_partial():
        raise CheckpointError(f"{key}: a Partial value cannot be checkpointed; reduce it first")
    placements = [Replicate() if p == REPLICATE else Shard(int(p)) for p in layout.placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), mesh.device_mesh(), placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def save(root: str | os.PathLike, step: int, trees: Mapping[str, Any], specs: Mapping[str, Any] | None,
         mesh: Mesh | None, meta: Mapping[str, Any] | None = None) -> Path:
    """Save `trees` (e.g. {"params": ..., "opt_state": ...}: this rank's local shards) at `step`.

    `specs[name]` is a spec tree (or one P) for `trees[name]` on `mesh`; with `mesh=None` the
    trees are global tensors in one process. `meta` is JSON-able (data position, config, ...).
    Called on every rank. Returns the checkpoint directory; an existing one is never overwritten.
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f".tmp-step_{step:08d}"
    if final.exists():  # every rank checks, before any collective
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it (resume from it, "
                              f"or train into another checkpoint directory)")
    flat = _flat(trees, specs)
    state = {key: _as_global(key, *_stored(key, leaf, spec, mesh), mesh) for key, leaf, spec in flat
             if _held(spec, mesh)}  # a leaf on another pipeline stage is saved by that stage's ranks
    state[RNG_KEY] = torch.get_rng_state()
    leaves = {key: {"shape": list(_global_shape(leaf, spec, mesh)), "dtype": str(leaf.dtype).replace("torch.", "")}
              for key, leaf, spec in flat}
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed earlier
        tmp.mkdir()
    _barrier()
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
    if _rank() == 0:
        record = {"format": FORMAT, "step": step, "meta": dict(meta or {}), "leaves": leaves,
                  "mesh": mesh.shape() if mesh is not None else None}
        _write_atomic(tmp / META, json.dumps(record, indent=1))
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
    _barrier()
    return final


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root`, or None when there is none yet."""
    root = Path(root)
    marker = root / LATEST
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{marker} names {path.name}, which does not exist; the checkpoint directory was "
                              f"modified by hand. Point `latest` at a complete step_* directory")
    return path


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the latest complete one under a root; else `CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if (path / META).exists() or (path / ".metadata").exists():
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no step_* directory with a `latest` marker); "
                              f"start without resume, or give the path of a checkpoint")
    return found


def read_record(path: Path) -> dict:
    """meta.json of a checkpoint, after checking every file DCP will read is present and long enough."""
    for name in (META, ".metadata"):
        if not (path / name).exists():
            raise CheckpointError(f"{path} is not a complete checkpoint: {name} is missing (was the save "
                                  f"interrupted?). Resume from the `latest` checkpoint instead")
    try:
        record = json.loads((path / META).read_text())
        storage = dcp.FileSystemReader(str(path)).read_metadata().storage_data
    except (ValueError, OSError, EOFError, pickle.UnpicklingError, AttributeError) as error:
        raise CheckpointError(f"{path} is corrupt: cannot read its metadata ({type(error).__name__}: {error})") \
            from None
    if record.get("format") != FORMAT or "leaves" not in record:
        raise CheckpointError(f"{path}/{META} is not a functional_parallel checkpoint record (format "
                              f"{record.get('format')!r}, expected {FORMAT})")
    needed: dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.exists() or file.stat().st_size < size:
            have = file.stat().st_size if file.exists() else "missing"
            raise CheckpointError(f"{path} is corrupt: shard file {name} is truncated or missing (needs {size} "
                                  f"bytes, has {have})")
    return record


def check_compatible(record: dict, flat, mesh: Mesh | None, path: Path) -> None:
    """Same leaves, global shapes and dtypes as the checkpoint, or a `CheckpointError` naming them."""
    saved = record["leaves"]
    wanted = {key: (list(_global_shape(leaf, spec, mesh)), str(leaf.dtype).replace("torch.", ""))
              for key, leaf, spec in flat}
    missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
    if missing or extra:
        raise CheckpointError(f"{path} holds other leaves than this run: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                              f"{' ...' if len(extra) > 5 else ''}; was it written for another model or optimizer?")
    for key, (shape, dtype) in wanted.items():
        if saved[key]["shape"] != shape:
            raise CheckpointError(f"{path}: leaf {key} has global shape {tuple(saved[key]['shape'])} in the "
                                  f"checkpoint but {tuple(shape)} in this run; the checkpoint was written for "
                                  f"another model shape")
        if saved[key]["dtype"] != dtype:
            raise CheckpointError(f"{path}: leaf {key} is {saved[key]['dtype']} in the checkpoint but {dtype} in "
                                  f"this run; load with the dtype it was saved in")


def load(path: str | os.PathLike, like: Mapping[str, Any], specs: Mapping[str, Any] | None,
         mesh: Mesh | None) -> Restored:
    """Load into the layout of `like` (local shards described by `specs` on `mesh`; None: global).

    `path` is a checkpoint or a root (its latest). `like` gives shapes and dtypes only; it is not
    written to. Every check runs before any collective, so a bad checkpoint fails on every rank.
    """
    path = resolve(path)
    record = read_record(path)
    flat = _flat(like, specs)
    check_compatible(record, flat, mesh, path)
    targets = {key: _stored_like(key, leaf, spec, mesh) for key, leaf, spec in flat if _held(spec, mesh)}
    state = {key: _as_global(key, block, kept, mesh) for key, (block, kept, _) in targets.items()}
    state[RNG_KEY] = torch.empty_like(torch.get_rng_state())
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=not _distributed())
    local = {key: value.to_local() if isinstance(value, DTensor) else value for key, value in state.items()}
    for key, (_, _, unstore) in targets.items():
        if unstore is not None:
            local[key] = unstore(local[key])
    trees = {}
    for name, tree in like.items():
        paths, leaves, treedef = leaf_paths(tree)
        # each leaf where `like` keeps it (DCP hands back DTensors on the mesh's device type;
        # offloaded optimizer state stays in host memory)
        trees[name] = tree_unflatten(treedef, [local[f"{name}/{p}"].to(leaf.device) if f"{name}/{p}" in local
                                               else leaf for p, leaf in zip(paths, leaves)])  # else: another stage's
    return Restored(step=int(record["step"]), trees=trees, meta=record["meta"], rng_state=local[RNG_KEY], path=path)


def read_global(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta.json record, {leaf key: global tensor}) of a checkpoint, read in this process alone.

    Needs no template and no process group: for inspecting, comparing and converting checkpoints.
    """
    path = resolve(path)
    record = read_record(path)
    dtypes = {name: getattr(torch, name) for name in {leaf["dtype"] for leaf in record["leaves"].values()}}
    state = {key: torch.empty(leaf["shape"], dtype=dtypes[leaf["dtype"]]) for key, leaf in record["leaves"].items()}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return record, state
