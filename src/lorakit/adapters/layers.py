"""LoRA layers: a frozen base weight with named low-rank adapters beside it.

The base weight stays where the wrapped module kept it (`weight`, `bias`), so the
wrapped model's state-dict keys do not change and base checkpoints load as they are.
Adapters live beside it, keyed by adapter name:

    y = base(x) + sum over active adapters of  scaling * B(A(dropout(x)))

A: (r, in_features), Kaiming-uniform; B: (out_features, r), zero; scaling = alpha / r
(alpha / sqrt(r) with rsLoRA). Adapter weights are kept in fp32 when the base is fp16 or
bf16 (the update is computed in fp32 and cast back), the same precision rule PEFT uses.

Merging is explicit (`merge` / `unmerge`), never a side effect of `.train()` / `.eval()`.

A quantized base is a property of the same layer: when the wrapped module is one of
bitsandbytes' Linear4bit / Linear8bitLt (quantized by `lorakit.base.quant` or loaded by
transformers with a `BitsAndBytesConfig`), `weight` is its quantized parameter, the base
forward is bitsandbytes' matmul, and everything that needs base values (merge, DoRA,
PiSSA) reads them dequantized to fp32. Merging into such a base requantizes it and warns
with the error; `lorakit.base.quant.merge_and_dequantize` writes an exact bf16/fp16/fp32 merge.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import qweights

_HALF = (torch.float16, torch.bfloat16)


class RequantizationWarning(UserWarning):
    """A merge or unmerge rounded a quantized base weight to its format again."""


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if base_dtype in _HALF or not base_dtype.is_floating_point else base_dtype


class MixedBatch:
    """Which adapter each batch row uses, shared by every layer for one forward pass.

    `names` are the distinct adapter names of the batch; `row_index[i]` is the position
    of row i's adapter in `names`, or -1 for a row that uses the base model alone.
    With `slots` set, `names` is that fixed tuple (an adapter cache's slots, not just the
    batch's adapters) and, outside autograd, each layer keeps its stacked weights between
    forwards for as long as the slots do not change: a server decoding step after step
    with the same resident adapters stacks them once, not once per step.
    """

    def __init__(self, names: Sequence[str], row_index: torch.Tensor, slots: tuple[str, ...] | None = None) -> None:
        self.names = list(names)
        self.row_index = row_index
        self.slots = slots
        # Rows without an adapter gather the all-zero slot after the named ones.
        self.gather_index = torch.where(row_index < 0, len(self.names), row_index)


class LoraLayer(nn.Module):
    """Adapter bookkeeping shared by the linear and embedding layers."""

    def __init__(self) -> None:
        super().__init__()
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: MixedBatch | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def _set_scaling(self, name: str, r: int, alpha: float, use_rslora: bool) -> None:
        self.r[name] = r
        self.alpha[name] = alpha
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def _forget(self, name: str) -> None:
        for table in (self.r, self.alpha, self.scaling, self.use_dora):
            table.pop(name, None)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def _runs_adapters(self) -> bool:
        return not self.disabled and bool(self.active_adapters)


@torch.no_grad()
def init_on_cpu(param: torch.Tensor, init: Callable[[torch.Tensor], object]) -> None:
    """Fill `param` with `init` drawn from the CPU's random generator, wherever it lives: a
    seed gives the same starting adapter on a CPU and on a GPU (whose generators differ)."""
    if param.device.type in ("cpu", "meta"):
        init(param)
        return
    values = torch.empty(param.shape, dtype=param.dtype)
    init(values)
    param.copy_(values)


class LoraLinear(LoraLayer):
    """`nn.Linear` or transformers' GPT-2 `Conv1D` with LoRA adapters.

    `fan_in_fan_out` is True for `Conv1D`, whose weight is stored (in, out); A and B keep
    the usual (r, in) and (out, r) shapes either way.
    """

    def __init__(self, base: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.fan_in_fan_out = fan_in_fan_out
        if fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        # The original module object, without its own registration, so `unload` can hand it back.
        self._base_shell = [base]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_merge_norm: dict[str, torch.Tensor] = {}
        self.base_quant_state: object | None = None
        """bitsandbytes' quantization state of a 4-bit base kept as plain bytes (see release_4bit_storage)."""
        self.requantization_error: float | None = None
        """Relative error of the last merge/unmerge into a quantized base (None: exact)."""
        # Stacked adapter weights for MixedBatch.slots: (slots, A stack, B stack) or None, and
        # the adapters added/removed/reloaded since, whose slots must be written again.
        self._stack_cache: tuple[tuple[str, ...], torch.Tensor | None, torch.Tensor | None] | None = None
        self._stale: set[str] = set()

    # adapters --------------------------------------------------------------------

    def add(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool
    ) -> None:
        """Add adapter `name` with A Kaiming-uniform and B zero (so the layer starts as the base)."""
        dtype = adapter_dtype(self.weight.dtype)
        device = self.weight.device
        self._set_scaling(name, r, alpha, use_rslora)
        self._stale.add(name)
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        init_on_cpu(self.lora_A[name].weight, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.use_dora[name] = use_dora
        if use_dora:
            self.reset_dora_magnitude(name)

    def reset_dora_magnitude(self, name: str) -> None:
        """Set the DoRA magnitude to the column norm of the current W + scaling * B A."""
        with torch.no_grad():
            norm = self._weight_norm(self.base_weight_oi().float(), self.delta_oi(name))
        dtype = adapter_dtype(self.weight.dtype)
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype), requires_grad=True)

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(
                f"adapter {name!r} is merged into the base weight; unmerge it before deleting"
            )
        for table in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in table:
                del table[name]
        self._forget(name)
        self._stale.add(name)

    # weights -------------------------------------------------------------------------

    @property
    def quantized(self) -> str | None:
        """'nf4', 'fp4' or 'int8' when the base weight is a bitsandbytes quantized parameter."""
        return qweights.kind_of(self.weight)

    def base_weight_oi(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the storage layout (fp32 values when quantized)."""
        if self.quantized:
            return qweights.dequantize(self.weight, self._base_shell[0])
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def delta_oi(self, name: str) -> torch.Tensor:
        """scaling * B @ A in fp32, shape (out, in)."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.scaling[name]

    @staticmethod
    def _weight_norm(weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
        # DoRA's norm: per output feature, over the input dimension. (out,)
        return torch.linalg.norm(weight_oi + delta_oi, dim=1)

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        """Add the adapters' updates into the base weight (computed in fp32, cast to its dtype)."""
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            weight = self.base_weight_oi().float()
            delta = self.delta_oi(name)
            if self.use_dora[name]:
                norm = self._weight_norm(weight, delta)
                magnitude = self.lora_magnitude_vector[name].float()
                merged = (magnitude / norm).unsqueeze(1) * (weight + delta)
                self._dora_merge_norm[name] = norm
            else:
                merged = weight + delta
            if safe and not torch.isfinite(merged).all():
                raise ValueError(
                    f"merging adapter {name!r} would put NaN/Inf into the base weight; nothing merged"
                )
            error = self.write_base_weight(merged)
            self._warn_requantized("merging", name, error)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again (exact in fp32; fp16/bf16 weights come back within one rounding step)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_weight_oi().float()
            delta = self.delta_oi(name)
            if self.use_dora[name]:
                norm = self._dora_merge_norm.pop(name)
                magnitude = self.lora_magnitude_vector[name].float()
                original = weight * (norm / magnitude).unsqueeze(1) - delta
            else:
                original = weight - delta
            error = self.write_base_weight(original)
            self._warn_requantized("unmerging", name, error)

    def write_base_weight(self, weight_oi: torch.Tensor) -> float | None:
        """Store `weight_oi` (out, in) as the base weight.

        A quantized base is requantized in its own format; the return value is then the
        relative Frobenius error of the stored values against `weight_oi` (None otherwise).
        """
        kind = self.quantized
        if kind:
            shell = self._base_shell[0]
            with torch.no_grad():
                target = weight_oi.float()
                stored = qweights.quantize(target, kind, like=self.weight)
                qweights.attach(shell, stored)
                self.weight = stored
                error = torch.linalg.norm(qweights.dequantize(stored, shell) - target)
                return float(error / torch.linalg.norm(target).clamp_min(1e-12))
        with torch.no_grad():
            value = weight_oi.t() if self.fan_in_fan_out else weight_oi
            self.weight.copy_(value.to(self.weight.dtype))
        return None

    def quantize_base(
        self, kind: str, compute_dtype: torch.dtype | None = None, weight_oi: torch.Tensor | None = None
    ) -> None:
        """Replace the base by its bitsandbytes `kind` quantization (of `weight_oi` when given): QLoRA's base.

        compute_dtype: the dtype of the 4-bit matmul (None: the current weight's dtype).
        """
        if self.fan_in_fan_out:
            raise ValueError("bitsandbytes has no layout for GPT-2's Conv1D weights; this layer cannot be quantized")
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into this base; unmerge before quantizing")
        if self.quantized:
            raise ValueError(f"this base is already quantized ({self.quantized})")
        source = self.weight if weight_oi is None else weight_oi
        dtype = compute_dtype or self.weight.dtype
        shell = qweights.quantized_linear(source, self.bias, kind, dtype)
        self._base_shell[0] = shell
        self.weight = shell.weight
        self.bias = shell.bias

    def release_4bit_storage(self) -> None:
        """Keep a 4-bit base as plain packed bytes plus its quantization state on this layer.

        bitsandbytes keeps the state on the parameter object; FSDP2 replaces parameters by
        shards and would lose it. After this call the packed bytes are an ordinary frozen
        parameter that FSDP2 can shard and gather, and the state stays here.
        """
        if self.quantized not in ("nf4", "fp4"):
            raise ValueError(f"release_4bit_storage needs a 4-bit base, this one is {self.quantized or 'not quantized'}")
        self.base_quant_state = self.weight.quant_state
        self.weight = nn.Parameter(self.weight.data, requires_grad=False)

    def _warn_requantized(self, action: str, name: str, error: float | None) -> None:
        self.requantization_error = error
        if error is None:
            return
        warnings.warn(
            f"{action} adapter {name!r} requantized a {self.quantized} base weight "
            f"({self.out_features}x{self.in_features}): relative error {error:.2e} against the exact "
            "fp32 result; lorakit.base.quant.merge_and_dequantize(model) writes an exact bf16/fp16/fp32 merge",
            RequantizationWarning,
            stacklevel=3,
        )

    # forward ---------------------------------------------------------------------------

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exactly what the wrapped module computes."""
        if self.base_quant_state is not None:
            # 4-bit storage as plain packed bytes (sharded by FSDP2, which may have gathered
            # it in a float dtype: the byte values 0..255 are exact in any float format).
            packed = self.weight if self.weight.dtype == torch.uint8 else self.weight.to(torch.uint8)
            compute_dtype = getattr(self._base_shell[0], "compute_dtype", None)
            return qweights.matmul_4bit(x, packed, self.bias, compute_dtype, self.base_quant_state)
        kind = self.quantized
        if kind == "int8":
            # LLM.int8() keeps its own matmul state; its module runs it, in our train/eval mode.
            shell = self._base_shell[0]
            shell.training = self.training
            return shell(x)
        if kind:
            compute_dtype = getattr(self._base_shell[0], "compute_dtype", None)
            return qweights.matmul_4bit(x, self.weight, self.bias, compute_dtype)
        if self.fan_in_fan_out:  # transformers' Conv1D
            size_out = x.shape[:-1] + (self.out_features,)
            flat = x.reshape(-1, x.shape[-1])
            out = (
                torch.addmm(self.bias, flat, self.weight)
                if self.bias is not None
                else flat @ self.weight
            )
            return out.view(size_out)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.disabled:
            return result
        if self.mixed is not None:
            return self._mixed_forward(x, result)
        pending = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not pending:
            return result
        out_dtype = result.dtype
        for name in pending:
            lora_a = self.lora_A[name]
            xa = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            if self.use_dora[name]:
                result = result + self._dora_update(name, x, xa, result)
            else:
                result = result + self.lora_B[name](lora_a(xa)) * self.scaling[name]
        return result.to(out_dtype)

    def _dora_update(
        self, name: str, x: torch.Tensor, xa: torch.Tensor, result: torch.Tensor
    ) -> torch.Tensor:
        """DoRA: W' x = m / ||W + sBA|| * (W x + s B A x); the norm is detached (DoRA paper, sec. 4.3).

        Returns W' x - W x = (m/n - 1) * W x + (m/n) * s * B A x, with W x computed on the
        dropped-out input when dropout is active (as PEFT does).
        """
        scaling = self.scaling[name]
        weight = self.base_weight_oi()
        norm = self._weight_norm(weight.float(), self.delta_oi(name).detach()).detach()
        mag_scale = (self.lora_magnitude_vector[name] / norm).view(1, -1)
        if isinstance(self.lora_dropout[name], nn.Identity) or not self.training:
            base = result if self.bias is None else result - self.bias
        else:
            base = F.linear(xa.to(weight.dtype), weight)
        lora = self.lora_B[name](self.lora_A[name](xa)) * scaling
        return (mag_scale - 1) * base + mag_scale * lora

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        mixed = self.mixed
        assert mixed is not None
        if mixed.slots is not None and not torch.is_grad_enabled():
            a_stack, b_stack = self._cached_stacks(mixed.slots)
        else:
            a_stack, b_stack = self._stacks(mixed.names)
        if a_stack is None or b_stack is None:
            return result
        return result + lora_mixed_delta(x, a_stack, b_stack, mixed.gather_index).to(result.dtype)

    def _check_mixable(self, name: str) -> None:
        if self.use_dora[name]:
            raise ValueError(f"mixed batches run plain LoRA adapters; adapter {name!r} uses DoRA")
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge before running mixed batches")

    def _stacks(self, names: Sequence[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Stack this layer's adapters for `names`, padded to one rank, scaling folded into B.

        Slot len(names) is all zeros: rows without an adapter (or with one this layer
        does not have) gather it and get exactly the base output.
        """
        present = [n for n in names if n in self.r]
        if not present:
            return None, None
        for n in present:
            self._check_mixable(n)
        r_max = max(self.r[n] for n in present)
        ref = self.lora_A[present[0]].weight
        count = len(names) + 1
        a_stack = ref.new_zeros(count, r_max, self.in_features)
        b_stack = ref.new_zeros(count, self.out_features, r_max)
        for slot, n in enumerate(names):
            if n in self.r:
                self._write_slot(a_stack, b_stack, slot, n)
        return a_stack, b_stack

    def _write_slot(self, a_stack: torch.Tensor, b_stack: torch.Tensor, slot: int, name: str) -> None:
        r = self.r[name]
        a_stack[slot, :r] = self.lora_A[name].weight
        b_stack[slot, :, :r] = self.lora_B[name].weight * self.scaling[name]

    @torch.no_grad()
    def _cached_stacks(self, slots: tuple[str, ...]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`_stacks(slots)`, kept between calls; only slots whose adapter changed are rewritten.

        Zero padding beyond an adapter's rank adds exact zeros, so a stack padded to a
        larger rank than the current adapters need gives the same result.
        """
        cache = self._stack_cache
        if cache is not None and cache[0] is slots and not self._stale:
            return cache[1], cache[2]
        present = [n for n in slots if n in self.r]
        for n in present:
            self._check_mixable(n)
        r_max = max((self.r[n] for n in present), default=0)
        reusable = (
            cache is not None
            and cache[1] is not None
            and len(cache[0]) == len(slots)
            and cache[1].shape[1] >= r_max
        )
        if not present:
            self._stack_cache = (slots, None, None)
        elif not reusable:
            a_stack, b_stack = self._stacks(slots)
            self._stack_cache = (slots, a_stack, b_stack)
        else:
            assert cache is not None and cache[1] is not None and cache[2] is not None
            a_stack, b_stack = cache[1], cache[2]
            for slot, (old, new) in enumerate(zip(cache[0], slots, strict=True)):
                if old != new or new in self._stale:
                    a_stack[slot].zero_()
                    b_stack[slot].zero_()
                    if new in self.r:
                        self._write_slot(a_stack, b_stack, slot, new)
            self._stack_cache = (slots, a_stack, b_stack)
        self._stale.clear()
        return self._stack_cache[1], self._stack_cache[2]

def lora_mixed_delta(
    x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """The LoRA update of a batch whose rows use different adapters, in one gathered op.

    Exact semantics, for every row i:

        y[i] = (x[i] @ A[index[i]].T) @ B[index[i]].T

    x: (batch, in) or (batch, seq, in); A: (n_adapters, r, in); B: (n_adapters, out, r)
    with each adapter's scaling already folded into B; index: (batch,) int64.
    Returns y with x's leading shape and `out` features, in A's dtype.
    """
    squeeze = x.dim() == 2
    xa = x.unsqueeze(1) if squeeze else x  # (batch, seq, in)
    xa = xa.to(a_stack.dtype)
    h = torch.bmm(xa, a_stack[index].transpose(1, 2))  # (batch, seq, r)
    y = torch.bmm(h, b_stack[index].transpose(1, 2))  # (batch, seq, out)
    return y.squeeze(1) if squeeze else y
