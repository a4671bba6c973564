"""The OpenAI-compatible HTTP API over an `Engine`.

    POST   /v1/completions        {"model", "prompt", ...}; "stream": true sends server-sent events
    POST   /v1/chat/completions   {"model", "messages", ...}; likewise
    GET    /v1/models             the base model and every adapter
    POST   /v1/adapters           {"name", "path"}: load an adapter while serving
    DELETE /v1/adapters/{name}    unload it (its running requests finish first)
    GET    /health                liveness, and which decode path runs
    GET    /metrics               Prometheus text
    GET    /openapi.json          the OpenAPI schema (behind the key; no /docs or /redoc pages)

The `model` field of a request names an adapter, or the base model's name for the base
alone. Every error uses OpenAI's shape, {"error": {"message", "type", "param", "code"}}
(see `errors.py`), and names the offending field or value: 400 bad input (malformed JSON, a
prompt longer than the context, a field this server does not support, a Host header it does
not answer to), 401 a wrong or missing API key, 404 an unknown adapter (the message lists the
loaded ones) or route, or an adapter unloaded while its request waited, 405 a wrong method,
408 a body that arrives too slowly, 409 a name already taken, 413 a body over the size limit,
422 a field out of range or an adapter that does not fit the base model, 429 a full queue.

Every request is checked before it reaches the engine (token ids in the vocabulary, a
64-bit seed, encodable text, a prompt short enough to tokenize, at most `max_prompts` prompts
and `MAX_STOP_STRINGS` stop strings), prompts are tokenized off the event loop, and
`POST /v1/adapters` reads only inside the `adapter_roots` directories. Before any of that, a
request whose Host header the server does not answer to is refused (`hosts.py`), and a body
over the size limit or slower than the time limit is cut off (`guards.BodyLimit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.routing import Match

from lorakit.adapters.inject import check_adapter_name
from lorakit.base.templates import (
    TemplateError,
    encode_chat,
    encode_text,
    render_chat,
)
from lorakit.serve.adapters import AdapterMismatch, OutsideAdapter, saved_template
from lorakit.serve.bodies import (
    DEFAULT_MAX_PROMPTS,
    AdapterBody,
    ChatBody,
    CompletionBody,
    Sampling,
    content_text,
)
from lorakit.serve.engine import (
    Engine,
    Event,
    InvalidPrompt,
    PromptTooLong,
    QueueFull,
    UnknownAdapter,
)
from lorakit.serve.errors import ApiError, error_body, error_response, install
from lorakit.serve.guards import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_MAX_BODY_BYTES,
    AdapterPathRefused,
    BodyLimit,
    adapter_path,
    bad_text,
    client_gone,
    prompt_char_limit,
)
from lorakit.serve.hosts import HostCheck, HostPolicy
from lorakit.serve.prometheus import CONTENT_TYPE, ServerMetrics
from lorakit.serve.requests import ADAPTER_UNLOADED
from lorakit.serve.sampling import SamplingParams

__all__ = ["ApiError", "create_app"]

# the app --------------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    model_name: str,
    api_key: str | None = None,
    adapter_roots: Sequence[str | Path] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    hosts: HostPolicy | None = None,
    special_tokens_in_content: bool = False,
) -> FastAPI:
    """The HTTP app. It starts the engine when it starts, unless the engine already runs.

    `adapter_roots`: the directories `POST /v1/adapters` may load from (none: loading by
    path is off). `max_body_bytes`: larger request bodies get 413 before they are parsed;
    `body_timeout_s`: a body still arriving after this long gets 408. `max_prompts`: most
    prompts in one completions request. `hosts`: the Host headers answered (`hosts.host_policy`;
    None: any, for an app behind something that checks them; `lorakit serve` always passes one).
    `special_tokens_in_content`: special-token text in prompts and messages (`<|im_start|>`)
    becomes control tokens; by default it is plain text, so a request cannot forge turns.
    """
    metrics = ServerMetrics(engine)
    roots = [Path(r) for r in adapter_roots]
    char_limit = prompt_char_limit(engine.tokenizer, engine.context_length)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = not engine.alive
        if owned:
            engine.start()
        yield
        if owned:
            engine.stop()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN. The schema is served
    # below, behind the key.
    app = FastAPI(title="lorakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    install(app)

    def route_of(request: Request) -> str | None:
        """The template of the route this request matches (a bounded set), None for none."""
        for route in app.router.routes:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                return getattr(route, "path", None)
        return None

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        if api_key is not None and (request.url.path.startswith("/v1/") or request.url.path == "/openapi.json"):
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
                metrics.count_http(route_of(request), 401)
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        response = await call_next(request)
        metrics.count_http(route_of(request), response.status_code)
        return response

    # An oversized or trickling body is refused before anything reads it; outermost, a request
    # for another Host before its body is read at all.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    if hosts is not None:
        app.add_middleware(HostCheck, policy=hosts)

    def check_text(body: BaseModel) -> None:
        field = bad_text(body.model_dump())
        if field is not None:
            raise ApiError(400, f"{field} is not valid Unicode text (it holds a lone surrogate, such as \\ud800)", param=field)

    def check_length(chars: int, param: str) -> None:
        if chars > char_limit:
            raise ApiError(
                400,
                f"the {param} has {chars} characters; no text over {char_limit} characters fits this "
                f"model's context of {engine.context_length} tokens",
                param=param,
            )

    async def encode(text: str, param: str = "prompt") -> list[int]:
        """Token ids of `text`, tokenized on a worker thread once its length could fit the context."""
        check_length(len(text), param)
        encoded = await asyncio.to_thread(encode_text, engine.tokenizer, text, add_special_tokens=True,
                                          special_tokens_in_content=special_tokens_in_content)
        return encoded.ids

    def resolve(model: str) -> str | None:
        if model == model_name:
            return None
        if model in engine.adapter_names():
            return model
        known = ", ".join([model_name, *engine.adapter_names()])
        raise ApiError(404, f"no model or adapter named {model!r}; available: {known}", param="model", kind="not_found_error")

    def params_of(body: Sampling, max_tokens: int | None) -> SamplingParams:
        body.refuse_unsupported()
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens or engine.context_length,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=max(body.top_k, 0),
                seed=body.seed,
                stop=tuple(stop),
            )
        except ValueError as err:
            raise ApiError(422, str(err), param="stop" if "stop" in str(err) else None) from None

    def start(prompts: list[list[int]], adapter: str | None, params: SamplingParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        requests = []

        def listener(index: int):
            def notify(event: Event) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            return notify

        try:
            for i, ids in enumerate(prompts):
                requests.append(engine.submit(ids, adapter, params, listener(i)))
        except (QueueFull, PromptTooLong, InvalidPrompt, UnknownAdapter) as err:
            for r in requests:
                engine.cancel(r)
            if isinstance(err, QueueFull):
                metrics.count_rejected()
                raise ApiError(429, str(err), kind="rate_limit_error") from None
            if isinstance(err, (PromptTooLong, InvalidPrompt)):
                raise ApiError(400, str(err), param="prompt") from None
            raise ApiError(404, str(err), param="model", kind="not_found_error") from None
        return queue, requests

    async def collect(http: Request, queue, requests) -> tuple[list[str], list[str], int, int]:
        texts = [[] for _ in requests]
        reasons: list[str | None] = [None] * len(requests)
        prompt_tokens = completion_tokens = 0
        checked = time.monotonic()
        try:
            while any(r is None for r in reasons):
                try:
                    index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    index, event = -1, None
                # A client that left stops its generation, whether or not tokens keep coming: the
                # body-limit middleware's flag at every event, Starlette's own check twice a second.
                if client_gone(http.scope):
                    return [], [], 0, 0
                if time.monotonic() - checked >= 0.5:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return [], [], 0, 0
                if event is None:
                    continue
                texts[index].append(event.text)
                if event.finish_reason is not None:
                    if event.error is not None:
                        raise failure(event)
                    reasons[index] = event.finish_reason
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
        finally:
            for r in requests:
                engine.cancel(r)  # no-op for finished ones; frees the slot of a client that left
        return ["".join(t) for t in texts], [str(r) for r in reasons], prompt_tokens, completion_tokens

    def failure(event: Event) -> ApiError:
        """The error to answer for a request that ended in error: the server's fault (500)
        unless its adapter was unloaded while it waited (404: the model is gone, do not retry)."""
        assert event.error is not None
        if event.error_code == ADAPTER_UNLOADED:
            return ApiError(404, event.error, param="model", kind="not_found_error")
        return ApiError(500, event.error, kind="server_error")

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    async def stream(queue, requests, make_chunk, include_usage: bool) -> AsyncIterator[str]:
        done = 0
        prompt_tokens = completion_tokens = 0
        try:
            for index in range(len(requests)):
                first = make_chunk(index, "", None, start=True)
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
            while done < len(requests):
                index, event = await queue.get()
                if event.error is not None:
                    err = failure(event)
                    yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.kind))}\n\n"
                    break
                reason = event.finish_reason
                if event.text or reason is not None:
                    yield f"data: {json.dumps(make_chunk(index, event.text, reason))}\n\n"
                if reason is not None:
                    done += 1
                    prompt_tokens += event.prompt_tokens
                    completion_tokens += event.completion_tokens
            if include_usage:
                tail = make_chunk(0, "", None)
                tail["choices"] = []
                tail["usage"] = usage(prompt_tokens, completion_tokens)
                yield f"data: {json.dumps(tail)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for r in requests:
                engine.cancel(r)

    def sse(body) -> StreamingResponse:
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # routes ------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        check_text(body)
        adapter = resolve(body.model)
        params = params_of(body, body.max_tokens)
        prompts = [await encode(p) if isinstance(p, str) else p for p in body.prompts(max_prompts)]
        queue, requests = start(prompts, adapter, params)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str, reason: str | None, start: bool = False) -> dict | None:
            if start:
                return None
            return {
                "id": rid,
                "object": "text_completion",
                "created": now,
                "model": body.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
            }

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return sse(stream(queue, requests, chunk, include))
        texts, reasons, p_tok, c_tok = await collect(http, queue, requests)
        if not texts:
            return error_response(499, "client closed the request")
        choices = [
            {"index": i, "text": t, "logprobs": None, "finish_reason": r}
            for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
        ]
        return {"id": rid, "object": "text_completion", "created": now, "model": body.model, "choices": choices, "usage": usage(p_tok, c_tok)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: Request):
        check_text(body)
        adapter = resolve(body.model)
        params = params_of(body, body.max_completion_tokens or body.max_tokens)
        messages = [{"role": m.role, "content": content_text(m.content)} for m in body.messages]
        # An adapter's own chat template (saved beside it by `lorakit train`) wins over the base model's.
        path = engine.adapters.paths.get(adapter) if adapter is not None else None
        try:
            template = await asyncio.to_thread(saved_template, path) if path is not None else None
        except OutsideAdapter as err:  # swapped for a link out since the adapter was loaded
            raise ApiError(403, f"adapter {body.model!r}: {err}", param="model", kind="permission_error") from None
        template = template or getattr(engine.tokenizer, "chat_template", None)
        if template is None:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            chat = await asyncio.to_thread(render_chat, engine.tokenizer, messages, add_generation_prompt=True,
                                           chat_template=template)
        except Exception as err:  # a template may reject a role order, say
            raise ApiError(400, f"the chat template rejected these messages: {err}", param="messages") from None
        # Training tokenizes conversations the same way (lorakit.base.templates).
        check_length(len(chat.text), "messages")
        try:
            encoded = await asyncio.to_thread(encode_chat, engine.tokenizer, chat,
                                              special_tokens_in_content=special_tokens_in_content)
        except TemplateError as err:
            raise ApiError(400, str(err), param="messages") from None
        ids = encoded.ids
        queue, requests = start([ids], adapter, params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, text: str, reason: str | None, start: bool = False) -> dict:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if start else ({"content": text} if text else {})
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": now,
                "model": body.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }

        if body.stream:
            include = bool((body.stream_options or {}).get("include_usage"))
            return sse(stream(queue, requests, chunk, include))
        texts, reasons, p_tok, c_tok = await collect(http, queue, requests)
        if not texts:
            return error_response(499, "client closed the request")
        return {
            "id": rid,
            "object": "chat.completion",
            "created": now,
            "model": body.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None, "finish_reason": reasons[0]}
            ],
            "usage": usage(p_tok, c_tok),
        }

    @app.get("/v1/models")
    async def models():
        entries = [{"id": model_name, "object": "model", "created": created, "owned_by": "lorakit"}]
        entries += [
            {"id": name, "object": "model", "created": created, "owned_by": "lorakit", "parent": model_name}
            for name in engine.adapter_names()
        ]
        return {"object": "list", "data": entries}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody):
        check_text(body)
        try:
            check_adapter_name(body.name)
        except ValueError as err:
            raise ApiError(422, str(err), param="name") from None
        if body.name == model_name or body.name in engine.adapter_names():
            raise ApiError(409, f"the name {body.name!r} is taken; unload it first or pick another", param="name")
        try:
            path = adapter_path(body.path, roots)
            await asyncio.to_thread(engine.load_adapter, body.name, path)
        except AdapterPathRefused as err:
            raise ApiError(400, str(err), param="path") from None
        except AdapterMismatch as err:
            raise ApiError(422, f"adapter {body.name!r} does not fit this base model: {err}", param="path") from None
        except FileNotFoundError:  # removed between the check and the read: the same answer
            message = f"path {body.path!r} is not an adapter directory under the server's adapter roots"
            raise ApiError(400, message, param="path") from None
        except ValueError as err:
            message = str(err)
            status = 409 if "already" in message else 422
            raise ApiError(status, message, param="name" if status == 409 else "path") from None
        return JSONResponse(
            {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "lorakit", "parent": model_name},
            status_code=201,
        )

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            await asyncio.to_thread(engine.unload_adapter, name)
        except UnknownAdapter as err:
            raise ApiError(404, str(err), param="name", kind="not_found_error") from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        alive = engine.alive
        body = {"status": "ok" if alive else "engine stopped", "decode_path": engine.decode_path}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return app.openapi()

    return app

