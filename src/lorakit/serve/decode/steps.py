"""A decoding step of the fast path as the runner launches it: its inputs on the device, on
CUDA the captured graph that runs it, and its tokens (and log-probs, when asked) on their way
back to the host (`runner.py` says how steps are chained)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.serve.decode.graphs import capture as capture_graph

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""run(ints, floats, logprobs) -> (rows,) tokens: one decoding step from device inputs that
it moves on, writing the rows' token log-probs into `logprobs` when that is not None."""


class Step:
    """One decoding step for (rows, key length, greedy-only): its inputs on the device and,
    on CUDA, the captured graph that runs it; logprobs_dtype: it also writes the rows' token
    log-probs, in that dtype (None: it computes none)."""

    def __init__(self, run_step: StepFn, rows: int, ints: torch.Tensor, floats: torch.Tensor, device: torch.device,
                 capture: bool, pool=None, logprobs_dtype: torch.dtype | None = None) -> None:
        self.ints = ints.to(device)
        self.floats = floats.to(device)
        self.graph: torch.cuda.CUDAGraph | None = None
        # the rows' token log-probs, written by every run (None: this step computes none)
        self.logprobs = None if logprobs_dtype is None else torch.zeros(rows, dtype=logprobs_dtype, device=device)
        self.host_logprobs: list[torch.Tensor] | None = None

        def run() -> torch.Tensor:
            return run_step(self.ints, self.floats, self.logprobs)

        self.run = run
        if not capture:
            return
        # The warm-up runs write K/V where the real step writes them, then one position on
        # (overwritten before it is read), and move the inputs on: they are copied in again
        # at every launch from the host.
        self.graph, self.out = capture_graph(run, device, pool)
        # two host buffers: a chained step's tokens land in one while the host reads the other
        self.hosts = [torch.empty(rows, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self.flip = 0
        if logprobs_dtype is not None:
            self.host_logprobs = [torch.empty(rows, dtype=logprobs_dtype, pin_memory=True) for _ in range(2)]
        self.host_ints = torch.empty(ints.shape, dtype=ints.dtype, pin_memory=True)
        self.host_floats = torch.empty(floats.shape, dtype=floats.dtype, pin_memory=True)

    def launch(self, ints: torch.Tensor | None = None, floats: torch.Tensor | None = None) -> Running:
        """Run the step (inputs from the host, or None: as the last run left them); nothing waits here."""
        if self.graph is None:
            if ints is not None and floats is not None:
                self.ints.copy_(ints)
                self.floats.copy_(floats)
            tokens = self.run().cpu()
            # a copy: the next run (a chained step) rewrites the buffer
            return Running(self, tokens, None, None if self.logprobs is None else self.logprobs.to("cpu", copy=True))
        if ints is not None and floats is not None:
            self.host_ints.copy_(ints)
            self.host_floats.copy_(floats)
            self.ints.copy_(self.host_ints, non_blocking=True)
            self.floats.copy_(self.host_floats, non_blocking=True)
        self.graph.replay()
        host = self.hosts[self.flip]
        host.copy_(self.out, non_blocking=True)
        host_logprobs = None
        if self.logprobs is not None and self.host_logprobs is not None:
            host_logprobs = self.host_logprobs[self.flip]
            host_logprobs.copy_(self.logprobs, non_blocking=True)
        self.flip ^= 1
        done = torch.cuda.Event()
        done.record()
        return Running(self, host, done, host_logprobs)


class Running:
    """A launched step's tokens (and log-probs), on their way to the host (or there already)."""

    def __init__(self, step: Step, tokens: torch.Tensor, done: torch.cuda.Event | None = None,
                 logprobs: torch.Tensor | None = None) -> None:
        self.step = step
        self._tokens = tokens
        self.done = done
        self._logprobs = logprobs

    def tokens(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self._tokens.tolist()

    def logprobs(self) -> list[float] | None:
        """The rows' token log-probs in slot order (after `tokens`), or None when not computed."""
        return None if self._logprobs is None else self._logprobs.tolist()


class Launched:
    """A launched step: the rows it runs for, their slots, its runner; longest: 1 + the
    highest position it reads, key_length: how many positions its attention covers."""

    def __init__(self, rows: list, slots: list[int], runner: Running, longest: int, key_length: int) -> None:
        self.rows = rows
        self.slots = slots
        self.runner = runner
        self.longest = longest
        self.key_length = key_length

    def chain(self) -> Launched:
        """The same rows' next step, launched from the inputs this one left on the device."""
        return Launched(self.rows, self.slots, self.runner.step.launch(), self.longest + 1, self.key_length)

    def tokens(self) -> list[int]:
        return self.runner.tokens()

    def logprobs(self) -> list[float] | None:
        return self.runner.logprobs()
