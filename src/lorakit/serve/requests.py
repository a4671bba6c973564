"""What the serving engine hands in and out: requests, their events and results, its
counters and errors, and the small waiters that carry results across threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lorakit.serve.sampling import Detokenizer, SamplingParams


class UnknownAdapter(KeyError):
    """A request named an adapter that is not loaded."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(name)
        self.name = name
        self.known = list(known)

    def __str__(self) -> str:
        return f"no adapter named {self.name!r}; loaded adapters: {', '.join(self.known) or '(none)'}"


ADAPTER_UNLOADED = "adapter_unloaded"
"""`Event.error_code` of a request whose adapter was unloaded before it started."""


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts."""


class PromptTooLong(ValueError):
    """The prompt does not fit the model's context."""


class InvalidPrompt(ValueError):
    """The prompt holds token ids this model does not have."""


@dataclass
class Event:
    """New output of one request. `finish_reason` is set on the last event only."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    """"stop" (end of sequence or a stop string), "length", "cancelled" or "error"."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None
    """What kind of error, where the caller may answer it differently: ADAPTER_UNLOADED."""


@dataclass
class Completion:
    """A finished request, as `Engine.generate` returns it."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    notify: Callable[[Event], None]
    id: int = 0
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    sent_ids: int = 0  # how many of output_ids went out in events
    counted: bool = False  # its adapter cache hit/miss is counted
    limit: int = 0  # most tokens this request may generate (max_tokens, cut by the context)
    eos_id: int | None = None  # the end-of-sequence token that ended the output, if one did
    logprobs: list[float] | None = None
    """With `params.logprobs`: the log-prob of each sampled token, output_ids then eos_id."""


@dataclass
class Stats:
    """Counters for /metrics; written by the engine thread only."""

    requests: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    batch_rows: int = 0  # sum over decode steps of the batch size
    last_batch_size: int = 0


class _Reply:
    """A result handed from the engine thread back to a caller."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def set(self, value: object) -> None:
        self._value = value
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> object:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Collector:
    """Gathers one request's events into a Completion."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.ids: list[int] = []
        self.done = threading.Event()
        self.result: Completion | None = None

    def __call__(self, event: Event) -> None:
        self.text.append(event.text)
        self.ids.extend(event.token_ids)
        if event.finish_reason is not None:
            if event.error is not None:
                self.result = Completion(event.error, self.ids, "error", event.prompt_tokens, event.completion_tokens)
            else:
                self.result = Completion(
                    "".join(self.text), self.ids, event.finish_reason, event.prompt_tokens, event.completion_tokens
                )
            self.done.set()

    def wait(self) -> Completion:
        self.done.wait()
        assert self.result is not None
        return self.result
