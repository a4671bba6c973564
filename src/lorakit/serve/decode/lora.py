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

from lorakit.adapters.layers import LoraLinear
from lorakit.serve.decode.ops import matmul
from lorakit.serve.decode.ops.bgmv import bgmv, bgmv_folded

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self_attn", ("q_proj", "k_proj", "v_proj")),
    ("self_attn", ("o_proj",)),
    ("mlp", ("gate_proj", "up_proj")),
    ("mlp", ("down_proj",)),
)
"""Projections that read the same input, whose LoRA A matmuls run as one."""

PROJECTIONS = tuple(name for _, names in GROUPS for name in names)


MODES = ("gather", "dense", "kernel")
FOLDED_MODES = {"folded": "gather", "folded-kernel": "kernel", "folded-split-k": "kernel"}
"""Modes of a decoding step whose base matmul also ran every slot's A (`folded_lora`), and
the `batched_lora` mode a group without folded A slots takes instead."""


def batched_lora(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    sizes: Sequence[int],
    index: torch.Tensor,
    mode: str = "gather",
) -> torch.Tensor:
    """The LoRA update of a projection group whose rows use different adapters, in one op.

    Exact semantics, for every row i, with G = len(sizes), r = b.shape[1], and projection j
    owning output columns cols_j (sizes[j] of them, in order):

        h[i] = x[i] @ A[index[i]].T                            # (G*r,), the grouped shrink
        y[i, cols_j] = h[i, j*r:(j+1)*r] @ B[index[i]][:, cols_j]   # the expand

    x: (batch, in) or (batch, seq, in); A: (slots, G*r, in), projection j's A in rows
    j*r..(j+1)*r; B: (slots, r, sum(sizes)), the group's B matrices transposed side by side
    (the adapter's scaling folded in; zero columns for a projection it does not target);
    index: (batch,) int64. An adapter of rank below r is zero-padded, which adds exact zeros.
    Returns y with x's leading shape and sum(sizes) columns. Fixed shapes, no host sync: a
    CUDA graph can hold it. Three ways to the same numbers:

    gather  gather each row's A and B (`index_select`) and run batched matmuls (in A's dtype);
    dense   run x against every slot's A in one matmul, zero all but each row's own slot, and
            expand with every slot's B: each resident adapter is read once whatever the batch
            (in A's dtype);
    kernel  one token per row on CUDA: `bgmv`'s Triton kernels read each row's own adapter
            once, without copies (float32).
    """
    if mode not in MODES:
        raise ValueError(f"batched_lora mode {mode!r}: one of {', '.join(MODES)}")
    squeeze = x.dim() == 2
    xs = (x.unsqueeze(1) if squeeze else x).to(a.dtype)  # (batch, seq, in)
    batch, seq, _ = xs.shape
    slots, width, d_in = a.shape
    r = b.shape[1]
    if mode == "kernel":
        rows = xs.reshape(batch * seq, d_in)
        y = bgmv(rows, a, b, index.repeat_interleave(seq) if seq > 1 else index, list(sizes))
        return y.view(batch, b.shape[2]) if squeeze else y.view(batch, seq, b.shape[2])
    if mode == "dense":
        own = (index.unsqueeze(1) == torch.arange(slots, device=index.device)).to(a.dtype)  # (batch, slots)
        h = F.linear(xs, a.view(slots * width, d_in)).view(batch, seq, slots, width)
        h = h * own.view(batch, 1, slots, 1)  # other slots' products become exact zeros
    else:
        h = torch.bmm(xs, a.index_select(0, index).transpose(1, 2))  # (batch, seq, G*r)
    b_rows = b.index_select(0, index) if mode == "gather" else b  # (batch, r, total)
    out = []
    start = 0
    for j, size in enumerate(sizes):
        if mode == "dense":
            hj = h[..., j * r : (j + 1) * r].reshape(batch, seq, slots * r)
            y = hj @ b.view(slots * r, b.shape[2])[:, start : start + size]  # (batch, seq, size), a view of B
        else:
            y = torch.bmm(h[..., j * r : (j + 1) * r], b_rows[:, :, start : start + size])
        out.append(y)
        start += size
    y = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
    return y.squeeze(1) if squeeze else y


def epilogue(parts: Sequence[torch.Tensor], residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """What reads a projection group's outputs, applied to them: glu=True, a gate/up group's
    silu(gate) * up; residual: residual + the one projection's output; else that output."""
    if glu:
        gate, up = parts
        return F.silu(gate) * up
    (y,) = parts
    return y if residual is None else residual + y


def folded_lora(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], index: torch.Tensor,
                mode: str, residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """A projection group's output with the rows' adapters, one token per row, when the shrink
    runs inside the base matmul: weight is [W; A[0]; A[1]; ...] (W's total rows, then every
    slot's G*r rows of A), so y = x @ weight.T holds the base output followed by every slot's
    products (`batched_lora`'s h for each slot). Row i keeps its own slot's products,
    h[i] = y[i, total + index[i]*G*r : total + (index[i]+1)*G*r], and adds `batched_lora`'s
    expand of them to its base output; (rows, total) in x's dtype.

    mode "folded": PyTorch (gathered batched matmuls); "folded-kernel": cuBLAS, then `bgmv`'s
    expand kernel (float32 sums); "folded-split-k": `matmul`'s split-K kernel and the expand
    kernel, which sums its partials, where `matmul.choose` names tiles (else as "folded-kernel").

    residual, glu: `epilogue` on the result, inside the expand kernel in the kernel modes."""
    if mode == "folded-split-k" and matmul.choose(x, weight.shape[0]) is not None:
        return matmul.folded_projection(x, weight, b, index, list(sizes), residual, glu)
    y = F.linear(x, weight)
    if mode != "folded":
        return bgmv_folded(y, b, index, list(sizes), residual, glu)
    slots, r, total = b.shape
    width = len(sizes) * r
    rows = y.shape[0]
    h = y[:, total:].reshape(rows, slots, width)[torch.arange(rows, device=y.device), index]  # (rows, G*r)
    b_rows = b.index_select(0, index)
    parts, start = [], 0
    for j, size in enumerate(sizes):
        parts.append(torch.bmm(h[:, None, j * r : (j + 1) * r].to(b.dtype), b_rows[:, :, start : start + size])[:, 0])
        start += size
    delta = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    acc = torch.promote_types(y.dtype, torch.float32)
    out = (y[:, :total].to(acc) + delta.to(acc)).to(y.dtype)
    return epilogue(split(out, sizes), residual, glu) if glu or residual is not None else out


def split(y: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """A group's output (..., sum(sizes)) as its projections' outputs."""
    return list(y.split(list(sizes), dim=-1)) if len(sizes) > 1 else [y]


class AdapterSlots:
    """The stacked A/B tensors of every resident adapter, slot by slot.

    `a[layer][group]`: (capacity + 1, G*rank, in) and `b[layer][group]`: (capacity + 1,
    rank, sum(sizes[layer][group])), or both None when no resident adapter targets any of
    the group's projections; an untargeted projection's columns of B stay zero. Slot
    `capacity` stays zero (rows without an adapter).
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
        self.b: list[list[torch.Tensor | None]] = []
        self.sizes = [
            [tuple(self._module(i, parent, p).out_features for p in projs) for parent, projs in GROUPS]
            for i in range(len(self.layers))
        ]
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
            b_row: list[torch.Tensor | None] = []
            for g, (parent, projs) in enumerate(GROUPS):
                if not any(p in targets for p in projs):
                    a_row.append(None)
                    b_row.append(None)
                    continue
                in_features = self._module(i, parent, projs[0]).in_features
                a_row.append(torch.zeros(count, len(projs) * rank, in_features, dtype=self.dtype, device=self.device))
                b_row.append(torch.zeros(count, rank, sum(self.sizes[i][g]), dtype=self.dtype, device=self.device))
            self.a.append(a_row)
            self.b.append(b_row)
        self.rank, self.targets = rank, targets
        self.layout += 1
        for name, slot in self.slot_of.items():
            self._write(slot, name)

    @torch.no_grad()
    def _clear(self, slot: int) -> None:
        for a_row, b_row in zip(self.a, self.b, strict=True):
            for a, b in zip(a_row, b_row, strict=True):
                if a is not None and b is not None:
                    a[slot].zero_()
                    b[slot].zero_()

    @torch.no_grad()
    def _write(self, slot: int, name: str) -> None:
        self._clear(slot)
        rank = self.rank
        for i in range(len(self.layers)):
            for g, (parent, projs) in enumerate(GROUPS):
                a, b = self.a[i][g], self.b[i][g]
                if a is None or b is None:
                    continue
                start = 0
                for j, (proj, size) in enumerate(zip(projs, self.sizes[i][g], strict=True)):
                    module = self._module(i, parent, proj)
                    if isinstance(module, LoraLinear) and name in module.r:
                        r = module.r[name]
                        a[slot, j * rank : j * rank + r] = module.lora_A[name].weight.to(self.dtype)
                        b[slot, :r, start : start + size] = (module.lora_B[name].weight * module.scaling[name]).T.to(self.dtype)
                    start += size
