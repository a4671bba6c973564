"""Prefill of a few short prompts as a replayed CUDA graph.

A request that arrives while others decode is prefilled alone (or with the few that
arrived with it) between two decoding steps. Run eagerly, that prefill is hundreds of
kernel launches for a millisecond of device work, and every running row waits for it; at
a steady arrival rate it takes a large share of the engine's time. So prefill of up to
`ROWS` prompts is padded to a length bucket (`lengths`) and replayed from a graph captured
per (rows, bucket), like a decoding step.

Padding is exact: the padded positions come after each prompt, in the row's own cache
slot; they attend only to earlier positions, their outputs are not read, and their K/V
sit past the row's length, where the next decoding steps overwrite them before any query
reaches them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorakit.serve.decode.graphs import capture as capture_graph

ROWS = 4
"""Prefills of at most this many prompts run padded to a length bucket (a graph on CUDA)."""


def lengths(limit: int) -> list[int]:
    """The padded prompt lengths: 16, 32, ... doubling, up to `limit` (the chunk or context)."""
    out, n = [], 16
    while n <= limit:
        out.append(n)
        n *= 2
    return out


class PrefillGraph:
    """Prefill of `rows` prompts padded to `length` tokens: static inputs and, on CUDA, the
    captured graph that runs `forward(ids, slots, index, last) -> logits at each row's last
    prompt position`."""

    def __init__(self, rows: int, length: int, device: torch.device,
                 forward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 capture: bool, pool=None) -> None:
        self.ids = torch.zeros((rows, length), dtype=torch.long, device=device)
        self.slots = torch.arange(rows, device=device)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.last = torch.zeros(rows, dtype=torch.long, device=device)
        self.forward = forward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pool = pool
        self.capture = capture

    def run(self, ids: torch.Tensor, slots: torch.Tensor, index: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) at each row's last prompt position; ids (rows, n <= length)."""
        self.ids.zero_()
        self.ids[:, : ids.shape[1]].copy_(ids)
        self.slots.copy_(slots)
        self.index.copy_(index)
        self.last.copy_(last)
        if not self.capture:
            return self.forward(self.ids, self.slots, self.index, self.last)
        if self.graph is None:  # the warm-up runs write exactly what the replay writes
            self.graph, self.out = capture_graph(lambda: self.forward(self.ids, self.slots, self.index, self.last),
                                           self.ids.device, self.pool)
            self.pool = self.graph.pool()
        self.graph.replay()
        return self.out
