"""lorakit's training step against PEFT + a plain PyTorch loop, on CPU, in one run.

    .venv/bin/python bench/train_cpu.py [--examples 160] [--rounds 2]

Both sides fine-tune the bundled SmolLM2-135M-Instruct on the bundled demo task
(sales notes -> JSON, chat format, loss on the assistant turn), with the same settings:
r=16, alpha=32, all-linear targets, fp32, AdamW lr 1e-3, batch 8, the same examples
in the same order. Each side runs in its own process (so peak RSS is its own), and the
sides alternate for `--rounds` rounds so that load from other processes hits both alike.

- peft:            PEFT's get_peft_model, model(input_ids, attention_mask, labels).loss, fp32
                   (the issue's baseline)
- peft-bf16:       the same on a bf16 base under torch.autocast(bfloat16), fp32 adapter: PEFT
                   given the same precision as lorakit's default on a CPU with native bf16
- lorakit:         lorakit train's CPU step: lorakit.adapters.inject + compute_loss (output head and
                   cross-entropy only at supervised positions, in chunks), batch 8 run in
                   pieces of at most CPU_MAX_TOKENS tokens (the same update), precision
                   "auto": on a CPU with native bf16 a bf16 base under bf16 autocast with
                   attention in fp32 (lorakit.train.precision), fp32 elsewhere
- lorakit-fp32:    the same with --precision fp32

tokens/s counts real (non-padding) tokens; every side trains on the same tokens. Accuracy:
the held-out loss after training, which should agree between the sides; every side's adapter
is saved in PEFT's format, loaded onto the fp32 base and evaluated there, the same way.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch

SIDES = ("peft", "peft-bf16", "lorakit", "lorakit-fp32")


def load(model_dir: str | None, random_init: bool, dtype: torch.dtype = torch.float32):
    from lorakit.base.models import load_model

    if not random_init:
        return load_model(model_dir, device="cpu", dtype=dtype)
    # Same architecture, random weights: the same speed and memory, no weights to ship.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1234)  # the same random base for training and evaluation
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    return model.requires_grad_(False).eval(), AutoTokenizer.from_pretrained(model_dir)


def child(side: str, n_examples: int, model_dir: str | None, random_init: bool, max_tokens: int | None,
          seed: int = 0) -> dict:
    from lorakit import LoraConfig, load_adapter, save_adapter
    from lorakit.adapters import inject
    from lorakit.data.sft import as_sequences, collate, load_examples, split_rows
    from lorakit.demo.__main__ import EVAL, TRAIN
    from lorakit.train.objectives.sft import compute_loss, evaluate
    from lorakit.train.precision import attention_in_fp32, autocast_dtype_for
    from lorakit.train.recipe import CPU_MAX_TOKENS

    cpu = torch.device("cpu")
    if side.startswith("peft"):
        dtype = torch.bfloat16 if side == "peft-bf16" else None
    else:
        dtype = autocast_dtype_for("fp32" if side == "lorakit-fp32" else "auto", cpu)
    torch.manual_seed(seed)
    model, tok = load(model_dir, random_init, dtype or torch.float32)
    examples, _ = load_examples(TRAIN, tok, 512)
    examples = examples[:n_examples]
    held, _ = load_examples(EVAL, tok, 512)
    held_rows = as_sequences(held[:32], 512, False)
    pad = tok.pad_token_id
    rows = as_sequences(examples, 512, False)
    batches = [rows[i : i + 8] for i in range(0, len(rows), 8)]

    if side.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    else:
        inject(model, LoraConfig(r=16, alpha=32, target_modules="all-linear"))
        if dtype is not None:
            attention_in_fp32(model)
        max_tokens = max_tokens or CPU_MAX_TOKENS
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()

    def autocast():
        return torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None)

    def step(seqs) -> tuple[float, int]:
        tokens = int(sum(len(s.input_ids) for s in seqs))
        if side.startswith("peft"):
            batch = collate(seqs, pad)
            # The usual loop: padded batch with an attention mask, transformers' loss.
            mask = torch.zeros_like(batch["input_ids"])
            for i, s in enumerate(seqs):
                mask[i, : len(s.input_ids)] = 1
            with autocast():
                loss = model(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss
            loss.backward()
        else:
            pieces = [collate(p, pad) for p in split_rows(seqs, max_tokens)]
            count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in pieces)
            loss = 0.0
            for batch in pieces:
                with autocast():
                    loss_sum, _ = compute_loss(model, batch)
                (loss_sum / count).backward()
                loss += float(loss_sum) / count
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss), tokens

    step(batches[0])  # warm-up (allocator, kernels); not timed, not repeated
    start = time.perf_counter()
    tokens = 0
    for seqs in batches[1:]:
        tokens += step(seqs)[1]
    elapsed = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # training's peak, before eval
    # Every side's adapter, in PEFT's file format, on the fp32 base, evaluated the same way.
    with tempfile.TemporaryDirectory() as adapter_dir:
        if side.startswith("peft"):
            model.save_pretrained(adapter_dir)
        else:
            save_adapter(model, adapter_dir)
        base, _ = load(model_dir, random_init)
        load_adapter(base, adapter_dir)
    eval_loss, _ = evaluate(base, held_rows, 8, pad, cpu)
    return {
        "side": side,
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "tokens": tokens,
        "steps": len(batches) - 1,
        "peak_rss_gb": peak_rss,
        "eval_loss": eval_loss,
        "precision": str(dtype or torch.float32).removeprefix("torch."),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=168, help="training examples per side (8 per step)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of all sides")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--random-init", action="store_true",
                        help="build --model's architecture from its config.json with random weights")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="lorakit's piece size in tokens (default: lorakit train's CPU default)")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to run")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.child:
        print(json.dumps(child(opts.child, opts.examples, opts.model, opts.random_init, opts.max_tokens)))
        return

    sides = opts.sides.split(",")
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown side(s) {', '.join(unknown)}; choose from {', '.join(SIDES)}")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for round_ in range(opts.rounds):
        for side in sides:
            command = [sys.executable, __file__, "--child", side, "--examples", str(opts.examples)]
            if opts.threads:
                command += ["--threads", str(opts.threads)]
            if opts.max_tokens:
                command += ["--max-tokens", str(opts.max_tokens)]
            if opts.model:
                command += ["--model", opts.model] + (["--random-init"] if opts.random_init else [])
            out = subprocess.run(command,
                                 capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results[side].append(result)
            print(f"round {round_ + 1} {side:15s} {result['precision']:9s} {result['tokens_per_s']:7.1f} tok/s  "
                  f"peak RSS {result['peak_rss_gb']:.2f} GB  eval loss {result['eval_loss']:.5f}  "
                  f"({result['steps']} steps, {result['seconds']:.0f} s)", flush=True)

    def best(side: str, key: str, pick=max) -> float:
        return pick(r[key] for r in results[side])

    baseline = "peft" if "peft" in sides else sides[0]
    base_tps, base_rss = best(baseline, "tokens_per_s"), best(baseline, "peak_rss_gb", min)
    print(f"\n{'side':15s} {'tok/s':>8s} {'x ' + baseline:>7s} {'peak RSS':>9s} {'x ' + baseline:>7s} {'eval loss':>9s}")
    for side in sides:
        tps, rss = best(side, "tokens_per_s"), best(side, "peak_rss_gb", min)
        loss = results[side][-1]["eval_loss"]
        print(f"{side:15s} {tps:8.1f} {tps / base_tps:7.2f} {rss:8.2f}G {rss / base_rss:7.2f} {loss:9.5f}")
    print(f"(best of {opts.rounds} rounds per side; torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
