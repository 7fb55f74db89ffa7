"""The offload part of the compare report: when each host<->device copy of one step ran.

Read from rank 0's `copies` entry in a run's `summary.json` (`experiments.trainer`, recorded with
`sharding.copies.recording`): per copy its kind, bytes, and the times it was issued, ran (on the
copy worker), was waited on by the step and was ready.
"""
from __future__ import annotations

import pathlib

PLOT = "copies_timeline.png"
COLORS = {"h2d": "tab:blue", "d2h": "tab:orange"}


def offloaded(results: dict) -> dict:
    """The runs whose rank 0 recorded its copies (runs with an offload level)."""
    return {name: s for name, s in results.items() if s.get("ranks") and s["ranks"][0].get("copies")}


def plot_copies(results: dict, path: pathlib.Path) -> bool:
    """Per offloaded run, rank 0's copies of one step against time: each copy's run on the worker as a
    bar or dot (h2d blue, d2h orange) on its own row, a grey line from its issue to when the step had it,
    and a black tick where the step waited for it. False (no file) when no run copied anything."""
    runs = offloaded(results)
    if not runs:
        return False
    from experiments.report import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 1.2 + 1.6 * len(runs)), squeeze=False)
    for ax, (name, summary) in zip(axes[:, 0], runs.items()):
        found = summary["ranks"][0]["copies"]
        for row, span in enumerate(found["spans"]):
            ax.plot([1e3 * span["issue"], 1e3 * span["ready"]], [row, row], color="lightgrey", linewidth=1)
            ax.plot([1e3 * span["start"], 1e3 * span["end"]], [row, row], color=COLORS.get(span["kind"], "grey"),
                    linewidth=3, marker="o", markersize=2.5)  # a small copy runs for microseconds: a dot
            ax.plot([1e3 * span["wait"]], [row], marker="|", color="black", markersize=4)
        ax.invert_yaxis()
        ax.set_yticks([])
        ax.set_ylabel("copy")
        ax.set_title(f"{name}: {found['count']} copies, {found['bytes']:,} B; "
                     f"{100 * (found['hidden_fraction'] or 0):.0f}% of copy time ran before the step needed it",
                     fontsize=9)
        ax.set_xlabel("ms from the step's start (copy running: h2d blue, d2h orange; grey: issued → ready; "
                      "tick: the step waits)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def line(results: dict) -> list[str]:
    """One finding: per offloaded run, the share of its copy time that overlapped compute."""
    runs = offloaded(results)
    if not runs:
        return []
    parts = [f"{name} {100 * (s['ranks'][0]['copies']['hidden_fraction'] or 0):.0f}%" for name, s in runs.items()]
    return [f"- **Copies overlap compute** (rank 0, one step; copies issued early on a worker thread, waited on "
            f"late): the share of copy time that ran before the step needed it: {', '.join(parts)}."]


LEVELS = {"none": ("—", "—"), "optimizer": ("optimizer state, gradients", "—"),
          "params": ("parameters, optimizer state, gradients", "—"),
          "disk": ("gradients", "parameters, optimizer state")}  # what lives where, by `offload` level


def summary_block(results: dict) -> str:
    """The short table README shows (block `<doc_block>_summary`): per run, where its offload level
    keeps what, the bytes a step moves between the kinds, and the measured peaks per rank."""
    from experiments.report import _bytes, host_bytes, measured_peak

    lines = ["| run | on host | on disk | host→device / device→host B per step | disk read / write B per step "
             "| device peak measured (B) | host peak measured (B) |", "|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        level = (s.get("policy") or {}).get("offload") or "none"
        moved, io = s["cost"].get("transfer_bytes") or {}, s["cost"].get("disk_io_bytes") or {}
        host, disk = LEVELS.get(level, ("?", "?"))
        lines.append(f"| {name} | {host} | {disk} | {moved.get('h2d', 0):,} / {moved.get('d2h', 0):,} | "
                     f"{io.get('read', 0):,} / {io.get('write', 0):,} | {_bytes(measured_peak(s))} | "
                     f"{host_bytes(s):,} |")
    return "\n".join(lines)
