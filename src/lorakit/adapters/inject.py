"""Putting adapters into a model and managing them: targeting, add/switch/delete,
disable, mixed batches, merge and unload.

Every function works on any `nn.Module`; the model is changed in place. The model
remembers its adapters in `model.lora_state` (an `AdapterState`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.config import LoraConfig, matches
from lorakit.adapters.coverage import report
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.experts import LoraExperts, expert_parameters
from lorakit.adapters.inits import initialise
from lorakit.adapters.layers import LoraLayer, LoraLinear, MixedBatch
from lorakit.adapters.saved import ModulesToSave
from lorakit.adapters.state import AdapterState, get_state, has_adapters
from lorakit.adapters.targets import (
    SUPPORTED,
    base_modules,
    expert_targets,
    find_targets,
    walk_modules,
)

log = logging.getLogger(__name__)


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA layer for `module` (which must be one of SUPPORTED, or already a LoRA layer)."""
    if isinstance(module, LoraLayer):
        return module
    if isinstance(module, Conv1D):
        return LoraLinear(module, fan_in_fan_out=True)
    if isinstance(module, nn.Linear):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if expert_parameters(module):
        return LoraExperts(module)
    supported = ", ".join(t.__name__ for t in SUPPORTED)
    raise TypeError(
        f"cannot put a LoRA adapter on {type(module).__name__}; supported layers: {supported} "
        "and fused mixture-of-experts modules"
    )


def unwrap(layer: LoraLayer) -> nn.Module:
    """The original module, holding the layer's current base parameters."""
    if isinstance(layer, LoraExperts):
        return layer.unwrap()
    base = layer._base_shell[0]
    base.weight = layer.weight
    if isinstance(layer, LoraLinear):
        base.bias = layer.bias
    return base


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


# targeting ---------------------------------------------------------------------------


# state ---------------------------------------------------------------------------------


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in walk_modules(model, (LoraLayer,)):
        if isinstance(module, LoraLayer):
            yield name, module


def _saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in walk_modules(model, (LoraLayer, ModulesToSave)):
        if isinstance(module, ModulesToSave):
            yield name, module


def _check_name(state: AdapterState, name: str) -> None:
    if name not in state.configs:
        known = ", ".join(state.configs) or "(none)"
        raise KeyError(f"no adapter named {name!r}; adapters on this model: {known}")


_RESERVED_NAMES = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))
"""Attributes of the dicts that hold adapters by name (`eval`, `training`, `forward`, ...):
an adapter under one of these names would clash with, or hide, the attribute."""


def check_adapter_name(name: object) -> str:
    """Refuse an adapter name the layers cannot hold, before anything changes."""
    if not isinstance(name, str) or not name or "." in name or "/" in name:
        raise ValueError(f"adapter name must be a non-empty string without '.' or '/', got {name!r}")
    if name in _RESERVED_NAMES:
        raise ValueError(
            f"adapter name {name!r} is the name of a module attribute (like eval, training, forward); pick another"
        )
    return name


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


# adding adapters ------------------------------------------------------------------------


def attach(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    module_names: Sequence[str],
    saved_names: Sequence[str] = (),
    trainable: bool = True,
) -> None:
    """Add adapter `name` (default-initialised) on exactly `module_names`; no targeting, no init."""
    check_adapter_name(name)
    state = getattr(model, "lora_state", None)
    if not isinstance(state, AdapterState):
        state = AdapterState()
        model.lora_state = state
    for path in module_names:
        module = model.get_submodule(path)
        layer = wrap(module)
        if layer is not module:
            layer.set_active(state.active)
            replace_module(model, path, layer)
        extra = {"params": expert_targets(config, path, layer)} if isinstance(layer, LoraExperts) else {}
        layer.add(
            name,
            r=config.rank_for(path),
            alpha=config.alpha_for(path),
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            use_dora=config.use_dora,
            **extra,
        )
    for path in saved_names:
        module = model.get_submodule(path)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            module.active_adapters = list(state.active)
            replace_module(model, path, module)
        module.add(name)
    state.configs[name] = config
    state.targets[name] = list(module_names)
    set_trainable(model, name, trainable)


def find_saved(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    found = [n for n, _ in base_modules(model) if n and matches(config.modules_to_save, n)]
    found += [
        n for n, _ in _saved_modules(model) if matches(config.modules_to_save, n) and n not in found
    ]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in base_modules(model) if n})
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r} matched nothing; modules: {', '.join(names)}"
        )
    return found


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add an adapter and make it the active one; everything but adapters is frozen.

    Returns `model`, changed in place.
    """
    add_adapter(model, adapter_name, config)
    set_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Add a trainable adapter `name` beside the existing ones (it is not made active)."""

    check_adapter_name(name)
    if has_adapters(model) and name in get_state(model).configs:
        raise ValueError(
            f"an adapter named {name!r} already exists; delete it first or pick another name"
        )
    targets = find_targets(model, config)
    saved = find_saved(model, config)
    fresh = not has_adapters(model)
    attach(model, name, config, targets, saved)
    if fresh:
        for pname, param in model.named_parameters():
            param.requires_grad_(_is_adapter_param(pname))
    initialise(model, name, config)
    # What was adapted, by kind; a spec that leaves most projection weights out warns here.
    log.info("adapter %r: %s", name, report(model, name, stacklevel=3))


def _is_adapter_param(param_name: str) -> bool:
    parts = param_name.split(".")
    return any(p.startswith("lora_") or p == "modules_to_save" for p in parts)


_ADAPTER_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_embedding_A", "lora_embedding_B")


def set_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Turn gradients on or off for one adapter's weights."""
    for _, layer in lora_layers(model):
        for attr in _ADAPTER_DICTS:
            table = getattr(layer, attr, None)
            if table is None or name not in table:
                continue
            entry = table[name]
            for param in entry.parameters() if isinstance(entry, nn.Module) else (entry,):
                param.requires_grad_(trainable)
    for _, saved in _saved_modules(model):
        if name in saved.modules_to_save:
            saved.modules_to_save[name].requires_grad_(trainable)


def set_adapter(model: nn.Module, name_or_names: str | Sequence[str]) -> None:
    """Make these adapters the active ones (several at once sum their updates)."""
    state = get_state(model)
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    for name in names:
        _check_name(state, name)
    state.active = names
    for _, layer in lora_layers(model):
        layer.set_active(names)
    for _, module in _saved_modules(model):
        module.active_adapters = list(names)


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).active)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer; the remaining active adapters stay active."""
    state = get_state(model)
    _check_name(state, name)
    for _, layer in lora_layers(model):
        if name in layer.merged_adapters:
            raise ValueError(
                f"adapter {name!r} is merged into the base weights; call lorakit.unmerge first"
            )
    for _, layer in lora_layers(model):
        if name in layer.r:
            layer.remove(name)
    for _, module in _saved_modules(model):
        if name in module.modules_to_save:
            del module.modules_to_save[name]
        module.active_adapters = [n for n in module.active_adapters if n != name]
    del state.configs[name]
    del state.targets[name]
    state.active = [n for n in state.active if n != name]


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone: outputs are bit-identical to the model before injection."""
    get_state(model)
    layers = [layer for _, layer in lora_layers(model)]
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    if merged:
        raise ValueError(
            f"adapters {merged} are merged into the base weights; call lorakit.unmerge first"
        )
    saved = [m for _, m in _saved_modules(model)]
    for module in [*layers, *saved]:
        module.disabled = True
    try:
        yield
    finally:
        for module in [*layers, *saved]:
            module.disabled = False


# mixed batches -------------------------------------------------------------------------


@contextmanager
def mixed_batch(
    model: nn.Module, adapter_names: Sequence[str | None], slots: Sequence[str] | None = None
) -> Iterator[None]:
    """Every forward inside uses adapter `adapter_names[i]` for batch row i (None: the base).

    Rows are grouped per layer with gathered tensor ops, not a loop over rows; see
    `lorakit.adapters.layers.lora_mixed_delta` for the exact arithmetic. Dropout is not applied.

    `slots` is for serving: a fixed order of adapters (an adapter cache's resident set) that
    every row's adapter must be in. Outside autograd each layer then keeps the stacked
    weights between calls with the same slots, rewriting only the slots whose adapter was
    added, deleted or loaded since. Weights changed in place by other means (an optimizer
    step) are not noticed, so pass `slots` only while the adapters are frozen.
    """
    state = get_state(model)
    distinct: list[str] = []
    for name in adapter_names:
        if name is None:
            continue
        _check_name(state, name)
        if name not in distinct:
            distinct.append(name)
    fixed: tuple[str, ...] | None = None
    if slots is not None:
        fixed = slots if isinstance(slots, tuple) else tuple(slots)
        for name in fixed:
            _check_name(state, name)
        missing = [n for n in distinct if n not in fixed]
        if missing:
            raise ValueError(f"adapters {missing} are not among the slots {list(fixed)}")
        distinct = list(fixed)
    if any(state.configs[n].modules_to_save for n in distinct):
        raise ValueError("mixed batches do not support adapters with modules_to_save")
    device = _model_device(model)
    lookup = {n: i for i, n in enumerate(distinct)}
    row_index = torch.tensor(
        [lookup[n] if n is not None else -1 for n in adapter_names], device=device
    )
    mixed = MixedBatch(distinct, row_index, fixed)
    layers = list(_outer_lora_layers(model))
    for layer in layers:
        layer.mixed = mixed
    try:
        yield
    finally:
        for layer in layers:
            layer.mixed = None


def _outer_lora_layers(module: nn.Module) -> Iterator[LoraLayer]:
    """The LoRA layers under `module`, without walking into their adapter submodules.

    A server calls mixed_batch once per decoding step, and a model with dozens of
    adapters holds thousands of adapter submodules that `named_modules` would visit.
    """
    for child in module.children():
        if isinstance(child, LoraLayer):
            yield child
        else:
            yield from _outer_lora_layers(child)


def forward_mixed(
    model: nn.Module, adapter_names: Sequence[str | None], *args: Any, **kwargs: Any
) -> Any:
    """`model(*args, **kwargs)` with a different adapter (or None) per batch row."""
    with mixed_batch(model, adapter_names):
        return model(*args, **kwargs)


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# merge and unload -----------------------------------------------------------------------


def merge(model: nn.Module, adapter_name: str | None = None, safe: bool = False) -> None:
    """Add adapter updates into the base weights (fp32 arithmetic, cast to the weight dtype).

    `adapter_name=None` merges the active adapters. With `safe=True` every layer is
    checked first, and a NaN/Inf anywhere merges nothing.
    """
    state = get_state(model)
    names = state.active if adapter_name is None else [adapter_name]
    for name in names:
        _check_name(state, name)
    layers = [layer for _, layer in lora_layers(model)]
    _refuse_tied(model, names)
    if safe:
        for path, layer in lora_layers(model):
            for name in names:
                if name in layer.r and name not in layer.merged_adapters:
                    probe = _merged_preview(layer, name)
                    if not torch.isfinite(probe).all():
                        raise ValueError(
                            f"merging adapter {name!r} would put NaN/Inf into {path}.weight; nothing merged"
                        )
    for layer in layers:
        layer.merge(names)


def _refuse_tied(model: nn.Module, names: Sequence[str]) -> None:
    """A weight shared with another module (tied embeddings) cannot take a merge for one of them."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for path, layer in lora_layers(model):
        if any(n in layer.r for n in names) and hasattr(layer, "weight"):
            shared = [p for p in owners.get(id(layer.weight), []) if p != f"{path}.weight"]
            if shared:
                raise ValueError(
                    f"cannot merge into {path}.weight: it is tied to {', '.join(shared)}, which would change too; "
                    "keep the adapter unmerged, or untie the weights first"
                )


def _merged_preview(layer: LoraLayer, name: str) -> torch.Tensor:
    if isinstance(layer, LoraExperts):
        return torch.cat([w.flatten() for w in layer.merged_preview(name)])
    with torch.no_grad():
        if hasattr(layer, "delta_oi"):
            return layer.base_weight_oi().float() + layer.delta_oi(name)
        return layer.weight.float() + layer.delta(name)


def unmerge(model: nn.Module) -> None:
    """Undo every merge (fp32 weights exactly up to fp32 rounding; fp16/bf16 within one rounding step)."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model (no LoRA layers left)."""
    merge(model)
    return _strip(model, keep_saved_copy=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging; returns the plain base model."""
    unmerge(model)
    return _strip(model, keep_saved_copy=False)


def _strip(model: nn.Module, keep_saved_copy: bool) -> nn.Module:
    for path, layer in list(lora_layers(model)):
        replace_module(model, path, unwrap(layer))
    for path, module in list(_saved_modules(model)):
        replacement = module._current() if keep_saved_copy else module.original
        replace_module(model, path, replacement)
    del model.lora_state
    return model


# counting ------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> ParamCount:
    """(trainable, total) parameter counts; `.percent` gives the trainable share."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParamCount(trainable, total)
