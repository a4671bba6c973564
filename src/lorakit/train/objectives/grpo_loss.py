"""GRPO's arithmetic, in plain torch: group-normalised advantages and the clipped token loss.

Rewards -> advantages (G completions per prompt, grouped: prompt i's at [i*G, (i+1)*G)):

    r_i   = sum_k w_k * r_ik            (a function's None counts as 0; all None: unscorable)
    A_i   = r_i - mean(r of i's group)
    A_i  /= std(...) + 1e-4             scale "group": std of i's group; "batch": of all rewards;
                                        "none": no division (Dr. GRPO's choice)

(std is Bessel-corrected; an unscorable completion is left out of its group's mean and std and
gets A = 0.) Then, per completion token t of completion i, with the policy's log-prob `logp`,
the rollout's `old` and the base's `ref`:

    ratio  = exp(logp - old)
    loss_t = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i)
             + beta * (exp(ref - logp) - (ref - logp) - 1)        (the k3 estimate of KL)

and the loss of a step, by `loss_type`:

    grpo      mean over the step's completions of (mean over the completion's tokens)
    dr_grpo   sum over the step's tokens / (completions * max_completion_tokens)
    dapo      sum over the step's tokens / (the step's completion tokens)

`token_loss_sum` returns a micro-batch's part of that sum; the recipe divides the step's total
by the sum of `loss_count` over the step's micro-batches (and processes), so accumulation and
sharding equal one big batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4
"""Added to the std before dividing (TRL's constant)."""


def combine_rewards(per_function: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(N, K) rewards of K functions (NaN for None) -> (N,) weighted sums; NaN where all K are NaN."""
    w = torch.as_tensor(list(weights), dtype=per_function.dtype, device=per_function.device)
    total = (per_function * w).nansum(dim=1)
    return total.masked_fill(per_function.isnan().all(dim=1), float("nan"))


def nan_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs; NaN where fewer than two values are present."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~x.isnan()).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    return var.sqrt().squeeze(dim)


def advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group",
               batch_std: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) advantages of grouped rewards, and (N,) whether each group's std is zero (for the log).

    `batch_std` is the std of every reward of the step on all processes (scale "batch"); default:
    the std of `rewards`.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    groups = rewards.view(-1, num_generations)
    mean = torch.nanmean(groups, dim=1).repeat_interleave(num_generations)
    if num_generations > 1:
        group_std = nan_std(groups, dim=1).repeat_interleave(num_generations)
    else:
        group_std = torch.zeros_like(rewards)
    std = group_std
    if scale_rewards == "batch":
        if batch_std is None:
            batch_std = nan_std(rewards) if rewards.numel() > 1 else torch.zeros(())
        std = torch.as_tensor(batch_std, dtype=rewards.dtype, device=rewards.device).expand_as(rewards)
    out = rewards - mean
    if scale_rewards != "none":
        out = out / (std + STD_EPS)
    return torch.nan_to_num(out, nan=0.0), torch.isclose(std, torch.zeros_like(std))


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "dapo"
    epsilon: float = 0.2
    """Lower clip: ratios below 1 - epsilon stop pulling a negative-advantage token down."""
    epsilon_high: float = 0.2
    """Upper clip: ratios above 1 + epsilon_high stop pushing a positive-advantage token up."""
    beta: float = 0.0
    """Weight of the k3 KL estimate to the reference; 0: no reference pass."""
    max_completion_tokens: int = 256
    """dr_grpo's constant denominator per completion."""


@dataclass
class TokenStats:
    """Detached sums behind the logged figures of one micro-batch."""

    kl: float = 0.0
    low_clipped: float = 0.0
    high_clipped: float = 0.0
    tokens: float = 0.0


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor, cfg: LossConfig,
                 ref_logps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(B, T) per-token losses, the per-token KL (or None), and the low / high clip indicators.

    `logps`, `old_logps`, `ref_logps`: (B, T) completion-token log-probs; `adv`: (B,).
    """
    a = adv.to(logps.dtype).unsqueeze(1)  # (B, 1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon_high)
    loss = -torch.min(ratio * a, clipped * a)
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + cfg.beta * kl
    low = (ratio < 1 - cfg.epsilon) & (a < 0)
    high = (ratio > 1 + cfg.epsilon_high) & (a > 0)
    return loss, kl, low, high


def token_loss_sum(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                   cfg: LossConfig, ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, TokenStats]:
    """A micro-batch's summed loss (see the module docstring) and its logged sums.

    grpo: per-completion token means, summed; dr_grpo and dapo: token losses, summed. Divide the
    step's total by the step's total `loss_count`.
    """
    mask = mask.to(logps.dtype)
    loss, kl, low, high = token_losses(logps, old_logps, adv, cfg, ref_logps)
    if cfg.loss_type == "grpo":
        total = ((loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif cfg.loss_type in ("dr_grpo", "dapo"):
        total = (loss * mask).sum()
    else:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {cfg.loss_type!r}")
    stats = TokenStats(kl=float((kl.detach() * mask).sum()) if kl is not None else 0.0,
                       low_clipped=float((low * mask).sum()), high_clipped=float((high * mask).sum()),
                       tokens=float(mask.sum()))
    return total, stats


def loss_count(mask: torch.Tensor, cfg: LossConfig) -> int:
    """What a micro-batch adds to the step's divisor: completions (grpo), completions times
    max_completion_tokens (dr_grpo), completion tokens (dapo)."""
    if cfg.loss_type == "grpo":
        return int(mask.shape[0])
    if cfg.loss_type == "dr_grpo":
        return int(mask.shape[0]) * cfg.max_completion_tokens
    return int(mask.sum())
