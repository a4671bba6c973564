"""The running batch: its rows and their left-padded KV cache.

Row i's tokens sit at the right end of transformers' `DynamicCache` tensors
(batch, kv heads, length, head dim); `mask` (batch, length) marks real tokens with 1
and padding with 0, and `positions` holds each row's next position id, so rows of
different lengths decode together exactly as each would alone. Rows join after their
own prefill (`merge`, left-padding whichever side is shorter) and leave at any token
(`keep`, which also cuts columns that have become padding in every row).
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F

Row = TypeVar("Row")


def pad_left(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` zero-padded at the start of dimension `dim` to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


class Batch(Generic[Row]):
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: Any = None  # transformers DynamicCache
        self.mask: torch.Tensor | None = None  # (rows, length) int64
        self.positions: torch.Tensor | None = None  # (rows,) position id of each row's next token
        self.last: torch.Tensor | None = None  # (rows,) each row's newest token

    def __len__(self) -> int:
        return len(self.rows)

    def merge(self, rows: list[Row], cache: Any, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Add freshly prefilled rows: their cache, (rows, length) mask and first sampled tokens."""
        positions = mask.sum(-1)
        if not self.rows:
            self.rows, self.cache, self.mask, self.positions, self.last = list(rows), cache, mask, positions, tokens
            return
        assert self.mask is not None and self.positions is not None and self.last is not None
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.keys = torch.cat([pad_left(old.keys, length, -2), pad_left(new.keys, length, -2)])
            old.values = torch.cat([pad_left(old.values, length, -2), pad_left(new.values, length, -2)])
        self.mask = torch.cat([pad_left(self.mask, length, 1), pad_left(mask, length, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])
        self.rows.extend(rows)

    def step_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs of one decoding step (the mask grows by the column being decoded)."""
        assert self.mask is not None and self.positions is not None and self.last is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        return {"input_ids": self.last.unsqueeze(1), "attention_mask": self.mask, "position_ids": self.positions.unsqueeze(1)}

    def advance(self, cache: Any, tokens: torch.Tensor) -> None:
        """Record a decoding step's cache and sampled tokens."""
        assert self.positions is not None
        self.cache = cache
        self.positions = self.positions + 1
        self.last = tokens

    def save(self) -> tuple:
        """Everything a decoding step or `keep` replaces, for `restore`. Cheap: the tensors are
        referenced, not copied, since a step and `keep` build new ones (the cache's `update`
        concatenates) instead of writing into these."""
        layers = [(layer.keys, layer.values) for layer in self.cache.layers] if self.cache is not None else []
        return list(self.rows), self.cache, layers, self.mask, self.positions, self.last

    def restore(self, saved: tuple) -> None:
        """Go back to the state `save` returned, after a failed step or a trial `keep`."""
        rows, self.cache, layers, self.mask, self.positions, self.last = saved
        self.rows = list(rows)
        if self.cache is not None:
            for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
                layer.keys, layer.values = keys, values

    def keep(self, indices: list[int]) -> None:
        """Keep only rows `indices` (in order)."""
        if len(indices) == len(self.rows):
            return
        if not indices:
            self.__init__()
            return
        assert self.mask is not None and self.positions is not None and self.last is not None
        index = torch.tensor(indices, device=self.mask.device)
        self.rows = [self.rows[i] for i in indices]
        mask = self.mask[index]
        start = int(mask.any(dim=0).int().argmax())  # first column some row still needs
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.positions = self.positions[index]
        self.last = self.last[index]
