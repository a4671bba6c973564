"""LoRA on the experts of a mixture-of-experts layer.

transformers 5 keeps the experts of Qwen3-MoE, Mixtral, gpt-oss, DeepSeek and the other MoE
families as fused 3-D parameters of one module (`mlp.experts.gate_up_proj` of shape
(experts, 2 x intermediate, hidden), `mlp.experts.down_proj`), not as `nn.Linear` modules.
`LoraExperts` wraps such a module: every expert e of every adapted parameter W gets its own
rank-r pair, and the expert computes with

    W'[e] = W[e] + scaling * B[e] @ A[e]        # W[e]: (out, in), A[e]: (r, in), B[e]: (out, r)

(for a module whose parameters are stored (experts, in, out), `is_transposed` in transformers,
the update is stored transposed the same way).

The factors are kept in PEFT's layout for `target_parameters`, so files need no conversion:
`lora_A` is (experts * r, in) with expert e's rows at [e*r, (e+1)*r), and `lora_B` is
(out, r * experts) with expert e's column k at k*experts + e.

The forward sorts tokens by expert and runs each projection and its LoRA terms as grouped
matmuls (`expert_grouped`): the update is never formed as a weight. A module outside
transformers' common experts interface runs its own forward instead, with the updated weights
put in place of its parameters through `torch.func.functional_call`. The base parameters
themselves are never written, except by an explicit `merge`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from lorakit.adapters import expert_grouped, qweights
from lorakit.adapters.layers import LoraLayer, RequantizationWarning, adapter_dtype, init_on_cpu


def expert_parameters(module: nn.Module) -> list[str]:
    """Names of `module`'s own 3-D parameters whose first axis runs over its experts.

    A module counts as an experts module when it says how many experts it has
    (`num_experts`, as every fused-experts class in transformers does) or its class name ends
    in "Experts"; its 2-D parameters (expert biases) are not adapted.
    """
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) and not type(module).__name__.endswith("Experts"):
        return []
    names = []
    for name, param in module.named_parameters(recurse=False):
        if param.dim() == 3 and (not isinstance(count, int) or param.shape[0] == count):
            names.append(name)
    return names


def expert_params_of(module: nn.Module) -> list[str]:
    """The expert parameters of a module, wrapped (`LoraExperts`, quantized or not) or not."""
    if isinstance(module, LoraExperts):
        return list(module.expert_params)
    return expert_parameters(module)


class LoraExperts(LoraLayer):
    """A fused-experts module with LoRA adapters on some of its 3-D parameters."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.expert_params = tuple(expert_parameters(base))
        if not self.expert_params:
            raise TypeError(f"{type(base).__name__} holds no 3-D expert parameters to adapt")
        # The base parameters stay registered under their own names, so state-dict keys do not change.
        self._own_params = [name for name, _ in base.named_parameters(recurse=False)]
        for name, param in base.named_parameters(recurse=False):
            setattr(self, name, param)
        self._base_shell = [base]
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.num_experts = int(getattr(self, self.expert_params[0]).shape[0])
        self.lora_A = nn.ModuleDict()  # adapter -> {parameter: (experts * r, in)}
        self.lora_B = nn.ModuleDict()  # adapter -> {parameter: (out, r * experts)}
        self.targets: dict[str, tuple[str, ...]] = {}
        """The parameters each adapter adapts."""
        self.quantized_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        """Expert parameters stored quantized (QLoRA's base): their shape and compute dtype."""
        self.requantization_error: float | None = None
        # A server's mixed batches: every slot's factors stacked once (expert_grouped.stack_factors),
        # kept while the slots and the adapters stay the same.
        self._changes = 0
        self._stack_cache: tuple[tuple[str, ...], int, dict] | None = None

    # shapes ---------------------------------------------------------------------------

    def shape_of(self, param: str) -> tuple[int, ...]:
        if param in self.quantized_shapes:
            return self.quantized_shapes[param][0]
        return tuple(getattr(self, param).shape)

    def in_out(self, param: str) -> tuple[int, int]:
        """(in, out) features of one expert of `param`."""
        _, d1, d2 = self.shape_of(param)
        return (int(d1), int(d2)) if self.transposed else (int(d2), int(d1))

    # a quantized base -----------------------------------------------------------------

    @property
    def quantized(self) -> str | None:
        """'nf4' or 'int8' when the expert parameters are stored quantized."""
        for param in self.quantized_shapes:
            return qweights.kind_of(getattr(self, param))
        return None

    def quantize_base(self, kind: str, compute_dtype: torch.dtype | None = None) -> None:
        """Store every expert parameter as bitsandbytes `kind` (nf4: one absmax per 64 values of
        each expert's rows; int8: one scale per row): QLoRA's base for the experts. The forward
        decodes them to `compute_dtype` (default: their current dtype) and adds the updates."""
        if self.merged_adapters:
            raise ValueError(f"adapters {self.merged_adapters} are merged into these experts; unmerge before quantizing")
        if self.quantized_shapes:
            raise ValueError(f"these experts are already quantized ({self.quantized})")
        for param in self.expert_params:
            weight = getattr(self, param)
            dtype = compute_dtype or weight.dtype
            # (experts, d1, d2) as (experts * d1, d2): blocks and row scales never cross a row.
            stored = qweights.quantize(weight.detach().reshape(-1, weight.shape[-1]), qweights.check_kind(kind))
            self.quantized_shapes[param] = (tuple(weight.shape), dtype)
            setattr(self, param, stored)
            setattr(self._base_shell[0], param, stored)

    def base_weight(self, param: str) -> torch.Tensor:
        """The parameter's values in its compute dtype (decoded when stored quantized)."""
        if param not in self.quantized_shapes:
            return getattr(self, param)
        shape, dtype = self.quantized_shapes[param]
        return qweights.dequantize(getattr(self, param)).reshape(shape).to(dtype)

    def _write_base(self, param: str, value: torch.Tensor) -> float | None:
        """Store `value` as the parameter (requantized when quantized: the relative error then)."""
        if param not in self.quantized_shapes:
            weight = getattr(self, param)
            weight.copy_(value.to(weight.dtype))
            return None
        old = getattr(self, param)
        stored = qweights.quantize(value.float().reshape(-1, value.shape[-1]), self.quantized, like=old)
        setattr(self, param, stored)
        setattr(self._base_shell[0], param, stored)
        decoded = qweights.dequantize(stored).reshape(value.shape)
        return float(torch.linalg.norm(decoded - value.float()) / torch.linalg.norm(value.float()).clamp_min(1e-12))

    def _warn_requantized(self, action: str, name: str, errors: list[float]) -> None:
        if not errors:
            return
        self.requantization_error = max(errors)
        warnings.warn(
            f"{action} adapter {name!r} requantized {self.quantized} expert weights: relative error up to "
            f"{self.requantization_error:.2e} against the exact fp32 result",
            RequantizationWarning,
            stacklevel=4,
        )

    def factor_shapes(self, param: str, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of A and B for `param` at rank r, as PEFT stores them."""
        in_f, out_f = self.in_out(param)
        return (self.num_experts * r, in_f), (out_f, r * self.num_experts)

    # adapters -------------------------------------------------------------------------

    def add(
        self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool, use_dora: bool,
        params: Sequence[str] | None = None,
    ) -> None:
        """Add adapter `name` on `params` (default: every expert parameter), A Kaiming-uniform
        and B zero, so the layer starts as the base."""
        if use_dora:
            raise ValueError(
                f"DoRA is not available on expert parameters ({', '.join(self.expert_params)}): PEFT has no DoRA "
                "for target_parameters either. Train plain LoRA on the experts, or leave them out with "
                "exclude_modules / --targets"
            )
        if dropout > 0:
            raise ValueError(
                f"LoRA dropout ({dropout}) cannot act on expert parameters: the update is applied to the weights, "
                "not to each expert's input. Use dropout 0 on a model whose experts are adapted"
            )
        chosen = tuple(params) if params is not None else self.expert_params
        unknown = [p for p in chosen if p not in self.expert_params]
        if unknown:
            raise ValueError(f"{unknown} are not expert parameters of this module; it has {list(self.expert_params)}")
        self._set_scaling(name, r, alpha, use_rslora)
        self._changes += 1
        self.use_dora[name] = False
        self.targets[name] = chosen
        first = getattr(self, chosen[0])
        base_dtype = self.quantized_shapes[chosen[0]][1] if chosen[0] in self.quantized_shapes else first.dtype
        dtype, device = adapter_dtype(base_dtype), first.device
        a_dict, b_dict = nn.ParameterDict(), nn.ParameterDict()
        for param in chosen:
            a_shape, b_shape = self.factor_shapes(param, r)
            a = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
            # nn.Linear(in, experts * r)'s own initialisation, as PEFT's layer draws it.
            init_on_cpu(a, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5)))
            a_dict[param] = a
            b_dict[param] = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.lora_A[name] = a_dict
        self.lora_B[name] = b_dict

    def remove(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting")
        for table in (self.lora_A, self.lora_B):
            if name in table:
                del table[name]
        self.targets.pop(name, None)
        self._forget(name)
        self._changes += 1

    # weights ----------------------------------------------------------------------------

    def delta(self, name: str, param: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """scaling * B[e] @ A[e] for every expert, laid out as `param` is (fp32 unless `dtype`)."""
        r = self.r[name]
        in_f, out_f = self.in_out(param)
        a = self.lora_A[name][param].to(dtype).view(self.num_experts, r, in_f)
        b = self.lora_B[name][param].to(dtype).view(out_f, r, self.num_experts).permute(2, 0, 1)
        delta = torch.bmm(b, a) * self.scaling[name]  # (experts, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every own parameter of the base module, with the updates of `names` added.

        The update is computed in the weight's own dtype (a bf16 base gets a bf16 product, rank-r
        sums accumulated in fp32 by the matmul): an fp32 copy of every expert weight per forward
        would double the memory of the experts' largest tensors."""
        out = {p: getattr(self, p) for p in self._own_params}
        for param in self.quantized_shapes:
            out[param] = self.base_weight(param)
        for param in self.expert_params:
            dtype = out[param].dtype if out[param].dtype.is_floating_point else torch.float32
            deltas = [self.delta(n, param, dtype) for n in names if param in self.targets.get(n, ())]
            if deltas:
                total = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)
                out[param] = out[param] + total.to(out[param].dtype)
        return out

    def merge(self, names: Sequence[str], safe: bool = False) -> None:
        """Add the adapters' updates into the base weights (computed in fp32, cast to their dtype)."""
        for name in names:
            if name in self.merged_adapters or name not in self.r:
                continue
            with torch.no_grad():
                merged = {p: self.base_weight(p).float() + self.delta(name, p) for p in self.targets[name]}
                if safe and not all(torch.isfinite(w).all() for w in merged.values()):
                    raise ValueError(f"merging adapter {name!r} would put NaN/Inf into the base weight; nothing merged")
                errors = [self._write_base(param, value) for param, value in merged.items()]
            self._warn_requantized("merging", name, [e for e in errors if e is not None])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged updates again (exact up to fp32 rounding; fp16/bf16 within one rounding step)."""
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                errors = [self._write_base(p, self.base_weight(p).float() - self.delta(name, p))
                          for p in self.targets[name]]
                self._warn_requantized("unmerging", name, [e for e in errors if e is not None])

    def merged_preview(self, name: str) -> list[torch.Tensor]:
        with torch.no_grad():
            return [self.base_weight(p).float() + self.delta(name, p) for p in self.targets[name]]

    def unwrap(self) -> nn.Module:
        """The original module, holding the layer's current base parameters (quantized experts
        decoded to their compute dtype: the module's own forward multiplies plain tensors)."""
        base = self._base_shell[0]
        for name in self._own_params:
            if name in self.quantized_shapes:
                setattr(base, name, nn.Parameter(self.base_weight(name).detach(), requires_grad=False))
            else:
                setattr(base, name, getattr(self, name))
        return base

    # forward ----------------------------------------------------------------------------

    @property
    def experts_module(self) -> nn.Module:
        """The wrapped experts module (its own flags: has_gate, is_transposed, is_concatenated)."""
        return self._base_shell[0]

    @property
    def grouped(self) -> bool:
        """Whether the experts run as grouped matmuls with their LoRA terms (expert_grouped)."""
        return expert_grouped.supports(self._base_shell[0])

    def factors(self, param: str) -> expert_grouped.Factors:
        """`param`'s LoRA factors per adapter, laid out for grouped matmuls (see expert_grouped)."""

        def of(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float] | None:
            if param not in self.targets.get(name, ()):
                return None
            r = self.r[name]
            in_f, out_f = self.in_out(param)
            a = self.lora_A[name][param].to(dtype).view(self.num_experts, r, in_f).transpose(1, 2)  # (E, in, r)
            b = self.lora_B[name][param].to(dtype).view(out_f, r, self.num_experts).permute(2, 1, 0)  # (E, r, out)
            return a, b.contiguous(), self.scaling[name]

        return of

    def _grouped(self, names: Sequence[str], hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor, adapter_of_token: torch.Tensor | None = None,
                 slots: tuple[str, ...] | None = None) -> torch.Tensor:
        weights = {p: getattr(self, p) for p in self._own_params}
        for param in self.quantized_shapes:
            weights[param] = self.base_weight(param)
        factors = {p: self.factors(p) for p in self.expert_params}
        stacks = None
        if slots is not None and not torch.is_grad_enabled():
            stacks = self._cached_stacks(slots, factors, weights[self.expert_params[0]].dtype)
        return expert_grouped.experts_forward(self._base_shell[0], weights, factors, names, hidden_states,
                                              top_k_index, top_k_weights, adapter_of_token, stacks)

    def _cached_stacks(self, slots: tuple[str, ...], factors: dict, dtype: torch.dtype) -> dict:
        """The slots' stacked factors, built again only when the slots or the adapters changed.
        Weights changed in place (an optimizer step) are not noticed, as for the linear layers."""
        cache = self._stack_cache
        if cache is not None and cache[0] == slots and cache[1] == self._changes:
            return cache[2]
        stacks = {p: expert_grouped.stack_factors(factors[p], slots, self.num_experts, dtype, self.in_out(p))
                  for p in self.expert_params}
        self._stack_cache = (slots, self._changes, stacks)
        return stacks

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        base = self._base_shell[0]
        if self.mixed is not None:
            return self._mixed_forward(hidden_states, *args, **kwargs)
        running = self.active_adapters if self._runs_adapters() else []
        running = [n for n in running if n not in self.merged_adapters]
        if running and expert_grouped.supports(base) and len(args) == 2 and not kwargs:
            # The updates as rank-r grouped matmuls, never as weights (expert_grouped).
            return self._grouped(running, hidden_states, *args)
        return functional_call(base, self.weights(running), (hidden_states, *args), kwargs, strict=False)

    def _mixed_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Each batch row's tokens through the experts with that row's adapter.

        The block hands the experts its tokens flattened, (rows * T, hidden), row-major; every
        token is computed independently, so the tokens of each adapter run as one group.
        """
        mixed = self.mixed
        assert mixed is not None
        for name in mixed.names:
            if name in self.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged into the base; unmerge before running mixed batches")
        rows = mixed.row_index.numel()
        tokens = hidden_states.shape[0]
        if tokens % rows:
            raise ValueError(f"the experts got {tokens} tokens, which is not a whole number per row of {rows} rows")
        per_token = mixed.row_index.repeat_interleave(tokens // rows)
        base = self._base_shell[0]
        if expert_grouped.supports(base) and not args and not kwargs:
            return self._grouped(mixed.names, hidden_states, top_k_index, top_k_weights, per_token, mixed.slots)
        out = None
        for index in per_token.unique().tolist():
            name = mixed.names[index] if index >= 0 else None
            where = (per_token == index).nonzero().squeeze(1)
            names = [name] if name is not None and name in self.r else []
            part = functional_call(
                base, self.weights(names),
                (hidden_states[where], top_k_index[where], top_k_weights[where], *args), kwargs, strict=False,
            )
            if out is None:
                out = hidden_states.new_zeros((tokens, *part.shape[1:]), dtype=part.dtype)
            out[where] = part
        assert out is not None
        return out


# PEFT's file keys --------------------------------------------------------------------------

NESTED = ".base_layer"
"""PEFT wraps each targeted parameter of one module in its own layer, the first parameter
innermost: with n parameters adapted, the i-th (in the module's own order) has its factors
under `<module>` + ".base_layer" * (n - 1 - i)."""


def file_prefixes(path: str, params: Sequence[str], order: Sequence[str]) -> dict[str, str]:
    """{parameter: key prefix} for the adapted `params` of the experts module at `path`."""
    chosen = [p for p in order if p in params]
    return {p: path + NESTED * (len(chosen) - 1 - i) for i, p in enumerate(chosen)}


def split_nested(prefix: str) -> tuple[str, int]:
    """(module path, nesting depth) of a key prefix such as `...experts.base_layer`."""
    depth = 0
    while prefix.endswith(NESTED):
        prefix = prefix[: -len(NESTED)]
        depth += 1
    return prefix, depth


def quantize_experts(model: nn.Module, kind: str, compute_dtype: torch.dtype | None = None,
                     paths: Sequence[str] | None = None) -> list[str]:
    """Store the expert parameters of every fused-experts module of `model` (or of those at
    `paths`) as bitsandbytes `kind` (QLoRA's base for the experts; bitsandbytes' own layers cover
    `nn.Linear` only).

    Each experts module becomes a `LoraExperts` (with no adapter yet, it computes exactly what
    the module did, from the decoded weights). Returns the paths of the modules quantized.
    """
    done = []
    found = list(model.named_modules()) if paths is None else [(p, model.get_submodule(p)) for p in paths]
    for path, module in found:
        if isinstance(module, LoraExperts):
            if not module.quantized:
                module.quantize_base(kind, compute_dtype)
                done.append(path)
            continue
        if not expert_parameters(module) or any(path.startswith(p + ".") for p in done):
            continue
        layer = LoraExperts(module)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
        layer.quantize_base(kind, compute_dtype)
        done.append(path)
    return done
