"""The definitions the decoding step's kernels compute, in plain PyTorch: each kernel and op is
tested against these (and the kernels check themselves against them once per device)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def batched_lora_reference(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sizes: Sequence[int], index: torch.Tensor
) -> torch.Tensor:
    """`batched_lora` as a loop over rows and projections (one token per row): the definition
    the op is tested against."""
    r = b.shape[1]
    rows = []
    for i in range(x.shape[0]):
        slot = int(index[i])
        parts, start = [], 0
        for j, size in enumerate(sizes):
            h = x[i].to(a.dtype) @ a[slot, j * r : (j + 1) * r].T
            parts.append(h @ b[slot, :, start : start + size])
            start += size
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The definition the kernels compute, in PyTorch: shapes as in `attention`'s docstring;
    float32 math (float64 for float64 inputs), returned in q's dtype."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, keys.dtype), torch.float32)
    allowed = torch.arange(keys.shape[2], device=q.device) <= positions[:, None]  # (rows, L)
    # (rows, kv heads, group, L)
    scores = torch.matmul(q.to(dtype), keys.to(dtype).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values.to(dtype)).to(q.dtype)
