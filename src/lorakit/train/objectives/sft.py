"""Supervised fine-tuning: the summed cross-entropy over the supervised tokens of each row,
and `SFT`, the objective the recipe runs for it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.packing import layout, packed_mask
from lorakit.data.sft import (
    IGNORE,
    TokenRow,
    as_sequences,
    collate,
    eval_batches,
    load_examples,
    micro_batch,
    split_rows,
)
from lorakit.train import distributed
from lorakit.train.distributed import DistEnv
from lorakit.train.fastpath import fused_loss_sum
from lorakit.train.runlog import log


def body_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The transformer body and the output head of a transformers causal LM, when separable.

    Models that post-process their logits (soft-capping, scaling) take the plain path.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None, None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model:
        return None, None
    return body, head


def _head_loss(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    # (N, vocab) logits only for the N supervised positions; fp32 for the softmax.
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def compute_loss(model: nn.Module, batch: dict[str, torch.Tensor], chunk: int = 2048) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over supervised positions, and their count.

    The output head runs only at positions that have a target, in chunks of `chunk`
    rows that are recomputed in the backward pass, so the (tokens, vocab) logits of the
    whole batch never exist at once. Most positions of a chat example are prompt, so
    this skips most of the head's work as well as its memory.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    mask = targets != IGNORE  # (B, T-1): position t predicts token t+1
    count = int(mask.sum())
    fused = fused_loss_sum(model, batch["input_ids"], labels, batch.get("position_ids"))
    if fused is not None:  # the GPU fast path is on for this model and this batch (lorakit.train.fastpath)
        return fused, count
    body, head = body_and_head(model)
    blocks = packed_mask(batch["position_ids"])  # packed rows: attention within each example only
    if body is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=blocks, use_cache=False).logits
        return F.cross_entropy(logits[:, :-1][mask].float(), targets[mask], reduction="sum"), count
    hidden = body(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=blocks, use_cache=False)[0]
    selected = hidden[:, :-1][mask]  # (N, d)
    wanted = targets[mask]  # (N,)
    if count <= chunk:
        return _head_loss(selected, wanted, head), count
    total = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_head_loss, selected[part], wanted[part], head, use_reentrant=False)
    return total, count


class LossModule(nn.Module):
    """`compute_loss` as a module, so DDP and FSDP2 see one forward per micro-batch."""

    def __init__(self, model: nn.Module, chunk: int) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return compute_loss(self.model, batch, self.chunk)[0]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, rows: list[TokenRow], batch_size: int, pad_id: int,
             device: torch.device, autocast_dtype: torch.dtype | None = None, chunk: int = 2048,
             loss_module: nn.Module | None = None) -> tuple[float, int]:
    """Mean loss per supervised token over `rows`, and the token count.

    `loss_module` (a wrapped `LossModule`) is what a multi-process run calls instead of
    `compute_loss`; every process then evaluates every row, in the same order.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for seqs in eval_batches(rows, batch_size):
        batch = to_device(collate(seqs, pad_id), device)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            if loss_module is not None:
                loss, n = loss_module(batch), int((batch["labels"][:, 1:] != IGNORE).sum())
            else:
                loss, n = compute_loss(model, batch, chunk)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1), count


class SFT:
    """Supervised fine-tuning on rows (text, prompt/completion or chat); `args` a `TrainArgs`."""

    name = "sft"
    second_adapter = False

    def __init__(self, args: Any) -> None:
        self.args = args

    def load_data(self, tokenizer) -> tuple[list, list[TokenRow] | None]:
        args = self.args
        train, stats = load_examples(args.data, tokenizer, args.seq_len, args.loss_on, args.skip_bad,
                                     special_tokens_in_content=args.special_tokens_in_content)
        log(stats.summary(f"train data {args.data}"))
        if not args.eval_data:
            return train, None
        examples, stats = load_examples(args.eval_data, tokenizer, args.seq_len, args.loss_on, args.skip_bad,
                                        special_tokens_in_content=args.special_tokens_in_content)
        log(stats.summary(f"eval data {args.eval_data}"))
        return train, as_sequences(examples, args.seq_len, False)

    def setup_model(self, model: nn.Module) -> None:
        pass

    def batch_tokens(self) -> int:
        return self.args.tokens_per_batch or self.args.batch_size * self.args.seq_len

    def plan(self, train_data: list, *, padding_free: bool, env: DistEnv, budget_cap: int | None) -> tuple[list, int]:
        """The training rows and rows per micro-batch (packed or padded: `data.packing.layout`)."""
        args = self.args
        plan = layout(train_data, packing=args.packing, tokens_per_batch=args.tokens_per_batch, seq_len=args.seq_len,
                      batch_size=args.batch_size, seed=args.seed, padding_free=padding_free,
                      world_size=env.world_size, budget_cap=budget_cap)
        if plan.message:
            log(plan.message)
        return plan.rows, plan.rows_per_batch

    def loss_module(self, model: nn.Module) -> nn.Module:
        return LossModule(model, self.args.loss_chunk)

    def step_batches(self, rows: list, rows_per_batch: int, step: int, env: DistEnv, pad_id: int,
                     max_tokens: int | None) -> list[dict[str, torch.Tensor]]:
        args = self.args
        return [collate(piece, pad_id)
                for k in range(args.grad_accum)
                for piece in split_rows(distributed.shard(micro_batch(rows, rows_per_batch, args.seed,
                                                                      step * args.grad_accum + k), env), max_tokens)]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """What the step's loss is a mean over: supervised tokens."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def prepare_step(self, batches: list[dict[str, torch.Tensor]], step_count: int, env: DistEnv) -> None:
        pass

    def train_stats(self, loss_module: nn.Module, env: DistEnv) -> dict[str, float]:
        return {}

    def evaluate(self, run: Any, loss_module: nn.Module, pad_id: int) -> dict[str, float]:
        args = self.args
        loss, _ = evaluate(run.model, run.eval_rows, args.batch_size, pad_id, run.device, run.autocast_dtype,
                           args.loss_chunk, loss_module=loss_module if run.env.enabled else None)
        return {"eval_loss": loss}
