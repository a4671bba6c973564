"""`python -m lorakit.demo`: fine-tune the bundled model on the bundled task, before and after.

The task (see make_data.py): terse sales-call notes in, one fixed JSON schema out. The
demo measures the base model, trains a LoRA adapter with `lorakit train`'s recipe, and
measures again: eval loss on the held-out split, exact match of the parsed JSON on
held-out notes (people and companies never seen in training), and a few samples side by
side. On two CPU cores the whole run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from .make_data import SYSTEM

HERE = Path(__file__).parent
TRAIN = HERE / "train.jsonl"
EVAL = HERE / "eval.jsonl"


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@torch.no_grad()
def answers(model: Any, tokenizer: Any, rows: list[dict], max_new_tokens: int = 48, batch_size: int = 16) -> list[str]:
    """Greedy completions of each row's conversation minus its assistant turn."""
    tokenizer.padding_side = "left"  # generation continues from the right edge
    device = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], tokenize=False, add_generation_prompt=True)
                   for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
    return out


def exact(prediction: str, row: dict) -> bool:
    """The prediction parses as JSON and equals the reference object."""
    try:
        return json.loads(prediction) == json.loads(row["messages"][-1]["content"])
    except json.JSONDecodeError:
        return False


def measure(model: Any, tokenizer: Any, rows: list[dict], eval_path: Path) -> tuple[float, float, list[str]]:
    from ..data import as_sequences, load_examples
    from ..train import evaluate

    examples, _ = load_examples(eval_path, tokenizer, 512)
    loss, _ = evaluate(model, as_sequences(examples, 512, False), 16, tokenizer.pad_token_id,
                       next(model.parameters()).device)
    predictions = answers(model, tokenizer, rows)
    accuracy = sum(exact(p, r) for p, r in zip(predictions, rows, strict=True)) / len(rows)
    return loss, accuracy, predictions


def main(argv: list[str] | None = None) -> None:
    from ..io import load_adapter
    from ..models import load_model
    from ..train import TrainArgs, train

    parser = argparse.ArgumentParser(prog="python -m lorakit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/demo", help="where the adapter and its logs go")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (batch 8)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--held-out", type=int, default=32, help="held-out notes to generate for exact match")
    opts = parser.parse_args(argv)

    began = time.perf_counter()
    held = read(EVAL)[: opts.held_out]
    model, tokenizer = load_model(device="cpu")
    print("== before: the bundled SmolLM2-135M-Instruct alone")
    loss0, acc0, before = measure(model, tokenizer, held, EVAL)
    print(f"eval loss {loss0:.3f}   exact match {acc0:.0%} on {len(held)} held-out notes\n")

    print(f"== training a LoRA adapter: {opts.steps} steps of 8 notes, lr {opts.lr:g}, on CPU")
    args = TrainArgs(
        data=str(TRAIN), eval_data=str(EVAL), output=opts.output, max_steps=opts.steps, lr=opts.lr,
        batch_size=8, seq_len=512, rank=16, alpha=32, log_every=10, eval_every=max(1, opts.steps // 2),
        device="cpu", overwrite=True,  # the demo's directory holds the demo's last run, if any
    )
    del model  # training loads its own copy; two at once would double the peak memory
    t0 = time.perf_counter()
    train(args)
    train_time = time.perf_counter() - t0

    model, tokenizer = load_model(device="cpu")
    load_adapter(model, opts.output)
    print("\n== after: the same base with the adapter")
    loss1, acc1, after = measure(model, tokenizer, held, EVAL)
    print(f"eval loss {loss1:.3f}   exact match {acc1:.0%} on {len(held)} held-out notes\n")

    for row, b, a in list(zip(held, before, after, strict=True))[:3]:
        print(f"note      {row['messages'][1]['content']}")
        print(f"expected  {row['messages'][2]['content']}")
        print(f"base      {b[:160]!s}")
        print(f"adapter   {a}\n")

    # What the adapter did to everything else: KL from the base on the base's own text.
    from ..compare.command import CompareArgs, compare

    del model  # compare loads its own copy
    print("== lorakit compare: the adapter against its base, on the base's own answers to general prompts")
    report = compare(CompareArgs(adapter=[opts.output], data=str(EVAL), task_rows=opts.held_out, device="cpu"))
    headline = report["adapters"][0]["headline"]

    total = time.perf_counter() - began
    print("== summary")
    print(f"eval loss     {loss0:.3f} -> {loss1:.3f}")
    print(f"exact match   {acc0:.0%} -> {acc1:.0%}  ({len(held)} held-out notes)")
    print(f"time          {train_time / 60:.1f} min training, {total / 60:.1f} min in all, {torch.get_num_threads()} CPU threads")
    print(f"forgetting    {headline}")
    print(f"report        {Path(opts.output) / 'report.html'} (lorakit compare --adapter {opts.output} --data {EVAL})")
    print(f"adapter       {opts.output} (try: lorakit generate --adapter {opts.output} --system \"{SYSTEM}\" --chat \"call w/ ...\")")


if __name__ == "__main__":
    main()
