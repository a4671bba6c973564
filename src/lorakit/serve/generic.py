"""The generic decode path: transformers' own forward and dynamic KV cache, with each row's
adapter applied through `lorakit.mixed_batch`. It runs any model the engine takes, on any
device (`decoder.py` says when the engine runs it).

Admitted requests are prefilled together, left-padded, and merged into the running batch
(`batch.py`); a decoding step runs every row in one forward pass and samples each row by its
own parameters. A row whose step fails ends alone (`faults.py`).

A live adapter (the adapter being trained, see `adapters.py`) is read where it is: a step
whose rows all use it runs the model's plain forward with that adapter active, which reads
its `lora_A` / `lora_B` parameters themselves, so an optimizer's in-place update shows at
the next step with nothing copied. Rows that mix it with other adapters (or the base) run
`mixed_batch` with stacks built for that step alone; the cached slot stacks would not
notice weights changed in place.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from lorakit.adapters.inject import active_adapters, mixed_batch, set_adapter
from lorakit.adapters.state import has_adapters
from lorakit.serve.adapters import AdapterCache
from lorakit.serve.batch import Batch
from lorakit.serve.faults import run_step
from lorakit.serve.sampling import make_generator, record_logprobs, sample, token_logprobs


class GenericDecoder:
    """`Decoder` on transformers' forward; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, description: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.description = description
        self.batch: Batch = Batch()
        self._slots: AdapterCache | None = None
        # Only the last position's logits are needed; models that take `logits_to_keep` skip the rest.
        accepted = inspect.signature(model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        # transformers renamed `past_key_values` to `cache` (5.2x); take whichever this version has.
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"

    def describe(self) -> str:
        return self.description

    def adapter_reason(self, name: str) -> str | None:
        return None  # mixed_batch runs every adapter lorakit can attach

    def new_batch(self) -> Batch:
        self.batch = Batch()
        return self.batch

    def warm_up(self, adapters: AdapterCache) -> None:
        pass

    def _forward(self, names: list[str | None], adapters: AdapterCache, **inputs: torch.Tensor):
        if not has_adapters(self.model):
            return self.model(**inputs, use_cache=True)
        if names and names[0] in adapters.live and all(n == names[0] for n in names):
            with only_active(self.model, names[0]):  # reads the live parameters themselves
                return self.model(**inputs, use_cache=True)
        slots = None if any(n in adapters.live for n in names) else adapters.slots
        with mixed_batch(self.model, names, slots=slots):
            return self.model(**inputs, use_cache=True)

    def prefill_rows(self, requests: Sequence, adapters: AdapterCache) -> list[int]:
        length = max(len(r.prompt_ids) for r in requests)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(requests), length), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), length), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, length - len(r.prompt_ids) :] = 1
            r.generator = make_generator(r.params.seed, self.device)
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward([r.adapter for r in requests], adapters, input_ids=ids, attention_mask=mask,
                            position_ids=positions, **self._keep_last)
        params = [r.params for r in requests]
        tokens = sample(out.logits[:, -1], params, [r.generator for r in requests])
        record_logprobs(requests, token_logprobs(out.logits[:, -1], tokens, params))
        self.batch.merge(list(requests), out.get(self._cache_arg), mask, tokens)
        return tokens.tolist()

    def decode_rows(self, adapters: AdapterCache, drop: Callable[[list, str], None]) -> tuple[list, list[int]] | None:
        batch = self.batch

        def step(batch: Batch) -> tuple[object, torch.Tensor, list[float | None] | None]:
            """One decoding step's new cache, tokens and asked-for log-probs; `batch.advance`
            records the first two."""
            out = self._forward([r.adapter for r in batch.rows], adapters, **batch.step_inputs(),
                                **{self._cache_arg: batch.cache})
            params = [r.params for r in batch.rows]
            tokens = sample(out.logits[:, -1], params, [r.generator for r in batch.rows])
            return out.get(self._cache_arg), tokens, token_logprobs(out.logits[:, -1], tokens, params)

        # A row whose step fails ends alone; the others step again without it (faults.py).
        stepped = run_step(batch, step, drop)
        if stepped is None:
            return None
        cache, tokens, logprobs = stepped
        batch.advance(cache, tokens)
        record_logprobs(batch.rows, logprobs)
        return list(batch.rows), tokens.tolist()


@contextmanager
def only_active(model: nn.Module, name: str) -> Iterator[None]:
    """Run with adapter `name` alone active, as the plain forward reads it; the adapters that
    were active are active again after (a model being trained usually has `name` active
    already, and then nothing changes)."""
    before = active_adapters(model)
    if before == [name]:
        yield
        return
    set_adapter(model, name)
    try:
        yield
    finally:
        set_adapter(model, before)
