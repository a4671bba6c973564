"""Which modules and expert parameters an adapter config selects, and how a file names them.

`find_targets` turns a `LoraConfig` (target_modules, target_parameters, exclude_modules) into
module paths; "all-linear" takes every linear layer but the output head and every fused
mixture-of-experts module.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters import qweights
from lorakit.adapters.config import ALL_LINEAR, LoraConfig, matches
from lorakit.adapters.experts import LoraExperts, expert_params_of
from lorakit.adapters.layers import LoraLayer
from lorakit.adapters.saved import ModulesToSave
from lorakit.adapters.state import get_state

SUPPORTED = (nn.Linear, Conv1D, nn.Embedding)
"""Module types that can carry adapters (besides fused experts modules)."""

LINEAR_TYPES = (nn.Linear, Conv1D)


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None
    return None


def walk_modules(model: nn.Module, stop: tuple[type, ...]) -> Iterator[tuple[str, nn.Module]]:
    """`named_modules`, but the children of a module of a `stop` type are not visited (an
    adapter's own weights grow with every adapter loaded: walking them made loading the
    n-th adapter cost O(n))."""
    seen: set[int] = set()
    pending: list[tuple[str, nn.Module]] = [("", model)]
    while pending:
        name, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, stop):
            continue
        children = [(f"{name}.{child_name}" if name else child_name, child)
                    for child_name, child in module._modules.items() if child is not None]
        pending.extend(reversed(children))


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Named modules of the base model: adapter internals and saved copies are skipped."""
    return walk_modules(model, (LoraLayer, ModulesToSave))


def _layer_type(module: nn.Module) -> type:
    if isinstance(module, LoraLayer):
        return type(unwrap_shell(module))
    return type(module)


def unwrap_shell(layer: LoraLayer) -> nn.Module:
    return layer._base_shell[0]


def _own_forward(module: nn.Module) -> bool:
    """A subclass of nn.Linear that computes something else in its forward (MoE routers of Llama 4
    and PhiMoE return their choice of experts): not a projection LoRA can wrap. bitsandbytes'
    4-bit and 8-bit linear layers are projections, whatever their forward."""
    base = unwrap_shell(module) if isinstance(module, LoraLayer) else module
    kind = type(base)
    if not issubclass(kind, nn.Linear) or kind.forward is nn.Linear.forward:
        return False
    return kind.__module__.split(".")[0] != "bitsandbytes" and qweights.kind_of(getattr(base, "weight", None)) is None


def expert_targets(config: LoraConfig, path: str, module: nn.Module) -> tuple[str, ...]:
    """The expert parameters of the module at `path` that `config` adapts: all of them when
    target_modules selects the module ("all-linear" does), else those target_parameters names."""
    candidates = expert_params_of(module)
    if not candidates:
        return ()
    if config.target_modules == ALL_LINEAR or (config.target_modules and matches(config.target_modules, path)):
        return tuple(candidates)
    wanted = config.target_parameters or []
    return tuple(
        p for p in candidates
        if any(f"{path}.{p}" == t or f"{path}.{p}".endswith("." + t) for t in wanted)
    )


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted paths of the modules `config` selects, or a ValueError that lists the candidates."""
    head = output_head(model)
    modules = [(n, m) for n, m in base_modules(model) if n]
    matched: list[str] = []
    for name, module in modules:
        base_type = _layer_type(module)
        if config.exclude_modules is not None and matches(config.exclude_modules, name):
            continue
        if expert_targets(config, name, module):
            matched.append(name)
            continue
        if config.target_modules == ALL_LINEAR:
            selected = issubclass(base_type, LINEAR_TYPES) and module is not head and not _own_forward(module)
        else:
            selected = bool(config.target_modules) and matches(config.target_modules, name)
        if not selected:
            continue
        if _own_forward(module):
            raise ValueError(
                f"target_modules selected {name!r}, a {base_type.__name__}: a linear layer with a forward of its own "
                "(a router returns its expert choice), which a LoRA layer would replace; leave it out of target_modules"
            )
        if not issubclass(base_type, SUPPORTED):
            kinds = ", ".join(t.__name__ for t in SUPPORTED)
            raise ValueError(
                f"target_modules selected {name!r}, a {base_type.__name__}; LoRA layers support {kinds} "
                "and fused mixture-of-experts modules"
            )
        matched.append(name)
    _check_target_parameters(model, config, modules)
    if not matched:
        candidates = sorted(
            {n.rsplit(".", 1)[-1] for n, m in modules if issubclass(_layer_type(m), SUPPORTED)}
        )
        experts = sorted({f"{n.rsplit('.', 1)[-1]}.{p}" for n, m in modules
                          for p in expert_params_of(m)})
        hint = f"; expert parameters (target_parameters): {', '.join(experts)}" if experts else ""
        raise ValueError(
            f"target_modules={config.target_modules!r} matched nothing; "
            f"linear/embedding modules in this model: {', '.join(candidates) or '(none)'}{hint}"
        )
    return matched


def resolved_target_names(model: nn.Module, adapter_name: str) -> list[str] | str:
    """What to write as target_modules: the regex as given, else the adapted modules' names,
    each the shortest dotted suffix that selects no other module (PEFT matches a list by suffix).

    Usually that is the leaf name (`q_proj`). A leaf that also names a module left alone (the
    "0" of `ffn.0` and of `h.0`) gets its parent too. On a model with experts every name keeps
    its parent (`shared_expert.gate_proj`): PEFT reads a bare `gate_proj`, `up_proj`, `down_proj`,
    `w1`, `w2`, `w3` or `gate` on such a model as an older adapter's per-expert layer and moves
    it onto the fused experts. Experts modules are written as target_parameters instead.
    """
    state = get_state(model)
    config = state.configs[adapter_name]
    if isinstance(config.target_modules, str) and config.target_modules != ALL_LINEAR:
        return config.target_modules
    adapted = [n for n in state.targets[adapter_name] if not isinstance(model.get_submodule(n), LoraExperts)]
    has_experts = len(adapted) < len(state.targets[adapter_name])
    chosen = set(adapted)
    others = [n for n, _ in base_modules(model) if n and n not in chosen]
    by_leaf: dict[str, list[str]] = {}
    for other in others:
        by_leaf.setdefault(other.rsplit(".", 1)[-1], []).append(other)
    names = set()
    for path in adapted:
        parts = path.split(".")
        depth = 2 if has_experts and len(parts) > 1 else 1
        while depth < len(parts):
            suffix = ".".join(parts[-depth:])
            if not any(o == suffix or o.endswith("." + suffix) for o in by_leaf.get(parts[-1], ())):
                break
            depth += 1
        names.add(".".join(parts[-depth:]))
    return sorted(names)


def resolved_target_parameters(model: nn.Module, adapter_name: str) -> list[str] | None:
    """What to write as target_parameters: `<module leaf>.<parameter>` of every adapted expert
    parameter (PEFT matches them by suffix), or None when no experts are adapted."""
    state = get_state(model)
    found = set()
    for name in state.targets[adapter_name]:
        layer = model.get_submodule(name)
        if isinstance(layer, LoraExperts):
            found.update(f"{name.rsplit('.', 1)[-1]}.{p}" for p in layer.targets[adapter_name])
    return sorted(found) or None


def _check_target_parameters(model: nn.Module, config: LoraConfig, modules: list[tuple[str, nn.Module]]) -> None:
    """Every target_parameters entry must name expert parameters: a router or other 2-D weight
    is refused by name, rather than silently left out."""
    expert_names = [
        f"{n}.{p}" for n, m in modules for p in expert_params_of(m)
    ]
    for wanted in config.target_parameters or []:
        if any(full == wanted or full.endswith("." + wanted) for full in expert_names):
            continue
        other = next(
            ((n, tuple(p.shape)) for n, p in model.named_parameters()
             if n == wanted or n.endswith("." + wanted)), None,
        )
        experts = sorted({e.split(".", e.count(".") - 1)[-1] for e in expert_names})
        accepted = f"expert parameters in this model: {', '.join(experts)}" if experts else "this model has no fused experts"
        if other is not None:
            raise ValueError(
                f"target_parameters {wanted!r} names {other[0]} of shape {other[1]}, which is not a fused expert "
                f"parameter; lorakit adapts expert parameters through target_parameters ({accepted}). "
                "A router or other linear layer is adapted through target_modules when it is an nn.Linear"
            )
        raise ValueError(f"target_parameters {wanted!r} matched nothing; {accepted}")

