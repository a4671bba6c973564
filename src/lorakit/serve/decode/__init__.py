"""The fast decode path of the serving engine, for Llama-family models.

    kv.py        SlotCache: K/V preallocated per slot, slots taken and given back, no copies
    lora.py      AdapterSlots (stacked A/B per resident adapter) and `batched_lora`, the op
                 that applies a different adapter (or none) to every row
    bgmv.py      that op's Triton kernels for decoding steps on CUDA (Punica's BGMV shape)
    llama.py     the decoder's forward on those two, prefill and decode alike
    fused.py     a decoder layer as two functions compiled once for all layers
    sampling.py  greedy / temperature / top-k / top-p draws on the device, seeded per row
    runner.py    FastDecoder: what the engine calls; CUDA graphs per batch bucket
    graphs.py    capturing a step as a CUDA graph; prefill.py: padded prefills as graphs

`choose_path` decides which path an engine runs: "fast" takes it (or says why it cannot),
"generic" keeps transformers' forward with its dynamic cache, and "auto" takes the fast
path on a GPU (the GPU suite, `bench/serve.py --suite gpu`, measured it at 8x the generic
path with the same greedy tokens in fp32; bench/RESULTS.md) and the generic one on the
CPU, where the fast path is not faster.
"""

from __future__ import annotations

from torch import nn

from ...inject import get_state
from .llama import decode_reason
from .lora import PROJECTIONS
from .runner import FastDecoder, SlotBatch

PATHS = ("auto", "fast", "generic")

__all__ = ["PATHS", "FastDecoder", "SlotBatch", "adapter_reason", "choose_path", "decode_reason"]


def choose_path(
    model: nn.Module, path: str, *, max_batch: int, context_length: int, max_adapters: int
) -> tuple[FastDecoder | None, str]:
    """(the fast decoder or None, a line saying which path runs and why)."""
    if path not in PATHS:
        raise ValueError(f"decode_path must be one of {', '.join(PATHS)}; got {path!r}")
    if path == "generic":
        return None, "generic (transformers forward, dynamic KV cache; asked for)"
    reason = decode_reason(model, context_length)
    device = next(model.parameters()).device
    if reason is None and path == "auto" and device.type != "cuda":
        reason = f"the model is on {device.type}, where the fast path is not faster"
    if reason is not None:
        if path == "fast":
            raise ValueError(f"decode_path 'fast' cannot run this model: {reason}")
        return None, f"generic (transformers forward, dynamic KV cache): {reason}"
    decoder = FastDecoder(model, max_batch=max_batch, context_length=context_length, max_adapters=max_adapters)
    return decoder, decoder.describe()


def adapter_reason(model: nn.Module, name: str) -> str | None:
    """Why adapter `name`, attached to `model`, cannot run on the fast path (None when it can)."""
    for path in get_state(model).targets[name]:
        if path.rsplit(".", 1)[-1] not in PROJECTIONS:
            return f"it adapts {path}; the fast decode path runs adapters on {', '.join(PROJECTIONS)} only"
    return None
