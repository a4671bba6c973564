"""`lorakit plan --device cpu` against the peak RSS of real `lorakit train --device cpu` runs.

    PYTHONPATH=src python bench/plan_cpu.py                       # the table in bench/RESULTS.md
    PYTHONPATH=src python bench/plan_cpu.py --configs auto:512 --allocators returning,default --json

Each run trains the bundled SmolLM2-135M-Instruct for `--steps` steps on rows of `--seq-len`
tokens (plain text, every token supervised), `--batch-size` rows a micro-batch, in pieces of
`max_tokens` tokens, in a process of its own with one thread. The child records its resident
memory after importing what the run needs (the baseline `lorakit plan` predicts above), the
high-water mark of loading (the recipe's setup: model, tokenizer, data, adapter) and, after
resetting the mark (/proc/self/clear_refs, Linux), the high-water mark of training.

Allocators: `default` is glibc's malloc as it comes, which keeps freed blocks under its (growing)
mmap threshold in its heaps; `returning` sets MALLOC_MMAP_THRESHOLD_=131072, so freed tensors
go back to the system at once and the peak RSS is the peak of live memory, which is what
`lorakit plan` predicts (as CUDA's max_memory_allocated is on the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALLOCATORS = {"default": {}, "returning": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
MiB = 2**20

CHILD = r"""
import json, sys

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

# what a run imports, loaded before the baseline (the plan counts above it)
import matplotlib.pyplot  # noqa: F401  (loss.png)
import rich.progress  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import lorakit.train.recipe as recipe
from lorakit.cli import main

baseline = status("VmRSS")
marks = {}
setup = recipe.setup

def measured_setup(*args, **kwargs):
    run = setup(*args, **kwargs)
    marks["load_peak"] = status("VmHWM") - baseline
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    return run

recipe.setup = measured_setup
code = main(["train", *sys.argv[1:]])
marks["train_peak"] = status("VmHWM") - baseline
marks["baseline"] = baseline
print("MEASURED " + json.dumps(marks))
sys.exit(code)
"""


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    """Plain-text rows long enough to fill any --seq-len up to 1024 of the bundled tokenizer."""
    rng = random.Random(seed)
    words = "alpha beta gamma delta note call demo price follow friday acme order refund reply".split()
    with path.open("w") as f:
        for _ in range(rows):
            text = " ".join(f"{rng.choice(words)}{rng.randint(0, 99)}" for _ in range(700))
            f.write(json.dumps({"text": text}) + "\n")


def measure(precision: str, max_tokens: int, allocator: str, *, batch_size: int, seq_len: int, steps: int,
            workdir: Path) -> dict:
    """One `lorakit train --device cpu` run in a child process: its load and training peaks above
    the baseline, in MiB."""
    data = workdir / "text.jsonl"
    if not data.exists():
        write_data(data, rows=max(16, batch_size * steps))
    out = workdir / f"run-{precision}-{max_tokens}-{allocator}"
    env = {**os.environ, "LORAKIT_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), **ALLOCATORS[allocator]}
    cmd = [sys.executable, "-c", CHILD, "--data", str(data), "--output", str(out), "--overwrite",
           "--device", "cpu", "--precision", precision, "--batch-size", str(batch_size), "--seq-len", str(seq_len),
           "--max-tokens", str(max_tokens), "--max-steps", str(steps), "--eval-every", "1000", "--save-every", "1000"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MEASURED ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"lorakit train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    measured = json.loads(lines[-1].removeprefix("MEASURED "))
    return {
        "precision": precision, "max_tokens": max_tokens, "allocator": allocator, "batch_size": batch_size,
        "seq_len": seq_len, "steps": steps, "baseline_mib": measured["baseline"] / MiB,
        "train_peak_mib": measured["train_peak"] / MiB, "load_peak_mib": measured["load_peak"] / MiB,
    }


def predict(precision: str, max_tokens: int, *, batch_size: int, seq_len: int) -> dict:
    """What `lorakit plan --device cpu` predicts for the same settings, in MiB."""
    from lorakit.train.plan import PlanArgs, plan

    predicted = plan(PlanArgs(device="cpu", precision=precision, batch_size=batch_size, seq_len=seq_len,
                              max_tokens=max_tokens))
    return {
        "run_precision": predicted["precision"],
        "predicted_train_mib": predicted["train_peak_gib"] * 1024,
        "predicted_load_mib": predicted["load_peak_gib"] * 1024,
        "retention_mib": predicted["retention_gib"] * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="bf16:256,bf16:512,fp32:256,fp32:512",
                    help="comma-separated precision:max_tokens (precision auto, fp32 or bf16)")
    ap.add_argument("--allocators", default="returning,default")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="one JSON object per run, nothing else")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            precision, max_tokens = config.split(":")
            for allocator in args.allocators.split(","):
                row = measure(precision, int(max_tokens), allocator, batch_size=args.batch_size,
                              seq_len=args.seq_len, steps=args.steps, workdir=Path(tmp))
                row.update(predict(precision, int(max_tokens), batch_size=args.batch_size, seq_len=args.seq_len))
                rows.append(row)
                print(json.dumps(row) if args.json else row, flush=True)
    if args.json:
        return
    print("| precision | piece tokens | allocator | train peak MiB (predicted) | ratio | load peak MiB (predicted) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        load = (f"{r['load_peak_mib']:.0f} ({r['predicted_load_mib']:.0f})" if r["predicted_load_mib"]
                else f"{r['load_peak_mib']:.0f} (weights read in training)")
        print(f"| {r['run_precision']} | {r['max_tokens']} | {r['allocator']} | {r['train_peak_mib']:.0f} "
              f"({r['predicted_train_mib']:.0f}) | {r['train_peak_mib'] / r['predicted_train_mib']:.2f} | {load} |")


if __name__ == "__main__":
    main()
