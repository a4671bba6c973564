"""The Llama-family forward (Llama, Mistral, Qwen2, Qwen3, SmolLM) on the slot KV cache.

One function serves prefill and decode: `forward(ids, positions, ...)` runs (rows, T)
tokens, writes their K/V into the rows' cache slots at `positions`, and lets each token
attend to its own slot's positions 0..position. It computes what the transformers model
computes (its own RMSNorm and rotary modules are called, the projections' base weights
through the LoRA layer's `base_forward`, a 4-bit base included), with:

- the adapters of all rows applied by `batched_lora` from `AdapterSlots` (Q/K/V and
  gate/up sharing one shrink matmul), no per-layer Python dispatch on adapter names; a
  decoding step may run the shrink inside the base matmul (`fold_slots`, `folded_lora`);
- attention over a view of the cache, `key position <= query position`: when decoding,
  `attention.py`'s Triton kernel on CUDA (each row reads its keys only up to its position;
  for the fused layers it also applies RoPE and writes the step's K/V) or batched matmuls
  under a boolean mask; a prefill's first chunk as a causal SDPA, later
  chunks as SDPA under the mask; grouped-query heads are never repeated;
- fixed shapes for a given (rows, T, key length): with rows = slots 0..n-1 nothing in
  it syncs with the host, so a CUDA graph can capture a decoding step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.layers import LoraLinear
from lorakit.base.models import ARCHITECTURES
from lorakit.serve.decode.fused import FusedLayers, attend, layer_weights, rotate
from lorakit.serve.decode.kv import SlotCache
from lorakit.serve.decode.lora import GROUPS, AdapterSlots, batched_lora, split
from lorakit.serve.decode.ops import attention, bgmv
from lorakit.serve.decode.tuning import DecodeTuning

FOLD_SLOTS_PER_ROW = 2
"""A decoding step folds the LoRA shrink into the base matmul while the adapter slots are at
most this many per row: the matmul then reads every slot's A, up to twice the A that the
rows' own adapters hold, and saves a kernel per projection group."""


def decode_reason(model: nn.Module, context_length: int) -> str | None:
    """Why `model` cannot take the fast decode path (None when it can)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        return f"{name} is not a Llama-family model (the fast path runs {', '.join(ARCHITECTURES)})"
    config = model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (the fast path runs silu)"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and context_length > window:
        return f"the context ({context_length} tokens) exceeds the sliding window ({window})"
    inner = model.model
    if isinstance(inner.embed_tokens, LoraEmbedding) or isinstance(model.lm_head, LoraLinear):
        return "an adapter targets the embeddings or the output head"
    for i, layer in enumerate(inner.layers):
        for parent, projs in GROUPS:
            for proj in projs:
                module = getattr(getattr(layer, parent), proj)
                if isinstance(module, LoraLinear):
                    if module.fan_in_fan_out:
                        return f"layers.{i}.{parent}.{proj} stores its weight transposed"
                    if module.quantized == "int8":
                        return "an 8-bit base (the fast path runs dense and 4-bit bases)"
                elif type(module).__name__ == "Linear8bitLt":
                    return "an 8-bit base (the fast path runs dense and 4-bit bases)"
    return None


def _base(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module.base_forward(x) if isinstance(module, LoraLinear) else module(x)


class DecoderModel:
    """The forward pass of one transformers Llama-family model over a `SlotCache`.

    fused: run each layer through `fused.py`'s two functions (a dense base only; None: when
    the base is dense); compile: the `torch.compile` backend for them (None: eager; worth
    "inductor" on a GPU, where a step is otherwise launch-bound); lora_kernel: decoding steps
    apply the rows' adapters with `bgmv`'s Triton kernels, and attention_kernel: they attend
    with `attention`'s Triton kernel (None: where it can run); fold: the fused groups store
    every adapter slot's A under their base weight (`fold_slots`) so that decoding steps fold
    the LoRA shrink into the base matmul (`tuning.fold`; None: where the LoRA kernels run);
    tuning: the step's knobs (`tuning.py`; None: the defaults).
    """

    def __init__(self, model: nn.Module, *, fused: bool | None = None, compile: str | Callable | None = None,
                 lora_kernel: bool | None = None, attention_kernel: bool | None = None,
                 tuning: DecodeTuning | None = None) -> None:
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)[: model.config.num_hidden_layers]
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.head = model.lm_head
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.scaling = attn.scaling
        device = self.embed.weight.device
        self.lora_kernel = bgmv.available(device) if lora_kernel is None else lora_kernel
        self.attention_kernel = attention.available(device) if attention_kernel is None else attention_kernel
        tuning = tuning or DecodeTuning()
        self.tuning = tuning
        self.fold = self.lora_kernel if tuning.fold is None else tuning.fold
        self.split_k = tuning.split_k
        """Folded decoding steps run their matmul as `matmul.py`'s split-K kernel (False: cuBLAS)."""
        self.attention_writes = tuning.attention_writes
        """Decoding steps of the fused layers let the attention kernel apply RoPE and write the
        step's K/V (False: the compiled layers do RoPE and the cache write is its own op)."""
        self._folded: tuple[AdapterSlots, int] | None = None  # the slots (and their layout) the weights hold
        self.fused: FusedLayers | None = None
        if fused is not False:
            weights = [layer_weights(layer) for layer in self.layers]
            if all(w is not None for w in weights):
                self.fused = FusedLayers(weights, self.layers[0].input_layernorm.variance_epsilon, compile,
                                         tuning.dynamic)  # type: ignore[arg-type]
            elif fused:
                raise ValueError("the fused decoder layers need a dense base (this one is quantized)")

    def _group(
        self, i: int, g: int, x: torch.Tensor, lora: AdapterSlots | None, index: torch.Tensor | None, mode: str
    ) -> list[torch.Tensor]:
        parent, projs = GROUPS[g]
        owner = getattr(self.layers[i], parent)
        outs = [_base(getattr(owner, p), x) for p in projs]
        if lora is None or index is None or not lora.active or lora.a[i][g] is None:
            return outs
        a, b = lora.a[i][g], lora.b[i][g]
        deltas = split(batched_lora(x, a, b, lora.sizes[i][g], index, mode), lora.sizes[i][g])  # type: ignore[arg-type]
        return [y + d.to(y.dtype) for y, d in zip(outs, deltas, strict=True)]

    def lora_mode(self, rows: int, steps: int, gathered: bool, lora: AdapterSlots | None) -> str:
        """How `batched_lora` runs for this call. Decoding (one token a row) takes the Triton
        kernels where they run; otherwise it reads every adapter slot once (dense) unless the
        rows are few against the slots: gathering moves each row's adapter three times (read,
        write, read again), so dense wins from a third as many rows as slots. Prefill gathers.
        Once `fold_slots` has run, a decoding step with at most FOLD_SLOTS_PER_ROW slots per
        row takes a folded mode (`lora.folded_lora`): split-K or cuBLAS with the kernels,
        PyTorch's ops without them."""
        if steps != 1 or lora is None:
            return "gather"
        folded = self._folded is not None and lora.capacity + 1 <= FOLD_SLOTS_PER_ROW * rows
        if self.lora_kernel:
            return ("folded-split-k" if self.split_k else "folded-kernel") if folded else "kernel"
        if folded:
            return "folded"
        return "dense" if not gathered and 3 * rows >= lora.capacity + 1 else "gather"

    @torch.no_grad()
    def fold_slots(self, lora: AdapterSlots) -> None:
        """Give each fused group one weight tensor [W; A of slot 0; A of slot 1; ...]: a decoding
        step's base matmul then also computes every slot's LoRA shrink, and only the expand runs
        as its own kernel (`folded_lora`). The modules' weights and the slots' A become views of
        it, so nothing is stored twice and loading an adapter still writes its slot in place.
        Redone whenever the slots are reallocated (`lora.layout`)."""
        fused = self.fused
        if fused is None or not self.fold or (self._folded is not None and self._folded[0] is lora
                                              and self._folded[1] == lora.layout):
            return
        for i, weights in enumerate(fused.layers):
            groups = list(weights.groups)
            for g, (parent, projs) in enumerate(GROUPS):
                weight, bias, sizes = groups[g]
                total = sum(sizes)
                a = lora.a[i][g] if lora.active else None
                if a is None or a.dtype != weight.dtype or a.shape[-1] != weight.shape[1]:
                    groups[g] = (weight[:total], bias, sizes)
                    continue
                joined = torch.cat([weight[:total], a.reshape(-1, a.shape[-1])])
                start = 0
                for proj, size in zip(projs, sizes, strict=True):
                    getattr(getattr(self.layers[i], parent), proj).weight.data = joined[start : start + size]
                    start += size
                lora.a[i][g] = joined[total:].view(a.shape)
                groups[g] = (joined, bias, sizes)
            weights.groups = tuple(groups)
        self._folded = (lora, lora.layout)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: SlotCache,
        slots: torch.Tensor,
        key_length: int,
        lora: AdapterSlots | None = None,
        index: torch.Tensor | None = None,
        gathered: bool = True,
        causal: bool = False,
    ) -> torch.Tensor:
        """Hidden states after the final norm, (rows, T, hidden).

        ids, positions: (rows, T) int64; slots: (rows,) each row's cache slot; key_length:
        how many cache positions attention reads (> every position); index: (rows,) each
        row's adapter slot. gathered=False promises slots == 0..rows-1 (decoding), so the
        cache is read through a view instead of a gather. causal=True promises positions ==
        0..T-1 in every row and key_length == T (a prefill's first chunk): attention runs
        as a causal SDPA, no mask built.
        """
        rows, steps = ids.shape
        causal = causal and steps > 1
        if causal and key_length != steps:
            raise ValueError(f"a causal forward reads as many keys as it has tokens ({steps}), not {key_length}")
        h = self.embed(ids)
        cos, sin = self.rotary(h, position_ids=positions)  # (rows, T, head dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
        mask = None
        decoding = positions[:, 0] if steps == 1 and self.attention_kernel else None  # (rows,) for the kernel
        if not causal and decoding is None:
            allowed = torch.arange(key_length, device=ids.device) <= positions.unsqueeze(-1)  # (rows, T, L)
            group = self.heads // self.kv_heads
            mask = allowed.unsqueeze(1).unsqueeze(1).expand(rows, 1, group, steps, key_length)
            mask = mask.reshape(rows, 1, group * steps, key_length)
        # the fused layers' decoding steps let the attention kernel write K/V (and apply RoPE);
        # otherwise the tokens' K/V go to these places of the flat cache
        writes = self.fused is not None and decoding is not None and not gathered and self.attention_writes
        flat = None if writes else cache.flat_index(slots, positions)
        if lora is not None:
            self.fold_slots(lora)
        mode = self.lora_mode(rows, steps, gathered, lora)
        for i, layer in enumerate(self.layers):
            if self.fused is not None:
                h = self._fused_layer(i, h, cos, sin, mask, cache, slots, flat, key_length, gathered, lora, index, mode,
                                      causal, decoding)
                continue
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = self._group(i, 0, x, lora, index, mode)
            q = q.view(rows, steps, self.heads, self.head_dim)
            k = k.view(rows, steps, self.kv_heads, self.head_dim)
            v = v.view(rows, steps, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            keys, values = self._kv(i, k, v, cache, slots, flat, key_length, gathered, causal)
            o = attend(q, keys, values, mask, self.scaling, causal, decoding)
            (o,) = self._group(i, 1, o, lora, index, mode)
            h = h + o
            x = layer.post_attention_layernorm(h)
            gate, up = self._group(i, 2, x, lora, index, mode)
            (down,) = self._group(i, 3, F.silu(gate) * up, lora, index, mode)
            h = h + down
        return self.norm(h)

    def _kv(self, i: int, k: torch.Tensor, v: torch.Tensor, cache: SlotCache, slots: torch.Tensor, flat: torch.Tensor,
            key_length: int, gathered: bool, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's K/V into the rows' slots; the (rows, kv heads, key_length, D) K/V to read.
        causal (a prefill's first chunk: the keys are exactly this call's tokens): the K/V just
        written, as the cache holds them, without reading the slots back."""
        rows = slots.shape[0]
        keys, values = cache.keys[i], cache.values[i]
        flat_shape = (-1, self.head_dim)
        k_cached, v_cached = k.to(keys.dtype), v.to(values.dtype)
        keys.view(flat_shape).index_copy_(0, flat, k_cached.reshape(flat_shape))
        values.view(flat_shape).index_copy_(0, flat, v_cached.reshape(flat_shape))
        if causal:
            return k_cached.transpose(1, 2), v_cached.transpose(1, 2)
        if gathered:
            return keys[:, :, :key_length].index_select(0, slots), values[:, :, :key_length].index_select(0, slots)
        return keys[:rows, :, :key_length], values[:rows, :, :key_length]

    def _fused_layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                     cache: SlotCache, slots: torch.Tensor, flat: torch.Tensor | None, key_length: int,
                     gathered: bool, lora: AdapterSlots | None, index: torch.Tensor | None, mode: str, causal: bool,
                     decoding: torch.Tensor | None) -> torch.Tensor:
        """Layer i through the fused functions; flat None: the attention kernel writes K/V."""
        fused = self.fused
        assert fused is not None
        w = fused.layers[i]
        on = lora is not None and index is not None and lora.active
        loras = [(lora.a[i][g], lora.b[i][g]) if on and lora.a[i][g] is not None else (None, None)  # type: ignore[union-attr]
                 for g in range(len(GROUPS))]
        writes = flat is None
        q, k, v = fused.attention_inputs(
            h, w.input_norm, w.q_norm, w.k_norm, fused.eps, w.groups[0], *loras[0], index, mode,
            cos, sin, self.heads, self.kv_heads, self.head_dim, not writes,
        )
        rows = h.shape[0]
        if writes:
            group = self.heads // self.kv_heads
            out = attention.launch(
                q.reshape(rows, self.kv_heads, group, self.head_dim), cache.keys[i][:rows, :, :key_length],
                cache.values[i][:rows, :, :key_length], decoding, self.scaling, k_new=k.reshape(rows, self.kv_heads, -1),
                v_new=v.reshape(rows, self.kv_heads, -1), cos=cos.reshape(rows, -1), sin=sin.reshape(rows, -1),
            ).view(rows, 1, self.heads * self.head_dim)
        else:
            assert flat is not None
            keys, values = self._kv(i, k, v, cache, slots, flat, key_length, gathered, causal)
            out = attend(q, keys, values, mask, self.scaling, causal, decoding)
        return fused.layer_rest(h, out, w.post_norm, fused.eps, w.groups[1], w.groups[2], w.groups[3], loras[1:],
                                index, mode)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

