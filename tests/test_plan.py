"""`lorakit plan`: the meta-device prediction against the real model's bytes, its speed model
against the H200 measurements, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.memory import GiB, Shape
from lorakit.plan import PlanArgs, plan, tokens_per_second
from lorakit.quant import memory_report


def _tiny_model_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_plan_counts_the_bytes_the_loaded_model_holds(tmp_path, quantize):
    """Base, adapter and optimizer bytes from the meta device equal the real model's, loaded
    in bf16 (and quantized as lorakit train --quantize does), with an AdamW step taken."""
    if quantize:
        pytest.importorskip("bitsandbytes")
    directory = _tiny_model_dir(tmp_path)
    predicted = plan(PlanArgs(model=str(directory), gpu="H100", quantize=quantize, rank=8))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    model.requires_grad_(False)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    if quantize:
        from lorakit.quant import quantize_model

        quantize_model(model, quantize, compute_dtype=torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    measured = memory_report(model, optimizer)
    assert predicted["trainable"] == sum(p.numel() for p in params)
    assert predicted["adapter_gib"] * GiB == pytest.approx(measured.adapter_bytes, rel=1e-9)
    assert predicted["base_gib"] * GiB == pytest.approx(measured.base_bytes, rel=0.01)
    # AdamW's two moments (measured) plus the fp32 gradients (ADAM_BYTES = 12 per parameter)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params)
    assert predicted["optimizer_gib"] * GiB == pytest.approx(measured.optimizer_bytes + grads, rel=0.01)


def test_plan_speed_model_matches_the_h200_measurements():
    shape = Shape(layers=32, hidden=4096, intermediate=14336, q_dim=4096, kv_dim=1024, vocab=128256)
    params = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)
    # bench/RESULTS.md: 8B long-tailed packed at keep_layers 7, 13,561 tokens/s (median example
    # about 258 tokens); fixed 4 x 2048 at keep_layers 18, 13,759 tokens/s
    packed = tokens_per_second(shape, params, 7, 512, 989.0)
    fixed = tokens_per_second(shape, params, 18, 2048, 989.0)
    assert abs(packed / 13_561 - 1) < 0.10
    assert abs(fixed / 13_759 - 1) < 0.10


def test_plan_command_reports_what_fits(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = ["word " * (i + 1) for i in range(10)]
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    assert main(["plan", "--model", str(tiny_model_dir), "--gpu", "L4", "--tokens-per-batch", "256",
                 "--data", str(data), "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert "on L4 (planning for 20.2 GiB): fits with keep_layers 2: no layer recomputed" in out
    tokens = sum(len(r) + 1 for r in rows)  # one byte-level token per character, and EOS
    assert f"data: 10 examples, {tokens:,} tokens" in out and "s per epoch" in out


def test_plan_says_when_nothing_fits(tmp_path):
    directory = _tiny_model_dir(tmp_path)
    result = plan(PlanArgs(model=str(directory), gpu="0.001", tokens_per_batch=4096, seq_len=4096))
    assert result["fits"] is False
    assert "is too small" in result["why"]
    assert "tokens_per_s" not in result  # a memory size alone gives no speed


@pytest.mark.parametrize(
    "options,message",
    [
        (["--gpu", "H300"], "--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got 'H300'"),
        (["--gpu", "-4"], "--gpu must be one of H100, H200, A100-80, L4 or a memory size in GiB, got '-4'"),
        (["--quantize", "fp8"], "--quantize must be nf4 or int8 (or omitted), got 'fp8'"),
        (["--tokens-per-batch", "0"], "--tokens-per-batch must be a positive integer, got 0"),
    ],
)
def test_plan_refuses_bad_options_by_name(options, message, capsys):
    with pytest.raises(SystemExit):
        main(["plan", *options])
    assert message in capsys.readouterr().err
