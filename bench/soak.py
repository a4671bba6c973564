"""Soak a live `lorakit serve` with good, bad and abandoned requests and adapter churn.

    .venv/bin/python bench/soak.py [--requests 3000] [--concurrency 32] [--limit-s 300]

The server is a real `lorakit serve` process on 127.0.0.1 (nothing else is contacted),
serving a tiny random-init Llama with a byte-level tokenizer, built here, and two adapters.
Requests are drawn at random (seeded) from this mix:

    good        completions / chat, streamed or not, greedy, a few tokens
    bad         a token id outside the vocabulary, -1, a seed of 2**70, a lone surrogate,
                malformed JSON, an unknown model, a body over --max-request-bytes, a prompt
                too long for the context, an adapter path outside --adapter-root,
                logprobs asked for, a Host header the server does not answer to
    limits      16 stop strings (the most: answered) and 17 or 100,000 (refused); 16 prompts in
                one request (the most: answered) and 60 (refused)
    dropped     a stream closed after its first event; a non-streaming request abandoned
                after 50 ms
    adapters    POST /v1/adapters (a fresh name from inside the root) and DELETE it
    unload      40 requests for the adapter "churn" at once (more than the batch holds), then
                DELETE it while some still wait, then load it again: each of the 40 must get
                200 (it ran) or 404 (it waited, or came after); the reload 201
    metrics     GET /metrics with a hostile path first (label injection)

Every response is checked against the status its kind must get; anything else, any 5xx, a
failed connection or a wrong greedy output is an error. The report gives the counts, the
errors, p50 / p99 latency of the good requests, the server's RSS before and after, the
/metrics page size, and whether greedy output for a fixed prompt is the same at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {
    "good": {200}, "good-stream": {200}, "good-chat": {200},
    "bad-token": {400}, "bad-negative": {400}, "bad-seed": {422}, "bad-surrogate": {400},
    "bad-json": {400}, "bad-model": {404}, "bad-body": {413}, "bad-long": {400}, "bad-path": {400},
    "drop-stream": {200}, "drop-wait": {None}, "adapter-load": {201}, "adapter-unload": {200},
    "metrics": {200}, "bad-field": {400}, "bad-host": {400},
    "stop-at": {200}, "stop-over": {422}, "prompts-at": {200}, "prompts-over": {400}, "unload-busy": {"ok"},
}
WEIGHTS = [30, 8, 8, 3, 3, 3, 3, 3, 3, 2, 2, 3, 6, 6, 3, 3, 2, 2, 2, 2, 2, 2, 2, 1]


def build_model(directory: Path) -> tuple[Path, Path]:
    """A tiny random Llama with a byte-level tokenizer, and one adapter for it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import lorakit

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    model_dir = directory / "model"
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    adapter = lorakit.save_adapter(model, directory / "adapters" / "tuned")
    return model_dir, adapter


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Soak:
    def __init__(self, url: str, rng: random.Random, pid: int) -> None:
        self.url = url
        self.rng = rng
        self.pid = pid
        self.rss_every_500: list[float] = []  # the server's RSS in MiB after each 500 requests
        self.statuses: Counter[tuple[str, object]] = Counter()
        self.errors: list[str] = []
        self.latency: list[float] = []
        self.adapters: list[str] = []
        self.names = 0
        self.churn = asyncio.Lock()
        self.unload_outcomes: Counter[str] = Counter()

    async def one(self, http: httpx.AsyncClient, kind: str) -> None:
        start = time.perf_counter()
        try:
            status = await self.send(http, kind)
        except httpx.HTTPError as err:
            status = f"{type(err).__name__}"
        self.statuses[(kind, status)] += 1
        if sum(self.statuses.values()) % 500 == 0:
            self.rss_every_500.append(round(rss_kib(self.pid) / 1024, 1))
        if status not in EXPECTED[kind]:
            self.errors.append(f"{kind}: got {status}")
        elif kind.startswith("good"):
            self.latency.append(time.perf_counter() - start)

    async def send(self, http: httpx.AsyncClient, kind: str) -> object:
        base = {"model": "tuned", "max_tokens": 4, "temperature": 0}
        raw = {
            "bad-token": {**base, "prompt": [999999]}, "bad-negative": {**base, "prompt": [-1]},
            "bad-seed": {**base, "prompt": "x", "seed": 2**70}, "bad-surrogate": {**base, "prompt": "\ud800"},
            "bad-model": {**base, "model": "nope", "prompt": "x"}, "bad-long": {**base, "prompt": "y" * 200_000},
        }
        if kind in raw:
            content = json.dumps(raw[kind]).encode()
            reply = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            return reply.status_code
        if kind in ("stop-at", "stop-over", "prompts-at", "prompts-over", "bad-field"):
            return await self.limits(http, kind, base)
        if kind == "bad-host":
            return (await http.get("/v1/models", headers={"host": "rebind.evil.example"})).status_code
        if kind == "unload-busy":
            return await self.unload_busy(http, base)
        if kind == "bad-json":
            reply = await http.post("/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
            return reply.status_code
        if kind == "bad-body":
            return (await http.post("/v1/completions", json={**base, "prompt": "z" * 600_000})).status_code
        if kind == "bad-path":
            path = self.rng.choice(["../model", "/etc", "tuned/../../model", "missing"])
            return (await http.post("/v1/adapters", json={"name": "evil", "path": path})).status_code
        if kind == "good":
            reply = await http.post("/v1/completions", json={**base, "prompt": f"soak {self.rng.random()}"})
            return reply.status_code
        if kind == "good-chat":
            body = {**base, "messages": [{"role": "user", "content": "hello"}]}
            return (await http.post("/v1/chat/completions", json=body)).status_code
        if kind in ("good-stream", "drop-stream"):
            body = {**base, "prompt": "stream", "stream": True, "max_tokens": 8 if kind == "good-stream" else 200}
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if kind == "drop-stream" and line.startswith("data: "):
                        break  # leave after the first event
                return reply.status_code
        if kind == "drop-wait":
            try:
                reply = await http.post("/v1/completions", json={**base, "prompt": "wait", "max_tokens": 200}, timeout=0.05)
            except httpx.TimeoutException:
                return None
            return f"finished {reply.status_code}: {reply.text[:200]}"
        if kind == "adapter-load":
            self.names += 1
            name = f"extra{self.names}"
            reply = await http.post("/v1/adapters", json={"name": name, "path": "tuned"})
            if reply.status_code == 201:
                self.adapters.append(name)
            return reply.status_code
        if kind == "adapter-unload":
            if not self.adapters:
                return 200
            name = self.adapters.pop(0)
            return (await http.delete(f"/v1/adapters/{name}")).status_code
        if kind == "metrics":
            await http.get("/x%22%7D%201%0Alorakit_fake_total%209")
            return (await http.get("/metrics")).status_code
        raise ValueError(kind)

    async def limits(self, http: httpx.AsyncClient, kind: str, base: dict) -> object:
        if kind == "stop-at":
            body = {**base, "prompt": "stops", "stop": [f"{i:0256d}" for i in range(16)]}
        elif kind == "stop-over":
            count = self.rng.choice([17, 100_000])
            body = {**base, "prompt": "stops", "stop": [chr(97 + i % 26) for i in range(count)]}
        elif kind == "prompts-at":
            body = {**base, "prompt": [f"p{i}" for i in range(16)], "max_tokens": 2}
        elif kind == "prompts-over":
            body = {**base, "prompt": [f"p{i}" for i in range(60)]}
        else:
            body = {**base, "prompt": "x", "logprobs": 5}
        content = json.dumps(body, separators=(",", ":")).encode()
        reply = await http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        if kind == "prompts-at" and reply.status_code == 200 and len(reply.json()["choices"]) != 16:
            return "wrong number of choices"
        return reply.status_code

    async def unload_busy(self, http: httpx.AsyncClient, base: dict) -> object:
        """40 requests for "churn", DELETE it while some wait, load it again."""
        async with self.churn:
            body = {**base, "model": "churn", "prompt": "churn", "max_tokens": 16}
            sent = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(40)]
            await asyncio.sleep(0.05)
            deleted = await http.delete("/v1/adapters/churn")
            replies = await asyncio.gather(*sent, return_exceptions=True)
            for _ in range(100):
                loaded = await http.post("/v1/adapters", json={"name": "churn", "path": "tuned"})
                if loaded.status_code != 409:  # 409: its running requests still finish
                    break
                await asyncio.sleep(0.05)
        outcomes = [r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in replies]
        for reply in replies:
            if isinstance(reply, httpx.Response) and reply.status_code == 404:
                queued = "was unloaded" in reply.json()["error"]["message"]
                self.unload_outcomes["404 queued, then unloaded" if queued else "404 after the unload"] += 1
            elif isinstance(reply, httpx.Response):
                self.unload_outcomes[str(reply.status_code)] += 1
        if deleted.status_code != 200 or loaded.status_code != 201 or not set(outcomes) <= {200, 404}:
            return f"delete {deleted.status_code}, reload {loaded.status_code}, requests {sorted(Counter(map(str, outcomes)).items())}"
        return "ok"


async def drive(url: str, pid: int, total: int, concurrency: int, limit_s: float, seed: int) -> Soak:
    rng = random.Random(seed)
    soak = Soak(url, rng, pid)
    plan = rng.choices(list(EXPECTED), weights=WEIGHTS, k=total)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for kind in plan:
        queue.put_nowait(kind)
    deadline = time.monotonic() + limit_s
    # Idle connections are dropped before the server's 5 s keep-alive timeout closes them, so a
    # request never races the server's close (a client that waited on the unload lock sits idle).
    limits = httpx.Limits(max_connections=concurrency * 2, keepalive_expiry=2)

    async def worker() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
            while not queue.empty() and time.monotonic() < deadline:
                await soak.one(http, queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return soak


def greedy(url: str) -> str:
    body = {"model": "tuned", "prompt": "the same prompt", "max_tokens": 16, "temperature": 0}
    return httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit-s", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapter = build_model(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [sys.executable, "-m", "lorakit", "serve", "--model", str(model_dir), "--port", str(port),
                   "--device", "cpu", "--adapter", f"tuned={adapter}", "--adapter", f"churn={adapter}", "--adapter-root", str(adapter.parent),
                   "--max-request-bytes", "524288", "--log-level", "error"]
        server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            before_text, rss_before = greedy(url), rss_kib(server.pid)
            start = time.perf_counter()
            soak = asyncio.run(drive(url, server.pid, args.requests, args.concurrency, args.limit_s, args.seed))
            elapsed = time.perf_counter() - start
            time.sleep(1)
            after_text, rss_after = greedy(url), rss_kib(server.pid)
            metrics = httpx.get(url + "/metrics").text
            health = httpx.get(url + "/health").json()
        finally:
            server.terminate()
            server.wait(timeout=30)
    sent = sum(soak.statuses.values())
    lat = sorted(soak.latency)
    report = {
        "requests": sent, "seconds": round(elapsed, 1), "errors": len(soak.errors),
        "error_examples": soak.errors[:10],
        "good_p50_s": round(statistics.median(lat), 3) if lat else None,
        "good_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 3) if lat else None,
        "rss_before_mib": round(rss_before / 1024, 1), "rss_after_mib": round(rss_after / 1024, 1),
        "rss_every_500_mib": soak.rss_every_500,
        "metrics_bytes": len(metrics), "fake_metric_injected": "lorakit_fake" in metrics,
        "greedy_same_after": before_text == after_text, "health_after": health,
        "unload_busy_requests": dict(soak.unload_outcomes),
        "statuses": {f"{k} {s}": n for (k, s), n in sorted(soak.statuses.items(), key=str)},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
