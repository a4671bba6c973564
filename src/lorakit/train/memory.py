"""How much device memory a fast-path training step needs, and the settings that fit a budget.

The peak of a step on the GPU fast path (`lorakit.train.fastpath`) is

    fixed        base weights + adapter (what is allocated before the first step)
                 + the adapter's fp32 gradients and AdamW moments (12 bytes per trainable parameter)
    activations  per token: a recomputed decoder layer keeps its input (d values), a kept layer
                 its projections' inputs and outputs (d + q + 2 kv + 2 intermediate values)
    transient    the layer being recomputed and differentiated (about two kept layers' worth),
                 the final hidden states and their gradient, and the loss's fp32 logit chunks

`choose` picks the most kept layers (`FastPathConfig.keep_layers`: fewer recomputed layers,
faster) whose predicted peak fits the budget, and when even recomputing every layer does not
fit, fewer tokens per micro-batch. `MemoryFit.adjust` corrects the activation estimate by the
peak measured on the first step and picks again. `lorakit.train.plan` uses the same arithmetic
without loading any weights.

The per-token coefficients were checked against the peaks measured on an H200 (8B shape,
4 x 2048 tokens: keep_layers 0 -> 19.2 GiB, 14 -> 27.6 GiB; bench/RESULTS.md).

`generic_activation_bytes` and `generic_logit_bytes` are the same arithmetic for the generic
path (transformers' own layers, as `lorakit train` runs on a CPU), which `lorakit plan
--device cpu` adds up to a peak RSS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from lorakit.train.fastpath import FastPathConfig

GiB = 2**30
ADAM_BYTES = 12
"""fp32 gradient + two fp32 AdamW moments per trainable parameter (the parameter itself is in `fixed`)."""
HEADROOM = 0.98
"""Plan for this share of the budget: the estimate is within a few percent (the first step corrects it)."""
LOSS_CHUNK_BYTES = 3 * 2**28
"""The fused loss's fp32 logit chunk (256 MiB), its gradient and the softmax's temporary."""
MODES = ("auto", "off")


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-family decoder that its activations scale with."""

    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    heads: int = 1

    @classmethod
    def of(cls, config) -> Shape:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, config.hidden_size, intermediate_of(config),
                   heads * head_dim, kv_heads * head_dim, config.vocab_size, heads)

    def kept_layer(self) -> int:
        """Values per token a decoder layer keeps for its backward when it is not recomputed."""
        return self.hidden + self.q_dim + 2 * self.kv_dim + 2 * self.intermediate


def intermediate_of(config) -> int:
    """The width of a layer's MLP activations per token (half of what a layer keeps for them).

    A mixture of experts keeps, for each of a token's k experts, its input and output rows (2 d)
    and its gate/up product and gated values (3 m): k * (2 d + 3 m) values, counted here as an
    intermediate of half that (a dense layer keeps 2 x intermediate)."""
    top_k = getattr(config, "num_experts_per_tok", None)
    if not top_k or not (getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)):
        return config.intermediate_size
    expert = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return top_k * (2 * config.hidden_size + 3 * expert) // 2


def activation_bytes(shape: Shape, tokens: int, keep_layers: int, element: int = 2) -> int:
    """What the decoder layers keep for the backward: recomputed layers their input, the last
    `keep_layers` everything their backward reads."""
    recomputed = shape.layers - keep_layers
    return tokens * element * (recomputed * shape.hidden + keep_layers * shape.kept_layer())


def transient_bytes(shape: Shape, tokens: int, element: int = 2) -> int:
    """The largest short-lived tensors of a step (see the module docstring)."""
    logits = min(LOSS_CHUNK_BYTES, 3 * 4 * tokens * shape.vocab)
    return tokens * element * (2 * shape.kept_layer() + 2 * shape.hidden) + logits


@dataclass
class Choice:
    keep_layers: int
    tokens: int
    """Tokens per micro-batch (the budget asked for, or fewer when that cannot fit)."""
    peak: int
    """Predicted peak bytes."""
    reason: str


def choose(shape: Shape, tokens: int, fixed: int, budget: int, *, min_tokens: int = 1,
           scale: float = 1.0, element: int = 2) -> Choice:
    """The most kept layers that fit `budget` bytes at `tokens` per micro-batch; if none fits,
    the largest number of tokens (halving, not below `min_tokens`) at which recomputing every
    layer fits. `scale` multiplies the activation estimate (a measured correction)."""

    def peak(keep: int, n: int) -> int:
        dynamic = activation_bytes(shape, n, keep, element) + transient_bytes(shape, n, element)
        return fixed + int(scale * dynamic)

    budget_in = budget
    budget = int(HEADROOM * budget)
    n = tokens
    while peak(0, n) > budget:
        if n // 2 < min_tokens:
            raise ValueError(
                f"the memory budget {budget_in / GiB:.1f} GiB is too small: the weights, adapter and optimizer "
                f"take {fixed / GiB:.1f} GiB and {n} tokens per micro-batch need {peak(0, n) / GiB:.1f} GiB "
                f"with every layer recomputed; raise --memory-limit, quantize the base (--quantize nf4) "
                f"or lower --seq-len"
            )
        n //= 2
    keep = max(k for k in range(shape.layers + 1) if peak(k, n) <= budget)
    if keep == shape.layers:
        why = f"no layer recomputed: all {shape.layers} keep their activations"
    else:
        more = f"; keeping {keep + 1} would need {peak(keep + 1, n) / GiB:.1f} GiB"
        why = f"recompute all but the last {keep} of {shape.layers} layers{more}"
    if n < tokens:
        why += f"; {tokens} tokens per micro-batch do not fit, {n} do"
    return Choice(keep, n, peak(keep, n), f"{why} (predicted peak {peak(keep, n) / GiB:.1f} GiB)")


def generic_activation_bytes(shape: Shape, tokens: int, adapter_width: int, bf16: bool) -> int:
    """What transformers' Llama decoder layers, with lorakit's adapters, keep for the backward
    on the generic path for `tokens` tokens (counted from autograd's saved tensors:
    tests/test_plan.py). Per token and layer, with f, d, q, kv the MLP, hidden, query and
    key/value widths and `adapter_width` the sum of the layer's adapter ranks:

        fp32            4 (4 f + 4 d + 2 q + 2 kv + adapter_width + 2 + heads) bytes
        bf16 autocast   2 (4 f + 5 d + q + adapter_width) + 4 (2 q + 2 kv + 2 d + 2 + heads)

    4 f: the MLP's gate, up, activation and product; d and q: the inputs of the projections and
    norms; 2 + heads: the norms' scale factors and the attention's log-sum-exp. Under bf16
    autocast with attention in fp32 (`lorakit.train.precision`) the attention keeps fp32 copies of
    q, k, v and its output, and the norms their fp32 inputs.
    """
    f, d, q, kv = shape.intermediate, shape.hidden, shape.q_dim, shape.kv_dim
    small = 2 + shape.heads
    if bf16:
        per = 2 * (4 * f + 5 * d + q + adapter_width) + 4 * (2 * q + 2 * kv + 2 * d + small)
    else:
        per = 4 * (4 * f + 4 * d + 2 * q + 2 * kv + adapter_width + small)
    return tokens * shape.layers * per


def generic_logit_bytes(shape: Shape, supervised: int, chunk: int, bf16: bool) -> int:
    """The loss's peak on the generic path (`lorakit.train.objectives.sft.compute_loss`: the head runs on at
    most `chunk` supervised positions at a time): in the backward, the saved fp32
    log-softmax, its gradient and the logits' gradient, 12 bytes a logit, and under bf16
    autocast the gradient's bf16 copy, 2 more."""
    return min(supervised, chunk) * shape.vocab * (14 if bf16 else 12)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class MemoryFit:
    """The settings `choose` picked for a model on a device, and the numbers they came from."""

    shape: Shape
    budget: int
    weights: int
    """Bytes allocated on the device before the first step (base and adapter)."""
    trainable: int
    choice: Choice
    source: str
    """Where the budget comes from, for the log."""
    scale: float = 1.0
    requested_tokens: int = 0
    """The tokens per micro-batch asked for (choice.tokens is lower when those do not fit)."""
    config: FastPathConfig | None = None
    """The fast path's settings this fit drives (keep_layers follows `choice`)."""

    @property
    def fixed(self) -> int:
        return self.weights + ADAM_BYTES * self.trainable

    def summary(self) -> str:
        return (f"memory auto: budget {self.budget / GiB:.1f} GiB ({self.source}); base and adapter "
                f"{self.weights / GiB:.1f} GiB, adapter gradients and AdamW {ADAM_BYTES * self.trainable / GiB:.2f} GiB; "
                f"{self.choice.tokens} tokens per micro-batch: {self.choice.reason}")

    def adjust(self, measured_peak: int, tokens: int) -> str | None:
        """Correct the activation estimate by the first step's measured peak (taken over a
        micro-batch of `tokens` tokens, before AdamW had allocated its moments) and choose again.
        Returns what changed, for the log, or None."""
        dynamic = activation_bytes(self.shape, tokens, self.choice.keep_layers) + transient_bytes(self.shape, tokens)
        measured = measured_peak - self.weights - 4 * self.trainable  # the gradients were there, the moments not yet
        if dynamic <= 0 or measured <= 0:
            return None
        self.scale = max(1.0, measured / dynamic)  # never trust a step that used less than predicted
        before = self.choice
        seen = f"the first step peaked at {measured_peak / GiB:.1f} GiB ({self.scale:.2f}x the activation estimate)"
        try:
            self.choice = choose(self.shape, before.tokens, self.fixed, self.budget, min_tokens=before.tokens,
                                 scale=self.scale)
        except ValueError:
            self.choice = Choice(0, before.tokens, measured_peak, "every layer recomputed")
            return f"memory auto: {seen}, over the budget of {self.budget / GiB:.1f} GiB even with every layer recomputed"
        if self.choice.keep_layers == before.keep_layers:
            return None
        return f"memory auto: {seen}: keep_layers {before.keep_layers} -> {self.choice.keep_layers}"


def device_budget(device: torch.device, limit_gib: float | None) -> tuple[int, str]:
    """Bytes a run on `device` may allocate: --memory-limit, or what is free now plus what this
    process already holds, less a margin for the allocator's fragmentation and CUDA's workspace."""
    if limit_gib is not None:
        return int(limit_gib * GiB), f"--memory-limit {limit_gib:g}"
    free, _total = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    usable = int(0.92 * (free + held))
    return usable, f"92% of the {(free + held) / GiB:.1f} GiB free on {device}"


def fit(model: nn.Module, device: torch.device, tokens: int, limit_gib: float | None,
        min_tokens: int = 1) -> MemoryFit:
    """The settings for `model` (already on `device`, adapters injected) at `tokens` per micro-batch."""
    shape = Shape.of(model.config)
    budget, source = device_budget(device, limit_gib)
    weights = torch.cuda.memory_allocated(device)
    trainable = trainable_count(model)
    fixed = weights + ADAM_BYTES * trainable
    choice = choose(shape, tokens, fixed, budget, min_tokens=min_tokens)
    torch.cuda.reset_peak_memory_stats(device)  # the first step's peak, not the loading's
    return MemoryFit(shape, budget, weights, trainable, choice, source, requested_tokens=tokens)


def check_memory_args(mode: str, limit_gib: float | None) -> None:
    """Validate --memory and --memory-limit."""
    if mode not in MODES:
        raise ValueError(f"--memory must be one of {', '.join(MODES)}, got {mode!r}")
    if limit_gib is not None and (isinstance(limit_gib, bool) or not limit_gib > 0):
        raise ValueError(f"--memory-limit must be a positive number of GiB, got {limit_gib!r}")


def fit_for_training(model: nn.Module, device: torch.device, mode: str, limit_gib: float | None,
                     tokens: int, min_tokens: int) -> MemoryFit | None:
    """--memory auto on the CUDA fast path: the fit, logged, with the fast-path settings it
    picked in `config` (None where the fast path cannot run this model, or with --memory off)."""
    from lorakit.train.fastpath import FastPathConfig, supported
    from lorakit.train.runlog import log

    if mode != "auto" or supported(model) is not None:
        return None
    fitted = fit(model, device, tokens, limit_gib, min_tokens)
    fitted.config = FastPathConfig(recompute="all", keep_layers=fitted.choice.keep_layers)
    log(fitted.summary())
    return fitted


def piece_tokens(fitted: MemoryFit | None, max_tokens: int | None) -> int | None:
    """The most (padded) tokens per piece of a micro-batch: --max-tokens, lowered to what the
    fit found to fit where it had to lower the token budget."""
    if fitted is None or fitted.choice.tokens >= fitted.requested_tokens:
        return max_tokens
    return min(max_tokens or fitted.choice.tokens, fitted.choice.tokens)


def after_first_step(fitted: MemoryFit, device: torch.device, tokens: int) -> None:
    """Correct the fit by the first step's measured peak (`tokens`: its largest micro-batch) and
    apply what it chooses then to the fast path's settings."""
    from lorakit.train.runlog import log

    note = fitted.adjust(torch.cuda.max_memory_allocated(device), tokens)
    if fitted.config is not None:
        fitted.config.keep_layers = fitted.choice.keep_layers
    if note:
        log(note)
