"""Batched multi-adapter LoRA for the decode path: adapter slots and the op that reads them.

Every resident adapter owns a slot of stacked A/B tensors, one set per projection group
of every decoder layer (Q/K/V together, O, gate/up together, down). The last slot is all
zeros: rows without an adapter use it and get exactly the base output. Loading or
evicting an adapter writes its slot in place, so the tensors (and any CUDA graph that
reads them) stay the same; only a rank larger than any seen so far, or a projection no
resident adapter targeted before, reallocates them (`layout` changes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...layers import LoraLinear

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
"""Projections that read the same input, whose LoRA A matmuls run as one."""

PROJECTIONS = tuple(name for _, names in GROUPS for name in names)


def batched_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    bs: Sequence[torch.Tensor | None],
    index: torch.Tensor,
    dense: bool = False,
) -> list[torch.Tensor | None]:
    """The LoRA updates of a projection group whose rows use different adapters, in one op.

    Exact semantics, for every row i, with r = a.shape[1] // len(bs) and projection j:

        h[i] = x[i] @ A[index[i]].T                            # (G*r,), the grouped shrink
        y_j[i] = h[i, j*r:(j+1)*r] @ B_j[index[i]]               # (out_j,), the expand

    x: (batch, in) or (batch, seq, in); A: (slots, G*r, in), projection j's A in rows
    j*r..(j+1)*r; B_j: (slots, r, out_j) (B transposed, the adapter's scaling folded in),
    or None for a projection no resident adapter targets (its y_j is None); index: (batch,)
    int64. An adapter of rank below r is zero-padded, which adds exact zeros. Returns the
    y_j with x's leading shape, in A's dtype. Fixed shapes, no host sync: a CUDA graph can
    hold it. Two ways to the same numbers:

    dense=False  gather each row's A and B (`index_select`) and run batched matmuls: the
                 work and traffic grow with the batch (Punica's BGMV does this without the
                 gather copies);
    dense=True   run x against every slot's A in one matmul, zero all but each row's own
                 slot, and expand with every slot's B in one matmul: each resident adapter
                 is read once per step whatever the batch, the better deal when the batch
                 is not much smaller than the number of slots.
    """
    squeeze = x.dim() == 2
    xs = (x.unsqueeze(1) if squeeze else x).to(a.dtype)  # (batch, seq, in)
    batch, seq, _ = xs.shape
    slots, width, d_in = a.shape
    r = width // len(bs)
    if dense:
        own = (index.unsqueeze(1) == torch.arange(slots, device=index.device)).to(a.dtype)  # (batch, slots)
        h = F.linear(xs, a.view(slots * width, d_in)).view(batch, seq, slots, width)
        h = h * own.view(batch, 1, slots, 1)  # other slots' products become exact zeros
    else:
        h = torch.bmm(xs, a.index_select(0, index).transpose(1, 2))  # (batch, seq, G*r)
    out: list[torch.Tensor | None] = []
    for j, b in enumerate(bs):
        if b is None:
            out.append(None)
            continue
        if dense:
            hj = h[..., j * r : (j + 1) * r].reshape(batch, seq, slots * r)
            y = hj @ b.view(slots * r, b.shape[2])  # (batch, seq, out)
        else:
            y = torch.bmm(h[..., j * r : (j + 1) * r], b.index_select(0, index))
        out.append(y.squeeze(1) if squeeze else y)
    return out


def batched_lora_reference(
    x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor | None], index: torch.Tensor
) -> list[torch.Tensor | None]:
    """`batched_lora` as a loop over rows: the definition the op is tested against."""
    r = a.shape[1] // len(bs)
    out: list[torch.Tensor | None] = []
    for j, b in enumerate(bs):
        if b is None:
            out.append(None)
            continue
        rows = []
        for i in range(x.shape[0]):
            slot = int(index[i])
            h = x[i].to(a.dtype) @ a[slot, j * r : (j + 1) * r].T
            rows.append(h @ b[slot])
        out.append(torch.stack(rows))
    return out


class AdapterSlots:
    """The stacked A/B tensors of every resident adapter, slot by slot.

    `a[layer][group]`: (capacity + 1, G*rank, in); `b[layer][group][j]`: (capacity + 1,
    rank, out_j) or None. Slot `capacity` stays zero (rows without an adapter).
    """

    def __init__(self, layers: Sequence[nn.Module], capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        self.layers = list(layers)
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.none = capacity  # the zero slot
        self.slot_of: dict[str, int] = {}
        self._source: dict[str, object] = {}  # name -> what it was written from (a reload is a new object)
        self.rank = 0
        self.targets: frozenset[str] = frozenset()
        self.a: list[list[torch.Tensor | None]] = []
        self.b: list[list[list[torch.Tensor | None]]] = []
        self.layout = 0  # bumped whenever the tensors are reallocated

    @property
    def active(self) -> bool:
        return bool(self.targets) and self.rank > 0

    def index(self, names: Sequence[str | None]) -> list[int]:
        return [self.none if n is None else self.slot_of[n] for n in names]

    def _module(self, layer: int, parent: str, proj: str) -> nn.Module:
        return getattr(getattr(self.layers[layer], parent), proj)

    def _needs(self, name: str) -> tuple[int, set[str]]:
        rank, targets = 0, set()
        for i in range(len(self.layers)):
            for parent, projs in GROUPS:
                for proj in projs:
                    module = self._module(i, parent, proj)
                    if isinstance(module, LoraLinear) and name in module.r:
                        rank = max(rank, module.r[name])
                        targets.add(proj)
        return rank, targets

    def sync(self, resident: Mapping[str, object]) -> None:
        """Make the slots hold exactly `resident` (name -> the object it was loaded from)."""
        for name in [n for n in self.slot_of if n not in resident or resident[n] is not self._source[n]]:
            slot = self.slot_of.pop(name)
            self._source.pop(name)
            self._clear(slot)
        new = [n for n in resident if n not in self.slot_of]
        if not new:
            return
        rank, targets = self.rank, set(self.targets)
        for name in new:
            r, t = self._needs(name)
            rank, targets = max(rank, r), targets | t
        if rank > self.rank or targets != self.targets:
            self._allocate(rank, frozenset(targets))
        used = set(self.slot_of.values())
        free = [s for s in range(self.capacity) if s not in used]
        for name in new:
            if not free:
                raise RuntimeError(f"all {self.capacity} adapter slots are in use")
            slot = free.pop(0)
            self.slot_of[name] = slot
            self._source[name] = resident[name]
            self._write(slot, name)

    def _allocate(self, rank: int, targets: frozenset[str]) -> None:
        count = self.capacity + 1
        self.a, self.b = [], []
        for i in range(len(self.layers)):
            a_row: list[torch.Tensor | None] = []
            b_row: list[list[torch.Tensor | None]] = []
            for parent, projs in GROUPS:
                first = self._module(i, parent, projs[0])
                present = [p in targets for p in projs]
                if not any(present):
                    a_row.append(None)
                    b_row.append([None] * len(projs))
                    continue
                in_features = first.in_features
                a_row.append(torch.zeros(count, len(projs) * rank, in_features, dtype=self.dtype, device=self.device))
                b_row.append([
                    torch.zeros(count, rank, self._module(i, parent, p).out_features, dtype=self.dtype, device=self.device)
                    if on else None
                    for p, on in zip(projs, present, strict=True)
                ])
            self.a.append(a_row)
            self.b.append(b_row)
        self.rank, self.targets = rank, targets
        self.layout += 1
        for name, slot in self.slot_of.items():
            self._write(slot, name)

    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        for a_row, b_row in zip(self.a, self.b, strict=True):
            for a, bs in zip(a_row, b_row, strict=True):
                if a is not None:
                    a[slot].zero_()
                for b in bs:
                    if b is not None:
                        b[slot].zero_()

    @torch.no_grad()
    def _write(self, slot: int, name: str) -> None:
        self._clear(slot)
        rank = self.rank
        for i in range(len(self.layers)):
            for g, (parent, projs) in enumerate(GROUPS):
                a = self.a[i][g]
                if a is None:
                    continue
                for j, proj in enumerate(projs):
                    module = self._module(i, parent, proj)
                    b = self.b[i][g][j]
                    if b is None or not isinstance(module, LoraLinear) or name not in module.r:
                        continue
                    r = module.r[name]
                    a[slot, j * rank : j * rank + r] = module.lora_A[name].weight.to(self.dtype)
                    b[slot, :r] = (module.lora_B[name].weight * module.scaling[name]).T.to(self.dtype)
