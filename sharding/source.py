"""The user's source line behind each traced node, for error messages and the collective log."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback

import torch
import torch.fx.proxy as fx_proxy
from torch.fx.experimental.proxy_tensor import PythonKeyTracer

_TORCH_DIR = os.path.dirname(torch.__file__)
_SHARDING_DIR = os.path.dirname(__file__)


@functools.lru_cache(maxsize=None)
def _is_user_file(filename: str) -> bool:
    return not (filename.startswith(_TORCH_DIR) or filename.startswith(_SHARDING_DIR)
                or "/optree/" in filename or filename.startswith("<"))


def _is_user_frame(frame: traceback.FrameSummary) -> bool:
    return _is_user_file(frame.filename)


class _UserFrames:
    """Stands in for torch's `CapturedTraceback` while tracing: the caller's user frames only.

    torch symbolizes every frame of the stack (a hundred deep inside make_fx) for each node and
    then drops all but a few; walking the live frames and keeping the user's is a fraction of that.
    """

    @staticmethod
    def extract() -> "_UserFrames":
        return _UserFrames()

    @staticmethod
    def summary() -> traceback.StackSummary:
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            if _is_user_file(code.co_filename):
                frames.append(traceback.FrameSummary(code.co_filename, frame.f_lineno, code.co_name))
            frame = frame.f_back
        return traceback.StackSummary.from_list(frames[::-1])


@contextlib.contextmanager
def user_stack_traces():
    """Keep every user frame in `node.meta["stack_trace"]`.

    make_fx on its own keeps only frames named `forward` (nn.Module code); our models are plain
    functions, so we widen the filter while tracing, and collect only the user's frames (torch is
    pinned, so these hooks are stable).
    """
    original, captured = PythonKeyTracer._filter_traceback_frames, fx_proxy.CapturedTraceback

    def keep_user_frames(self, stack):
        return traceback.StackSummary.from_list([f for f in stack if _is_user_frame(f)])

    PythonKeyTracer._filter_traceback_frames = keep_user_frames
    fx_proxy.CapturedTraceback = _UserFrames
    try:
        yield
    finally:
        PythonKeyTracer._filter_traceback_frames = original
        fx_proxy.CapturedTraceback = captured


def innermost_user_frame(tb) -> str:
    """`file:line in function: code` of the innermost user frame of a traceback (or "")."""
    frames = [f for f in traceback.extract_tb(tb) if _is_user_frame(f)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{relative(frame.filename)}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def relative(path: str) -> str:
    """`path` relative to the working directory when it is under it (shorter log lines)."""
    try:
        shorter = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if shorter.startswith("..") else shorter


def source_line(node: torch.fx.Node) -> str:
    """`file:line in function: code` of the innermost user frame that made `node` (or ""); for a
    backward node, of the forward op it differentiates (`sharding.phases`)."""
    trace = node.meta.get("forward_stack_trace") or node.meta.get("stack_trace") or ""
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith("File "):
            location = lines[index][len("File "):].replace('"', "").replace(", line ", ":").replace(", in ", " in ")
            path, colon, rest = location.partition(":")
            location = relative(path) + colon + rest
            code = lines[index + 1] if index + 1 < len(lines) and not lines[index + 1].startswith("File ") else ""
            return f"{location}: {code}" if code else location
    return ""
