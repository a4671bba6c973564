"""Task metrics: greedy answers to held-out prompts, scored against the references.

`--metric` takes one of

    exact              the answer equals the reference (surrounding whitespace ignored)
    json               the answer is valid JSON holding every key of the reference object
                       with the same value (any JSON value: equal)
    regex:PATTERN      with a capture group: group 1 of the first match in the answer equals
                       group 1 in the reference (or the whole reference, if it has no match);
                       without a group: the answer contains a match
    MODULE:FUNCTION    your own function(prediction: str, reference: str) -> float or bool,
                       imported from MODULE (the current directory is searched too)

A score is in [0, 1] per example; the metric of a set is the mean.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.data.sft import DataError, Row, example_shape, read_rows

RESERVED = ("step", "epoch", "lr", "loss", "eval_loss", "tokens_per_s", "kl", "kl_p95", "agreement")
"""Record keys a user function's name may not take over."""


@dataclass(frozen=True)
class Metric:
    """A named scorer: `score(prediction, reference)` in [0, 1]."""

    name: str
    """The key the metric is logged under (exact, json, regex, or the function's name)."""
    spec: str
    score: Callable[[str, str], float]

    def mean(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        scores = [float(self.score(p, r)) for p, r in zip(predictions, references, strict=True)]
        return sum(scores) / max(len(scores), 1)


def exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def json_match(prediction: str, reference: str) -> float:
    """Valid JSON with the reference's keys and values (extra keys in the answer are allowed)."""
    try:
        got = json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    want = json.loads(reference)
    if isinstance(want, dict):
        return float(isinstance(got, dict) and all(k in got and got[k] == v for k, v in want.items()))
    return float(got == want)


def _regex_scorer(pattern: re.Pattern) -> Callable[[str, str], float]:
    def score(prediction: str, reference: str) -> float:
        found = pattern.search(prediction)
        if found is None:
            return 0.0
        if pattern.groups == 0:
            return 1.0
        in_reference = pattern.search(reference)
        wanted = in_reference.group(1) if in_reference else reference.strip()
        return float(found.group(1) == wanted)

    return score


def builtin_metric(spec: str, option: str = "--metric") -> Metric | None:
    """exact, json or regex:PATTERN as a `Metric`; None for anything else (a MODULE:FUNCTION)."""
    if spec == "exact":
        return Metric("exact", spec, exact)
    if spec == "json":
        return Metric("json", spec, json_match)
    if spec.startswith("regex:"):
        try:
            pattern = re.compile(spec[len("regex:"):])
        except re.error as err:
            raise ValueError(f"{option} {spec!r}: not a valid regular expression ({err})") from None
        if not pattern.pattern:
            raise ValueError(f"{option} {spec!r}: the pattern is empty; accepted: exact, json, regex:PATTERN, "
                             "MODULE:FUNCTION")
        return Metric("regex", spec, _regex_scorer(pattern))
    return None


def import_function(spec: str, option: str, accepted: str, what: str) -> tuple[str, Callable[..., Any]]:
    """The function MODULE:FUNCTION names (the current directory is searched too), and its name."""
    module_name, colon, function_name = spec.rpartition(":")
    if not colon or not module_name or not function_name.isidentifier():
        raise ValueError(f"{option} {spec!r} is not {what}; {accepted}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{option} {spec!r}: cannot import module {module_name!r} ({err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"{option} {spec!r}: module {module_name!r} has no function {function_name!r}")
    if function_name in RESERVED:
        raise ValueError(f"{option} {spec!r}: the name {function_name!r} is taken by a logged value; "
                         f"rename the function (taken: {', '.join(RESERVED)})")
    return function_name, function


def parse_metric(spec: str) -> Metric:
    """The metric named by `--metric`; a ValueError says what is accepted."""
    accepted = "accepted: exact, json, regex:PATTERN, MODULE:FUNCTION"
    builtin = builtin_metric(spec)
    if builtin is not None:
        return builtin
    name, function = import_function(spec, "--metric", accepted, "a metric")
    return Metric(name, spec, function)


# prompts and references ------------------------------------------------------------------


@dataclass
class Prompt:
    """A held-out prompt as the model sees it, and the answer it should give."""

    text: str
    """The prompt for people: the last user message, or the raw prompt."""
    ids: list[int]
    reference: str


def prompt_of(row: Row, tokenizer: Any) -> Prompt:
    """The conversation up to its last assistant turn (or the prompt), and that turn (or the completion)."""
    shape = example_shape(row)
    data = row.data
    if shape == "prompt_completion":
        ids = list(tokenizer(data["prompt"], add_special_tokens=True)["input_ids"])
        return Prompt(data["prompt"], ids, data["completion"])
    if shape == "messages":
        messages = [{"role": m["role"], "content": m["content"]} for m in data["messages"]]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{row.location()}: no assistant message to compare answers with")
        text = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        users = [m["content"] for m in messages[:last] if m["role"] == "user"]
        return Prompt(users[-1] if users else text, ids, messages[last]["content"])
    raise DataError(f"{row.location()}: a 'text' row has no prompt and reference; answers need "
                    "prompt/completion or messages rows")


def load_prompts(path: str | Path, tokenizer: Any, limit: int | None = None) -> list[Prompt]:
    rows = read_rows(path)
    return [prompt_of(row, tokenizer) for row in rows[:limit]]


def check_references(metric: Metric, prompts: Sequence[Prompt], source: str) -> None:
    """The json metric needs JSON references: say so before training, not at the first eval."""
    if metric.spec != "json":
        return
    for i, prompt in enumerate(prompts):
        try:
            json.loads(prompt.reference)
        except json.JSONDecodeError:
            raise ValueError(f"--metric json: the reference answer of row {i + 1} of {source} is not JSON: "
                             f"{prompt.reference!r:.80}") from None


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, prompts: Sequence[list[int]], max_new_tokens: int,
                   batch_size: int = 16, autocast_dtype: torch.dtype | None = None) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches), decoded without specials."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        out += [t.strip() for t in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
    model.train(was_training)
    return out
