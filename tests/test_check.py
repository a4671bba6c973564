"""`lorakit check`: one adapter per rule, made by lorakit (or by PEFT, for a LoRA bias, which
lorakit never writes), and the verdicts the targets' loaders give."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import adapter_on_tiny_base, chat_rows, tiny_gpt2
from lorakit.cli import main
from lorakit.export.check import LOADS, REFUSED, WARNS, check, read_facts


@pytest.fixture(scope="module")
def base_dir(tiny_base_dir):
    return tiny_base_dir


def make(directory, base_dir, **config):
    """An adapter on the tiny base with non-zero random weights, saved with its base recorded."""
    model, _ = adapter_on_tiny_base(base_dir, **config)
    return lorakit.save_adapter(model, directory)


def verdicts(path, model=None):
    return {v.target: v for v in check(read_facts(path, model))}


def rules(verdict):
    return {f.rule for f in verdict.findings}


def peft_loads(path, base_dir):
    """PEFT, the reference loader: it loads the files and the adapter changes the output."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[5, 9, 77, 3]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, path).eval()(ids).logits
    return not torch.allclose(before, after)


def test_plain_lora_loads_everywhere_with_the_serving_commands(tmp_path, base_dir, capsys):
    path = make(tmp_path / "plain", base_dir, r=8, alpha=16)
    result = verdicts(path)
    assert {t: v.verdict for t, v in result.items()} == dict.fromkeys(("vllm", "sglang", "llama.cpp", "peft"), LOADS)
    assert result["vllm"].command == f"vllm serve {base_dir} --enable-lora --max-lora-rank 8 --lora-modules plain={path}"
    assert "--lora-paths plain=" in result["sglang"].command and "--max-lora-rank 8" in result["sglang"].command
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vllm: loads and acts" in out and result["vllm"].command in out
    assert peft_loads(path, base_dir)


def test_rank_12_takes_vllms_next_max_lora_rank(tmp_path, base_dir):
    result = verdicts(make(tmp_path / "r12", base_dir, r=12, alpha=24))
    assert result["vllm"].verdict == LOADS
    assert "--max-lora-rank 16 " in result["vllm"].command


def test_rank_above_512_is_refused_by_vllm(tmp_path, base_dir):
    result = verdicts(make(tmp_path / "r600", base_dir, r=600, alpha=600, target_modules=["q_proj"]))
    assert result["vllm"].verdict == REFUSED and rules(result["vllm"]) == {"rank"}
    assert "rank 600 is above the largest --max-lora-rank vLLM accepts (512" in result["vllm"].findings[0].reason
    assert result["vllm"].command is None
    assert result["sglang"].verdict == LOADS and result["peft"].verdict == LOADS


def test_dora_is_refused_by_vllm_sglang_and_llama_cpp(tmp_path, base_dir, capsys):
    path = make(tmp_path / "dora", base_dir, r=4, use_dora=True)
    result = verdicts(path)
    for target in ("vllm", "sglang", "llama.cpp"):
        assert result[target].verdict == REFUSED and rules(result[target]) == {"dora"}, target
    assert result["peft"].verdict == LOADS and peft_loads(path, base_dir)
    assert main(["check", str(path), "--target", "vllm"]) == 1
    assert "vllm: refused\n  - dora: vLLM 0.11 does not load DoRA adapters" in capsys.readouterr().out


def test_modules_to_save_is_refused(tmp_path, base_dir):
    path = make(tmp_path / "mts", base_dir, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    result = verdicts(path)
    for target in ("vllm", "sglang", "llama.cpp"):
        assert result[target].verdict == REFUSED and rules(result[target]) == {"modules_to_save"}, target
        assert "modules_to_save: lm_head" in result[target].findings[0].reason
    assert result["peft"].verdict == LOADS and peft_loads(path, base_dir)


@pytest.mark.parametrize("pattern", [{"rank_pattern": {"q_proj": 4}}, {"alpha_pattern": {"v_proj": 64}}])
def test_rank_and_alpha_patterns_would_be_scaled_wrongly_by_vllm(tmp_path, base_dir, pattern):
    path = make(tmp_path / "pattern", base_dir, r=8, alpha=16, **pattern)
    result = verdicts(path)
    assert result["vllm"].verdict == WARNS and rules(result["vllm"]) == {"rank/alpha pattern"}
    reason = result["vllm"].findings[0].reason
    assert "lora_alpha / r = 2" in reason
    assert ("q_proj: 4" in reason) if "rank_pattern" in pattern else ("v_proj: 8" in reason)
    assert result["sglang"].verdict == WARNS
    # llama.cpp takes each tensor's rank from its shape, and lorakit's exporter folds the alpha into B.
    assert result["llama.cpp"].verdict == LOADS and result["peft"].verdict == LOADS


def test_a_uniform_pattern_is_no_warning(tmp_path, base_dir):
    result = verdicts(make(tmp_path / "same", base_dir, r=8, alpha=16, alpha_pattern={"q_proj": 16}))
    assert result["vllm"].verdict == LOADS


def test_lora_bias_from_peft_is_refused(tmp_path, base_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True))
    path = tmp_path / "bias"
    model.save_pretrained(path)
    result = verdicts(path, model=str(base_dir))
    for target in ("vllm", "sglang", "llama.cpp"):
        assert result[target].verdict == REFUSED and rules(result[target]) == {"bias"}, target
    assert result["peft"].verdict == LOADS


def test_embedding_lora_only_at_the_base_vocabulary(tmp_path, base_dir):
    from transformers import AutoConfig, LlamaForCausalLM

    path = make(tmp_path / "emb", base_dir, r=4, target_modules=["embed_tokens", "q_proj"])
    assert verdicts(path)["vllm"].verdict == LOADS
    # The same adapter against a base with a larger vocabulary: vLLM takes no extra-vocabulary LoRA.
    bigger = tmp_path / "bigger"
    config = AutoConfig.from_pretrained(base_dir)
    config.vocab_size = 300
    LlamaForCausalLM(config).save_pretrained(bigger)
    result = verdicts(path, model=str(bigger))
    assert result["vllm"].verdict == REFUSED and rules(result["vllm"]) == {"embedding"}
    assert "embedding LoRA over 264 tokens, but the base vocabulary has 300" in result["vllm"].findings[0].reason


def test_targets_must_be_linear_layers(tmp_path):
    model = tiny_gpt2()  # GPT-2's projections are transformers' Conv1D, not nn.Linear
    base = tmp_path / "gpt2"
    model.save_pretrained(base)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["c_attn"]))
    path = lorakit.save_adapter(model, tmp_path / "gpt2-lora")
    result = verdicts(path, model=str(base))
    assert result["vllm"].verdict == REFUSED and rules(result["vllm"]) == {"targets"}
    assert "transformer.h.0.attn.c_attn is a Conv1D" in result["vllm"].findings[0].reason
    assert rules(result["llama.cpp"]) >= {"architecture"}


def test_train_says_before_the_run_when_vllm_would_refuse(tmp_path, base_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(8)))
    assert main(["train", "--model", str(base_dir), "--data", str(data), "--output", str(tmp_path / "out"),
                 "--rank", "4", "--use-dora", "--max-steps", "1", "--batch-size", "4", "--seq-len", "64",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "vLLM 0.11: refused" in text and "does not load DoRA adapters" in text
    assert text.index("vLLM 0.11: refused") < text.index("adapter saved to")


def test_bad_input_is_refused_by_name(tmp_path, base_dir, capsys):
    path = make(tmp_path / "ok", base_dir, r=4)
    with pytest.raises(SystemExit):
        main(["check", str(path), "--target", "tgi"])
    assert "--target 'tgi' is not one of vllm, sglang, llama.cpp, peft (or all)" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "missing")]) == 1
    assert f"{tmp_path / 'missing' / 'adapter_config.json'} is missing" in capsys.readouterr().err
