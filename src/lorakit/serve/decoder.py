"""The engine's one view of a decode path: `Decoder`, and `choose_decoder`, which picks the
implementation an engine runs.

Two implementations:

    GenericDecoder  (generic.py)       transformers' forward with its dynamic KV cache and
                                       `lorakit.mixed_batch`: any model, any device
    FastDecoder     (decode/runner.py) Llama-family models: slot KV cache, batched LoRA
                                       kernels, CUDA graphs per batch bucket

The engine admits, schedules and finishes requests; a decoder owns the running batch's
cache and runs the model: it prefills admitted requests into that batch and steps every
running row by one token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from torch import nn

from lorakit.serve.adapters import AdapterCache
from lorakit.serve.decode import decode_reason
from lorakit.serve.decode.runner import FastDecoder
from lorakit.serve.decode.tuning import DecodeTuning
from lorakit.serve.generic import GenericDecoder

log = logging.getLogger(__name__)

PATHS = ("auto", "fast", "generic")

Drop = Callable[[list, str], None]
"""What a decoder calls to end rows whose own step failed: drop(rows, error)."""


class Decoder(Protocol):
    """What the engine asks of a decode path. Rows are the engine's `Request`s."""

    def describe(self) -> str:
        """One line for logs and /health: which path runs, and how."""

    def adapter_reason(self, name: str) -> str | None:
        """Why adapter `name`, attached to the model, cannot run on this path (None: it can)."""

    def new_batch(self):
        """Forget the running rows; the new, empty running batch (it has `rows` and a length)."""

    def warm_up(self, adapters: AdapterCache) -> None:
        """Work done once before the first request (compiling, capturing); may be a no-op."""

    def prefill_rows(self, requests: Sequence, adapters: AdapterCache) -> list[int]:
        """Prefill `requests` into the running batch; the first new token of each."""

    def decode_rows(self, adapters: AdapterCache, drop: Drop) -> tuple[list, list[int]] | None:
        """One token for every running row: (the rows stepped, their tokens), or None when
        no row stepped. Rows whose own step fails are ended through `drop`; a fault no
        single row raises is raised."""


def choose_decoder(
    model: nn.Module,
    tokenizer,
    path: str,
    *,
    max_batch: int,
    context_length: int,
    max_adapters: int,
    tuning: DecodeTuning | None = None,
) -> Decoder:
    """The decoder an engine runs: "fast" takes the fast path (or says why it cannot),
    "generic" keeps transformers' forward, and "auto" takes the fast path on a GPU (the GPU
    suite, `bench/serve.py --suite gpu`, measured it at 8x the generic path with the same
    greedy tokens in fp32; bench/RESULTS.md) and the generic one on the CPU, where the fast
    path is not faster."""
    if path not in PATHS:
        raise ValueError(f"decode_path must be one of {', '.join(PATHS)}; got {path!r}")
    if path == "generic":
        return GenericDecoder(model, tokenizer, "generic (transformers forward, dynamic KV cache; asked for)")
    reason = decode_reason(model, context_length)
    device = next(model.parameters()).device
    if reason is None and path == "auto" and device.type != "cuda":
        reason = f"the model is on {device.type}, where the fast path is not faster"
    if reason is not None:
        if path == "fast":
            raise ValueError(f"decode_path 'fast' cannot run this model: {reason}")
        return GenericDecoder(model, tokenizer, f"generic (transformers forward, dynamic KV cache): {reason}")
    return FastDecoder(model, max_batch=max_batch, context_length=context_length, max_adapters=max_adapters,
                       tuning=tuning)
