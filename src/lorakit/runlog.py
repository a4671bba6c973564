"""What a training run shows and leaves behind for people: console lines, the progress bar, loss.png."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # one process speaks for a multi-process run
        return
    from rich.console import Console

    Console(stderr=True, highlight=False).print(message)


def plot_losses(metrics_path: Path, png: Path, panels: Sequence[str] = ()) -> None:
    """Train and eval loss; with `panels` (a task metric, kl), one more plot for each, sharing the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = [key for key in panels if any(r.get(key) is not None for r in rows)]
    fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 2.2 * len(panels)), sharex=True, squeeze=False)
    ax = axes[0][0]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    for key, (panel,) in zip(panels, axes[1:], strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        panel.plot(*zip(*points, strict=True), "o-", color="tab:green" if key != "kl" else "tab:red")
        panel.set_ylabel("KL to the base (nats/token)" if key == "kl" else f"task metric: {key}")
        panel.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def progress_bar(enabled: bool = True):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:.0f} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=False,
        disable=not enabled,
    )


def format_record(record: dict[str, Any], total: int) -> str:
    parts = [f"step {record['step']}/{total}", f"epoch {record['epoch']:.2f}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)
