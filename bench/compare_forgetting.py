"""Learning vs forgetting on the bundled model and task: a gentle adapter and an over-trained one.

Trains the demo's adapter (30 steps of 8 notes, lr 1e-3) and an over-trained one (by default
3x the steps at 3x the learning rate, with a short warmup) with `--metric exact --save-best exact`,
then runs `lorakit compare` on both against the bundled SmolLM2-135M-Instruct: KL from the base
on the base's own continuations of the general prompts, and exact match on held-out notes.
tests/experiment/test_forgetting.py asserts the same experiment's outcome (`make test-experiment`).

    python bench/compare_forgetting.py                                  # gentle 30 @ 1e-3, over 90 @ 3e-3
    python bench/compare_forgetting.py --over-steps 30 --over-lr 1e-2 --over-warmup 0   # 10x lr, no warmup
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lorakit.compare.command import CompareArgs, compare
from lorakit.demo.__main__ import EVAL, TRAIN
from lorakit.train.recipe import TrainArgs, train


def run(output: Path, steps: int, lr: float, warmup: int | None, held_out: int) -> float:
    t0 = time.perf_counter()
    train(TrainArgs(data=str(TRAIN), eval_data=str(EVAL), output=str(output), max_steps=steps, lr=lr,
                    warmup_steps=warmup, batch_size=8, seq_len=512, rank=16, alpha=32, log_every=10,
                    eval_every=max(1, steps // 3), device="cpu", metric="exact", metric_rows=held_out,
                    save_best="exact", keep_checkpoints=0, overwrite=True))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/forgetting")
    parser.add_argument("--gentle-steps", type=int, default=30)
    parser.add_argument("--gentle-lr", type=float, default=1e-3)
    parser.add_argument("--over-steps", type=int, default=90)
    parser.add_argument("--over-lr", type=float, default=3e-3)
    parser.add_argument("--over-warmup", type=int, default=9, help="warmup steps of the over-trained run")
    parser.add_argument("--held-out", type=int, default=8, help="held-out notes for exact match during training")
    parser.add_argument("--task-rows", type=int, default=16, help="held-out notes for compare's exact match")
    parser.add_argument("--prompts", type=int, default=12, help="general prompts the base continues")
    opts = parser.parse_args()

    root = Path(opts.output)
    times = {
        "gentle": run(root / "gentle", opts.gentle_steps, opts.gentle_lr, None, opts.held_out),
        "over": run(root / "over", opts.over_steps, opts.over_lr, opts.over_warmup, opts.held_out),
    }
    t0 = time.perf_counter()
    report = compare(CompareArgs(adapter=[str(root / "gentle"), str(root / "over")], data=str(EVAL),
                                 task_rows=opts.task_rows, prompts=opts.prompts, max_new_tokens=48,
                                 output=str(root), device="cpu"))
    times["compare"] = time.perf_counter() - t0
    result = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "settings": vars(opts),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "base_exact": report["task"]["base"]["metric"],
        "adapters": [{k: a[k] for k in ("name", "kl_mean", "kl_p95", "agreement", "perplexity_base",
                                        "perplexity_adapted", "task_loss", "task_metric")} for a in report["adapters"]],
    }
    for a in report["adapters"]:
        print(a["headline"])
    print(json.dumps(result, indent=2))
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
