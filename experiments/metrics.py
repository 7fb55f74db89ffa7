"""Where a run's numbers go (rank 0 only): `metrics.jsonl`, TensorBoard, the progress bar, `loss.png`."""
from __future__ import annotations

import json
import math
import pathlib

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class MetricsWriter:
    """One sink for metrics: JSON lines, TensorBoard scalars, and the history for the plot."""

    def __init__(self, output_dir: pathlib.Path):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(output_dir / "metrics.jsonl", "w")
        self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tb"))
        self.history: list[dict] = []

    def write(self, step: int, values: dict[str, float]) -> None:
        """One logged step: a JSON line, a TensorBoard scalar per value, and the in-memory history."""
        record = {"step": step, **values}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in values.items():
            self.tensorboard.add_scalar(key, value, step)

    def scalar(self, key: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar (per-step values that would bloat the JSON lines)."""
        self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()


def read_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a `metrics.jsonl`."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def plot_losses(history: list[dict], path: pathlib.Path) -> None:
    """Train (and validation, where measured) loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            axes.plot(*zip(*points), style, label=key)
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/char)")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def progress_bar(enabled: bool) -> Progress:
    """The rank-0 bar: steps, loss, tokens/s and the last step's time."""
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
        TextColumn("{task.fields[step_ms]:.0f} ms/step"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def new_task(progress: Progress, total: int, completed: int = 0):
    return progress.add_task("train", total=total, completed=completed, loss=math.nan, tok_s=0.0, step_ms=0.0)
