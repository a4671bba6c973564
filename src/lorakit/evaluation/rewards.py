"""Reward functions for reinforcement learning (`lorakit train --objective grpo --reward SPEC`).

`--reward` takes one of

    exact              1 if the completion equals the row's reference answer, else 0
    json               1 if the completion is JSON holding the reference object's keys and values
    regex:PATTERN      as `--metric regex:PATTERN` (lorakit.evaluation.metrics)
    MODULE:FUNCTION    your own function, TRL's convention:
                           func(prompts, completions, **columns) -> list[float | None]
                       prompts and completions are lists (one item a completion); every other
                       column of the data rows comes as a keyword list of the same length, and
                       `reference` always does. A None is "no opinion" on that completion.

The built-ins score exactly as `--metric` does (the same code); their reference is the row's
`reference` column, else its `completion`, else the trailing assistant turn of its `messages`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.evaluation.metrics import Metric, builtin_metric, import_function

ACCEPTED = "accepted: exact, json, regex:PATTERN, MODULE:FUNCTION"


@dataclass(frozen=True)
class Reward:
    """A named reward function with TRL's signature."""

    name: str
    """The name its figures are logged under: rewards/<name>/mean."""
    spec: str
    function: Callable[..., Sequence[Any]]
    needs_reference: bool = False
    """A built-in: every row needs a reference answer (json: a JSON one)."""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational [{"role": "assistant", "content"}]."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def _from_metric(metric: Metric) -> Callable[..., list[float | None]]:
    def reward(prompts: Sequence[Any], completions: Sequence[Any], reference: Sequence[str | None] = (),
               **columns: Any) -> list[float | None]:
        return [None if ref is None else float(metric.score(completion_text(c).strip(), ref))
                for c, ref in zip(completions, reference, strict=True)]

    reward.__name__ = metric.name
    return reward


def parse_reward(spec: str) -> Reward:
    """The reward `--reward SPEC` names; a ValueError names the value and what is accepted."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--reward {spec!r} is not a reward; {ACCEPTED}")
    metric = builtin_metric(spec, "--reward")
    if metric is not None:
        return Reward(metric.name, spec, _from_metric(metric), needs_reference=True)
    name, function = import_function(spec, "--reward", ACCEPTED, "a reward")
    return Reward(name, spec, function)


def parse_rewards(specs: Sequence[str], weights: Sequence[float] | None) -> tuple[list[Reward], list[float]]:
    """The `--reward` functions and their `--reward-weights` (default: 1 each)."""
    if not specs:
        raise ValueError(f"--objective grpo needs at least one --reward; {ACCEPTED}")
    rewards = [parse_reward(s) for s in specs]
    names = [r.name for r in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"--reward: two functions log under the same name ({', '.join(names)}); "
                         "give each reward its own name")
    if weights is None:
        return rewards, [1.0] * len(rewards)
    weights = list(weights)
    if len(weights) != len(rewards):
        raise ValueError(f"--reward-weights has {len(weights)} values for {len(rewards)} --reward functions "
                         f"({', '.join(names)}); give one weight per reward")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"--reward-weights must be finite numbers, got {w!r}")
    return rewards, [float(w) for w in weights]


def score(reward: Reward, prompts: Sequence[Any], completions: Sequence[Any],
          columns: dict[str, Sequence[Any]]) -> list[float]:
    """One function's rewards for the completions, NaN for None; a ValueError says what was wrong."""
    values = reward.function(prompts=list(prompts), completions=list(completions), **columns)
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"--reward {reward.spec}: returned {type(values).__name__}; a reward function "
                         f"returns a list of floats (or None), one per completion") from None
    if len(values) != len(completions):
        raise ValueError(f"--reward {reward.spec}: returned {len(values)} values for {len(completions)} "
                         f"completions; a reward function returns one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(math.nan)
            continue
        if isinstance(v, bool):
            v = float(v)
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"--reward {reward.spec}: value {i} is {v!r:.60}; a reward function returns "
                             f"floats (or None)") from None
        if math.isnan(number) or math.isinf(number):
            raise ValueError(f"--reward {reward.spec}: value {i} is {number}; rewards must be finite (None: no opinion)")
        out.append(number)
    return out
