"""Task metrics: the scorers on hand-checked cases, user functions, and what bad specs say."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_tokenizer
from lorakit.data.sft import DataError
from lorakit.evaluation.metrics import check_references, load_prompts, parse_metric


def test_exact_ignores_surrounding_whitespace_only():
    metric = parse_metric("exact")
    assert metric.name == "exact"
    assert metric.mean([" 42\n", "42.0", "4 2"], ["42", "42", "42"]) == pytest.approx(1 / 3)


def test_json_needs_valid_json_with_the_references_keys_and_values():
    metric = parse_metric("json")
    reference = json.dumps({"contact": "Zoe Sato", "amount_usd": 34000})
    cases = {
        '{"amount_usd": 34000, "contact": "Zoe Sato"}': 1.0,  # key order does not matter
        '{"contact": "Zoe Sato", "amount_usd": 34000, "extra": 1}': 1.0,  # extra keys are allowed
        '{"contact": "Zoe Sato", "amount_usd": "34000"}': 0.0,  # a string is not the number
        '{"contact": "Zoe Sato"}': 0.0,  # a key is missing
        '{"contact": "Zoe Sato", "amount_usd": 34000': 0.0,  # not JSON
        '["Zoe Sato", 34000]': 0.0,
    }
    for prediction, expected in cases.items():
        assert metric.score(prediction, reference) == expected, prediction
    assert metric.score("[1, 2]", "[1, 2]") == 1.0 and metric.score("3", "3.0") == 1.0


def test_regex_compares_the_first_group_or_checks_for_a_match():
    answer = parse_metric(r"regex:answer: (\d+)")
    assert answer.name == "regex"
    assert answer.score("so the answer: 12 apples", "answer: 12") == 1.0
    assert answer.score("so the answer: 13", "answer: 12") == 0.0
    assert answer.score("answer: 12", "12") == 1.0  # the reference without a match counts whole
    assert answer.score("twelve", "answer: 12") == 0.0
    shape = parse_metric(r"regex:^\{.*\}$")
    assert shape.score('{"a": 1}', "anything") == 1.0 and shape.score("a: 1", "anything") == 0.0


def test_a_users_function(tmp_path, monkeypatch):
    (tmp_path / "my_scores.py").write_text(
        "def first_word(prediction, reference):\n"
        "    return prediction.split()[:1] == reference.split()[:1]\n"
        "loss = first_word\n"
        "NOT_CALLABLE = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = parse_metric("my_scores:first_word")
    assert metric.name == "first_word"
    assert metric.mean(["yes it is", "no"], ["yes", "yes"]) == 0.5
    with pytest.raises(ValueError, match="module 'my_scores' has no function 'NOT_CALLABLE'"):
        parse_metric("my_scores:NOT_CALLABLE")
    with pytest.raises(ValueError, match="the name 'loss' is taken by a logged value"):
        parse_metric("my_scores:loss")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        parse_metric("no_such_module_xyz:f")


@pytest.mark.parametrize("spec", ["", "exactly", "regex:", "module:", ":f", "a:b c"])
def test_bad_specs_say_what_is_accepted(spec):
    with pytest.raises(ValueError) as err:
        parse_metric(spec)
    assert repr(spec) in str(err.value)


def test_prompts_and_references_from_both_row_shapes(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "eval.jsonl"
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2"},
                      {"role": "assistant", "content": "4"}]},
        {"prompt": "Capital of France: ", "completion": "Paris"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat, plain = load_prompts(path, tok)
    assert (chat.text, chat.reference, plain.text, plain.reference) == ("2+2", "4", "Capital of France: ", "Paris")
    rendered = tok.apply_chat_template(rows[0]["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert tok.decode(chat.ids) == rendered
    assert load_prompts(path, tok, limit=1) == [chat]
    with pytest.raises(ValueError, match=r"--metric json: the reference answer of row 1 of .* is not JSON: '4x'"):
        check_references(parse_metric("json"), [chat.__class__("q", [1], "4x")], str(path))
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "no answer here"}\n')
    with pytest.raises(DataError, match=r"text.jsonl:1: a 'text' row has no prompt and reference"):
        load_prompts(text, tok)
