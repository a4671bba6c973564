"""The serving engine against transformers' generate: mixed-adapter continuous batches
must give each request exactly what it gets alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import lorakit
from conftest import SERVE_ADAPTERS, tiny_llama_for_tokenizer, tiny_tokenizer
from lorakit.serve import Engine, PromptTooLong, QueueFull, SamplingParams, UnknownAdapter

PROMPTS = [
    "hello world",
    "the quick brown fox jumps over",
    "a",
    "lorem ipsum dolor sit amet, consectetur adipiscing",
    "xyz",
    "0123456789",
    "serve many adapters",
    "one base",
]


def tiny_model():
    # float64: a one-ulp difference between batched and single-row arithmetic must not flip an argmax.
    model, tok = tiny_llama_for_tokenizer()
    return model.double(), tok


class Reference:
    """transformers' generate, one request at a time, the adapter set with lorakit.set_adapter."""

    def __init__(self, adapter_dirs: dict) -> None:
        self.model, self.tok = tiny_model()
        for name, path in adapter_dirs.items():
            lorakit.load_adapter(self.model, path, name)
        self.memo: dict = {}

    def __call__(self, prompt: str, adapter: str | None, max_tokens: int) -> list[int]:
        key = (prompt, adapter, max_tokens)
        if key not in self.memo:
            ids = self.tok(prompt, return_tensors="pt")["input_ids"]
            kwargs = dict(do_sample=False, max_new_tokens=max_tokens, pad_token_id=self.tok.pad_token_id)
            if adapter is None:
                with lorakit.disable_adapters(self.model):
                    out = self.model.generate(ids, **kwargs)
            else:
                lorakit.set_adapter(self.model, adapter)
                out = self.model.generate(ids, **kwargs)
            tokens = out[0, ids.shape[1] :].tolist()
            if self.tok.eos_token_id in tokens:
                tokens = tokens[: tokens.index(self.tok.eos_token_id)]
            self.memo[key] = tokens
        return self.memo[key]


@pytest.fixture(scope="module")
def reference(serve_adapter_dirs) -> Reference:
    return Reference(serve_adapter_dirs)


def make_engine(adapter_dirs: dict, **kwargs) -> Engine:
    model, tok = tiny_model()
    engine = Engine(model, tok, **kwargs)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    return engine


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0)


def test_mixed_continuous_batch_equals_each_request_alone(serve_adapter_dirs, reference) -> None:
    names = [*SERVE_ADAPTERS, None]
    cases = [(p, names[i % 4], 6 + 3 * (i % 5)) for i, p in enumerate(PROMPTS * 2)]
    # max_batch 3 < 16 requests: rows join and leave the running batch at token boundaries.
    with make_engine(serve_adapter_dirs, max_batch=3) as engine:
        first = engine.generate([c[0] for c in cases[:8]], [c[1] for c in cases[:8]], [greedy(c[2]) for c in cases[:8]])
        late: list = []
        # More requests arrive while the first ones decode.
        worker = threading.Thread(
            target=lambda: late.extend(
                engine.generate([c[0] for c in cases[8:]], [c[1] for c in cases[8:]], [greedy(c[2]) for c in cases[8:]])
            )
        )
        worker.start()
        worker.join(timeout=60)
        outputs = first + late
        assert engine.stats.decode_steps > 0
    assert len(outputs) == len(cases)
    for (prompt, adapter, n), out in zip(cases, outputs, strict=True):
        want = reference(prompt, adapter, n)
        assert out.token_ids == want, (prompt, adapter)
        assert out.finish_reason == ("length" if len(want) == n else "stop")
        assert out.text == engine.tokenizer.decode(want, skip_special_tokens=True)
    # The adapters really differ from each other and from the base.
    per_adapter = {name: tuple(reference(PROMPTS[1], name, 12)) for name in names}
    assert len(set(per_adapter.values())) == len(names)


def test_requests_arriving_mid_decode_match(serve_adapter_dirs, reference) -> None:
    with make_engine(serve_adapter_dirs, max_batch=8) as engine:
        results: dict[int, object] = {}

        def run(i: int) -> None:
            time.sleep(0.002 * i)
            adapter = SERVE_ADAPTERS[i % 3]
            results[i] = engine.generate([PROMPTS[i % len(PROMPTS)]], adapter, greedy(10 + i))[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    for i in range(10):
        assert results[i].token_ids == reference(PROMPTS[i % len(PROMPTS)], SERVE_ADAPTERS[i % 3], 10 + i)


def test_adapter_cache_evicts_lru_and_reloads(serve_adapter_dirs, reference) -> None:
    # One adapter on the device at a time: every switch evicts and reloads, outputs stay exact.
    with make_engine(serve_adapter_dirs, max_batch=4, max_adapters_on_device=1, max_adapters_on_cpu=1) as engine:
        cases = [(PROMPTS[i], SERVE_ADAPTERS[i % 3]) for i in range(6)]
        outputs = engine.generate([c[0] for c in cases], [c[1] for c in cases], greedy(8))
        cache = engine.adapters
        assert len(cache.on_device) <= 1 and len(cache.on_cpu) <= 1
        assert cache.evictions >= 2 and cache.misses >= 2
        hits_before = cache.hits
        resident = next(iter(cache.on_device))
        engine.generate([PROMPTS[0]], resident, greedy(4))
        assert cache.hits == hits_before + 1
    for (prompt, adapter), out in zip(cases, outputs, strict=True):
        assert out.token_ids == reference(prompt, adapter, 8)


def test_runtime_load_unload_and_stack_cache(serve_adapter_dirs, reference, tmp_path) -> None:
    from conftest import make_serve_adapter

    with make_engine({"alpha": serve_adapter_dirs["alpha"]}) as engine:
        before = engine.generate([PROMPTS[1]], "alpha", greedy(10))[0]
        engine.unload_adapter("alpha")
        with pytest.raises(UnknownAdapter, match="loaded adapters"):
            engine.submit([1, 2], "alpha", greedy(2), print)
        # Same name, other weights: the layers' stacked weights must not be stale.
        engine.load_adapter("alpha", serve_adapter_dirs["beta"])
        after = engine.generate([PROMPTS[1]], "alpha", greedy(10))[0]
        fresh = make_serve_adapter(tmp_path / "delta", seed=7)
        engine.load_adapter("delta", fresh)
        mixed = engine.generate([PROMPTS[1], PROMPTS[1]], ["alpha", "delta"], greedy(10))
    assert before.token_ids == reference(PROMPTS[1], "alpha", 10)
    assert after.token_ids == reference(PROMPTS[1], "beta", 10)
    assert mixed[0].token_ids == after.token_ids
    assert mixed[1].token_ids != after.token_ids


def test_sampling_is_seeded_per_request(serve_adapter_dirs) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    with make_engine(serve_adapter_dirs, max_batch=8) as engine:
        alone = engine.generate([PROMPTS[0]], "alpha", params)[0]
        # The same seed in a batch with other requests gives the same tokens.
        crowd = engine.generate(PROMPTS[:5], ["alpha", "beta", "alpha", None, "gamma"], [params] + [SamplingParams(max_tokens=12, temperature=1.0)] * 4)
        other = engine.generate([PROMPTS[0]], "alpha", SamplingParams(max_tokens=12, temperature=0.9, seed=99))[0]
        top1 = engine.generate([PROMPTS[0]], "alpha", SamplingParams(max_tokens=12, temperature=1.5, top_k=1, seed=5))[0]
        greedy_out = engine.generate([PROMPTS[0]], "alpha", greedy(12))[0]
    assert crowd[0].token_ids == alone.token_ids
    assert other.token_ids != alone.token_ids
    assert top1.token_ids == greedy_out.token_ids


def test_sample_respects_top_k_and_top_p() -> None:
    from lorakit.serve.sampling import sample

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(400, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(400)]
    top2 = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 400, gens)
    assert set(top2.tolist()) == {2, 3}
    # softmax([0,1,2,3]) = [.032, .087, .237, .644]: top_p=0.7 keeps tokens 3 and 2 only.
    nucleus = sample(logits, [SamplingParams(temperature=1.0, top_p=0.7)] * 400, gens)
    assert set(nucleus.tolist()) == {2, 3}
    everything = sample(logits, [SamplingParams(temperature=1.0)] * 400, gens)
    assert set(everything.tolist()) == {0, 1, 2, 3}


def test_stop_strings_cut_the_output(serve_adapter_dirs, reference) -> None:
    with make_engine(serve_adapter_dirs) as engine:
        full = engine.tokenizer.decode(reference(PROMPTS[3], "beta", 20), skip_special_tokens=True)
        stop = full[6:8]
        out = engine.generate([PROMPTS[3]], "beta", SamplingParams(max_tokens=20, temperature=0, stop=["\x00never", stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.find(stop)]


def test_cancel_frees_the_slot(serve_adapter_dirs) -> None:
    with make_engine(serve_adapter_dirs, max_batch=1) as engine:
        events = []
        done = threading.Event()

        def listen(event) -> None:
            events.append(event)
            if event.finish_reason:
                done.set()

        long = engine.submit(engine.encode("x"), "alpha", SamplingParams(max_tokens=250, temperature=0), listen)
        while not events:
            time.sleep(0.001)
        engine.cancel(long)
        assert done.wait(10)
        assert events[-1].finish_reason == "cancelled"
        nxt = engine.generate(["y"], "beta", greedy(3))[0]
        assert nxt.finish_reason in ("length", "stop")
        assert engine.running == 0


def test_submit_errors(serve_adapter_dirs) -> None:
    engine = make_engine(serve_adapter_dirs, max_queue=2)  # not started: requests stay queued
    with pytest.raises(UnknownAdapter, match="alpha, beta, gamma"):
        engine.submit([1, 2], "nope", greedy(2), print)
    with pytest.raises(PromptTooLong, match="256"):
        engine.submit(list(range(256)), "alpha", greedy(2), print)
    engine.submit([1], None, greedy(2), print)
    engine.submit([1], None, greedy(2), print)
    with pytest.raises(QueueFull):
        engine.submit([1], None, greedy(2), print)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_mixed_batch_slots_cache_follows_adapter_changes(serve_adapter_dirs) -> None:
    """mixed_batch(slots=...) keeps stacked weights between calls; every add, delete and
    reload must still give what the uncached mixed batch gives."""
    from conftest import tiny_llama
    model = tiny_llama().double()
    ids = torch.randint(0, 128, (4, 5), generator=torch.Generator().manual_seed(0))
    config = lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])

    def randomise(name: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if f".{name}." in pname and "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype))

    def check(rows: list, slots: tuple) -> None:
        with torch.no_grad():
            with lorakit.mixed_batch(model, rows, slots=slots):
                cached = model(ids).logits
            plain = lorakit.forward_mixed(model, rows, ids).logits
        assert torch.equal(cached, plain)

    for i, name in enumerate(["p", "q"]):
        lorakit.add_adapter(model, name, config)
        randomise(name, i)
    slots = ("p", "q")
    check(["p", "q", None, "p"], slots)
    check(["q", "q", "p", None], slots)  # same slots tuple: served from the cache
    randomise("q", 9)
    lorakit.delete_adapter(model, "q")  # delete + add under the same name: slot rewritten
    lorakit.add_adapter(model, "q", lorakit.LoraConfig(r=6, alpha=3, target_modules=["k_proj"]))
    randomise("q", 10)
    check(["p", "q", None, "q"], slots)
    lorakit.add_adapter(model, "s", config)
    randomise("s", 11)
    check(["s", "p", "q", None], ("p", "q", "s"))
    with pytest.raises(ValueError, match="not among the slots"):
        with lorakit.mixed_batch(model, ["s"], slots=("p",)):
            pass


def test_nf4_base_serves_mixed_adapters(serve_adapter_dirs) -> None:
    """`lorakit serve --quantize nf4`: a 4-bit base (bitsandbytes) runs the same mixed batches."""
    from lorakit.base import quant

    def quantized():
        model, tok = tiny_llama_for_tokenizer()
        return quant.quantize_model(model, "nf4"), tok

    ref, tok = quantized()
    for name, path in serve_adapter_dirs.items():
        lorakit.load_adapter(ref, path, name)
    model, _ = quantized()
    engine = Engine(model, tok)
    for name, path in serve_adapter_dirs.items():
        engine.load_adapter(name, path)
    with engine:
        outs = engine.generate(PROMPTS[:3], list(SERVE_ADAPTERS), greedy(8))
    for prompt, name, out in zip(PROMPTS[:3], SERVE_ADAPTERS, outs, strict=True):
        lorakit.set_adapter(ref, name)
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        want = ref.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in want:
            want = want[: want.index(tok.eos_token_id)]
        assert out.token_ids == want


def test_text_decoder_is_transformers_decode() -> None:
    """The detokenizer's decoding function returns what `tokenizer.decode(ids,
    skip_special_tokens=True)` returns: through the Rust decoder for a plain fast tokenizer,
    through transformers where it cleans up spaces or a subclass decodes its own way."""
    import functools
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorakit.serve.sampling import text_decoder

    tok = tiny_tokenizer()
    decode = text_decoder(tok)
    assert decode.func == tok.backend_tokenizer.decode  # the direct path is the one taken
    rng = random.Random(0)
    specials = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    text_ids = tok("héllo, wörld ✓ 🙂")["input_ids"]
    windows = [text_ids, text_ids[:3], text_ids[-5:], [], specials + text_ids[:4] + specials[1:]]
    windows += [[rng.choice(range(256)) for _ in range(rng.randrange(1, 9))] + rng.sample(specials, 1) for _ in range(50)]
    for ids in windows:  # partial UTF-8 sequences and special tokens included
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids

    words = Tokenizer(models.WordLevel({"hello": 0, ",": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cleaning = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    decode = text_decoder(cleaning)
    assert decode.func == cleaning.decode
    assert decode([0, 1, 2]) == cleaning.decode([0, 1, 2], skip_special_tokens=True) == "hello, world"

    class Shouting(PreTrainedTokenizerFast):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    loud = Shouting(tokenizer_object=tok.backend_tokenizer)
    assert text_decoder(loud)(text_ids[:5]) == tok.decode(text_ids[:5]).upper()
    assert isinstance(text_decoder(loud), functools.partial)
