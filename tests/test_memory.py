"""--memory auto's arithmetic and decisions on fake device budgets (lorakit.train.memory)."""

from __future__ import annotations

import pytest

from lorakit.train.memory import (
    ADAM_BYTES,
    GiB,
    MemoryFit,
    Shape,
    activation_bytes,
    check_memory_args,
    choose,
    piece_tokens,
    transient_bytes,
)
from lorakit.train.recipe import TrainArgs

LLAMA_8B = Shape(layers=32, hidden=4096, intermediate=14336, q_dim=4096, kv_dim=1024, vocab=128256)
LLAMA_1B = Shape(layers=16, hidden=2048, intermediate=8192, q_dim=2048, kv_dim=512, vocab=128256)
# what an H200 run allocated before the first step (bench/RESULTS.md): base + adapter
WEIGHTS_8B = int(15.16 * GiB)
WEIGHTS_1B = int(2.87 * GiB)
TRAINABLE_8B = 41_943_040
TRAINABLE_1B = 11_272_192


def _fixed(weights: int, trainable: int) -> int:
    return weights + ADAM_BYTES * trainable


def _peak(shape: Shape, weights: int, trainable: int, tokens: int, keep: int) -> float:
    dynamic = activation_bytes(shape, tokens, keep) + transient_bytes(shape, tokens)
    return (_fixed(weights, trainable) + dynamic) / GiB


@pytest.mark.parametrize(
    "shape,weights,trainable,tokens,keep,measured",
    [
        (LLAMA_8B, WEIGHTS_8B, TRAINABLE_8B, 8192, 0, 19.2),  # issue #16's independent re-run
        (LLAMA_8B, WEIGHTS_8B, TRAINABLE_8B, 8192, 14, 27.6),
        (LLAMA_8B, WEIGHTS_8B, TRAINABLE_8B, 8192, 7, 22.9),  # 8b-lorakit-packed
        (LLAMA_8B, WEIGHTS_8B, TRAINABLE_8B, 16384, 0, 22.9),  # 8b-lorakit-packed-16k
        (LLAMA_1B, WEIGHTS_1B, TRAINABLE_1B, 16384, 16, 16.4),  # 1b-lorakit-packed
    ],
)
def test_predicted_peaks_are_within_ten_percent_of_the_h200_measurements(
    shape, weights, trainable, tokens, keep, measured
):
    assert abs(_peak(shape, weights, trainable, tokens, keep) / measured - 1) < 0.10


def test_choose_keeps_the_most_layers_that_fit_the_budget():
    fixed = _fixed(WEIGHTS_8B, TRAINABLE_8B)
    tight = choose(LLAMA_8B, 8192, fixed, 24 * GiB)
    roomy = choose(LLAMA_8B, 8192, fixed, int(31.3 * GiB))
    assert tight.tokens == roomy.tokens == 8192
    assert 0 < tight.keep_layers < roomy.keep_layers < 32
    for choice, budget in ((tight, 24 * GiB), (roomy, 31.3 * GiB)):
        assert choice.peak <= budget
        over = _peak(LLAMA_8B, WEIGHTS_8B, TRAINABLE_8B, 8192, choice.keep_layers + 1) * GiB
        assert over > 0.98 * budget  # one more kept layer would not fit (with the 2% headroom)
    assert f"recompute all but the last {tight.keep_layers} of 32 layers" in tight.reason
    everything = choose(LLAMA_8B, 8192, fixed, 120 * GiB)
    assert everything.keep_layers == 32 and "no layer recomputed" in everything.reason


def test_choose_lowers_the_tokens_per_micro_batch_when_nothing_else_fits():
    fixed = _fixed(WEIGHTS_8B, TRAINABLE_8B)
    choice = choose(LLAMA_8B, 32768, fixed, 20 * GiB, min_tokens=2048)
    assert choice.tokens < 32768 and choice.tokens >= 2048
    assert choice.peak <= 20 * GiB
    assert "32768 tokens per micro-batch do not fit" in choice.reason
    with pytest.raises(ValueError) as err:
        choose(LLAMA_8B, 8192, fixed, 16 * GiB, min_tokens=4096)
    text = str(err.value)
    assert "the memory budget 16.0 GiB is too small" in text
    assert "take 15.6 GiB" in text and "--memory-limit" in text and "--quantize nf4" in text


def _fit(budget_gib: float, keep_limit_gib: float) -> MemoryFit:
    fixed = _fixed(WEIGHTS_8B, TRAINABLE_8B)
    choice = choose(LLAMA_8B, 8192, fixed, int(keep_limit_gib * GiB))
    return MemoryFit(LLAMA_8B, int(budget_gib * GiB), WEIGHTS_8B, TRAINABLE_8B, choice, "test",
                     requested_tokens=8192)


def test_adjust_lowers_keep_layers_when_the_first_step_used_more():
    fitted = _fit(24, 24)
    before = fitted.choice.keep_layers
    predicted = fitted.choice.peak - 8 * TRAINABLE_8B  # the first step has no AdamW moments yet
    note = fitted.adjust(predicted + int(0.8 * GiB), 8192)
    assert fitted.scale > 1
    assert fitted.choice.keep_layers < before
    assert note.startswith("memory auto: the first step peaked at")
    assert f"keep_layers {before} -> {fitted.choice.keep_layers}" in note


def test_adjust_keeps_the_choice_when_the_first_step_used_less():
    fitted = _fit(24, 24)
    before = fitted.choice.keep_layers
    assert fitted.adjust(fitted.choice.peak - 2 * GiB, 8192) is None
    assert fitted.scale == 1.0 and fitted.choice.keep_layers == before


def test_adjust_over_budget_even_recomputing_everything_says_so():
    fitted = _fit(24, 24)
    note = fitted.adjust(40 * GiB, 8192)
    assert fitted.choice.keep_layers == 0
    assert "over the budget of 24.0 GiB even with every layer recomputed" in note


def test_pieces_are_cut_only_where_the_budget_was_lowered():
    fitted = _fit(24, 24)
    assert piece_tokens(fitted, None) is None
    assert piece_tokens(None, 256) == 256
    fitted.choice.tokens = 4096  # as when 8192 tokens did not fit
    assert piece_tokens(fitted, None) == 4096
    assert piece_tokens(fitted, 1024) == 1024


@pytest.mark.parametrize(
    "mode,limit,message",
    [
        ("big", None, "--memory must be one of auto, off, got 'big'"),
        ("auto", 0, "--memory-limit must be a positive number of GiB, got 0"),
        ("auto", -3.5, "--memory-limit must be a positive number of GiB, got -3.5"),
    ],
)
def test_bad_memory_options_are_refused_by_name(mode, limit, message):
    with pytest.raises(ValueError) as err:
        check_memory_args(mode, limit)
    assert str(err.value) == message
    with pytest.raises(ValueError) as err:
        TrainArgs(data="d.jsonl", output="out", memory=mode, memory_limit=limit)
    assert str(err.value) == message


class _FakeDevice:
    """torch.cuda's memory queries for a device that has `free` bytes free and `allocated` in use."""

    def __init__(self, monkeypatch, free: int, allocated: int) -> None:
        import torch

        self.free, self.allocated, self.peak = free, allocated, allocated
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free, 141 * GiB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)


def _meta_8b():
    """An 8B-shaped model with the 8B adapter's trainable count, on the meta device (nothing allocated)."""
    import torch
    from torch import nn
    from transformers import LlamaConfig

    model = nn.Module()
    model.config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    model.adapter = nn.Parameter(torch.empty(TRAINABLE_8B, device="meta"))
    return model


@pytest.mark.parametrize(
    "free_gib,limit,keep,source",
    [
        (24 / 0.92 - 15.16, None, None, "92% of the 26.1 GiB free on cuda"),  # free + held: 26.1 GiB
        (120.0, 24.0, None, "--memory-limit 24"),  # the limit, not the free memory
        (120.0, None, 32, "92% of the 135.2 GiB free on cuda"),  # room for everything
    ],
)
def test_fit_decides_from_the_devices_free_memory_or_the_limit(monkeypatch, free_gib, limit, keep, source):
    """--memory auto on a fake device: the budget is 92% of free plus held memory (or --memory-limit),
    the weights are what is allocated before the first step, and the choice is `choose`'s for them."""
    import torch

    from lorakit.train.memory import fit

    _FakeDevice(monkeypatch, int(free_gib * GiB), WEIGHTS_8B)
    fitted = fit(_meta_8b(), torch.device("cuda"), 8192, limit)
    budget = int(limit * GiB) if limit else int(0.92 * (int(free_gib * GiB) + WEIGHTS_8B))
    assert fitted.budget == budget and fitted.source.startswith(source)
    assert fitted.weights == WEIGHTS_8B and fitted.trainable == TRAINABLE_8B
    expected = choose(LLAMA_8B, 8192, _fixed(WEIGHTS_8B, TRAINABLE_8B), budget)
    assert (fitted.choice.keep_layers, fitted.choice.tokens) == (expected.keep_layers, expected.tokens)
    if keep is not None:
        assert fitted.choice.keep_layers == keep
    else:  # a 24 GiB budget: some layers recomputed, as the H200 run chose (keep_layers 7 at 24 GiB)
        assert 0 < fitted.choice.keep_layers < 32
    assert f"budget {budget / GiB:.1f} GiB ({fitted.source})" in fitted.summary()


def test_after_first_step_applies_the_measured_correction_to_the_fast_path(monkeypatch):
    """The first step on the fake device peaks 1.5 GiB over the prediction: keep_layers drops in the
    fit and in the fast path's settings the training loop uses, and the log says so."""
    import torch

    from lorakit.train.fastpath import FastPathConfig
    from lorakit.train.memory import after_first_step, fit

    device = _FakeDevice(monkeypatch, 120 * GiB, WEIGHTS_8B)
    fitted = fit(_meta_8b(), torch.device("cuda"), 8192, 24.0)
    fitted.config = FastPathConfig(recompute="all", keep_layers=fitted.choice.keep_layers)
    before = fitted.choice.keep_layers
    device.peak = fitted.choice.peak - 8 * TRAINABLE_8B + int(1.5 * GiB)  # no AdamW moments yet
    logged = []
    monkeypatch.setattr("lorakit.train.runlog.log", logged.append)
    after_first_step(fitted, torch.device("cuda"), 8192)
    assert fitted.choice.keep_layers < before
    assert fitted.config.keep_layers == fitted.choice.keep_layers
    assert logged == [f"memory auto: the first step peaked at {device.peak / GiB:.1f} GiB "
                      f"({fitted.scale:.2f}x the activation estimate): keep_layers {before} -> {fitted.choice.keep_layers}"]
