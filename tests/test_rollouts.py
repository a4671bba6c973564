"""Rollouts for GRPO from the serving engine, on the adapter being trained: against a
teacher-forced forward and a plain greedy loop, on both decode paths (the fast one eager
on the CPU), before and after an in-place optimizer step."""

from __future__ import annotations

import time

import pytest
import torch

import lorakit
from conftest import tiny_llama_for_tokenizer
from lorakit.adapters.inject import lora_layers
from lorakit.adapters.layers import LoraLinear
from lorakit.serve import Engine, SamplingParams
from lorakit.serve.decode.lora import AdapterSlots
from lorakit.serve.rollouts import Rollouts, completion_seed, modes_kept
from lorakit.serve.sampling import token_logprobs

TEXTS = ["hello world", "the quick brown fox", "a"]
PATHS = ["generic", "fast", "fast-pipelined"]


def trained_model(seed: int = 0):
    """The tiny Llama (float64: batched and single-row arithmetic must pick the same argmax)
    with a random, non-zero adapter "default", in training mode as a trainer holds it."""
    model, tok = tiny_llama_for_tokenizer(seed)
    model = model.double()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
    return model.train(), tok


def rollouts_on(model, tok, path: str, **kwargs) -> Rollouts:
    rollouts = Rollouts(model, tok, decode_path=path.split("-")[0], max_batch=8, **kwargs)
    if path == "fast-pipelined":  # the graph-shaped, chained steps, eagerly
        rollouts.engine.decoder.pad_to_buckets = rollouts.engine.decoder.pipelined = True
    return rollouts


def prompts_of(tok) -> list[list[int]]:
    return [tok(t)["input_ids"] for t in TEXTS]


@torch.no_grad()
def teacher_forced(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """log_softmax(logits / T) of each completion token, prompt + completion in one forward."""
    with modes_kept(model):
        model.eval()
        logits = model(torch.tensor([prompt + completion])).logits[0].double()
    scaled = logits[len(prompt) - 1 : len(prompt) + len(completion) - 1] / (temperature or 1.0)
    return scaled.log_softmax(-1).gather(1, torch.tensor(completion).unsqueeze(1)).squeeze(1).tolist()


@torch.no_grad()
def greedy_loop(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    with modes_kept(model):
        model.eval()
        ids = list(prompt)
        for _ in range(n):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt) :]


def eos_of(tok) -> set[int]:
    return {tok.eos_token_id}


@pytest.mark.parametrize("path", PATHS)
def test_logps_are_the_teacher_forced_ones_and_greedy_is_a_plain_loop(path) -> None:
    model, tok = trained_model()
    prompts = prompts_of(tok)
    with rollouts_on(model, tok, path) as rollouts:
        sampled = rollouts.generate(prompts, num_generations=3, max_new_tokens=7, temperature=0.7, top_p=0.9, seed=5)
        greedy = rollouts.generate(prompts, num_generations=2, max_new_tokens=7, temperature=0, top_p=1.0, seed=5)
    assert len(sampled) == len(greedy) // 2 * 3 == 9
    for k, rollout in enumerate(sampled):
        prompt = prompts[k // 3]
        assert len(rollout.completion_ids) == len(rollout.logps) == 7 and rollout.finish_reason == "length"
        expected = teacher_forced(model, prompt, rollout.completion_ids, 0.7)
        assert rollout.logps == pytest.approx(expected, abs=1e-6)  # fp64 model; the fast path's T is fp32
    for i, prompt in enumerate(prompts):
        group = sampled[3 * i : 3 * i + 3]
        assert len({tuple(r.completion_ids) for r in group}) == 3  # each generation draws its own
        reference = greedy_loop(model, prompt, 7, eos_of(tok))
        for rollout in greedy[2 * i : 2 * i + 2]:  # grouped: prompt i's at [i*G, (i+1)*G)
            assert rollout.completion_ids == reference
            assert rollout.logps == pytest.approx(teacher_forced(model, prompt, reference, 0), abs=1e-9)
    assert len({tuple(r.completion_ids) for r in greedy[::2]}) == len(prompts)


@pytest.mark.parametrize("path", ["generic", "fast"])
def test_an_optimizer_step_shows_in_the_next_rollouts_with_nothing_copied(path, monkeypatch) -> None:
    model, tok = trained_model()
    prompts = prompts_of(tok)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    pointers = [p.data_ptr() for p in params]
    stacked = {"mixed": 0, "slot writes": 0}
    stacks, write = LoraLinear._stacks, AdapterSlots._write

    def counted_stacks(self, names):
        stacked["mixed"] += 1
        return stacks(self, names)

    def counted_write(self, slot, name):
        stacked["slot writes"] += 1
        return write(self, slot, name)

    monkeypatch.setattr(LoraLinear, "_stacks", counted_stacks)
    monkeypatch.setattr(AdapterSlots, "_write", counted_write)
    layer = next(m for _, m in lora_layers(model) if isinstance(m, LoraLinear))
    seen: list[tuple[int, bool, bool]] = []  # what the rollout forward read: A's storage, grad mode, training
    hook = layer.lora_A["default"].register_forward_pre_hook(
        lambda module, args: seen.append((module.weight.data_ptr(), torch.is_grad_enabled(), module.training)))
    with rollouts_on(model, tok, path) as rollouts:
        before = rollouts.generate(prompts, num_generations=1, max_new_tokens=6, temperature=0, top_p=1.0, seed=0)
        slots = [t.data_ptr() for row in rollouts.engine.decoder.lora.a for t in row if t is not None] \
            if path == "fast" else []
        optimizer = torch.optim.AdamW(params, lr=0.05)
        target = 65  # "A": every position is pushed toward it
        for _ in range(3):
            logits = model(torch.tensor([prompts[0] + prompts[1]])).logits
            loss = -logits.log_softmax(-1)[..., target].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        writes_before = stacked["slot writes"]
        after = rollouts.generate(prompts, num_generations=1, max_new_tokens=6, temperature=0, top_p=1.0, seed=0)
        if path == "fast":  # the slot is a copy, written again once per call, in place
            assert stacked["slot writes"] - writes_before == 1
            assert [t.data_ptr() for row in rollouts.engine.decoder.lora.a for t in row if t is not None] == slots
    hook.remove()
    assert [p.data_ptr() for p in params] == pointers  # the optimizer updated the same storage
    assert [r.completion_ids for r in after] != [r.completion_ids for r in before]
    for prompt, rollout in zip(prompts, after, strict=True):  # the new weights, exactly
        assert rollout.completion_ids == greedy_loop(model, prompt, 6, eos_of(tok))
        assert rollout.logps == pytest.approx(teacher_forced(model, prompt, rollout.completion_ids, 0), abs=1e-9)
    assert sum(r.completion_ids.count(target) for r in after) > sum(r.completion_ids.count(target) for r in before)
    if path == "generic":  # the plain forward read the parameters themselves: no stacks at all
        assert stacked["mixed"] == 0
        assert all(m._stack_cache is None for _, m in lora_layers(model) if isinstance(m, LoraLinear))
        rollout_reads = [s for s in seen if not s[1]]
        assert rollout_reads and all(s == (layer.lora_A["default"].weight.data_ptr(), False, False) for s in rollout_reads)


def test_same_seed_same_rollouts_and_each_completion_has_its_own_seed() -> None:
    model, tok = trained_model()
    a, b, _ = prompts_of(tok)
    kwargs = dict(num_generations=3, max_new_tokens=6, temperature=1.0, top_p=1.0)
    with rollouts_on(model, tok, "generic") as rollouts:
        first = rollouts.generate([a, b], seed=11, **kwargs)
        again = rollouts.generate([a, b], seed=11, **kwargs)
        other = rollouts.generate([a, b], seed=12, **kwargs)
        twice_b = rollouts.generate([b, b], seed=11, **kwargs)
    assert first == again
    assert [r.completion_ids for r in first] != [r.completion_ids for r in other]
    # prompt 1's completions depend on (seed, 1, g) only, not on what else is in the batch
    assert [r.completion_ids for r in twice_b[3:]] == [r.completion_ids for r in first[3:]]
    assert len({completion_seed(11, i, g) for i in range(50) for g in range(50)}) == 2500


@pytest.mark.parametrize("path", ["generic", "fast"])
def test_eos_ends_a_rollout_and_is_kept_with_its_logp(path) -> None:
    model, tok = trained_model()
    prompt = prompts_of(tok)[0]
    free = greedy_loop(model, prompt, 8, set())
    k = next(k for k in range(2, 8) if free[k] not in free[:k])
    model.generation_config.eos_token_id = [tok.eos_token_id, free[k]]  # the engine's end-of-sequence ids
    with rollouts_on(model, tok, path) as rollouts:
        out = rollouts.generate([prompt, prompt[:2]], num_generations=2, max_new_tokens=8, temperature=0, top_p=1.0,
                                seed=0)
    assert out[0] == out[1]
    assert out[0].completion_ids == free[: k + 1] and out[0].finish_reason == "stop"
    assert out[0].logps == pytest.approx(teacher_forced(model, prompt, free[: k + 1], 0), abs=1e-9)
    for rollout in out[2:]:
        done = rollout.finish_reason == "stop"
        assert len(rollout.completion_ids) == len(rollout.logps) <= 8
        assert done == (rollout.completion_ids[-1] in (tok.eos_token_id, free[k])) or len(rollout.completion_ids) == 8


def test_the_trainer_gets_its_model_back_as_it_was() -> None:
    model, tok = trained_model()
    model.model.layers[0].mlp.eval()  # a mixed state is restored module by module
    modes = {name: m.training for name, m in model.named_modules()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    with rollouts_on(model, tok, "generic") as rollouts:
        assert {name: m.training for name, m in model.named_modules()} == modes  # after the engine's model.eval()
        out = rollouts.generate(prompts_of(tok), num_generations=2, max_new_tokens=4, temperature=1.0, top_p=0.95,
                                seed=3)
        assert not rollouts.engine.alive  # nothing runs between calls
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: p.requires_grad for name, p in model.named_parameters()} == requires
        assert all(p.grad is None for p in model.parameters())
        assert torch.is_grad_enabled() and lorakit.active_adapters(model) == ["default"]
        assert all(m.mixed is None for _, m in lora_layers(model))
    assert len(out) == 6 and all(r.finish_reason == "length" and len(r.logps) == 4 for r in out)
    # and training goes on as usual: the adapter still gets gradients
    model(torch.tensor([prompts_of(tok)[0]])).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_starting_and_halting_per_call_is_cheap() -> None:
    model, tok = trained_model()
    with rollouts_on(model, tok, "generic") as rollouts:
        started = time.perf_counter()
        for _ in range(20):
            rollouts.engine.start()
            rollouts.engine.halt()
        per_call = (time.perf_counter() - started) / 20
    assert per_call < 0.05


def test_requests_that_do_not_ask_get_no_logprobs_and_live_rows_mix_with_the_base() -> None:
    model, tok = trained_model()
    prompt = prompts_of(tok)[1]
    assert token_logprobs(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), [SamplingParams()] * 2) is None
    with modes_kept(model), Engine(model, tok, max_batch=4, decode_path="generic") as engine:
        engine.add_live_adapter("default")
        done = []
        plain = engine.submit(prompt, "default", SamplingParams(max_tokens=5, temperature=0), done.append)
        base = engine.submit(prompt, None, SamplingParams(max_tokens=5, temperature=0, logprobs=True), done.append)
        while sum(e.finish_reason is not None for e in done) < 2:
            time.sleep(0.01)
    assert plain.logprobs is None and base.logprobs is not None and len(base.logprobs) == 5
    assert plain.output_ids == greedy_loop(model, prompt, 5, set())
    with lorakit.disable_adapters(model):
        assert base.output_ids == greedy_loop(model, prompt, 5, set())
        assert base.logprobs == pytest.approx(teacher_forced(model, prompt, base.output_ids, 0), abs=1e-9)
