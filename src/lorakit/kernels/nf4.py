"""Dequantizing a bitsandbytes NF4 weight in one compiled kernel.

The fused functions dequantize each 4-bit base weight in every forward, recompute and
backward: 7 weights a layer, hundreds of calls a step. bitsandbytes does each call as
three of its own ops (the double-quantized absmax, its offset, then the 4-bit codes), each
with host-side work of its own, and at 8B the GPU ends up waiting on that host work. Here
the same arithmetic is one pure function of tensors, which `torch.compile` turns into a
single fused kernel on CUDA. The tests check the function as written against bitsandbytes'
own dequantization on the CPU, bit for bit, in the layout bitsandbytes' `quantize_4bit` writes
and CUDA keeps (bitsandbytes may repack a CPU `Params4bit` for its CPU kernels, so the fused
functions use this only on CUDA); the GPU benchmark's `check` compares it with bitsandbytes there.

The format (bitsandbytes' `quantize_4bit`): the flattened weight is split into blocks of
`blocksize` values; each value is a 4-bit index into a 16-entry table (NF4), two per byte,
the first in the high nibble; value = table[index] * absmax[block]. With double
quantization (`nested`), absmax itself is stored as 8-bit indices into a 256-entry table,
in blocks of its own: absmax = table2[index] * absmax2[block2] + offset.
"""

from __future__ import annotations

from typing import Any

import torch

from .elementwise import kernel


def _absmax(
    absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize2: int
) -> torch.Tensor:
    n = absmax.numel()
    scale = absmax2.repeat_interleave(blocksize2)[:n]
    return code2[absmax.long()] * scale + offset


def _dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int, numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    flat = packed.reshape(-1)
    index = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1)[:numel]
    scale = absmax.repeat_interleave(blocksize)[:numel]
    return (table[index.long()] * scale).to(dtype)


def dequantize_nested(
    packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor,
    offset: torch.Tensor, table: torch.Tensor, blocksize: int, blocksize2: int, numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A double-quantized 4-bit weight, flattened, in `dtype`."""
    return _dequantize(packed, _absmax(absmax, code2, absmax2, offset, blocksize2), table, blocksize, numel, dtype)


def dequantize_plain(
    packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int, numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """A 4-bit weight with fp32 absmax, flattened, in `dtype`."""
    return _dequantize(packed, absmax, table, blocksize, numel, dtype)


def dequantize_4bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """bitsandbytes' `dequantize_4bit(packed, state)` for NF4 weights: the (out, in) weight in state.dtype."""
    if state.quant_type != "nf4":
        raise ValueError(f"dequantize_4bit handles nf4 weights, got quant_type {state.quant_type!r}")
    shape = tuple(state.shape)
    numel = 1
    for size in shape:
        numel *= size
    # one compiled copy per weight layout (a Llama layer has three or four): kernels specialised
    # to their sizes rather than one dynamic-shape kernel for all
    fn = kernel(dequantize_nested if state.nested else dequantize_plain, f"{numel}_{state.blocksize}_{state.dtype}")
    table = state.code.to(packed.device, torch.float32)
    if state.nested:
        flat = fn(packed, state.absmax, state.state2.code, state.state2.absmax, state.offset.to(packed.device),
                  table, state.blocksize, state.state2.blocksize, numel, state.dtype)
    else:
        flat = fn(packed, state.absmax.float(), table, state.blocksize, numel, state.dtype)
    return flat.view(shape)
