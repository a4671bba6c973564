"""`python -m lorakit.demo`: fine-tune the bundled model on the bundled task, before and after.

The task (see make_data.py): terse sales-call notes in, one fixed JSON schema out. The
demo measures the base model, trains a LoRA adapter with `lorakit train`'s recipe, and
measures again: eval loss on the held-out split, exact match of the parsed JSON on
held-out notes (people and companies never seen in training), and a few samples side by
side. On two CPU cores the whole run takes a few minutes.

`--objective dpo` is preference tuning after SFT (dpo.py): a brief supervised adapter first,
then DPO from it on preference pairs of the same notes (make_data.py: the exact schema
preferred to the brief adapter's typical mistakes), against a frozen copy of it; before and
after are the supervised adapter and the DPO adapter. `--objective orpo` trains on the pairs
from the base (ORPO carries its own supervised term). Both also show the preference accuracy
on held-out pairs.

`--objective grpo` is reinforcement learning after the same brief supervised stage (grpo.py):
GRPO from it on the notes' prompts, its completions sampled through lorakit's serving engine
from the adapter being trained and rewarded for valid JSON and each correct field; before and
after are the supervised adapter and the GRPO adapter, with the held-out reward beside exact match.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.demo.make_data import SYSTEM

HERE = Path(__file__).parent
TRAIN = HERE / "train.jsonl"
EVAL = HERE / "eval.jsonl"
TRAIN_PAIRS = HERE / "train_pairs.jsonl"
EVAL_PAIRS = HERE / "eval_pairs.jsonl"


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
    from lorakit.data.sft import as_sequences, load_examples
    from lorakit.train.objectives.sft import evaluate

    examples, _ = load_examples(eval_path, tokenizer, 512)
    loss, _ = evaluate(model, as_sequences(examples, 512, False), 16, tokenizer.pad_token_id,
                       next(model.parameters()).device)
    predictions = answers(model, tokenizer, rows)
    accuracy = sum(exact(p, r) for p, r in zip(predictions, rows, strict=True)) / len(rows)
    return loss, accuracy, predictions


@torch.no_grad()
def preference_accuracy(model: Any, tokenizer: Any, path: Path) -> float:
    """The share of pairs whose chosen answer the model finds more likely than the rejected one."""
    from lorakit.data.pairs import collate_pairs, load_pairs
    from lorakit.train.objectives.preference import sequence_logps

    pairs, _ = load_pairs(path, tokenizer, 512)
    device = next(model.parameters()).device
    wins = 0
    for start in range(0, len(pairs), 8):
        chunk = pairs[start : start + 8]
        batch = {k: v.to(device) for k, v in collate_pairs(chunk, tokenizer.pad_token_id).items()}
        logps = sequence_logps(model.eval(), batch)
        wins += int((logps[: len(chunk)] > logps[len(chunk) :]).sum())
    return wins / len(pairs)


def held_out_reward(predictions: list[str], rows: list[dict]) -> float:
    """The GRPO demo's reward (grpo.field_score), averaged over the held-out answers."""
    from lorakit.demo.grpo import field_score

    return sum(field_score(p, r["messages"][-1]["content"]) for p, r in zip(predictions, rows, strict=True)) / len(rows)


def report(loss: float, accuracy: float, notes: int, preference: float | None, reward: float | None = None) -> None:
    print(f"eval loss {loss:.3f}   exact match {accuracy:.0%} on {notes} held-out notes")
    if reward is not None:
        print(f"reward {reward:.3f} (grpo.field_score: valid JSON 0.25, 1 for the exact object; held-out mean)")
    if preference is not None:
        print(f"preference accuracy {preference:.0%} (chosen more likely than rejected, held-out pairs)")
    print()


def measured(output: str | None, held: list[dict], preference: bool) -> tuple[float, float, list[str], float | None]:
    """Eval loss, exact match, answers and (for preference runs) preference accuracy of the
    bundled base with the adapter in `output` (None: the base alone)."""
    from lorakit.adapters.files import load_adapter
    from lorakit.base.models import load_model
    from lorakit.base.threads import tuner_for
    from lorakit.train.runlog import log

    model, tokenizer = load_model(device="cpu")
    if output is not None:
        load_adapter(model, output)
    # The thread count by measurement, as training chooses it: on a busy machine two threads
    # can run many times slower than one.
    tuner = tuner_for(torch.device("cpu"), False, log)
    try:
        loss, accuracy, predictions = measure(model, tokenizer, held, EVAL)
        pref = preference_accuracy(model, tokenizer, EVAL_PAIRS) if preference else None
    finally:
        if tuner is not None:
            tuner.close()
    return loss, accuracy, predictions, pref


def train_timed(args: Any, rollouts: bool = False) -> float:
    """Seconds `lorakit train`'s recipe takes on `args`; rollouts: GRPO's, through the serving engine."""
    from lorakit.train.recipe import train

    t0 = time.perf_counter()
    if rollouts:
        from lorakit.serve.rollouts import Rollouts

        train(args, rollouts=Rollouts)
    else:
        train(args)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    from lorakit.demo import dpo, grpo
    from lorakit.train.recipe import TrainArgs

    parser = argparse.ArgumentParser(prog="python -m lorakit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=None, help="where the adapter and its logs go (default runs/demo, "
                        "runs/demo-dpo, runs/demo-orpo)")
    parser.add_argument("--objective", choices=("sft", "dpo", "orpo", "grpo"), default="sft",
                        help="sft on the notes, dpo after a brief sft stage, or orpo from the base, on preference "
                             "pairs of the same notes; grpo after a brief sft stage, on rewards for the notes' JSON")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps of 8 (default 30; dpo 20; grpo {grpo.STEPS} steps of 2 notes x "
                             f"{grpo.GENERATIONS} completions)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate (default 1e-3; dpo 2e-4; grpo {grpo.LR:g})")
    parser.add_argument("--beta", type=float, default=None, help="dpo / orpo beta (default: dpo 0.5, orpo 0.1)")
    parser.add_argument("--rpo-alpha", type=float, default=1.0,
                        help="dpo: weight of the chosen answers' nll added to the DPO loss (0: plain DPO)")
    parser.add_argument("--sft-steps", type=int, default=8, help="dpo, grpo: steps of the supervised first stage")
    parser.add_argument("--sft-lr", type=float, default=1e-3,
                        help="dpo, grpo: learning rate of the supervised first stage")
    parser.add_argument("--held-out", type=int, default=32, help="held-out notes to generate for exact match")
    parser.add_argument("--control", action="store_true",
                        help="grpo: also train the supervised adapter further with the supervised loss instead "
                             "(the same steps, notes and lr) and show it beside GRPO")
    opts = parser.parse_args(argv)
    objective = opts.objective
    is_dpo, is_grpo = objective == "dpo", objective == "grpo"
    preference = objective in ("dpo", "orpo")
    output = opts.output or ("runs/demo" if objective == "sft" else f"runs/demo-{objective}")
    steps = opts.steps if opts.steps is not None else (20 if is_dpo else grpo.STEPS if is_grpo else 30)
    lr = opts.lr if opts.lr is not None else (2e-4 if is_dpo else grpo.LR if is_grpo else 1e-3)
    beta = opts.beta if opts.beta is not None else (0.5 if is_dpo else 0.1)

    began = time.perf_counter()
    held = read(EVAL)[: opts.held_out]
    train_time = 0.0
    reward0 = reward1 = None
    if is_grpo:
        stages = grpo.stages(output, sft_steps=opts.sft_steps, sft_lr=opts.sft_lr, steps=steps, lr=lr)
        print(f"== stage 1: a brief supervised adapter, {opts.sft_steps} steps of 8 notes, lr {opts.sft_lr:g}, on CPU")
        train_time += train_timed(stages.sft)
        before_name, after_name = "the supervised adapter", "the GRPO adapter trained from it"
        print(f"\n== before GRPO: {before_name} ({stages.sft.output})")
        loss0, acc0, before, pref0 = measured(stages.sft.output, held, False)
        reward0 = held_out_reward(before, held)
        report(loss0, acc0, len(held), None, reward0)
        args = stages.grpo
        print(f"== stage 2: GRPO from {stages.sft.output}: {steps} steps of {args.batch_size} notes x "
              f"{args.num_generations} completions sampled by the serving engine from the adapter being trained "
              f"(temperature {args.temperature:g}), reward {grpo.REWARD}, lr {lr:g}, on CPU")
    elif is_dpo:
        runs = dpo.stages(output, sft_steps=opts.sft_steps, sft_lr=opts.sft_lr, steps=steps, lr=lr, beta=beta,
                          rpo_alpha=opts.rpo_alpha)
        print(f"== stage 1: a brief supervised adapter, {opts.sft_steps} steps of 8 notes, lr {opts.sft_lr:g}, on CPU")
        train_time += train_timed(runs.sft)
        before_name, after_name = "the supervised adapter", "the DPO adapter trained from it"
        print(f"\n== before DPO: {before_name} ({runs.sft.output})")
        loss0, acc0, before, pref0 = measured(runs.sft.output, held, preference)
        report(loss0, acc0, len(held), pref0)
        args = runs.dpo
        print(f"== stage 2: DPO from {runs.sft.output}, reference = its frozen copy: {steps} steps of 8 preference "
              f"pairs, lr {lr:g}, beta {beta:g}, rpo_alpha {opts.rpo_alpha:g}, on CPU")
    else:
        before_name, after_name = "the base", f"the base with the {objective} adapter"
        if preference:
            print("== before: the bundled SmolLM2-135M-Instruct alone")
            loss0, acc0, before, pref0 = measured(None, held, preference)
            report(loss0, acc0, len(held), pref0)
        unit = "preference pairs" if preference else "notes"
        print(f"== training a LoRA adapter ({objective}): {steps} steps of 8 {unit}, lr {lr:g}, on CPU")
        args = TrainArgs(
            # SFT: compare measures the held-out loss once training ends, so training does not
            data=str(TRAIN_PAIRS if preference else TRAIN), eval_data=str(EVAL_PAIRS) if preference else None,
            output=output, max_steps=steps, lr=lr, batch_size=8, seq_len=512, rank=16, alpha=32,
            log_every=10 if not preference else 5, eval_every=max(1, steps // 2), device="cpu",
            objective=objective, beta=beta,
            overwrite=True,  # the demo's directory holds the demo's last run, if any
        )
    train_time += train_timed(args, is_grpo)
    adapter = args.output
    control = None
    if is_grpo and opts.control:
        print(f"\n== control: {stages.sft.output} trained further with the supervised loss instead, "
              f"{steps} steps of {stages.control.batch_size} notes, lr {lr:g}")
        train_time += train_timed(stages.control)
        loss2, acc2, answers2, _ = measured(stages.control.output, held, False)
        control = (loss2, acc2, held_out_reward(answers2, held))

    # What the adapter did to everything else: KL from the base on the base's own text. For SFT,
    # compare's task measurement (eval loss and exact match of the base and of the adapter on the
    # held-out notes) is the before and after: the demo measures each once.
    from lorakit.compare.command import CompareArgs, compare

    if objective != "sft":
        print(f"\n== after: the same base with the {objective} adapter ({adapter})")
        loss1, acc1, after, pref1 = measured(adapter, held, preference)
        reward1 = held_out_reward(after, held) if is_grpo else None
        report(loss1, acc1, len(held), pref1, reward1)
    print("== lorakit compare: the base and the adapter on the held-out notes, and the adapter against its base "
          "on the base's own answers to general prompts")
    result = compare(CompareArgs(adapter=[adapter], data=str(EVAL), task_rows=opts.held_out, device="cpu"))
    headline = result["adapters"][0]["headline"]
    if objective == "sft":
        task = result["task"]
        loss0, acc0 = task["base"]["loss"], task["base"]["metric"]
        loss1, acc1 = task["adapters"][result["adapters"][0]["name"]]["loss"], result["adapters"][0]["task_metric"]
        before = [sample["base"] for sample in task["samples"]]
        after = [next(iter(sample["adapters"].values())) for sample in task["samples"]]
        print("\n== before: the bundled SmolLM2-135M-Instruct alone")
        report(loss0, acc0, len(held), None)
        print(f"== after: the same base with the {objective} adapter ({adapter})")
        report(loss1, acc1, len(held), None)

    # The notes where before and after differ say most; the first few otherwise.
    shown = [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if b != a][:3] or [0, 1, 2]
    for i in shown:
        print(f"note      {held[i]['messages'][1]['content']}")
        print(f"expected  {held[i]['messages'][2]['content']}")
        print(f"before    {before[i][:160]!s}")
        print(f"after     {after[i]}\n")

    total = time.perf_counter() - began
    print(f"== summary (before: {before_name}; after: {after_name})")
    print(f"eval loss     {loss0:.3f} -> {loss1:.3f}")
    print(f"exact match   {acc0:.0%} -> {acc1:.0%}  ({len(held)} held-out notes)")
    if reward0 is not None and reward1 is not None:
        print(f"reward        {reward0:.3f} -> {reward1:.3f}  (held-out answers: valid JSON and right fields)")
    if control is not None:
        print(f"control       exact match -> {control[1]:.0%}, reward -> {control[2]:.3f}, eval loss -> "
              f"{control[0]:.3f}  (the supervised loss instead of GRPO: {stages.control.output})")
    if preference:
        print(f"preference    {pref0:.0%} -> {pref1:.0%}  (held-out pairs: chosen more likely than rejected)")
    print(f"time          {train_time / 60:.1f} min training, {total / 60:.1f} min in all, {torch.get_num_threads()} CPU threads")
    print(f"forgetting    {headline}")
    print(f"report        {Path(adapter) / 'report.html'} (lorakit compare --adapter {adapter} --data {EVAL})")
    print(f"adapter       {adapter} (try: lorakit generate --adapter {adapter} --system \"{SYSTEM}\" --chat \"call w/ ...\")")


if __name__ == "__main__":
    main()
