"""GRPO: reinforcement learning with verifiable rewards, as an objective the recipe runs.

A step takes `batch_size * grad_accum` prompts (split across processes under torchrun); each
micro-batch is `batch_size` prompts x `num_generations` (G) completions. At the first step of
each rollout the objective

1. samples G completions per prompt from the model being trained, through the rollout source
   the run was given (`RolloutSource`; `lorakit train` passes the serving engine's), with a seed
   that is a function of (--seed, rollout index, process) only, so a rollout is a pure function
   of the seed, the step and the adapter's weights;
2. scores them with the `--reward` functions (lorakit.evaluation.rewards), weights and sums;
3. turns rewards into group-normalised advantages, and (with --beta > 0) scores the completions
   under the base, i.e. this model with its adapter disabled (no copy);

and keeps the result for `--updates-per-rollout` optimizer steps (TRL's num_iterations). The
old policy's log-probs are the rollout pass's own. The loss is `grpo_loss.token_loss_sum`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.adapters.inject import disable_adapters
from lorakit.data.prompts import PromptRow, load_prompt_rows
from lorakit.data.sft import IGNORE, micro_batch
from lorakit.evaluation.metrics import exact, greedy_answers
from lorakit.evaluation.rewards import parse_rewards, score
from lorakit.train import distributed
from lorakit.train.distributed import DistEnv
from lorakit.train.fastpath import fused_token_logps
from lorakit.train.objectives.grpo_loss import (
    LOSS_TYPES,
    SCALE_REWARDS,
    LossConfig,
    advantages,
    combine_rewards,
    loss_count,
    token_loss_sum,
)
from lorakit.train.objectives.sft import body_and_head
from lorakit.train.precision import autocast_dtype_for
from lorakit.train.runlog import log

SAMPLES_PER_ROLLOUT = 4
"""Completions of each rollout's first prompt written to samples.jsonl."""


@dataclass
class Rollout:
    """One sampled completion, as a rollout source returns it."""

    completion_ids: list[int]
    """The sampled tokens, EOS included when it was sampled."""
    logps: list[float]
    """log-prob of each token under log_softmax(logits / temperature) in the rollout pass (top-p not applied)."""
    finish_reason: str
    """stop (EOS sampled) or length (max_new_tokens reached)."""


class RolloutSource(Protocol):
    """What samples completions from the live model being trained."""

    def generate(self, prompts: Sequence[list[int]], *, num_generations: int, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int) -> list[Any]:
        """`num_generations` completions of each prompt, grouped: prompt i's at [i*G, (i+1)*G);
        each item has `completion_ids`, `logps` and `finish_reason` (see `Rollout`). The same
        (prompts, seed, weights) give the same completions."""
        ...

    def close(self) -> None: ...


RolloutFactory = Callable[[nn.Module, Any], RolloutSource]
"""Builds the rollout source of a run from (model, tokenizer)."""


def rollout_seed(seed: int, rollout: int, rank: int) -> int:
    """The sampling seed of rollout `rollout` on process `rank`: a function of these alone."""
    return (seed * 1_000_003 + rollout * 7919 + rank * 104_729) % (2**62)


# options -----------------------------------------------------------------------------------------

GRPO_OPTIONS = ("reward", "reward_weights", "num_generations", "max_completion_tokens", "temperature", "top_p",
                "scale_rewards", "loss_type", "epsilon", "epsilon_high", "updates_per_rollout")
GRPO_DEFAULTS = {"reward": None, "reward_weights": None, "num_generations": 8, "max_completion_tokens": 256,
                 "temperature": 1.0, "top_p": 1.0, "scale_rewards": "group", "loss_type": "dapo", "epsilon": 0.2,
                 "epsilon_high": None, "updates_per_rollout": 1}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_grpo_args(args: Any) -> None:
    """`TrainArgs`' checks of the GRPO options; the errors name the option, the value and what is accepted."""
    for name in ("num_generations", "max_completion_tokens", "updates_per_rollout"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {args.loss_type!r}")
    if args.scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got {args.scale_rewards!r}")
    if args.num_generations < 2 and args.scale_rewards != "none":
        raise ValueError(f"--num-generations {args.num_generations} leaves each group one completion, whose advantage "
                         f"is always 0 with --scale-rewards {args.scale_rewards}; give --num-generations >= 2")
    if not (_number(args.temperature) and args.temperature > 0):
        raise ValueError(f"--temperature must be a finite number > 0 for GRPO's rollouts, got {args.temperature!r}")
    if not (_number(args.top_p) and 0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p!r}")
    if not (_number(args.epsilon) and 0 < args.epsilon < 1):
        raise ValueError(f"--epsilon must be a number in (0, 1), got {args.epsilon!r}")
    if args.epsilon_high is None:
        args.epsilon_high = args.epsilon
    if not (_number(args.epsilon_high) and args.epsilon_high >= args.epsilon):
        raise ValueError(f"--epsilon-high must be a finite number >= --epsilon ({args.epsilon}), "
                         f"got {args.epsilon_high!r}")
    if not (_number(args.beta) and args.beta >= 0):
        raise ValueError(f"--beta must be a finite number >= 0 for --objective grpo (0: no KL term), got {args.beta!r}")
    if args.max_completion_tokens >= args.seq_len:
        raise ValueError(f"--max-completion-tokens {args.max_completion_tokens} leaves no room for the prompt in "
                         f"--seq-len {args.seq_len}; give --seq-len > --max-completion-tokens")
    if args.strategy == "fsdp":
        raise ValueError("--objective grpo runs under torchrun with --strategy ddp (each process rolls out its own "
                         "prompts on the whole model), got --strategy fsdp")
    if args.packing:
        raise ValueError("--packing applies to --objective sft only; grpo scores whole completions, got --packing")
    if args.label_smoothing or args.rpo_alpha or args.reference != "auto":
        raise ValueError("--label-smoothing, --rpo-alpha and --reference apply to --objective dpo/orpo; "
                         "grpo's reference is the base (its --beta weighs the KL to it)")
    parse_rewards(args.reward or [], args.reward_weights)


def check_unused(args: Any) -> None:
    """The GRPO options apply to --objective grpo only: refuse them elsewhere, by name."""
    given = [name for name in GRPO_OPTIONS if getattr(args, name) != GRPO_DEFAULTS[name]]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --objective grpo only, "
                         f"got --objective {args.objective}")


# log-probs of completions --------------------------------------------------------------------


def _head_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, temperature: float) -> torch.Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # (N, vocab)
    return -F.cross_entropy(logits, targets, reduction="none")


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], temperature: float = 1.0,
                     chunk: int = 2048) -> torch.Tensor:
    """(n, L) log-probs of the completion tokens under log_softmax(logits / temperature); 0 at padding.

    `batch`: input_ids and position_ids (n, T), prompt then completion then padding; and
    completion_ids, completion_mask, completion_index (n, L), the last the position whose
    logits predict each completion token. The head runs only at those positions.
    """
    index, targets = batch["completion_index"], batch["completion_ids"]
    mask = batch["completion_mask"].bool()
    # On the GPU fast path: the fused decoder and the chunked head; label t + 1 is predicted at t.
    labels = torch.full_like(batch["input_ids"], IGNORE)
    rows, cols = mask.nonzero(as_tuple=True)
    labels[rows, index[rows, cols] + 1] = targets[rows, cols]
    fused = fused_token_logps(model, batch["input_ids"], labels, batch["position_ids"], temperature)
    if fused is not None:
        return fused.gather(1, index) * mask
    body, head = body_and_head(model)
    if body is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        picked = logits.gather(1, index.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))[mask]
        picked = picked.to(torch.promote_types(picked.dtype, torch.float32)) / temperature
        values = -F.cross_entropy(picked, targets[mask], reduction="none")
    else:
        hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)[0]
        selected = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))[mask]  # (N, d)
        wanted = targets[mask]
        if len(wanted) <= chunk:
            values = _head_logps(selected, wanted, head, temperature)
        else:
            values = torch.cat([checkpoint(_head_logps, selected[i : i + chunk], wanted[i : i + chunk], head,
                                           temperature, use_reentrant=False) for i in range(0, len(wanted), chunk)])
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def collate_rollouts(prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int
                     ) -> dict[str, torch.Tensor]:
    """Sequences prompt + completion, right-padded, and where each completion token sits."""
    n = len(prompts)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    length = max(max(len(c) for c in completions), 1)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    ids = torch.zeros((n, length), dtype=torch.long)
    index = torch.zeros((n, length), dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        index[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        mask[i, : len(c)] = 1
    position_ids = torch.arange(width).expand(n, width).clone()
    return {"input_ids": input_ids, "position_ids": position_ids, "completion_ids": ids,
            "completion_index": index, "completion_mask": mask}


STATS = ("kl", "low", "high", "tokens")


class GRPOLoss(nn.Module):
    """One micro-batch of completions -> the summed loss (`grpo_loss.token_loss_sum`).

    A module, so DDP sees one forward per micro-batch; `stats` accumulates the sums behind the
    logged kl and clip ratios until `pop_stats`.
    """

    def __init__(self, model: nn.Module, config: LossConfig, temperature: float, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.temperature = temperature
        self.chunk = chunk
        self.stats = torch.zeros(len(STATS), dtype=torch.float64)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps = completion_logps(self.model, batch, self.temperature, self.chunk)
        total, stats = token_loss_sum(logps, batch["old_logps"].to(logps.dtype), batch["advantages"],
                                      batch["completion_mask"], self.config, batch.get("ref_logps"))
        self.stats += torch.tensor([stats.kl, stats.low_clipped, stats.high_clipped, stats.tokens], dtype=torch.float64)
        return total

    def pop_stats(self) -> torch.Tensor:
        out, self.stats = self.stats, torch.zeros_like(self.stats)
        return out


def _split(n: int, width: int, max_tokens: int | None) -> list[slice]:
    """Pieces of at most max_tokens padded tokens (at least one sequence each)."""
    per = n if max_tokens is None else max(1, max_tokens // max(width, 1))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def _mean_std(total: float, squares: float, n: float) -> tuple[float, float]:
    """Mean and Bessel-corrected std from a sum, a sum of squares and a count."""
    mean = total / max(n, 1.0)
    var = (squares - n * mean**2) / (n - 1) if n > 1 else 0.0
    return mean, max(var, 0.0) ** 0.5


def _repeat(values: Sequence[Any], times: int) -> list[Any]:
    return [v for v in values for _ in range(times)]


class GRPO:
    """GRPO on prompt rows, as the objective the recipe runs; `args` a `TrainArgs`."""

    name = "grpo"
    second_adapter = False
    fast_path = True
    """Completion log-probs take the GPU fast path where the model does (the fused decoder and
    chunked head, at the sampling temperature), else the generic one."""

    def __init__(self, args: Any, rollouts: RolloutFactory | None = None) -> None:
        if rollouts is None:
            raise ValueError("--objective grpo needs a rollout source: lorakit train passes the serving engine's; "
                             "from Python, call recipe.train(args, rollouts=lorakit.serve.rollouts.Rollouts)")
        self.args = args
        self.factory = rollouts
        self.rewards, self.weights = parse_rewards(args.reward or [], args.reward_weights)
        self.config = LossConfig(args.loss_type, args.epsilon, args.epsilon_high, args.beta, args.max_completion_tokens)
        self.updates_per_batch = args.updates_per_rollout
        """Optimizer steps each rollout serves: an epoch of prompts takes this many times the steps."""
        self.tokenizer: Any = None
        self.model: nn.Module | None = None
        self.source: RolloutSource | None = None
        self.buffer: list[dict[str, torch.Tensor]] | None = None
        self.buffer_rollout = -1
        self.figures = torch.zeros(0, dtype=torch.float64)  # rollout sums, for train_stats
        self.rollout_time = 0.0
        self.train_time = 0.0
        self.train_began: float | None = None
        self.samples_path = Path(args.output) / "samples.jsonl"

    # data and model ---------------------------------------------------------------------------

    def load_data(self, tokenizer) -> tuple[list[PromptRow], list[PromptRow] | None]:
        args = self.args
        self.tokenizer = tokenizer
        limit = args.seq_len - args.max_completion_tokens
        train, skipped, cut = load_prompt_rows(args.data, tokenizer, limit, args.skip_bad, args.special_tokens_in_content)
        log(f"train data {args.data}: {len(train)} prompts" + (f", {skipped} bad rows skipped" if skipped else "")
            + (f", {cut} cut to their last {limit} tokens (--seq-len - --max-completion-tokens)" if cut else ""))
        self._check_references(train, args.data)
        held = None
        if args.eval_data:
            held, skipped, _ = load_prompt_rows(args.eval_data, tokenizer, limit, args.skip_bad,
                                                args.special_tokens_in_content)
            self._check_references(held, args.eval_data)
            log(f"eval data {args.eval_data}: {len(held)} prompts")
        names = ", ".join(f"{w:g} x {r.name}" for r, w in zip(self.rewards, self.weights, strict=True))
        log(f"GRPO: {args.num_generations} completions per prompt, rewards {names}, loss {args.loss_type}, "
            f"beta {args.beta:g}" + (" (KL to the base: the model with its adapter disabled)" if args.beta else ""))
        return train, held

    def _check_references(self, rows: list[PromptRow], source: str) -> None:
        builtins = [r for r in self.rewards if r.needs_reference]
        if not builtins:
            return
        for i, row in enumerate(rows):
            if row.reference is None:
                raise ValueError(f"--reward {builtins[0].spec} compares with a reference answer; row {i + 1} of "
                                 f"{source} has none (a 'reference' or 'completion' column, or a final assistant turn)")
            if any(r.spec == "json" for r in builtins):
                try:
                    json.loads(row.reference)
                except json.JSONDecodeError:
                    raise ValueError(f"--reward json: the reference answer of row {i + 1} of {source} is not JSON: "
                                     f"{row.reference!r:.80}") from None

    def setup_model(self, model: nn.Module) -> None:
        self.model = model

    def batch_tokens(self) -> int:
        return self.args.batch_size * self.args.num_generations * self.args.seq_len

    def plan(self, train_data: list[PromptRow], *, padding_free: bool, env: DistEnv, budget_cap: int | None
             ) -> tuple[list[PromptRow], int]:
        return train_data, self.args.batch_size  # prompts per micro-batch (all processes together)

    def loss_module(self, model: nn.Module) -> nn.Module:
        return GRPOLoss(model, self.config, self.args.temperature, self.args.loss_chunk)

    # rollouts -----------------------------------------------------------------------------------

    def step_batches(self, rows: list[PromptRow], rows_per_batch: int, step: int, env: DistEnv, pad_id: int,
                     max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
        """This process's batches of optimizer step `step`: those of rollout step // updates_per_rollout."""
        self._end_training_time()
        rollout = step // self.updates_per_batch
        if self.buffer is None or self.buffer_rollout != rollout:
            self.buffer = self._rollout(rows, rollout, step, env, pad_id, max_tokens)
            self.buffer_rollout = rollout
        return self.buffer

    @torch.no_grad()
    def _rollout(self, rows: list[PromptRow], rollout: int, step: int, env: DistEnv, pad_id: int,
                 max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
        args, model = self.args, self.model
        assert model is not None  # setup_model ran
        if self.source is None:
            self.source = self.factory(model, self.tokenizer)
        G = args.num_generations
        first = rollout * args.grad_accum
        groups = [distributed.shard(micro_batch(rows, args.batch_size, args.seed, first + k), env)
                  for k in range(args.grad_accum)]
        prompts = [p for group in groups for p in group]
        began = time.perf_counter()
        was_training = model.training
        model.eval()
        devices = [next(model.parameters()).device] if next(model.parameters()).device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the run's own random numbers stay untouched
            out = self.source.generate([p.ids for p in prompts], num_generations=G,
                                       max_new_tokens=args.max_completion_tokens, temperature=args.temperature,
                                       top_p=args.top_p, seed=rollout_seed(args.seed, rollout, env.rank))
        model.train(was_training)
        if len(out) != len(prompts) * G:
            raise ValueError(f"the rollout source returned {len(out)} completions for {len(prompts)} prompts x "
                             f"{G} generations")
        self.rollout_time += time.perf_counter() - began
        completions = [list(r.completion_ids) for r in out]
        rewards, per_function = self._score(prompts, completions, env)
        adv, zero_std = self._advantages(rewards, env)
        self._note_rollout(prompts, completions, out, rewards, per_function, adv, zero_std, step, env)
        prompt_ids = _repeat([p.ids for p in prompts], G)
        batches, start = [], 0
        for group in groups:
            n = len(group) * G
            part = collate_rollouts(prompt_ids[start : start + n], completions[start : start + n], pad_id)
            old = torch.zeros(part["completion_mask"].shape, dtype=torch.float32)
            for i, r in enumerate(out[start : start + n]):
                old[i, : len(r.logps)] = torch.tensor(r.logps, dtype=torch.float32)
            part["old_logps"] = old
            part["advantages"] = adv[start : start + n].float()
            if self.config.beta:
                part["ref_logps"] = self._reference_logps(part)
            for piece in _split(n, part["input_ids"].shape[1], max_tokens):
                batches.append(self._trim({k: v[piece] for k, v in part.items()}))
            start += n
        return batches

    @staticmethod
    def _trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A piece padded to its own longest sequence and completion only."""
        width = int((batch["completion_index"].max() + 2).item())
        length = max(int(batch["completion_mask"].sum(-1).max()), 1)
        width = max(width, 1)
        out = {}
        for key, value in batch.items():
            if key in ("input_ids", "position_ids"):
                out[key] = value[:, :width].contiguous()
            elif value.dim() == 2:
                out[key] = value[:, :length].contiguous()
            else:
                out[key] = value
        return out

    def _reference_logps(self, part: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base's log-probs of the completions, once per rollout: eval mode, the loop's autocast."""
        model = self.model
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in part.items()}
        dtype = autocast_dtype_for(self.args.precision, device)
        was_training = model.training
        model.eval()
        try:
            with disable_adapters(model), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                         enabled=dtype is not None):
                return completion_logps(model, batch, self.args.temperature, self.args.loss_chunk).float().cpu()
        finally:
            model.train(was_training)

    def _score(self, prompts: list[PromptRow], completions: list[list[int]], env: DistEnv
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) weighted rewards (NaN: unscorable) and (N, K) per-function rewards (NaN: None)."""
        G = self.args.num_generations
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        shown = [[{"role": "assistant", "content": t}] if p.conversational else t
                 for p, t in zip(_repeat(prompts, G), texts, strict=True)]
        keys = sorted({k for p in prompts for k in p.columns} - {"reference"})
        columns = {k: _repeat([p.columns.get(k) for p in prompts], G) for k in keys}
        columns["reference"] = _repeat([p.reference for p in prompts], G)
        prompt_values = _repeat([p.prompt for p in prompts], G)
        per_function = torch.tensor([score(r, prompt_values, shown, columns) for r in self.rewards],
                                    dtype=torch.float32).T.reshape(len(texts), len(self.rewards))
        return combine_rewards(per_function, self.weights), per_function

    def _advantages(self, rewards: torch.Tensor, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
        batch_std = None
        if self.args.scale_rewards == "batch" and env.enabled:  # the std of the step's rewards on all processes
            valid = rewards[~rewards.isnan()].double()
            total, count = distributed.all_sum([float(valid.sum()), float(valid.numel())], env)
            mean = total / max(count, 1.0)
            squares = distributed.all_sum([float(((valid - mean) ** 2).sum())], env)[0]
            batch_std = (squares / (count - 1)) ** 0.5 if count > 1 else float("nan")
        return advantages(rewards, self.args.num_generations, self.args.scale_rewards, batch_std)

    def _note_rollout(self, prompts: list[PromptRow], completions: list[list[int]], out: list[Any],
                      rewards: torch.Tensor, per_function: torch.Tensor, adv: torch.Tensor, zero_std: torch.Tensor,
                      step: int, env: DistEnv) -> None:
        """Add the rollout's sums to the window's figures; write a few samples."""
        lengths = torch.tensor([len(c) for c in completions], dtype=torch.float64)
        valid = ~per_function.isnan()
        per_sum = torch.where(valid, per_function, 0).double().sum(0)
        per_sq = torch.where(valid, per_function, 0).double().pow(2).sum(0)
        clean = torch.nan_to_num(rewards.double(), nan=0.0)
        G = self.args.num_generations
        sums = [float(clean.sum()), float((~rewards.isnan()).sum()), float(clean.pow(2).sum()), float(zero_std.float().sum()),
                float(lengths.sum()), float(sum(r.finish_reason == "length" for r in out)), float(len(completions)),
                *per_sum.tolist(), *per_sq.tolist(), *valid.double().sum(0).tolist()]
        new = torch.tensor(sums, dtype=torch.float64)
        self.figures = new if self.figures.numel() == 0 else self.figures + new
        if env.is_main and prompts:
            texts = self.tokenizer.batch_decode(completions[:G][:SAMPLES_PER_ROLLOUT], skip_special_tokens=True)
            prompt = prompts[0].prompt if isinstance(prompts[0].prompt, str) else prompts[0].prompt[-1]["content"]
            with self.samples_path.open("a") as f:
                for i, text in enumerate(texts):
                    f.write(json.dumps({"step": step + 1, "prompt": prompt, "completion": text,
                                        "reward": None if rewards[i].isnan() else float(rewards[i]),
                                        "advantage": float(adv[i])}) + "\n")

    # the loop's other questions -------------------------------------------------------------------

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the step's loss is divided by: completions (grpo), completions x max_completion_tokens
        (dr_grpo) or completion tokens (dapo)."""
        return loss_count(batch["completion_mask"], self.config)

    def prepare_step(self, batches: list[dict[str, torch.Tensor]], step_count: int, env: DistEnv) -> None:
        self.train_began = time.perf_counter()

    def _end_training_time(self) -> None:
        if self.train_began is not None:
            self.train_time += time.perf_counter() - self.train_began
            self.train_began = None

    def train_stats(self, loss_module: nn.Module, env: DistEnv) -> dict[str, float]:
        self._end_training_time()
        token_sums = distributed.all_sum(distributed.unwrap(loss_module).pop_stats().tolist(), env)
        k = len(self.rewards)
        figures = self.figures if self.figures.numel() else torch.zeros(7 + 3 * k, dtype=torch.float64)
        sums = distributed.all_sum(figures.tolist(), env)
        self.figures = torch.zeros(0, dtype=torch.float64)
        times = distributed.all_sum([self.rollout_time, self.train_time], env)
        self.rollout_time = self.train_time = 0.0
        kl, low, high, tokens = token_sums
        record: dict[str, float] = {}
        count = sums[6]
        if count:  # the window's rollouts on all processes, as TRL logs them (std: of every reward)
            record["reward"], record["reward_std"] = _mean_std(sums[0], sums[2], sums[1])
            record["frac_reward_zero_std"] = sums[3] / count
            for i, reward in enumerate(self.rewards):
                mean, std = _mean_std(sums[7 + i], sums[7 + k + i], sums[7 + 2 * k + i])
                record[f"rewards/{reward.name}/mean"], record[f"rewards/{reward.name}/std"] = mean, std
            record["completions/mean_length"] = sums[4] / count
            record["completions/clipped_ratio"] = sums[5] / count
            record["rollout_tokens_per_s"] = round(sums[4] / max(times[0], 1e-9), 1)
        if self.config.beta:
            record["kl"] = kl / max(tokens, 1.0)
        record["clip_ratio/low_mean"] = low / max(tokens, 1.0)
        record["clip_ratio/high_mean"] = high / max(tokens, 1.0)
        record["clip_ratio/region_mean"] = (low + high) / max(tokens, 1.0)
        record["train_tokens_per_s"] = round(tokens / max(times[1], 1e-9), 1)
        return record

    def evaluate(self, run: Any, loss_module: nn.Module, pad_id: int) -> dict[str, float]:
        """Greedy answers to every eval prompt: eval_reward (weighted, mean over scorable answers),
        eval_rewards/<name>/mean, eval_exact (answers equal to their references), and
        eval_loss = -eval_reward (lower is better, as for every objective)."""
        rows: list[PromptRow] = run.eval_rows
        answers = greedy_answers(run.model, self.tokenizer, [p.ids for p in rows], self.args.max_completion_tokens,
                                 self.args.batch_size, run.autocast_dtype)
        shown = [[{"role": "assistant", "content": a}] if p.conversational else a
                 for p, a in zip(rows, answers, strict=True)]
        keys = sorted({k for p in rows for k in p.columns} - {"reference"})
        columns = {k: [p.columns.get(k) for p in rows] for k in keys}
        columns["reference"] = [p.reference for p in rows]
        per_function = torch.tensor([score(r, [p.prompt for p in rows], shown, columns) for r in self.rewards],
                                    dtype=torch.float64).T.reshape(len(rows), len(self.rewards))
        rewards = combine_rewards(per_function, self.weights)
        mean = float(torch.nanmean(rewards)) if (~rewards.isnan()).any() else 0.0
        out = {"eval_loss": -mean, "eval_reward": mean}
        for i, reward in enumerate(self.rewards):
            column = per_function[:, i]
            out[f"eval_rewards/{reward.name}/mean"] = float(torch.nanmean(column)) if (~column.isnan()).any() else 0.0
        with_reference = [(a, p.reference) for a, p in zip(answers, rows, strict=True) if p.reference is not None]
        if with_reference:
            out["eval_exact"] = sum(exact(a, r) for a, r in with_reference) / len(with_reference)
        return out

    # checkpoints ----------------------------------------------------------------------------------

    def state_dict(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint at `step` needs beyond the recipe's: the rollout, when later steps reuse it."""
        if step % self.updates_per_batch == 0 or self.buffer is None:
            return None
        return {"rollout": self.buffer_rollout, "batches": self.buffer}

    def load_state_dict(self, state: dict[str, Any] | None, step: int) -> None:
        if step % self.updates_per_batch == 0:
            return
        if state is None:
            raise ValueError(f"the checkpoint at step {step} is inside a rollout of --updates-per-rollout "
                             f"{self.updates_per_batch} but holds no rollout; it cannot resume exactly")
        self.buffer_rollout = int(state["rollout"])
        self.buffer = list(state["batches"])

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
