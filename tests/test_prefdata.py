"""Preference data: shapes, file formats, tokenization against TRL's, and the bad-data errors."""

from __future__ import annotations

import csv
import json

import datasets
import pytest
import torch

from conftest import tiny_llama_for_tokenizer, tiny_tokenizer
from lorakit.data.pairs import collate_pairs, load_pairs, split_pairs, tokenize_pair
from lorakit.data.sft import IGNORE, DataError, Row

TEXT_ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "capital of France?", "chosen": " Paris", "rejected": " Lyon, I think"},
]
SYSTEM = {"role": "system", "content": "Answer in JSON."}
USER = {"role": "user", "content": "name: Ana"}
GOOD = {"role": "assistant", "content": '{"name": "Ana"}'}
BAD = {"role": "assistant", "content": 'Sure! {"name": "Ana"}'}


def write_all_formats(tmp_path, rows: list[dict]) -> list:
    paths = []
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths.append(jsonl)
    as_json = tmp_path / "p.json"
    as_json.write_text(json.dumps(rows))
    paths.append(as_json)
    as_csv = tmp_path / "p.csv"
    with as_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    paths.append(as_csv)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    paths.append(tmp_path / "p.parquet")
    ds.save_to_disk(str(tmp_path / "p_ds"))
    paths.append(tmp_path / "p_ds")
    return paths


def test_every_file_format_gives_the_same_pairs(tmp_path):
    tok = tiny_tokenizer()
    results = [load_pairs(p, tok, 64)[0] for p in write_all_formats(tmp_path, TEXT_ROWS)]
    for pairs in results[1:]:
        assert pairs == results[0]
    first = results[0][0]
    # Prompt tokens carry no label; each answer ends with EOS and is labelled.
    prompt = tok("2+2=")["input_ids"]
    assert first.chosen.input_ids == prompt + tok("4", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert first.chosen.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert first.rejected.labels[len(prompt):] == first.rejected.input_ids[len(prompt):]


def trl_tokenized(tmp_path, rows: list[dict]) -> list[dict]:
    """TRL's DPOTrainer dataset preparation (prompt_ids, chosen_ids, rejected_ids) for these rows."""
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tok = tiny_llama_for_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         peft_config=LoraConfig(r=2, target_modules=["q_proj"]))
    return [trainer.train_dataset[i] for i in range(len(rows))]


@pytest.mark.parametrize("form", ["implicit", "explicit"])
def test_chat_pairs_tokenize_as_trl_does(tmp_path, form):
    if form == "implicit":  # the prompt is the turns both conversations share
        rows = [{"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}]
    else:
        rows = [{"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}]
    expected = trl_tokenized(tmp_path, rows)[0]
    pair = tokenize_pair(Row(rows[0], "rows", 1), tiny_tokenizer())
    for side in ("chosen", "rejected"):
        ex = getattr(pair, side)
        assert ex.input_ids == expected["prompt_ids"] + expected[f"{side}_ids"]
        n = len(expected["prompt_ids"])
        assert ex.labels == [IGNORE] * n + expected[f"{side}_ids"]


def test_the_two_chat_forms_give_the_same_pair():
    implicit = tokenize_pair(Row({"chosen": [SYSTEM, USER, GOOD], "rejected": [SYSTEM, USER, BAD]}, "f", 1), tiny_tokenizer())
    explicit = tokenize_pair(Row({"prompt": [SYSTEM, USER], "chosen": [GOOD], "rejected": [BAD]}, "f", 1), tiny_tokenizer())
    assert implicit == explicit


BAD_ROWS = {
    "no rejected": ({"prompt": "p", "chosen": "a"}, "f.jsonl:2: 'rejected' is missing (a preference row needs 'chosen' and 'rejected'; fields: chosen, prompt)"),
    "identical": ({"prompt": "p", "chosen": "a", "rejected": "a"}, "f.jsonl:2: 'chosen' and 'rejected' are identical"),
    "identical chat": ({"chosen": [USER, GOOD], "rejected": [USER, GOOD]}, "f.jsonl:2: 'chosen' and 'rejected' are identical after the shared prompt turns"),
    "mixed types": ({"prompt": "p", "chosen": "a", "rejected": [GOOD]}, "f.jsonl:2: 'chosen' and 'rejected' must both be strings or both lists of messages, got str and list"),
    "sft row": ({"prompt": "p", "completion": "a"}, "f.jsonl:2: 'chosen' is missing"),
    "not an assistant answer": ({"prompt": [USER], "chosen": [USER], "rejected": [GOOD]}, "f.jsonl:2: the 'chosen' answer must start with an assistant turn after the prompt, got role 'user'"),
    "truncated away": ({"prompt": "x" * 80, "chosen": "a", "rejected": "b"}, "f.jsonl:2: nothing left of the chosen answer after truncation to seq_len=32 (the longer side has 82 tokens); raise --seq-len or shorten the prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_line_and_problem(tmp_path, case):
    row, message = BAD_ROWS[case]
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(TEXT_ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_pairs(path, tiny_tokenizer(), 32)
    assert str(err.value).replace(str(tmp_path) + "/", "").startswith(message)
    pairs, stats = load_pairs(path, tiny_tokenizer(), 32, skip_bad=True)
    assert len(pairs) == 1 and stats.skipped == 1 and stats.examples == 1


def test_collate_puts_chosen_then_rejected_and_splits_by_tokens():
    tok = tiny_tokenizer()
    pairs = [tokenize_pair(Row(r, "f", i + 1), tok) for i, r in enumerate(TEXT_ROWS)]
    batch = collate_pairs(pairs, tok.pad_token_id, sft_on_all=True)
    assert batch["input_ids"].shape[0] == 4
    for i, pair in enumerate(pairs):
        n, m = len(pair.chosen.input_ids), len(pair.rejected.input_ids)
        assert batch["input_ids"][i, :n].tolist() == pair.chosen.input_ids
        assert batch["input_ids"][2 + i, :m].tolist() == pair.rejected.input_ids
        assert batch["sft_labels"][i, :n].tolist() == pair.chosen.input_ids  # every chosen token
        assert (batch["sft_labels"][i, n:] == IGNORE).all()
    assert torch.equal(batch["position_ids"][0, :5], torch.arange(5))
    width = max(p.width for p in pairs)
    assert split_pairs(pairs, 2 * width) == [[pairs[0]], [pairs[1]]]
    assert split_pairs(pairs, None) == [pairs]
