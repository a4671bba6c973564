"""The `lorakit` command line end to end on a tiny random-init model (seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.base.models import load_model
from lorakit.cli import main, parse


def test_train_info_generate_eval_merge(tmp_path, tiny_model_dir, chat_data, capsys):
    train, held = chat_data
    out = tmp_path / "adapter"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--eval-data", str(held),
                 "--output", str(out), "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj,down_proj",
                 "--max-steps", "10", "--lr", "3e-2", "--batch-size", "4", "--seq-len", "64", "--device", "cpu"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    capsys.readouterr()

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    files = lorakit.read_adapter(out)
    assert f"{files.num_parameters:,}" in info
    assert "down_proj, q_proj, v_proj" in info and str(tiny_model_dir) in info
    fields = dict(line.split(None, 1) if not line.startswith(("base model", "file size")) else line.split("  ", 1)
                  for line in info.splitlines())
    assert fields["rank"].strip() == "4" and fields["alpha"].strip() == "8"

    # eval: with the adapter the held-out loss is lower than the base's; both are real numbers.
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(held), "--device", "cpu"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out), "--data", str(held), "--device", "cpu"]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert set(base) == {"loss", "perplexity", "tokens"}
    assert base["tokens"] == adapted["tokens"] > 0
    assert adapted["loss"] < base["loss"]
    assert adapted["perplexity"] == pytest.approx(2.718281828 ** adapted["loss"], rel=1e-6)

    # generate: greedy, so it equals transformers' generate on the same model + adapter.
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(out), "--chat", "3+4",
                 "--max-new-tokens", "6", "--device", "cpu"]) == 0
    generated = capsys.readouterr().out
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    lorakit.load_adapter(model, out)
    prompt = tok.apply_chat_template([{"role": "user", "content": "3+4"}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert generated == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True) + "\n"

    # merge: a plain transformers model that computes what base + adapter computes.
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out), "--output", str(merged_dir)]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert AutoTokenizer.from_pretrained(merged_dir)("3+4")["input_ids"] == tok("3+4")["input_ids"]
    assert not any("lora" in k for k in merged.state_dict())
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        adapted_logits = model(ids).logits
        torch.testing.assert_close(merged(ids).logits, adapted_logits, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(plain(ids).logits, adapted_logits, atol=1e-3)


def test_config_file_with_command_line_override(tmp_path, chat_data):
    train, _ = chat_data
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {train}\noutput: {tmp_path / 'o'}\nrank: 8\nlr: 0.001\nmax_steps: 5\n")
    name, args = parse(["train", "--config", str(config), "--rank", "2", "--resume"])
    assert name == "train"
    assert (args.rank, args.lr, args.max_steps, args.resume, args.data) == (2, 0.001, 5, True, str(train))


def test_bad_data_through_the_cli_names_file_and_line(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(tmp_path / "o"),
                 "--device", "cpu"])
    assert code == 1
    assert f"{bad}:2: 'completion' is missing" in capsys.readouterr().err


def test_bad_option_values_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["train", "--data", "d", "--output", "o", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size must be a positive integer, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["generate", "--prompt", "a", "--chat", "b"])
    assert "exactly one of --prompt TEXT or --chat TEXT" in capsys.readouterr().err


def test_python_dash_m_and_help_text_from_docstrings():
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True, check=True)
    assert "--max-steps" in out.stdout and "--eval-data" in out.stdout
    assert "Pack examples end to end" in out.stdout  # a field docstring
    top = subprocess.run([sys.executable, "-m", "lorakit", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "generate", "eval", "merge", "info", "serve", "plan"):
        assert f"  {command}" in top.stdout
