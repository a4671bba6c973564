"""The HTTP server's limits on hostile and careless input: stop lists, prompt lists, unloaded
adapters, Host headers, the schema pages, unsupported fields, error shapes and slow bodies.
Each request is refused with an OpenAI-shaped error and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from lorakit.serve.api import create_app
from lorakit.serve.command import ServeArgs
from lorakit.serve.hosts import host_name, host_policy
from lorakit.serve.sampling import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams
from test_serve_api import BASE, Server
from test_serve_engine import make_engine


@pytest.fixture(scope="module")
def engine(serve_adapter_dirs):
    engine = make_engine(serve_adapter_dirs, max_batch=16).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def http(engine):
    # localhost: a Host the default policy of a loopback-bound server answers.
    app = create_app(engine, model_name=BASE, api_key=None, hosts=host_policy("127.0.0.1"))
    with TestClient(app, base_url="http://localhost:8000") as client:
        yield client


def assert_openai_error(reply: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == status and text in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def compact(body: dict) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def completion(http, **fields) -> httpx.Response:
    return http.post("/v1/completions", json={"model": "alpha", "max_tokens": 2, "temperature": 0, **fields})


def test_stop_lists_are_bounded(http, engine) -> None:
    # 600,000 stop strings fit a 4 MiB body; each would be searched for at every token.
    many = [chr(97 + i % 26) for i in range(600_000)]
    body = {"model": "alpha", "max_tokens": 2, "prompt": "x", "stop": many}
    reply = http.post("/v1/completions", content=compact(body), headers={"content-type": "application/json"})
    assert_openai_error(reply, 422, "stop", f"600000 strings; at most {MAX_STOP_STRINGS}")
    body = {"model": "alpha", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "stop": many}
    chat = http.post("/v1/chat/completions", content=compact(body), headers={"content-type": "application/json"})
    assert_openai_error(chat, 422, "stop", "600000 strings")
    long = "q" * (MAX_STOP_CHARS + 1)
    assert_openai_error(completion(http, prompt="x", stop=[long]), 422, "stop", f"{MAX_STOP_CHARS + 1} characters")
    with pytest.raises(ValueError, match="at most 16"):
        SamplingParams(stop=["a"] * (MAX_STOP_STRINGS + 1))
    # At the limits: answered.
    at = completion(http, prompt="x", stop=[f"{i:0{MAX_STOP_CHARS}d}" for i in range(MAX_STOP_STRINGS)])
    assert at.status_code == 200 and at.json()["choices"][0]["finish_reason"] == "length", at.text
    assert engine.stats.requests.get("error", 0) == 0


def test_prompt_lists_are_bounded_before_anything_is_queued(http, engine) -> None:
    submitted = engine.stats.prompt_tokens
    sixty = completion(http, prompt=[f"p{i}" for i in range(60)])
    assert_openai_error(sixty, 400, "prompt", "60 prompts; this server takes at most 16")
    ids = completion(http, prompt=[[5, 6]] * 60)
    assert_openai_error(ids, 400, "prompt", "60 prompts")
    assert engine.stats.prompt_tokens == submitted  # none of them reached the engine
    sixteen = completion(http, prompt=[f"p{i}" for i in range(16)])
    assert sixteen.status_code == 200 and len(sixteen.json()["choices"]) == 16
    # The limit is the app's option; one list of token ids is one prompt.
    small = create_app(engine, model_name=BASE, max_prompts=2)
    with TestClient(small) as client:
        assert_openai_error(completion(client, prompt=["a", "b", "c"]), 400, "prompt", "at most 2")
        assert completion(client, prompt=[1, 2, 3, 4, 5]).status_code == 200


def test_an_adapter_unloaded_while_its_request_waits_answers_404(serve_adapter_dirs) -> None:
    # The engine is not started, so requests stay queued until the unload ends them.
    engine = make_engine(serve_adapter_dirs)
    app = create_app(engine, model_name=BASE)

    async def scenario() -> tuple[httpx.Response, list[str], httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
            plain = asyncio.create_task(client.post("/v1/completions", json=body))

            async def streamed() -> list[str]:
                async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as reply:
                    return [line async for line in reply.aiter_lines() if line]

            stream = asyncio.create_task(streamed())
            while engine.queue_depth < 2:
                await asyncio.sleep(0.01)
            unloaded = await client.delete("/v1/adapters/alpha")
            other = await client.post("/v1/completions", json=body)
            return await plain, await stream, unloaded, other

    plain, lines, unloaded, other = asyncio.run(scenario())
    assert unloaded.status_code == 200
    assert_openai_error(plain, 404, "model", "adapter 'alpha' was unloaded before this request started")
    assert plain.json()["error"]["type"] == "not_found_error"
    assert lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["code"] == 404 and error["type"] == "not_found_error" and "was unloaded" in error["message"], lines
    assert_openai_error(other, 404, "model", "no model or adapter named 'alpha'")


def test_host_policy() -> None:
    assert [host_name(h) for h in ("Example.COM:8000", "[::1]:8000", "127.0.0.1", "localhost.", "::1")] == [
        "example.com", "::1", "127.0.0.1", "localhost", "::1"]
    loopback = host_policy("127.0.0.1")
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "127.0.0.1"):
        assert loopback.allows(host), host
    for host in ("evil.example:8000", "evil.example", "localhost.evil.example", "10.0.0.5:8000", "", "127.0.0.1.nip.io"):
        assert not loopback.allows(host), host
    named = host_policy("127.0.0.1", ["api.internal", "Proxy.Example:443"])
    assert named.allows("api.internal:8000") and named.allows("proxy.example") and not named.allows("other.example")
    wildcard = host_policy("0.0.0.0")
    assert wildcard.allows("10.0.0.5:8000") and wildcard.allows("[fe80::1]:8000") and wildcard.allows("localhost")
    assert wildcard.allows(socket.gethostname()) and not wildcard.allows("rebind.evil.example:8000")
    one = host_policy("192.168.1.5")
    assert one.allows("192.168.1.5:8000") and not one.allows("localhost") and not one.allows("10.0.0.5")
    assert host_policy("127.0.0.1", ["*"]).allows("anything.example")


def test_host_header_is_checked_before_the_request_is_read(engine) -> None:
    app = create_app(engine, model_name=BASE, hosts=host_policy("127.0.0.1", ["api.internal"]))
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/health").status_code == 200
        for host in ("127.0.0.1:8000", "[::1]:8000", "api.internal"):
            assert client.get("/v1/models", headers={"host": host}).status_code == 200, host
        for path in ("/health", "/v1/models", "/metrics"):
            reply = client.get(path, headers={"host": "rebind.evil.example:8000"})
            assert_openai_error(reply, 400, "host", "does not answer to Host 'rebind.evil.example:8000'")
            assert "--allow-host rebind.evil.example" in reply.json()["error"]["message"]
        refused = client.post("/v1/completions", headers={"host": "evil.example"},
                              json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert_openai_error(refused, 400, "host")
    with pytest.raises(ValueError, match="--allow-host takes a host name"):
        ServeArgs(allow_host=["http://evil/"])
    assert ServeArgs(allow_host="api.internal").allow_host == ["api.internal"]


def test_schema_pages_need_the_key_and_load_nothing_from_a_cdn(engine) -> None:
    with TestClient(create_app(engine, model_name=BASE, api_key="s3cret")) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            reply = client.get(path)
            assert_openai_error(reply, 404)
            assert "cdn" not in reply.text.lower()
        assert_openai_error(client.get("/openapi.json"), 401)
        schema = client.get("/openapi.json", headers={"authorization": "Bearer s3cret"})
        assert schema.status_code == 200 and "/v1/completions" in schema.json()["paths"]
    with TestClient(create_app(engine, model_name=BASE)) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/openapi.json").status_code == 200


def test_fields_asking_for_output_this_server_does_not_produce_are_refused(http) -> None:
    for path, field, value in [
        ("/v1/completions", "logprobs", 5),
        ("/v1/completions", "logprobs", 0),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "top_logprobs", 3),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "best_of", 3),
        ("/v1/completions", "logit_bias", {"50": 100}),
        ("/v1/chat/completions", "logit_bias", {"50": -100}),
    ]:
        body = {"model": "alpha", "max_tokens": 2, field: value}
        body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
        assert_openai_error(http.post(path, json=body), 400, field, f"{field} is not supported by this server")
    # Their no-op values are answered.
    reply = completion(http, prompt="x", logprobs=None, echo=False, best_of=1, logit_bias={}, top_logprobs=0)
    assert reply.status_code == 200, reply.text
    chat = http.post("/v1/chat/completions", json={"model": "alpha", "max_tokens": 2, "logprobs": False,
                                                  "messages": [{"role": "user", "content": "x"}]})
    assert chat.status_code == 200, chat.text


def test_every_error_is_openai_shaped(http) -> None:
    assert_openai_error(http.get("/no/such/route"), 404, text="no route GET /no/such/route")
    assert_openai_error(http.post("/health"), 405, text="POST is not allowed on /health")
    assert_openai_error(http.get("/v1/completions"), 405)
    assert_openai_error(http.put("/v1/adapters/alpha"), 405)
    assert_openai_error(completion(http, prompt="x", temperature=9), 422, "temperature")
    bad_json = http.post("/v1/completions", content=b"{", headers={"content-type": "application/json"})
    assert_openai_error(bad_json, 400, text="not valid JSON")
    assert http.get("/health").json()["status"] == "ok"


def test_a_body_that_trickles_in_is_cut_off(serve_adapter_dirs) -> None:
    engine = make_engine(serve_adapter_dirs, max_batch=2)
    with Server(create_app(engine, model_name=BASE, body_timeout_s=1.0)) as running:
        port = int(running.url.rsplit(":", 1)[1])
        body = json.dumps({"model": "alpha", "prompt": "x" * 200, "max_tokens": 2}).encode()
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        start = time.monotonic()
        answer = b""
        slow.settimeout(0.2)
        for byte in body:  # a byte every 0.2 s: 40 s for the whole body
            try:
                slow.sendall(bytes([byte]))
                chunk = slow.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # the server closed the connection
                break
            answer += chunk
            if not chunk or b"\r\n\r\n" in answer:
                break
            assert time.monotonic() - start < 10
        elapsed = time.monotonic() - start
        slow.settimeout(5)
        answer += read_until_closed(slow)  # and the server closes the connection
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in head.lower()
        assert 0.9 < elapsed < 5, elapsed
        assert b"did not arrive within 1 seconds" in answer
        slow.close()
        # The server keeps serving.
        ok = httpx.post(running.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_serve_args_for_the_limits() -> None:
    assert ServeArgs().body_timeout == 30 and ServeArgs().max_prompts == 16 and ServeArgs().allow_host == []
    for options, text in [
        ({"body_timeout": 0}, "--body-timeout must be a number of seconds > 0, got 0"),
        ({"body_timeout": float("inf")}, "--body-timeout must be"),
        ({"max_prompts": 0}, "--max-prompts must be an integer >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=text):
            ServeArgs(**options)


def test_lorakit_serve_sets_the_timeouts_and_checks_hosts(tiny_model_dir, monkeypatch) -> None:
    import uvicorn

    from lorakit.serve.command import KEEP_ALIVE_S, run_serve

    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app, **options))
    run_serve(ServeArgs(model=str(tiny_model_dir), device="cpu", allow_host=["api.internal"], body_timeout=7))
    assert started["timeout_keep_alive"] == KEEP_ALIVE_S == 5
    assert [m.kwargs["timeout_s"] for m in started["app"].user_middleware if "timeout_s" in m.kwargs] == [7]
    with TestClient(started["app"], base_url="http://127.0.0.1:8000") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"host": "api.internal:8000"}).status_code == 200
        assert_openai_error(client.get("/health", headers={"host": "rebind.evil.example:8000"}), 400, "host")
        assert client.get("/docs").status_code == 404


def test_headers_that_trickle_in_are_cut_off_and_good_clients_keep_their_connection() -> None:
    """Slowloris on the request line and headers: the connection is closed after the header timeout,
    while a client that sends its headers at once, and idles between keep-alive requests, is served."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from lorakit.serve.connections import header_timeout_protocol

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict:
        return {"ok": True}

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", http=header_timeout_protocol(1.0),
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        request = b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        start = time.monotonic()
        closed = False
        for byte in request:  # a byte every 0.1 s: 20 s for the whole request
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            slow.settimeout(0.1)
            try:
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            assert time.monotonic() - start < 8, "the slow client was never cut off"
        elapsed = time.monotonic() - start
        assert closed and 0.9 < elapsed < 3, elapsed
        slow.close()
        # A normal client, idle for longer than the header timeout between two requests on one connection.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/ping").json() == {"ok": True}
            time.sleep(1.5)
            assert client.get("/ping").json() == {"ok": True}
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_header_timeout_option_is_checked_and_reaches_uvicorn(tiny_model_dir, monkeypatch) -> None:
    import uvicorn

    from lorakit.serve.command import run_serve

    with pytest.raises(ValueError, match="--header-timeout must be a number of seconds > 0, got inf"):
        ServeArgs(header_timeout=float("inf"))
    started: dict = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(options))
    run_serve(ServeArgs(model=str(tiny_model_dir), device="cpu", header_timeout=3))
    assert started["http"].header_timeout_s == 3.0
