"""Hostile and careless requests against a live server: each is refused with a clear error and
harms no other request (outputs are checked against transformers' generate)."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import make_serve_adapter
from lorakit.serve import SamplingParams
from lorakit.serve.api import create_app
from lorakit.serve.requests import _Collector
from test_serve_api import BASE, Server, expected_text
from test_serve_engine import PROMPTS, Reference, greedy, make_engine


@pytest.fixture(scope="module")
def reference(serve_adapter_dirs) -> Reference:
    return Reference(serve_adapter_dirs)


@pytest.fixture(scope="module")
def server(serve_adapter_dirs, tmp_path_factory):
    engine = make_engine(serve_adapter_dirs, max_batch=16)
    root = tmp_path_factory.mktemp("adapter-root")
    with Server(create_app(engine, model_name=BASE, adapter_roots=[root], max_body_bytes=2**20)) as running:
        running.engine, running.root = engine, root
        yield running


def post_raw(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it.
    return httpx.post(url + path, content=json.dumps(body).encode(), headers={"content-type": "application/json"}, timeout=60)


def test_item1_a_bad_request_fails_alone(server, reference) -> None:
    good = [("alpha", PROMPTS[1], 20), ("beta", PROMPTS[3], 20), (BASE, PROMPTS[0], 20)]
    results: dict[int, httpx.Response] = {}

    def send(i: int, model: str, prompt: str, n: int) -> None:
        results[i] = post_raw(server.url, {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})

    threads = [threading.Thread(target=send, args=(i, *case)) for i, case in enumerate(good)]
    for t in threads:
        t.start()
    bad = [
        ({"model": "alpha", "prompt": [999999]}, 400, "prompt", "999999 is outside this model's vocabulary"),
        ({"model": "alpha", "prompt": [-1]}, 400, "prompt", "-1 is outside this model's vocabulary"),
        ({"model": "alpha", "prompt": "x", "seed": 2**70}, 422, "seed", "less than 18446744073709551616"),
        ({"model": "alpha", "prompt": "\ud800"}, 400, "prompt", "lone surrogate"),
        ({"model": "alpha", "prompt": "x", "stop": ["\ud800"]}, 400, "stop.0", "lone surrogate"),
    ]
    for body, status, param, text in bad:
        reply = post_raw(server.url, body)
        assert reply.status_code == status, (body, reply.text)
        assert reply.json()["error"]["param"] == param and text in reply.json()["error"]["message"], reply.text
    for t in threads:
        t.join()
    for i, (model, prompt, n) in enumerate(good):
        assert results[i].status_code == 200, results[i].text
        adapter = None if model == BASE else model
        assert results[i].json()["choices"][0]["text"] == expected_text(reference, prompt, adapter, n)


def test_item1_a_failing_row_inside_the_engine_ends_only_itself(serve_adapter_dirs, reference) -> None:
    # A seed past 64 bits that reached the engine (SamplingParams is mutable) fails in prefill;
    # the two requests prefilled with it finish exactly as they would alone.
    bad = SamplingParams(max_tokens=8, temperature=0)
    bad.seed = 2**70
    ok = SamplingParams(max_tokens=8, temperature=0)
    with make_engine(serve_adapter_dirs, max_batch=8) as engine:
        out = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], ["alpha", "beta", "alpha"], [ok, bad, ok])
    assert out[1].finish_reason == "error" and "Overflow" in out[1].text
    assert out[0].token_ids == reference(PROMPTS[0], "alpha", 8)
    assert out[2].token_ids == reference(PROMPTS[2], "alpha", 8)


def test_sample_refuses_nan_rows_before_any_draw() -> None:
    import torch

    from lorakit.serve.sampling import sample

    logits = torch.randn(3, 50, dtype=torch.float64)
    logits[1, 7] = float("nan")
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    states = [g.get_state() for g in generators]
    params = [SamplingParams(temperature=0.7)] * 3
    with pytest.raises(ValueError, match="next-token scores hold NaN or infinite values"):
        sample(logits, params, generators)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states, strict=True))
    logits[1, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        sample(logits, [greedy(1)] * 3, generators)
    logits[1, 7] = -float("inf")  # a token ruled out is fine
    assert sample(logits, [greedy(1)] * 3, generators).tolist() == logits.argmax(-1).tolist()
    # A top_k past the vocabulary (past 2**63 even) keeps every token, as top_k=0 does.
    huge, every = SamplingParams(temperature=0.7, top_k=2**70, seed=1), SamplingParams(temperature=0.7, seed=1)
    gens = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert sample(logits[:1], [huge], gens[:1]).tolist() == sample(logits[:1], [every], gens[1:]).tolist()


class Paused:
    """Holds the engine thread between steps, so that requests sent meanwhile start together
    in one batch when it lets go."""

    def __init__(self, engine) -> None:
        self.engine, self.gate = engine, threading.Event()

    def __enter__(self) -> Paused:
        self.holder = threading.Thread(target=self.engine._call, args=(self.gate.wait,))
        self.holder.start()
        return self

    def wait_for_queue(self, depth: int) -> None:
        deadline = time.time() + 30
        while self.engine.queue_depth < depth:
            assert time.time() < deadline, f"{self.engine.queue_depth} of {depth} requests arrived"
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.holder.join(timeout=30)


def run_together(engine, cases) -> list:
    """Submit (prompt, adapter, params) cases so that they start in one batch; their Completions."""
    collectors = [_Collector() for _ in cases]
    with Paused(engine) as paused:
        for (prompt, adapter, params), collector in zip(cases, collectors, strict=True):
            engine.submit(engine.encode(prompt), adapter, params, collector)
        paused.wait_for_queue(len(cases))
    return [c.wait() for c in collectors]


class NanLogits:
    """A fault in some rows' logits: from the 3rd call of `sample` that includes a target
    request on, the target rows' scores are NaN (what an adapter overflowing in low
    precision gives). Wraps the generic decoder's own `sample`, so the real check and draw run."""

    def __init__(self, is_target, monkeypatch) -> None:
        import lorakit.serve.generic as engine_module

        self.is_target, self.calls, self.batch_sizes = is_target, 0, []
        self.sample = engine_module.sample
        monkeypatch.setattr(engine_module, "sample", self)

    def __call__(self, logits, params, generators):
        rows = [i for i, p in enumerate(params) if self.is_target(p)]
        if rows:
            self.calls += 1
            if self.calls >= 3:
                self.batch_sizes.append(len(params))
                logits = logits.clone()
                logits[rows] = float("nan")
        return self.sample(logits, params, generators)


def fault_in_forward(engine, adapter: str):
    """A fault in the forward pass of one adapter's rows (a failing adapter kernel): every
    decoding step whose batch holds a row of `adapter` raises."""
    forward = engine.decoder._forward
    sizes: list[int] = []

    def failing(names, adapters, **inputs):
        if adapter in names and inputs["input_ids"].shape[1] == 1:
            sizes.append(len(names))
            raise RuntimeError(f"the LoRA kernel failed for adapter {adapter!r}")
        return forward(names, adapters, **inputs)

    engine.decoder._forward = failing
    return sizes


@pytest.mark.parametrize("fault", ["nan-logits", "forward", "detokenizer"])
def test_item1_a_row_failing_inside_a_decoding_step_ends_alone(serve_adapter_dirs, reference, fault, monkeypatch) -> None:
    from lorakit.serve import sampling

    seeded = SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=7)
    target = SamplingParams(max_tokens=12, temperature=0.8, seed=3)
    cases = [(PROMPTS[1], "alpha", greedy(12)), (PROMPTS[3], "beta", greedy(12)), (PROMPTS[0], None, greedy(12)),
             (PROMPTS[5], "alpha", seeded), (PROMPTS[6], "gamma", target)]
    with make_engine(serve_adapter_dirs, max_batch=8) as engine:
        if fault == "nan-logits":
            sizes = NanLogits(lambda p: p is target, monkeypatch).batch_sizes
            cause = "NaN or infinite values"
        elif fault == "forward":
            sizes = fault_in_forward(engine, "gamma")
            cause = "the LoRA kernel failed for adapter 'gamma'"
        else:  # the row's detokenizer raises at its 3rd token (a tokenizer that cannot decode it)
            sizes, add = [], sampling.Detokenizer.add

            def failing_add(detok, token):
                if detok.stop == ("never",) and len(detok.ids) == 2:
                    sizes.append(engine.running)
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
                return add(detok, token)

            monkeypatch.setattr(sampling.Detokenizer, "add", failing_add)
            target.stop = ("never",)
            cause = "UnicodeDecodeError"
        out = run_together(engine, cases)
        # The fault hit while all five rows were decoding together.
        assert sizes and sizes[0] == len(cases), sizes
        failed = out[4]
        assert failed.finish_reason == "error" and cause in failed.text, failed
        assert "decoding this request failed" in failed.text and len(failed.token_ids) == (2 if fault != "forward" else 1)
        for (prompt, adapter, _), got in zip(cases[:3], out[:3], strict=True):
            assert got.token_ids == reference(prompt, adapter, 12), (prompt, adapter)
            assert got.finish_reason in ("length", "stop")
        # The seeded sampled row drew exactly what it draws alone, and the engine keeps serving.
        alone = engine.generate([PROMPTS[5]], "alpha", SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=7))
        assert out[3].token_ids == alone[0].token_ids and len(alone[0].token_ids) > 2
        later = engine.generate([PROMPTS[6]], "gamma", greedy(6))[0]
        if fault == "forward":  # the fault is the adapter's: a request alone with it fails alone too
            assert later.finish_reason == "error" and cause in later.text
        else:
            assert later.token_ids == reference(PROMPTS[6], "gamma", 6)
        assert engine.stats.requests.get("error") == (2 if fault == "forward" else 1)
        assert engine.alive


def test_item1_a_row_failing_mid_decode_over_http(server, reference, monkeypatch) -> None:
    good = [("alpha", PROMPTS[1], 20), ("beta", PROMPTS[3], 20), (BASE, PROMPTS[0], 20)]
    nan = NanLogits(lambda p: p.seed in (4242, 4243), monkeypatch)  # the faulty rows, by their seed
    results: dict[str, object] = {}

    def send(key: str, body: dict) -> None:
        if body.get("stream"):
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as reply:
                results[key] = (reply.status_code, [line for line in reply.iter_lines() if line])
        else:
            results[key] = httpx.post(server.url + "/v1/completions", json=body, timeout=60)

    bodies = {f"good{i}": {"model": m, "prompt": p, "max_tokens": n, "temperature": 0} for i, (m, p, n) in enumerate(good)}
    bodies["bad"] = {"model": "alpha", "prompt": PROMPTS[2], "max_tokens": 30, "temperature": 0.7, "seed": 4243}
    bodies["bad-stream"] = {**bodies["bad"], "seed": 4242, "stream": True}
    threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
    with Paused(server.engine) as paused:
        for t in threads:
            t.start()
        paused.wait_for_queue(len(bodies))
    for t in threads:
        t.join(timeout=60)
    assert nan.batch_sizes[0] == len(bodies)
    for i, (model, prompt, n) in enumerate(good):
        reply = results[f"good{i}"]
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected_text(reference, prompt, None if model == BASE else model, n)
    bad = results["bad"]
    assert bad.status_code == 500 and "NaN or infinite values" in bad.json()["error"]["message"], bad.text
    status, lines = results["bad-stream"]
    events = [json.loads(line.removeprefix("data: ")) for line in lines if line != "data: [DONE]"]
    assert status == 200 and [e for e in events if "error" in e] == events[-1:], lines
    error = events[-1]["error"]
    assert error["code"] == 500 and "NaN or infinite values" in error["message"], error
    # The server keeps serving.
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    again = post_raw(server.url, {"model": "beta", "prompt": PROMPTS[3], "max_tokens": 20, "temperature": 0})
    assert again.json()["choices"][0]["text"] == expected_text(reference, PROMPTS[3], "beta", 20)


def test_item4_bodies_and_prompts_are_bounded_before_the_work(server) -> None:
    # Over the body limit: 413 before parsing, with and without Content-Length.
    big = {"model": "alpha", "prompt": "x" * (2 * 2**20)}
    reply = post_raw(server.url, big)
    assert reply.status_code == 413 and "over 1048576 bytes" in reply.json()["error"]["message"]

    def chunked():
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 65536):
            yield payload[i : i + 65536]

    reply = httpx.post(server.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"}, timeout=60)
    assert reply.status_code == 413
    # Under the body limit but too long to fit the context: refused by length, never tokenized.
    calls = []
    engine = server.engine
    original = engine.encode
    engine.encode = lambda text: calls.append(len(text)) or original(text)
    try:
        long = post_raw(server.url, {"model": "alpha", "prompt": "y" * 900_000})
        chat = post_raw(server.url, {"model": "alpha", "messages": [{"role": "user", "content": "y" * 900_000}]},
                        path="/v1/chat/completions")
    finally:
        engine.encode = original
    assert long.status_code == 400 and "900000 characters" in long.json()["error"]["message"]
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    assert calls == []
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "decode_path": server.engine.decode_path}


def test_item5_adapters_load_only_from_inside_the_roots(server, tmp_path) -> None:
    outside = make_serve_adapter(tmp_path / "outside", seed=9)
    (server.root / "escape").symlink_to(outside)
    (server.root / "emptydir").mkdir()
    errors = set()
    for path in [str(outside), "../outside", "escape", "emptydir", "nothing-here", str(tmp_path), "/etc"]:
        reply = httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": path}, timeout=60)
        assert reply.status_code == 400, (path, reply.text)
        errors.add(reply.json()["error"]["message"].replace(repr(path), "PATH"))
    assert errors == {"path PATH is not an adapter directory under the server's adapter roots"}
    assert "x" not in server.engine.adapter_names()
    inside = make_serve_adapter(server.root / "inside", seed=10)
    assert httpx.post(server.url + "/v1/adapters", json={"name": "inside", "path": "inside"}).status_code == 201
    assert httpx.delete(server.url + "/v1/adapters/inside").status_code == 200
    assert inside.is_dir()


def test_item5_loading_by_path_is_off_without_roots(serve_adapter_dirs) -> None:
    engine = make_engine(serve_adapter_dirs)
    with Server(create_app(engine, model_name=BASE)) as running:
        path = str(next(iter(serve_adapter_dirs.values())))
        reply = httpx.post(running.url + "/v1/adapters", json={"name": "again", "path": path})
        assert reply.status_code == 400 and "--adapter-root" in reply.json()["error"]["message"]


def test_item6_metrics_labels_are_route_templates_and_escaped(server) -> None:
    injected = '/x"} 1\nlorakit_fake_total 9\n#'
    with httpx.Client(base_url=server.url) as http:
        http.get(injected.replace('"', "%22").replace("\n", "%0A").replace(" ", "%20").replace("}", "%7D"))
        for i in range(100):
            http.get(f"/random/{os.urandom(8).hex()}/{i}")
        http.delete("/v1/adapters/no-such-adapter")
        text = http.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}  # the reference parser
    assert "lorakit_fake" not in families
    routes = {(s.labels["path"], s.labels["status"]): s.value for s in families["lorakit_http_requests"].samples
              if s.name.endswith("_total")}
    assert routes[("unmatched", "404")] >= 101
    assert ("/v1/adapters/{name}", "404") in routes
    assert all(p in ("unmatched", "/health", "/metrics") or p.startswith("/v1/") for p, _ in routes)
    assert len(text) < 8000


def test_item9_a_client_that_leaves_stops_its_generation(serve_adapter_dirs) -> None:
    import socket

    engine = make_engine(serve_adapter_dirs, max_batch=1)
    with Server(create_app(engine, model_name=BASE)) as running:
        body = json.dumps({"model": "alpha", "prompt": "x", "max_tokens": 250, "temperature": 0}).encode()
        port = int(running.url.rsplit(":", 1)[1])
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(body) + body)
        # The client leaves once its request is generating, however fast or slow the machine.
        deadline = time.time() + 30
        while engine.running == 0 and not engine.stats.requests and time.time() < deadline:
            time.sleep(0.001)
        assert engine.running == 1, "the request never started generating"
        client.close()
        deadline = time.time() + 20
        while not engine.stats.requests and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats.requests == {"cancelled": 1}


def test_item7_zero_cpu_adapters_and_other_bad_numbers_are_refused(serve_adapter_dirs, tmp_path) -> None:
    from lorakit.serve.command import ServeArgs
    from lorakit.train.recipe import TrainArgs

    for options, text in [
        ({"max_adapters_on_cpu": 0}, "--max-adapters-on-cpu must be an integer >= 1, got 0"),
        ({"max_request_bytes": 0}, "--max-request-bytes must be an integer >= 1, got 0"),
        ({"context_length": 1}, "--context-length must be an integer >= 2"),
        ({"adapter_root": [str(tmp_path / "none")]}, "--adapter-root .*none is not a directory"),
    ]:
        with pytest.raises(ValueError, match=text):
            ServeArgs(**options)
    with pytest.raises(ValueError, match="max_adapters_on_cpu must be >= 1, got 0"):
        make_engine(serve_adapter_dirs, max_adapters_on_cpu=0)
    for options, text in [
        ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan"),
        ({"weight_decay": -0.1}, "--weight-decay must be a finite number >= 0, got -0.1"),
        ({"loraplus_ratio": 0}, "--loraplus-ratio must be a finite number > 0, got 0"),
        ({"max_grad_norm": float("inf")}, "--max-grad-norm must be a finite number > 0, got inf"),
    ]:
        with pytest.raises(ValueError, match=text):
            TrainArgs(data="d", output="o", **options)


def test_item7_sigterm_stops_the_server_with_a_stream_open(tiny_model_dir) -> None:
    import signal
    import subprocess
    import sys

    from test_serve_command import free_port

    port = free_port()
    code = (
        "from lorakit.serve.command import ServeArgs, run_serve; "
        f"run_serve(ServeArgs(model={str(tiny_model_dir)!r}, port={port}, device='cpu', log_level='warning', max_batch=1))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "lorakit serve did not come up"
            time.sleep(0.2)
        body = {"model": str(tiny_model_dir), "prompt": "x", "max_tokens": 250, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as reply:
            next(reply.iter_lines())
            proc.send_signal(signal.SIGTERM)
            start = time.time()
            proc.wait(timeout=15)
        assert time.time() - start < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
