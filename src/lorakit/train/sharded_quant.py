"""A 4-bit (NF4) base loaded shard by shard under FSDP2: each process quantizes and keeps only its share.

The split. NF4 packs two 4-bit codes per byte and keeps one absmax per block of 64
consecutive values of the row-major weight; the codes and the absmax of a block depend on that
block alone. A split on block boundaries therefore quantizes each share to exactly the bytes
the whole weight would get. The split used here is by whole rows that are also whole blocks:
the packed codes of a weight (out, in) are held as a (out / k, k * in / 2) byte matrix, one row
per k = 64 / gcd(in, 64) weight rows (k = 1 whenever `in` is a multiple of 64, as in every
released model), and FSDP2 shards that matrix on dim 0 like any frozen weight. A process reads
only its own weight rows from the checkpoint, a chunk at a time, quantizes them and keeps
their codes: beside its share, a process holds one chunk of full-precision rows at a time.

Whole layers per process would not fit FSDP2: it shards every parameter of a block across
all processes and gathers it for the block's forward, so each process must own a slice of
every weight, not a set of weights. Row slices that are whole blocks are such slices.

The statistics. bitsandbytes quantizes the absmaxes again (double quantization, blocks of
256) after subtracting their mean over the whole weight, which no share knows alone. The
processes all-gather each weight's fp32 absmaxes (one float per 64 values, one weight at a
time) and each computes the statistics bitsandbytes computes for the whole weight. They stay
whole on every process (about 1/32 of the codes' bytes), on the LoRA layer
(`LoraLinear.base_quant_state`, where `release_4bit_storage` keeps them too), so the codes
FSDP2 gathers for a forward multiply exactly as one process's do: the storage is
bit-identical to a single process's `load_quantized`.

int8 is not split this way: LLM.int8() quantizes row by row, which would split, but its codes
and row scales live in bitsandbytes' layer state, which FSDP2 cannot shard; an int8 base is
loaded whole on every process.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from lorakit.adapters import qweights
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.experts import expert_parameters
from lorakit.adapters.inject import replace_module
from lorakit.adapters.layers import LoraLinear
from lorakit.adapters.targets import find_targets
from lorakit.base.quant import quantizable_linears
from lorakit.train.distributed import DistEnv

BLOCK = qweights.NF4_BLOCKSIZE
ABSMAX_BLOCK = qweights.ABSMAX_BLOCKSIZE
CHUNK_VALUES = 1 << 18
"""Weight values read and quantized at a time (whole packed rows, at least one): the quantizer's
temporaries are a few times a chunk's full-precision size, so a chunk stays small beside a share."""


def refused(quantize: str) -> str | None:
    """Why `--quantize quantize` cannot be loaded shard by shard (None: it can)."""
    if quantize == "int8":
        return ("--quantize int8 keeps its codes and row scales in bitsandbytes' layer state, which FSDP2 "
                "cannot shard; the int8 base is loaded whole (--quantize nf4 shards the base)")
    if quantize != "nf4":
        return f"--quantize {quantize} has no shard-by-shard load"
    return None


def rows_per_unit(in_features: int) -> int:
    """Weight rows per row of the packed matrix: the fewest whole rows that are whole 64-value blocks."""
    return BLOCK // math.gcd(in_features, BLOCK)


def unsupported_layers(model: nn.Module, config: LoraConfig) -> str | None:
    """Why the 4-bit layers of `model` (on meta, no adapter yet) cannot be split (None: they can).

    Each 4-bit weight is sharded through the LoRA layer that wraps it, which keeps its
    statistics; a 4-bit layer without an adapter would have nowhere to keep them.
    """
    experts = [n for n, m in model.named_modules() if expert_parameters(m)]
    if experts:
        return (f"{experts[0]} holds fused mixture-of-experts weights, which are quantized only by the whole load "
                "(each process then quantizes the whole model's experts)")
    targets = set(find_targets(model, config))
    for path, module in quantizable_linears(model):
        if path not in targets:
            return (f"{path} gets no adapter, and a 4-bit layer is sharded through its LoRA layer; "
                    "target every linear layer (--targets all-linear) to shard the 4-bit base")
        k = rows_per_unit(module.in_features)
        if module.out_features % k:
            return (f"{path} ({module.out_features}x{module.in_features}) does not split into whole rows "
                    f"of {BLOCK}-value blocks")
    return None


def pack(model: nn.Module, dtype: torch.dtype) -> int:
    """Give each 4-bit layer of `model` (on meta) a packed-bytes weight to be filled shard by shard.

    Each layer becomes bitsandbytes' Linear4bit (the layer a single process quantizes to,
    computing in `dtype`) holding a (out / k, k * in / 2) uint8 placeholder instead of its
    weight. Returns the number of layers packed.
    """
    bnb = qweights.bitsandbytes()
    layers = quantizable_linears(model)
    for path, linear in layers:
        k = rows_per_unit(linear.in_features)
        shell = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type="nf4", device="meta")
        shell.support_avx512bf16_for_cpu = False  # as qweights.quantized_linear: one format for train and eval
        units = linear.out_features // k
        shell.weight = nn.Parameter(torch.empty(units, k * linear.in_features // 2, dtype=torch.uint8,
                                                device="meta"), requires_grad=False)
        shell.bias = linear.bias
        replace_module(model, path, shell)
    return len(layers)


def packed_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Weight name -> LoRA layer, for every packed 4-bit weight still waiting for its values."""
    bnb = sys.modules.get("bitsandbytes")  # nothing is a 4-bit layer before bitsandbytes is imported
    if bnb is None:
        return {}
    found = {}
    for path, module in model.named_modules():
        if (isinstance(module, LoraLinear) and isinstance(module._base_shell[0], bnb.nn.Linear4bit)
                and module.base_quant_state is None and qweights.kind_of(module.weight) is None):
            found[f"{path}.weight"] = module
    return found


def quantize_share(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, fp32 absmax per 64-value block) of whole weight rows (a multiple of 64 values).

    The same bytes and absmaxes a whole-weight quantization gives these blocks.
    """
    bnb = qweights.bitsandbytes()
    flat = rows.contiguous().reshape(-1)
    if flat.numel() % BLOCK:
        raise ValueError(f"a share of {flat.numel()} values is not whole {BLOCK}-value blocks")
    if flat.numel() == 0:
        return (torch.empty(0, dtype=torch.uint8, device=rows.device),
                torch.empty(0, dtype=torch.float32, device=rows.device))
    codes, state = bnb.functional.quantize_4bit(flat, blocksize=BLOCK, compress_statistics=False,
                                                quant_type="nf4", quant_storage=torch.uint8)
    return codes.reshape(-1), state.absmax.float()


def whole_state(absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> object:
    """bitsandbytes' quantization state of a whole weight from the absmaxes of all its blocks, in order.

    Double quantization as `bitsandbytes.functional.quantize_4bit` does it: the mean is
    subtracted and the rest quantized in blocks of 256.
    """
    bnb = qweights.bitsandbytes()
    functional = bnb.functional
    offset = absmax.mean()
    qabsmax, state2 = functional.quantize_blockwise(absmax - offset, blocksize=ABSMAX_BLOCK)
    return functional.QuantState(absmax=qabsmax, shape=torch.Size(shape), dtype=dtype, blocksize=BLOCK,
                                 code=functional.get_4bit_type("nf4", device=absmax.device),
                                 quant_type="nf4", offset=offset, state2=state2)


def unit_ranges(units: int, world_size: int) -> list[tuple[int, int]]:
    """Each process's units [start, stop), as FSDP2 shards dim 0 (torch.chunk's split)."""
    per = math.ceil(units / world_size)
    return [(min(units, r * per), min(units, r * per + per)) for r in range(world_size)]


def _all_absmax(mine: torch.Tensor, counts: list[int], env: DistEnv) -> torch.Tensor:
    """Every process's absmaxes, concatenated in process order (all-gather, padded to one length)."""
    if not env.enabled:
        return mine
    padded = torch.zeros(max(counts), dtype=mine.dtype, device=mine.device)
    padded[: mine.numel()] = mine
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


@torch.no_grad()
def fill(layer: LoraLinear, local: torch.Tensor, read: Callable[[int, int], torch.Tensor], units: tuple[int, int],
         env: DistEnv, chunk_values: int = CHUNK_VALUES) -> int:
    """Quantize this process's weight rows into its shard `local` of `layer`'s packed codes.

    `units`: this process's rows [start, stop) of the packed matrix; `read(first, stop)`:
    weight rows [first, stop) from the checkpoint, read a chunk of at most `chunk_values`
    values (and at least one packed row) at a time. Sets the layer's whole quantization state (a collective: every process calls
    this for every layer, in the same order). Returns the bytes of codes this process keeps.
    """
    dtype = layer._base_shell[0].compute_dtype
    k = rows_per_unit(layer.in_features)
    total_units = layer.out_features // k
    ranges = unit_ranges(total_units, env.world_size)
    if units != ranges[env.rank]:
        raise ValueError(f"this process holds units {units} of {total_units}, not FSDP2's even split {ranges[env.rank]}")
    unit_values = k * layer.in_features
    step = max(1, chunk_values // unit_values)
    codes_view = local.view(-1, unit_values // 2)  # (units here, bytes per unit)
    absmax = []
    for first in range(units[0], units[1], step):
        stop = min(units[1], first + step)
        codes, chunk_absmax = quantize_share(read(first * k, stop * k).to(device=local.device, dtype=dtype))
        codes_view[first - units[0] : stop - units[0]].copy_(codes.view(stop - first, -1))
        absmax.append(chunk_absmax)
    mine = torch.cat(absmax) if absmax else torch.empty(0, dtype=torch.float32, device=local.device)
    counts = [(stop - start) * unit_values // BLOCK for start, stop in ranges]
    state = whole_state(_all_absmax(mine, counts, env), (layer.out_features, layer.in_features), dtype)
    layer.base_quant_state = state
    return local.numel()
