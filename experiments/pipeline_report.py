"""The pipeline part of the compare report: each pipelined run's measured timeline and bubble.

Read from a run's `summary.json` "pipeline" entry (`experiments.trainer.pipeline_summary`): the
schedule, the bubble its formula gives, and one timed step of the first pipeline's ranks, each
action's span with the time its receives blocked.
"""
from __future__ import annotations

import pathlib

PLOT = "pipeline_timeline.png"
COLORS = {"F": "tab:blue", "B": "tab:orange", "W": "tab:green", "u": "tab:purple"}


def pipelined(results: dict) -> dict:
    """The runs that ran as pipelines and have a timeline."""
    return {name: s for name, s in results.items() if (s.get("pipeline") or {}).get("timeline")}


def plot_timeline(results: dict, path: pathlib.Path) -> bool:
    """Stage x time per pipelined run: forward (blue), backward (orange), weight-gradient (green)
    work and the optimizer update (purple), the blocked part of each action hatched grey. False (no file) when no run has a timeline."""
    runs = pipelined(results)
    if not runs:
        return False
    from experiments.report import _pyplot

    plt = _pyplot()
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 1.3 + 0.55 * sum(r["pipeline"]["stages"]
                                                                              for r in runs.values())),
                                squeeze=False)
    for ax, (name, summary) in zip(axes[:, 0], runs.items()):
        found = summary["pipeline"]
        for rank, spans in enumerate(found["timeline"]):
            for span in spans:
                start, idle = 1e3 * span["start"], 1e3 * span["idle"]
                width = 1e3 * (span["end"] - span["start"])
                ax.barh(rank, idle, left=start, color="lightgrey", hatch="//", edgecolor="grey", height=0.8)
                ax.barh(rank, width - idle, left=start + idle, color=COLORS.get(span["action"][0], "grey"),
                        edgecolor="white", height=0.8)
                if width - idle > 0.04 * 1e3 * max(s["end"] for row in found["timeline"] for s in row):
                    ax.text(start + idle + (width - idle) / 2, rank, span["action"], ha="center", va="center",
                            fontsize=7, color="white")
        ax.set_yticks(range(found["stages"]), [f"stage {r}" for r in range(found["stages"])])
        ax.invert_yaxis()
        ax.set_title(f"{name}: {found['schedule']}, {found['microbatches']} micro-batches; bubble measured "
                     f"{found['bubble_measured']:.2f}, formula {_formula(found)}", fontsize=9)
        ax.set_xlabel("ms from the step's first action")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def _formula(found: dict) -> str:
    return f"{found['bubble_formula']:.2f}" if found.get("bubble_formula") is not None else "n/a"


def lines(results: dict, image: bool = True) -> list[str]:
    """The report's pipeline section: per run, the schedule as printed and the bubble both ways (and
    the timeline plot's link, unless `image` is False: docs embed the copied figure themselves)."""
    runs = pipelined(results)
    if not runs:
        return []
    out = ["## Pipelines", "", "| run | schedule | stages | micro-batches | bubble measured | bubble formula |",
           "|---|---|---|---|---|---|"]
    for name, summary in runs.items():
        found = summary["pipeline"]
        out.append(f"| {name} | {found['schedule']} | {found['stages']} | {found['microbatches']} | "
                   f"{found['bubble_measured']:.3f} | {_formula(found)} |")
    out += ["", "Measured: one timed step of the first pipeline's ranks (idle = blocked in receives, and "
            "before a rank's first action or after its last); the formula assumes equal stages and free "
            "sends. Each schedule, as every rank runs it (`experiments.train` prints it before training):", ""]
    printed = list(dict.fromkeys(summary["pipeline"]["printed"] for summary in runs.values()))
    for schedule in printed:
        out += ["```", schedule, "```", ""]
    return out + ([f"![pipeline timelines]({PLOT})", ""] if image else [])
