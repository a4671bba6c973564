"""The fast decode path of the serving engine, for Llama-family models (`FastDecoder`, one of
the two implementations of `serve.decoder.Decoder`).

    runner.py    FastDecoder: what the engine calls; CUDA graphs per batch bucket
    model.py     the decoder's forward on the pieces below, prefill and decode alike
    fused.py     a decoder layer as two functions compiled once for all layers
    kv.py        SlotCache: K/V preallocated per slot, slots taken and given back, no copies
    lora.py      AdapterSlots (stacked A/B per resident adapter) and `batched_lora`, the op
                 that applies a different adapter (or none) to every row
    sampler.py   greedy / temperature / top-k / top-p draws on the device, seeded per row
    steps.py     a decoding step as launched: its device inputs, graph, tokens coming back
    graphs.py    capturing a step as a CUDA graph; prefill.py: padded prefills as graphs
    tuning.py    DecodeTuning: the step's knobs as one config object
    ops/         the Triton kernels (bgmv.py: batched LoRA, matmul.py: the folded split-K
                 matmul, attention.py) and reference.py, their PyTorch definitions

`serve.decoder.choose_decoder` decides which path an engine runs.
"""

from __future__ import annotations

from lorakit.serve.decode.model import decode_reason
from lorakit.serve.decode.runner import FastDecoder, SlotBatch

__all__ = ["FastDecoder", "SlotBatch", "decode_reason"]
