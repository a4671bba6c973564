"""Every causal-LM family transformers ships that builds tiny: "all-linear" adapts every dense
linear layer (but the output head) and every fused expert parameter, forward and backward run,
and PEFT reads the saved file to the same logits."""

from __future__ import annotations

import copy
import logging
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig
from lorakit.adapters.experts import LoraExperts
from lorakit.adapters.files import save_adapter
from lorakit.adapters.inject import inject, lora_layers
from lorakit.adapters.layers import LoraLinear

SMALL = dict(
    hidden_size=32, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, vocab_size=128, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, d_model=32,
)
MAX_PARAMETERS = 5_000_000
PEFT_REMAPS = {"laguna"}
"""Families where PEFT's reading of transformers-4-era MoE adapters (it moves `mlp.gate_proj`-like
targets onto the fused experts) adapts more than the file holds; lorakit's own round trip is exact."""
MUST_BUILD = {"llama", "qwen3", "gpt2", "mistral", "qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe"}


def tiny_config(family: str):
    """The family's default config shrunk, or None when it does not build small."""
    try:
        config = AutoConfig.for_model(family)
        for key, value in SMALL.items():
            if isinstance(getattr(config, key, None), int) and not isinstance(getattr(config, key), bool):
                setattr(config, key, value)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:2]
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    if sum(p.numel() for p in shell.parameters()) > MAX_PARAMETERS:
        return None
    return config


def build(family: str):
    config = tiny_config(family)
    if config is None:
        return None
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        model(torch.randint(0, 100, (1, 5)))
    except Exception:
        return None
    return model


@pytest.fixture(scope="module")
def families() -> dict[str, nn.Module]:
    logging.disable(logging.WARNING)
    built = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
            model = build(family)
            if model is not None:
                built[family] = model
    logging.disable(logging.NOTSET)
    return built


def test_enough_families_build_tiny(families) -> None:
    assert MUST_BUILD <= set(families), sorted(MUST_BUILD - set(families))
    assert len(families) >= 60, len(families)


def unadapted(model: nn.Module) -> list[str]:
    """Linear layers (but the head) and 3-D parameters (experts) that carry no adapter."""
    head = model.get_output_embeddings()
    adapted = {n for n, _ in lora_layers(model)}
    missing = []
    for name, module in model.named_modules():
        if any(name == a or name.startswith(a + ".") for a in adapted):
            continue
        own_forward = isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and not isinstance(module, LoraLinear) \
                and not own_forward:  # a router or grouped linear computes more than x W^T: left alone
            missing.append(name)
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and not isinstance(module, (nn.Conv1d, nn.Conv2d)):
                missing.append(f"{name}.{pname}")
    return missing


def test_all_linear_covers_every_projection_and_peft_agrees(families, tmp_path) -> None:
    problems = {}
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for family, base in families.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_modules="all-linear"))
        except Exception as err:  # a refusal must name its reason
            problems[family] = f"inject: {err}"
            continue
        missing = unadapted(model)
        if missing:
            problems[family] = f"not adapted: {missing[:3]}"
            continue
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        try:
            out = model(ids).logits
            out.float().square().mean().backward()
        except Exception as err:
            problems[family] = f"forward/backward: {type(err).__name__}: {str(err)[:200]}"
            continue
        # Every expert adapter learns; a few dense layers of some families take no part in the
        # causal-LM forward of a short sequence (cross-attention, a long-context compressor), and neither
        # do their adapters.
        grads = [(n, p.grad is not None) for n, p in model.named_parameters() if p.requires_grad]
        if not all(ok for n, ok in grads if ".experts." in n) or sum(ok for _, ok in grads) < 0.5 * len(grads):
            problems[family] = "adapter weights got no gradient"
            continue
        directory = tmp_path / family
        save_adapter(model, directory)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
                their_out = theirs(ids).logits
        except Exception as err:
            problems[family] = f"PEFT cannot load the file: {str(err)[:300]}"
            continue
        error = (their_out - out.detach()).abs().max().item()
        if error > 1e-5 and family not in PEFT_REMAPS:
            problems[family] = f"PEFT logits differ by {error:.2e}"
        experts = sum(isinstance(layer, LoraExperts) for _, layer in lora_layers(model))
        if family in ("qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe") and not experts:
            problems[family] = "no experts adapted"
    for family, problem in sorted(problems.items()):
        print(f"{family}: {problem}")
    assert not problems, sorted(problems)


def test_grouped_experts_equal_each_family_own_forward(families, monkeypatch) -> None:
    """Where lorakit runs experts as grouped matmuls with the LoRA terms beside them, the result
    equals the module's own forward with the updated weights in place (the weight path)."""
    from lorakit.adapters import expert_grouped

    grouped, problems = [], {}
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    for family, base in families.items():
        if not any(expert_grouped.supports(m) for m in base.modules()):
            continue
        grouped.append(family)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
            out = model(ids).logits
            with monkeypatch.context() as patch:
                patch.setattr(expert_grouped, "supports", lambda module: False)  # the weight path
                reference = model(ids).logits
        if (error := (out - reference).abs().max().item()) > 1e-5:
            problems[family] = error
    assert {"qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe", "olmoe"} <= set(grouped), grouped
    assert not problems, problems
    print(f"grouped experts in {len(grouped)} families: {', '.join(grouped)}")
