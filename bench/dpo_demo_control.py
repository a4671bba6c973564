"""The DPO demo's stage 2 against a supervised-only control, from the same stage-1 adapter.

    PYTHONPATH=src python bench/dpo_demo_control.py --sft runs/demo-dpo/sft [--output runs/demo-dpo-control]

`python -m lorakit.demo --objective dpo` tunes its brief supervised adapter with DPO plus the
chosen answers' nll (`--rpo-alpha 1.0`). The nll term is supervised training, so part of the
exact-match gain could come from it alone. This script runs the control: the same adapter
trained further with the supervised loss only (the demo's notes, the same steps, batch and
learning rate as the DPO stage; the mean nll per answer token, which is what rpo_alpha 1 adds),
then measures it as the demo does (held-out SFT loss, exact match on 32 held-out notes,
preference accuracy on the 32 held-out pairs).
"""

from __future__ import annotations

import argparse
import time

from lorakit.demo import __main__ as demo
from lorakit.demo import dpo
from lorakit.train.recipe import TrainArgs, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", required=True, help="the demo's stage-1 adapter (OUTPUT/sft of the demo)")
    parser.add_argument("--output", default="runs/demo-dpo-control")
    opts = parser.parse_args()
    stage2 = dpo.stages("unused").dpo  # the DPO stage's settings, for steps, lr and batch
    args = TrainArgs(data=str(demo.TRAIN), output=opts.output, init_adapter=opts.sft, max_steps=stage2.max_steps,
                     lr=stage2.lr, batch_size=stage2.batch_size, seq_len=stage2.seq_len, rank=16, alpha=32,
                     log_every=stage2.log_every, eval_every=stage2.max_steps, device="cpu", overwrite=True)
    t0 = time.perf_counter()
    train(args)
    minutes = (time.perf_counter() - t0) / 60
    held = demo.read(demo.EVAL)[:32]
    loss, exact, _, preference = demo.measured(opts.output, held, True)
    print(f"control (SFT only, {args.max_steps} steps, lr {args.lr:g}, from {opts.sft}): held-out SFT loss "
          f"{loss:.3f}, exact match {exact:.0%} on {len(held)} notes, preference accuracy {preference:.0%}, "
          f"{minutes:.1f} min training")


if __name__ == "__main__":
    main()
