"""LoRA on mixture-of-experts experts, against PEFT's `target_parameters` (tiny random models)."""

from __future__ import annotations

import copy
import json
import tempfile
import warnings

import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lorakit import LoraConfig
from lorakit.adapters.coverage import PartialAdapterWarning, coverage
from lorakit.adapters.experts import LoraExperts
from lorakit.adapters.files import load_adapter, save_adapter
from lorakit.adapters.inject import (
    add_adapter,
    delete_adapter,
    disable_adapters,
    forward_mixed,
    inject,
    lora_layers,
    merge,
    merge_and_unload,
    set_adapter,
    unmerge,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
FAMILIES = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2),
}


def tiny_moe(family: str, seed: int = 0) -> torch.nn.Module:
    config = AutoConfig.for_model(
        family, vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, **FAMILIES[family],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    if family == "gpt_oss":  # random-init expert biases are zero: make them count
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_bias"):
                    param.normal_(0, 0.1)
    return model


def randomize_b(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """B starts at zero; give it values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))


def test_all_linear_adapts_experts_and_matches_peft_both_ways(family: str, tmp_path) -> None:
    base = tiny_moe(family)
    reference = base(IDS).logits
    ours = inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    experts = [n for n, layer in lora_layers(ours) if isinstance(layer, LoraExperts)]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(n.rsplit(".", 1)[-1] in ATTENTION for n, layer in lora_layers(ours) if n not in experts)
    randomize_b(ours)
    logits = ours(IDS).logits
    assert (logits - reference).abs().max() > 1e-2  # the experts' adapter acts
    with disable_adapters(ours):
        assert torch.equal(ours(IDS).logits, reference)

    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(f"self_attn.{n}" for n in ATTENTION)
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(theirs(IDS).logits, logits, rtol=0, atol=1e-6)

    made = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=ATTENTION, target_parameters=EXPERTS)).eval()
    randomize_b(made, seed=2)
    made.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(loaded(IDS).logits, made(IDS).logits, rtol=0, atol=1e-6)


def test_gradients_match_peft(family: str) -> None:
    base = tiny_moe(family)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERTS, use_rslora=True))
    randomize_b(theirs)
    ours = copy.deepcopy(base)
    with tempfile.TemporaryDirectory() as save_dir:
        theirs.save_pretrained(save_dir)
        load_adapter(ours, save_dir, trainable=True)
    theirs(IDS).logits.square().mean().backward()
    ours(IDS).logits.square().mean().backward()
    theirs_grads = {
        n.replace("base_model.model.", "").replace(".default", ""): p.grad
        for n, p in theirs.named_parameters() if p.requires_grad
    }
    for path, layer in lora_layers(ours):
        if isinstance(layer, LoraExperts):
            order = layer.targets["default"]
            for i, param in enumerate(order):
                prefix = path + ".base_layer" * (len(order) - 1 - i)
                for side in ("lora_A", "lora_B"):
                    mine = getattr(layer, side)["default"][param].grad
                    torch.testing.assert_close(mine, theirs_grads[f"{prefix}.{side}.weight"], rtol=1e-5, atol=1e-7)
        else:
            for side in ("lora_A", "lora_B"):
                mine = getattr(layer, side)["default"].weight.grad
                torch.testing.assert_close(mine, theirs_grads[f"{path}.{side}.weight"], rtol=1e-5, atol=1e-7)


def test_merge_unmerge_and_several_adapters(family: str) -> None:
    base = tiny_moe(family)
    reference = base(IDS).logits
    model = inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_modules="all-linear"), "one")
    add_adapter(model, "two", LoraConfig(r=3, alpha=3, target_modules=["q_proj"], target_parameters=["down_proj"]))
    randomize_b(model)
    set_adapter(model, "two")
    two = model(IDS).logits
    set_adapter(model, "one")
    one = model(IDS).logits
    assert (one - two).abs().max() > 1e-2
    merge(model)
    torch.testing.assert_close(model(IDS).logits, one, rtol=0, atol=1e-5)
    unmerge(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, reference, rtol=0, atol=1e-6)
    delete_adapter(model, "two")
    merged = merge_and_unload(model)
    assert not any(isinstance(m, LoraExperts) for m in merged.modules())
    torch.testing.assert_close(merged(IDS).logits, one, rtol=0, atol=1e-5)
    assert set(merged.state_dict()) == set(base.state_dict())


def test_mixed_batch_equals_each_row_alone(family: str) -> None:
    model = inject(tiny_moe(family), LoraConfig(r=2, alpha=4, target_modules="all-linear"), "a")
    add_adapter(model, "b", LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    randomize_b(model)
    names = ["b", None, "a"]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    mixed = forward_mixed(model, names, ids).logits
    for row, name in enumerate(names):
        if name is None:
            with disable_adapters(model):
                alone = model(ids[row : row + 1]).logits
        else:
            set_adapter(model, name)
            alone = model(ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-6)


def largest_saved_update(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """The largest tensor the backward keeps of a forward that is not a parameter's own storage."""
    owned = {p.untyped_storage().data_ptr() for p in model.parameters()}
    largest = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if t.untyped_storage().data_ptr() not in owned:
            largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids).logits.float().square().mean().backward()
    return largest


def test_grouped_experts_never_form_the_update_as_a_weight(family: str, monkeypatch) -> None:
    """The experts run as grouped matmuls with rank-r LoRA terms: the backward keeps nothing as
    large as an expert weight, and the base weights get no gradient. The weight path (PEFT's way,
    W + B @ A per forward) keeps the whole updated weight: the check can tell them apart."""
    from lorakit.adapters import expert_grouped

    model = inject(tiny_moe(family), LoraConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    randomize_b(model)
    weight = max(p.numel() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    assert largest_saved_update(model, ids) < weight
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    monkeypatch.setattr(expert_grouped, "supports", lambda module: False)
    assert largest_saved_update(model, ids) >= weight


def test_refusals_name_what_is_accepted() -> None:
    model = tiny_moe("qwen3_moe")
    with pytest.raises(ValueError, match="DoRA is not available on expert parameters"):
        inject(copy.deepcopy(model), LoraConfig(target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="dropout"):
        inject(copy.deepcopy(model), LoraConfig(target_modules="all-linear", dropout=0.1))
    with pytest.raises(ValueError, match=r"names model\.layers\.0\.mlp\.gate\.weight.*not a fused expert parameter"):
        inject(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]))
    with pytest.raises(ValueError, match="matched nothing; expert parameters in this model: experts.down_proj"):
        inject(copy.deepcopy(model), LoraConfig(target_modules=["q_proj"], target_parameters=["experts.w9"]))


def test_attention_only_adapter_on_moe_warns_and_names_the_experts() -> None:
    model = tiny_moe("qwen3_moe")
    with pytest.warns(PartialAdapterWarning, match=r"unadapted.*experts \(.*values\).*all-linear"):
        inject(model, LoraConfig(target_modules=ATTENTION))
    found = coverage(model, "default")
    assert found.layers["attention"] == 8 and found.layers["experts"] == 0
    full = inject(tiny_moe("qwen3_moe"), LoraConfig(target_modules="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialAdapterWarning)
        summary = coverage(full, "default").summary()
    assert summary.startswith("adapted 8 attention, 2 experts; 100% of the projection weights")


def test_engine_serves_a_moe_base_with_mixed_expert_adapters(tmp_path) -> None:
    """The serving engine's mixed batches on an MoE base equal transformers' generate per request."""
    from conftest import TINY_VOCAB, tiny_tokenizer
    from lorakit.serve import Engine, SamplingParams

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **FAMILIES["qwen3_moe"],
    )
    torch.manual_seed(0)
    # float64 (a one-ulp difference between batched and single-row arithmetic must not flip an argmax)
    # needs the eager experts loop: grouped matmuls take float32 and narrower only.
    base = AutoModelForCausalLM.from_config(config, experts_implementation="eager").double().eval()
    for seed, name in ((1, "one"), (2, "two")):
        model = inject(copy.deepcopy(base), LoraConfig(r=2, alpha=8, target_modules="all-linear"))
        randomize_b(model, seed=seed, scale=0.3)
        save_adapter(model, tmp_path / name)
    reference = copy.deepcopy(base)
    for name in ("one", "two"):
        load_adapter(reference, tmp_path / name, name)
    cases = [("hello world", "one"), ("the quick brown fox", "two"), ("abc", None), ("serve experts", "two")]
    expected = []
    for prompt, adapter in cases:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        if adapter is None:
            with disable_adapters(reference):
                out = reference.generate(ids, **kwargs)
        else:
            set_adapter(reference, adapter)
            out = reference.generate(ids, **kwargs)
        tokens = out[0, ids.shape[1]:].tolist()
        expected.append(tokens[: tokens.index(tok.eos_token_id)] if tok.eos_token_id in tokens else tokens)
    engine = Engine(copy.deepcopy(base), tok, decode_path="generic")
    for name in ("one", "two"):
        engine.load_adapter(name, tmp_path / name)
    with engine:
        got = engine.generate([c[0] for c in cases], [c[1] for c in cases], SamplingParams(max_tokens=8, temperature=0))
    assert [c.token_ids for c in got] == expected
    assert expected[0] != expected[3] or expected[1] != expected[2]  # the adapters act


def test_check_and_convert_know_expert_adapters(tmp_path) -> None:
    from lorakit.export.check import LOADS, REFUSED, check, read_files
    from lorakit.export.convert import convert_to_plain

    model = inject(tiny_moe("qwen3_moe"), LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "moe")
    verdicts = {v.target: v for v in check(read_files(tmp_path / "moe"))}
    for target in ("vllm", "sglang", "llama.cpp"):
        assert verdicts[target].verdict == REFUSED
        assert any(f.rule == "experts" and "per-expert" in f.reason for f in verdicts[target].findings)
    assert verdicts["peft"].verdict == LOADS
    attention = inject(tiny_moe("qwen3_moe"), LoraConfig(r=2, alpha=4, target_modules=ATTENTION))
    save_adapter(attention, tmp_path / "attention")
    assert not any(f.rule == "experts" for v in check(read_files(tmp_path / "attention")) for f in v.findings)
    with pytest.raises(ValueError, match="adapts fused expert parameters"):
        convert_to_plain(tmp_path / "moe", tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_experts_equal_lora_on_the_decoded_base(kind: str, tmp_path) -> None:
    """QLoRA on the experts: the adapted forward and the adapter's gradients on a quantized expert
    base equal plain LoRA on a base holding the decoded values; the storage shrinks; a merge
    requantizes and says by how much; the file is the same format."""
    from lorakit.adapters import qweights
    from lorakit.adapters.experts import quantize_experts
    from lorakit.adapters.layers import RequantizationWarning

    quantized = tiny_moe("qwen3_moe")
    before = sum(p.numel() * p.element_size() for n, p in quantized.named_parameters() if ".experts." in n)
    assert quantize_experts(quantized, kind) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    layer = quantized.model.layers[0].mlp.experts
    assert layer.quantized == kind
    after = sum(qweights.storage_bytes(getattr(m, p)) for m in quantized.modules() if isinstance(m, LoraExperts)
                for p in m.expert_params)
    assert after < before * (0.25 if kind == "nf4" else 0.3)  # fp32 weights; block statistics included
    decoded = copy.deepcopy(tiny_moe("qwen3_moe"))
    with torch.no_grad():
        for i in range(2):
            source = quantized.model.layers[i].mlp.experts
            for param in source.expert_params:
                getattr(decoded.model.layers[i].mlp.experts, param).copy_(source.base_weight(param))
    assert torch.equal(quantized(IDS).logits, decoded(IDS).logits)  # no adapter: the decoded base exactly

    config = LoraConfig(r=2, alpha=4, target_modules="all-linear")
    inject(quantized, config)
    inject(decoded, config)
    randomize_b(quantized)
    randomize_b(decoded)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(quantized.named_parameters(), decoded.named_parameters(), strict=True):
            if "lora_A" in name:
                theirs.copy_(mine)
    out = quantized(IDS).logits
    torch.testing.assert_close(out, decoded(IDS).logits, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    decoded(IDS).logits.square().mean().backward()
    grads = {n: p.grad for n, p in decoded.named_parameters() if p.requires_grad}
    for name, param in quantized.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-7)

    save_adapter(quantized, tmp_path / "q")
    plain = tiny_moe("qwen3_moe")
    load_adapter(plain, tmp_path / "q")  # an adapter trained on quantized experts loads on the plain base
    with pytest.warns(RequantizationWarning, match=f"requantized {kind} expert weights"):
        merge(quantized)
    torch.testing.assert_close(quantized(IDS).logits, out, rtol=0, atol=0.05)


def test_a_quantized_moe_base_trains_its_experts(tmp_path) -> None:
    """`--quantize nf4` on an MoE checkpoint (saved by transformers with one tensor per expert,
    which its loader fuses): the experts are stored 4-bit, and `lorakit train` adapts and saves them."""
    from conftest import TINY_VOCAB, chat_rows, tiny_tokenizer
    from lorakit.base.models import load_model
    from lorakit.base.quant import quantize_model
    from lorakit.cli import main

    tok = tiny_tokenizer()
    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **{**FAMILIES["qwen3_moe"], "moe_intermediate_size": 64},
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _ = load_model(str(tmp_path / "model"), device="cpu", dtype=torch.float32, quantize="nf4")
    experts = [m for m in loaded.modules() if isinstance(m, LoraExperts)]
    assert len(experts) == 2 and all(m.quantized == "nf4" for m in experts)
    reference = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval(), "nf4")
    ids = torch.randint(0, TINY_VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded(ids).logits, reference(ids).logits)

    # A checkpoint that holds the experts fused, as the model does: quantized as they are read.
    from safetensors.torch import save_file

    from lorakit.base.quant import load_quantized

    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    (tmp_path / "fused").mkdir()
    fused.config.save_pretrained(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    streamed = load_quantized(tmp_path / "fused", "nf4")
    assert sum(isinstance(m, LoraExperts) and m.quantized == "nf4" for m in streamed.modules()) == 2
    assert torch.equal(streamed(ids).logits, reference(ids).logits)

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(16)))
    code = main(["train", "--model", str(tmp_path / "model"), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--quantize", "nf4", "--max-steps", "2", "--batch-size", "4", "--seq-len", "48", "--device", "cpu",
                 "--precision", "fp32", "--keep-checkpoints", "0"])
    assert code in (0, None)
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert sorted(saved["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    load_adapter(plain, tmp_path / "run")  # the adapter loads on the unquantized base too


def test_fsdp_quantized_loading_leaves_moe_models_to_the_whole_load() -> None:
    from lorakit.train.sharded_quant import unsupported_layers

    reason = unsupported_layers(tiny_moe("qwen3_moe"), LoraConfig(target_modules="all-linear"))
    assert reason is not None and "model.layers.0.mlp.experts holds fused mixture-of-experts weights" in reason


def test_the_documented_moe_example_runs(tmp_path, monkeypatch, capsys) -> None:
    """docs/training.md's paste-and-run example prints what it says it prints."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    section = text[text.index("## Mixture-of-experts models"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "training.md", "exec"), {})
    assert "adapted 8 attention, 2 experts; 100% of the projection weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "moe-adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]


@pytest.mark.parametrize("moe_family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("recompute", ["none", "all"])
def test_fast_path_runs_moe_layers_as_the_model_does(moe_family: str, recompute: str) -> None:
    """The training fast path on a mixture of experts (attention fused, the experts grouped):
    the loss and every adapter gradient equal the model's own forward, with and without recompute."""
    from lorakit.train.fastpath import FastPathConfig, enable_fast_path

    model = tiny_moe(moe_family).double().train()
    if moe_family == "qwen3_moe":  # one dense layer among the sparse ones, as mlp_only_layers allows
        config = copy.deepcopy(model.config)
        config.mlp_only_layers = [1]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).double().train()
    inject(model, LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    randomize_b(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[0, :3] = -100
    reference = copy.deepcopy(model)
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()
    status = enable_fast_path(model, FastPathConfig(recompute=recompute))
    assert status.enabled, status.reason
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None  # the fused loss ran
    out.loss.backward()
    # transformers computes the loss in fp32 even for an fp64 model: compare at fp32 precision
    torch.testing.assert_close(out.loss.double(), expected.double(), rtol=1e-6, atol=1e-6)
    theirs = dict(reference.named_parameters())
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert any(".experts." in n for n, _ in grads)
    for name, grad in grads:
        torch.testing.assert_close(grad, theirs[name].grad, rtol=1e-5, atol=1e-8, msg=name)


def test_fast_path_refuses_router_logits_and_foreign_experts() -> None:
    from lorakit.train.fastpath import enable_fast_path

    model = tiny_moe("qwen3_moe").train()
    model.config.output_router_logits = True
    status = enable_fast_path(model)
    assert not status.enabled and "output_router_logits" in status.reason
    status = enable_fast_path(tiny_moe("gpt_oss").train())
    assert not status.enabled and "GptOssForCausalLM" in status.reason


@pytest.mark.parametrize("moe_family", ["qwen3_moe", "mixtral"])
def test_per_expert_conversion_names_the_checkpoints_experts_and_computes_the_same(moe_family: str, tmp_path) -> None:
    """`convert --to per-expert`: every expert projection it writes is a weight that transformers'
    own checkpoint of the model holds, one by one (`save_pretrained` writes experts per expert), of
    the right shape; and those weights with the converted factors compute what lorakit's fused
    experts compute."""
    from safetensors.torch import load_file

    from conftest import tiny_tokenizer
    from lorakit.export.per_expert import convert_to_per_expert

    base_dir = tmp_path / "base"
    tiny_moe(moe_family).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = inject(tiny_moe(moe_family), LoraConfig(r=2, alpha=6, target_modules="all-linear"))
    randomize_b(model)
    save_adapter(model, tmp_path / "fused")
    out, modules = convert_to_per_expert(tmp_path / "fused", tmp_path / "split", model=str(base_dir))
    assert modules == 2 * 4 * 3  # 2 layers x 4 experts x (gate, up, down)
    weights = load_file(base_dir / "model.safetensors")
    split = load_file(out / "adapter_model.safetensors")
    fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    experts = {k for k in split if ".experts." in k}
    assert len(experts) == 2 * modules
    for key in experts:
        module = key[len("base_model.model."):].rsplit(".lora_", 1)[0]
        weight = weights[module + ".weight"]  # a weight of the checkpoint, by its own name
        a, b = split[module.join(["base_model.model.", ".lora_A.weight"])], split[module.join(["base_model.model.", ".lora_B.weight"])]
        assert a.shape == (2, weight.shape[1]) and b.shape == (weight.shape[0], 2)
    assert {k for k in fused if ".experts" not in k} == {k for k in split if ".experts." not in k}
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("target_parameters")
    from lorakit.export.check import LOADS, check, read_facts

    verdicts = {v.target: v for v in check(read_facts(out, str(base_dir)), ["vllm", "sglang"])}
    assert all(v.verdict == LOADS for v in verdicts.values()), [f.reason for v in verdicts.values() for f in v.findings]

    gate, up, down = ("w1", "w3", "w2") if moe_family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    prefix = "model.layers.0." + ("block_sparse_moe" if moe_family == "mixtral" else "mlp") + ".experts"
    layer = model.get_submodule("model.layers.0.mlp.experts")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5, 32, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(5)])
    routing = torch.rand(5, 2, generator=gen)
    with torch.no_grad():
        want = layer(x, index, routing)

    def linear(e: int, name: str, h: torch.Tensor) -> torch.Tensor:
        key = f"{prefix}.{e}.{name}"
        a = split[f"base_model.model.{key}.lora_A.weight"]
        b = split[f"base_model.model.{key}.lora_B.weight"]
        return h @ (weights[key + ".weight"] + 3.0 * b @ a).T  # scaling alpha / r = 3

    got = torch.zeros_like(x)
    for t in range(5):
        for k in range(2):
            e = int(index[t, k])
            h = torch.nn.functional.silu(linear(e, gate, x[t])) * linear(e, up, x[t])
            got[t] += routing[t, k] * linear(e, down, h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_per_expert_conversion_refuses_what_it_cannot_split(tmp_path) -> None:
    from conftest import tiny_tokenizer
    from lorakit.export.per_expert import convert_to_per_expert

    base_dir = tmp_path / "base"
    tiny_moe("gpt_oss").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    model = inject(tiny_moe("gpt_oss"), LoraConfig(r=2, alpha=4, target_modules="all-linear"))
    save_adapter(model, tmp_path / "fused")
    with pytest.raises(ValueError, match=r"knows the per-expert names of deepseek_v3, mixtral.*this base is 'gpt_oss'"):
        convert_to_per_expert(tmp_path / "fused", tmp_path / "split", model=str(base_dir))
    assert not (tmp_path / "split").exists()
    attention = inject(tiny_moe("qwen3_moe"), LoraConfig(r=2, alpha=4, target_modules=ATTENTION))
    save_adapter(attention, tmp_path / "attention")
    with pytest.raises(ValueError, match="adapts no fused expert parameters"):
        convert_to_per_expert(tmp_path / "attention", tmp_path / "split")
