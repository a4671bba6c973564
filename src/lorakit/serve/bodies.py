"""The request bodies of the HTTP API, and what they may ask for.

Fields an OpenAI client may send that do not change what this server does (`user`,
`presence_penalty`, ...) are accepted and ignored. Fields that ask for output this server
does not produce are refused with a 400 naming the field, unless they hold their no-op
value: `logprobs` null or false, `top_logprobs` null or 0, `echo` false, `best_of` null or
equal to `n`, `logit_bias` null or {}. A client that asked for log-probabilities then
learns it will not get them, instead of reading `"logprobs": null` as an answer.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorakit.serve.errors import ApiError

DEFAULT_MAX_PROMPTS = 16
"""Most prompts one /v1/completions request may carry in its `prompt` list (`--max-prompts`);
each takes a queue slot and a batch row."""


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    # Refused unless they hold their no-op value (see the module docstring).
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict[str, float] | None = None

    def refuse_unsupported(self) -> None:
        """Raise a 400 naming the first field that asks for output this server does not produce."""
        no_op = {
            "logprobs": self.logprobs is None or self.logprobs is False,
            "top_logprobs": self.top_logprobs in (None, 0),
            "echo": not self.echo,
            "best_of": self.best_of is None or self.best_of == self.n,
            "logit_bias": not self.logit_bias,
        }
        for field, ok in no_op.items():
            if not ok:
                value = getattr(self, field)
                raise ApiError(
                    400,
                    f"{field} is not supported by this server (got {value!r}); leave it out "
                    f"(accepted as no-ops: {_NO_OPS[field]})",
                    param=field,
                )


_NO_OPS = {
    "logprobs": "null, false",
    "top_logprobs": "null, 0",
    "echo": "false",
    "best_of": "null, or equal to n",
    "logit_bias": "null, {}",
}


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)

    def prompts(self, most: int) -> list[str | list[int]]:
        """The prompts this request carries (a string or one list of token ids is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if len(prompt) > most:
            raise ApiError(
                400,
                f"prompt holds {len(prompt)} prompts; this server takes at most {most} in one request "
                "(send the rest in further requests)",
                param="prompt",
            )
        return [p if isinstance(p, str) else list(p) for p in prompt]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class AdapterBody(BaseModel):
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


def content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"only text message parts are supported, got type {part.get('type')!r}", param="messages")
        parts.append(str(part.get("text", "")))
    return "".join(parts)
