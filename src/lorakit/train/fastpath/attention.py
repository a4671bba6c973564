"""Padding-free (packed) causal attention: sequences laid end to end never attend to each other.

A packed batch is one stream of T tokens made of N sequences; `Segments` holds their
boundaries as cumulative offsets (`cu_seqlens`, FlashAttention's convention):

    cu_seqlens = [0, len_0, len_0 + len_1, ..., T]        int32, (N + 1,)

    packed_attention(q, k, v, segments, scale)            q: (T, Hq, D), k, v: (T, Hkv, D) -> (T, Hq, D)
    out[t] = softmax(scale * q[t] @ k[s:t+1].T) @ v[s:t+1]   where s = the start of t's sequence

On CUDA this is PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen.varlen_attn`,
torch >= 2.10): no mask is built and the work is that of the real tokens only. Elsewhere (the CPU,
older torch) it is `packed_attention_reference`: each sequence through causal SDPA on its own,
which is exact and is what the GPU kernel is checked against.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Segments:
    """The sequences of a packed stream of tokens."""

    cu_seqlens: torch.Tensor
    """int32 (N + 1,) cumulative lengths, on the tokens' device."""
    lengths: tuple[int, ...]
    """The N lengths, on the host (the reference and max_len need them without a device sync)."""

    @property
    def max_len(self) -> int:
        return max(self.lengths)


def segments_from_positions(position_ids: torch.Tensor) -> Segments | None:
    """Sequence boundaries of a (B, S) batch whose position ids restart at 0 for each packed
    sequence; the rows are read as one stream of B * S tokens (a row boundary is a sequence
    boundary too). None when every row is one plain sequence 0..S-1 (causal SDPA serves it).

    Right padding continues a row's last sequence (as `lorakit.data.sft.collate` writes it): the
    pads then attend only to that sequence, and no real token attends to them (they come after).
    """
    batch, seq = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = flat == 0
    starts[::seq] = True
    if int(starts.sum()) == batch and bool((position_ids == torch.arange(seq, device=flat.device)).all()):
        return None
    offsets = starts.nonzero().squeeze(1).tolist() + [batch * seq]
    lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:], strict=True))
    cu = torch.tensor(offsets, dtype=torch.int32, device=flat.device)
    return Segments(cu, lengths)


def packed_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float | None = None
) -> torch.Tensor:
    """Each sequence alone through causal SDPA; q (T, Hq, D), k, v (T, Hkv, D) -> (T, Hq, D)."""
    out = []
    start = 0
    for n in segments.lengths:
        part = slice(start, start + n)
        o = F.scaled_dot_product_attention(
            q[part].transpose(0, 1),
            k[part].transpose(0, 1),
            v[part].transpose(0, 1),
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )  # (Hq, n, D)
        out.append(o.transpose(0, 1))
        start += n
    return torch.cat(out)


@cache
def _varlen():
    """PyTorch's varlen FlashAttention and how this version spells causal and GQA, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, "window_size" in params, "enable_gqa" in params


def backend(device: torch.device) -> str:
    """The kernel `packed_attention` runs on this device: varlen (FlashAttention) or reference."""
    return "varlen" if device.type == "cuda" and _varlen() is not None else "reference"


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float | None = None
) -> torch.Tensor:
    """Causal attention within each sequence of the packed stream; shapes as in the module docstring."""
    if backend(q.device) == "reference" or q.dtype not in (torch.float16, torch.bfloat16):
        return packed_attention_reference(q, k, v, segments, scale)
    varlen_attn, window, gqa = _varlen()
    kwargs: dict = {"scale": scale}
    if window:  # torch >= 2.11 spells causal as a (left, right) window
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    cu = segments.cu_seqlens
    if q.shape[1] != k.shape[1]:
        if gqa:
            kwargs["enable_gqa"] = True
        elif _native_gqa[0]:
            # torch 2.10-2.12 have no enable_gqa flag, but FlashAttention takes fewer key/value
            # heads as they are (checked against the reference in bench/train_gpu.py's check)
            try:
                return varlen_attn(q, k, v, cu, cu, segments.max_len, segments.max_len, **kwargs)
            except (RuntimeError, ValueError):
                _native_gqa[0] = False
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return varlen_attn(q, k, v, cu, cu, segments.max_len, segments.max_len, **kwargs)


_native_gqa = [True]
"""Whether this torch's varlen_attn without an enable_gqa flag accepts fewer key/value heads."""
