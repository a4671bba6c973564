"""Every error the HTTP API answers, in OpenAI's shape:

    {"error": {"message": ..., "type": ..., "param": ..., "code": <the HTTP status>}}

`ApiError` is what a route raises; `install` makes the app answer it, a body that fails
validation, an unknown route (404), a wrong method (405) and an unexpected exception
(500) in that shape, instead of FastAPI's own `{"detail": ...}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# The OpenAI error type of each status that has its own.
KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(status: int, message: str, param: str | None = None, kind: str | None = None) -> dict[str, Any]:
    kind = kind or KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_response(
    status: int, message: str, param: str | None = None, kind: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, kind), status_code=status, headers=headers)


def validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        return error_response(400, f"the request body is not valid JSON: {detail.get('ctx', {}).get('error', detail['msg'])}")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e['msg']}" for e in errors
    )
    return error_response(422, f"invalid request: {messages}", param=field)


def install(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(list(err.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException) -> JSONResponse:
        # Starlette's own: no route (404), a route without this method (405), a missing static file.
        path = request.url.path if len(request.url.path) <= 200 else request.url.path[:200] + "..."
        if err.status_code == 404:
            message = f"no route {request.method} {path}; the API is under /v1/ (see /v1/models)"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow") or (err.headers or {}).get("allow") or ""
            message = f"{request.method} is not allowed on {path}" + (f"; allowed: {allowed}" if allowed else "")
        else:
            message = str(err.detail)
        return error_response(err.status_code, message, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(err).__name__}: {err}", kind="server_error")
