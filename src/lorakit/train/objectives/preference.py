"""Objectives beside supervised fine-tuning: DPO and ORPO on preference pairs.

Both score whole answers: the sum of the log-probabilities of an answer's tokens given its
prompt, `logp(y | x)`, computed the way `sft.compute_loss` computes the SFT loss (the output
head only at answer positions, in recomputed chunks). A batch holds B chosen sequences then
their B rejected ones (`prefdata.collate_pairs`), so one forward pass scores both.

DPO (Rafailov et al. 2023), sigmoid loss with optional label smoothing (conservative DPO):

    h_i   = beta * [(logp(yc|x) - ref_logp(yc|x)) - (logp(yr|x) - ref_logp(yr|x))]
    loss  = mean_i[ -(1 - eps) * log sigmoid(h_i) - eps * log sigmoid(-h_i) ]

With `--rpo-alpha A` (RPO, Pang et al. 2024; TRL's `loss_type=["sigmoid", "sft"]`,
`loss_weights=[1, A]`, formerly `rpo_alpha`) the loss adds A times the mean negative
log-likelihood per token of the chosen answers, which keeps the chosen answers likely while
the margin grows (plain DPO may lower both, including the tokens both answers share).

The reference is the same model with its adapter disabled (the base), or with a frozen copy
of the starting adapter (`--init-adapter DIR --reference init`), run once per batch under
`torch.no_grad`: no second copy of the model exists. Rewards are `beta * (logp - ref_logp)`.

ORPO (Hong et al. 2024), no reference: with per-token average log-probabilities `a = logp / n`,

    log_odds_i = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)))
    loss       = nll(chosen) - beta * mean_i[ log sigmoid(log_odds_i) ]

where nll is the mean cross-entropy per token of the chosen sequences (their answers, or
every token with `--loss-on all`, as TRL's ORPOTrainer does). Rewards are `beta * a`.

Every micro-batch returns sums; the loop divides by the step's pair count, so gradient
accumulation and torchrun sharding equal one big batch. ORPO's nll is a mean over the
step's tokens: `nll_scale` (pairs / tokens of the step) carries that into each micro-batch; the
same holds for DPO's `--rpo-alpha` term.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.adapters.files import load_adapter
from lorakit.adapters.inject import active_adapters, disable_adapters, set_adapter
from lorakit.data.pairs import Pair, collate_pairs, load_pairs, split_pairs
from lorakit.data.sft import IGNORE, micro_batch
from lorakit.train import distributed
from lorakit.train.distributed import DistEnv
from lorakit.train.fastpath import fused_token_logps
from lorakit.train.objectives.sft import body_and_head
from lorakit.train.runlog import log

OBJECTIVES = ("sft", "dpo", "orpo")
REFERENCES = ("auto", "base", "init")
REFERENCE_ADAPTER = "reference"
"""The name of the frozen copy of the starting adapter (`--reference init`)."""
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")
NLL = "nll_loss"
"""The logged mean nll per chosen token of ORPO and of DPO with --rpo-alpha (TRL's name)."""


def check_preference_args(objective: str, reference: str, init_adapter: str | None, beta: float,
                          label_smoothing: float, packing: bool, rpo_alpha: float = 0.0) -> None:
    """`TrainArgs`' checks of the preference options; the errors name the option and the accepted values."""
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if reference not in REFERENCES:
        raise ValueError(f"--reference must be one of {', '.join(REFERENCES)}, got {reference!r}")
    if reference == "init" and init_adapter is None:
        raise ValueError("--reference init needs --init-adapter DIR (the adapter to freeze as the reference)")
    if not beta > 0:
        raise ValueError(f"--beta must be > 0, got {beta!r}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and objective != "dpo":
        raise ValueError(f"--label-smoothing applies to --objective dpo only, got --objective {objective}")
    if not (isinstance(rpo_alpha, (int, float)) and not isinstance(rpo_alpha, bool) and math.isfinite(rpo_alpha)
            and rpo_alpha >= 0):
        raise ValueError(f"--rpo-alpha must be a finite number >= 0 (0: off; 1.0 as in the RPO paper), got {rpo_alpha!r}")
    if rpo_alpha and objective != "dpo":
        raise ValueError(f"--rpo-alpha applies to --objective dpo only (orpo has its own nll term), "
                         f"got --objective {objective}")
    if objective != "sft" and packing:
        raise ValueError(f"--packing applies to --objective sft only; {objective} scores whole pairs, got --packing")


def load_preference_data(data: str, eval_data: str | None, tokenizer, seq_len: int, skip_bad: bool,
                         special_tokens_in_content: bool = False) -> tuple[list[Pair], list[Pair] | None]:
    pairs, stats = load_pairs(data, tokenizer, seq_len, skip_bad, special_tokens_in_content)
    log(stats.summary(f"train data {data}").replace("examples", "preference pairs", 1))
    eval_pairs = None
    if eval_data:
        eval_pairs, stats = load_pairs(eval_data, tokenizer, seq_len, skip_bad, special_tokens_in_content)
        log(stats.summary(f"eval data {eval_data}").replace("examples", "preference pairs", 1))
    return pairs, eval_pairs


def _up(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 for the softmax (fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _head_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    # (N, vocab) logits for N positions only; at least fp32 for the softmax.
    return -F.cross_entropy(_up(head(hidden)), targets, reduction="none")


def token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor,
                chunk: int = 2048) -> torch.Tensor:
    """(R, T-1) log-probabilities of `labels[:, 1:]` given the tokens before; 0 where the label is
    -100; at least fp32. Through the GPU fast path's fused pieces when it is on for the model."""
    fused = fused_token_logps(model, input_ids, labels, position_ids)
    if fused is not None:  # the GPU fast path is on for this model and batch (lorakit.train.fastpath)
        return fused
    targets = labels[:, 1:]
    mask = targets != IGNORE
    body, head = body_and_head(model)
    if body is None:
        logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        picked = -F.cross_entropy(_up(logits[:, :-1][mask]), targets[mask], reduction="none")
    else:
        hidden = body(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        selected, wanted = hidden[:, :-1][mask], targets[mask]  # (N, d), (N,)
        if len(wanted) <= chunk:
            picked = _head_logps(selected, wanted, head)
        else:
            picked = torch.cat([checkpoint(_head_logps, selected[i : i + chunk], wanted[i : i + chunk], head,
                                           use_reentrant=False) for i in range(0, len(wanted), chunk)])
    out = torch.zeros(mask.shape, dtype=picked.dtype, device=input_ids.device)
    out[mask] = picked
    return out


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048) -> torch.Tensor:
    """(R,) summed log-probability of each row's labelled tokens: logp(answer | prompt)."""
    return token_logps(model, batch["input_ids"], batch["labels"], batch["position_ids"], chunk).sum(-1)


@contextlib.contextmanager
def reference_mode(model: nn.Module, reference: str) -> Iterator[None]:
    """The model as DPO's reference: the base (adapters disabled) or the frozen starting adapter."""
    if reference == "base":
        with disable_adapters(model):
            yield
        return
    active = active_adapters(model)
    set_adapter(model, REFERENCE_ADAPTER)
    try:
        yield
    finally:
        set_adapter(model, active)


def preference_config(args: Any) -> PreferenceConfig:
    """The preference options of `train.TrainArgs`, with `--reference auto` resolved."""
    reference = args.reference if args.reference != "auto" else ("init" if args.init_adapter else "base")
    return PreferenceConfig(args.objective, args.beta, args.label_smoothing, reference, args.loss_chunk,
                            args.rpo_alpha)


def second_adapter(args: Any) -> bool:
    """Whether the run holds a frozen copy of the starting adapter as DPO's reference."""
    return args.objective == "dpo" and preference_config(args).reference == "init"


def setup_reference(model: nn.Module, args: Any) -> None:
    """For DPO against the starting adapter, load it a second time, frozen, under the name
    "reference" (adapter weights only); say which reference the run uses."""
    if args.objective != "dpo":
        return
    if second_adapter(args):
        load_adapter(model, args.init_adapter, adapter_name=REFERENCE_ADAPTER, trainable=False)
        log(f"DPO reference: {args.init_adapter}, frozen (a second copy of the adapter only, not of the model)")
    else:
        log("DPO reference: the base model, i.e. this model with its adapter disabled (no second copy)")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log1p(-exp(x)) far from 0,
    log(-expm1(x)) near 0."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the chosen and rejected rewards (detached)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    h = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def orpo_losses(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor,
                beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio losses `-beta * log sigmoid(log_odds)` and the rewards (detached)."""
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


@dataclass
class PreferenceConfig:
    objective: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: str = "base"
    """base or init (resolved from auto by the caller)."""
    chunk: int = 2048
    rpo_alpha: float = 0.0
    """DPO: weight of the mean nll per chosen answer token added to the loss (0: plain DPO)."""

    @property
    def has_nll(self) -> bool:
        """Whether the loss holds an nll term, scaled by the batch's `nll_scale`."""
        return self.objective == "orpo" or (self.objective == "dpo" and self.rpo_alpha > 0)


def has_nll(args: Any) -> bool:
    """Whether a run's loss holds an nll term (ORPO, DPO with --rpo-alpha): its batches need `nll_scale`."""
    return preference_config(args).has_nll


class PreferenceLoss(nn.Module):
    """One micro-batch of pairs -> the summed loss (the loop divides by the step's pairs).

    A module, so DDP and FSDP2 see one forward per micro-batch. `stats` accumulates the
    detached sums behind the logged rewards until `pop_stats`.
    """

    def __init__(self, model: nn.Module, config: PreferenceConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.stats = torch.zeros(len(STATS) + 2, dtype=torch.float64)  # STATS sums, the nll, the pair count

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        pairs = batch["input_ids"].shape[0] // 2
        labels = batch["labels"]
        if cfg.objective == "orpo" and "sft_labels" in batch:  # score every chosen token for the nll term
            sft = batch["sft_labels"]
            labels = torch.cat([torch.where(sft != IGNORE, sft, labels[:pairs]), labels[pairs:]])
        logps = token_logps(self.model, batch["input_ids"], labels, batch["position_ids"], cfg.chunk)
        answer = (batch["labels"][:, 1:] != IGNORE).float()
        sums = (logps * answer).sum(-1)
        chosen, rejected = sums[:pairs], sums[pairs:]
        if cfg.objective == "dpo":
            with torch.no_grad(), reference_mode(self.model, cfg.reference):
                ref = sequence_logps(self.model, batch, cfg.chunk)
            losses, chosen_rewards, rejected_rewards = dpo_losses(chosen, rejected, ref[:pairs], ref[pairs:],
                                                                  cfg.beta, cfg.label_smoothing)
            total = losses.sum()
            nll = None
            if cfg.rpo_alpha:  # the chosen answers' tokens, as TRL's "sft" loss type
                nll = -logps[:pairs].sum() * batch["nll_scale"].to(logps.dtype)
                total = total + cfg.rpo_alpha * nll
        else:
            counts = answer.sum(-1).clamp(min=1)
            chosen, rejected = chosen / counts[:pairs], rejected / counts[pairs:]  # per-token averages
            losses, chosen_rewards, rejected_rewards = orpo_losses(chosen, rejected, cfg.beta)
            nll = -logps[:pairs].sum() * batch["nll_scale"].to(logps.dtype)  # the answers, or all with sft_labels
            total = losses.sum() + nll
        margins = chosen_rewards - rejected_rewards
        values = [chosen_rewards.sum(), rejected_rewards.sum(), margins.sum(), (margins > 0).float().sum(),
                  chosen.detach().sum(), rejected.detach().sum(),
                  torch.zeros(()) if nll is None else nll.detach(), torch.tensor(float(pairs))]
        self.stats += torch.stack([v.double().cpu() for v in values])
        return total

    def pop_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros_like(self.stats)
        return out


def nll_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens of ORPO's nll term in one micro-batch (chosen rows only)."""
    if "sft_labels" in batch:
        return int((batch["sft_labels"][:, 1:] != IGNORE).sum())
    pairs = batch["input_ids"].shape[0] // 2
    return int((batch["labels"][:pairs, 1:] != IGNORE).sum())


def stats_record(sums: list[float] | torch.Tensor, prefix: str = "", nll: bool = False) -> dict[str, float]:
    """Means per pair of the accumulated sums (`PreferenceLoss.stats`, summed over processes); with
    `nll`, also the nll term (its sums carry `nll_scale`, so this is the mean per chosen token)."""
    values = [float(v) for v in sums]
    pairs = max(values[-1], 1.0)
    record = {prefix + name: value / pairs for name, value in zip(STATS, values[:-2], strict=True)}
    if nll:
        record[prefix + NLL] = values[-2] / pairs
    return record


# the loop's pieces ----------------------------------------------------------------------------


def step_batches(pairs: list[Pair], args: Any, step: int, env: DistEnv, pad_id: int,
                 max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
    """This process's batches of optimizer step `step` (`args`: a `train.TrainArgs`): micro-batches
    `step * grad_accum ...` (a function of (seed, index), as for SFT), its own pairs of each, in
    pieces of at most `max_tokens`."""
    first = step * args.grad_accum
    sft_on_all = args.loss_on == "all" and args.objective == "orpo"  # DPO's rpo term: the answers, as TRL
    return [collate_pairs(piece, pad_id, sft_on_all)
            for k in range(args.grad_accum)
            for piece in split_pairs(distributed.shard(micro_batch(pairs, args.batch_size, args.seed, first + k), env),
                                     max_tokens)]


def set_nll_scale(batches: list[dict[str, torch.Tensor]], step_pairs: int, env: DistEnv) -> None:
    """ORPO and DPO with --rpo-alpha: weight the nll sums so that, divided by the step's pairs,
    they are a mean over the step's tokens (on all processes)."""
    tokens = distributed.all_sum([sum(nll_tokens(b) for b in batches)], env)[0]
    for b in batches:
        b["nll_scale"] = torch.tensor(step_pairs / max(tokens, 1.0))


@torch.no_grad()
def evaluate_pairs(loss_module: nn.Module, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
                   autocast_dtype: torch.dtype | None, sft_on_all: bool) -> dict[str, float]:
    """eval_loss (mean per pair) and the eval rewards over `pairs`, in a fixed order.

    `loss_module` is the (possibly wrapped) `PreferenceLoss`; every process evaluates every pair.
    """
    inner = distributed.unwrap(loss_module)
    model = inner.model
    was_training = model.training
    model.eval()
    kept = inner.pop_stats()  # the training window's sums wait while eval runs
    sft_on_all = sft_on_all and inner.config.objective == "orpo"
    total = 0.0
    batches = [collate_pairs(pairs[start : start + batch_size], pad_id, sft_on_all)
               for start in range(0, len(pairs), batch_size)]
    scale = torch.tensor(len(pairs) / max(sum(nll_tokens(b) for b in batches), 1))  # nll: a mean over all tokens
    for batch in batches:
        batch["nll_scale"] = scale
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            total += float(loss_module(batch))
    sums = inner.pop_stats()
    inner.stats = kept
    model.train(was_training)
    return {"eval_loss": total / max(float(sums[-1]), 1.0), **stats_record(sums, "eval_", inner.config.has_nll)}


class Preference:
    """DPO or ORPO on preference pairs, as the objective the recipe runs; `args` a `TrainArgs`."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.name = args.objective
        self.config = preference_config(args)
        self.second_adapter = second_adapter(args)
        """Whether the run holds a frozen copy of the starting adapter as DPO's reference."""

    def load_data(self, tokenizer) -> tuple[list[Pair], list[Pair] | None]:
        args = self.args
        return load_preference_data(args.data, args.eval_data, tokenizer, args.seq_len, args.skip_bad,
                                    args.special_tokens_in_content)

    def setup_model(self, model: nn.Module) -> None:
        setup_reference(model, self.args)

    def batch_tokens(self) -> int:
        return 2 * self.args.batch_size * self.args.seq_len  # a chosen and a rejected row per pair

    def plan(self, train_data: list[Pair], *, padding_free: bool, env: DistEnv, budget_cap: int | None
             ) -> tuple[list[Pair], int]:
        return train_data, self.args.batch_size  # pairs in place of rows: micro_batch treats them alike

    def loss_module(self, model: nn.Module) -> nn.Module:
        return PreferenceLoss(model, self.config)

    def step_batches(self, rows: list[Pair], rows_per_batch: int, step: int, env: DistEnv, pad_id: int,
                     max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
        return step_batches(rows, self.args, step, env, pad_id, max_tokens)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the step's loss is a mean over: pairs."""
        return len(batch["input_ids"]) // 2

    def prepare_step(self, batches: list[dict[str, torch.Tensor]], step_count: int, env: DistEnv) -> None:
        if self.config.has_nll:
            set_nll_scale(batches, step_count, env)

    def train_stats(self, loss_module: nn.Module, env: DistEnv) -> dict[str, float]:
        sums = distributed.all_sum(distributed.unwrap(loss_module).pop_stats().tolist(), env)
        return stats_record(sums, nll=self.config.has_nll)

    def evaluate(self, run: Any, loss_module: nn.Module, pad_id: int) -> dict[str, float]:
        args = self.args
        return evaluate_pairs(loss_module, run.eval_rows, args.batch_size, pad_id, run.device, run.autocast_dtype,
                              args.loss_on == "all")
