"""Data files, shapes, loss masks, truncation, packing and bad-data errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama_for_tokenizer, tiny_tokenizer
from lorakit.data.sft import (
    IGNORE,
    DataError,
    as_sequences,
    collate,
    load_examples,
    micro_batch,
    pack,
    read_rows,
    tokenize_rows,
)

ROWS = {
    "text": [{"text": "hello world"}, {"text": "a second line of text"}],
    "prompt_completion": [{"prompt": "2+2=", "completion": "4"}, {"prompt": "capital of France? ", "completion": "Paris"}],
    "messages": [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}]},
        {"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "and 3+3?"},
            {"role": "assistant", "content": "6"},
        ]},
    ],
}


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "datasets":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "parquet": ".parquet", "datasets": ""}


# CSV has no nested fields, so no messages rows.
@pytest.mark.parametrize(
    ("shape", "fmt"), [(s, f) for s in sorted(ROWS) for f in sorted(SUFFIX) if (s, f) != ("messages", "csv")]
)
def test_every_format_gives_the_same_examples(tmp_path, shape, fmt):
    tok = tiny_tokenizer()
    reference, _ = load_examples(write(tmp_path / "ref.jsonl", ROWS[shape], "jsonl"), tok, 256)
    path = write(tmp_path / f"data{SUFFIX[fmt]}", ROWS[shape], fmt)
    examples, stats = load_examples(path, tok, 256)
    assert [(e.input_ids, e.labels) for e in examples] == [(e.input_ids, e.labels) for e in reference]
    assert stats.examples == len(ROWS[shape]) and stats.truncated == 0


def supervised_text(tok, ex) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


def test_text_rows_train_on_every_token_and_end_with_eos():
    tok = tiny_tokenizer()
    (ex, _), _ = tokenize_rows(read_rows_from(ROWS["text"]), tok, 256)
    assert ex.input_ids == tok("hello world")["input_ids"] + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_prompt_completion_trains_on_the_completion_only():
    tok = tiny_tokenizer()
    examples, _ = tokenize_rows(read_rows_from(ROWS["prompt_completion"]), tok, 256)
    assert supervised_text(tok, examples[1]) == "Paris<|im_end|>"
    assert tok.decode(examples[1].input_ids) == "capital of France? Paris<|im_end|>"
    everything, _ = tokenize_rows(read_rows_from(ROWS["prompt_completion"]), tok, 256, loss_on="all")
    assert everything[1].labels == everything[1].input_ids


def test_messages_train_on_assistant_turns_only():
    tok = tiny_tokenizer()
    examples, _ = tokenize_rows(read_rows_from(ROWS["messages"]), tok, 512)
    ex = examples[1]
    # The ids are the chat template's rendering, tokenized.
    rendered = tok.apply_chat_template(ROWS["messages"][1]["messages"], tokenize=False)
    assert tok.decode(ex.input_ids) == rendered
    # Supervised: each assistant reply with its end-of-turn marker, nothing of the other turns.
    runs, current = [], []
    for token, label in zip(ex.input_ids, ex.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    assert runs == ["4<|im_end|>\n", "6<|im_end|>\n"]


def read_rows_from(rows):
    from lorakit.data.sft import Row

    return [Row(r, "mem.jsonl", i) for i, r in enumerate(rows, start=1)]


def test_truncation_is_counted(tmp_path):
    tok = tiny_tokenizer()
    path = write(tmp_path / "t.jsonl", [{"text": "x" * 100}, {"text": "short"}], "jsonl")
    examples, stats = load_examples(path, tok, 32)
    assert stats.truncated == 1
    assert len(examples[0].input_ids) == 32 and len(examples[1].input_ids) == 6
    assert "1 truncated" in stats.summary("train")


def test_packing_keeps_examples_whole_and_restarts_positions():
    tok = tiny_tokenizer()
    examples, _ = tokenize_rows(read_rows_from(ROWS["prompt_completion"] * 3), tok, 64)
    packed = pack(examples, 64)
    assert len(packed) < len(examples)
    assert [t for p in packed for t in p.input_ids] == [t for e in examples for t in e.input_ids]
    for p in packed:
        assert len(p.input_ids) <= 64
        assert p.position_ids.count(0) >= 1 and p.labels[0] == IGNORE


def test_packed_loss_equals_the_loss_of_separate_examples():
    """transformers turns restarting position ids into a block-diagonal mask: no cross-talk."""
    from lorakit.train.objectives.sft import compute_loss

    model, tok = tiny_llama_for_tokenizer()
    examples, _ = tokenize_rows(read_rows_from(ROWS["prompt_completion"] + ROWS["text"]), tok, 128)
    separate = sum(compute_loss(model, collate([s], tok.pad_token_id))[0] for s in as_sequences(examples, 128, False))
    packed_rows = as_sequences(examples, 128, True)
    assert len(packed_rows) == 1
    packed, count = compute_loss(model, collate(packed_rows, tok.pad_token_id))
    assert count == sum(e.supervised - (e.labels[0] != IGNORE) for e in examples)
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)


def test_micro_batches_cover_each_epoch_once_and_depend_only_on_seed_and_index():
    tok = tiny_tokenizer()
    examples, _ = tokenize_rows(read_rows_from([{"text": str(i)} for i in range(10)]), tok, 16)
    rows = as_sequences(examples, 16, False)
    epoch = [id(s) for i in range(4) for s in micro_batch(rows, 3, seed=1, index=i)]
    assert sorted(epoch) == sorted(id(s) for s in rows)
    assert [id(s) for s in micro_batch(rows, 3, 1, 5)] == [id(s) for s in micro_batch(rows, 3, 1, 5)]
    assert [id(s) for s in micro_batch(rows, 3, 1, 0)] != [id(s) for s in micro_batch(rows, 3, 2, 0)]


# bad data --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"prompt": "only a prompt"}\n', "bad.jsonl:2: 'completion' is missing"),
        ('{"text": "ok"}\n{"text": 5}\n', "bad.jsonl:2: 'text' must be a string, got int"),
        ('{"text": "ok"}\n\n{"text": "ok"\n', "bad.jsonl:3: not valid JSON"),
        ('{"text": "ok"}\n{"input": "x"}\n', "bad.jsonl:2: no 'text', 'prompt'+'completion' or 'messages' field (fields: input)"),
        ('{"messages": [{"role": "user"}]}\n', "bad.jsonl:1: messages[0] must have a string 'role' and a string 'content'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: no assistant message"),
        ("", "bad.jsonl: the file has no examples"),
        ('{"prompt": "' + "p" * 50 + '", "completion": "c"}\n', "bad.jsonl:1: nothing left to learn after truncation to seq_len=16"),
    ],
)
def test_bad_rows_name_the_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_examples(path, tiny_tokenizer(), 16)
    assert message in str(err.value)


def test_bad_rows_in_other_formats_name_the_row(tmp_path):
    path = write(tmp_path / "bad.json", [{"text": "ok"}, {"text": ["not", "a", "string"]}], "json")
    with pytest.raises(DataError, match=r"bad.json row 2: 'text' must be a string, got list"):
        load_examples(path, tiny_tokenizer(), 64)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("prompt,other\nhi,there\n")
    with pytest.raises(DataError, match=r"bad.csv:2: 'completion' is missing"):
        load_examples(csv_path, tiny_tokenizer(), 64)
    with pytest.raises(DataError, match=r"unknown data format '.txt'"):
        read_rows(write(tmp_path / "x.txt", [{"text": "a"}], "jsonl"))
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")


def test_skip_bad_counts_what_was_skipped(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        '{"text": "good"}\nnot json\n{"prompt": "p"}\n{"text": 3}\n'
        '{"prompt": "' + "p" * 50 + '", "completion": "c"}\n{"text": "also good"}\n'
    )
    examples, stats = load_examples(path, tiny_tokenizer(), 16, skip_bad=True)
    assert len(examples) == 2
    assert stats.skipped == 4
    assert stats.skip_reasons == {"not valid JSON": 1, "is missing": 1, "must be": 1, "nothing left to learn": 1}
    assert "4 bad rows skipped" in stats.summary("train")
