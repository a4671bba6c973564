"""The experts of a mixture-of-experts layer with their LoRA terms, as grouped matmuls.

Tokens are sorted by the expert they are routed to, and each projection runs as one grouped
matmul over all experts (`torch.nn.functional.grouped_mm`: one kernel on a GPU, no loop over
experts in Python). The LoRA update is never formed as a weight: for expert e of a parameter
W with factors A[e] (r, in) and B[e] (out, r),

    y[t] = x[t] @ W[e].T + scaling * (x[t] @ A[e].T) @ B[e].T      for each token t routed to e

which is two more grouped matmuls of rank r. Forming W[e] + scaling * B[e] @ A[e] instead (what
`LoraExperts`' weight path and PEFT's `target_parameters` do) writes a tensor as large as
the experts at every forward, and its backward computes a gradient for that whole tensor; here
the frozen base weight gets none, and A and B get theirs from rank-r products.

Each batch row may use its own adapter (`adapter_of_token`: the adapter index of every token,
-1 for the base): the base projection runs once over all tokens, and the LoRA terms once per
adapter present, over that adapter's tokens.

It runs the experts modules that transformers builds through its common experts interface
(the attributes `has_gate`, `has_bias`, `is_transposed` and the gate function), which cover the
fused-experts families; `supports` says whether a module is one. The arithmetic follows that
interface's grouped implementation: gate and up projection, the module's own gate function,
down projection, routing weights, then the sum over each token's experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

INTERFACE = ("has_gate", "has_bias", "is_transposed", "num_experts")
"""What an experts module of transformers' common experts interface carries."""

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""What the grouped kernel takes; other dtypes (float64 in tests) run the loop."""

Factors = Callable[[str, torch.dtype], "tuple[torch.Tensor, torch.Tensor, float] | None"]
"""(adapter, dtype) -> (A as (experts, in, r), B as (experts, r, out), scaling) for one
parameter, or None where that adapter does not adapt it."""


def supports(module: nn.Module) -> bool:
    """Whether the grouped path computes exactly what `module`'s own forward does."""
    if not all(hasattr(module, name) for name in INTERFACE):
        return False
    # The interface's dispatching forward wraps the class's own (functools.wraps); a subclass
    # that overrides it again computes something else around it.
    if getattr(type(module).forward, "__wrapped__", None) is None:
        return False
    if getattr(module, "_is_expert_parallel", False) or getattr(module, "has_post_expert_norm", False):
        return False
    return hasattr(module, "_apply_gate") if module.has_gate else hasattr(module, "act_fn")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[offsets[e-1]:offsets[e]] = x[offsets[e-1]:offsets[e]] @ w[e]; x: (S, in), w: (E, in, out).

    One grouped kernel where the shapes allow it (dtypes equal, every stride a multiple of 16
    bytes); otherwise a loop over the groups, with the same result."""
    if x.dtype == w.dtype and x.dtype in KERNEL_DTYPES and _aligned(x) and _aligned(w) and w.shape[-1] * w.element_size() % 16 == 0:
        return _ContiguousGrad.apply(F.grouped_mm(x, w, offs=offsets))
    bounds = [0, *offsets.tolist()]
    parts = [x[bounds[e]:bounds[e + 1]] @ w[e].to(x.dtype) for e in range(w.shape[0])]
    parts.append(x.new_zeros((x.shape[0] - bounds[-1], w.shape[-1])))  # rows past the last group
    return torch.cat(parts)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: the grouped kernel's
    backward takes only aligned row- or column-major gradients, and the ops after it (a strided
    gate, a sum) may give others."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _aligned(t: torch.Tensor) -> bool:
    """Row- or column-major matrices, every other stride and the start on 16 bytes."""
    size = t.element_size()
    major = t.stride(-1) == 1 or t.stride(-2) == 1
    return major and all(s * size % 16 == 0 for s in t.stride() if s != 1) and t.data_ptr() % 16 == 0


def _offsets(keys: torch.Tensor, groups: int) -> torch.Tensor:
    """Cumulative counts per group of sorted integer `keys` (int32, as grouped_mm takes), counted
    with a histogram: its output size is fixed, so the host never waits for the device here."""
    counts = torch.histc(keys.float(), bins=groups, min=0, max=groups - 1)
    return torch.cumsum(counts, 0).to(torch.int32)


def stack_factors(factors: Factors, names: Sequence[str], experts: int, dtype: torch.dtype,
                  in_out: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every adapter's factors of one parameter in one pair of tensors, for a mixed batch:

        A: (E * (n + 1), in, r_max)    B: (E * (n + 1), r_max, out)

    group e * (n + 1) + k holds adapter k's factors for expert e (B scaled, rank padded with
    zeros), and group e * (n + 1) + n is zero: the rows of that expert that use no adapter.
    None where no adapter of `names` adapts the parameter."""
    got = [factors(name, dtype) for name in names]
    present = [g for g in got if g is not None]
    if not present:
        return None
    in_f, out_f = in_out
    r_max = max(a.shape[-1] for a, _, _ in present)
    first = present[0][0]
    a_stack = first.new_zeros((experts, len(names) + 1, in_f, r_max))
    b_stack = first.new_zeros((experts, len(names) + 1, r_max, out_f))
    for k, item in enumerate(got):
        if item is not None:
            a, b, scaling = item
            a_stack[:, k, :, : a.shape[-1]] = a
            b_stack[:, k, : b.shape[1], :] = b * scaling
    return a_stack.view(-1, in_f, r_max), b_stack.view(-1, r_max, out_f)


def _project(x: torch.Tensor, weight: torch.Tensor, transposed: bool, offsets: torch.Tensor,
             lora: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """The grouped projection of expert-sorted tokens x (S, in), plus, for each (offsets, A
    (G, in, r), B (G, r, out), scaling) of `lora`, scaling * (x @ A[g]) @ B[g] over its groups."""
    w = weight if transposed else weight.transpose(-2, -1)  # (E, in, out)
    out = grouped_mm(x.to(w.dtype), w, offsets)
    for lora_offsets, a, b, scaling in lora:
        low = grouped_mm(x.to(a.dtype), a, lora_offsets)  # (S, r)
        if scaling != 1.0:
            low = low * scaling
        out = out + grouped_mm(low, b, lora_offsets).to(out.dtype)
    return out


def experts_forward(
    module: nn.Module,
    weights: dict[str, torch.Tensor],
    factors: dict[str, Factors],
    adapters: Sequence[str],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    adapter_of_token: torch.Tensor | None = None,
    stacks: dict[str, tuple[torch.Tensor, torch.Tensor] | None] | None = None,
) -> torch.Tensor:
    """`module`'s forward with LoRA terms; hidden_states (T, d), top_k_index/weights (T, k).

    `weights`: the module's parameters by name (decoded where stored quantized);
    `factors[param]`: that parameter's LoRA factors per adapter; `adapters`: the adapters that
    run, every token through all of them when `adapter_of_token` is None, else token t through
    `adapters[adapter_of_token[t]]` alone (-1: none). A mixed batch sorts the routed tokens by
    (expert, adapter), so one grouped matmul over `stack_factors`' groups serves every adapter;
    `stacks` may hold those stacks ready (a server keeps them from step to step)."""
    tokens, top_k = top_k_index.shape
    experts = module.num_experts
    flat_experts = top_k_index.reshape(-1)  # (S,), S = T * k
    groups = 1
    if adapter_of_token is not None:
        groups = len(adapters) + 1
        slot = torch.where(adapter_of_token < 0, len(adapters), adapter_of_token)
        keys = flat_experts * groups + slot.repeat_interleave(top_k)
    else:
        keys = flat_experts
    sorted_keys, order = torch.sort(keys, stable=True)
    sorted_experts = sorted_keys // groups
    x = hidden_states[order // top_k]  # (S, d)
    offsets = _offsets(sorted_experts, experts)
    lora_offsets = offsets if adapter_of_token is None else _offsets(sorted_keys, experts * groups)
    dtype = weights["gate_up_proj" if module.has_gate else "up_proj"].dtype

    def lora_terms(param: str) -> list:
        if param not in factors:
            return []
        if adapter_of_token is None:
            found = (factors[param](name, dtype) for name in adapters)
            return [(offsets, a, b, scaling) for a, b, scaling in (f for f in found if f is not None)]
        stacked = stacks[param] if stacks is not None and param in stacks else None
        if stacked is None:
            w = weights[param]
            in_out = (w.shape[1], w.shape[2]) if module.is_transposed else (w.shape[2], w.shape[1])
            stacked = stack_factors(factors[param], adapters, experts, dtype, in_out)
        return [] if stacked is None else [(lora_offsets, *stacked, 1.0)]

    first = "gate_up_proj" if module.has_gate else "up_proj"
    h = _project(x, weights[first], module.is_transposed, offsets, lora_terms(first))
    if module.has_bias:
        h = h + weights[first + "_bias"][sorted_experts]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    out = _project(h, weights["down_proj"], module.is_transposed, offsets, lora_terms("down_proj"))
    if module.has_bias:
        out = out + weights["down_proj_bias"][sorted_experts]
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)  # promoted as the module's own forward does
    restored = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, k) order
    return restored.view(tokens, top_k, -1).sum(1).to(hidden_states.dtype)
