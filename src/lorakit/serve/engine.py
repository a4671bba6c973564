"""The serving engine: continuous batching over one base model with many adapters.

One thread owns the model and loops:

    1. apply adapter loads/unloads and cancellations that arrived since the last step;
    2. admit waiting requests (up to `max_batch` running) whose adapter is on the device,
       prefill them together, left-padded, and merge their KV cache into the running one;
    3. decode one token for every running row in a single forward pass, each row with
       its own adapter (`lorakit.mixed_batch`), and sample each row by its own params;
    4. hand finished rows their result and drop them from the batch and the cache.

A live adapter (`add_live_adapter`: one already attached to the model, such as the adapter
being trained) is served as it stands, its weights read in place by the generic path and
copied into its slot at each `refresh_adapter` by the fast path; `rollouts.py` builds
training rollouts on it, with each sampled token's log-prob (`SamplingParams.logprobs`).

The KV cache is transformers' `DynamicCache`, left-padded per row (see `batch.py`), or
on the fast decode path (`decode_path`, see `decode/`) preallocated slots, a CUDA graph
per decoding step and sampling on the device; the rest of the loop is the same.

Results go back through a callback per request (`Event`s), called on the engine thread;
`generate` wraps that for plain blocking use.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters.files import AdapterFiles, read_adapter
from lorakit.adapters.inject import check_adapter_name
from lorakit.adapters.state import get_state, has_adapters
from lorakit.serve.adapters import AdapterCache, AdapterMismatch
from lorakit.serve.batch import Batch
from lorakit.serve.decode import SlotBatch
from lorakit.serve.decode.tuning import DecodeTuning
from lorakit.serve.decoder import Decoder, choose_decoder
from lorakit.serve.faults import error_text
from lorakit.serve.guards import vocab_size
from lorakit.serve.requests import (
    ADAPTER_UNLOADED,
    Completion,
    Event,
    InvalidPrompt,
    PromptTooLong,
    QueueFull,
    Request,
    Stats,
    UnknownAdapter,
    _Collector,
    _Reply,
)
from lorakit.serve.sampling import Detokenizer, SamplingParams, decoding_for

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # how long `Engine.stop` waits for the step in flight


class Engine:
    """Continuous batching for one base model and its adapters; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        max_batch: int = 32,
        max_queue: int = 1024,
        max_adapters_on_device: int = 32,
        max_adapters_on_cpu: int = 128,
        max_prefill_tokens: int = 4096,
        context_length: int | None = None,
        decode_path: str = "auto",
        tuning: DecodeTuning | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._decoding = decoding_for(tokenizer)  # probed once, not at each request's admission
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        config = getattr(model, "config", None)
        self.context_length = context_length or getattr(config, "max_position_embeddings", None) or 2048
        self.device = next(model.parameters()).device
        self.vocab_size = vocab_size(model, tokenizer)
        self.eos_ids = self._eos_ids()
        self.stats = Stats()
        self.adapters = AdapterCache(model, max_adapters_on_device, max_adapters_on_cpu, self._wake)
        self.decoder: Decoder = choose_decoder(
            model, tokenizer, decode_path, max_batch=max_batch, context_length=self.context_length,
            max_adapters=max_adapters_on_device, tuning=tuning,
        )
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._commands: deque[tuple[Callable[[], object], _Reply]] = deque()
        self._ids = itertools.count(1)
        self._batch: Batch[Request] | SlotBatch = self._new_batch()
        self._pending_unload: set[str] = set()
        self._admitting: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def decode_path(self) -> str:
        """Which decode path runs, and how, as of now: a fast path whose CUDA graphs or compiled
        layers were turned off after start says so, and why (/health shows this line)."""
        return self.decoder.describe()

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), getattr(self.model, "config", None)):
            value = getattr(source, "eos_token_id", None)
            if value is not None:
                ids.update(value if isinstance(value, (list, tuple)) else [value])
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # lifecycle -----------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self.halt()
        self.adapters.close()

    def halt(self) -> None:
        """End the engine thread after the step in flight, keeping everything else: `start`
        runs it again (a trainer halts it between rollouts, so nothing runs beside its own
        forward and backward). Running and waiting requests end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            # A step in flight finishes first; a daemon thread stuck past that does not hold the process.
            self._thread.join(timeout=STOP_TIMEOUT_S)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # adapters --------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return self.adapters.names

    def load_adapter(self, name: str, path: str | Path | AdapterFiles) -> None:
        """Load an adapter directory (or an already-read adapter) under `name`.

        Blocks until it is loaded; the file is read on the calling thread, so the engine
        keeps decoding meanwhile. Raises FileNotFoundError / ValueError for unreadable
        files and AdapterMismatch when the adapter does not fit the base model; the
        engine keeps serving either way.
        """
        check_adapter_name(name)
        files = path if isinstance(path, AdapterFiles) else read_adapter(path)
        self._call(lambda: self._register(name, files))

    def _register(self, name: str, files: AdapterFiles) -> None:
        if name in self._pending_unload:
            raise ValueError(f"adapter {name!r} is already being unloaded (running requests still use it); retry shortly")
        self.adapters.register(name, files, self._busy())
        reason = self.decoder.adapter_reason(name)
        if reason is not None:
            self.adapters.unregister(name)
            raise AdapterMismatch(f"{files.directory}: {reason}")

    def add_live_adapter(self, name: str) -> None:
        """Serve adapter `name`, already attached to the model (by `inject` or `load_adapter`),
        as it stands: the generic path reads its parameters in place at every step; the fast
        path copies them into its slot now and at each `refresh_adapter`. Raises ValueError
        when the model has no adapter `name`, AdapterMismatch when this path cannot run it."""
        attached = get_state(self.model).configs if has_adapters(self.model) else {}
        if name not in attached:
            raise ValueError(f"the model has no adapter named {name!r}; attached: {', '.join(attached) or '(none)'}")
        reason = self.decoder.adapter_reason(name)
        if reason is not None:
            raise AdapterMismatch(f"adapter {name!r}: {reason}")
        self._call(lambda: self.adapters.add_live(name, self._busy()))

    def refresh_adapter(self, name: str) -> None:
        """Live adapter `name` changed in place (an optimizer step): a decode path that holds a
        copy of it (the fast path's slot) copies it again before its next step."""
        if name not in self.adapters.live:
            raise UnknownAdapter(name, list(self.adapters.live))
        self._call(lambda: self.adapters.refresh_live(name))

    def unload_adapter(self, name: str) -> None:
        """Forget `name`; its running requests finish first, waiting ones fail."""
        self._call(lambda: self._unload(name))

    def _unload(self, name: str) -> None:
        if not self.adapters.known(name):
            raise UnknownAdapter(name, self.adapters.names)
        if name in self.adapters.live and name in self._busy():
            raise ValueError(f"adapter {name!r} is serving running requests; stop them first")
        for request in [r for r in self._waiting if r.adapter == name]:
            self._waiting.remove(request)
            self._finish(request, "error", unloaded_text(name), ADAPTER_UNLOADED)
        if name in self.adapters.live:
            self.adapters.remove_live(name)  # it stays attached to the model: it was never ours
            return
        if name in self._busy():
            self.adapters.paths.pop(name)
            self._pending_unload.add(name)
        else:
            self.adapters.unregister(name)

    def _call(self, work: Callable[[], object]) -> object:
        """Run `work` on the engine thread between steps and return its result here."""
        if self._thread is None:
            with torch.no_grad():
                return work()
        reply = _Reply()
        with self._cond:
            self._commands.append((work, reply))
            self._cond.notify_all()
        return reply.wait()

    def _busy(self) -> set[str]:
        return {r.adapter for r in self._batch.rows if r.adapter is not None}

    # requests ----------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return list(ids)

    def submit(
        self,
        prompt_ids: Sequence[int],
        adapter: str | None,
        params: SamplingParams,
        notify: Callable[[Event], None],
    ) -> Request:
        """Queue a request; `notify` receives its events on the engine thread.

        Raises UnknownAdapter, InvalidPrompt, PromptTooLong or QueueFull, with nothing queued.
        """
        if adapter is not None and not self.adapters.known(adapter):
            raise UnknownAdapter(adapter, self.adapters.names)
        ids = list(prompt_ids)
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidPrompt(f"prompt token id {bad!r} is outside this model's vocabulary (ids 0..{self.vocab_size - 1})")
        if not ids:
            bos = getattr(self.tokenizer, "bos_token_id", None)
            if bos is None:
                raise PromptTooLong("the prompt is empty and this tokenizer has no beginning-of-sequence token")
            ids = [bos]
        if len(ids) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens; this model's context is {self.context_length} tokens, "
                "and at least one must be left to generate"
            )
        request = Request(ids, adapter, params, notify, id=next(self._ids))
        request.limit = min(params.max_tokens, self.context_length - len(ids))
        if params.logprobs:
            request.logprobs = []
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting, the most this server queues; retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request at the next token boundary; its slot frees up for the next one."""
        request.cancelled = True
        self._wake()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._batch)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        adapters: Sequence[str | None] | str | None = None,
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Submit every prompt at once and wait for all of them (the engine must be started)."""
        if not self.alive:
            raise RuntimeError("the engine is not running; call start() or use it as a context manager")
        names = list(adapters) if isinstance(adapters, (list, tuple)) else [adapters] * len(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        collectors = [_Collector() for _ in prompts]
        for prompt, name, p, collector in zip(prompts, names, plist, collectors, strict=True):
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.submit(ids, name, p, collector)
        return [c.wait() for c in collectors]

    # the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.no_grad():
            self.decoder.warm_up(self.adapters)
            while True:
                with self._cond:
                    while not (self._stopping or self._commands or self._batch.rows or self._admissible()):
                        self._cond.wait(timeout=0.5)
                    if self._stopping:
                        break
                    commands = list(self._commands)
                    self._commands.clear()
                for work, reply in commands:
                    try:
                        reply.set(work())
                    except Exception as err:  # handed to the caller, who reports it
                        reply.fail(err)
                try:
                    if not self._step() and not self._commands:
                        # Waiting requests whose adapter is still being read: sleep until
                        # the reader (or a new request or command) wakes us.
                        with self._cond:
                            self._cond.wait(timeout=0.05)
                except Exception as err:  # a failed step must not take the server down
                    for request in [*self._batch.rows, *self._admitting]:
                        self._finish(request, "error", f"{type(err).__name__}: {err}")
                    self._batch = self._new_batch()
                    self._admitting = []
            for request in [*self._batch.rows, *self._waiting]:
                self._finish(request, "cancelled")
            with self._cond:
                commands = list(self._commands)
                self._commands.clear()
            for _, reply in commands:
                reply.fail(RuntimeError("the engine stopped"))

    def _admissible(self) -> bool:
        return bool(self._waiting) and len(self._batch) < self.max_batch

    def _step(self) -> bool:
        """One round of admission and decoding; False when there was nothing to run."""
        self._drop([r for r in self._batch.rows if r.cancelled], "cancelled")
        admitted = self._admit()
        if admitted:
            self._admitting = admitted
            try:
                self._prefill(admitted)
            except Exception as err:
                # The running batch is untouched until a prefill merges into it: end only the
                # requests that fail, prefilling each alone when several went together.
                pending = [r for r in admitted if r not in self._batch.rows]
                for request in pending:
                    self._admitting = [request]
                    try:
                        if len(pending) == 1:
                            raise err
                        self._prefill([request])
                    except Exception as alone:
                        self._finish(request, "error", f"{type(alone).__name__}: {alone}")
            self._admitting = []
        ran = bool(admitted or self._batch.rows)
        if self._batch.rows:
            self._decode()
        for name in list(self._pending_unload):
            if name not in self._busy():
                self._pending_unload.discard(name)
                self.adapters.unregister(name)
        return ran

    def _admit(self) -> list[Request]:
        room = self.max_batch - len(self._batch)
        admitted: list[Request] = []
        tokens = 0
        busy = self._busy()
        with self._cond:
            waiting = list(self._waiting)
        for request in waiting:
            if len(admitted) >= room:
                break
            if request.cancelled:
                self._remove_waiting(request)
                self._finish(request, "cancelled")
                continue
            if admitted and tokens + len(request.prompt_ids) > self.max_prefill_tokens:
                break
            name = request.adapter
            if name is not None and name not in self.adapters.live:  # a live adapter is always resident
                if name not in self.adapters.paths:
                    self._remove_waiting(request)
                    self._finish(request, "error", unloaded_text(name), ADAPTER_UNLOADED)
                    continue
                if self.adapters.failed(name):
                    self._remove_waiting(request)
                    self._finish(request, "error", f"adapter {name!r} could not be read back from disk")
                    continue
                if not request.counted:
                    request.counted = True
                    self.adapters.count_hit(name)
                if not self.adapters.ready(name, busy):
                    continue  # being read from disk, or every slot is busy: others may go first
                busy.add(name)
            request.detok = Detokenizer(self.tokenizer, request.params.stop, self._decoding)
            self._remove_waiting(request)
            admitted.append(request)
            tokens += len(request.prompt_ids)
        return admitted

    def _remove_waiting(self, request: Request) -> None:
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)

    def _new_batch(self) -> Batch[Request] | SlotBatch:
        return self.decoder.new_batch()

    def _prefill(self, requests: list[Request]) -> None:
        tokens = self.decoder.prefill_rows(requests, self.adapters)
        self.stats.prompt_tokens += sum(len(r.prompt_ids) for r in requests)
        self._emit(requests, tokens)

    def _decode(self) -> None:
        stepped = self.decoder.decode_rows(self.adapters, lambda rows, error: self._drop(rows, "error", error))
        if stepped is None:
            return
        rows, tokens = stepped
        self.stats.decode_steps += 1
        self.stats.batch_rows += len(rows)
        self.stats.last_batch_size = len(rows)
        self._emit(rows, tokens)

    def _emit(self, requests: list[Request], tokens: list[int]) -> None:
        """Hand each row its new token; finished rows leave the batch."""
        done: list[tuple[Request, str]] = []
        for request, token in zip(requests, tokens, strict=True):
            if request.cancelled:
                done.append((request, "cancelled"))
                continue
            detok = request.detok
            assert detok is not None
            reason = None
            if token in self.eos_ids:
                reason = "stop"
                request.eos_id = token
            else:
                try:
                    stopped = detok.add(token)
                except Exception as err:  # this row's text or stop check failed: it ends alone
                    self._drop([request], "error", error_text(err))
                    continue
                request.output_ids.append(token)
                self.stats.generated_tokens += 1
                if stopped:
                    reason = "stop"
                elif len(request.output_ids) >= request.limit:
                    reason = "length"
            if reason is None:
                event = Event(detok.delta(final=False), self._new_ids(request), None, len(request.prompt_ids), len(request.output_ids))
                try:
                    request.notify(event)
                except Exception:  # the listener is gone (its client left): free the row
                    done.append((request, "cancelled"))
            else:
                done.append((request, reason))
        by_reason: dict[str, list[Request]] = {}
        for request, reason in done:
            by_reason.setdefault(reason, []).append(request)
        for reason, group in by_reason.items():
            self._drop(group, reason)

    def _drop(self, requests: list[Request], reason: str, error: str | None = None) -> None:
        """Finish `requests` and remove their rows, trimming padding no row needs any more."""
        if not requests:
            return
        for request in requests:
            self._finish(request, reason, error)
        gone = set(map(id, requests))
        self._batch.keep([i for i, r in enumerate(self._batch.rows) if id(r) not in gone])

    @staticmethod
    def _new_ids(request: Request) -> list[int]:
        ids = request.output_ids[request.sent_ids :]
        request.sent_ids = len(request.output_ids)
        return ids

    def _finish(self, request: Request, reason: str, error: str | None = None, code: str | None = None) -> None:
        self.stats.requests[reason] = self.stats.requests.get(reason, 0) + 1
        if request.logprobs is not None:  # drop those of tokens drawn but not kept (cancelled, failed)
            del request.logprobs[len(request.output_ids) + (request.eos_id is not None) :]
        text = ""
        if request.detok is not None:
            try:
                if reason != "stop" or not request.detok.stop:
                    request.detok.flush()
                text = request.detok.delta(final=True)
            except Exception:  # the detokenizer that failed this request: its error says why
                text = ""
        try:
            request.notify(
                Event(text, self._new_ids(request), reason, len(request.prompt_ids), len(request.output_ids), error, code)
            )
        except Exception:  # a broken listener must not stop the batch
            pass


def unloaded_text(name: str) -> str:
    return f"adapter {name!r} was unloaded before this request started; load it again or name another model"


__all__ = ["Completion", "Engine", "Event", "InvalidPrompt", "PromptTooLong", "QueueFull", "UnknownAdapter"]
