"""Host<->device copies that overlap compute: issued early, waited on late, like a collective.

`issue_copy` allocates the destination at once, in the calling thread and under the memory kind it
belongs to, so `MemoryTracker` and the cost model both count it from the issue. It then copies in
the background:
- on CPU, a single worker thread does `dst.copy_(src)` (torch releases the GIL inside the op);
- on CUDA, a side stream does the copy, with `non_blocking` and a pinned host buffer for d2h.
`wait_copy(dst, src)` blocks until the copy is done and hands back `dst`. Taking `src` keeps the
source alive until then, in the graph and in the cost model alike. On fake tensors (the cost
model's run) nothing is copied.

`recording()` collects one span per copy: kind, bytes, and the times it was issued, started and
ended (the worker's), and when the step waited for it and had it (`time.perf_counter`). The span
shows how much of a copy ran while the step computed.
"""
from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch._subclasses.fake_tensor import is_fake

from .memory_kinds import DEVICE, HOST, running_on

_PENDING: dict[int, tuple] = {}  # id(dst) -> (future or CUDA event, span or None)
_WORKER: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()
_SPANS: list[dict] | None = None
_STREAMS: dict = {}


def _worker() -> ThreadPoolExecutor:
    global _WORKER
    with _LOCK:
        if _WORKER is None:
            _WORKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fp-copy")
        return _WORKER


def _copy_stream(device: torch.device):
    """One side stream per GPU for copies, made on first use."""
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]


def _destination(x: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    with running_on(HOST if kind == "d2h" else DEVICE):
        if kind == "d2h":
            pinned = x.device.type == "cuda" and not is_fake(x)
            return torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=pinned)
        return torch.empty(x.shape, dtype=x.dtype, device=device)


def issue_copy(x: torch.Tensor, kind: str, device: torch.device) -> torch.Tensor:
    """Start copying `x` device->host ("d2h") or host->`device` ("h2d"); the destination, to `wait_copy`."""
    dst = _destination(x, kind, device)
    if is_fake(x):
        return dst
    span = {"kind": kind, "bytes": x.numel() * x.element_size(), "issue": time.perf_counter()} \
        if _SPANS is not None else None
    cuda = x.device.type == "cuda" or dst.device.type == "cuda"
    if cuda:
        stream = _copy_stream(dst.device if dst.device.type == "cuda" else x.device)
        stream.wait_stream(torch.cuda.current_stream(stream.device))  # the source is computed
        with torch.cuda.stream(stream):
            dst.copy_(x, non_blocking=True)
            for tensor in (x, dst):  # the allocator must not reuse either before the copy stream is done
                if tensor.device.type == "cuda":
                    tensor.record_stream(stream)
            done = torch.cuda.Event()
            done.record(stream)
        _PENDING[id(dst)] = (done, span)
        return dst

    def copy():
        if span is not None:
            span["start"] = time.perf_counter()
        dst.copy_(x)
        if span is not None:
            span["end"] = time.perf_counter()

    _PENDING[id(dst)] = (_worker().submit(copy), span)
    return dst


def wait_copy(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """`dst` once its copy from `src` is complete (`src` is an argument so that it lives until now)."""
    pending = _PENDING.pop(id(dst), None)
    if pending is None:  # fake tensors, or already waited on
        return dst
    done, span = pending
    if span is not None:
        span["wait"] = time.perf_counter()  # when the step needs it
    if isinstance(done, Future):
        done.result()
    elif dst.device.type == "cpu":  # d2h: host code reads it next, so the host waits for the copy
        done.synchronize()
    else:  # h2d: device code reads it next, so the compute stream waits for the copy stream
        torch.cuda.current_stream(dst.device).wait_event(done)
    if span is not None:
        span["ready"] = time.perf_counter()  # when the step has it
        _SPANS.append(span)
    return dst


@contextlib.contextmanager
def recording():
    """Collect a span per copy waited on inside the block: `with recording() as spans: ...`."""
    global _SPANS
    previous, _SPANS = _SPANS, []
    try:
        yield _SPANS
    finally:
        _SPANS = previous


def hidden_fraction(spans: list[dict]) -> float | None:
    """The share of copy time (CPU worker) that ran before the step waited for it: 1.0 when every
    copy was done by the time it was needed, 0.0 when the step always waited for the whole copy."""
    timed = [s for s in spans if "start" in s]
    total = sum(s["end"] - s["start"] for s in timed)
    if not total:
        return None
    hidden = sum(max(0.0, min(s["end"], s["wait"]) - s["start"]) for s in timed)
    return hidden / total
