"""GRPO's loss and advantages against TRL's GRPOTrainer on the same inputs (fp32, tiny random Llama)."""

from __future__ import annotations

import contextlib
import copy
import types
from collections import defaultdict

import pytest
import torch
import trl.trainer.grpo_trainer as trl_grpo  # TRL is a test dependency: the reference
import trl.trainer.utils as trl_utils

from conftest import tiny_llama
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.inject import disable_adapters, inject
from lorakit.train.objectives.grpo import GRPOLoss, collate_rollouts, completion_logps
from lorakit.train.objectives.grpo_loss import (
    LossConfig,
    advantages,
    combine_rewards,
    loss_count,
    nan_std,
)

PAD = 0
MAX_COMPLETION = 9
TEMPERATURE = 0.7


def adapted_llama() -> torch.nn.Module:
    model = tiny_llama(seed=3)
    inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.train()


def rollout_inputs(seed: int = 0):
    """4 prompts of one length (TRL pads prompts on the left), completions of 3..9 tokens."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 128, (6,), generator=g).tolist() for _ in range(4)]
    lengths = [3, 9, 5, 7]
    completions = [torch.randint(1, 128, (n,), generator=g).tolist() for n in lengths]
    advantage = torch.tensor([1.3, -0.7, 0.4, -1.1])
    return prompts, completions, advantage, g


class FakeAccelerator:
    num_processes = 1
    is_main_process = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_trainer(model, loss_type: str, beta: float, epsilon: float, epsilon_high: float):
    """A GRPOTrainer with just what its `_compute_loss` reads, set to these options (TRL's own code runs)."""
    trainer = object.__new__(trl_grpo.GRPOTrainer)
    values = dict(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=MAX_COMPLETION,
        accelerator=FakeAccelerator(), _entropy_bonus_enabled=False,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
    )
    trainer.__dict__.update(values)
    trainer.__dict__["model"] = model
    trainer.__dict__["_metrics"] = {"train": defaultdict(list), "eval": defaultdict(list)}
    return trainer


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_adapter_gradients_equal_trl(loss_type, beta):
    ours_model = adapted_llama()
    trl_model = copy.deepcopy(ours_model)
    trl_utils.add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    prompts, completions, adv, g = rollout_inputs()
    batch = collate_rollouts(prompts, completions, PAD)
    mask = batch["completion_mask"]
    with torch.no_grad():
        current = completion_logps(ours_model, batch, TEMPERATURE)
        with disable_adapters(ours_model):
            ref = completion_logps(ours_model, batch, TEMPERATURE)
    # Old log-probs off the current ones by up to +-0.5 nats: ratios on both sides of both clips.
    old = (current + (torch.rand(current.shape, generator=g) - 0.5)) * mask
    batch.update(old_logps=old, advantages=adv, ref_logps=ref)
    cfg = LossConfig(loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta, max_completion_tokens=MAX_COMPLETION)

    module = GRPOLoss(ours_model, cfg, TEMPERATURE, chunk=7)  # several head chunks
    ours = module(batch) / loss_count(mask, cfg)
    ours.backward()

    trainer = trl_trainer(trl_model, loss_type, beta, 0.2, 0.28)
    inputs = {"prompt_ids": torch.tensor(prompts), "prompt_mask": torch.ones(4, 6, dtype=torch.long),
              "completion_ids": batch["completion_ids"], "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    theirs = trainer._compute_loss(trl_model, inputs)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    ours_grads, trl_grads = adapter_grads(ours_model), adapter_grads(trl_model)
    assert ours_grads.keys() == trl_grads.keys() and len(ours_grads) > 0
    for name in ours_grads:
        torch.testing.assert_close(ours_grads[name], trl_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    sums = module.pop_stats()
    metrics = trainer._metrics["train"]
    tokens = float(mask.sum())
    assert sums[1] / tokens == pytest.approx(metrics["clip_ratio/low_mean"][0], abs=1e-6)
    assert sums[2] / tokens == pytest.approx(metrics["clip_ratio/high_mean"][0], abs=1e-6)
    assert sums[1] + sums[2] > 0  # the test exercises the clips
    if beta:
        assert sums[0] / tokens == pytest.approx(metrics["kl"][0], rel=1e-5)


def test_micro_batches_sum_to_the_whole_batch():
    """Pieces of a step, each summed and divided by the step's total count, equal the whole."""
    model = adapted_llama()
    prompts, completions, adv, g = rollout_inputs(seed=1)
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        cfg = LossConfig(loss_type, max_completion_tokens=MAX_COMPLETION)
        whole = collate_rollouts(prompts, completions, PAD)
        whole.update(old_logps=torch.zeros(whole["completion_mask"].shape) - 3.0, advantages=adv)
        module = GRPOLoss(model, cfg, 1.0, 2048)
        with torch.no_grad():
            expected = module(whole) / loss_count(whole["completion_mask"], cfg)
            total, count = 0.0, 0
            for part in (slice(0, 1), slice(1, 4)):
                piece = collate_rollouts(prompts[part], completions[part], PAD)
                piece.update(old_logps=torch.zeros(piece["completion_mask"].shape) - 3.0, advantages=adv[part])
                total = total + module(piece)
                count += loss_count(piece["completion_mask"], cfg)
        torch.testing.assert_close(total / count, expected)


def trl_advantages(rewards_per_func, weights, num_generations, scale_rewards):
    """TRL 1.16's sum_then_normalize advantages, line for line (grpo_trainer._generate_and_score_completions)."""
    nanstd = trl_utils.nanstd
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * torch.tensor(weights).unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ("group", "none"):
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean_grouped
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards):
    g = torch.Generator().manual_seed(2)
    per_function = torch.randn(12, 2, generator=g)
    per_function[3, 0] = float("nan")  # one function had no opinion
    per_function[5] = float("nan")  # nobody had: unscorable
    per_function[8:12, :] = 1.0  # a group with equal rewards: zero std
    weights = [1.0, 0.5]
    ours, zero = advantages(combine_rewards(per_function, weights), 4, scale_rewards)
    theirs, their_zero = trl_advantages(per_function, weights, 4, scale_rewards)
    torch.testing.assert_close(ours, theirs)
    assert torch.equal(zero, their_zero)
    assert ours[5] == 0 and torch.all(ours[8:12] == 0)


def test_nan_std_is_bessel_corrected_and_skips_nans():
    x = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    assert float(nan_std(x)) == pytest.approx(torch.tensor([1.0, 2.0, 4.0]).std().item())
    assert nan_std(torch.tensor([3.0, float("nan")])).isnan()


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ValueError, match="--scale-rewards must be one of group, batch, none, got 'mean'"):
        advantages(torch.zeros(4), 2, "mean")
    from lorakit.train.objectives.grpo_loss import token_loss_sum

    with pytest.raises(ValueError, match="--loss-type must be one of grpo, dr_grpo, dapo, got 'bnpo'"):
        token_loss_sum(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2), LossConfig("bnpo"))


def test_fast_path_completion_logps_and_gradients_equal_the_generic_path():
    """On the fast path (the fused decoder and chunked head, here eager on the CPU) the completion
    log-probs at the sampling temperature, and the adapter gradients through them, equal the
    generic path's; prompts of different lengths, right padding."""
    from lorakit.train.fastpath import FastPathConfig, enable_fast_path, fused_token_logps

    generic = adapted_llama().double()
    fast = copy.deepcopy(generic)
    assert enable_fast_path(fast, FastPathConfig(recompute="all")).enabled
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (4, 7, 2)]
    completions = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (5, 2, 8)]
    batch = collate_rollouts(prompts, completions, PAD)
    with torch.no_grad():  # this batch takes the fused path, not a fallback
        assert fused_token_logps(fast, batch["input_ids"], batch["input_ids"], batch["position_ids"]) is not None
    weights = torch.randn(batch["completion_ids"].shape, generator=g, dtype=torch.float64)
    got, want = (completion_logps(m, batch, TEMPERATURE) for m in (fast, generic))
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)
    assert (got[batch["completion_mask"] == 0] == 0).all()
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    theirs = dict(generic.named_parameters())
    count = 0
    for name, p in fast.named_parameters():
        if p.requires_grad:
            ref = theirs[name].grad  # the fused kernels keep some sums in fp32: relative to the whole gradient
            assert float((p.grad - ref).norm()) <= 1e-5 * float(ref.norm()), name
            count += 1
    assert count == 2 * 7 * 2  # A and B of 7 projections in 2 layers
