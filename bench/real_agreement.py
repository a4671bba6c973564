"""Greedy agreement on a trained model: the fast decode path, the generic path and PEFT.

    python bench/real_agreement.py --device cpu --out agreement.jsonl [--dtypes bfloat16,float32]

`bench/serve.py --suite gpu` checks agreement on random-weight models, whose near-flat logits
make bf16 rounding flip greedy tokens for every pair of implementations. This script runs the
same comparison on the bundled SmolLM2-135M-Instruct (or --model): the first 32 prompts of
the demo's evaluation set through the model's chat template, each request with its own
adapter (32 adapters, random as the suite makes them, rank 16 on all seven projections),
greedy, 32 new tokens. A request's output counts up to and including its first end-of-turn
token (PEFT's `generate` stops there; the engines are told to decode on and are cut there).

Reported per dtype: identical outputs of the fast path against the generic path and against
transformers + PEFT `generate` (each request alone, its adapter set), the generic path against
PEFT (the control: what two implementations that share no kernels give), and the fast path
with every request given the next request's adapter against PEFT (the check's power: wrong
adapters must disagree).

For a 16-bit dtype it also looks at each request where an engine's output and PEFT's part
(`divergences`): at the first token where they differ, both implementations saw the same
prefix, so the float32 model (the same weights and adapter, upcast) says which of the two
tokens it prefers and by how much (its logit margin between them), set beside the margin
between its top two tokens at every step of PEFT's outputs (how decided a step usually is).
Where float32 sides with either implementation about equally often, at margins far below the
usual, the differences are rounding at near-ties rather than a fault of either.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lorakit  # noqa: E402
from lorakit.base.models import load_model  # noqa: E402
from lorakit.serve import SamplingParams  # noqa: E402
from serve import make_adapters  # noqa: E402
from serve_gpu import Suite, _unload  # noqa: E402

EVAL = Path(lorakit.__file__).parent / "demo" / "eval.jsonl"


def prompts(tokenizer, count: int) -> list[list[int]]:
    rows = [json.loads(line) for line in EVAL.read_text().splitlines() if line.strip()][:count]
    out = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def cut(tokens: list[int], stops: set[int], length: int = 32) -> list[int]:
    """The first `length` tokens, up to and including the first stop token."""
    tokens = list(tokens)[:length]
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


def agreement(args, dtype: torch.dtype) -> dict:
    model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
    stops = {tokenizer.eos_token_id} | set(tokenizer.convert_tokens_to_ids(["<|im_end|>"]))
    stops.discard(None)
    suite_args = argparse.Namespace(rank=16, out=None, device=args.device, size="135m", prompt_tokens=0,
                                    new_tokens=32, peft_tokens=32, cases=None)
    suite = Suite(suite_args, lambda *_: model, lambda: tokenizer, make_adapters)
    asked = prompts(tokenizer, 32)
    adapters = suite.adapters(model, 32)
    names = list(adapters)
    params = SamplingParams(max_tokens=32, temperature=0)
    tokens, paths = {}, {}
    for label, path, rows in (("fast", "fast", names), ("generic", "generic", names),
                              ("fast_wrong_adapters", "fast", names[1:] + names[:1])):
        engine = suite.engine(model, adapters, batch=32, path=path)
        with engine:
            paths[label] = engine.decode_path
            tokens[label] = [cut(o.token_ids, stops) for o in engine.generate(asked, rows, params)]
        _unload(engine, adapters)
        del engine
    base = lorakit.unload(model) if hasattr(model, "lora_state") else model
    exact = copy.deepcopy(base).float() if dtype != torch.float32 else None
    with torch.no_grad():
        peft = suite.peft_model(base, adapters)
        peft_tokens = [cut(t, stops) for t in suite.peft_greedy(peft, asked, stop=True)]
        ties = None
        if exact is not None:
            exact = suite.peft_model(exact, adapters)
            ties = {f"{label}_vs_peft": divergences(exact, asked, tokens[label], peft_tokens, args.device)
                    for label in ("fast", "generic")}

    def same(a: list[list[int]], b: list[list[int]]) -> int:
        return sum(x == y for x, y in zip(a, b, strict=True))

    return {"dtype": str(dtype), "model": args.model or "bundled SmolLM2-135M-Instruct",
            "fast_vs_generic": same(tokens["fast"], tokens["generic"]), "fast_vs_peft": same(tokens["fast"], peft_tokens),
            "generic_vs_peft": same(tokens["generic"], peft_tokens),
            "wrong_adapters_vs_peft": same(tokens["fast_wrong_adapters"], peft_tokens), "of": len(asked),
            "paths": paths,
            "peft_lengths": [len(t) for t in peft_tokens], "sample": [tokenizer.decode(tokens["fast"][0]),
                                                                      tokenizer.decode(peft_tokens[0])],
            "divergences": ties}


def divergences(exact, asked: list[list[int]], other: list[list[int]], peft_tokens: list[list[int]], device) -> dict:
    """At each request's first token where `other` and PEFT's output differ: which of the two
    tokens the float32 model (`exact`, PEFT over the upcast weights) prefers, and its logit
    margin between them; beside the float32 top-two margin at every step of PEFT's outputs."""
    sides = {"peft": 0, "other": 0, "neither": 0}
    margins, usual = [], []
    for i, (ids, mine, ref) in enumerate(zip(asked, other, peft_tokens, strict=True)):
        exact.set_adapter(f"a{i}")
        x = torch.tensor([ids + ref], device=device)
        logits = exact(input_ids=x).logits[0, len(ids) - 1 :].float()  # row j predicts ref[j]
        top = logits.topk(2, dim=-1).values
        usual.extend((top[: len(ref), 0] - top[: len(ref), 1]).tolist())
        t = next((j for j, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), None)
        if t is None:
            continue
        a, b = ref[t], mine[t]
        margin = (logits[t, a] - logits[t, b]).item()  # > 0: float32 prefers PEFT's token
        best = int(logits[t].argmax())
        sides["peft" if best == a else "other" if best == b else "neither"] += 1
        margins.append(round(abs(margin), 4))
    usual.sort()
    return {"diverged": len(margins), "float32_picks": sides, "margins_at_divergence": sorted(margins),
            "median_margin_at_divergence": sorted(margins)[len(margins) // 2] if margins else None,
            "median_top2_margin_all_steps": round(usual[len(usual) // 2], 4),
            "share_of_steps_below_largest_divergence_margin":
                round(sum(u <= max(margins) for u in usual) / len(usual), 4) if margins else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or GGUF (default: the bundled model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    with open(args.out, "a") as out:
        for name in args.dtypes.split(","):
            start = time.perf_counter()
            record = agreement(args, getattr(torch, name))
            record.update(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                          torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                          seconds=round(time.perf_counter() - start, 1))
            print(json.dumps(record), flush=True)
            out.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
