"""Padding-free packing: packed attention against each sequence alone (forward and gradients),
the fast path on packed rows against the unpatched model run one sequence at a time, and the
token-budget batcher (every example once per epoch, deterministic for a seed)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.data.packing import budget_bins, layout, pack_to_budget
from lorakit.data.sft import IGNORE, Example, collate, epoch_order, micro_batch
from lorakit.train.fastpath import FastPathConfig, enable_fast_path, fused_loss_sum
from lorakit.train.fastpath.attention import (
    Segments,
    packed_attention,
    packed_attention_reference,
    segments_from_positions,
)
from lorakit.train.fastpath.decoder import forward_reason

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# the attention ------------------------------------------------------------------------------


def _block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """(T, T) boolean: token i may see token j when both are in one sequence and j <= i."""
    owner = torch.cat([torch.full((n,), s) for s, n in enumerate(lengths)])
    total = owner.numel()
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    return causal & (owner[:, None] == owner[None, :])


@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
def test_packed_attention_equals_a_block_diagonal_causal_mask(heads):
    hq, hkv = heads
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(total, hq, 8, generator=g, requires_grad=True)
    k = torch.randn(total, hkv, 8, generator=g, requires_grad=True)
    v = torch.randn(total, hkv, 8, generator=g, requires_grad=True)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    segments = Segments(torch.tensor(offsets, dtype=torch.int32), tuple(lengths))
    mask = _block_causal_mask(lengths)

    def dense(q, k, v):
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
            scale=0.3, enable_gqa=hq != hkv,
        )
        return o.transpose(0, 1)

    weights = torch.randn(total, hq, 8, generator=g)
    results = []
    for fn in (dense, lambda q, k, v: packed_attention_reference(q, k, v, segments, 0.3),
               lambda q, k, v: packed_attention(q, k, v, segments, 0.3)):
        out = fn(q, k, v)
        results.append((out, torch.autograd.grad((out * weights).sum(), (q, k, v))))
    (ref, ref_grads), *others = results
    for out, grads in others:
        assert _rel(out, ref) < 1e-6
        for got, want in zip(grads, ref_grads, strict=True):
            assert _rel(got, want) < 1e-6


def test_segments_from_positions():
    plain = torch.arange(6).repeat(2, 1)
    assert segments_from_positions(plain) is None
    # two packed rows, the second right-padded: its pads continue its last sequence
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 0, 1, 2, 3]])
    seg = segments_from_positions(positions)
    assert seg.lengths == (3, 2, 1, 2, 4)
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12]
    assert seg.cu_seqlens.dtype == torch.int32 and seg.max_len == 4


# the fast path on packed rows ----------------------------------------------------------------


def _adapted_llama(dtype=torch.float32):
    model = tiny_llama(dtype=dtype).train()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=ALL))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so every adapter gradient is exercised
            nn.init.normal_(p, std=0.1)
    return model


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 3] = [IGNORE] * (n // 3)  # a prompt without loss
        out.append(Example(ids, labels))
    return out


def _alone(model: nn.Module, examples: list[Example]) -> tuple[torch.Tensor, dict]:
    """Summed loss of each example run on its own through the unpatched model, and the grads."""
    total = 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor(ex.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1]
        total = total + F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE)
    total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "config,rows",
    [
        (FastPathConfig(recompute="none"), 1),
        (FastPathConfig(recompute="all", keep_layers=1), 1),
        (FastPathConfig(recompute="all"), 2),
    ],
    ids=["no-recompute", "recompute-keep1", "two-padded-rows"],
)
def test_fast_path_on_packed_rows_equals_each_sequence_alone(config, rows):
    model = _adapted_llama()
    reference = copy.deepcopy(model)
    examples = _examples([7, 2, 11, 5, 9, 4])
    ref_loss, ref_grads = _alone(reference, examples)

    assert enable_fast_path(model, config).enabled
    budget = 40 if rows == 1 else 22
    packed = pack_to_budget(examples, budget, seed=3)
    assert len(packed) == rows
    batch = collate(packed, pad_id=0)
    assert forward_reason(model, batch["input_ids"], None, batch["position_ids"]) is None
    loss = fused_loss_sum(model, batch["input_ids"], batch["labels"], batch["position_ids"])
    loss.backward()
    # fp32 throughout: agreement to fp32 rounding (a token attending across a boundary, or a
    # position not restarting, changes the loss at the 1e-2 level)
    assert _rel(loss, ref_loss) < 1e-6
    count = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, ref_grads[name]) < 1e-5, name
            count += 1
    assert count == 2 * 7 * 2


def test_packed_forward_gives_the_mean_over_supervised_tokens():
    model = _adapted_llama()
    examples = _examples([6, 10, 3])
    ref_sum, _ = _alone(copy.deepcopy(model), examples)
    supervised = sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
    assert enable_fast_path(model).enabled
    batch = collate(pack_to_budget(examples, 64), pad_id=0)
    out = model(**batch)
    assert out.logits is None  # the fused path ran
    assert _rel(out.loss, ref_sum / supervised) < 1e-6


def test_positions_that_are_neither_plain_nor_packed_take_the_generic_path():
    model = _adapted_llama()
    ids = torch.randint(0, 128, (1, 6))
    bad = torch.tensor([[0, 1, 3, 4, 5, 6]])
    reason = forward_reason(model, ids, None, bad)
    assert reason == "position_ids neither count 0..S-1 nor restart at 0 for each packed sequence"
    assert enable_fast_path(model).enabled
    assert fused_loss_sum(model, ids, ids, bad) is None


# the token-budget batcher ----------------------------------------------------------------------


def _long_tailed(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(512, max(2, int(rng.lognormvariate(4.0, 1.0)))) for _ in range(n)]


def test_budget_bins_hold_every_example_once_within_the_budget():
    lengths = _long_tailed(2000, seed=1)
    bins = budget_bins(lengths, 1024, seed=5)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1024 for b in bins)
    # best-fit decreasing fills the bins: at most one bin's worth of room is wasted overall
    assert len(bins) <= sum(lengths) / 1024 + 2


def test_budget_bins_are_a_function_of_the_seed():
    lengths = [3, 3, 3, 5, 5, 7, 2, 2, 2, 2] * 20
    assert budget_bins(lengths, 16, seed=4) == budget_bins(lengths, 16, seed=4)
    assert budget_bins(lengths, 16, seed=4) != budget_bins(lengths, 16, seed=5)


def test_each_epoch_sees_every_example_exactly_once():
    examples = [Example([i + 3] + [1] * (n - 1), [IGNORE] + [1] * (n - 1))
                for i, n in enumerate(_long_tailed(300, seed=2))]
    first_tokens = {e.input_ids[0] for e in examples}
    assert len(first_tokens) == len(examples)
    rows = pack_to_budget(examples, 600, seed=0)
    for epoch in range(2):
        seen = []
        for index in range(epoch * len(rows), (epoch + 1) * len(rows)):
            (row,) = micro_batch(rows, 1, seed=0, index=index)
            starts = [t for t, p in zip(row.input_ids, row.position_ids, strict=True) if p == 0]
            seen += starts
        assert sorted(seen) == sorted(first_tokens)
    assert epoch_order(len(rows), 0, 0) != epoch_order(len(rows), 0, 1)


def test_budget_shorter_than_an_example_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--tokens-per-batch 8 is shorter than example 1 \(9 tokens\)"):
        budget_bins([3, 9, 2], 8)
    with pytest.raises(ValueError, match="--tokens-per-batch must be a positive integer, got 0"):
        budget_bins([3], 0)


def test_layout_packs_by_default_only_where_padding_free():
    examples = _examples([5, 9, 4, 12])
    common = dict(tokens_per_batch=None, seq_len=16, batch_size=2, seed=0)
    plain = layout(examples, packing=None, padding_free=False, **common)
    assert len(plain.rows) == 4 and plain.rows_per_batch == 2 and plain.message is None
    auto = layout(examples, packing=None, padding_free=True, **common)
    assert auto.rows_per_batch == 1 and all(len(r.input_ids) <= 32 for r in auto.rows)
    assert sum(len(r.input_ids) for r in auto.rows) == 30
    assert "padding-free batches of up to 32 tokens" in auto.message
    same = _examples([6, 6, 6])
    assert len(layout(same, packing=None, padding_free=True, **common).rows) == 3  # nothing to gain
    with pytest.raises(ValueError, match="--tokens-per-batch needs packing"):
        layout(examples, packing=False, padding_free=True, **{**common, "tokens_per_batch": 64})
    with pytest.raises(ValueError, match="--tokens-per-batch 8 must be at least --seq-len 16"):
        layout(examples, packing=True, padding_free=True, **{**common, "tokens_per_batch": 8})


def test_generic_path_on_packed_rows_equals_each_sequence_alone():
    """The recipe's loss off the fast path (the CPU, other models) masks packed examples apart."""
    from lorakit.train.objectives.sft import compute_loss

    model = _adapted_llama()
    reference = copy.deepcopy(model)
    examples = _examples([7, 2, 11, 5, 9, 4])
    ref_loss, ref_grads = _alone(reference, examples)
    batch = collate(pack_to_budget(examples, 22, seed=1), pad_id=0)
    assert batch["input_ids"].shape[0] == 2  # two packed rows, one right-padded
    loss, count = compute_loss(model, batch)
    loss.backward()
    assert count == sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in examples)
    assert _rel(loss, ref_loss) < 1e-6
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.grad, ref_grads[name]) < 1e-5, name


def test_packed_mask_is_none_for_plain_rows():
    from lorakit.data.packing import packed_mask

    assert packed_mask(torch.arange(5).repeat(3, 1)) is None
    mask = packed_mask(torch.tensor([[0, 1, 0, 1, 2]]))
    assert mask.shape == (1, 1, 5, 5)
    assert mask[0, 0].tolist()[3] == [False, False, True, True, False]


def test_lorakit_train_packs_to_a_token_budget(tmp_path, tiny_model_dir, chat_data, capsys):
    """The command line end to end on the CPU (the generic path): one packed row per micro-batch,
    every example once per epoch, the loss falling."""
    import json

    from lorakit.cli import main

    train, _ = chat_data
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(train), "--output", str(out),
                 "--rank", "4", "--alpha", "8", "--epochs", "3", "--lr", "3e-2", "--seq-len", "64",
                 "--packing", "--tokens-per-batch", "128", "--log-every", "1", "--device", "cpu"])
    assert code == 0
    logged = capsys.readouterr()
    text = logged.out + logged.err
    assert "packed 24 examples into" in text and "padding-free batches of up to 128 tokens" in text
    bins = int(text.split("packed 24 examples into ")[1].split()[0])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 * bins  # one micro-batch (one packed row) per step, three epochs
    assert records[-1]["epoch"] == 3.0
    assert records[-1]["loss"] < records[0]["loss"]


def test_the_packed_stream_is_a_function_of_the_seed():
    """What lorakit train feeds the model with a token budget (layout, then micro_batch for each step
    index) is the same stream when built again from the same seed, and another with another seed."""
    examples = [Example([i + 3] + [1] * (n - 1), [IGNORE] + [1] * (n - 1))
                for i, n in enumerate(_long_tailed(200, seed=3))]

    def stream(seed: int) -> list[list[int]]:
        plan = layout(examples, packing=True, tokens_per_batch=600, seq_len=512, batch_size=1, seed=seed,
                      padding_free=True)
        steps = 2 * len(plan.rows)  # two epochs
        return [row.input_ids for i in range(steps) for row in micro_batch(plan.rows, plan.rows_per_batch, seed, i)]

    first = stream(11)
    assert first == stream(11)
    assert first != stream(12)
    starts = [t for ids in first for t in ids if t != 1]
    assert sorted(starts) == sorted(2 * [i + 3 for i in range(len(examples))])  # each example once an epoch
