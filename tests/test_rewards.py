"""Reward functions: the built-ins score as --metric does; MODULE:FUNCTION loads with clear errors."""

from __future__ import annotations

import math
import sys

import pytest

from lorakit.evaluation.metrics import parse_metric
from lorakit.evaluation.rewards import completion_text, parse_reward, parse_rewards, score

CASES = [
    ("42", "42"), (" 42 \n", "42"), ("41", "42"), ('{"a": 1, "b": 2}', '{"a": 1}'), ('{"a": 2}', '{"a": 1}'),
    ("not json", '{"a": 1}'), ("the answer is 7.", "answer is 7"), ("answer is 8", "answer is 7"), ("", "x"),
]


@pytest.mark.parametrize("spec", ["exact", "json", r"regex:answer is (\d+)", "regex:answer"])
def test_builtins_score_like_the_metric(spec):
    reward, metric = parse_reward(spec), parse_metric(spec)
    assert reward.name == metric.name and reward.needs_reference
    cases = [(p, r) for p, r in CASES if spec != "json" or r.startswith("{")]
    completions = [p for p, _ in cases]
    references = [r for _, r in cases]
    got = score(reward, ["q"] * len(cases), completions, {"reference": references})
    assert got == [float(metric.score(p.strip(), r)) for p, r in cases]
    assert 0 < sum(got) < len(got)  # the cases hold hits and misses
    # Conversational completions (TRL's [{"role": "assistant", "content": ...}]) score the same.
    chat = [[{"role": "assistant", "content": p}] for p in completions]
    assert score(reward, ["q"] * len(cases), chat, {"reference": references}) == got


def test_no_reference_is_no_opinion():
    got = score(parse_reward("exact"), ["q", "q"], ["a", "b"], {"reference": ["a", None]})
    assert got[0] == 1.0 and math.isnan(got[1])


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def uses_column(prompts, completions, answer, **kw):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
        "def too_few(prompts, completions, **kw):\n    return [1.0]\n"
        "def words(prompts, completions, **kw):\n    return ['high'] * len(completions)\n"
        "def not_a_list(prompts, completions, **kw):\n    return 3.0\n"
        "def infinite(prompts, completions, **kw):\n    return [float('inf')] * len(completions)\n"
        "def some_none(prompts, completions, **kw):\n    return [None, True]\n"
        "loss = short\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"
    sys.modules.pop("my_rewards", None)


def test_module_function_gets_columns_as_keyword_lists(reward_module):
    reward = parse_reward(f"{reward_module}:uses_column")
    assert reward.name == "uses_column" and not reward.needs_reference
    got = score(reward, ["p1", "p2"], ["is 4", "is 5"], {"answer": ["4", "4"], "reference": [None, None]})
    assert got == [1.0, 0.0]
    assert score(parse_reward(f"{reward_module}:some_none"), ["p", "p"], ["a", "b"], {})[1] == 1.0


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "--reward 'nonsense' is not a reward; accepted: exact, json, regex:PATTERN, MODULE:FUNCTION"),
    ("regex:(", "--reward 'regex:(': not a valid regular expression"),
    ("regex:", "--reward 'regex:': the pattern is empty"),
    ("no_such_module_xyz:f", "--reward 'no_such_module_xyz:f': cannot import module 'no_such_module_xyz'"),
    ("my_rewards:missing", "--reward 'my_rewards:missing': module 'my_rewards' has no function 'missing'"),
    ("my_rewards:NOT_CALLABLE", "module 'my_rewards' has no function 'NOT_CALLABLE'"),
    ("my_rewards:loss", "the name 'loss' is taken by a logged value"),
])
def test_bad_specs_name_the_value(reward_module, spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_reward(spec)


@pytest.mark.parametrize("function, message", [
    ("too_few", "returned 1 values for 2 completions"),
    ("words", "value 0 is 'high'; a reward function returns floats"),
    ("not_a_list", "returned float; a reward function returns a list"),
    ("infinite", "value 0 is inf; rewards must be finite"),
])
def test_bad_returns_are_explained(reward_module, function, message):
    reward = parse_reward(f"{reward_module}:{function}")
    with pytest.raises(ValueError, match=f"--reward {reward_module}:{function}: {message}"):
        score(reward, ["p", "p"], ["a", "b"], {})


def test_weights_match_the_rewards(reward_module):
    rewards, weights = parse_rewards(["exact", f"{reward_module}:short"], None)
    assert [r.name for r in rewards] == ["exact", "short"] and weights == [1.0, 1.0]
    assert parse_rewards(["exact", f"{reward_module}:short"], [2, 0.5])[1] == [2.0, 0.5]
    with pytest.raises(ValueError, match=r"--reward-weights has 1 values for 2 --reward functions \(exact, short\)"):
        parse_rewards(["exact", f"{reward_module}:short"], [1.0])
    with pytest.raises(ValueError, match="--reward-weights must be finite numbers, got nan"):
        parse_rewards(["exact"], [float("nan")])
    with pytest.raises(ValueError, match="needs at least one --reward"):
        parse_rewards([], None)
    with pytest.raises(ValueError, match="two functions log under the same name"):
        parse_rewards(["exact", "exact"], None)


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "assistant", "content": "y"}]) == "y"
