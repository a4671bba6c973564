"""Synthetic chat data with ShareGPT-like lengths: log-normal prompts and replies, long-tailed.

    python bench/longtail.py --examples 2000 --out longtail.jsonl    # prompt/completion rows
    python bench/longtail.py --stats                                  # the length distribution

Prompt and reply lengths (in tokens) are log-normal: prompts median 75 (sigma 1.1), replies
median 130 (sigma 1.0), so an example's median is about 250 tokens (mean about 350) with a tail into the
thousands; an example is clipped at 4,096 tokens (the reply is cut first). The loss is on the
reply only. `bench/train_gpu.py` draws random token ids of these lengths; `--out` writes rows
of random lowercase letters, one token per letter under a byte-level tokenizer (the one
`bench/cli_gpu.py` builds), so `lorakit train` sees the same lengths.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

PROMPT = (75, 1.1)
"""(median, sigma) of the prompt length."""
REPLY = (130, 1.0)
"""(median, sigma) of the reply length."""
CLIP = 4096


def lengths(n: int, seed: int = 0, clip: int = CLIP) -> list[tuple[int, int]]:
    """(prompt, reply) token counts of n examples; a function of the seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = max(4, min(clip // 2, round(rng.lognormvariate(math.log(PROMPT[0]), PROMPT[1]))))
        reply = max(2, min(clip - prompt, round(rng.lognormvariate(math.log(REPLY[0]), REPLY[1]))))
        out.append((prompt, reply))
    return out


def summary(pairs: list[tuple[int, int]]) -> dict:
    totals = sorted(p + r for p, r in pairs)

    def q(f: float) -> int:
        return totals[min(len(totals) - 1, int(f * len(totals)))]

    return {
        "examples": len(totals),
        "median": statistics.median(totals),
        "mean": round(statistics.fmean(totals), 1),
        "p90": q(0.9),
        "p99": q(0.99),
        "max": totals[-1],
        "reply_share": round(sum(r for _, r in pairs) / sum(totals), 3),
    }


def token_examples(n: int, seed: int, vocab: int, clip: int = CLIP):
    """n lorakit Examples of random token ids with these lengths, the loss on the reply only."""
    import torch

    from lorakit.data.sft import IGNORE, Example

    g = torch.Generator().manual_seed(seed)
    out = []
    for prompt, reply in lengths(n, seed, clip):
        ids = torch.randint(0, vocab, (prompt + reply,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def write_jsonl(path: Path, n: int, seed: int = 0) -> dict:
    """prompt/completion rows of random letters with these lengths (one byte-level token each)."""
    rng = random.Random(seed + 1)
    pairs = lengths(n, seed)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        for prompt, reply in pairs:
            # the tokenizer adds BOS before the prompt and EOS after the completion
            row = {
                "prompt": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt - 1)),
                "completion": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(reply - 1)),
            }
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return summary(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write prompt/completion rows here (.jsonl)")
    ap.add_argument("--stats", action="store_true", help="print the length distribution")
    args = ap.parse_args()
    if args.out is None and not args.stats:
        ap.error("give --out FILE, --stats, or both")
    if args.out is not None:
        print(json.dumps(write_jsonl(args.out, args.examples, args.seed)))
    if args.stats:
        print(json.dumps(summary(lengths(args.examples, args.seed))))


if __name__ == "__main__":
    main()
