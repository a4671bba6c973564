"""Rollouts for on-policy training (GRPO) from the serving engine, on the adapter being trained.

`Rollouts(model, tokenizer, adapter="default")` serves `adapter`, attached to `model` and
updated in place by the trainer's optimizer, as the engine's live adapter
(`Engine.add_live_adapter`). `generate` samples `num_generations` completions of every
prompt through the engine's continuous batching, with each sampled token's log-prob from
the very logits it was drawn from (the old policy's log-probs, TRL's convention:
log_softmax(logits / temperature), top-p not applied; log_softmax(logits) when greedy).

What is read, and what is copied:

- the generic decode path (the CPU) reads the adapter's `lora_A` / `lora_B` parameters in
  place at every step (a batch of rows that all use it runs the model's plain forward with
  it active): an optimizer step between two calls shows in the next one, nothing copied;
- the fast decode path (a GPU) cannot read them in place (its adapter slot concatenates the
  Q/K/V and gate/up A matrices and folds the scaling into a transposed B, in the model's
  dtype; see `decode/runner.py`): `generate` copies the adapter into its slot once at the
  start of each call, in place, never per decoding step.

The model is the trainer's own: nothing is merged and no second copy of the base exists.
`generate` blocks; the engine thread runs only inside it (started and halted per call: a
thread start and join, about 4 ms on a 2-core CPU), so nothing runs beside the trainer's
forward and backward. Rollouts run without autograd, in eval mode (no dropout); every
module's training flag is put back as it was when `generate` returns (and after
construction, whose engine sets eval). They run the model in its own dtype, outside any
autocast the trainer's forward uses, so the trainer's log-probs of the same tokens may differ
from `logps` by that precision.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from torch import nn

from lorakit.serve.engine import Engine
from lorakit.serve.requests import Event, Request
from lorakit.serve.sampling import SamplingParams


@dataclass
class Rollout:
    """One sampled completion of a prompt."""

    completion_ids: list[int]
    """Generated tokens, the end-of-sequence token included when one was generated."""
    logps: list[float]
    """Log-prob of each completion token in the rollout pass: log_softmax(logits / temperature)
    (top-p not applied); log_softmax(logits) for temperature 0."""
    finish_reason: str
    """"stop" (an end-of-sequence token) or "length" (max_new_tokens, or the model's context)."""


def completion_seed(seed: int, prompt: int, generation: int) -> int:
    """The seed of prompt `prompt`'s completion `generation`: a hash of the three, so no two
    completions of one call share a stream and a call is repeatable (63 bits, well mixed in
    the low 32 that the fast path's sampler reads)."""
    digest = hashlib.blake2b(f"{seed},{prompt},{generation}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def modes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module's training flag back as it was on the way out."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _Waiter:
    """Notified on the engine thread; set when its request has finished."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reason: str | None = None
        self.error: str | None = None

    def __call__(self, event: Event) -> None:
        if event.finish_reason is not None:
            self.reason, self.error = event.finish_reason, event.error
            self.done.set()


class Rollouts:
    """Completions of prompts from the adapter being trained; see the module docstring.

    model: the model being trained, with `adapter` attached (lorakit.inject); tokenizer: its
    tokenizer (end-of-sequence ids come from it and the model's configs); max_batch: most
    completions decoded together; decode_path: as `Engine`'s ("auto": the fast path on a GPU);
    context_length: the longest prompt plus completion (None: the model's own context), which
    sizes the fast path's KV cache and its graphs.
    """

    def __init__(self, model: nn.Module, tokenizer, *, adapter: str = "default", max_batch: int = 64,
                 decode_path: str = "auto", context_length: int | None = None) -> None:
        self.model = model
        self.adapter = adapter
        with modes_kept(model):  # the engine puts the model in eval mode
            self.engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=2**31 - 1,
                                 max_adapters_on_device=1, decode_path=decode_path,
                                 context_length=context_length)
        self.engine.add_live_adapter(adapter)
        self.decode_path = self.engine.decode_path

    def generate(self, prompts: Sequence[list[int]], *, num_generations: int, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int) -> list[Rollout]:
        """len(prompts) * num_generations rollouts, grouped: prompt i's G completions at [i*G, (i+1)*G).
        Deterministic for the same (prompts, seed, adapter weights): each completion gets its own
        seed derived from (seed, i, g)."""
        if not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")
        if not prompts:
            return []
        base = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, logprobs=True)
        engine = self.engine
        with modes_kept(self.model):
            self.model.eval()  # no dropout while sampling
            engine.refresh_adapter(self.adapter)  # the fast path copies the adapter into its slot once here
            engine.start()
            try:
                pending: list[tuple[Request, _Waiter]] = []
                for i, prompt in enumerate(prompts):
                    for g in range(num_generations):
                        waiter = _Waiter()
                        params = replace(base, seed=completion_seed(seed, i, g))
                        pending.append((engine.submit(prompt, self.adapter, params, waiter), waiter))
                for _, waiter in pending:
                    waiter.done.wait()
            finally:
                engine.halt()
        return [_rollout(request, waiter) for request, waiter in pending]

    def close(self) -> None:
        """Stop the engine for good (the model and its adapter stay as they are)."""
        self.engine.stop()

    def __enter__(self) -> Rollouts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rollout(request: Request, waiter: _Waiter) -> Rollout:
    if waiter.reason not in ("stop", "length"):
        raise RuntimeError(f"a rollout ended with {waiter.reason!r}: {waiter.error or 'the engine stopped'}")
    ids = list(request.output_ids)
    if request.eos_id is not None:
        ids.append(request.eos_id)
    logps = list(request.logprobs or [])
    if len(logps) != len(ids):
        raise RuntimeError(f"a rollout has {len(ids)} tokens but {len(logps)} log-probs")
    return Rollout(ids, logps, waiter.reason)
