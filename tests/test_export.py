"""`lorakit export`: llama.cpp LoRA GGUF read back with gguf.GGUFReader, the merged GGUF reloaded
through transformers (gguf_file=), and the Ollama Modelfile's template against the Jinja one."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import lorakit
from conftest import CHAT_TEMPLATE, adapter_on_tiny_base, tiny_tokenizer
from lorakit.adapters.layers import LoraLinear
from lorakit.cli import main
from lorakit.export.gguf_lora import permute_rows
from lorakit.export.ollama import go_template, turn_pieces

# SmolLM2-Instruct's template: a default system prompt when the conversation has none.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


def make(directory, base_dir, **config):
    """(adapter directory, the model carrying it) with non-zero random LoRA weights."""
    model, tok = adapter_on_tiny_base(base_dir, **config)
    path = lorakit.save_adapter(model, directory)
    tok.save_pretrained(path)  # as lorakit train does: the template travels
    return path, model


def field(reader, key):
    return reader.get_field(key).contents()


def test_gguf_lora_names_shapes_alpha_and_scale(tmp_path, base_dir, capsys):
    # Per-module ranks and alphas and rsLoRA: llama.cpp scales each pair by the file's alpha / r.
    path, model = make(tmp_path / "mixed", base_dir, r=8, alpha=16, use_rslora=True,
                       rank_pattern={"down_proj": 4}, alpha_pattern={"v_proj": 40})
    out = tmp_path / "mixed.gguf"
    assert main(["export", str(path), "--format", "gguf-lora", "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    reader = gguf.GGUFReader(out)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(16.0)
    tensors = {t.name: t for t in reader.tensors}
    kinds = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    expected = {f"blk.{i}.{k}.weight.lora_{ab}" for i in range(2) for k in kinds.values() for ab in "ab"}
    assert set(tensors) == expected
    config = model.config
    for i in range(2):
        for hf, cpp in kinds.items():
            layer = model.get_submodule(f"model.layers.{i}.{'self_attn' if 'proj' in hf and hf[0] in 'qkvo' else 'mlp'}.{hf}")
            assert isinstance(layer, LoraLinear)
            a = tensors[f"blk.{i}.{cpp}.weight.lora_a"]
            b = tensors[f"blk.{i}.{cpp}.weight.lora_b"]
            r = layer.lora_A["default"].weight.shape[0]
            assert a.data.shape == (r, layer.in_features) and b.data.shape == (layer.out_features, r)
            assert list(a.shape) == [layer.in_features, r]  # GGUF's own order: ne[0] first
            # What llama.cpp computes, (alpha / r) * B A, is the update lorakit trained (in llama.cpp's row order).
            delta = (16.0 / r) * torch.from_numpy(np.array(b.data)) @ torch.from_numpy(np.array(a.data))
            want = layer.delta_oi("default").detach()
            if hf == "q_proj":
                want = permute_rows(want, config.num_attention_heads)
            elif hf == "k_proj":
                want = permute_rows(want, config.num_key_value_heads)
            torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)


def test_gguf_lora_embedding_rows_are_transposed(tmp_path, base_dir):
    path, model = make(tmp_path / "emb", base_dir, r=4, target_modules=["embed_tokens"])
    out = tmp_path / "emb.gguf"
    assert main(["export", str(path), "--format", "gguf-lora", "--output", str(out), "--dtype", "f16"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(tensors) == {"token_embd.weight.lora_a", "token_embd.weight.lora_b"}
    layer = model.get_submodule("model.embed_tokens")
    a = layer.lora_embedding_A["default"].detach()
    assert tensors["token_embd.weight.lora_a"].data.shape == (a.shape[1], a.shape[0])  # (vocab, r)
    assert tensors["token_embd.weight.lora_a"].data.dtype == np.float16
    np.testing.assert_allclose(tensors["token_embd.weight.lora_a"].data, a.T.numpy(), rtol=1e-3, atol=1e-4)


def test_gguf_lora_refuses_dora_and_writes_nothing(tmp_path, base_dir, capsys):
    path, _ = make(tmp_path / "dora", base_dir, r=4, use_dora=True)
    out = tmp_path / "dora.gguf"
    assert main(["export", str(path), "--format", "gguf-lora", "--output", str(out)]) == 1
    assert "llama.cpp loads plain LoRA only; this adapter uses DoRA" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".dora.gguf*"))


@pytest.mark.parametrize(("dtype", "tolerance"), [("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 5e-2)])
def test_merged_gguf_reloads_through_transformers(tmp_path, base_dir, dtype, tolerance):
    from transformers import AutoModelForCausalLM

    path, model = make(tmp_path / "m", base_dir, r=4, alpha=8)
    out = tmp_path / f"merged-{dtype}.gguf"
    assert main(["export", str(path), "--format", "gguf", "--dtype", dtype, "--output", str(out)]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[1, 40, 71, 200, 33, 90, 5, 250]])
    with torch.no_grad():
        want = model(ids).logits
        got = reloaded(ids).logits
        untouched = base(ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < tolerance
    assert (untouched - want).abs().max() / scale > 10 * tolerance  # the adapter's change is far above the error
    reader = gguf.GGUFReader(out)
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert field(reader, "general.file_type") == {"f16": 1, "bf16": 32, "q8_0": 7}[dtype]
    tokens = field(reader, "tokenizer.ggml.tokens")
    tok = tiny_tokenizer()
    assert len(tokens) == model.config.vocab_size
    assert tokens[tok.eos_token_id] == "<|im_end|>" and field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id


def ollama_render(pieces, messages):
    """What Ollama's Go template (go_template) renders: .System gathers the system messages."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = f"{pieces.system_prefix}{system}{pieces.system_suffix}" if system else pieces.default_system
    for m in messages:
        if m["role"] == "user":
            out += pieces.user_prefix + m["content"] + pieces.user_suffix
        elif m["role"] == "assistant":
            out += m["content"] + pieces.assistant_suffix
    return out


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}, {"role": "user", "content": "e"}],
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, SMOLLM_TEMPLATE], ids=["chatml", "smollm"])
def test_ollama_template_renders_what_the_jinja_template_renders(template):
    tok = tiny_tokenizer()
    pieces = turn_pieces(template, tok)
    for messages in CONVERSATIONS:
        want = tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert ollama_render(pieces, messages) == want
    text = go_template(pieces)
    assert text.startswith("{{ if .System }}" + pieces.system_prefix + "{{ .System }}")
    assert ('{{ if eq .Role "user" }}' + pieces.user_prefix + "{{ .Content }}" + pieces.user_suffix) in text
    assert "{{-" not in text and "-}}" not in text  # trim markers would eat the pieces' newlines
    if template == SMOLLM_TEMPLATE:
        assert "You are a helpful AI assistant named SmolLM" in pieces.default_system


def test_ollama_export_writes_modelfile_and_model(tmp_path, base_dir, capsys):
    path, _ = make(tmp_path / "ol", base_dir, r=4)
    out = tmp_path / "ollama"
    assert main(["export", str(path), "--format", "ollama", "--output", str(out)]) == 0
    text = (out / "Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == go_template(turn_pieces(CHAT_TEMPLATE, tiny_tokenizer()))
    assert field(gguf.GGUFReader(out / "model.gguf"), "general.file_type") == 7  # q8_0


def test_ollama_refuses_a_template_it_cannot_express(tmp_path, base_dir, capsys):
    path, _ = make(tmp_path / "odd", base_dir, r=4)
    # The assistant prompt differs on the first turn: not a turn-by-turn template.
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}{% if messages|length == 1 %}FIRST>{% else %}>{% endif %}{% endif %}")
    out = tmp_path / "odd-ollama"
    assert main(["export", str(path), "--format", "ollama", "--output", str(out)]) == 1
    assert "cannot be written as an Ollama TEMPLATE" in capsys.readouterr().err
    assert not (out / "Modelfile").exists() and not (out / "model.gguf").exists()


def test_export_refuses_bad_options(tmp_path, base_dir, capsys):
    path, _ = make(tmp_path / "a", base_dir, r=4)
    with pytest.raises(SystemExit):
        main(["export", str(path), "--format", "safetensors"])
    assert "--format must be one of gguf-lora, gguf, ollama, got 'safetensors'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", str(path), "--format", "gguf", "--dtype", "q4_0"])
    assert "--dtype for --format gguf must be one of q8_0, f16, bf16, got 'q4_0'" in capsys.readouterr().err
