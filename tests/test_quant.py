"""QLoRA: a 4-bit / 8-bit base through bitsandbytes, checked against bitsandbytes itself."""

from __future__ import annotations

import copy
import sys
import warnings

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.adapters import qweights
from lorakit.adapters.layers import LoraLinear, RequantizationWarning
from lorakit.base import quant

bnb = qweights.bitsandbytes()
BF = bnb.functional


def _linears(model: nn.Module) -> dict[str, LoraLinear | nn.Linear]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, LoraLinear)) and "lora_" not in n and not n.endswith("lm_head")
    }


def _randomise_adapters(model: nn.Module, seed: int = 3, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * std)


def _dequantized_copy(model: nn.Module, reference: nn.Module) -> nn.Module:
    """`reference` (full precision) with every linear weight replaced by `model`'s dequantized one."""
    plain = copy.deepcopy(reference)
    quantized = _linears(model)
    with torch.no_grad():
        for name, module in _linears(plain).items():
            source = quantized[name]
            if qweights.kind_of(source.weight):
                module.weight.copy_(qweights.dequantize(source.weight, getattr(source, "_base_shell", [source])[0]))
    return plain


# the format ----------------------------------------------------------------------------------


def _nf4_reference_decode(codes: torch.Tensor, state, shape: tuple[int, int]) -> torch.Tensor:
    """NF4 decoded by hand: high nibble first, NF4 table, absmax = 8-bit code * second-level absmax + offset."""
    nibbles = torch.stack([codes.flatten() >> 4, codes.flatten() & 0xF], dim=1).flatten().long()
    values = state.code[nibbles]  # in [-1, 1]
    nested = state.state2
    blocks = state.absmax.numel()
    absmax = nested.code[state.absmax.long()] * nested.absmax.repeat_interleave(256)[:blocks] + state.offset
    return (values.view(-1, 64) * absmax.view(-1, 1)).view(shape)


def test_nf4_codes_and_values_match_bitsandbytes() -> None:
    torch.manual_seed(0)
    weight = torch.randn(96, 512)
    ours = qweights.quantize(weight, "nf4")
    codes, state = BF.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.data, codes)
    qs = ours.quant_state
    assert qs.blocksize == 64 and qs.quant_type == "nf4" and qs.nested and qs.state2.blocksize == 256
    assert torch.equal(qs.absmax, state.absmax) and torch.equal(qs.state2.absmax, state.state2.absmax)
    values = qweights.dequantize(ours)
    assert torch.equal(values, BF.dequantize_4bit(codes, state).float())
    # The format is what we say it is: decoded by hand from the documented layout.
    torch.testing.assert_close(values, _nf4_reference_decode(ours.data, qs, (96, 512)), rtol=1e-6, atol=1e-6)
    # NF4's 16 levels are the QLoRA paper's normal quantiles: 0, +-1 and 7 negative / 8 positive.
    assert qs.code.numel() == 16 and qs.code.min() == -1 and qs.code.max() == 1 and (qs.code == 0).sum() == 1
    # 4 bits: relative error of N(0, 1) weights near the known ~10%.
    assert 0.05 < float(torch.linalg.norm(values - weight) / torch.linalg.norm(weight)) < 0.15


def test_int8_codes_match_bitsandbytes() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64)
    ours = qweights.quantize(weight, "int8")
    codes, scales, _ = BF.int8_vectorwise_quant(weight.half())
    assert ours.dtype == torch.int8 and torch.equal(ours.data, codes) and torch.equal(ours.SCB, scales)
    expected = codes.float() * scales.view(-1, 1) / 127
    torch.testing.assert_close(qweights.dequantize(ours), expected)


def test_quantize_model_layers_hold_bitsandbytes_codes() -> None:
    reference = tiny_llama()
    model = quant.quantize_model(tiny_llama(), "nf4")
    for name, module in _linears(model).items():
        assert isinstance(module, bnb.nn.Linear4bit), name
        codes, _ = BF.quantize_4bit(
            _linears(reference)[name].weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(module.weight.data, codes), name
        assert not module.weight.requires_grad
    assert type(model.lm_head) is nn.Linear, "the output head stays full precision unless asked"
    quant.quantize_model(model, "nf4", include_head=True)
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)


# QLoRA == LoRA on the dequantized weights -----------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_forward_and_grads_equal_lora_on_dequantized_base(kind: str) -> None:
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    reference = tiny_llama()
    qmodel = quant.quantize_model(tiny_llama(), kind)
    lorakit.inject(qmodel, config)
    _randomise_adapters(qmodel)
    plain = _dequantized_copy(qmodel, reference)
    lorakit.inject(plain, config)
    plain.load_state_dict({k: v for k, v in qmodel.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    q_out, p_out = qmodel(ids, labels=ids), plain(ids, labels=ids)
    # int8 inference also rounds the activations to int8 (LLM.int8()), hence its looser bound.
    atol = 1e-4 if kind == "nf4" else 5e-2
    torch.testing.assert_close(q_out.logits, p_out.logits, atol=atol, rtol=0)
    q_out.loss.backward()
    p_out.loss.backward()
    q_grads = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    p_grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert q_grads.keys() == p_grads.keys() and len(q_grads) == 4 * 7
    for name, grad in q_grads.items():
        torch.testing.assert_close(grad, p_grads[name], atol=1e-4 if kind == "nf4" else 2e-2, rtol=1e-3 if kind == "nf4" else 0.1)


def test_qlora_compute_dtype_bf16() -> None:
    reference = tiny_llama()
    model = quant.quantize_model(tiny_llama(), "nf4", compute_dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 5))
    plain = _dequantized_copy(model, reference)
    out = model(ids).logits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, plain(ids).logits, atol=0.05, rtol=0)


def test_training_on_4bit_base_lowers_loss_and_keeps_the_base() -> None:
    model = quant.quantize_model(tiny_llama(), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    codes = {n: m.weight.data.clone() for n, m in _linears(model).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, losses
    for name, module in _linears(model).items():
        assert torch.equal(module.weight.data, codes[name]), f"{name}: the 4-bit base changed"
    report = quant.memory_report(model, optimizer)
    assert report.quantized == "nf4"
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    # AdamW: exp_avg and exp_avg_sq like each parameter, plus a 4-byte step count per tensor.
    assert report.optimizer_bytes == 2 * report.adapter_bytes + 4 * tensors
    assert "memory: base" in str(report) and report.peak_bytes > 0


# adapters travel between the 4-bit and the full-precision base ---------------------------------


def test_adapter_moves_between_4bit_and_full_precision_base(tmp_path) -> None:
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    qmodel = quant.quantize_model(tiny_llama(), "nf4")
    lorakit.inject(qmodel, config)
    _randomise_adapters(qmodel, seed=5)
    lorakit.save_adapter(qmodel, tmp_path / "from4bit")
    with torch.no_grad():
        q_logits = qmodel(ids).logits

    full = tiny_llama()
    lorakit.load_adapter(full, tmp_path / "from4bit")
    for name, param in qmodel.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, full.get_parameter(name)), name
    # On the dequantized base the full-precision model reproduces the 4-bit run.
    dq = _dequantized_copy(qmodel, tiny_llama())
    lorakit.load_adapter(dq, tmp_path / "from4bit")
    with torch.no_grad():
        torch.testing.assert_close(dq(ids).logits, q_logits, atol=1e-4, rtol=0)
        # ... and differs from the full-precision base's output only by quantization noise.
        assert (full(ids).logits - q_logits).abs().max() < 0.5

    # The reverse: an adapter trained in full precision loads on a 4-bit base.
    lorakit.save_adapter(full, tmp_path / "fromfull")
    q2 = quant.quantize_model(tiny_llama(), "nf4")
    lorakit.load_adapter(q2, tmp_path / "fromfull")
    assert isinstance(q2.model.layers[0].self_attn.q_proj, LoraLinear)
    assert q2.model.layers[0].self_attn.q_proj.quantized == "nf4"
    with torch.no_grad():
        torch.testing.assert_close(q2(ids).logits, q_logits, atol=1e-5, rtol=0)


def test_transformers_bitsandbytes_model_takes_adapters(tiny_model_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config, device_map="cpu")
    ours = quant.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "nf4")
    for name, module in _linears(ours).items():
        assert torch.equal(_linears(hf)[name].weight.data, module.weight.data), name
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    lorakit.inject(ours, config)
    _randomise_adapters(ours)
    lorakit.save_adapter(ours, tmp_path / "a")
    lorakit.load_adapter(hf, tmp_path / "a")
    assert hf.model.layers[1].mlp.down_proj.quantized == "nf4"
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-5, rtol=0)


# loading layer by layer ------------------------------------------------------------------------


def test_load_quantized_equals_quantize_after_loading(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM

    streamed = quant.load_quantized(tiny_model_dir, "nf4")
    loaded = quant.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), "nf4")
    for name, module in _linears(loaded).items():
        assert torch.equal(_linears(streamed)[name].weight.data, module.weight.data), name
    assert not any(t.device.type == "meta" for t in [*streamed.parameters(), *streamed.buffers()])
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, loaded(ids).logits, atol=0, rtol=0)


def test_bundled_default_nf4_linear_bytes_under_35_percent() -> None:
    from lorakit.base.models import default_model_path

    model = quant.load_quantized(default_model_path(), "nf4")
    stored, fp32 = quant.linear_weight_bytes(model)
    assert fp32 > 300 * 2**20  # SmolLM2-135M's ~106M linear weights
    assert stored < 0.35 * fp32, (stored, fp32)
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in _linears(model).values())


# merging -----------------------------------------------------------------------------------------


def _qlora(kind: str = "nf4") -> tuple[nn.Module, torch.Tensor]:
    model = quant.quantize_model(tiny_llama(), kind)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _randomise_adapters(model, std=0.3)
    return model, torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(6))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_and_dequantize_is_exact_up_to_the_final_rounding(dtype: torch.dtype) -> None:
    model, ids = _qlora()
    layer = model.model.layers[0].self_attn.v_proj
    expected = (qweights.dequantize(layer.weight) + layer.delta_oi("default")).to(dtype)
    with torch.no_grad():
        before = model(ids).logits
    merged = quant.merge_and_dequantize(model, dtype)
    assert type(merged.model.layers[0].self_attn.v_proj) is nn.Linear
    assert torch.equal(merged.model.layers[0].self_attn.v_proj.weight, expected)
    assert not any(qweights.kind_of(p) for p in merged.parameters())
    assert not hasattr(merged, "lora_state")
    if dtype == torch.float32:
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, before, atol=1e-4, rtol=0)


def test_merge_requantized_warns_with_the_error_and_matches_bitsandbytes() -> None:
    model, ids = _qlora()
    layer = model.model.layers[1].mlp.up_proj
    exact = qweights.dequantize(layer.weight) + layer.delta_oi("default")
    with pytest.warns(RequantizationWarning, match="relative error up to"):
        errors = quant.merge_requantized(model)
    assert len(errors) == 14
    codes, state = BF.quantize_4bit(exact, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert layer.quantized == "nf4" and torch.equal(layer.weight.data, codes)
    expected_error = torch.linalg.norm(BF.dequantize_4bit(codes, state) - exact) / torch.linalg.norm(exact)
    assert errors["model.layers.1.mlp.up_proj"] == pytest.approx(float(expected_error), rel=1e-5)
    # A direct lorakit.merge on a quantized base warns too (per layer), and unmerge gets close again.
    model2, _ = _qlora()
    with pytest.warns(RequantizationWarning, match="requantized a nf4 base"):
        lorakit.merge(model2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        lorakit.unmerge(model2)
    assert model2.model.layers[0].self_attn.q_proj.quantized == "nf4"


def test_merge_and_dequantize_int8() -> None:
    model, _ = _qlora("int8")
    layer = model.model.layers[0].mlp.gate_proj
    expected = qweights.dequantize(layer.weight, layer._base_shell[0]) + layer.delta_oi("default")
    merged = quant.merge_and_dequantize(model, torch.float32)
    assert torch.equal(merged.model.layers[0].mlp.gate_proj.weight, expected)


# LoftQ -------------------------------------------------------------------------------------------


def test_loftq_approximates_the_weight_better_than_nf4_alone() -> None:
    reference = tiny_llama()
    for iters in (1, 4):
        model = tiny_llama()
        lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, target_modules="all-linear", init="loftq", loftq_iters=iters))
        for name, module in _linears(model).items():
            weight = _linears(reference)[name].weight.detach()
            plain_nf4 = qweights.dequantize(qweights.quantize(weight, "nf4"))
            assert module.quantized == "nf4"
            loftq = module.base_weight_oi() + module.delta_oi("default")
            assert torch.linalg.norm(weight - loftq) < 0.8 * torch.linalg.norm(weight - plain_nf4), name
            if iters == 1:  # the base is exactly the plain NF4 base, so the adapter loads on --quantize nf4
                assert torch.equal(module.base_weight_oi(), plain_nf4)
    with pytest.raises(ValueError, match="full-precision"):
        lorakit.inject(quant.quantize_model(tiny_llama(), "nf4"), lorakit.LoraConfig(init="loftq"))
    data = lorakit.LoraConfig(init="loftq", loftq_iters=3).to_peft_dict()
    assert data["init_lora_weights"] == "loftq" and data["loftq_config"]["loftq_iter"] == 3
    assert lorakit.LoraConfig.from_peft_dict(data).loftq_iters == 3


# errors ------------------------------------------------------------------------------------------


def test_clear_error_where_bitsandbytes_cannot_serve(monkeypatch) -> None:
    with pytest.raises(quant.QuantizationUnavailable, match="cannot run nf4 layers on device meta"):
        quant.check_available("nf4", "meta")
    with pytest.raises(ValueError, match="quantize must be one of nf4, int8, got 'nf3'"):
        quant.quantize_model(tiny_llama(), "nf3")
    # A platform without a bitsandbytes build: the import itself fails.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(quant.QuantizationUnavailable, match="need bitsandbytes, which cannot be imported"):
        quant.quantize_model(tiny_llama(), "nf4")


# the command line ----------------------------------------------------------------------------------


def test_cli_train_eval_generate_with_nf4_base(tmp_path, tiny_model_dir, capsys) -> None:
    import json
    import random

    from lorakit.cli import main

    rng = random.Random(0)
    rows = []
    for _ in range(32):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}"}, {"role": "assistant", "content": str(a + b)}]})
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--quantize", "nf4", "--device", "cpu"]
    rc = main(["train", "--data", str(data), "--output", str(out), "--rank", "8", "--alpha", "16", "--lr", "3e-2",
               "--batch-size", "8", "--max-steps", "12", "--log-every", "4", "--seq-len", "64", *common])
    assert rc == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert metrics[0]["mem_base_format"] == "nf4"
    assert 0 < metrics[0]["mem_adapter_bytes"] and metrics[0]["mem_optimizer_bytes"] > metrics[0]["mem_adapter_bytes"]
    assert "memory: base" in capsys.readouterr().err

    losses = {}
    for adapter in ([], ["--adapter", str(out)]):
        assert main(["eval", "--data", str(data), "--seq-len", "64", *adapter, *common]) == 0
        losses[bool(adapter)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert losses[True] < losses[False] - 0.1
    assert main(["generate", "--prompt", "1+2", "--max-new-tokens", "3", "--adapter", str(out), *common]) == 0
    # A 4-bit option the library cannot serve is a one-line error, not a traceback.
    assert main(["eval", "--data", str(data), "--model", str(tiny_model_dir), "--quantize", "nf4", "--device", "meta"]) == 1
    assert "cannot run nf4 layers on device meta" in capsys.readouterr().err


def test_qlora_matches_peft_on_a_bitsandbytes_base(tiny_model_dir, tmp_path) -> None:
    """PEFT's LoRA over bitsandbytes' Linear4bit (the reference QLoRA stack): same logits and gradients."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
        tiny_model_dir, quantization_config=bnb_config, device_map="cpu"
    )
    torch.manual_seed(0)
    peft_model = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load()
    lorakit.load_adapter(ours, tmp_path / "peft", trainable=True)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    peft_model.train()
    ours.train()
    ref, got = peft_model(ids, labels=ids), ours(ids, labels=ids)
    torch.testing.assert_close(got.logits, ref.logits, atol=1e-6, rtol=0)
    ref.loss.backward()
    got.loss.backward()
    ref_grads = {n.removeprefix("base_model.model."): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    got_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ref_grads.keys() == got_grads.keys() and len(got_grads) == 28
    for name, grad in got_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5)


def test_quantize_after_inject_and_dora_on_a_4bit_base() -> None:
    """Quantizing works on a model that already has adapters; DoRA reads the dequantized base."""
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True)
    reference = tiny_llama()
    model = tiny_llama()
    lorakit.inject(model, config)
    _randomise_adapters(model, seed=8, std=0.1)
    quant.quantize_model(model, "nf4")
    assert all(m.quantized == "nf4" for m in _linears(model).values())
    plain = _dequantized_copy(model, reference)
    lorakit.inject(plain, config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-4, rtol=0)


def test_mixed_batch_on_a_4bit_base_equals_one_adapter_per_forward() -> None:
    """What the server runs: rows with different adapters (or none) over one NF4 base."""
    model = quant.quantize_model(tiny_llama(), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _randomise_adapters(model, seed=11)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(12))
    names = ["default", "other", None]
    with torch.no_grad():
        mixed = lorakit.forward_mixed(model, names, ids).logits
        for row, name in enumerate(names):
            if name is None:
                with lorakit.disable_adapters(model):
                    single = model(ids[row : row + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                single = model(ids[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], single, atol=1e-5, rtol=0)


def test_unmappable_checkpoint_falls_back_to_load_then_quantize(tiny_model_dir) -> None:
    from safetensors.torch import load_file, save_file

    from lorakit.base.models import load_model

    file = tiny_model_dir / "model.safetensors"
    tensors = load_file(str(file))
    tensors["model.legacy_block.weight"] = torch.zeros(2)  # a name transformers' loader would drop or rename
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(quant.CheckpointLayoutError, match="model.legacy_block.weight"):
        quant.load_quantized(tiny_model_dir, "nf4")
    with pytest.warns(UserWarning, match="loading in full precision first"):
        model, _ = load_model(str(tiny_model_dir), device="cpu", quantize="nf4")
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in _linears(model).values())


_PEAK_PROBE = """
import json, sys
from lorakit.base import quant
from lorakit.base.models import default_model_path

def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))

path = default_model_path()
quant.qweights.bitsandbytes()
before = hwm()
model = quant.load_quantized(path, "nf4")
print(json.dumps({"growth": hwm() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_layer_by_layer_load_peaks_far_below_full_precision() -> None:
    """Loading the bundled default in NF4 grows the process's peak memory by well under its fp32 size."""
    import json
    import subprocess

    from lorakit.base.models import default_model_path

    fp32_bytes = (default_model_path() / "model.safetensors").stat().st_size
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, check=True)
    growth = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    # Quantized linears (~55 MB) + the fp32 embedding (~113 MB) + one layer in flight.
    assert growth < 0.5 * fp32_bytes, (growth, fp32_bytes)
