"""The KV cache of the fast decode path: one preallocated slot per running request.

    keys[layer], values[layer]: (slots, kv heads, max length, head dim), allocated once

A request takes a slot when it joins and gives it back when it leaves; nothing is
copied either way. A row's tokens sit at positions 0..length-1 of its slot; what lies
past its length (an earlier request's tokens, prefill padding) is never attended to,
because every attention mask stops at the row's own position.

Slots are handed out lowest first, so the running rows stay packed at the start and a
decoding step can run over the first `span` slots only (a view, not a copy): rows past
the last running one are never computed, and free slots inside the span run as idle rows.
"""

from __future__ import annotations

import heapq

import torch


class SlotCache:
    """Preallocated K/V tensors and which slot each running request holds."""

    def __init__(
        self,
        layers: int,
        slots: int,
        kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if slots < 1 or max_length < 1:
            raise ValueError(f"a KV cache needs at least one slot and one position, got {slots} slots x {max_length}")
        # Heads before positions: the first `rows` slots' first L positions are a view that
        # batched matmuls read in place ((rows * kv heads) matrices of L x head dim). A step's
        # new K/V go in with one index_copy_ into the (slots * kv heads * max length, head dim)
        # view (`flat_index`), which a CUDA graph can hold.
        shape = (slots, kv_heads, max_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots = slots
        self.kv_heads = kv_heads
        self.max_length = max_length
        self.lengths = [0] * slots  # tokens held per slot (0 for a free slot)
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._used: set[int] = set()

    def flat_index(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rows of the (slots * kv heads * max length, head dim) view for slots (R,) at
        positions (R, T): (R * T * kv heads,), in the order of K/V shaped (R, T, kv heads, D)."""
        heads = torch.arange(self.kv_heads, device=positions.device)
        base = (slots.view(-1, 1, 1) * self.kv_heads + heads.view(1, 1, -1)) * self.max_length  # (R, 1, H)
        return (base + positions.unsqueeze(-1)).reshape(-1)

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def used(self) -> list[int]:
        return sorted(self._used)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def span(self) -> int:
        """1 + the highest slot in use (0 when none is)."""
        return max(self._used) + 1 if self._used else 0

    def allocate(self) -> int:
        """The lowest free slot, now in use with length 0."""
        if not self._free:
            raise RuntimeError(f"all {self.slots} KV cache slots are in use")
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"KV cache slot {slot} is not in use")
        self._used.discard(slot)
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)
