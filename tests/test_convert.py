"""`lorakit convert --to plain-lora`: exact folding of per-module ranks and alphas, SVD of DoRA and
modules_to_save with the error it reports, PEFT loading the result, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from conftest import tiny_llama_for_tokenizer
from lorakit.cli import main
from lorakit.export.check import LOADS, check, read_facts
from lorakit.export.convert import convert_to_plain

IDS = torch.tensor([[1, 40, 71, 200, 33, 90, 5, 250]])


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


def make(directory, base_dir, **config):
    model, tok = tiny_llama_for_tokenizer()
    config.setdefault("target_modules", "all-linear")
    lorakit.inject(model, lorakit.LoraConfig(base_model_name_or_path=str(base_dir), **config))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    path = lorakit.save_adapter(model, directory)
    tok.save_pretrained(path)
    with torch.no_grad():
        logits = model(IDS).logits
    return path, logits


def peft_logits(base_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_rank_and_alpha_patterns_fold_exactly(tmp_path, base_dir, capsys):
    path, want = make(tmp_path / "mixed", base_dir, r=8, alpha=16, rank_pattern={"down_proj": 4, "q_proj": 2},
                      alpha_pattern={"v_proj": 40})
    out = tmp_path / "plain"
    assert main(["convert", str(path), "--to", "plain-lora", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy-token agreement with the original: 100.0%" in printed
    assert f"plain LoRA (rank 8, alpha 16) written to {out}" in printed
    files = lorakit.read_adapter(out)
    assert files.config.rank_pattern is None and files.config.alpha_pattern is None and files.config.r == 8
    # PEFT, the reference, loads the converted files and computes what the original adapter computed.
    torch.testing.assert_close(peft_logits(base_dir, out), want, rtol=1e-5, atol=1e-5)
    assert (out / "chat_template.jinja").is_file()
    assert {v.target: v.verdict for v in check(read_facts(out))} == dict.fromkeys(("vllm", "sglang", "llama.cpp", "peft"), LOADS)


def test_dora_goes_through_an_svd_whose_error_is_reported(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, want = make(tmp_path / "dora", base_dir, r=4, use_dora=True, target_modules=["q_proj", "down_proj"])
    # Full rank (the layers are at most 32 wide): exact up to rounding.
    full = convert_to_plain(path, tmp_path / "full", rank=64, max_error=1e-4)
    assert max(full.errors.values()) < 1e-5
    torch.testing.assert_close(peft_logits(base_dir, full.output), want, rtol=1e-4, atol=1e-4)
    # Rank 2: the reported error is that of the best rank-2 approximation of PEFT's own weight change.
    low = convert_to_plain(path, tmp_path / "low", rank=2, max_error=1.0)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, path).merge_and_unload().state_dict()
    for module, error in low.errors.items():
        delta = (merged[module + ".weight"] - before[module + ".weight"]).double().numpy()
        s = np.linalg.svd(delta, compute_uv=False)
        assert error == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s**2).sum()), rel=1e-4), module
    assert 0 < low.agreement <= 1


def test_a_fresh_dora_adapter_converts_at_the_default_max_error(tmp_path, base_dir):
    # Untrained, a DoRA layer changes its weight only by float32 rounding (the magnitude is the
    # weight's own norm): no rank reproduces that noise, so its error is measured against a floor of
    # the weight's size, and the conversion (the command the README shows) goes through.
    model, tok = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, use_dora=True, target_modules="all-linear",
                                             base_model_name_or_path=str(base_dir)))
    path = lorakit.save_adapter(model, tmp_path / "fresh")
    tok.save_pretrained(path)
    with torch.no_grad():
        want = model(IDS).logits
    result = convert_to_plain(path, tmp_path / "plain")  # the default --max-error, 0.05
    assert max(result.errors.values()) < 0.05 and result.agreement == 1.0
    torch.testing.assert_close(peft_logits(base_dir, result.output), want, rtol=1e-4, atol=1e-4)


def test_modules_to_save_becomes_lora(tmp_path, base_dir):
    path, want = make(tmp_path / "mts", base_dir, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    result = convert_to_plain(path, tmp_path / "out", rank=32, max_error=1e-4)
    assert set(result.errors) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lm_head"}
    files = lorakit.read_adapter(result.output)
    assert files.config.modules_to_save is None and "lm_head" in files.config.target_modules
    torch.testing.assert_close(peft_logits(base_dir, result.output), want, rtol=1e-4, atol=1e-4)
    assert result.agreement == 1.0


def test_too_large_an_error_is_refused_and_nothing_is_written(tmp_path, base_dir, capsys):
    path, _ = make(tmp_path / "dora", base_dir, r=4, use_dora=True, target_modules=["q_proj"])
    out = tmp_path / "out"
    assert main(["convert", str(path), "--rank", "1", "--max-error", "0.001", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "converting to rank 1 loses too much: model.layers." in err and "> --max-error 0.001" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(SystemExit):
        main(["convert", str(path), "--to", "gguf"])
    assert "--to must be plain-lora or per-expert, got 'gguf'" in capsys.readouterr().err
