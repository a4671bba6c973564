"""Careless and hostile files and options: each is refused with an error that names it, and
nothing on disk or in the model changes."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import tiny_llama, tiny_llama_for_tokenizer
from lorakit.adapters.config import matches
from lorakit.adapters.files import read_adapter
from lorakit.adapters.state import has_adapters
from lorakit.data.sft import DataError, load_examples
from lorakit.train import recipe
from test_train import args_for


def snapshot(directory) -> dict[str, str]:
    """Every file under `directory` with its content hash."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def model_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# 2: one run per output directory -----------------------------------------------------------


def test_item2_a_second_run_never_mixes_with_the_first(tmp_path, tiny_model_dir, chat_data):
    out = tmp_path / "run"
    recipe.train(args_for(tiny_model_dir, chat_data, out, rank=4, max_steps=6, save_every=3))
    before = snapshot(out)
    assert {"checkpoint-3/trainer_state.json", "checkpoint-6/trainer_state.json"} <= set(before)

    with pytest.raises(ValueError, match=r"--output .*run already holds files \(adapter_config.json.*--resume.*--overwrite"):
        recipe.train(args_for(tiny_model_dir, chat_data, out, rank=8, max_steps=2))
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"other settings \(rank: checkpoint 4, now 8; max_steps: checkpoint 6, now 2\)"):
        recipe.train(args_for(tiny_model_dir, chat_data, out, rank=8, max_steps=2, resume=True))
    assert snapshot(out) == before

    # --overwrite: the old run's files and checkpoints (with higher step numbers) are gone first,
    # so rotation keeps the new run's checkpoints and the adapter agrees with train_config.yaml.
    recipe.train(args_for(tiny_model_dir, chat_data, out, rank=8, max_steps=2, save_every=1, overwrite=True))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8
    assert "rank: 8" in (out / "train_config.yaml").read_text()
    a = load_file(str(out / "adapter_model.safetensors"))
    assert all(t.shape[0] == 8 for k, t in a.items() if k.endswith("lora_A.weight"))


def test_item2_checkpoints_name_their_run_and_rotate_within_it(tmp_path, tiny_model_dir, chat_data):
    from lorakit.train.checkpoint import checkpoint_dirs

    out = tmp_path / "run"
    recipe.train(args_for(tiny_model_dir, chat_data, out, max_steps=4, save_every=1, keep_checkpoints=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert len(state["run_id"]) == 32 and state["settings"]["rank"] == 4
    foreign = out / "checkpoint-99"
    foreign.mkdir()
    (foreign / "trainer_state.json").write_text(json.dumps({"step": 99, "run_id": "another-run"}))
    assert [p.name for p in checkpoint_dirs(out, state["run_id"])] == ["checkpoint-3", "checkpoint-4"]


# 3: checkpoints cannot run code ------------------------------------------------------------


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_item3_resume_refuses_a_pickle_that_runs_code(tmp_path, tiny_model_dir, chat_data):
    out = tmp_path / "run"
    recipe.train(args_for(tiny_model_dir, chat_data, out, max_steps=2, save_every=1))
    marker = tmp_path / "code-ran"
    for name in ("optimizer.pt", "rng_state.pt"):
        path = out / "checkpoint-2" / name
        original = path.read_bytes()
        torch.save({"state": _RunsCode(str(marker))}, path)
        before = snapshot(out)
        with pytest.raises(ValueError, match=rf"checkpoint-2/{name} holds objects other than tensors"):
            recipe.train(args_for(tiny_model_dir, chat_data, out, max_steps=2, save_every=1, resume=True))
        assert not marker.exists()
        assert snapshot(out) == before
        path.write_bytes(original)
    # The genuine files hold tensors and plain values only, and the run resumes from them.
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)
    rng = torch.load(out / "checkpoint-2" / "rng_state.pt", weights_only=True)
    assert optimizer["state"] and isinstance(rng["torch"], torch.Tensor)
    recipe.train(args_for(tiny_model_dir, chat_data, out, max_steps=2, save_every=1, resume=True))


# 4: files that would stall a reader ---------------------------------------------------------


def adapter_dir(tmp_path, name="a", **config):
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    path = lorakit.save_adapter(model, tmp_path / name)
    if config:
        data = json.loads((path / "adapter_config.json").read_text())
        data.update(config)
        (path / "adapter_config.json").write_text(json.dumps(data))
    return path


def test_item4_a_backtracking_regex_does_not_stall_loading(tmp_path):
    # Nested repetition that Python's re needs about 2**31 steps for on a 31-character module name.
    path = adapter_dir(tmp_path, target_modules=r"([\w.]+)+Z")
    model = tiny_llama()
    before = model_state(model)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="missing LoRA weights|matched nothing|unexpected key"):
        lorakit.load_adapter(model, path)
    assert time.perf_counter() - start < 5
    assert not has_adapters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Lookaround (outside RE2) still works, under a time limit.
    assert matches(r"^(?!.*vision).*q_proj", "model.layers.0.self_attn.q_proj")
    assert not matches(r"^(?!.*vision).*q_proj", "vision.q_proj")


def test_item4_oversized_headers_and_configs_are_refused_unparsed(tmp_path):
    path = adapter_dir(tmp_path)
    weights = path / "adapter_model.safetensors"
    good = weights.read_bytes()
    # A 94 MB header length in the first 8 bytes of a small file: refused from those 8 bytes.
    weights.write_bytes(struct.pack("<Q", 94 * 2**20) + good[8:])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"declares a 98566144-byte header .* at most 16777216"):
        read_adapter(path)
    assert time.perf_counter() - start < 1
    weights.write_bytes(good)
    config = path / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding": "x" * 2**21}))
    with pytest.raises(ValueError, match=r"adapter_config.json is \d+ bytes; an adapter config is at most 1048576"):
        read_adapter(path)


def test_item4_non_finite_adapter_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = adapter_dir(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} holds NaN or infinite values"):
        read_adapter(path)


# 8: a failed load changes nothing ----------------------------------------------------------


@pytest.mark.parametrize("name", ["eval", "training", "forward"])
def test_item8_a_clashing_adapter_name_changes_nothing(tmp_path, name):
    path = adapter_dir(tmp_path)
    model = tiny_llama()
    before = model_state(model)
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=rf"adapter name '{name}' is the name of a module attribute"):
        lorakit.load_adapter(model, path, name)
    assert not has_adapters(model)
    assert [type(m) for m in model.modules()] == modules
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The next load works and is active (it changes the output).
    ids = torch.tensor([[1, 2, 3]])
    base = model(ids).logits
    lorakit.load_adapter(model, path, "ok")
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "lora_B") and "ok" in layer.lora_B:
                layer.lora_B["ok"].weight.fill_(0.5)
    assert not torch.allclose(model(ids).logits, base)
    assert not model.get_input_embeddings().weight.requires_grad


# 9: the smaller ones ---------------------------------------------------------------------------


def test_item9_negative_max_grad_norm_is_refused():
    with pytest.raises(ValueError, match=r"--max-grad-norm must be a finite number > 0, got -1"):
        recipe.TrainArgs(data="d", output="o", max_grad_norm=-1)


def test_item9_fractional_rank_in_a_config_is_refused(tmp_path):
    path = adapter_dir(tmp_path, r=16.7)
    with pytest.raises(ValueError, match=r"adapter_config.json: r must be a positive integer, got 16.7"):
        read_adapter(path)


def test_item9_a_config_that_disagrees_with_its_tensors_is_named(tmp_path):
    path = adapter_dir(tmp_path, r=8)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"has rank 4, but adapter_config.json says r=8 .* do not belong together"):
        lorakit.load_adapter(model, path)
    assert not has_adapters(model)


def test_item9_non_utf8_data_is_named_and_skippable(tmp_path):
    from conftest import tiny_tokenizer

    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    tok = tiny_tokenizer()
    with pytest.raises(DataError, match=r"mixed.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 14\)"):
        load_examples(data, tok, 64, "all")
    examples, stats = load_examples(data, tok, 64, "all", skip_bad=True)
    assert len(examples) == 2 and stats.skip_reasons == {"not valid UTF-8": 1}


def test_item9_merge_refuses_to_overwrite_the_base_model(tmp_path, tiny_model_dir, capsys):
    from lorakit.cli import main

    adapter = adapter_dir(tmp_path)
    before = snapshot(tiny_model_dir)
    for output in (str(tiny_model_dir), str(tiny_model_dir) + "/", str(tiny_model_dir / ".." / tiny_model_dir.name)):
        assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(adapter), "--output", output]) == 1
        assert f"--output {output} is the base model's directory" in capsys.readouterr().err
    assert snapshot(tiny_model_dir) == before


def test_item9_an_interrupted_adapter_write_never_leaves_a_mismatched_pair(tmp_path, monkeypatch):
    path = adapter_dir(tmp_path)
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    real = os.replace

    def killed(src, dst):  # the process dies just before the config is renamed into place
        if str(dst).endswith("adapter_config.json"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, path)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        read_adapter(path)
    assert sorted(os.listdir(path)) == ["adapter_model.safetensors"]
    # A new directory appears whole or not at all.
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        lorakit.save_adapter(model, tmp_path / "fresh")
    monkeypatch.setattr(os, "replace", real)
    assert not (tmp_path / "fresh").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".fresh")] == []
