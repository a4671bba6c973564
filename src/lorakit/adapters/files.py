"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (r, in),
`...lora_B.weight` (out, r), `...lora_magnitude_vector` (out,) for DoRA,
`...lora_embedding_A` (r, num_embeddings) / `...lora_embedding_B` (dim, r) for
embeddings, and `base_model.model.<module path>.<param>` for modules_to_save.

Files are written under a temporary name and renamed. Loading reads and checks
everything before the model is touched, so a bad file leaves the model as it was.
Reading is bounded: a config over `MAX_CONFIG_BYTES`, or a safetensors header over
`MAX_HEADER_BYTES` or `MAX_TENSORS` tensors, is refused before it is parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.embedding import LoraEmbedding
from lorakit.adapters.experts import LoraExperts, expert_params_of, file_prefixes, split_nested
from lorakit.adapters.inits import olora, pissa
from lorakit.adapters.inject import (
    attach,
    check_adapter_name,
    find_saved,
    get_state,
    has_adapters,
    set_adapter,
)
from lorakit.adapters.layers import LoraLayer, LoraLinear, adapter_dtype
from lorakit.adapters.saved import ModulesToSave
from lorakit.adapters.targets import (
    expert_targets,
    find_targets,
    resolved_target_names,
    resolved_target_parameters,
)

MAX_CONFIG_BYTES = 2**20
"""adapter_config.json is a few KB; a rank_pattern over every module of a large model stays under 1 MiB."""
MAX_HEADER_BYTES = 16 * 2**20
"""A safetensors header is ~100 bytes a tensor: 16 MiB is over 100,000 tensors."""
MAX_TENSORS = 100_000
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""What an adapter file's tensors are stored as (float8 kinds load too)."""
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_magnitude_vector",
    ".lora_embedding_A",
    ".lora_embedding_B",
)


# saving ---------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (detached, on CPU, contiguous)."""
    state = get_state(model)
    if adapter_name not in state.configs:
        raise KeyError(
            f"no adapter named {adapter_name!r}; adapters on this model: {', '.join(state.configs)}"
        )
    out: dict[str, torch.Tensor] = {}
    for path in state.targets[adapter_name]:
        layer = model.get_submodule(path)
        key = PREFIX + path
        if isinstance(layer, LoraLinear):
            out[key + ".lora_A.weight"] = layer.lora_A[adapter_name].weight
            out[key + ".lora_B.weight"] = layer.lora_B[adapter_name].weight
            if layer.use_dora[adapter_name]:
                out[key + ".lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
        elif isinstance(layer, LoraEmbedding):
            out[key + ".lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            out[key + ".lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
        elif isinstance(layer, LoraExperts):
            params = layer.targets[adapter_name]
            for param, prefix in file_prefixes(key, params, layer.expert_params).items():
                out[prefix + ".lora_A.weight"] = layer.lora_A[adapter_name][param]
                out[prefix + ".lora_B.weight"] = layer.lora_B[adapter_name][param]
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
            for pname, tensor in module.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{path}.{pname}"] = tensor
    return {k: _full(v).detach().to("cpu").contiguous() for k, v in out.items()}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP2 / DTensor) parameter gathered whole; a collective, so every rank must call it."""
    if isinstance(tensor, DTensor):
        return tensor.full_tensor()
    return tensor


def adapter_config_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    state = get_state(model)
    config = state.configs[adapter_name]
    data = config.to_peft_dict(
        resolved_target_names(model, adapter_name), resolved_target_parameters(model, adapter_name)
    )
    if data["base_model_name_or_path"] is None:
        model_config = getattr(model, "config", None)
        data["base_model_name_or_path"] = getattr(model_config, "name_or_path", None) or None
    if not callable(getattr(model, "generate", None)):
        data["task_type"] = None
    data["fan_in_fan_out"] = any(
        getattr(model.get_submodule(p), "fan_in_fan_out", False)
        for p in state.targets[adapter_name]
    )
    return data


def save_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", write: bool = True
) -> Path:
    """Write the adapter to `directory` (created if needed); returns the directory.

    Under FSDP every rank must call this (sharded weights are gathered collectively);
    pass `write=False` on all ranks but one.
    """
    tensors = adapter_state_dict(model, adapter_name)
    config = adapter_config_dict(model, adapter_name)
    directory = Path(directory)
    if write:
        write_adapter(directory, tensors, config)
    return directory


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """Write adapter tensors and config, each file under a temporary name and then renamed.

    A new directory is written whole under a temporary name and renamed into place. In an
    existing one the old config goes first and the new one comes last, so an interrupted
    write leaves an adapter without a config (refused when read), never a config beside
    weights it does not describe.
    """
    directory = Path(directory)
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            write_adapter(tmp, tensors, config)
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return
    (directory / CONFIG_NAME).unlink(missing_ok=True)
    atomic_write(
        directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    atomic_write(
        directory / CONFIG_NAME,
        lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    )


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Run `write(temporary path)` beside `path`, then rename it into place: readers see the old
    file or the whole new one, and a failure leaves nothing behind. The file gets the mode a new
    file gets under the umask (mkstemp's own is 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)  # (a writer may make the file anew, so the mode is set after it)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# reading --------------------------------------------------------------------------------


@dataclass
class AdapterFiles:
    """An adapter as read from disk, before it touches any model."""

    directory: Path
    config: LoraConfig
    raw_config: dict
    tensors: dict[str, torch.Tensor]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


def read_adapter(directory: str | os.PathLike) -> AdapterFiles:
    """Read and parse an adapter directory; errors name the file and what is wrong."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if not weights_path.is_file():
        raise FileNotFoundError(
            f"{weights_path} is missing; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise ValueError(
            f"{config_path} is {config_path.stat().st_size} bytes; an adapter config is at most {MAX_CONFIG_BYTES}"
        )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    config = LoraConfig.from_peft_dict(raw, source=str(config_path))
    check_safetensors_header(weights_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} is truncated or corrupt: {err}") from None
    for key, tensor in tensors.items():
        # Loading casts to the layer's dtype: a bool or integer tensor would be silently turned
        # into weights it never held.
        if not tensor.is_floating_point():
            raise ValueError(f"{weights_path}: {key} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                             f"adapter tensors must be floating point ({', '.join(FLOAT_DTYPES)})")
        # A NaN or infinity would poison every output of the adapter (and a sampled batch with it).
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights_path}: {key} holds NaN or infinite values")
    return AdapterFiles(directory, config, raw, tensors)


def check_safetensors_header(path: Path) -> None:
    """Refuse a safetensors file whose header is too large or lists too many tensors, unparsed."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated or corrupt: {size} bytes, shorter than a safetensors header")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER_BYTES or length > size - 8:
            raise ValueError(
                f"{path} declares a {length}-byte header (file: {size} bytes; at most {MAX_HEADER_BYTES} "
                "accepted); it is corrupt or not an adapter"
            )
        header = f.read(length)
    # Each tensor entry holds one "dtype" key; counting them bounds the work before JSON parsing.
    count = header.count(b'"dtype"')
    if count > MAX_TENSORS:
        raise ValueError(f"{path} lists {count} tensors; an adapter has at most {MAX_TENSORS}")


# loading --------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Where each tensor of the file goes, fully checked against the model."""

    linear: dict[str, dict[str, torch.Tensor]]
    embedding: dict[str, dict[str, torch.Tensor]]
    saved: dict[str, dict[str, torch.Tensor]]
    experts: dict[str, dict[str, dict[str, torch.Tensor]]]
    """{experts module path: {parameter: {".lora_A.weight": A, ".lora_B.weight": B}}}"""


def _plan(model: nn.Module, files: AdapterFiles) -> _Plan:
    weights_path = files.directory / WEIGHTS_NAME
    config = files.config
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    saved_paths = find_saved(model, config) if config.modules_to_save else []
    saved: dict[str, dict[str, torch.Tensor]] = {p: {} for p in saved_paths}
    for key, tensor in files.tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{weights_path}: unexpected key {key!r} (keys start with {PREFIX!r})")
        rest = key[len(PREFIX) :]
        if rest.endswith(".base_layer.weight"):
            _check_embedding_copy(model, rest[: -len(".base_layer.weight")], tensor, weights_path)
            continue
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if suffix is not None:
            per_module.setdefault(rest[: -len(suffix)], {})[suffix] = tensor
            continue
        owner = next((p for p in saved_paths if rest.startswith(p + ".")), None)
        if owner is None:
            raise ValueError(
                f"{weights_path}: unexpected key {key!r}; it is neither a LoRA weight nor a module to save"
            )
        saved[owner][rest[len(owner) + 1 :]] = tensor

    expected = set(find_targets(model, config))
    experts = _expert_parts(model, config, per_module, expected, weights_path)
    missing = sorted(expected - set(per_module) - set(experts))
    if missing:
        raise ValueError(
            f"{weights_path}: missing LoRA weights for {len(missing)} targeted module(s), e.g. "
            f"{PREFIX}{missing[0]}.lora_A.weight; the file does not fit this model"
        )
    linear: dict[str, dict[str, torch.Tensor]] = {}
    embedding: dict[str, dict[str, torch.Tensor]] = {}
    for path, parts in per_module.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(
                f"{weights_path}: key {PREFIX}{path}{next(iter(parts))} names module {path!r}, "
                "which this model does not have (a different base model?)"
            ) from None
        if path not in expected:
            raise ValueError(
                f"{weights_path}: unexpected key for module {path!r}, which the config's target_modules do not select"
            )
        r = config.rank_for(path)
        layer = module if isinstance(module, LoraLayer) else None
        is_embedding = isinstance(layer, LoraEmbedding) or isinstance(module, nn.Embedding)
        if is_embedding:
            shapes = {
                ".lora_embedding_A": (r, module.num_embeddings),
                ".lora_embedding_B": (module.embedding_dim, r),
            }
            target = embedding
        else:
            in_f, out_f = _linear_shape(module)
            shapes = {".lora_A.weight": (r, in_f), ".lora_B.weight": (out_f, r)}
            if config.use_dora:
                shapes[".lora_magnitude_vector"] = (out_f,)
            target = linear
        for suffix, shape in shapes.items():
            if suffix not in parts:
                raise ValueError(f"{weights_path}: missing key {PREFIX}{path}{suffix}")
            got = tuple(parts[suffix].shape)
            rank_axis = 0 if suffix in (".lora_A.weight", ".lora_embedding_A") else 1
            if len(got) == 2 and len(shape) == 2 and got[1 - rank_axis] == shape[1 - rank_axis] and got != shape:
                raise ValueError(
                    f"{weights_path}: {PREFIX}{path}{suffix} has rank {got[rank_axis]}, but {CONFIG_NAME} "
                    f"says r={r} for this module; the config and the weights do not belong together"
                )
            if got != shape:
                raise ValueError(
                    f"{weights_path}: {PREFIX}{path}{suffix} has shape {tuple(parts[suffix].shape)}, "
                    f"this model needs {shape} (rank {r}); the adapter was made for a different base model"
                )
        for suffix in parts:
            if suffix not in shapes:
                raise ValueError(f"{weights_path}: unexpected key {PREFIX}{path}{suffix}")
        target[path] = parts
    for path, params in saved.items():
        module = model.get_submodule(path)
        reference = module.original if isinstance(module, ModulesToSave) else module
        want = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in params.items()}
        if want != got:
            raise ValueError(
                f"{weights_path}: modules_to_save {path!r} holds {got}, this model needs {want}"
            )
    return _Plan(linear, embedding, saved, experts)


def _expert_parts(
    model: nn.Module, config: LoraConfig, per_module: dict[str, dict[str, torch.Tensor]],
    expected: set[str], weights_path: Path,
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Take the expert factors out of `per_module` (keyed as PEFT nests them) and check them."""
    found: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for prefix in list(per_module):
        path, _ = split_nested(prefix)
        if path not in expected:
            continue
        module = model.get_submodule(path)
        base = module._base_shell[0] if isinstance(module, LoraLayer) else module
        order = expert_params_of(module)
        if not order:
            continue
        params = expert_targets(config, path, module)
        by_prefix = {v: k for k, v in file_prefixes(path, params, order).items()}
        param = by_prefix.get(prefix)
        if param is None:
            raise ValueError(
                f"{weights_path}: unexpected key {PREFIX}{prefix}.lora_A.weight: the config adapts "
                f"{list(params)} of {path}, which PEFT keys as {sorted(PREFIX + p for p in by_prefix)}"
            )
        parts = per_module.pop(prefix)
        layer = module if isinstance(module, LoraExperts) else LoraExperts(base)
        r = config.rank_for(path)
        shapes = dict(zip((".lora_A.weight", ".lora_B.weight"), layer.factor_shapes(param, r), strict=True))
        for suffix, shape in shapes.items():
            if suffix not in parts:
                raise ValueError(f"{weights_path}: missing key {PREFIX}{prefix}{suffix}")
            if tuple(parts[suffix].shape) != shape:
                raise ValueError(
                    f"{weights_path}: {PREFIX}{prefix}{suffix} has shape {tuple(parts[suffix].shape)}, "
                    f"this model's {path}.{param} needs {shape} (rank {r}, {layer.num_experts} experts)"
                )
        extra = sorted(set(parts) - set(shapes))
        if extra:
            raise ValueError(f"{weights_path}: unexpected key {PREFIX}{prefix}{extra[0]}")
        found.setdefault(path, {})[param] = parts
    for path, params in found.items():
        module = model.get_submodule(path)
        missing = [p for p in expert_targets(config, path, module) if p not in params]
        if missing:
            raise ValueError(f"{weights_path}: missing LoRA weights for {path}.{missing[0]}")
    return found


def _check_embedding_copy(
    model: nn.Module, path: str, tensor: torch.Tensor, weights_path: Path
) -> None:
    """PEFT saves a copy of a targeted embedding's base weight; accept it only when it is this base's."""
    try:
        base = model.get_submodule(path).weight
    except AttributeError:
        raise ValueError(
            f"{weights_path}: key {PREFIX}{path}.base_layer.weight names a module this model lacks"
        ) from None
    if tuple(base.shape) != tuple(tensor.shape) or not torch.equal(
        base.detach().cpu().to(tensor.dtype), tensor
    ):
        raise ValueError(
            f"{weights_path}: {PREFIX}{path}.base_layer.weight is a modified base embedding (e.g. resized "
            "vocabulary); lorakit never changes the base model, so load it into the base model first"
        )


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = module.weight  # transformers' Conv1D: (in, out)
    return int(weight.shape[0]), int(weight.shape[1])


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike | AdapterFiles,
    adapter_name: str | None = None,
    trainable: bool = False,
) -> str:
    """Load an adapter saved by lorakit or PEFT; returns its name on the model.

    `adapter_name=None` uses "default". The first adapter on a model becomes the
    active one; further adapters are added inactive (use `set_adapter`). Everything
    is checked before the model changes: a bad file raises and leaves it as it was.
    """
    name = check_adapter_name(adapter_name or "default")
    if has_adapters(model) and name in get_state(model).configs:
        raise ValueError(
            f"an adapter named {name!r} is already loaded; delete it or choose another adapter_name"
        )
    # An already-read adapter (`read_adapter`) loads without touching the disk again.
    files = directory if isinstance(directory, AdapterFiles) else read_adapter(directory)
    plan = _plan(model, files)
    config = files.config
    first = not has_adapters(model)
    attach(
        model,
        name,
        config,
        [*plan.linear, *plan.embedding, *plan.experts],
        list(plan.saved),
        trainable=trainable,
    )
    if first:
        for pname, param in model.named_parameters():
            if not any(p.startswith("lora_") or p == "modules_to_save" for p in pname.split(".")):
                param.requires_grad_(False)
    with torch.no_grad():
        for path, parts in plan.linear.items():
            layer = model.get_submodule(path)
            assert isinstance(layer, LoraLinear)
            if config.init == "pissa":
                pissa(layer, name)
            elif config.init == "olora":
                olora(layer, name)
            dtype = adapter_dtype(layer.weight.dtype)
            layer.lora_A[name].weight.copy_(parts[".lora_A.weight"].to(dtype))
            layer.lora_B[name].weight.copy_(parts[".lora_B.weight"].to(dtype))
            if config.use_dora:
                layer.lora_magnitude_vector[name].copy_(parts[".lora_magnitude_vector"].to(dtype))
        for path, params in plan.experts.items():
            layer = model.get_submodule(path)
            assert isinstance(layer, LoraExperts)
            for param, parts in params.items():
                layer.lora_A[name][param].copy_(parts[".lora_A.weight"])
                layer.lora_B[name][param].copy_(parts[".lora_B.weight"])
        for path, parts in plan.embedding.items():
            layer = model.get_submodule(path)
            assert isinstance(layer, LoraEmbedding)
            layer.lora_embedding_A[name].copy_(parts[".lora_embedding_A"])
            layer.lora_embedding_B[name].copy_(parts[".lora_embedding_B"])
        for path, params in plan.saved.items():
            module = model.get_submodule(path)
            assert isinstance(module, ModulesToSave)
            module.modules_to_save[name].load_state_dict(params)
    if first:
        set_adapter(model, name)
    return name
