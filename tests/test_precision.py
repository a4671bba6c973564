"""Mixed precision on the CPU: when bf16 is chosen, and fp32 attention inside a bf16 model."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lorakit.train import precision
from lorakit.train.precision import attention_in_fp32, autocast_dtype_for, cpu_has_native_bf16

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
