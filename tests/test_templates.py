"""The chat template travels with the adapter: train writes it, generate / eval / merge / serve
use it (and warn when the base's differs), info shows it, and `data --preview` marks the
supervised tokens."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from conftest import CHAT_TEMPLATE, chat_rows, tiny_llama_for_tokenizer
from lorakit.base.templates import TEMPLATE_FILE, saved_chat_template
from lorakit.cli import main

# The same turns with other markers: what a base model with a different template renders.
OTHER_TEMPLATE = (
    "{% for message in messages %}### {{ message['role'] }}:\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant:\n{% endif %}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny base model directory and an adapter trained on it through `lorakit train`."""
    root = tmp_path_factory.mktemp("templates")
    model, tok = tiny_llama_for_tokenizer()
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    out = root / "adapter"
    assert main(["train", "--model", str(base), "--data", str(data), "--output", str(out), "--rank", "4",
                 "--max-steps", "4", "--lr", "3e-2", "--batch-size", "4", "--seq-len", "64", "--device", "cpu"]) == 0
    return base, out, data


def other_base(root, base):
    """A copy of `base` whose tokenizer carries OTHER_TEMPLATE."""
    other = root / "other-base"
    if not other.exists():
        shutil.copytree(base, other)
        (other / TEMPLATE_FILE).write_text(OTHER_TEMPLATE)
    return other


def test_train_writes_the_tokenizer_and_template_beside_the_adapter(trained, capsys):
    base, out, _ = trained
    for name in ("tokenizer_config.json", "tokenizer.json", TEMPLATE_FILE):
        assert (out / name).is_file(), name
    assert saved_chat_template(out) == CHAT_TEMPLATE
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out)
    reference = AutoTokenizer.from_pretrained(base)
    assert again("<|im_start|>user\n3+4<|im_end|>")["input_ids"] == reference("<|im_start|>user\n3+4<|im_end|>")["input_ids"]
    assert again.eos_token == reference.eos_token == "<|im_end|>"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    line = next(line for line in info.splitlines() if line.startswith("chat template"))
    assert line.split(None, 2)[2] == f"{TEMPLATE_FILE} ({len(CHAT_TEMPLATE)} chars): {CHAT_TEMPLATE[:60]}..."


def test_generate_uses_the_adapters_template_and_warns(trained, tmp_path, capsys):
    base, out, _ = trained
    other = other_base(tmp_path, base)
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--adapter", str(out), "--chat", "3+4",
                 "--max-new-tokens", "5", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "differs from the one the adapter was trained with" in captured.err
    # The reference: the same greedy decode on the adapter's template, by hand.
    import lorakit
    from lorakit.base.models import load_model

    model, tok = load_model(str(other), device="cpu")
    lorakit.load_adapter(model, out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "3+4"}], chat_template=CHAT_TEMPLATE,
                                     tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert captured.out == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) + "\n"
    # With the base it was trained on there is nothing to warn about.
    assert main(["generate", "--model", str(base), "--adapter", str(out), "--chat", "3+4",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "chat template" not in capsys.readouterr().err


def test_merge_writes_the_adapters_template(trained, tmp_path):
    base, out, _ = trained
    other = other_base(tmp_path, base)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(other), "--adapter", str(out), "--output", str(merged)]) == 0
    assert saved_chat_template(merged) == CHAT_TEMPLATE
    assert saved_chat_template(other) == OTHER_TEMPLATE


def test_serve_renders_chat_with_each_adapters_template(trained, tmp_path):
    from lorakit.base.models import load_model
    from lorakit.serve import Engine
    from lorakit.serve.api import create_app
    from test_serve_api import Server

    base, out, _ = trained
    other = other_base(tmp_path, base)
    model, tok = load_model(str(other), device="cpu")
    engine = Engine(model, tok, max_batch=4)
    engine.load_adapter("notes", out)
    messages = [{"role": "user", "content": "3+4"}]

    def prompt_tokens(template: str) -> int:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    assert prompt_tokens(CHAT_TEMPLATE) != prompt_tokens(OTHER_TEMPLATE)
    with Server(create_app(engine, model_name="base")) as server:
        for name, template in (("notes", CHAT_TEMPLATE), ("base", OTHER_TEMPLATE)):
            reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "model": name, "messages": messages, "max_tokens": 2, "temperature": 0})
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["prompt_tokens"] == prompt_tokens(template), name


def test_serve_command_warns_about_a_different_base_template(trained, tmp_path, monkeypatch, capsys):
    import uvicorn

    from lorakit.serve.command import ServeArgs, run_serve

    base, out, _ = trained
    other = other_base(tmp_path, base)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # load everything, serve nothing
    run_serve(ServeArgs(model=str(other), adapter=[f"notes={out}"], device="cpu"))
    err = capsys.readouterr().err
    assert "adapter 'notes'" in err and "differs from the one the adapter was trained with" in err


def test_data_preview_marks_supervised_tokens(trained, capsys):
    base, _, data = trained
    assert main(["data", "--data", str(data), "--preview", "2", "--model", str(base)]) == 0
    out = capsys.readouterr().out
    first = chat_rows(16)[0]["messages"]
    # The assistant turn and its end-of-turn marker are supervised; the user turn is not.
    assert f"\u27e6{first[1]['content']}<|im_end|>\n\u27e7" in out
    assert f"\u27e6{first[0]['content']}" not in out and f"{first[0]['content']}<|im_end|>" in out
    assert out.count("--- row ") == 2
    assert "warning" not in out


def test_data_preview_warns_when_no_end_of_turn_is_supervised(trained, tmp_path, capsys):
    base, _, data = trained
    # This template closes a turn only when the next one opens: the last assistant turn never ends.
    late_end = ("{% for message in messages %}{% if not loop.first %}<|im_end|>\n{% endif %}<|im_start|>"
                "{{ message['role'] }}\n{{ message['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}")
    model_dir = tmp_path / "late-end"
    shutil.copytree(base, model_dir)
    (model_dir / TEMPLATE_FILE).write_text(late_end)
    assert main(["data", "--data", str(data), "--preview", "3", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "warning: 3 of 3 rows supervise no end-of-turn token (<|im_end|>)" in out
    assert "does not learn to stop" in out


def test_data_preview_refuses_bad_input(trained, tmp_path, capsys):
    base, _, data = trained
    with pytest.raises(SystemExit):
        main(["data", "--data", str(data), "--preview", "0", "--model", str(base)])
    assert "--preview must be a positive number of rows, got 0" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["data", "--data", str(bad), "--model", str(base)]) == 1
    assert f"{bad}:1: 'completion' is missing" in capsys.readouterr().err
