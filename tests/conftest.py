"""Tiny random-init models built from configs, and small chat data: no downloads, seconds to run."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn


class MLP(nn.Module):
    """A plain PyTorch model: no transformers, no config."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin0 = nn.Linear(16, 32)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(32, 32, bias=False)
        self.head = nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.relu(self.lin0(self.emb(ids)))))


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": tiny_mlp}


def example_input(kind: str, batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    vocab = 50 if kind == "mlp" else 128
    return torch.randint(0, vocab, (batch, seq), generator=g)


def run(model: nn.Module, kind: str, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param


# A tokenizer and a saved model directory, for tests that go through transformers' loaders.

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


TINY_VOCAB = 264  # 256 bytes + 3 specials, rounded up


def tiny_llama_for_tokenizer(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config).eval(), tok


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A local transformers model directory: random-init tiny Llama + byte-level tokenizer."""
    model, tok = tiny_llama_for_tokenizer()
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Adapters for the serving tests: distinct random weights on the tokenizer-sized tiny Llama.

SERVE_ADAPTERS = ("alpha", "beta", "gamma")


def make_serve_adapter(directory, seed: int, hidden_size: int = 32):
    """Save an all-linear r=4 adapter with random (non-zero) A and B; returns its directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    if hidden_size == 32:
        model, _ = tiny_llama_for_tokenizer()
    else:  # a differently shaped base: its adapters must not fit the tiny one
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=hidden_size, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(config).eval()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return lorakit.save_adapter(model, directory)


@pytest.fixture(scope="session")
def serve_adapter_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve-adapters")
    return {name: make_serve_adapter(root / name, seed=100 + i) for i, name in enumerate(SERVE_ADAPTERS)}


# Chat data for training runs: "a+b" -> the sum, as JSONL files ------------------------


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]})
    return rows


@pytest.fixture
def chat_data(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(24)))
    held = tmp_path / "eval.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8, seed=1)))
    return train, held


@pytest.fixture(scope="module")
def tiny_base_dir(tmp_path_factory):
    """A saved tiny Llama base (weights and tokenizer) that adapters record as their base."""
    model, tok = tiny_llama_for_tokenizer()
    path = tmp_path_factory.mktemp("tiny-base") / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def adapter_on_tiny_base(base_dir, **config):
    """(model, tokenizer): the tiny Llama with an adapter recorded against `base_dir`, its LoRA
    weights non-zero random (seed 0, scale 0.1) so that every module's update shows."""
    import lorakit

    model, tok = tiny_llama_for_tokenizer()
    config.setdefault("target_modules", "all-linear")
    lorakit.inject(model, lorakit.LoraConfig(base_model_name_or_path=str(base_dir), **config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model, tok



def run_in_triton_interpreter(script: str) -> list[str]:
    """Run `script` in a child Python with Triton's interpreter on (TRITON_INTERPRET is read
    when Triton compiles, so it cannot be switched on in this process); its 'ok' lines. A
    failing script fails the test with its output."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("ok ")]
