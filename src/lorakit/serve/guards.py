"""Bounds on what one HTTP request may make the server do, checked before the work starts.

- `BodyLimit`: an ASGI middleware that refuses a request body over a byte limit (413),
  whether or not the client sends Content-Length, before anything parses it, and one
  that takes longer than a time limit to arrive (408: a client trickling its body);
- `bad_text`: the first string in a parsed body that is not encodable text (a lone
  surrogate such as "\\ud800" decodes from JSON but cannot reach a tokenizer);
- `vocab_size`: the token ids a prompt may hold;
- `prompt_char_limit`: the most characters a prompt that fits the context can have, so
  an oversized prompt is refused before it is tokenized;
- `adapter_path`: where `POST /v1/adapters` may read from (`--adapter-root`).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

DEFAULT_MAX_BODY_BYTES = 4 * 2**20
DEFAULT_BODY_TIMEOUT_S = 30.0
"""Seconds a client has to send a whole request body (`--body-timeout`), from its first byte on."""
DISCONNECTED = "lorakit.disconnected"


class BodyLimit:
    """Answer 413 to a request whose body is over `max_bytes`; nothing past the limit is read.
    Answer 408 and close the connection when the body has not all arrived `timeout_s` after
    the request reached the app, however slowly it keeps coming (slowloris).

    The body is read here, up to the limit, and handed on whole: a body sent without
    Content-Length (chunked) is bounded as well as one that declares its size. It then
    watches for the client leaving (see `client_gone`).
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._too_slow(send, size)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send, size)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False
        # Watched here, below every other middleware, so a handler learns that its client left
        # (`client_gone`) while it is still waiting for output.
        gone = scope[DISCONNECTED] = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()

    async def _refuse(self, send: Any, size: int) -> None:
        message = (
            f"the request body is over {self.max_bytes} bytes (got at least {size}); "
            "raise the limit with --max-request-bytes"
        )
        await send_error(send, 413, message)

    async def _too_slow(self, send: Any, size: int) -> None:
        message = (
            f"the request body did not arrive within {self.timeout_s:g} seconds (got {size} bytes); "
            "raise the limit with --body-timeout"
        )
        # The rest of the body is never read, so the connection cannot carry another request.
        await send_error(send, 408, message, close=True)


async def send_error(send: Any, status: int, message: str, param: str | None = None, close: bool = False) -> None:
    """An OpenAI-shaped error answered from an ASGI middleware, before the app sees the request.

    `close`: have the server close the connection after it (the request was not read whole).
    """
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def client_gone(scope: dict) -> bool:
    """Whether the client of this request has disconnected (as `BodyLimit` saw it)."""
    event = scope.get(DISCONNECTED)
    return event is not None and event.is_set()


def bad_text(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in `value` that cannot be encoded as UTF-8, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if isinstance(key, str) and bad_text(key) is not None:
            return path or "body"
        found = bad_text(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def vocab_size(model: Any, tokenizer: Any) -> int:
    """Rows of the input embedding: the token ids the model can take (else the config's or tokenizer's count)."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
    return int(rows)


def prompt_char_limit(tokenizer: Any, context_length: int) -> int:
    """Characters in the longest text that can still fit `context_length` tokens.

    No token stands for more characters than its longest vocabulary entry (byte-level
    and sentencepiece entries are at least as long as the text they decode to), so a
    longer text cannot fit and need not be tokenized to know it.
    """
    longest = 1
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        longest = max((len(piece) for piece in get_vocab()), default=1)
    return max(1, longest) * context_length


class AdapterPathRefused(ValueError):
    """`POST /v1/adapters` named a path outside the adapter roots, or not an adapter there."""


def adapter_path(requested: str, roots: Sequence[Path]) -> Path:
    """The adapter directory `requested` names inside one of `roots`, symlinks resolved.

    A relative path is taken relative to each root in turn. Anything that is not an
    adapter directory inside a root gets the same error, so a caller learns nothing about
    which directories exist on the server.
    """
    refused = AdapterPathRefused(
        f"path {requested!r} is not an adapter directory under the server's adapter roots"
        if roots
        else "loading adapters by path is off on this server; start it with --adapter-root DIR"
    )
    if not roots or "\x00" in requested:
        raise refused
    for root in roots:
        real_root = Path(os.path.realpath(root))
        candidate = Path(os.path.realpath(real_root / requested))
        if candidate != real_root and real_root not in candidate.parents:
            continue
        files = [Path(os.path.realpath(candidate / name)) for name in ("adapter_config.json", "adapter_model.safetensors")]
        if all(f.is_file() and real_root in f.parents for f in files):
            # Imported here: it brings torch, which the CLI must not load to parse its options.
            from lorakit.serve.adapters import check_inside

            check_inside(candidate, shown=requested)  # templates, tokenizer files: inside it too
            return candidate
    raise refused
