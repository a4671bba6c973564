"""DPO and ORPO through the GPU fast path's fused pieces, checked on the CPU (fp64).

The fast path scores chosen and rejected sequences with `linear_token_logps` (the fused
chunked head, one log-probability per supervised token) after the fused decoder layers;
the preference loss, its rewards and the adapter gradients must equal the generic path's
(transformers' forward), which tests/test_objectives.py holds equal to TRL's trainers.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from conftest import tiny_llama_for_tokenizer
from lorakit.data.pairs import collate_pairs, tokenize_pair
from lorakit.data.sft import Row
from lorakit.train.fastpath import FastPathConfig, enable_fast_path, fused_token_logps
from lorakit.train.fastpath.loss import linear_token_logps, linear_token_logps_reference
from lorakit.train.objectives.preference import (
    REFERENCE_ADAPTER,
    PreferenceConfig,
    PreferenceLoss,
    stats_record,
)

ROWS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    {"prompt": "10+5=", "chosen": "15", "rejected": "51 x"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "fourteen"},
]


@pytest.mark.parametrize("chunk", [3, 64])
def test_linear_token_logps_values_and_gradients(chunk) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(20, 8, generator=g, dtype=torch.float64)
    target = torch.randint(0, 20, (10,), generator=g)
    upstream = torch.randn(10, generator=g, dtype=torch.float64)  # a different weight per row
    got = linear_token_logps(h, weight, target, chunk)
    (dh,) = torch.autograd.grad((got * upstream).sum(), h)
    h_ref = h.detach().clone().requires_grad_(True)
    want = linear_token_logps_reference(h_ref, weight, target)
    (dh_ref,) = torch.autograd.grad((want * upstream).sum(), h_ref)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-12, atol=1e-12)


def test_linear_token_logps_refuses_a_trained_head() -> None:
    weight = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(ValueError, match="frozen output head"):
        linear_token_logps(torch.randn(3, 4), weight, torch.tensor([0, 1, 2]))


def _models(reference: str):
    """The same adapted tiny model twice (fp64): one on the generic path, one with the fast path."""
    model, tok = tiny_llama_for_tokenizer()
    model = model.double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
    if reference == "init":  # a frozen copy of the starting adapter, then the policy moves on
        lorakit.add_adapter(model, REFERENCE_ADAPTER, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if f".{REFERENCE_ADAPTER}." in name:
                    param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
                    param.requires_grad_(False)
        lorakit.set_adapter(model, "default")
    generic = copy.deepcopy(model).train()
    fast = model.train()
    assert enable_fast_path(fast, FastPathConfig(recompute="all", keep_layers=1)).enabled
    batch = collate_pairs([tokenize_pair(Row(r, "rows", i + 1), tok) for i, r in enumerate(ROWS)], tok.pad_token_id)
    return generic, fast, batch


def _step(model, batch, config: PreferenceConfig):
    model.zero_grad(set_to_none=True)
    module = PreferenceLoss(model, config)
    loss = module(batch) / (batch["input_ids"].shape[0] // 2)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), stats_record(module.pop_stats()), grads


@pytest.mark.parametrize(("objective", "reference"), [("dpo", "base"), ("dpo", "init"), ("orpo", "base")])
def test_preference_loss_on_the_fast_path_equals_the_generic_path(objective, reference, monkeypatch) -> None:
    generic, fast, batch = _models(reference)
    config = PreferenceConfig(objective, 0.3, 0.0, reference)
    if objective == "orpo":
        batch = dict(batch, nll_scale=torch.tensor(0.25, dtype=torch.float64))
    calls = []
    import lorakit.train.fastpath as kernels

    original = kernels.causal_lm_token_logps
    monkeypatch.setattr(kernels, "causal_lm_token_logps", lambda *a, **k: calls.append(1) or original(*a, **k))
    want = _step(generic, batch, config)
    assert not calls  # the generic model never enters the fused path
    got = _step(fast, batch, config)
    assert len(calls) == (2 if objective == "dpo" else 1)  # the policy and, for DPO, the reference pass
    # fp64 on both sides; the fast path's other tests hold it to the generic path at 1e-6 too
    # (transformers' rotary embedding is computed in fp32 inside either forward)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for name, value in want[1].items():
        assert got[1][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name  # rewards: differences of logps
    assert abs(want[1]["rewards/margins"]) > 1e-3  # the policy is away from its reference
    assert got[2].keys() == want[2].keys() and got[2]
    for name in want[2]:  # relative to each gradient's norm: fp32 RoPE leaves about 1e-5 here
        err = float((got[2][name] - want[2][name]).norm() / want[2][name].norm())
        assert err < 5e-5, (name, err)


def test_fused_token_logps_steps_aside_for_a_trained_head() -> None:
    _, fast, batch = _models("base")
    fast.lm_head.weight.requires_grad_(True)
    assert fused_token_logps(fast, batch["input_ids"], batch["labels"], batch["position_ids"]) is None
    fast.lm_head.weight.requires_grad_(False)
    out = fused_token_logps(fast, batch["input_ids"], batch["labels"], batch["position_ids"])
    assert out is not None and out.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1)
