"""The benchmark's timeline figure: one step of each of our strategies, per rank, compute and each
collective stream on its own row (from `sharding.comm_timeline`, recorded in `benchmarks.measure`).

A rank's compute row is green while it runs and hatched grey while it waits for a collective; a
stream's row shows each collective from its issue to the end of its wait. A bar on a stream row
over green compute is communication hidden behind compute; over grey it is communication the
rank waited for.
"""
from __future__ import annotations

from pathlib import Path

from sharding.comm_timeline import hidden_fraction

from .report import TARGETS

FIGURE = Path(__file__).resolve().parents[1] / "docs" / "figures" / "benchmark_timeline.png"
COLORS = {"all_gather": "tab:blue", "reduce_scatter": "tab:orange", "all_reduce": "tab:red", "all_to_all": "tab:purple"}


def shown(results: dict) -> list[str]:
    """Ours with a target against torch (dp, zero3, tp, tp_sp), else every one of ours that has a timeline."""
    timed = [name for name, entry in results["contenders"].items() if entry.get("timeline")]
    targeted = [name for name in timed if name in {ours for ours, _, _ in TARGETS}]
    return targeted or timed


def _rows(per_rank: list[dict]) -> list[tuple[int, str | None]]:
    """(rank, stream) per row: each rank's compute row (stream None), then its streams in first-issue order."""
    rows = []
    for rank, found in enumerate(per_rank):
        rows.append((rank, None))
        rows += [(rank, stream) for stream in dict.fromkeys(c["stream"] for c in found["collectives"])]
    return rows


def _panel(ax, name: str, per_rank: list[dict]) -> None:
    origin = min(found["start"] for found in per_rank)
    rows = _rows(per_rank)
    index = {row: i for i, row in enumerate(rows)}
    ms = lambda t: 1e3 * (t - origin)  # noqa: E731
    for rank, found in enumerate(per_rank):
        y = index[rank, None]
        ax.barh(y, ms(found["end"]) - ms(found["start"]), left=ms(found["start"]), color="tab:green", height=0.8)
        for c in found["collectives"]:
            ax.barh(y, ms(c["ready"]) - ms(c["wait"]), left=ms(c["wait"]), color="lightgrey", hatch="//",
                    edgecolor="grey", height=0.8)
            ax.barh(index[rank, c["stream"]], ms(c["ready"]) - ms(c["issue"]), left=ms(c["issue"]),
                    color=COLORS.get(c["kind"], "grey"), edgecolor="white", height=0.6)
    ax.set_yticks(range(len(rows)), [f"rank {r} compute" if s is None else f"  {s}" for r, s in rows], fontsize=7)
    ax.invert_yaxis()
    hidden = sum(hidden_fraction(found) for found in per_rank) / len(per_rank)
    step = max(ms(found["end"]) for found in per_rank)
    ax.set_title(f"{name}: one step, {step:.1f} ms; {len(per_rank[0]['collectives'])} collectives per rank, "
                 f"{100 * hidden:.0f}% of their in-flight time hidden behind compute", fontsize=9)
    ax.set_xlabel("ms from the first rank's step start")


def plot(results: dict, path: Path) -> Path | None:
    """The figure for `results` at `path` (None when no contender has a timeline)."""
    names = shown(results)
    if not names:
        return None
    from experiments.report import _pyplot

    plt = _pyplot()
    heights = [len(_rows(results["contenders"][name]["timeline"])) for name in names]
    figure, axes = plt.subplots(len(names), 1, figsize=(11, 0.9 * len(names) + 0.17 * sum(heights)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        _panel(ax, name, results["contenders"][name]["timeline"])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
