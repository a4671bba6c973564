"""The HTTP API through the official openai client and httpx, against a real uvicorn server
on an ephemeral port; outputs are checked against transformers' generate one at a time."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import SERVE_ADAPTERS, make_serve_adapter
from lorakit.serve.api import create_app
from test_serve_engine import PROMPTS, Reference, make_engine

BASE = "tiny-base"


class Server:
    """uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def reference(serve_adapter_dirs) -> Reference:
    return Reference(serve_adapter_dirs)


@pytest.fixture(scope="module")
def server(serve_adapter_dirs, tmp_path_factory):
    engine = make_engine(serve_adapter_dirs, max_batch=16)
    root = tmp_path_factory.mktemp("adapter-root")
    with Server(create_app(engine, model_name=BASE, adapter_roots=[root])) as running:
        running.engine, running.root = engine, root
        yield running


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def expected_text(reference: Reference, prompt: str, adapter: str | None, n: int) -> str:
    return reference.tok.decode(reference(prompt, adapter, n), skip_special_tokens=True)


def test_openai_client_completions_chat_and_streaming(server, reference) -> None:
    api = client(server)
    ids = {m.id for m in api.models.list().data}
    assert ids == {BASE, *SERVE_ADAPTERS}

    out = api.completions.create(model="alpha", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert out.choices[0].text == expected_text(reference, PROMPTS[1], "alpha", 10)
    assert out.usage.completion_tokens == len(reference(PROMPTS[1], "alpha", 10))
    base = api.completions.create(model=BASE, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert base.choices[0].text == expected_text(reference, PROMPTS[1], None, 10)

    chunks = list(api.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_text(reference, PROMPTS[2], "beta", 12)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    chat_prompt = reference.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    want = expected_text(reference, chat_prompt, "gamma", 9)
    reply = api.chat.completions.create(model="gamma", messages=messages, max_tokens=9, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == want
    streamed = list(api.chat.completions.create(model="gamma", messages=messages, max_tokens=9, temperature=0, stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    with_usage = list(
        api.chat.completions.create(
            model="gamma", messages=messages, max_tokens=9, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_fifty_concurrent_requests_over_mixed_adapters(server, reference) -> None:
    names = [*SERVE_ADAPTERS, None]
    cases = [(PROMPTS[i % len(PROMPTS)] + str(i), names[i % 4], 4 + i % 9) for i in range(52)]

    async def run_all() -> list[str]:
        api = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(prompt: str, adapter: str | None, n: int) -> str:
            out = await api.completions.create(model=adapter or BASE, prompt=prompt, max_tokens=n, temperature=0)
            return out.choices[0].text

        try:
            return await asyncio.gather(*(one(*c) for c in cases))
        finally:
            await api.close()

    steps_before = server.engine.stats.decode_steps
    texts = asyncio.run(run_all())
    for (prompt, adapter, n), text in zip(cases, texts, strict=True):
        assert text == expected_text(reference, prompt, adapter, n), (prompt, adapter)
    stats = server.engine.stats
    # They were batched: far fewer decode steps than tokens generated one request at a time.
    assert stats.decode_steps - steps_before < sum(c[2] for c in cases) / 2


def test_load_and_unload_adapters_at_run_time(server, reference) -> None:
    path = make_serve_adapter(server.root / "delta", seed=42)
    http = httpx.Client(base_url=server.url, timeout=60)
    made = http.post("/v1/adapters", json={"name": "delta", "path": str(path)})
    assert made.status_code == 201, made.text
    assert "delta" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    api = client(server)
    with_delta = api.completions.create(model="delta", prompt=PROMPTS[1], max_tokens=10, temperature=0)
    assert with_delta.choices[0].text != expected_text(reference, PROMPTS[1], "alpha", 10)
    assert http.post("/v1/adapters", json={"name": "delta", "path": str(path)}).status_code == 409
    assert http.delete("/v1/adapters/delta").status_code == 200
    with pytest.raises(openai.NotFoundError, match="alpha, beta, gamma"):
        api.completions.create(model="delta", prompt="x", max_tokens=2)
    assert http.delete("/v1/adapters/delta").status_code == 404


def test_bad_input_is_refused_and_the_server_keeps_serving(server, tmp_path) -> None:
    api = client(server)
    http = httpx.Client(base_url=server.url, timeout=60)
    with pytest.raises(openai.NotFoundError, match=f"{BASE}, alpha, beta, gamma"):
        api.completions.create(model="nope", prompt="x", max_tokens=2)

    bad_json = http.post("/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    for body, field in [
        ({"model": "alpha", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "alpha"}, "prompt"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "alpha", "prompt": "x", "n": 2}, "n"),
    ]:
        reply = http.post("/v1/completions", json=body)
        assert reply.status_code == 422, body
        assert reply.json()["error"]["param"] == field
    chat = http.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "messages"

    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        api.completions.create(model="alpha", prompt="y" * 300, max_tokens=2)

    misfit = make_serve_adapter(server.root / "wide", seed=3, hidden_size=48)
    wrong = http.post("/v1/adapters", json={"name": "wide", "path": str(misfit)})
    assert wrong.status_code == 422 and "shape" in wrong.json()["error"]["message"]
    missing = http.post("/v1/adapters", json={"name": "gone", "path": "nothing"})
    assert missing.status_code == 400 and "not an adapter directory" in missing.json()["error"]["message"]
    assert {m.id for m in api.models.list().data} == {BASE, *SERVE_ADAPTERS}

    ok = api.completions.create(model="alpha", prompt="still here", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert http.get("/health").json() == {"status": "ok", "decode_path": server.engine.decode_path}


def test_metrics_count_requests_tokens_and_cache(server) -> None:
    client(server).completions.create(model="beta", prompt="count me", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['lorakit_requests_total{finish_reason="length"}'] >= 1
    assert values["lorakit_generation_tokens_total"] >= 3
    assert values["lorakit_adapter_cache_hits_total"] >= 1
    for name in ("queue_depth", "batch_size", "adapter_cache_misses_total", "prompt_tokens_total", "adapters_on_device"):
        assert f"lorakit_{name}" in values


def test_full_queue_answers_429(serve_adapter_dirs) -> None:
    # The engine is not started (no lifespan through ASGITransport): requests stay queued.
    engine = make_engine(serve_adapter_dirs, max_queue=2)
    app = create_app(engine, model_name=BASE)

    async def scenario() -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
            waiting = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(2)]
            while engine.queue_depth < 2:
                await asyncio.sleep(0.01)
            third = await http.post("/v1/completions", json=body)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            return third.status_code

    assert asyncio.run(scenario()) == 429


def test_client_leaving_mid_stream_frees_its_slot(serve_adapter_dirs) -> None:
    engine = make_engine(serve_adapter_dirs, max_batch=1)
    with Server(create_app(engine, model_name=BASE)) as running:
        body = {"model": "alpha", "prompt": "x", "max_tokens": 250, "temperature": 0, "stream": True}
        with httpx.Client(base_url=running.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as reply:
                lines = reply.iter_lines()
                assert next(lines).startswith("data: ")
        deadline = time.time() + 20
        while engine.stats.requests.get("cancelled", 0) == 0 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests.get("cancelled") == 1
        assert engine.stats.requests.get("length", 0) == 0
        after = client(running).completions.create(model="beta", prompt="next", max_tokens=3, temperature=0)
        assert after.choices[0].finish_reason in ("length", "stop")


def test_api_key(serve_adapter_dirs) -> None:
    engine = make_engine(serve_adapter_dirs)
    with Server(create_app(engine, model_name=BASE, api_key="s3cret")) as running:
        with pytest.raises(openai.AuthenticationError):
            client(running, key="wrong").models.list()
        assert httpx.post(running.url + "/v1/completions", json={"model": BASE, "prompt": "x"}).status_code == 401
        assert httpx.get(running.url + "/health").status_code == 200
        ok = client(running, key="s3cret").completions.create(model="alpha", prompt="x", max_tokens=2, temperature=0)
        assert ok.choices[0].text is not None
