"""DPO and ORPO: loss, rewards and gradients against TRL's trainers; the reference is the base.

TRL is the reference implementation (a test-time dependency only): its DPOTrainer and
ORPOTrainer are built on the same tiny model, batch and adapter (PEFT), and their losses,
logged rewards and adapter gradients must equal lorakit's in fp32.
"""

from __future__ import annotations

import gc
import json

import datasets
import peft
import pytest
import torch
import trl  # noqa: F401  (the reference; a test-time dependency)

import lorakit
from conftest import tiny_llama_for_tokenizer
from lorakit.data.pairs import collate_pairs, tokenize_pair
from lorakit.data.sft import IGNORE, Row
from lorakit.train.objectives.preference import (
    PreferenceConfig,
    PreferenceLoss,
    reference_mode,
    sequence_logps,
    stats_record,
)

ROWS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "4"},
    {"prompt": "10+5=", "chosen": "15", "rejected": "51 x"},
    {"prompt": "7+7=", "chosen": "14", "rejected": "fourteen"},
]


def peft_key(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def lora_grads(model, adapter: str = "default", peft_names: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in model.named_parameters():
        if f".{adapter}." in name and "lora_" in name:
            assert param.grad is not None, name
            out[peft_key(name) if peft_names else name] = param.grad.detach().clone()
    return out


def trl_batch_to_lorakit(batch: dict) -> dict[str, torch.Tensor]:
    """DPOTrainer's collated batch ([chosen; rejected], completion_mask) in lorakit's form."""
    ids = batch["input_ids"]
    labels = torch.where(batch["completion_mask"].bool(), ids, torch.full_like(ids, IGNORE))
    positions = torch.arange(ids.shape[1]).expand_as(ids).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def dpo_trainer(tmp_path, model, beta: float, peft_config=None, rpo_alpha: float | None = None):
    """TRL's DPOTrainer; with `rpo_alpha`, RPO as TRL spells it now: the "sigmoid" and "sft" loss
    types weighted 1 and rpo_alpha (what `DPOConfig(rpo_alpha=...)` was)."""
    from trl import DPOConfig, DPOTrainer

    losses = {} if rpo_alpha is None else {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, rpo_alpha]}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(ROWS),
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", gradient_checkpointing=False,
                     **losses)
    return DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                      processing_class=tiny_llama_for_tokenizer()[1], peft_config=peft_config)


def trl_step(trainer, batch) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return float(loss), metrics, lora_grads(trainer.model, peft_names=True)


def lorakit_step(model, batch, config: PreferenceConfig) -> tuple[float, dict[str, float], dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    module = PreferenceLoss(model, config)
    pairs = batch["input_ids"].shape[0] // 2
    loss = module(batch) / pairs
    loss.backward()
    return float(loss), stats_record(module.pop_stats()), lora_grads(model)


def assert_same(ours, theirs, names=("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                     "logps/chosen", "logps/rejected")) -> None:
    loss, metrics, grads = ours
    ref_loss, ref_metrics, ref_grads = theirs
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    for name in names:
        assert metrics[name] == pytest.approx(ref_metrics[name], rel=1e-4, abs=1e-6), name
    assert grads.keys() == ref_grads.keys()
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-4, atol=1e-7, msg=key)
    assert any(g.abs().sum() > 0 for g in grads.values())


def randomise(model, adapter: str, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and f".{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=g) * scale)


def test_tokenized_pairs_equal_trl_dpo_tokenization(tmp_path):
    trainer = dpo_trainer(tmp_path, tiny_llama_for_tokenizer()[0], 0.1,
                          peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    trl_batch = trl_batch_to_lorakit(trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))]))
    tok = tiny_llama_for_tokenizer()[1]
    ours = collate_pairs([tokenize_pair(Row(r, "rows", i + 1), tok) for i, r in enumerate(ROWS)], tok.pad_token_id)
    width = ours["input_ids"].shape[1]
    assert torch.equal(ours["labels"], trl_batch["labels"][:, :width])
    assert (trl_batch["labels"][:, width:] == IGNORE).all()
    real = ours["labels"] != IGNORE
    assert torch.equal(ours["input_ids"][real], trl_batch["input_ids"][:, :width][real])


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_against_the_base_matches_trl(tmp_path, beta):
    """A new adapter, the base as reference: TRL disables the PEFT adapter, lorakit disables its own."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = dpo_trainer(tmp_path, tiny_llama_for_tokenizer()[0], beta, config)
    randomise(trainer.model, "default", seed=1)  # a trained-looking adapter: rewards far from 0
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    theirs = trl_step(trainer, batch)

    model, _ = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, tmp_path / "adapter", trainable=True)
    ours = lorakit_step(model, trl_batch_to_lorakit(batch), PreferenceConfig("dpo", beta, 0.0, "base"))
    assert_same(ours, theirs)
    assert 0 < ours[1]["rewards/accuracies"] < 1 or abs(ours[1]["rewards/margins"]) > 1e-3


def test_dpo_against_the_starting_adapter_matches_trl(tmp_path):
    """Re-training an adapter: TRL keeps a frozen copy named "ref", lorakit one named "reference"."""
    model, _ = tiny_llama_for_tokenizer()
    start = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise(start, "default", seed=2)
    start.save_pretrained(tmp_path / "init")
    trainer = dpo_trainer(tmp_path, start, 0.2)
    assert "ref" in trainer.model.peft_config
    randomise(trainer.model, "default", seed=3)  # the policy has moved away from its start
    trainer.model.save_pretrained(tmp_path / "now", selected_adapters=["default"])
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    theirs = trl_step(trainer, batch)

    ours_model, _ = tiny_llama_for_tokenizer()
    lorakit.load_adapter(ours_model, tmp_path / "now", trainable=True)
    lorakit.load_adapter(ours_model, tmp_path / "init", adapter_name="reference")
    ours = lorakit_step(ours_model, trl_batch_to_lorakit(batch), PreferenceConfig("dpo", 0.2, 0.0, "init"))
    assert_same(ours, theirs)


@pytest.mark.parametrize("rpo_alpha", [1.0, 0.3])
def test_dpo_with_rpo_alpha_matches_trl(tmp_path, rpo_alpha):
    """DPO + rpo_alpha * the chosen answers' mean nll per token: TRL's sigmoid + sft loss types."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = dpo_trainer(tmp_path, tiny_llama_for_tokenizer()[0], 0.2, config, rpo_alpha=rpo_alpha)
    randomise(trainer.model, "default", seed=8)
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    theirs = trl_step(trainer, batch)
    plain_trainer = dpo_trainer(tmp_path, tiny_llama_for_tokenizer()[0], 0.2, config)
    plain_trainer.model.load_state_dict(trainer.model.state_dict())
    plain_loss = trl_step(plain_trainer, batch)[0]

    model, _ = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, tmp_path / "adapter", trainable=True)
    ours_batch = trl_batch_to_lorakit(batch)
    answer_tokens = int((ours_batch["labels"][: len(ROWS), 1:] != IGNORE).sum())
    ours_batch["nll_scale"] = torch.tensor(len(ROWS) / answer_tokens)
    config = PreferenceConfig("dpo", 0.2, 0.0, "base", rpo_alpha=rpo_alpha)
    model.train()
    model.zero_grad(set_to_none=True)
    module = PreferenceLoss(model, config)
    loss = module(ours_batch) / len(ROWS)
    loss.backward()
    record = stats_record(module.pop_stats(), nll=True)
    assert_same((float(loss), record, lora_grads(model)), theirs)
    assert record["nll_loss"] == pytest.approx((theirs[0] - plain_loss) / rpo_alpha, rel=1e-4)
    assert record["nll_loss"] == pytest.approx(-record["logps/chosen"] * len(ROWS) / answer_tokens, rel=1e-5)
    assert abs(theirs[0] - plain_loss) > 0.1  # the nll term is really there


def test_label_smoothing_mixes_the_loss_of_the_flipped_pairs(tmp_path):
    """Conservative DPO: (1 - eps) * TRL's sigmoid loss + eps * TRL's loss with chosen and rejected swapped."""
    eps = 0.2
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    trainer = dpo_trainer(tmp_path, tiny_llama_for_tokenizer()[0], 0.3, config)
    randomise(trainer.model, "default", seed=4)
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    n = len(ROWS)
    flipped = {k: torch.cat([v[n:], v[:n]]) for k, v in batch.items()}
    loss, _, grads = trl_step(trainer, batch)
    loss_f, _, grads_f = trl_step(trainer, flipped)

    model, _ = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, tmp_path / "adapter", trainable=True)
    ours_loss, _, ours_grads = lorakit_step(model, trl_batch_to_lorakit(batch), PreferenceConfig("dpo", 0.3, eps, "base"))
    assert ours_loss == pytest.approx((1 - eps) * loss + eps * loss_f, rel=1e-5)
    for key, grad in ours_grads.items():
        torch.testing.assert_close(grad, (1 - eps) * grads[key] + eps * grads_f[key], rtol=1e-4, atol=1e-7)


def test_orpo_matches_trl(tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    base, tok = tiny_llama_for_tokenizer()
    args = ORPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=len(ROWS),
                      report_to=[], use_cpu=True, bf16=False, save_strategy="no", max_length=64)
    trainer = ORPOTrainer(model=base, args=args, train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tok,
                          peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomise(trainer.model, "default", seed=5)
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
    trainer.model.train()
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    theirs = (float(loss), metrics, lora_grads(trainer.model, peft_names=True))

    # The same sequences: [chosen; rejected], answers labelled; TRL's nll covers every chosen token.
    chosen, rejected = batch["chosen_input_ids"], batch["rejected_input_ids"]
    width = max(chosen.shape[1], rejected.shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    ids = torch.cat([pad(chosen, tok.pad_token_id), pad(rejected, tok.pad_token_id)])
    labels = torch.cat([pad(batch["chosen_labels"], IGNORE), pad(batch["rejected_labels"], IGNORE)])
    sft = pad(torch.where(batch["chosen_attention_mask"].bool(), chosen, torch.full_like(chosen, IGNORE)), IGNORE)
    ours_batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(width).expand_as(ids).contiguous(),
                  "sft_labels": sft}
    ours_batch["nll_scale"] = torch.tensor(len(ROWS) / int((sft[:, 1:] != IGNORE).sum()))
    model, _ = tiny_llama_for_tokenizer()
    lorakit.load_adapter(model, tmp_path / "adapter", trainable=True)
    ours = lorakit_step(model, ours_batch, PreferenceConfig("orpo", 0.3))
    assert_same(ours, theirs)


@torch.no_grad()
def plain_logps(model, batch) -> torch.Tensor:
    """Summed answer log-probabilities from transformers' full logits (no lorakit code)."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def live_parameters() -> list[torch.nn.Parameter]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.nn.Parameter)]


def test_the_reference_is_the_base_model_and_no_copy_of_it_exists():
    earlier = live_parameters()  # other tests' leftovers (held, so that their ids stay theirs)
    tok = tiny_llama_for_tokenizer()[1]
    batch = collate_pairs([tokenize_pair(Row(r, "rows", i + 1), tok) for i, r in enumerate(ROWS)], tok.pad_token_id)
    plain, _ = tiny_llama_for_tokenizer()
    base_logps = plain_logps(plain, batch)
    del plain

    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomise(model, "default", seed=6)
    model.train()
    with torch.no_grad():
        policy = sequence_logps(model, batch)
        with reference_mode(model, "base"):
            reference = sequence_logps(model, batch)
    torch.testing.assert_close(reference, base_logps, rtol=1e-5, atol=1e-5)
    assert (policy - reference).abs().max() > 1e-2  # the adapter is on outside the reference

    # Every parameter tensor alive while the reference runs: the model's own, nothing more.
    seen: dict[str, int] = {}

    def count(*_):
        old = {id(p) for p in earlier}
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                    for p in live_parameters() if id(p) not in old}
        seen["bytes"] = sum(storages.values())
        seen["during_reference"] = int(not torch.is_grad_enabled())

    handle = model.model.layers[0].register_forward_pre_hook(count)
    loss_module = PreferenceLoss(model, PreferenceConfig("dpo", 0.1, 0.0, "base"))
    loss_module(batch).backward()  # the last forward is the reference's
    handle.remove()
    own = sum(p.untyped_storage().nbytes() for p in model.parameters())
    assert seen["during_reference"] == 1
    assert seen["bytes"] == own


def test_loss_module_sums_over_pairs_so_pieces_add_up():
    """Two micro-batches of pairs, summed and divided by all pairs, equal one batch (accumulation, sharding)."""
    tok = tiny_llama_for_tokenizer()[1]
    pairs = [tokenize_pair(Row(r, "rows", i + 1), tok) for i, r in enumerate(ROWS)]
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomise(model, "default", seed=7)
    for objective, rpo_alpha in (("dpo", 0.0), ("dpo", 1.0), ("orpo", 0.0)):
        module = PreferenceLoss(model, PreferenceConfig(objective, 0.2, rpo_alpha=rpo_alpha))
        whole = collate_pairs(pairs, tok.pad_token_id)
        parts = [collate_pairs(pairs[:1], tok.pad_token_id), collate_pairs(pairs[1:], tok.pad_token_id)]
        tokens = sum(int((b["labels"][: b["input_ids"].shape[0] // 2, 1:] != IGNORE).sum()) for b in parts)
        for b in [whole, *parts]:
            b["nll_scale"] = torch.tensor(len(pairs) / tokens)
        one = module(whole) / len(pairs)
        split = sum(module(b) for b in parts) / len(pairs)
        torch.testing.assert_close(one, split, rtol=1e-5, atol=1e-6)
        sums = module.pop_stats()
        assert float(sums[-1]) == 2 * len(pairs)
        assert (float(sums[-2]) != 0) == (objective == "orpo" or rpo_alpha > 0)  # the nll sums, both passes


def test_metrics_record_names_match_trl():
    sums = torch.tensor([1.0, -1.0, 2.0, 2.0, -3.0, -5.0, 0.8, 2.0])
    record = stats_record(sums, "eval_")
    assert record == {"eval_rewards/chosen": 0.5, "eval_rewards/rejected": -0.5, "eval_rewards/margins": 1.0,
                      "eval_rewards/accuracies": 1.0, "eval_logps/chosen": -1.5, "eval_logps/rejected": -2.5}
    assert stats_record(sums, nll=True)["nll_loss"] == pytest.approx(0.4)  # ORPO and DPO with rpo_alpha: TRL's nll_loss
    assert json.dumps(record)
