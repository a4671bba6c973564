"""The fast decode path as the engine drives it: prefill, decoding steps, the rows' slots.

`FastDecoder.batch` stands in for the generic path's `Batch`: the engine reads its
`rows`, and `keep` drops rows, which gives their KV slots back. `prefill(requests)`
takes a slot per request, runs the prompts (right-padded together, in chunks of at most
`prefill_chunk` tokens per row) and samples each request's first token;
`decode()` runs one step for every running row and returns their tokens in row order.

On CUDA each decoding step is a CUDA graph, captured on first use for its bucket: the
rows run over slots 0..span-1 with span rounded up to a batch bucket, attention reads a
key length rounded up to a multiple of `key_block`, and greedy-only steps skip the
sampling sort. Inputs go in with two small host-to-device copies and the tokens come
back with one device-to-host copy; nothing else crosses. Steps are pipelined: each step
also writes its tokens and the rows' next positions into its own inputs, so while the
batch keeps its rows the next step is launched before this one's tokens reach the host
(`decode`), and the device never waits for the engine's bookkeeping. Adapter slots
written in place need no recapture; reallocated ones (a larger rank, a newly targeted
projection) drop the graphs. `warmup` compiles and captures every bucket while no row
runs (at start, and after adapter slots are reallocated), so no request waits for it.
Anywhere else (the CPU) the same step runs eagerly; `pad_to_buckets` and `pipelined`
switch the graph-shaped, chained steps on there too, which is how the tests check them
without a GPU.

A step whose rows ask for their tokens' log-probs (`SamplingParams.logprobs`) is a graph of
its own (captured when first needed), so steps that do not ask compute none. A live
adapter (one the engine serves as attached to the model, see `serve/adapters.py`) cannot be
read in place here: its slot concatenates the Q/K/V (and gate/up) A matrices, holds B
transposed with the scaling folded in, in the model's dtype, and may sit inside the folded
base weight, so the slot is a copy, written again when the engine refreshes the adapter
(once per rollout batch, in place: the graphs that read it stay valid).

Prefill is batched (the admitted requests right-padded together) and chunked, but it is
not interleaved with decoding: the engine's `max_prefill_tokens` bounds how long one
admission holds the running rows. A prefill of a few short prompts (what arrives while
others decode) is padded to a length bucket and replayed from a graph (`prefill.py`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

import torch
from torch import nn

from lorakit.adapters.state import get_state
from lorakit.serve.decode import prefill
from lorakit.serve.decode.kv import SlotCache
from lorakit.serve.decode.lora import PROJECTIONS, AdapterSlots
from lorakit.serve.decode.model import FOLD_SLOTS_PER_ROW, DecoderModel
from lorakit.serve.decode.sampler import sample_rows, token_logprobs
from lorakit.serve.decode.steps import Launched, Running, Step
from lorakit.serve.decode.tuning import DecodeTuning, install
from lorakit.serve.faults import error_text
from lorakit.serve.sampling import SamplingParams, record_logprobs
from lorakit.serve.sampling import token_logprobs as row_logprobs

Row = TypeVar("Row")
log = logging.getLogger(__name__)


class SlotBatch(Generic[Row]):
    """The running rows and the KV slot of each; dropping a row frees its slot."""

    def __init__(self, cache: SlotCache) -> None:
        self.cache = cache
        self.rows: list[Row] = []
        self.slots: list[int] = []
        self.positions: list[int] = []  # position of each row's next input token
        self.last: list[int] = []  # each row's newest token (the next input)
        self.params: list[SamplingParams] = []
        self.seeds: list[int] = []
        self.adapters: list[str | None] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: Row, slot: int, length: int, token: int, params: SamplingParams, seed: int, adapter: str | None) -> None:
        for table, value in (
            (self.rows, row), (self.slots, slot), (self.positions, length), (self.last, token),
            (self.params, params), (self.seeds, seed), (self.adapters, adapter),
        ):
            table.append(value)

    def keep(self, indices: list[int]) -> None:
        """Keep only rows `indices` (in order); the others' slots are free again."""
        kept = set(indices)
        for i, slot in enumerate(self.slots):
            if i not in kept:
                self.cache.release(slot)
        for name in ("rows", "slots", "positions", "last", "params", "seeds", "adapters"):
            table = getattr(self, name)
            setattr(self, name, [table[i] for i in indices])

    def clear(self) -> None:
        self.keep([])


def batch_buckets(max_batch: int) -> list[int]:
    """Row counts a decoding graph is captured for: 1, 2, 4, 8, 16, then every 16, and max_batch."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_batch} | set(range(16, max_batch, 16)) | {max_batch}
    return sorted(sizes)


class FastDecoder:
    """Prefill and decoding steps of a Llama-family model on preallocated slots."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int,
        context_length: int,
        max_adapters: int,
        prefill_chunk: int = 512,
        key_block: int = 256,
        graphs: bool | None = None,
        compile: str | None = "auto",
        tuning: DecodeTuning | None = None,
    ) -> None:
        config = model.config
        tuning = tuning or DecodeTuning()
        install(tuning)  # the kernels launch with it (tuning.py)
        self.model = model
        self.device = next(model.parameters()).device
        if compile == "auto":  # compiled layers on a GPU, where eager steps are launch-bound
            compile = "inductor" if self.device.type == "cuda" else None
        self.decoder = DecoderModel(model, compile=compile, tuning=tuning)
        self.dtype = self.decoder.embed.weight.dtype
        if not self.dtype.is_floating_point:
            self.dtype = torch.bfloat16
        self.max_batch = max_batch
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk
        self.key_block = key_block
        self.cache = SlotCache(
            config.num_hidden_layers, max_batch, config.num_key_value_heads, context_length,
            self.decoder.head_dim, dtype=self.dtype, device=self.device,
        )
        self.lora = AdapterSlots(self.decoder.layers, max_adapters, self.dtype, self.device)
        self.batch: SlotBatch = SlotBatch(self.cache)
        self.graphs_enabled = self.device.type == "cuda" if graphs is None else graphs
        self.pad_to_buckets = self.graphs_enabled
        """Run each step over a batch bucket's rows and a key length rounded up to `key_block`
        (what a graph replays; on by itself with graphs, and testable without them)."""
        self.pipelined = self.graphs_enabled
        """Launch the next step before the engine has handed out this one's tokens (see decode)."""
        self.buckets = batch_buckets(max_batch)
        self._graphs: dict[tuple[int, int, bool], Step] = {}
        self._logprob_graphs: dict[tuple[int, int, bool], Step] = {}  # steps that also give log-probs
        self.prefill_lengths = prefill.lengths(min(prefill_chunk, context_length))
        self._prefills: dict[tuple[int, int], prefill.PrefillGraph] = {}
        self.warmed_layout: int | None = None
        self._graph_layout = self.lora.layout
        self._pool = None
        self.graph_error: str | None = None
        self._inflight: Launched | None = None

    def describe(self) -> str:
        mode = "CUDA graphs per batch bucket" if self.graphs_enabled else "eager steps"
        if self.graph_error is not None:
            mode += f" (CUDA graphs off after a failed capture: {self.graph_error})"
        lora = " (Triton BGMV kernels when decoding)" if self.decoder.lora_kernel else ""
        if self.decoder.fold and self.decoder.fused is not None:
            lora += f"; LoRA shrink folded into the base matmul while slots <= {FOLD_SLOTS_PER_ROW} per row"
        if self.decoder.attention_kernel:
            lora += "; Triton decode attention"
        fused = self.decoder.fused
        if fused is not None:
            compiled = "compiled" if fused.backend else "not compiled"
            if fused.compile_error is not None:
                compiled = f"not compiled (compiling failed, they run eagerly: {fused.compile_error})"
            mode += f"; fused layers, {compiled}"
        return (
            f"fast (slot KV cache {self.max_batch} x {self.context_length} tokens, "
            f"{self.cache.bytes / 2**20:.0f} MiB; batched LoRA{lora}; {mode})"
        )

    # the engine's Decoder interface (serve/decoder.py) --------------------------------------

    def adapter_reason(self, name: str) -> str | None:
        state = get_state(self.model)
        if state.configs[name].use_dora:
            return "it is a DoRA adapter; the fast decode path runs plain LoRA adapters"
        for path in state.targets[name]:
            if path.rsplit(".", 1)[-1] not in PROJECTIONS:
                return f"it adapts {path}; the fast decode path runs adapters on {', '.join(PROJECTIONS)} only"
        return None

    def warm_up(self, adapters) -> None:
        try:  # compile and capture the steps before the first request
            self.sync_adapters(adapters.resident)
        except Exception as err:
            log.warning("the fast decode path's warm-up failed (%s: %s); it runs when first used", type(err).__name__, err)

    def prefill_rows(self, requests: Sequence, adapters) -> list[int]:
        self.sync_adapters(adapters.resident)
        return self.prefill(requests)

    def decode_rows(self, adapters, drop) -> tuple[list, list[int]]:
        self.sync_adapters(adapters.resident)
        try:
            return self.decode()  # pipelined: the rows the step ran for
        except Exception:
            # each row steps alone once: those that fail end, the others go on
            rows, tokens, failed = self.decode_each()
            if not rows:
                raise
            for request, err in failed:
                drop([request], error_text(err))
            return rows, tokens

    def new_batch(self) -> SlotBatch:
        self._inflight = None
        self.batch.clear()
        self.batch = SlotBatch(self.cache)
        return self.batch

    def sync_adapters(self, resident: Mapping[str, object]) -> None:
        self.lora.sync(resident)
        if self.lora.layout != self._graph_layout:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # an in-flight step may still run an old graph
            self._graphs.clear()
            self._logprob_graphs.clear()
            self._prefills.clear()
            self._graph_layout = self.lora.layout
        if self.graphs_enabled and not self.batch.rows and self.warmed_layout != self.lora.layout:
            self.warmup()

    def key_lengths(self) -> list[int]:
        """The key lengths a decoding step is padded to (multiples of key_block, and the context)."""
        return sorted({min(k * self.key_block, self.context_length)
                       for k in range(1, -(-self.context_length // self.key_block) + 1)})

    @torch.no_grad()
    def warmup(self) -> None:
        """Compile and capture what serving will run, while no row runs: prefill of one and
        of several rows, one and several tokens, the padded prefills of a few prompts, and
        every decoding bucket, key length and sampling kind. Nothing runs, so what they
        write into free slots is never read."""
        if self.batch.rows:
            raise RuntimeError("warmup runs only while no request is running")
        for rows in sorted({1, min(2, self.max_batch)}):
            for steps, causal in ((1, False), (2, True), (2, False)):  # decode; a prefill's first chunk, a later one
                slots = torch.arange(rows, device=self.device)
                ids = torch.zeros((rows, steps), dtype=torch.long, device=self.device)
                positions = torch.arange(steps, device=self.device).expand(rows, -1)
                index = torch.full((rows,), self.lora.none, device=self.device)
                hidden = self.decoder.forward(ids, positions, self.cache, slots, steps, self.lora, index, causal=causal)
                self.decoder.logits(hidden[:, -1])
        for rows in range(1, min(prefill.ROWS, self.max_batch) + 1) if self.pad_to_buckets else []:
            for length in self.prefill_lengths:
                ids = torch.zeros((rows, length), dtype=torch.long, device=self.device)
                slots = torch.arange(rows, device=self.device)
                index = torch.full((rows,), self.lora.none, device=self.device)
                self._padded_prefill(rows, length, ids, slots, index, torch.zeros_like(slots))
        for rows in self.buckets if self.pad_to_buckets else []:
            for key_length in self.key_lengths():
                for greedy in (True, False):
                    ints, floats = self._inputs(rows, [], greedy)
                    self._run_step(rows, key_length, greedy, ints, floats).tokens()
        self.warmed_layout = self.lora.layout

    # prefill ---------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, requests: Sequence) -> list[int]:
        """Take a slot for each request (its `prompt_ids`, `params`, `adapter`), run its
        prompt, add it to the batch; returns each one's first token."""
        prompts = [r.prompt_ids for r in requests]
        params: list[SamplingParams] = [r.params for r in requests]
        adapters: list[str | None] = [r.adapter for r in requests]
        slots = [self.cache.allocate() for _ in requests]
        try:
            seeds = [p.seed if p.seed is not None else random.getrandbits(32) for p in params]
            index = torch.tensor(self.lora.index(adapters), device=self.device)
            lengths = [len(p) for p in prompts]
            longest = max(lengths)
            ids = torch.zeros((len(requests), longest), dtype=torch.long)
            for i, prompt in enumerate(prompts):
                ids[i, : len(prompt)] = torch.tensor(prompt)
            ids = ids.to(self.device)
            slot_t = torch.tensor(slots, device=self.device)
            last = torch.tensor(lengths, device=self.device) - 1  # each row's last prompt position
            bucket = self._prefill_bucket(len(requests), longest)
            if bucket is not None:  # a few short prompts: padded, replayed from a graph on CUDA
                logits = self._padded_prefill(len(requests), bucket, ids, slot_t, index, last)
            else:
                logits = self.decoder.logits(self._prefill_hidden(ids, slot_t, index, last, longest))
            sampled = self._sample(logits, params, seeds, [n - 1 for n in lengths])
            logprobs = row_logprobs(logits, sampled, params)
            tokens = sampled.tolist()
        except BaseException:
            for slot in slots:
                self.cache.release(slot)
            raise
        for request, slot, n, token, p, seed, name in zip(requests, slots, lengths, tokens, params, seeds, adapters, strict=True):
            self.cache.lengths[slot] = n
            self.batch.add(request, slot, n, token, p, seed, name)
        record_logprobs(requests, logprobs)
        return tokens

    def _prefill_hidden(self, ids: torch.Tensor, slots: torch.Tensor, index: torch.Tensor, last: torch.Tensor,
                        longest: int) -> torch.Tensor:
        """Run the prompts in chunks; each row's hidden state at its last prompt position."""
        rows = ids.shape[0]
        final: torch.Tensor | None = None
        for start in range(0, longest, self.prefill_chunk):
            end = min(start + self.prefill_chunk, longest)
            positions = torch.arange(start, end, device=self.device).expand(rows, -1)
            hidden = self.decoder.forward(ids[:, start:end], positions, self.cache, slots, end, self.lora, index,
                                          causal=start == 0)
            # rows whose last prompt token is in this chunk keep its hidden state
            inside = (last >= start) & (last < end)
            picked = hidden[torch.arange(rows, device=self.device), (last - start).clamp(0, end - start - 1)]
            final = picked if final is None else torch.where(inside.unsqueeze(1), picked, final)
        assert final is not None
        return final

    def _prefill_bucket(self, rows: int, longest: int) -> int | None:
        """The padded length for a prefill of `rows` prompts (None: run it unpadded)."""
        if not self.pad_to_buckets or rows > prefill.ROWS:
            return None
        return next((n for n in self.prefill_lengths if n >= longest), None)

    def _padded_prefill(self, rows: int, length: int, ids: torch.Tensor, slots: torch.Tensor, index: torch.Tensor,
                        last: torch.Tensor) -> torch.Tensor:
        """Logits at the rows' last prompt positions, the prompts padded to `length` (a captured
        graph per (rows, length) on CUDA; a failed capture turns graphs off, as for decoding)."""
        key = (rows, length)
        graph = self._prefills.get(key)
        if graph is None:
            def forward(ids: torch.Tensor, slots: torch.Tensor, index: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
                return self.decoder.logits(self._prefill_hidden(ids, slots, index, last, length))

            graph = prefill.PrefillGraph(rows, length, self.device, forward, self.graphs_enabled, self._pool)
            if self.graphs_enabled:
                self._prefills[key] = graph
        try:
            logits = graph.run(ids, slots, index, last)
        except Exception as err:
            if not self.graphs_enabled:
                raise
            self._graphs_off(err)
            return self._padded_prefill(rows, length, ids, slots, index, last)
        if graph.pool is not None:
            self._pool = graph.pool
        return logits

    def _sample(self, logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int],
                positions: Sequence[int]) -> torch.Tensor:
        if all(p.greedy for p in params):
            return logits.argmax(dim=-1)
        device = logits.device
        return sample_rows(
            logits,
            torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32),
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32),
            torch.tensor(seeds, device=device),
            torch.tensor(positions, device=device),
        )

    # decoding --------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self) -> tuple[list, list[int]]:
        """Tokens of one decoding step: (the rows it ran for that are still running, their tokens).

        With `pipelined` (on with CUDA graphs), once a step's tokens are back the next step
        for every running row is launched before this returns, so the device computes it
        while the engine hands out these tokens. A row that finishes on them wastes its part
        of that step; a row that joins meanwhile (its own prefill) enters the step after.
        """
        where = {id(r): i for i, r in enumerate(self.batch.rows)}
        if self._inflight is None or not any(id(r) in where for r in self._inflight.rows):
            self._inflight = self._launch()
        step = self._inflight
        self._inflight = None
        if self.pipelined and self._unchanged(step):
            self._inflight = step.chain()  # the device moves on while the host reads these tokens
        tokens = step.tokens()
        logprobs = step.logprobs()
        rows, out = [], []
        for row, slot in zip(step.rows, step.slots, strict=True):
            i = where.get(id(row))
            if i is None:  # left the batch after this step was launched
                continue
            token = int(tokens[slot])
            if logprobs is not None and row.logprobs is not None:
                row.logprobs.append(logprobs[slot])
            self.batch.positions[i] += 1
            self.batch.last[i] = token
            self.cache.lengths[slot] = self.batch.positions[i]
            rows.append(row)
            out.append(token)
        if self.pipelined and self._inflight is None:
            try:
                self._inflight = self._launch()
            except Exception:  # these tokens stand; the next step launches (and fails) anew
                self._inflight = None
        return rows, out

    @torch.no_grad()
    def decode_each(self) -> tuple[list, list[int], list[tuple[object, Exception]]]:
        """One step for each running row alone, eagerly, after a batched step raised: (the
        rows that stepped, their tokens, (row, error) of those that raised). A row's token
        is a function of its own logits, seed and position, so it is the one the batched
        step would have drawn; a failed row's slot is left for the caller to free."""
        self._inflight = None
        batch = self.batch
        rows, tokens, failed = [], [], []
        for i, row in enumerate(list(batch.rows)):
            slot, position = batch.slots[i], batch.positions[i]
            try:
                index = torch.tensor(self.lora.index([batch.adapters[i]]), device=self.device)
                hidden = self.decoder.forward(
                    torch.tensor([[batch.last[i]]], device=self.device), torch.tensor([[position]], device=self.device),
                    self.cache, torch.tensor([slot], device=self.device), position + 1, self.lora, index,
                )
                logits = self.decoder.logits(hidden[:, -1])
                sampled = self._sample(logits, [batch.params[i]], [batch.seeds[i]], [position])
                logprobs = row_logprobs(logits, sampled, [batch.params[i]])
                token = int(sampled[0])
            except Exception as err:
                failed.append((row, err))
                continue
            record_logprobs([row], logprobs)
            batch.positions[i] += 1
            batch.last[i] = token
            self.cache.lengths[slot] = batch.positions[i]
            rows.append(row)
            tokens.append(token)
        return rows, tokens, failed

    def _unchanged(self, step: Launched) -> bool:
        """Whether the step after `step` runs the same rows in the same graph: then it is
        chained on the device (the step fed its own tokens and positions forward)."""
        batch = self.batch
        return (
            len(step.rows) == len(batch.rows)
            and all(a is b for a, b in zip(step.rows, batch.rows, strict=True))
            and step.longest + 1 <= step.key_length
        )

    def _launch(self) -> Launched:
        """Start one step for every running row from the host's view of the batch."""
        batch = self.batch
        span = self.cache.span
        greedy = all(p.greedy for p in batch.params)
        logprobs = any(p.logprobs for p in batch.params)
        longest = max(batch.positions) + 1
        if self.pad_to_buckets:
            rows = next(b for b in self.buckets if b >= span)
            key_length = min(-(-longest // self.key_block) * self.key_block, self.context_length)
        else:
            rows, key_length = span, longest
        ints, floats = self._inputs(rows, batch.slots, greedy)
        runner = self._run_step(rows, key_length, greedy, ints, floats, logprobs)
        return Launched(list(batch.rows), list(batch.slots), runner, longest, key_length)

    def _inputs(self, rows: int, slots: Sequence[int], greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot-ordered step inputs: ints (token, position, adapter, seed, top_k, running) and
        floats (temperature, top_p); idle slots decode token 0 at position 0 of their own
        slot, unseen, and stay there."""
        batch = self.batch
        token, position, adapter, seed, top_k = [0] * rows, [0] * rows, [self.lora.none] * rows, [0] * rows, [0] * rows
        running = [0] * rows
        temperature, top_p = [0.0] * rows, [1.0] * rows
        index = self.lora.index(batch.adapters) if slots else []
        for i, slot in enumerate(slots):
            p = batch.params[i]
            token[slot], position[slot], adapter[slot], running[slot] = batch.last[i], batch.positions[i], index[i], 1
            seed[slot], top_k[slot], temperature[slot], top_p[slot] = batch.seeds[i] & 0xFFFFFFFF, p.top_k, p.temperature, p.top_p
        ints = torch.tensor([token, position, adapter, seed, top_k, running], dtype=torch.long)
        floats = torch.tensor([temperature, top_p], dtype=torch.float32)
        return ints, floats

    def _run_step(self, rows: int, key_length: int, greedy: bool, ints: torch.Tensor, floats: torch.Tensor,
                  logprobs: bool = False) -> Running:
        """Launch the step from these inputs (the step's runner: a captured graph on CUDA);
        logprobs: it also gives each row's token log-prob."""
        if not self.graphs_enabled:  # an eager step keeps nothing between launches but its inputs
            return self._new_step(rows, key_length, greedy, ints, floats, False, logprobs).launch()
        graphs = self._logprob_graphs if logprobs else self._graphs
        key = (rows, key_length, greedy)
        step = graphs.get(key)
        if step is None:
            try:
                step = graphs[key] = self._new_step(rows, key_length, greedy, ints, floats, True, logprobs)
            except Exception as err:
                self._graphs_off(err)
                return self._run_step(rows, key_length, greedy, ints, floats, logprobs)
        return step.launch(ints, floats)

    def _new_step(self, rows: int, key_length: int, greedy: bool, ints: torch.Tensor, floats: torch.Tensor,
                  capture: bool, logprobs: bool) -> Step:
        def run(ints: torch.Tensor, floats: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
            return self.step(rows, key_length, greedy, ints, floats, out)

        dtype = torch.promote_types(self.dtype, torch.float32) if logprobs else None
        step = Step(run, rows, ints, floats, self.device, capture, self._pool, dtype)
        if step.graph is not None:
            self._pool = step.graph.pool()
        return step

    def _graphs_off(self, err: Exception) -> None:
        """A capture failed: record why and serve eagerly from now on (graphs are an optimisation)."""
        self.graph_error = f"{type(err).__name__}: {err}"
        log.warning("the fast decode path's CUDA graphs are off from now on, steps run eagerly: %s", self.graph_error)
        self.graphs_enabled = False
        self._graphs.clear()
        self._logprob_graphs.clear()
        self._prefills.clear()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, rows: int, key_length: int, greedy: bool, ints: torch.Tensor, floats: torch.Tensor,
             logprobs: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step over slots 0..rows-1 from device tensors; (rows,) tokens on the
        device. It also moves its own inputs on: each running row's token becomes the one
        just drawn and its position the next (idle rows stay put), so running it again is
        the next step of the same rows. logprobs: a (rows,) buffer that receives each row's
        token log-prob (`sampler.token_logprobs`); None: none is computed."""
        tokens, positions, index, seeds, top_k, running = ints
        slots = torch.arange(rows, device=ints.device)
        hidden = self.decoder.forward(
            tokens.unsqueeze(1), positions.unsqueeze(1), self.cache, slots, key_length, self.lora, index, gathered=False
        )
        logits = self.decoder.logits(hidden[:, 0])
        if greedy:
            out = logits.argmax(dim=-1)
        else:
            out = sample_rows(logits, floats[0], top_k, floats[1], seeds, positions)
        if logprobs is not None:
            logprobs.copy_(token_logprobs(logits, floats[0], out))
        tokens.copy_(out)
        positions.add_(running).clamp_(max=self.context_length - 1)
        return out
