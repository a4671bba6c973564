"""Loading base models: local directories and the bundled default (GGUF -> cached safetensors)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lorakit.base import models
from lorakit.cli import main


def test_local_directory_loads_frozen_in_eval_mode(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token_id is not None
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    half, _ = models.load_model(str(tiny_model_dir), device="cpu", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bad_model_arguments_say_what_is_accepted(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json; expected a transformers model directory"):
        models.load_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="quantize must be one of nf4, int8 or None, got 'fp4'"):
        models.load_model(str(tiny_model_dir), quantize="fp4")


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """The bundled default converted into a fresh cache directory, once for this module."""
    cache = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("LORAKIT_CACHE")
    os.environ["LORAKIT_CACHE"] = str(cache)
    try:
        path = models.default_model_path()
        yield path
    finally:
        if previous is None:
            os.environ.pop("LORAKIT_CACHE", None)
        else:
            os.environ["LORAKIT_CACHE"] = previous


def test_default_model_is_converted_once_and_matches_the_gguf(default_cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert default_cache.parent == models.cache_dir()
    assert (default_cache / "model.safetensors").is_file() and (default_cache / "tokenizer.json").is_file()

    # Later loads read the cache and never touch the GGUF file again.
    def no_gguf():
        raise AssertionError("the GGUF file was read again")

    monkeypatch.setattr(models, "default_gguf_path", no_gguf)
    model, tok = models.load_model(device="cpu")
    monkeypatch.undo()

    gguf = models.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.tolist() == ref_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_a_short_run_of_the_bundled_default(default_cache, tmp_path, capsys):
    from lorakit.demo.__main__ import EVAL, TRAIN

    train = tmp_path / "train.jsonl"
    train.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:16]))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(EVAL.read_text().splitlines(keepends=True)[:8]))
    out = tmp_path / "adapter"
    assert main(["train", "--data", str(train), "--output", str(out), "--max-steps", "4", "--batch-size", "4",
                 "--lr", "2e-3", "--seq-len", "256", "--device", "cpu"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == models.DEFAULT_HUB_ID
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    capsys.readouterr()
    assert main(["eval", "--data", str(held), "--device", "cpu"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(out), "--data", str(held), "--device", "cpu"]) == 0
    adapted = json.loads(capsys.readouterr().out)
    assert adapted["loss"] < base["loss"] - 0.3  # four steps already teach the JSON format
