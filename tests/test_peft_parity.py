"""Forward, gradient and file parity with PEFT over a table of models x configs."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit
from conftest import MODELS, example_input, run

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "mlp": ["lin0", "lin1"],
}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "mlp": "emb"}

# name -> (lorakit kwargs, PEFT kwargs) built per model kind
CASES = {
    "r4": lambda k: dict(r=4, alpha=8, target_modules=TARGETS[k]),
    "r8_rslora": lambda k: dict(r=8, alpha=16, target_modules=TARGETS[k], use_rslora=True),
    "dora": lambda k: dict(r=4, alpha=4, target_modules=TARGETS[k], use_dora=True),
    "patterns": lambda k: dict(
        r=4,
        alpha=8,
        target_modules=TARGETS[k],
        rank_pattern={TARGETS[k][0]: 2},
        alpha_pattern={TARGETS[k][-1]: 3.0},
    ),
    "embedding": lambda k: dict(r=4, alpha=8, target_modules=[EMBEDDING[k], TARGETS[k][0]]),
    "all_linear": lambda k: dict(r=4, alpha=8, target_modules="all-linear"),
}

DTYPES = {"fp32": (torch.float32, 1e-5), "bf16": (torch.bfloat16, 2e-2)}


def peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        target_modules=kwargs["target_modules"],
        use_rslora=kwargs.get("use_rslora", False),
        use_dora=kwargs.get("use_dora", False),
        rank_pattern=kwargs.get("rank_pattern") or {},
        alpha_pattern=kwargs.get("alpha_pattern") or {},
        init_lora_weights=True,
    )


def peft_to_lorakit_key(key: str) -> str:
    key = key.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return key.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")


def randomise_adapters(model: torch.nn.Module, seed: int = 3) -> None:
    """Non-zero B (and A for embeddings) so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                param.copy_(torch.randn(param.shape, generator=g).to(param.dtype) * 0.3)


def paired_models(kind: str, case: str, dtype: torch.dtype):
    kwargs = CASES[case](kind)
    base = MODELS[kind](dtype=dtype)
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kwargs))
    randomise_adapters(theirs)
    # Copy PEFT's adapter weights into ours by name: both trees name them alike.
    ours_params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                ours_params[peft_to_lorakit_key(name)].copy_(param)
                copied += 1
    assert copied == sum(1 for n, _ in ours.named_parameters() if "lora_" in n)
    return base, ours, theirs


# PEFT's all-linear needs a transformers model; lorakit's on a plain MLP is tested in test_core.py.
PAIRS = [
    (kind, case)
    for kind in sorted(MODELS)
    for case in sorted(CASES)
    if (kind, case) != ("mlp", "all_linear")
]


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize(("model_kind", "case"), PAIRS)
def test_forward_and_gradients_match_peft(model_kind: str, case: str, dtype_name: str) -> None:
    dtype, tol = DTYPES[dtype_name]
    _, ours, theirs = paired_models(model_kind, case, dtype)
    ids = example_input(model_kind)
    out_ours, out_theirs = run(ours, model_kind, ids), run(theirs, model_kind, ids)
    torch.testing.assert_close(out_ours, out_theirs, atol=tol, rtol=tol)
    out_ours.float().pow(2).mean().backward()
    out_theirs.float().pow(2).mean().backward()
    ours_params = dict(ours.named_parameters())
    checked = 0
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            mine = ours_params[peft_to_lorakit_key(name)]
            assert mine.requires_grad, name
            torch.testing.assert_close(mine.grad, param.grad, atol=tol * 10, rtol=tol * 10)
            checked += 1
    assert checked > 0
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        peft_to_lorakit_key(n) for n, p in theirs.named_parameters() if p.requires_grad
    }


@pytest.mark.parametrize("case", ["r4", "dora", "embedding", "patterns"])
def test_lorakit_file_loads_in_peft(model_kind: str, case: str, tmp_path) -> None:
    base, ours, _ = paired_models(model_kind, case, torch.float32)
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "a"))
    ids = example_input(model_kind)
    expected = run(ours, model_kind, ids)
    torch.testing.assert_close(run(theirs, model_kind, ids), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(run(base, model_kind, ids), expected, atol=1e-3)


@pytest.mark.parametrize(("model_kind", "case"), [p for p in PAIRS if p[1] != "r8_rslora"])
def test_peft_file_loads_in_lorakit(model_kind: str, case: str, tmp_path) -> None:
    base, _, theirs = paired_models(model_kind, case, torch.float32)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "p")
    ids = example_input(model_kind)
    torch.testing.assert_close(
        run(ours, model_kind, ids), run(theirs, model_kind, ids), atol=1e-5, rtol=1e-5
    )


def test_modules_to_save_interop_with_peft(tmp_path) -> None:
    base = MODELS["llama"]()
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    randomise_adapters(theirs)
    with torch.no_grad():
        theirs.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "p")
    ids = example_input("llama")
    expected = run(theirs, "llama", ids)
    torch.testing.assert_close(run(ours, "llama", ids), expected, atol=1e-5, rtol=1e-5)
    # ... and back: our file loads in PEFT with the same logits.
    lorakit.save_adapter(ours, tmp_path / "back")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "back"))
    torch.testing.assert_close(run(again, "llama", ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init: str) -> None:
    base = MODELS["llama"]()
    ours = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init=init)
    )
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init),
    )
    ours_params = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if "lora_" in name or name.endswith("q_proj.base_layer.weight"):
            torch.testing.assert_close(
                ours_params[peft_to_lorakit_key(name)], param, atol=1e-5, rtol=1e-4
            )
    ids = example_input("llama")
    # The residual base plus the adapter is the original model at step 0.
    torch.testing.assert_close(
        run(ours, "llama", ids), run(base, "llama", ids), atol=1e-4, rtol=1e-4
    )
