"""The "disk" memory kind (`sharding.disk`, ZeRO-Infinity's NVMe tier): values in memory-mapped
files, read into host memory before each use, outputs written to new files right after they are
computed; bytes read and written are in `lower().cost`, and every kind's predicted peak equals
the measured one. Equivalence of whole strategies with disk-kind parameters and state is in
tests/sharding/test_offload_params.py (one spawn for both tiers)."""
from __future__ import annotations

import pytest
import torch

from sharding import Mesh, P, SpecError, jit
from sharding.disk import is_on_disk, to_disk
from sharding.memory import MemoryTracker

KINDS = ("disk", "disk", "device")


def _update(w, m, g):
    m = 0.9 * m + g
    return w - m, m


def _step(directory):
    return jit(_update, mesh=Mesh.abstract({"dp": 1}), in_specs=(P(),) * 3, out_specs=(P(),) * 2,
               in_memory_kinds=KINDS, out_memory_kinds=KINDS[:2], disk_dir=directory)


def test_a_disk_update_reads_each_input_once_and_writes_each_output_to_a_file(tmp_path):
    w, m, g = (torch.full((4, 8), float(i)) for i in (1, 2, 3))
    step = _step(tmp_path)
    on_disk = to_disk((w, m), tmp_path)
    assert all(is_on_disk(x) for x in on_disk) and not is_on_disk(w)
    lowered = step.lower(*on_disk, g)
    kinds = sorted(r["kind"] for r in lowered.transfers)
    assert kinds == ["d2h", "read", "read", "write", "write"]  # the gradient comes down to the host update
    assert lowered.cost["disk_io_bytes"] == {"read": 256, "write": 256}
    with MemoryTracker() as mem:
        mem.track(g)
        mem.track(on_disk, kind="disk")
        new_w, new_m = lowered.run(*on_disk, g)
    assert is_on_disk(new_w) and is_on_disk(new_m)
    assert torch.equal(new_m, 0.9 * m + g) and torch.equal(new_w, w - (0.9 * m + g))
    assert (mem.peak_by_kind["device"], mem.peak_by_kind["host"], mem.peak_by_kind["disk"]) == \
        (lowered.cost["device_peak_bytes"], lowered.cost["host_bytes"], lowered.cost["disk_bytes"])
    assert lowered.cost["disk_bytes"] == 4 * 128  # the inputs and the new outputs
    assert list(tmp_path.iterdir()) == []  # each file is unlinked once mapped: nothing is left behind


def test_bad_disk_configs_are_clear_errors(tmp_path):
    with pytest.raises(SpecError, match=r"memory kind 'disk' needs a directory .* disk_dir=PATH"):
        _step(None)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SpecError, match="is not writable .* give a directory this process can create files in"):
        _step(blocker / "offload")
    with pytest.raises(SpecError, match="memory kind 'nvme' is not one of"):
        jit(_update, mesh=Mesh.abstract({"dp": 1}), in_specs=(P(),) * 3, out_specs=(P(),) * 2,
            in_memory_kinds=("nvme", "disk", "device"))
