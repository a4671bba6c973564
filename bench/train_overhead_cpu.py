"""How much of a small CPU run of `lorakit train` is the training loop itself.

A 400-example, 2-epoch SFT run of the bundled model on the demo task (the first 400 notes of
src/lorakit/demo/train.jsonl, batch 8, sequences up to 512 tokens, eval on the 32 held-out notes
at the default cadence), run through the CLI as a user would, in this process so that each part
can be timed: the wall time from the script's start (imports included) against the time in
optimizer steps, and where the rest goes (model load, data, evaluations, checkpoints, the final
adapter and plot). The issue's bar: the whole run within 1.4x the optimizer steps.

    python bench/train_overhead_cpu.py [--examples 400] [--epochs 2] [--out results.json]
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args()

    from lorakit.cli import main as cli
    from lorakit.demo.__main__ import EVAL, TRAIN
    from lorakit.train import recipe, watch
    from lorakit.train.objectives.sft import SFT

    spent: dict[str, float] = {}

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(recipe, "load_model", "model load")
    timed(SFT, "load_data", "data")
    timed(SFT, "evaluate", "evaluations")
    timed(watch.Watch, "evaluate", "evaluations")
    timed(recipe, "save_checkpoint", "checkpoints")
    timed(recipe, "save_adapter", "final adapter and plot")
    timed(recipe, "plot_losses", "final adapter and plot")
    steps: list[float] = []
    timed_log = recipe.log

    def log(message: str) -> None:  # the run's closing line carries the time in optimizer steps
        if " s in " in message and "optimizer steps" in message:
            steps.append(float(message.rsplit("(", 1)[1].split(" s in ")[0]))
        timed_log(message)

    recipe.log = log
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[: opts.examples]))
        t0 = time.perf_counter()
        code = cli(["train", "--data", str(data), "--eval-data", str(EVAL), "--epochs", str(opts.epochs),
                    "--batch-size", "8", "--seq-len", "512", "--device", "cpu", "--output", str(Path(tmp) / "run")])
        run_s = time.perf_counter() - t0
    assert code == 0 and steps, "the run failed"
    total = time.perf_counter() - STARTED
    result = {
        "examples": opts.examples, "epochs": opts.epochs, "torch_threads": torch.get_num_threads(),
        "total_s": round(total, 1), "cli_run_s": round(run_s, 1), "optimizer_steps_s": round(steps[0], 1),
        "ratio": round(total / steps[0], 3), "imports_s": round(total - run_s, 1),
        **{f"{k.replace(' ', '_')}_s": round(v, 1) for k, v in spent.items()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    result["other_s"] = round(total - steps[0] - result["imports_s"] - sum(spent.values()), 1)
    print(json.dumps(result))
    if opts.out:
        Path(opts.out).write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
