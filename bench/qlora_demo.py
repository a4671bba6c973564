"""QLoRA on the bundled demo task, through the CLI: does a 4-bit base learn it?

Trains with `lorakit train --quantize nf4` on the bundled default model (the demo's
settings: 60 steps of 8 notes, lr 1e-3, r=16), then measures eval loss and JSON exact
match on 32 held-out notes for: the NF4 base alone, the NF4 base + the adapter, and the
full-precision base + the same adapter (an adapter trained on 4 bits loads on 16/32).

    OMP_NUM_THREADS=1 .venv/bin/python bench/qlora_demo.py --output runs/qlora-demo
    .venv/bin/python bench/qlora_demo.py --output runs/qlora-demo --skip-train   # measure only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from lorakit.adapters.files import load_adapter
from lorakit.base.models import load_model
from lorakit.demo.__main__ import EVAL, TRAIN, measure, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/qlora-demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    if not args.skip_train:
        command = [sys.executable, "-m", "lorakit", "train", "--data", str(TRAIN), "--eval-data", str(EVAL),
                   "--output", args.output, "--quantize", "nf4", "--max-steps", str(args.steps), "--lr", "1e-3",
                   "--batch-size", "8", "--seq-len", "512", "--rank", "16", "--alpha", "32", "--log-every", "10",
                   "--eval-every", str(max(1, args.steps // 2)), "--device", "cpu", "--overwrite"]
        print(" ".join(command[1:]), file=sys.stderr)
        t0 = time.perf_counter()
        subprocess.run(command, check=True)
        print(f"training took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    held = read(EVAL)[: args.held_out]
    cases = [("NF4 base", "nf4", False), ("NF4 base + adapter", "nf4", True), ("fp32 base + adapter", None, True)]
    for label, quantize, with_adapter in cases:
        model, tokenizer = load_model(device="cpu", quantize=quantize)
        if with_adapter:
            load_adapter(model, Path(args.output))
        loss, accuracy, predictions = measure(model, tokenizer, held, EVAL)
        print(json.dumps({"case": label, "eval_loss": round(loss, 4), "exact_match": accuracy, "held_out": len(held),
                          "threads": torch.get_num_threads(), "first_prediction": predictions[0]}), flush=True)


if __name__ == "__main__":
    main()
