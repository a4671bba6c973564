"""The fast decode path's pieces on the CPU: the slot KV cache, the batched LoRA op and its
adapter slots, the Llama-family forward against transformers (+ lorakit's generic mixed
batch), and device sampling."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.adapters.layers import LoraLinear
from lorakit.serve.decode import FastDecoder
from lorakit.serve.decode.kv import SlotCache
from lorakit.serve.decode.lora import (
    GROUPS,
    AdapterSlots,
    batched_lora,
    split,
)
from lorakit.serve.decode.model import DecoderModel, decode_reason
from lorakit.serve.decode.ops.reference import batched_lora_reference
from lorakit.serve.decode.runner import SlotBatch, batch_buckets
from lorakit.serve.decode.sampler import sample_rows, uniform
from lorakit.serve.decode.tuning import DecodeTuning
from lorakit.serve.decoder import choose_decoder
from lorakit.serve.generic import GenericDecoder
from lorakit.serve.sampling import SamplingParams

# the slot KV cache --------------------------------------------------------------------


def test_slot_cache_hands_out_lowest_slots_and_never_copies() -> None:
    cache = SlotCache(2, 4, 2, 16, 8, dtype=torch.float32, device="cpu")
    storage = [t.data_ptr() for t in (*cache.keys, *cache.values)]
    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    assert cache.span == 3 and cache.free_slots == 1
    cache.lengths[1] = 5
    cache.release(1)
    assert cache.used == [0, 2] and cache.span == 3 and cache.lengths[1] == 0
    assert cache.allocate() == 1  # the lowest free slot, so rows stay packed
    assert cache.allocate() == 3
    with pytest.raises(RuntimeError, match="all 4 KV cache slots are in use"):
        cache.allocate()
    cache.release(3)
    cache.release(2)
    assert cache.span == 2
    with pytest.raises(ValueError, match="slot 3 is not in use"):
        cache.release(3)
    assert [t.data_ptr() for t in (*cache.keys, *cache.values)] == storage
    assert cache.keys[0].shape == (4, 2, 16, 8)
    assert cache.bytes == 2 * 2 * 4 * 16 * 2 * 8 * 4


def test_slot_batch_rows_join_and_leave() -> None:
    cache = SlotCache(1, 4, 1, 8, 4, dtype=torch.float32, device="cpu")
    batch: SlotBatch = SlotBatch(cache)
    params = SamplingParams()
    for name in "abc":
        batch.add(name, cache.allocate(), 3, 7, params, 1, None)
    batch.keep([0, 2])  # "b" leaves: its slot is free, the others keep theirs
    assert batch.rows == ["a", "c"] and batch.slots == [0, 2] and cache.used == [0, 2]
    batch.add("d", cache.allocate(), 2, 5, params, 2, "x")
    assert batch.slots == [0, 2, 1] and batch.adapters == [None, None, "x"]
    batch.clear()
    assert len(batch) == 0 and cache.used == [] and cache.span == 0


def test_batch_buckets() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(50) == [1, 2, 4, 8, 16, 32, 48, 50]
    assert batch_buckets(3) == [1, 2, 3]


# the batched LoRA op ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["gather", "dense"])
@pytest.mark.parametrize("shape", [(6,), (6, 5)])
def test_batched_lora_equals_the_per_row_loop(shape, mode) -> None:
    g = torch.Generator().manual_seed(0)
    slots, rank, d_in, sizes = 4, 8, 12, (10, 6, 3)
    a = torch.randn(slots, 3 * rank, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(slots, rank, sum(sizes), generator=g, dtype=torch.float64)
    x = torch.randn(*shape, d_in, generator=g, dtype=torch.float64)
    index = torch.tensor([3, 0, 2, 0, 1, 3])
    got = batched_lora(x, a, b, sizes, index, mode)
    if len(shape) == 1:
        want = batched_lora_reference(x, a, b, sizes, index)
    else:  # the reference takes one token per row: run it per position
        want = torch.stack([batched_lora_reference(x[:, t], a, b, sizes, index) for t in range(shape[1])], dim=1)
    assert got.shape == (*shape, sum(sizes))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # the reference itself, written out for one row and projection 1 (columns 10..15)
    row = 1
    h = x[row] if len(shape) == 1 else x[row, 0]
    direct = (h @ a[0, rank : 2 * rank].T) @ b[0, :, 10:16]
    torch.testing.assert_close(want[row, 10:16] if len(shape) == 1 else want[row, 0, 10:16], direct)


def test_batched_lora_rejects_an_unknown_mode() -> None:
    a, b = torch.zeros(2, 4, 3), torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="mode 'fast': one of gather, dense, kernel"):
        batched_lora(torch.zeros(1, 3), a, b, (5,), torch.tensor([0]), "fast")


def _adapted_model(seed: int = 0):
    """A tiny Llama with three adapters of different ranks and targets, random B."""
    model = tiny_llama(seed).double()
    configs = {
        "a": lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
        "b": lorakit.LoraConfig(r=8, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "c": lorakit.LoraConfig(r=2, alpha=2, target_modules=["k_proj", "gate_proj"], use_rslora=True),
    }
    g = torch.Generator().manual_seed(seed + 1)
    for name, config in configs.items():
        lorakit.add_adapter(model, name, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
    return model


def test_adapter_slots_match_each_layer_and_follow_loads_and_evictions() -> None:
    model = _adapted_model()
    layers = list(model.model.layers)
    slots = AdapterSlots(layers, capacity=3, dtype=torch.float64, device=torch.device("cpu"))
    sources = {"a": object(), "b": object(), "c": object()}
    slots.sync({"a": sources["a"], "b": sources["b"]})
    assert slots.rank == 8 and slots.targets == frozenset(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def check(names: list) -> None:
        index = torch.tensor(slots.index(names))
        attn = layers[1].self_attn
        sizes = slots.sizes[1][0]
        got = split(batched_lora(x, slots.a[1][0], slots.b[1][0], sizes, index), sizes)
        dense = split(batched_lora(x, slots.a[1][0], slots.b[1][0], sizes, index, "dense"), sizes)
        for j, module in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
            for i, name in enumerate(names):
                want = torch.zeros(module.out_features, dtype=torch.float64)
                if name is not None and name in module.r:
                    lorakit.set_adapter(model, name)
                    want = module(x[i : i + 1])[0] - module.base_forward(x[i : i + 1])[0]
                torch.testing.assert_close(got[j][i], want, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(dense[j][i], want, rtol=1e-10, atol=1e-12)

    check(["a", "b", None, "a"])
    a_tensor = slots.a[1][0]
    layout = slots.layout
    # "b" leaves the device, "c" (rank 2, fits) takes its slot: written in place, no realloc
    slot_b = slots.slot_of["b"]
    slots.sync({"a": sources["a"], "c": sources["c"]})
    assert slots.slot_of["c"] == slot_b and slots.layout == layout and slots.a[1][0] is a_tensor
    check(["c", "a", None, "c"])
    # a reload under the same name (a new source object) rewrites the slot
    q = layers[1].self_attn.q_proj
    assert isinstance(q, LoraLinear)
    with torch.no_grad():
        q.lora_B["a"].weight.mul_(-2.0)
    slots.sync({"a": object(), "c": sources["c"]})
    check(["a", "c", "a", None])
    # rows without an adapter read the zero slot
    assert slots.index([None]) == [3]
    assert not slots.a[1][0][3].any()


def test_adapter_slots_grow_rank_by_reallocating() -> None:
    model = _adapted_model()
    slots = AdapterSlots(list(model.model.layers), capacity=2, dtype=torch.float64, device=torch.device("cpu"))
    slots.sync({"c": 1})
    assert slots.rank == 2 and slots.targets == frozenset(["k_proj", "gate_proj"])
    assert slots.a[0][1] is None and slots.b[0][1] is None  # o_proj: nothing to run
    q_columns = slots.sizes[0][0][0]
    assert not slots.b[0][0][:, :, :q_columns].any()  # q_proj's columns of the Q/K/V group stay zero
    layout = slots.layout
    slots.sync({"c": 1, "a": 2})
    assert slots.rank == 4 and slots.layout == layout + 1 and slots.a[0][1] is not None
    with pytest.raises(RuntimeError, match="all 2 adapter slots are in use"):
        slots.sync({"c": 1, "a": 2, "b": 3})


# the forward against transformers ------------------------------------------------------


def _family(kind: str):
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        return tiny_llama().double()
    from transformers import MistralConfig, Qwen2Config, Qwen3Config

    config = {
        "qwen2": lambda: Qwen2Config(**common),  # biases on Q/K/V
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),  # RMSNorm on each head
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


@pytest.mark.parametrize(
    ("kind", "fused"),
    [("llama", False), ("llama", True), ("llama", "fold"), ("qwen2", False), ("qwen2", True), ("qwen2", "fold"),
     ("qwen3", False), ("qwen3", True), ("qwen3", "fold"), ("mistral", True)],
)
def test_forward_equals_the_generic_mixed_batch(kind, fused) -> None:
    """Prefill (chunked, rows right-padded) and decode steps on the slot cache give the
    logits of transformers' forward over the whole sequence with lorakit's mixed batch,
    module by module and through the fused layer functions (fold: with the decoding steps'
    LoRA shrink folded into the base matmuls)."""
    model = _family(kind)
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    g = torch.Generator().manual_seed(5)
    for name in ("p", "q"):
        lorakit.add_adapter(model, name, config)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.2)
    assert decode_reason(model, 128) is None
    rows = ["q", None, "p"]
    lengths = [9, 4, 7]  # prompt lengths; then 3 decode steps each
    seqs = [torch.randint(0, 128, (n + 3,), generator=g) for n in lengths]
    with torch.no_grad():
        want = [lorakit.forward_mixed(model, [name], s.unsqueeze(0)).logits[0] for name, s in zip(rows, seqs, strict=True)]
        decoder = DecoderModel(model, fused=bool(fused), tuning=DecodeTuning(fold=fused == "fold"))
        assert (decoder.fused is not None) == bool(fused)
        cache = SlotCache(2, 4, 2, 32, decoder.head_dim, dtype=torch.float64, device="cpu")
        lora = AdapterSlots(decoder.layers, 2, torch.float64, torch.device("cpu"))
        lora.sync({"p": 1, "q": 2})
        index = torch.tensor(lora.index(rows))
        # slots 0, 1, 2 for the rows; the cache's slot 3 stays unused
        slots = torch.tensor([cache.allocate() for _ in rows])
        longest = max(lengths)
        ids = torch.zeros(3, longest, dtype=torch.long)
        for i, n in enumerate(lengths):
            ids[i, :n] = seqs[i][:n]
        hidden = []
        for start in range(0, longest, 4):  # chunks of 4 positions
            end = min(start + 4, longest)
            positions = torch.arange(start, end).expand(3, -1)
            # the first chunk as the runner sends it (causal SDPA), the later ones under a mask
            hidden.append(decoder.forward(ids[:, start:end], positions, cache, slots, end, lora, index, causal=start == 0))
        logits = decoder.logits(torch.cat(hidden, dim=1))
        for i, n in enumerate(lengths):
            torch.testing.assert_close(logits[i, :n], want[i][:n], rtol=1e-9, atol=1e-9)
        for step in range(3):
            tokens = torch.tensor([[int(s[n + step])] for s, n in zip(seqs, lengths, strict=True)])
            positions = torch.tensor([[n + step] for n in lengths])
            out = decoder.logits(decoder.forward(tokens, positions, cache, slots, max(lengths) + step + 1, lora, index, gathered=False))
            for i, n in enumerate(lengths):
                torch.testing.assert_close(out[i, 0], want[i][n + step], rtol=1e-9, atol=1e-9)
        assert decoder.lora_mode(3, 1, False, lora) == ("folded" if fused == "fold" else "dense")
        # the generic path reads the same base weights after the decoder regrouped them
        again = [lorakit.forward_mixed(model, [name], s.unsqueeze(0)).logits[0] for name, s in zip(rows, seqs, strict=True)]
        for before, after in zip(want, again, strict=True):
            assert torch.equal(before, after)


def test_a_causal_forward_must_read_as_many_keys_as_tokens() -> None:
    """causal=True promises a prefill's first chunk (keys == tokens); anything else is refused,
    naming both numbers, before the cache is written."""
    decoder = DecoderModel(tiny_llama())
    cache = SlotCache(2, 2, 2, 16, decoder.head_dim, dtype=torch.float32, device="cpu")
    before = [k.clone() for k in cache.keys]
    ids, positions, slots = torch.ones(2, 4, dtype=torch.long), torch.arange(4).expand(2, -1), torch.arange(2)
    with pytest.raises(ValueError, match=r"as many keys as it has tokens \(4\), not 8"):
        decoder.forward(ids, positions, cache, slots, 8, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.keys, strict=True))


def test_decode_reason_and_choose_decoder() -> None:
    from conftest import tiny_gpt2

    assert "not a Llama-family model" in decode_reason(tiny_gpt2(), 64)
    llama = tiny_llama()
    decoder = choose_decoder(llama, None, "auto", max_batch=2, context_length=64, max_adapters=2)
    assert isinstance(decoder, GenericDecoder)
    assert decoder.describe().startswith("generic") and "cpu" in decoder.describe()
    decoder = choose_decoder(llama, None, "generic", max_batch=2, context_length=64, max_adapters=2)
    assert isinstance(decoder, GenericDecoder) and "asked for" in decoder.describe()
    decoder = choose_decoder(llama, None, "fast", max_batch=2, context_length=64, max_adapters=2)
    assert isinstance(decoder, FastDecoder) and decoder.describe().startswith("fast") and "eager" in decoder.describe()
    with pytest.raises(ValueError, match="decode_path 'fast' cannot run this model: GPT2LMHeadModel is not a Llama-family"):
        choose_decoder(tiny_gpt2(), None, "fast", max_batch=2, context_length=64, max_adapters=2)
    with pytest.raises(ValueError, match="decode_path must be one of auto, fast, generic; got 'quick'"):
        choose_decoder(llama, None, "quick", max_batch=2, context_length=64, max_adapters=2)
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16))
    assert decode_reason(mistral, 64) == "the context (64 tokens) exceeds the sliding window (16)"
    assert decode_reason(mistral, 16) is None


# sampling on the device ------------------------------------------------------------------


def _params(rows: int, temperature=1.0, top_k=0, top_p=1.0):
    return (torch.full((rows,), float(temperature)), torch.full((rows,), top_k), torch.full((rows,), float(top_p)))


def test_uniform_depends_on_seed_and_position_only() -> None:
    seed, pos = torch.tensor([1, 2, 1]), torch.tensor([5, 5, 6])
    u = uniform(seed, pos, 1000)
    assert u.shape == (3, 1000) and bool(((u > 0) & (u < 1)).all())
    torch.testing.assert_close(u[0], uniform(torch.tensor([1]), torch.tensor([5]), 1000)[0], rtol=0, atol=0)
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    # close to uniform: mean 1/2, variance 1/12 over 3000 draws
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01


def test_sample_rows_draws_from_the_softmax() -> None:
    n = 4000
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(n, 1)
    seeds, positions = torch.arange(n), torch.full((n,), 7)
    tokens = sample_rows(logits, *_params(n), seeds, positions)
    freq = torch.bincount(tokens, minlength=4).double() / n
    probs = logits[0].double().softmax(-1)
    # each frequency within 4 standard errors of its probability
    assert bool(((freq - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all()), (freq, probs)
    # temperature 2 flattens: softmax(logits / 2)
    hot = torch.bincount(sample_rows(logits, *_params(n, temperature=2.0), seeds, positions), minlength=4).double() / n
    probs = (logits[0].double() / 2).softmax(-1)
    assert bool(((hot - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt()).all())


def test_sample_rows_keeps_the_generic_rules() -> None:
    n = 400
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0]).repeat(n, 1)
    seeds, positions = torch.arange(n), torch.zeros(n, dtype=torch.long)
    assert set(sample_rows(logits, *_params(n, top_k=2), seeds, positions).tolist()) == {2, 3}
    # softmax([0,1,2,3]) = [.032, .087, .237, .644]: top_p=0.7 keeps tokens 3 and 2 only
    assert set(sample_rows(logits, *_params(n, top_p=0.7), seeds, positions).tolist()) == {2, 3}
    assert set(sample_rows(logits, *_params(n, top_p=0.5), seeds, positions).tolist()) == {3}
    assert set(sample_rows(logits, *_params(n), seeds, positions).tolist()) == {0, 1, 2, 3}
    assert set(sample_rows(logits, *_params(n, temperature=0.0), seeds, positions).tolist()) == {3}
    # rows of one batch decode by their own parameters, and a row's draw ignores its neighbours
    mixed = (torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0, 1, 0]), torch.tensor([1.0, 1.0, 1.0]))
    batch = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = sample_rows(batch, *mixed, torch.tensor([4, 5, 6]), torch.tensor([9, 9, 9]))
    assert out[0] == batch[0].argmax() and out[1] == batch[1].argmax()
    alone = sample_rows(batch[2:], torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([6]), torch.tensor([9]))
    assert out[2] == alone[0]
    assert not math.isnan(float(out.float().sum()))


def test_compiled_fused_layers_trace_once_for_every_layer_and_step() -> None:
    """torch.compile sees each fused function as one graph (no break) shared by all layers:
    more layers or more decoding steps compile nothing new, and the result is unchanged."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _family("llama")
    lorakit.add_adapter(model, "p", lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    counter = CompileCounter()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.2)
        eager, compiled = DecoderModel(model), DecoderModel(model, compile=counter)
        outs = []
        for decoder in (eager, compiled):
            cache = SlotCache(2, 4, 2, 32, decoder.head_dim, dtype=torch.float64, device="cpu")
            lora = AdapterSlots(decoder.layers, 2, torch.float64, torch.device("cpu"))
            lora.sync({"p": 1})
            index = torch.tensor(lora.index(["p", None, "p"]))
            slots = torch.tensor([cache.allocate() for _ in range(3)])
            ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
            logits = [decoder.logits(decoder.forward(ids, torch.arange(6).expand(3, -1), cache, slots, 6, lora, index,
                                                     causal=True))]
            for step in range(4):
                if step == 2:
                    frames = counter.frame_count
                token = logits[-1][:, -1:].argmax(-1)
                position = torch.full((3, 1), 6 + step)
                hidden = decoder.forward(token, position, cache, slots, 7 + step, lora, index, gathered=False)
                logits.append(decoder.logits(hidden))
            outs.append(logits)
    assert 0 < frames <= 4  # prefill and decode, two functions each: not per layer or step
    assert counter.frame_count == frames
    for want, got in zip(*outs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_fused_layers_concatenate_projections_without_a_second_copy() -> None:
    """Q/K/V and gate/up run as one matmul each: their weights are concatenated once and the
    modules' own weights become views of it (same values, one copy), and the generic forward
    of the model is unchanged by it."""
    model = _family("qwen2")  # biases on Q/K/V
    lorakit.add_adapter(model, "p", lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(ids).logits
        decoder = DecoderModel(model, fused=True)
        got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    attn, mlp = decoder.layers[0].self_attn, decoder.layers[0].mlp
    (qkv_w, qkv_b, qkv_sizes), _, (mlp_w, _, mlp_sizes), _ = decoder.fused.layers[0].groups
    assert qkv_sizes == (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
    assert mlp_sizes == (mlp.gate_proj.out_features, mlp.up_proj.out_features)
    row = qkv_w.stride(0) * qkv_w.element_size()
    assert attn.q_proj.weight.data_ptr() == qkv_w.data_ptr()
    assert attn.k_proj.weight.data_ptr() == qkv_w.data_ptr() + qkv_sizes[0] * row
    assert attn.v_proj.weight.data_ptr() == qkv_w.data_ptr() + (qkv_sizes[0] + qkv_sizes[1]) * row
    assert attn.v_proj.bias.data_ptr() == qkv_b.data_ptr() + (qkv_sizes[0] + qkv_sizes[1]) * qkv_b.element_size()
    assert mlp.up_proj.weight.data_ptr() == mlp_w.data_ptr() + mlp_sizes[0] * mlp_w.stride(0) * mlp_w.element_size()


def test_folded_slots_keep_one_copy_and_follow_loads_and_reallocation() -> None:
    """Folding appends every adapter slot's A to its group's base weight: the modules' weights
    and the slots' A become views of that one tensor (nothing stored twice, the model's
    forward unchanged); an adapter loaded afterwards is written into it in place, and a
    larger rank (new slot tensors) folds again. Decoding steps stay equal to the generic path."""
    model = _family("qwen2")
    g = torch.Generator().manual_seed(4)
    for name, r in (("p", 4), ("q", 4), ("big", 8)):
        lorakit.add_adapter(model, name, lorakit.LoraConfig(r=r, alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_B" in pname:
                    param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.2)
    ids = torch.randint(0, 128, (3, 6), generator=g)
    with torch.no_grad():
        base = lorakit.forward_mixed(model, [None] * 3, ids).logits
    decoder = DecoderModel(model, fused=True, tuning=DecodeTuning(fold=True))
    cache = SlotCache(2, 3, 2, 16, decoder.head_dim, dtype=torch.float64, device="cpu")
    lora = AdapterSlots(decoder.layers, 3, torch.float64, torch.device("cpu"))
    slots = torch.tensor([cache.allocate() for _ in range(3)])

    def decode_matches(names: list) -> None:
        index = torch.tensor(lora.index(names))
        with torch.no_grad():
            positions = torch.arange(5).expand(3, -1)
            decoder.forward(ids[:, :5], positions, cache, slots, 5, lora, index, causal=True)
            out = decoder.logits(decoder.forward(ids[:, 5:], torch.full((3, 1), 5), cache, slots, 6, lora, index,
                                                 gathered=False))
            assert decoder.lora_mode(3, 1, False, lora) == "folded"
            for i, name in enumerate(names):
                want = lorakit.forward_mixed(model, [name], ids[i : i + 1]).logits[0, 5]
                torch.testing.assert_close(out[i, 0], want, rtol=1e-9, atol=1e-9)

    def check_views() -> None:
        for i, weights in enumerate(decoder.fused.layers):
            for g_, ((parent, projs), (joined, _, sizes)) in enumerate(zip(GROUPS, weights.groups, strict=True)):
                total = sum(sizes)
                a = lora.a[i][g_]
                assert joined.shape == (total + a.shape[0] * a.shape[1], a.shape[2])
                assert a.data_ptr() == joined.data_ptr() + total * joined.stride(0) * joined.element_size()
                first = getattr(getattr(decoder.layers[i], parent), projs[0]).weight
                assert first.data_ptr() == joined.data_ptr()

    lora.sync({"p": 1})
    decode_matches(["p", None, "p"])
    check_views()
    folded = decoder.fused.layers[0].groups[0][0]
    with torch.no_grad():
        torch.testing.assert_close(lorakit.forward_mixed(model, [None] * 3, ids).logits, base, rtol=0, atol=0)
    lora.sync({"p": 1, "q": 2})  # same rank: written into the folded tensor in place
    decode_matches(["q", "p", None])
    assert decoder.fused.layers[0].groups[0][0] is folded
    lora.sync({"p": 1, "q": 2, "big": 3})  # rank 8: the slots grow, the weights fold again
    decode_matches(["big", "q", "p"])
    check_views()
    assert decoder.fused.layers[0].groups[0][0] is not folded
    with torch.no_grad():
        torch.testing.assert_close(lorakit.forward_mixed(model, [None] * 3, ids).logits, base, rtol=0, atol=0)
