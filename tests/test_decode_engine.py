"""The engine on the fast decode path (eager on the CPU): the generic path's engine and
HTTP tests run again with `decode_path="fast"`, against the same references
(transformers' generate one request at a time), plus what only this path has."""

from __future__ import annotations

import inspect
import time

import httpx
import pytest

import lorakit
import test_serve_api as api_tests
import test_serve_engine as engine_tests
from conftest import SERVE_ADAPTERS, tiny_llama_for_tokenizer
from lorakit.adapters.inject import lora_layers
from lorakit.serve import AdapterMismatch, Engine, SamplingParams
from lorakit.serve.api import create_app
from lorakit.serve.generic import GenericDecoder

_generic_make_engine = engine_tests.make_engine


def fast_engine(adapter_dirs: dict, **kwargs) -> Engine:
    engine = _generic_make_engine(adapter_dirs, decode_path="fast", **kwargs)
    assert engine.decoder is not None and engine.decode_path.startswith("fast")
    return engine


@pytest.fixture(autouse=True)
def on_the_fast_path(monkeypatch):
    monkeypatch.setattr(engine_tests, "make_engine", fast_engine)
    monkeypatch.setattr(api_tests, "make_engine", fast_engine)


@pytest.fixture(scope="module")
def reference(serve_adapter_dirs) -> engine_tests.Reference:
    return engine_tests.Reference(serve_adapter_dirs)


@pytest.fixture(scope="module")
def server(serve_adapter_dirs, tmp_path_factory):
    engine = fast_engine(serve_adapter_dirs, max_batch=16)
    root = tmp_path_factory.mktemp("adapter-root")
    with api_tests.Server(create_app(engine, model_name=api_tests.BASE, adapter_roots=[root])) as running:
        running.engine, running.root = engine, root
        yield running


def _run(test, request) -> None:
    test(**{name: request.getfixturevalue(name) for name in inspect.signature(test).parameters})


ENGINE_TESTS = [
    "test_mixed_continuous_batch_equals_each_request_alone",
    "test_requests_arriving_mid_decode_match",
    "test_adapter_cache_evicts_lru_and_reloads",
    "test_runtime_load_unload_and_stack_cache",
    "test_sampling_is_seeded_per_request",
    "test_stop_strings_cut_the_output",
    "test_cancel_frees_the_slot",
    "test_submit_errors",
]


@pytest.mark.parametrize("name", ENGINE_TESTS)
def test_engine_on_the_fast_path(name, request) -> None:
    _run(getattr(engine_tests, name), request)


API_TESTS = [
    "test_openai_client_completions_chat_and_streaming",
    "test_fifty_concurrent_requests_over_mixed_adapters",
    "test_load_and_unload_adapters_at_run_time",
    "test_bad_input_is_refused_and_the_server_keeps_serving",
    "test_metrics_count_requests_tokens_and_cache",
    "test_full_queue_answers_429",
    "test_client_leaving_mid_stream_frees_its_slot",
    "test_api_key",
]


@pytest.mark.parametrize("name", API_TESTS)
def test_http_api_on_the_fast_path(name, request) -> None:
    _run(getattr(api_tests, name), request)


def test_health_says_which_path_runs(server) -> None:
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    assert health["decode_path"].startswith("fast (slot KV cache 16 x 256 tokens") and "eager" in health["decode_path"]
    assert "Triton" not in health["decode_path"]  # the LoRA kernels run on CUDA only


def test_health_and_the_log_say_when_graphs_turn_off(serve_adapter_dirs, caplog) -> None:
    """A failed capture turns CUDA graphs off for good: the log says so at once, and the decode
    path line (what /health shows) says so from then on, with the error."""
    with fast_engine(serve_adapter_dirs, max_batch=3) as engine:
        assert "graphs off" not in engine.decode_path
        with caplog.at_level("WARNING", logger="lorakit.serve.decode.runner"):
            engine.decoder._graphs_off(RuntimeError("capture failed here"))
        assert "CUDA graphs are off from now on" in caplog.text and "capture failed here" in caplog.text
        assert "CUDA graphs off after a failed capture: RuntimeError: capture failed here" in engine.decode_path
        outs = engine.generate(engine_tests.PROMPTS[:2], [None, "alpha"], engine_tests.greedy(4))
        assert all(o.token_ids for o in outs)  # it keeps serving, eagerly


def test_slots_are_given_back_and_outputs_match_the_generic_path(serve_adapter_dirs) -> None:
    prompts = engine_tests.PROMPTS
    names = [*SERVE_ADAPTERS, None, "alpha", "alpha", "beta", None]
    params = engine_tests.greedy(9)
    with _generic_make_engine(serve_adapter_dirs, max_batch=3) as generic:
        assert isinstance(generic.decoder, GenericDecoder)
        want = [c.token_ids for c in generic.generate(prompts, names, params)]
    with fast_engine(serve_adapter_dirs, max_batch=3) as engine:
        got = [c.token_ids for c in engine.generate(prompts, names, params)]
        cache = engine.decoder.cache
        assert cache.used == [] and cache.span == 0 and len(engine.decoder.batch) == 0
    assert got == want


def test_an_adapter_outside_the_projections_is_refused(tmp_path) -> None:
    model, _ = tiny_llama_for_tokenizer()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj", "embed_tokens"]))
    lorakit.save_adapter(model, tmp_path / "emb")
    engine = fast_engine({})
    with pytest.raises(AdapterMismatch, match=r"emb: it adapts model.embed_tokens; the fast decode path runs adapters on q_proj, "):
        engine.load_adapter("emb", tmp_path / "emb")
    assert engine.adapter_names() == [] and not engine.adapters.on_device
    assert all("emb" not in layer.r for _, layer in lora_layers(engine.model))


def test_nf4_base_on_the_fast_path(serve_adapter_dirs) -> None:
    """A 4-bit base (bitsandbytes) on the fast path gives the generic path's tokens."""
    from lorakit.base import quant

    outs = {}
    for path in ("generic", "fast"):
        model, tok = tiny_llama_for_tokenizer()
        engine = Engine(quant.quantize_model(model, "nf4"), tok, decode_path=path)
        for name, directory in serve_adapter_dirs.items():
            engine.load_adapter(name, directory)
        with engine:
            outs[path] = [c.token_ids for c in engine.generate(engine_tests.PROMPTS[:4], [*SERVE_ADAPTERS, None], engine_tests.greedy(8))]
    assert outs["fast"] == outs["generic"]
    assert any(outs["fast"])


def test_engine_without_adapters_runs_the_base(reference) -> None:
    with fast_engine({}, max_batch=2) as engine:
        assert not engine.decoder.lora.active
        got = engine.generate(engine_tests.PROMPTS[:3], None, engine_tests.greedy(6))
    for prompt, out in zip(engine_tests.PROMPTS[:3], got, strict=True):
        assert out.token_ids == reference(prompt, None, 6)


def test_bucketed_pipelined_steps_give_the_same_tokens(serve_adapter_dirs, reference) -> None:
    """What runs with CUDA graphs, run eagerly: every step over a batch bucket's rows (idle
    slots included), attention over the whole padded key length, each step launched before
    the last one's tokens are handed out (rows leave and join in between), and prefills of a
    few prompts padded to a length bucket."""
    names = [*SERVE_ADAPTERS, None]
    cases = [(p, names[i % 4], 5 + 2 * (i % 4)) for i, p in enumerate(engine_tests.PROMPTS)]
    with fast_engine(serve_adapter_dirs, max_batch=5) as engine:
        engine.decoder.pad_to_buckets = engine.decoder.pipelined = True
        assert engine.decoder.buckets == [1, 2, 4, 5]
        padded = []
        pad = engine.decoder._padded_prefill
        engine.decoder._padded_prefill = lambda rows, length, *a: padded.append((rows, length)) or pad(rows, length, *a)
        got = engine.generate([c[0] for c in cases], [c[1] for c in cases], [engine_tests.greedy(c[2]) for c in cases])
        assert padded and all(rows <= 4 for rows, _ in padded)  # prefills of a few prompts ran padded
        sampled = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=3)
        crowd = engine.generate(engine_tests.PROMPTS[:4], ["alpha", "beta", None, "alpha"], [sampled] * 4)
        engine.decoder.pad_to_buckets = engine.decoder.pipelined = False
        alone = engine.generate([engine_tests.PROMPTS[3]], "alpha", sampled)[0]
    for (prompt, adapter, n), out in zip(cases, got, strict=True):
        assert out.token_ids == reference(prompt, adapter, n)
    assert crowd[3].token_ids == alone.token_ids


def test_chained_steps_across_key_blocks_and_warmup_change_no_output(serve_adapter_dirs, reference) -> None:
    """Steps chained on the device (each feeding its own tokens and positions forward) while
    rows keep running, a host launch whenever rows join or leave or the key length grows
    (blocks of 4 positions here), and a warm-up of every shape in between: the tokens are
    those of each request run alone, and most steps were chained."""
    names = [*SERVE_ADAPTERS, None]
    cases = [(p, names[i % 4], 6 + 3 * (i % 3)) for i, p in enumerate(engine_tests.PROMPTS)]
    with fast_engine(serve_adapter_dirs, max_batch=4) as engine:
        decoder = engine.decoder
        decoder.pad_to_buckets = decoder.pipelined = True
        decoder.key_block = 4
        launches = []
        host_launch = decoder._launch
        decoder._launch = lambda: launches.append(1) or host_launch()
        engine._call(decoder.warmup)
        assert decoder.warmed_layout == decoder.lora.layout
        got = engine.generate([c[0] for c in cases], [c[1] for c in cases], [engine_tests.greedy(c[2]) for c in cases])
        steps = engine.stats.decode_steps
    for (prompt, adapter, n), out in zip(cases, got, strict=True):
        assert out.token_ids == reference(prompt, adapter, n)
    assert decoder.key_lengths()[:2] == [4, 8]
    assert 0 < len(launches) < steps, (len(launches), steps)  # the rest were chained


def test_a_row_failing_inside_a_fast_step_ends_alone(serve_adapter_dirs, reference) -> None:
    """A fault in one adapter's rows (a failing adapter kernel) raises the whole batched step;
    every row then steps alone once: the faulty one ends with the error, the others go on
    with exactly the tokens they get alone (a seeded sampled one too), and the engine serves on."""
    from test_serve_hostile import run_together

    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=7)
    cases = [(engine_tests.PROMPTS[1], "alpha", engine_tests.greedy(10)), (engine_tests.PROMPTS[3], "beta", engine_tests.greedy(10)),
             (engine_tests.PROMPTS[0], None, engine_tests.greedy(10)), (engine_tests.PROMPTS[5], "alpha", seeded),
             (engine_tests.PROMPTS[6], "gamma", engine_tests.greedy(10))]
    with fast_engine(serve_adapter_dirs, max_batch=8) as engine:
        decoder = engine.decoder
        forward, sizes = decoder.decoder.forward, []

        def failing(ids, positions, cache, slots, key_length, lora=None, index=None, gathered=True, causal=False):
            if ids.shape[1] == 1 and index is not None and "gamma" in lora.slot_of and lora.slot_of["gamma"] in index.tolist():
                sizes.append(ids.shape[0])
                raise RuntimeError("the LoRA kernel failed for adapter 'gamma'")
            return forward(ids, positions, cache, slots, key_length, lora, index, gathered, causal)

        decoder.decoder.forward = failing
        out = run_together(engine, cases)
        assert sizes[:2] == [len(cases), 1], sizes  # the batched step, then gamma's row alone
        assert out[4].finish_reason == "error" and "the LoRA kernel failed for adapter 'gamma'" in out[4].text
        assert "decoding this request failed" in out[4].text and len(out[4].token_ids) == 1
        for (prompt, adapter, _), got in zip(cases[:3], out[:3], strict=True):
            assert got.token_ids == reference(prompt, adapter, 10), (prompt, adapter)
        decoder.decoder.forward = forward
        alone = engine.generate([engine_tests.PROMPTS[5]], "alpha", seeded)[0]
        assert out[3].token_ids == alone.token_ids and len(alone.token_ids) == 10
        assert engine.generate([engine_tests.PROMPTS[6]], "gamma", engine_tests.greedy(4))[0].token_ids == reference(
            engine_tests.PROMPTS[6], "gamma", 4)
        assert decoder.cache.used == [] and engine.stats.requests.get("error") == 1


def test_lorakit_serve_fast_path_process(tiny_model_dir, tmp_path) -> None:
    """`lorakit serve --decode-path fast`: the startup log and /health name the path, and it serves."""
    import subprocess
    import sys

    from conftest import make_serve_adapter
    from lorakit.serve.command import ServeArgs
    from test_serve_command import free_port

    with pytest.raises(ValueError, match="--decode-path must be auto, fast or generic, got 'quick'"):
        ServeArgs(decode_path="quick")
    adapter = make_serve_adapter(tmp_path / "demo", seed=5)
    port = free_port()
    code = (
        "from lorakit.serve.command import ServeArgs, run_serve; "
        f"run_serve(ServeArgs(model={str(tiny_model_dir)!r}, adapter=['demo={adapter}'], port={port}, "
        "device='cpu', decode_path='fast', log_level='warning'))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, f"lorakit serve exited: {proc.stdout.read()}"
            try:
                health = httpx.get(url + "/health", timeout=1)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "lorakit serve did not come up"
            time.sleep(0.2)
        assert health.json()["decode_path"].startswith("fast (slot KV cache 32 x ")
        reply = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hello", "max_tokens": 4, "temperature": 0}, timeout=30)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0]
    assert "lorakit serve: decode path: fast (slot KV cache" in log
