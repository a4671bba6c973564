"""Peak memory (and time) of DPO steps on CPU: lorakit against TRL's DPOTrainer with PEFT, in one run.

    PYTHONPATH=src python bench/dpo_memory_cpu.py [--steps 3] [--batch 8]

Both sides tune the bundled SmolLM2-135M-Instruct (loaded by the same loader) on the bundled
preference pairs (`src/lorakit/demo/train_pairs.jsonl`: sales notes, the exact JSON schema
preferred to a plausible wrong answer) with the same settings: a new r=16, alpha=32 all-linear
adapter, beta 0.1, AdamW lr 1e-4, `--batch` pairs per step, the base (adapter disabled) as
the reference, no gradient checkpointing unless the side says so. Each side runs in its own
process, so its peak RSS is its own; the sides alternate for `--rounds` rounds.

- trl:           trl.DPOTrainer(model, peft_config=...) .train(), fp32
- trl-gc:        the same with TRL's default gradient checkpointing (DPOConfig's default)
- lorakit:       `lorakit train --objective dpo`'s recipe, precision auto (bf16 on a CPU with
                 native bf16, fp32 elsewhere)
- lorakit-fp32:  the same in fp32

TRL and PEFT are needed on the machine that runs this (the test extra installs them).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

SIDES = ("trl", "trl-gc", "lorakit", "lorakit-fp32")


def child(side: str, steps: int, batch: int, out: str) -> dict:
    import torch

    from lorakit.base.models import load_model
    from lorakit.demo.__main__ import TRAIN_PAIRS

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if side.startswith("trl"):
        import datasets
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        model, tok = load_model(device="cpu", dtype=torch.float32)
        rows = [json.loads(line) for line in TRAIN_PAIRS.read_text().splitlines()][: steps * batch]
        args = DPOConfig(output_dir=out, beta=0.1, learning_rate=1e-4, per_device_train_batch_size=batch,
                         max_steps=steps, max_length=512, report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no", logging_steps=1, gradient_checkpointing=side == "trl-gc",
                         dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0)
        trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok,
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        t0 = time.perf_counter()
        trainer.train()
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    else:
        from lorakit.train.recipe import TrainArgs, train

        args = TrainArgs(data=str(TRAIN_PAIRS), output=out, objective="dpo", beta=0.1, lr=1e-4, batch_size=batch,
                         max_steps=steps, seq_len=512, rank=16, alpha=32, log_every=1, save_every=10**6,
                         warmup_steps=0, schedule="constant", device="cpu",
                         precision="fp32" if side == "lorakit-fp32" else "auto")
        train(args)
        losses = [json.loads(line)["loss"] for line in open(f"{out}/metrics.jsonl") if '"loss"' in line]
    seconds = time.perf_counter() - t0
    return {"side": side, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "seconds_per_step": seconds / steps, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        with tempfile.TemporaryDirectory() as out:
            print(json.dumps(child(opts.child, opts.steps, opts.batch, out)))
        return
    sides = opts.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        parser.error(f"unknown side(s) {', '.join(unknown)}; known: {', '.join(SIDES)}")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for _ in range(opts.rounds):
        for side in sides:
            proc = subprocess.run([sys.executable, __file__, "--child", side, "--steps", str(opts.steps),
                                   "--batch", str(opts.batch)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side].append(result)
            print(f"{side:13s} peak RSS {result['peak_rss_gb']:.2f} GB  {result['seconds_per_step']:.1f} s/step  "
                  f"losses {[round(x, 4) for x in result['losses']]}", flush=True)
    base = min(r["peak_rss_gb"] for r in results[sides[0]])
    print(f"\n| side | peak RSS | x {sides[0]} | s/step |\n|---|---|---|---|")
    for side in sides:
        rss = min(r["peak_rss_gb"] for r in results[side])
        step = min(r["seconds_per_step"] for r in results[side])
        print(f"| {side} | {rss:.2f} GB | {rss / base:.2f} | {step:.1f} |")


if __name__ == "__main__":
    main()
