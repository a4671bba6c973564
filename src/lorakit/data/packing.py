"""Token-budget batches: whole examples packed end to end, padding-free, up to N tokens each.

Chat and instruction data has lengths from tens to thousands of tokens. Padding a batch of
rows to its longest row spends compute on pads; packing to a token budget spends it on real
tokens. Each micro-batch here is one packed row of at most `tokens_per_batch` tokens, whose
position ids restart at 0 for each example; the GPU fast path runs it through variable-length
attention, so examples never attend to each other (`lorakit.train.fastpath.attention`).

    bins = budget_bins([len(e.input_ids) for e in examples], tokens_per_batch=8192, seed=0)
    rows = pack_to_budget(examples, 8192, seed=0)      # one TokenRow per bin

The bins are formed once per run (a function of the seed): best-fit decreasing, which fills
them to within a few tokens of the budget, ties broken by a seeded shuffle. Their order is
shuffled again every epoch by `data.micro_batch`, so every example is seen exactly once per
epoch, in an order that is a function of (seed, epoch).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorakit.data.sft import IGNORE, Example, TokenRow, as_sequences


def budget_bins(lengths: Sequence[int], tokens_per_batch: int, seed: int = 0) -> list[list[int]]:
    """Indices of the examples grouped into bins of at most `tokens_per_batch` tokens.

    Every index appears in exactly one bin; the result depends only on (lengths, budget, seed).
    """
    if tokens_per_batch <= 0:
        raise ValueError(f"--tokens-per-batch must be a positive integer, got {tokens_per_batch!r}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > tokens_per_batch]
    if too_long:
        i, n = too_long[0]
        raise ValueError(
            f"--tokens-per-batch {tokens_per_batch} is shorter than example {i} ({n} tokens); "
            f"it must be at least the longest example (set it >= --seq-len)"
        )
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    bins: list[list[int]] = []
    # (room left, bin number), sorted: the tightest bin an example fits in is found by bisection
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            bins.append([i])
            bisect.insort(room, (tokens_per_batch - n, len(bins) - 1))
        else:
            left, b = room.pop(at)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
    return bins


def pack_to_budget(examples: Sequence[Example], tokens_per_batch: int, seed: int = 0) -> list[TokenRow]:
    """One packed row per bin of `budget_bins`: position ids restart for each example, and an
    example's first token carries no label (it would be predicted from the example before)."""
    rows = []
    for members in budget_bins([len(e.input_ids) for e in examples], tokens_per_batch, seed):
        row = TokenRow([], [], [])
        for i in members:
            ex = examples[i]
            row.input_ids += ex.input_ids
            row.labels += [IGNORE] + ex.labels[1:]
            row.position_ids += list(range(len(ex.input_ids)))
        rows.append(row)
    return rows


@dataclass
class Layout:
    """How the training examples become micro-batches."""

    rows: list[TokenRow]
    rows_per_batch: int
    """Rows per micro-batch: batch_size, or one packed row per process with a token budget."""
    message: str | None = None
    """What was done, for the log."""


def layout(
    examples: Sequence[Example],
    *,
    packing: bool | None,
    tokens_per_batch: int | None,
    seq_len: int,
    batch_size: int,
    seed: int,
    padding_free: bool,
    world_size: int = 1,
    budget_cap: int | None = None,
) -> Layout:
    """The training rows and micro-batch size for the options given.

    packing None (auto) packs when the model runs packed rows padding-free (the GPU fast path)
    and the lengths vary. A token budget (`tokens_per_batch`, by default batch_size * seq_len
    where padding-free) makes each micro-batch one packed row of up to that many tokens per
    process; without one, examples are packed into rows of up to seq_len tokens, batch_size
    rows per micro-batch (the generic path attends through a block-diagonal mask instead).
    `budget_cap`: the most tokens per micro-batch that fit the device's memory (lorakit.train.memory).
    """
    lengths = [len(e.input_ids) for e in examples]
    if packing is None:
        packing = padding_free and len(set(lengths)) > 1
        if not packing:
            return Layout(as_sequences(examples, seq_len, False), batch_size)
    if not packing:
        if tokens_per_batch is not None:
            raise ValueError("--tokens-per-batch needs packing; drop it or pass --packing true")
        return Layout(as_sequences(examples, seq_len, False), batch_size)
    budget = tokens_per_batch or (batch_size * seq_len if padding_free else None)
    capped = budget is not None and budget_cap is not None and budget_cap < budget
    if capped:
        budget = budget_cap
    if budget is None:
        rows = as_sequences(examples, seq_len, True)
        return Layout(rows, batch_size, f"packed {len(examples)} examples into {len(rows)} sequences of up to {seq_len} tokens")
    if budget < seq_len:
        raise ValueError(f"--tokens-per-batch {budget} must be at least --seq-len {seq_len} (an example can be that long)")
    rows = pack_to_budget(examples, budget, seed)
    fill = sum(lengths) / (len(rows) * budget)
    message = (f"packed {len(examples)} examples into {len(rows)} padding-free batches of up to {budget} tokens "
               f"({100 * fill:.1f}% full; budget: {'memory auto' if capped else '--tokens-per-batch' if tokens_per_batch else '--batch-size x --seq-len'})")
    return Layout(rows, world_size, message)


def packed_mask(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The (B, 1, S, S) boolean attention mask of packed rows for a model's own attention:
    causal within each example (position ids restart at 0 for each), nothing across them.
    None when every row is one sequence (the model's causal attention needs no mask).

    The fast path never builds this (it runs variable-length attention); transformers'
    SDPA attention would otherwise let packed examples see the ones before them."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    example = starts.long().cumsum(1)  # (B, S): which example of its row each token belongs to
    width = position_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal).unsqueeze(1)
