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
    preference = any("rewards/margins" in r or "eval_rewards/margins" in r for r in rows)
    grpo = any("reward" in r or "eval_reward" in r for r in rows)
    count = 1 + len(panels) + preference + grpo  # DPO / ORPO: reward margin and accuracy; GRPO: reward, kl
    fig, axes = plt.subplots(count, 1, figsize=(7, 4 + 2.2 * (count - 1)), sharex=True, squeeze=False)
    ax = axes[0][0]
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_ylabel("loss (per pair)" if preference else "GRPO loss (eval: -reward)" if grpo else "loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    for key, (panel,) in zip(panels, axes[1 : 1 + len(panels)], strict=True):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        panel.plot(*zip(*points, strict=True), "o-", color="tab:green" if key != "kl" else "tab:red")
        panel.set_ylabel("KL to the base (nats/token)" if key == "kl" else f"task metric: {key}")
        panel.grid(alpha=0.3)
    if preference:
        _plot_rewards(axes[-1][0], rows)
    if grpo:
        _plot_grpo(axes[-1][0], rows)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_rewards(ax, rows: list[dict[str, Any]]) -> None:
    for key, style, label in (("rewards/margins", "-", "train margin"), ("eval_rewards/margins", "o-", "eval margin")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin (chosen - rejected)")
    ax.grid(alpha=0.3)
    share = ax.twinx()
    for key, style, label in (("rewards/accuracies", "--", "train accuracy"),
                              ("eval_rewards/accuracies", "s--", "eval accuracy")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            share.plot(*zip(*points, strict=True), style, color="gray" if key.startswith("r") else "black", label=label)
    share.set_ylim(0, 1.05)
    share.set_ylabel("preference accuracy")
    lines = ax.get_legend_handles_labels()
    more = share.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right")


def _plot_grpo(ax, rows: list[dict[str, Any]]) -> None:
    """GRPO: the rollouts' mean reward (a band of one std), the eval reward, and the KL to the base."""
    points = [(r["step"], r["reward"], r.get("reward_std") or 0.0) for r in rows if r.get("reward") is not None]
    if points:
        steps, means, stds = zip(*points, strict=True)
        ax.plot(steps, means, "-", label="reward")
        ax.fill_between(steps, [m - s for m, s in zip(means, stds, strict=True)],
                        [m + s for m, s in zip(means, stds, strict=True)], alpha=0.2)
    evals = [(r["step"], r["eval_reward"]) for r in rows if r.get("eval_reward") is not None]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval reward")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    kl = [(r["step"], r["kl"]) for r in rows if r.get("kl") is not None]
    if kl:
        share = ax.twinx()
        share.plot(*zip(*kl, strict=True), "--", color="tab:red", label="kl")
        share.set_ylabel("KL to the base (nats/token)")
        more = share.get_legend_handles_labels()
        lines = (lines[0] + more[0], lines[1] + more[1])
    if lines[0]:
        ax.legend(*lines, loc="lower right")


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


_SHOWN = frozenset({"step", "epoch", "lr", "loss", "tokens_per_s", "nll_loss", "reward", "reward_std",
                    "frac_reward_zero_std", "rollout_tokens_per_s", "train_tokens_per_s"})
"""Record keys format_record prints itself (the mem_* byte counts have their own memory line)."""
_WATCH_ORDER = ("kl", "kl_p95", "agreement")


def watched(record: dict[str, Any]) -> dict[str, float]:
    """The values an evaluation's watch added to a record: the task metric (--metric: exact, json,
    regex or a function's name), then kl, kl_p95 and agreement (--track-forgetting)."""
    def plain(key: str, value: Any) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _SHOWN
                and not key.startswith(("eval_", "mem_")) and "/" not in key)

    keys = [k for k, v in record.items() if plain(k, v) and k not in _WATCH_ORDER]
    keys += [k for k in _WATCH_ORDER if plain(k, record.get(k))]
    return {k: record[k] for k in keys}


def _number(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def format_record(record: dict[str, Any], total: int) -> str:
    parts = [f"step {record['step']}/{total}", f"epoch {record['epoch']:.2f}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "rewards/margins" in record:
        parts.append(f"margin {record['rewards/margins']:.3f}  acc {record['rewards/accuracies']:.0%}")
    if "reward" in record:  # GRPO: the rollouts' rewards, length and clipping (TRL's names in metrics.jsonl)
        parts.append(f"reward {record['reward']:.3f}±{record.get('reward_std', 0.0):.3f}")
        if "completions/mean_length" in record:
            parts.append(f"len {record['completions/mean_length']:.1f}")
    if "clip_ratio/region_mean" in record:
        parts.append(f"clipped {record['clip_ratio/region_mean']:.1%}")
    if "eval_reward" in record:
        parts.append(f"eval reward {record['eval_reward']:.3f}")
    if "eval_exact" in record:
        parts.append(f"eval exact {record['eval_exact']:.1%}")
    if "nll_loss" in record:  # ORPO's and DPO --rpo-alpha's nll term, per chosen token
        parts.append(f"nll {record['nll_loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "eval_rewards/margins" in record:
        parts.append(f"eval margin {record['eval_rewards/margins']:.3f}  eval acc {record['eval_rewards/accuracies']:.0%}")
    if "eval_nll_loss" in record:
        parts.append(f"eval nll {record['eval_nll_loss']:.4f}")
    parts += [f"{key} {_number(value)}" for key, value in watched(record).items()]
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if "rollout_tokens_per_s" in record:
        parts.append(f"rollout {record['rollout_tokens_per_s']:.0f} tok/s")
    if "train_tokens_per_s" in record:
        parts.append(f"train {record['train_tokens_per_s']:.0f} tok/s")
    return "  ".join(parts)
