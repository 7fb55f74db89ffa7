"""Where a run's numbers go (rank 0 only): `metrics.jsonl`, `train.log`, TensorBoard, the progress bar, `loss.png`."""
from __future__ import annotations

import contextlib
import json
import pathlib
import time

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

NOT_YET = "–"  # a bar field before its first measurement (instead of a nan or a 0 that reads as one)


class MetricsWriter:
    """One sink for metrics: JSON lines, TensorBoard scalars, and the history for the plot."""

    def __init__(self, output_dir: pathlib.Path):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(output_dir / "metrics.jsonl", "w")
        self.log = open(output_dir / "train.log", "a")  # beside the launcher's lines (Hydra's job log)
        self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tb"))
        self.history: list[dict] = []

    def write(self, step: int, values: dict[str, float]) -> None:
        """One logged step: a JSON line, a TensorBoard scalar per value, and the in-memory history."""
        record = {"step": step, **values}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.log.write(f"step {step}: " + ", ".join(f"{key} {value:.6g}" for key, value in values.items()) + "\n")
        self.log.flush()
        for key, value in values.items():
            self.tensorboard.add_scalar(key, value, step)

    def scalar(self, key: str, value: float, step: int) -> None:
        """A TensorBoard-only scalar (per-step values that would bloat the JSON lines)."""
        self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        self.log.close()
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
    """The rank-0 bar: steps, loss, tokens/s and the last step's time (each `NOT_YET` until measured)."""
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
        TextColumn("{task.fields[step_ms]} ms/step"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
    )


def new_task(progress: Progress, total: int, completed: int = 0):
    return progress.add_task("train", total=total, completed=completed, loss=NOT_YET, tok_s=NOT_YET, step_ms=NOT_YET)


def bar_fields(loss: float, tokens_per_s: float, step_s: float) -> dict[str, str]:
    """The bar's fields for one logged window."""
    return {"loss": f"{loss:.3f}", "tok_s": f"{tokens_per_s:,.0f}", "step_ms": f"{1e3 * step_s:.0f}"}


@contextlib.contextmanager
def status(message: str, enabled: bool):
    """While the block runs, a live line: a spinner, `message` and the elapsed time (rank 0, when the
    bar is on); after it, `message: <seconds> s` on its own line."""
    started = time.perf_counter()
    if not enabled:
        yield
        return
    with Progress(SpinnerColumn(), TextColumn(message), TimeElapsedColumn(), transient=True) as live:
        live.add_task(message, total=None)
        yield
    print(f"{message}: {time.perf_counter() - started:.1f} s", flush=True)
