"""Mixed precision on the CPU: when bf16 is chosen, and that its two shortcuts change no arithmetic."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_gpt2, tiny_llama
from lorakit import precision
from lorakit.precision import (
    attention_in_fp32,
    autocast_dtype_for,
    cpu_has_native_bf16,
    frozen_weights_as,
)
from lorakit.train import compute_loss

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
SKYLAKE = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "Features\t: fp asimd sve bf16 i8mm\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(ZEN4)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert cpu_has_native_bf16(GRAVITON3)
    assert not cpu_has_native_bf16(SKYLAKE)
    assert not cpu_has_native_bf16("")


def test_auto_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype_for("fp32", cpu) is None
    assert autocast_dtype_for("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype_for("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert autocast_dtype_for("auto", cpu) is None
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        autocast_dtype_for("fp16", cpu)


def adapted(model_fn, **kwargs):
    model = model_fn(**kwargs)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # B = 0 would hide the LoRA path in the gradients
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


def batch(seed: int = 0, rows: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (rows, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq).expand(rows, seq)}


def loss_and_grads(model, data, swap: bool):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # GPT-2's dropout draws the same masks in both runs
    with frozen_weights_as(model, torch.bfloat16 if swap else None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = compute_loss(model, data)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_casting_frozen_weights_once_changes_nothing_under_autocast(model_fn):
    model = adapted(model_fn)
    data = batch()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    ref_loss, ref_grads = loss_and_grads(model, data, swap=False)
    loss, grads = loss_and_grads(model, data, swap=True)
    # autocast would round the same fp32 weights to the same bf16 values for every matmul
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    for name, p in model.named_parameters():  # the very same fp32 parameters are back
        original, values = before[name]
        assert p is original and p.dtype == values.dtype and torch.equal(p, values), name


def test_only_frozen_matmul_weights_are_cast_and_an_error_restores_them():
    model = adapted(tiny_llama)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied head: the lookup must stay fp32
    originals = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="interrupted"):
        with frozen_weights_as(model, torch.bfloat16) as count:
            inside = dict(model.named_parameters())
            raise RuntimeError("interrupted")
    linears = [n for n in inside if n.endswith("proj.weight")]
    assert count == len(linears) == 2 * 7
    for name, p in inside.items():
        expect = torch.bfloat16 if name in linears else torch.float32
        assert p.dtype == expect, name
    assert dict(model.named_parameters()) == originals  # same objects back after the error


def test_fp32_attention_equals_sdpa_and_keeps_masks():
    model = tiny_llama()
    reference = tiny_llama()
    assert attention_in_fp32(model)
    assert model.config._attn_implementation == precision.FP32_ATTENTION
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: the mask must still reach attention
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                   reference(ids, attention_mask=mask).logits, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(ids, attention_mask=mask).logits.float()
    exact = reference(ids, attention_mask=mask).logits
    torch.testing.assert_close(mixed[mask.bool()], exact[mask.bool()], rtol=0.05, atol=0.05)


def test_fp32_attention_leaves_other_implementations_alone():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not attention_in_fp32(model)
    assert model.config._attn_implementation == "eager"
