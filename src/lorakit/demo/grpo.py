"""The GRPO demo's two stages: a brief supervised adapter, then GRPO from it on a verifiable reward.

GRPO learns from the differences between the rewards of a note's completions, so it needs a
model that already gets some answers partly right; the bare base does not write this schema.
The first stage is the DPO demo's brief supervised adapter (a few steps: the format, with
mistakes left); the second starts from it
(`--init-adapter`) and samples completions of the training notes through lorakit's serving
engine, reading the adapter being trained in place (`lorakit.serve.rollouts`), scored by
`json_fields`: valid JSON, and each field equal to the reference's. The control (`Stages.control`,
`python -m lorakit.demo --objective grpo --control`) trains the same stage-1 adapter further with
the supervised loss instead, on as many notes with the same steps and learning rate. On the
command line:

    lorakit train --data train.jsonl --output OUT/sft --max-steps 8 --lr 1e-3
    lorakit train --objective grpo --data train.jsonl --eval-data eval.jsonl --init-adapter OUT/sft \\
        --reward lorakit.demo.grpo:json_fields --num-generations 6 --batch-size 2 --temperature 0.6 \\
        --max-completion-tokens 64 --output OUT/grpo --max-steps 12 --lr 2e-4
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.evaluation.rewards import completion_text
from lorakit.train.recipe import TrainArgs, train

HERE = Path(__file__).parent
REWARD = "lorakit.demo.grpo:json_fields"
STEPS, LR, GENERATIONS, TEMPERATURE = 12, 2e-4, 6, 0.6
"""The GRPO stage's defaults: optimizer steps (of 2 notes x GENERATIONS completions), peak learning
rate, completions sampled per note, and their sampling temperature."""
VALID_JSON = 0.25
"""The reward of a JSON object; each field with the reference's value adds an equal share of the rest."""


def field_score(answer: str, reference: str) -> float:
    """0 for text that is not a JSON object; VALID_JSON for one, plus (1 - VALID_JSON) times the
    share of its keys and the reference's together that it holds with the reference's value: a
    missing, wrong or extra key costs the same, and 1.0 is exactly the reference object (the
    demo's exact match)."""
    try:
        got = json.loads(answer)
    except json.JSONDecodeError:
        return 0.0
    want = json.loads(reference)
    if not isinstance(got, dict) or not isinstance(want, dict) or not want:
        return 0.0
    right = sum(1 for key, value in want.items() if key in got and got[key] == value)
    return VALID_JSON + (1 - VALID_JSON) * right / len(want.keys() | got.keys())


def json_fields(prompts: Sequence[Any], completions: Sequence[Any], reference: Sequence[str | None] = (),
                **columns: Any) -> list[float | None]:
    """The demo's reward, TRL's signature: `field_score` of each completion against its row's
    reference answer (None, no opinion, for a row without one)."""
    return [None if ref is None else field_score(completion_text(c).strip(), ref)
            for c, ref in zip(completions, reference, strict=True)]


@dataclass
class Stages:
    sft: TrainArgs
    """The supervised run: a fresh adapter on the notes, written to OUTPUT/sft."""
    grpo: TrainArgs
    """GRPO from the supervised adapter on the notes' prompts, written to OUTPUT/grpo."""
    control: TrainArgs
    """The control: the supervised adapter trained further on the notes' answers (the same steps,
    notes a step and learning rate as GRPO), written to OUTPUT/control."""


def stages(output: str | Path, *, model: str | None = None, data: str | Path = HERE / "train.jsonl",
           eval_data: str | Path = HERE / "eval.jsonl", sft_steps: int = 8, sft_lr: float = 1e-3, steps: int = STEPS,
           lr: float = LR, num_generations: int = GENERATIONS, batch_size: int = 2, max_completion_tokens: int = 64,
           temperature: float = TEMPERATURE, seq_len: int = 512, precision: str = "auto", device: str = "cpu") -> Stages:
    """The two runs' settings (rank 16, alpha 32 as the supervised demo); nothing is trained yet."""
    out = Path(output)
    common = dict(model=model, seq_len=seq_len, rank=16, alpha=32, precision=precision, device=device,
                  overwrite=True)  # the demo's directories hold the demo's last run, if any
    sft = TrainArgs(data=str(data), output=str(out / "sft"), max_steps=sft_steps, lr=sft_lr, batch_size=8,
                    log_every=max(1, sft_steps // 4), eval_every=sft_steps, **common)
    grpo = TrainArgs(data=str(data), eval_data=str(eval_data), output=str(out / "grpo"), max_steps=steps, lr=lr,
                     objective="grpo", reward=[REWARD], num_generations=num_generations, batch_size=batch_size,
                     max_completion_tokens=max_completion_tokens, temperature=temperature, init_adapter=sft.output,
                     log_every=max(1, steps // 8), eval_every=max(1, steps // 2), **common)
    control = TrainArgs(data=str(data), output=str(out / "control"), max_steps=steps, lr=lr, batch_size=batch_size,
                        init_adapter=sft.output, log_every=max(1, steps // 4), eval_every=steps, **common)
    return Stages(sft, grpo, control)


def run(runs: Stages) -> Path:
    """Train both stages in order (GRPO's rollouts through the serving engine); returns the GRPO
    adapter's directory."""
    from lorakit.serve.rollouts import Rollouts

    train(runs.sft)
    return train(runs.grpo, rollouts=Rollouts)
