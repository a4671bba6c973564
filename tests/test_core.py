"""Behaviour of the core API: targeting, adapters on one base, merge, files, errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from conftest import MODELS, example_input, run, tiny_llama, tiny_mlp
from lorakit.adapters.layers import LoraLayer

TARGETS = {
    "llama": ["q_proj", "v_proj", "gate_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "mlp": ["lin0", "lin1"],
}
EMBEDDING = {"llama": "embed_tokens", "gpt2": "wte", "mlp": "emb"}


def adapted(kind: str, seed: int = 3, **overrides) -> tuple[nn.Module, nn.Module]:
    """(base, base + adapter with non-zero random weights)."""
    base = MODELS[kind]()
    kwargs = dict(r=4, alpha=8, target_modules=TARGETS[kind] + [EMBEDDING[kind]])
    kwargs.update(overrides)
    model = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(**kwargs))
    randomise(model, seed)
    return base, model


def randomise(model: nn.Module, seed: int, name: str | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if (
                "lora_" in pname
                and "magnitude" not in pname
                and (name is None or f".{name}" in pname)
            ):
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def base_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=2.5), "r must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(init="xavier"), "init must be one of default, gaussian, pissa, olora"),
        (dict(target_modules=[]), "target_modules must be a non-empty list"),
        (dict(target_modules="q_proj("), "not a valid regex"),
        (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
        (dict(modules_to_save="lm_head"), "modules_to_save must be a list"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(**kwargs)


def test_config_round_trips_through_peft_dict() -> None:
    config = lorakit.LoraConfig(
        r=6, alpha=12, use_dora=True, rank_pattern={"q_proj": 2}, init="pissa"
    )
    again = lorakit.LoraConfig.from_peft_dict(config.to_peft_dict())
    assert again == config


# targeting ---------------------------------------------------------------------------


def test_nothing_matched_lists_candidates() -> None:
    with pytest.raises(
        ValueError, match=r"matched nothing; linear/embedding modules in this model: .*q_proj"
    ):
        lorakit.inject(tiny_llama(), lorakit.LoraConfig(target_modules=["query"]))


def test_unsupported_layer_type_is_named() -> None:
    with pytest.raises(ValueError, match="'relu', a ReLU"):
        lorakit.inject(tiny_mlp(), lorakit.LoraConfig(target_modules=["relu"]))


def test_all_linear_skips_output_head_and_exclude_applies() -> None:
    model = lorakit.inject(
        tiny_llama(), lorakit.LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"])
    )
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    # A plain module has no output head: every linear layer is adapted.
    mlp = lorakit.inject(tiny_mlp(), lorakit.LoraConfig(target_modules="all-linear"))
    assert {n for n, m in mlp.named_modules() if isinstance(m, LoraLayer)} == {
        "lin0",
        "lin1",
        "head",
    }


def test_regex_targets_full_match() -> None:
    model = lorakit.inject(
        tiny_llama(), lorakit.LoraConfig(target_modules=r".*\.1\.self_attn\.(q|k)_proj")
    )
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert wrapped == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]


def test_base_state_dict_keys_unchanged(model_kind: str) -> None:
    base, model = adapted(model_kind, modules_to_save=None)
    keys = {k for k in model.state_dict() if "lora_" not in k}
    assert keys == set(base.state_dict())
    # A base checkpoint loads into the adapted model as it is.
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys)


def test_inject_freezes_everything_but_adapters(model_kind: str) -> None:
    _, model = adapted(model_kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    count = lorakit.trainable_parameters(model)
    assert count.trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert count.total == sum(p.numel() for p in model.parameters())
    assert 0 < count.percent < 100 and "trainable%" in str(count)


# base untouched --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides", [{}, {"use_dora": True, "target_modules": None}, {"dropout": 0.2}]
)
def test_disabled_is_base_exactly_and_only_adapters_train(model_kind: str, overrides: dict) -> None:
    if overrides.get("target_modules", 1) is None:
        overrides = {**overrides, "target_modules": TARGETS[model_kind]}  # DoRA: linear layers only
    base, model = adapted(model_kind, **overrides)
    before = base_params(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = example_input(model_kind)
    for _ in range(3):
        run(model, model_kind, ids).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    after = base_params(model)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"{key} changed during training"
    with torch.no_grad():
        adapted_out = run(model, model_kind, ids)
        with lorakit.disable_adapters(model):
            disabled = run(model, model_kind, ids)
        expected = run(base, model_kind, ids)
    assert torch.equal(disabled, expected)
    assert not torch.allclose(adapted_out, expected, atol=1e-4)


def test_dropout_only_in_training_mode() -> None:
    _, model = adapted("llama", dropout=0.5)
    ids = example_input("llama")
    model.eval()
    assert torch.equal(run(model, "llama", ids), run(model, "llama", ids))
    model.train()
    assert not torch.allclose(run(model, "llama", ids), run(model, "llama", ids))


# merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("use_dora", [False, True])
def test_merged_equals_unmerged_and_unmerge_restores(
    model_kind: str, dtype, tol, use_dora: bool
) -> None:
    base = MODELS[model_kind](dtype=dtype)
    # GPT-2 ties its embedding to the output head: merging into it is refused (tested below).
    with_embedding = not use_dora and model_kind != "gpt2"
    targets = TARGETS[model_kind] + ([EMBEDDING[model_kind]] if with_embedding else [])
    model = lorakit.inject(
        copy.deepcopy(base),
        lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=use_dora),
    )
    randomise(model, 5)
    ids = example_input(model_kind)
    original = base_params(model)
    with torch.no_grad():
        unmerged = run(model, model_kind, ids)
        lorakit.merge(model)
        merged = run(model, model_kind, ids)
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=tol, rtol=tol)
    lorakit.unmerge(model)
    # fp32: exact up to fp32 rounding; bf16: within one bf16 rounding step of the weight.
    weight_tol = 1e-5 if dtype == torch.float32 else 2**-7
    for key, value in base_params(model).items():
        torch.testing.assert_close(
            value.float(), original[key].float(), atol=weight_tol, rtol=weight_tol
        )


def test_merge_into_tied_weight_is_refused() -> None:
    _, model = adapted("gpt2")
    before = base_params(model)
    with pytest.raises(
        ValueError,
        match=r"cannot merge into transformer\.wte\.weight: it is tied to lm_head\.weight",
    ):
        lorakit.merge(model)
    assert all(torch.equal(v, before[k]) for k, v in base_params(model).items())


def test_merge_and_unload_gives_plain_model(model_kind: str) -> None:
    base, model = adapted(
        model_kind,
        target_modules=TARGETS[model_kind]
        + ([EMBEDDING[model_kind]] if model_kind != "gpt2" else []),
    )
    ids = example_input(model_kind)
    with torch.no_grad():
        expected = run(model, model_kind, ids)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not hasattr(plain, "lora_state")
    with torch.no_grad():
        torch.testing.assert_close(run(plain, model_kind, ids), expected, atol=1e-5, rtol=1e-5)


def test_unload_gives_base_back() -> None:
    base, model = adapted("gpt2")
    plain = lorakit.unload(model)
    ids = example_input("gpt2")
    assert torch.equal(run(plain, "gpt2", ids), run(base, "gpt2", ids))


def test_safe_merge_refuses_nan_and_merges_nothing() -> None:
    _, model = adapted("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = base_params(model)
    with pytest.raises(
        ValueError,
        match=r"NaN/Inf into model\.layers\.1\.self_attn\.v_proj\.weight; nothing merged",
    ):
        lorakit.merge(model, safe=True)
    for key, value in base_params(model).items():
        assert torch.equal(value, before[key])


def test_disable_refuses_when_merged() -> None:
    _, model = adapted("llama")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="merged"):
        with lorakit.disable_adapters(model):
            pass


# many adapters ---------------------------------------------------------------------------


def test_add_switch_delete() -> None:
    base, model = adapted("llama")
    lorakit.add_adapter(
        model, "b", lorakit.LoraConfig(r=2, alpha=4, target_modules=["k_proj", "q_proj"])
    )
    randomise(model, 9, name="b")
    ids = example_input("llama")
    with torch.no_grad():
        out_default = run(model, "llama", ids)
        lorakit.set_adapter(model, "b")
        out_b = run(model, "llama", ids)
        assert not torch.allclose(out_default, out_b, atol=1e-4)
        # b alone on a fresh copy of the base equals b on the shared base.
        lorakit.delete_adapter(model, "default")
        torch.testing.assert_close(run(model, "llama", ids), out_b)
        assert lorakit.active_adapters(model) == ["b"]
        assert not any("default" in n for n, _ in model.named_parameters())
    with pytest.raises(KeyError, match="no adapter named 'default'; adapters on this model: b"):
        lorakit.set_adapter(model, "default")
    with pytest.raises(ValueError, match="already exists"):
        lorakit.add_adapter(model, "b", lorakit.LoraConfig(target_modules=["q_proj"]))


def test_several_active_adapters_sum_their_updates() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    x = torch.randn(3, 8)
    base_out = model(x).detach()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["0"]), "a")
    lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=3, alpha=6, target_modules=["0"]))
    randomise(model, 1)
    with torch.no_grad():
        lorakit.set_adapter(model, "a")
        delta_a = model(x) - base_out
        lorakit.set_adapter(model, "b")
        delta_b = model(x) - base_out
        lorakit.set_adapter(model, ["a", "b"])
        torch.testing.assert_close(model(x), base_out + delta_a + delta_b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_mixed_batch_rows_equal_each_row_alone(kind: str) -> None:
    base, model = adapted(kind)
    second = TARGETS[kind][:1] + [EMBEDDING[kind]]
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=7, alpha=3, target_modules=second))
    randomise(model, 11, name="other")
    names = ["default", None, "other", "default", "other", None]
    ids = example_input(kind, batch=len(names))
    with torch.no_grad():
        mixed = lorakit.forward_mixed(model, names, ids)
        mixed = mixed if isinstance(mixed, torch.Tensor) else mixed.logits
        with lorakit.disable_adapters(model):
            base_batch = run(model, kind, ids)
        for row, name in enumerate(names):
            if name is None:
                # Same batch, same kernels: a row without adapter is the base model bit for bit.
                assert torch.equal(mixed[row], base_batch[row])
            else:
                lorakit.set_adapter(model, name)
                alone = run(model, kind, ids[row : row + 1])
                torch.testing.assert_close(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_mixed_batch_unknown_adapter() -> None:
    _, model = adapted("llama")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        lorakit.forward_mixed(model, ["default", "nope"], example_input("llama"))


def test_mixed_delta_semantics() -> None:
    """y[i] = (x[i] @ A[idx[i]].T) @ B[idx[i]].T, checked against the loop it replaces."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=g)
    a = torch.randn(3, 4, 8, generator=g)
    b = torch.randn(3, 6, 4, generator=g)
    idx = torch.tensor([2, 0, 1, 2, 0])
    y = lorakit.lora_mixed_delta(x, a, b, idx)
    for i in range(5):
        torch.testing.assert_close(y[i], (x[i] @ a[idx[i]].T) @ b[idx[i]].T)


# modules_to_save ---------------------------------------------------------------------------


def test_modules_to_save_keeps_base_keys_and_trains_a_copy(tmp_path) -> None:
    base = tiny_llama()
    model = lorakit.inject(
        copy.deepcopy(base),
        lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    assert (
        "lm_head.weight" in model.state_dict()
        and "lm_head.modules_to_save.default.weight" in model.state_dict()
    )
    assert not model.lm_head.weight.requires_grad
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(2)
    ids = example_input("llama")
    lorakit.save_adapter(model, tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with torch.no_grad(), lorakit.disable_adapters(model):
        assert torch.equal(run(model, "llama", ids), run(base, "llama", ids))


# files --------------------------------------------------------------------------------------


def test_save_load_round_trip(model_kind: str, tmp_path) -> None:
    base, model = adapted(model_kind, use_rslora=True, rank_pattern={TARGETS[model_kind][0]: 2})
    lorakit.save_adapter(model, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = copy.deepcopy(base)
    assert lorakit.load_adapter(fresh, tmp_path / "a") == "default"
    ids = example_input(model_kind)
    with torch.no_grad():
        torch.testing.assert_close(
            run(fresh, model_kind, ids), run(model, model_kind, ids), atol=0, rtol=0
        )
    assert not any(p.requires_grad for p in fresh.parameters())
    # Loaded trainable, gradients reach the adapter only.
    again = copy.deepcopy(base)
    lorakit.load_adapter(again, tmp_path / "a", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


def test_second_adapter_loads_inactive(tmp_path) -> None:
    base, model = adapted("llama")
    lorakit.save_adapter(model, tmp_path / "a")
    target = copy.deepcopy(base)
    lorakit.load_adapter(target, tmp_path / "a", adapter_name="x")
    lorakit.load_adapter(target, tmp_path / "a", adapter_name="y")
    assert lorakit.active_adapters(target) == ["x"]
    with pytest.raises(ValueError, match="already loaded"):
        lorakit.load_adapter(target, tmp_path / "a", adapter_name="y")


def _corrupt(kind: str, directory) -> None:
    weights = directory / "adapter_model.safetensors"
    config_path = directory / "adapter_config.json"
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    if kind == "missing_key":
        del tensors[first]
        save_file(tensors, weights)
    elif kind == "unexpected_key":
        tensors["base_model.model.model.layers.0.mlp.bogus.lora_A.weight"] = torch.zeros(1)
        save_file(tensors, weights)
    elif kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif kind == "peft_type":
        config = json.loads(config_path.read_text())
        config["peft_type"] = "IA3"
        config_path.write_text(json.dumps(config))
    elif kind == "bad_json":
        config_path.write_text("{not json")
    elif kind == "missing_file":
        weights.unlink()


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing_key", r"adapter_model\.safetensors: missing"),
        ("unexpected_key", r"adapter_model\.safetensors: .*bogus"),
        ("truncated", r"adapter_model\.safetensors is truncated or corrupt"),
        ("peft_type", r"adapter_config\.json: peft_type 'IA3' is not supported"),
        ("bad_json", r"adapter_config\.json is not valid JSON"),
        ("missing_file", r"adapter_model\.safetensors is missing"),
        ("other_base", r"has shape .* this model needs .*different base model"),
    ],
)
def test_bad_adapter_file_raises_and_leaves_model_unchanged(
    kind: str, message: str, tmp_path
) -> None:
    _, source = adapted("llama")
    lorakit.save_adapter(source, tmp_path)
    _corrupt(kind, tmp_path)
    if kind == "other_base":
        from transformers import LlamaConfig, LlamaForCausalLM

        target = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=128,
                hidden_size=48,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).eval()
    else:
        target = tiny_llama(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    modules_before = [type(m) for m in target.modules()]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        lorakit.load_adapter(target, tmp_path)
    assert not hasattr(target, "lora_state")
    assert [type(m) for m in target.modules()] == modules_before
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_failed_load_keeps_existing_adapters(tmp_path) -> None:
    _, model = adapted("llama")
    lorakit.save_adapter(model, tmp_path / "good")
    lorakit.save_adapter(model, tmp_path / "bad")
    _corrupt("missing_key", tmp_path / "bad")
    ids = example_input("llama")
    with torch.no_grad():
        expected = run(model, "llama", ids)
    with pytest.raises(ValueError):
        lorakit.load_adapter(model, tmp_path / "bad", adapter_name="second")
    assert list(model.lora_state.configs) == ["default"]
    with torch.no_grad():
        assert torch.equal(run(model, "llama", ids), expected)


def test_save_leaves_no_temporary_files(tmp_path) -> None:
    _, model = adapted("mlp")
    lorakit.save_adapter(model, tmp_path)
    lorakit.save_adapter(model, tmp_path)  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] is None
    assert config["target_modules"] == ["emb", "lin0", "lin1"]


def test_pissa_adapter_reloads_on_original_base(tmp_path) -> None:
    base = tiny_llama()
    model = lorakit.inject(
        copy.deepcopy(base), lorakit.LoraConfig(r=4, target_modules=["q_proj"], init="pissa")
    )
    randomise(model, 4)
    lorakit.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    lorakit.load_adapter(fresh, tmp_path)
    ids = example_input("llama")
    with torch.no_grad():
        torch.testing.assert_close(
            run(fresh, "llama", ids), run(model, "llama", ids), atol=1e-5, rtol=1e-5
        )
