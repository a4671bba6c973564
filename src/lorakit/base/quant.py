"""A 4-bit (NF4) or 8-bit base model under the adapters: QLoRA.

    model = lorakit.base.quant.quantize_model(model, "nf4", compute_dtype=torch.bfloat16)
    model = lorakit.base.quant.load_quantized("path/to/model", "nf4")    # layer by layer
    lorakit.inject(model, LoraConfig(...))                           # adapters stay full precision

Only frozen linear layers are quantized: never adapter weights, never the output head
unless `include_head=True` (the head decides every token; QLoRA keeps it in full
precision too). Formats and kernels are bitsandbytes' (see `lorakit.adapters.qweights`), so a
model transformers loaded with a `BitsAndBytesConfig` takes adapters the same way.

Merging into a quantized base has two exits: `merge_and_dequantize` (dequantize, add
the update in fp32, write bf16/fp16/fp32 — exact up to that final rounding) and
`merge_requantized` (round the merged weight to the base format again, with a warning
that reports the error).
"""

from __future__ import annotations

import ctypes
import json
import math
import resource
import struct
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from lorakit.adapters import qweights
from lorakit.adapters.experts import expert_parameters, quantize_experts
from lorakit.adapters.inject import get_state, lora_layers, merge, merge_and_unload, replace_module
from lorakit.adapters.layers import LoraLayer, LoraLinear, RequantizationWarning
from lorakit.adapters.qweights import KINDS, QuantizationUnavailable, check_kind
from lorakit.adapters.targets import base_modules, output_head

__all__ = [
    "KINDS",
    "CheckpointLayoutError",
    "MemoryReport",
    "QuantizationUnavailable",
    "check_available",
    "linear_weight_bytes",
    "load_quantized",
    "memory_report",
    "merge_and_dequantize",
    "merge_requantized",
    "quantizable_linears",
    "quantize_model",
]


class CheckpointLayoutError(ValueError):
    """A checkpoint's tensor names or contents do not map onto the model layer by layer."""


# availability ---------------------------------------------------------------------------


def check_available(kind: str, device: str | torch.device = "cpu") -> None:
    """Raise QuantizationUnavailable unless bitsandbytes can quantize and multiply `kind` on `device`.

    A tiny layer is quantized and run there, so a missing native library, an unsupported
    device type or a GPU its build lacks kernels for all fail here with one clear message
    instead of deep inside a training step.
    """
    check_kind(kind)
    device = torch.device(device)
    bnb = qweights.bitsandbytes()
    try:
        weight = torch.randn(64, 64, device=device)
        layer = qweights.quantized_linear(weight, None, kind, torch.float32).to(device)
        out = layer(torch.randn(2, 64, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("the probe matmul returned NaN/Inf")
    except Exception as err:
        raise QuantizationUnavailable(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run {kind} layers on device "
            f"{device} ({type(err).__name__}: {err}); it serves CPU, CUDA, ROCm and XPU devices. "
            "Use another --device, or drop --quantize"
        ) from None


# quantizing a loaded model ------------------------------------------------------------------


def quantizable_linears(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Module]]:
    """Linear layers of the base model to quantize: plain nn.Linear or a LoRA layer's linear base.

    Adapter weights, saved module copies, GPT-2's Conv1D (bitsandbytes has no layout for
    it) and weights shared with another module (tied embeddings) are left alone.
    """
    head = None if include_head else output_head(model)
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    found: list[tuple[str, nn.Module]] = []
    for name, module in base_modules(model):
        if module is head or (
            head is not None and isinstance(module, LoraLayer) and module._base_shell[0] is head
        ):
            continue
        if isinstance(module, LoraLinear):
            plain = not module.fan_in_fan_out and not module.quantized
        else:
            plain = type(module) is nn.Linear
        if plain and uses.get(id(module.weight), 1) == 1:
            found.append((name, module))
    return found


def _quantize_layer(
    model: nn.Module, path: str, module: nn.Module, kind: str, compute_dtype: torch.dtype | None
) -> None:
    dtype = compute_dtype or module.weight.dtype
    if isinstance(module, LoraLinear):
        try:
            module.quantize_base(kind, dtype)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    else:
        replace_module(
            model, path, qweights.quantized_linear(module.weight, module.bias, kind, dtype)
        )


def quantize_model(
    model: nn.Module,
    kind: str,
    compute_dtype: torch.dtype | None = None,
    *,
    include_head: bool = False,
) -> nn.Module:
    """Quantize the model's frozen linear layers in place, one at a time; returns `model`.

    kind: "nf4" (4-bit NormalFloat, blocks of 64, double-quantized absmax in blocks of
    256) or "int8" (LLM.int8() row-wise). compute_dtype: the dtype the 4-bit matmul runs
    in (bf16 or fp32; None: each weight's own dtype). Works before or after `inject`.
    The expert weights of mixture-of-experts layers are stored in `kind` too
    (`lorakit.adapters.experts.quantize_experts`).
    """
    check_kind(kind)
    layers = quantizable_linears(model, include_head)
    if not layers:
        if any(qweights.kind_of(p) for p in model.parameters()):
            return model  # every candidate is quantized already (e.g. by LoftQ)
        raise ValueError("quantize_model found no nn.Linear layers to quantize in this model")
    check_available(kind, layers[0][1].weight.device)
    for path, module in layers:
        _quantize_layer(model, path, module, kind, compute_dtype)
    quantize_experts(model, kind, compute_dtype)
    for param in model.parameters():
        if qweights.kind_of(param):
            param.requires_grad_(False)
    return model


# quantizing while loading -----------------------------------------------------------------


def load_quantized(
    path: str | Path,
    kind: str,
    compute_dtype: torch.dtype | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    include_head: bool = False,
) -> nn.Module:
    """Load a transformers model directory (safetensors) with its linear layers quantized as they arrive.

    The model is built on the meta device; each tensor is read from the checkpoint on
    its own, and a linear weight is quantized before the next one is read, so peak
    memory stays near the quantized size plus one full-precision layer. `dtype` is the
    dtype of everything left unquantized (embeddings, norms, the head).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    check_kind(kind)
    path = Path(path)
    device = torch.device(device)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise FileNotFoundError(
            f"load_quantized needs a transformers model directory with config.json and *.safetensors; "
            f"{path} has {', '.join(sorted(p.name for p in path.iterdir())) if path.is_dir() else 'nothing (missing)'}"
        )
    check_available(kind, device)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize = {name for name, _ in quantizable_linears(model, include_head)}
    compute_dtype = compute_dtype or dtype
    pending: dict[
        str, dict[str, torch.Tensor]
    ] = {}  # a linear's weight and bias, until both are read
    with large_blocks_returned():
        _stream(model, files, quantize, pending, kind, compute_dtype, dtype, device)
    model.tie_weights()
    _restore_buffers(model, config, device)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if pending or missing:
        raise CheckpointLayoutError(
            f"{path}: the checkpoint lacks tensors for {', '.join(sorted(pending) + missing)[:300]}; "
            "load it with transformers and call lorakit.base.quant.quantize_model instead"
        )
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    model.requires_grad_(False)
    model.eval()
    return model


def _stream(
    model: nn.Module,
    files: list[Path],
    quantize: set[str],
    pending: dict[str, dict[str, torch.Tensor]],
    kind: str,
    compute_dtype: torch.dtype,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Read the checkpoint tensor by tensor into the meta model, quantizing linear weights as they come."""
    for file in files:
        for key, tensor in read_safetensors(file):
            owner, _, leaf = key.rpartition(".")
            if owner in quantize and leaf in ("weight", "bias"):
                parts = pending.setdefault(owner, {})
                parts[leaf] = tensor.to(device=device, dtype=dtype)
                linear = model.get_submodule(owner)
                if "weight" in parts and ("bias" in parts or linear.bias is None):
                    bias = parts.get("bias")
                    layer = qweights.quantized_linear(parts["weight"], bias, kind, compute_dtype)
                    replace_module(model, owner, layer)
                    del pending[owner]
                continue
            _assign(
                model,
                key,
                tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None),
            )
            # An experts module is quantized once its expert weights are all in, before the next
            # layer's arrive: the experts hold most of an MoE model's weights.
            experts = model.get_submodule(owner) if owner else model
            names = expert_parameters(experts)
            if names and all(getattr(experts, n).device.type != "meta" for n in names):
                quantize_experts(model, kind, compute_dtype, paths=[owner])


@contextmanager
def large_blocks_returned() -> Iterator[None]:
    """Within: glibc serves every block over 128 KiB from its own mapping, freed straight back to the OS.

    By default glibc raises that threshold each time such a block is freed, so the
    full-precision layers read one after another end up on its heap, which does not
    shrink: the peak then drifts towards the full-precision size this loader avoids.
    Afterwards the threshold is set to glibc's own ceiling (32 MiB), where its default
    adjustment ends up anyway.
    """
    mallopt = None
    if sys.platform.startswith("linux"):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            mallopt = None
    m_mmap_threshold = -3
    if mallopt is not None:
        mallopt(m_mmap_threshold, 128 * 1024)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(m_mmap_threshold, 32 * 1024 * 1024)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a .safetensors file, one at a time, each read into its own memory.

    Plain reads rather than a memory map: a mapped checkpoint stays resident (and counted)
    while it is open, which is the full-precision size this loader exists to avoid.
    Layout: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data.
    """
    with open(path, "rb") as f:
        start, header = _header(f)
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            yield key, _read(f, path, key, start, info, 0, info["shape"][0] if info["shape"] else 1)


def _header(f: BinaryIO) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, header


def _read(f: BinaryIO, path: Path, key: str, start: int, info: dict, first: int, stop: int) -> torch.Tensor:
    """Rows [first, stop) of one tensor (dim 0; a scalar is one row), read from its byte range."""
    dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which lorakit cannot read")
    shape = info["shape"]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize if shape else dtype.itemsize
    begin = info["data_offsets"][0] + first * row_bytes
    size = (stop - first) * row_bytes
    raw = torch.empty(size, dtype=torch.uint8)
    f.seek(start + begin)
    if size and f.readinto(memoryview(raw.numpy())) != size:
        raise ValueError(f"{path} is truncated: tensor {key!r} ends past the end of the file")
    return raw.view(dtype).reshape([stop - first, *shape[1:]] if shape else [])


class SafetensorsRows:
    """Rows of a .safetensors file's tensors, read on demand into their own memory (no memory map,
    for the reason `read_safetensors` gives)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._start, self.header = _header(self._file)

    def rows(self, key: str, first: int, stop: int) -> torch.Tensor:
        """Rows [first, stop) of tensor `key` along dim 0 (the whole tensor for a scalar)."""
        info = self.header[key]
        if not info["shape"]:
            first, stop = 0, 1
        return _read(self._file, self.path, key, self._start, info, first, stop)

    def close(self) -> None:
        self._file.close()


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        raise CheckpointLayoutError(
            f"checkpoint key {key!r} names no module of this model"
        ) from None
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = tensor
    else:
        raise CheckpointLayoutError(
            f"checkpoint key {key!r} names no parameter or buffer of this model"
        )


def _restore_buffers(model: nn.Module, config: object, device: torch.device) -> None:
    """Buffers computed at construction (rotary frequencies) are not in checkpoints: rebuild the modules that own them."""
    rebuild_buffers(meta_buffers(model), config, device,
                    "load the model with transformers and call quantize_model instead")


def meta_buffers(model: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """(module path, module, names) of every buffer still on the meta device."""
    owners = []
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.device.type == "meta"]
        if meta:
            owners.append((name, module, meta))
    return owners


def rebuild_buffers(owners: list[tuple[str, nn.Module, list[str]]], config: object, device: torch.device,
                    advice: str) -> None:
    """Build each owner module again from its config and take its buffers (`advice`: what to do
    when a module cannot be built that way)."""
    for name, module, buffers in owners:
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=getattr(module, "config", config))
        except TypeError:
            raise CheckpointLayoutError(
                f"cannot rebuild buffers {buffers} of {name or 'the model'} ({type(module).__name__}) after a "
                f"meta-device load; {advice}"
            ) from None
        for buffer in buffers:
            setattr(module, buffer, getattr(fresh, buffer).to(device))


# merging into a quantized base -------------------------------------------------------------


def merge_and_dequantize(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Merge the active adapters into a quantized base and return a plain `dtype` model.

    Per layer: dequantize to fp32, add the update in fp32 (DoRA included), round once to
    `dtype`. Quantized layers without adapters are dequantized too.
    """
    active = get_state(model).active
    for _, layer in lora_layers(model):
        if isinstance(layer, LoraLinear) and layer.quantized:
            # One layer at a time: only one fp32 weight exists at once.
            layer.unmerge()
            plain = _plain_linear(
                qweights.dequantize(layer.weight, layer._base_shell[0]), layer.bias
            )
            layer._base_shell[0] = plain
            layer.weight, layer.bias = plain.weight, plain.bias
            layer.merge(active)
            plain.weight = layer.weight = nn.Parameter(
                layer.weight.detach().to(dtype), requires_grad=False
            )
    model = merge_and_unload(model)
    for name, module in list(model.named_modules()):
        if qweights.kind_of(getattr(module, "weight", None)):
            plain = _plain_linear(qweights.dequantize(module.weight, module), module.bias)
            plain.weight = nn.Parameter(plain.weight.detach().to(dtype), requires_grad=False)
            replace_module(model, name, plain)
    return model.to(dtype)


def _plain_linear(weight_oi: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    plain = nn.Linear(weight_oi.shape[1], weight_oi.shape[0], bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight_oi, requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return plain


def merge_requantized(model: nn.Module, adapter_name: str | None = None) -> dict[str, float]:
    """Merge adapters into the quantized base, keeping it quantized; returns each layer's relative error.

    The merged weight is rounded to the base format again, which loses much of a small
    update: one RequantizationWarning reports the largest error (instead of one per layer).
    """
    for _, layer in lora_layers(model):
        if isinstance(layer, LoraLinear):
            layer.requantization_error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequantizationWarning)
        merge(model, adapter_name)
    errors = {
        path: layer.requantization_error
        for path, layer in lora_layers(model)
        if isinstance(layer, LoraLinear) and layer.requantization_error is not None
    }
    if errors:
        worst = max(errors, key=errors.__getitem__)
        warnings.warn(
            f"merged into a quantized base by requantizing {len(errors)} layers: relative error up to "
            f"{errors[worst]:.2e} ({worst}); merge_and_dequantize writes an exact bf16/fp16/fp32 merge",
            RequantizationWarning,
            stacklevel=2,
        )
    return errors


# memory ------------------------------------------------------------------------------------


def linear_weight_bytes(model: nn.Module, include_head: bool = False) -> tuple[int, int]:
    """(bytes the base linear weights occupy now, bytes they take in fp32); adapters not counted."""
    head = None if include_head else output_head(model)
    stored = fp32 = 0
    for _, module in base_modules(model):
        base = module._base_shell[0] if isinstance(module, LoraLayer) else module
        if base is head or not isinstance(module, (nn.Linear, LoraLinear)):
            continue
        stored += qweights.storage_bytes(module.weight)
        fp32 += 4 * module.in_features * module.out_features
    return stored, fp32


@dataclass
class MemoryReport:
    """Where the bytes of a (Q)LoRA training run go."""

    base_bytes: int
    """Frozen base model: parameters and buffers, quantized ones at their packed size."""
    adapter_bytes: int
    """Trainable parameters (the adapters)."""
    optimizer_bytes: int
    """Optimizer state tensors (AdamW: two per trainable parameter)."""
    peak_bytes: int
    """Peak memory of the device: CUDA's max allocated, or the process's peak RSS on CPU."""
    quantized: str | None = None
    """'nf4', 'int8' or None."""

    def as_dict(self) -> dict[str, int | str | None]:
        return {
            "mem_base_bytes": self.base_bytes,
            "mem_adapter_bytes": self.adapter_bytes,
            "mem_optimizer_bytes": self.optimizer_bytes,
            "mem_peak_bytes": self.peak_bytes,
            "mem_base_format": self.quantized or "full",
        }

    def __str__(self) -> str:
        def mb(n: int) -> str:
            return f"{n / 2**20:,.1f} MiB"

        base = f"base {mb(self.base_bytes)}" + (f" ({self.quantized})" if self.quantized else "")
        return (
            f"memory: {base} | adapter {mb(self.adapter_bytes)} | optimizer {mb(self.optimizer_bytes)} "
            f"| peak {mb(self.peak_bytes)}"
        )


def peak_memory_bytes(device: str | torch.device | None = None) -> int:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Count base, adapter and optimizer bytes of `model` (and `optimizer`), plus the device's peak."""
    seen: set[int] = set()
    base = adapter = 0
    kinds: set[str] = set()
    device = None
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        device = device or param.device
        kind = qweights.kind_of(param)
        if kind:
            kinds.add(kind)
        size = qweights.storage_bytes(param)
        if param.requires_grad:
            adapter += size
        else:
            base += size
    for buffer in model.buffers():
        if id(buffer) not in seen:
            seen.add(id(buffer))
            base += buffer.numel() * buffer.element_size()
    state_bytes = 0
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    state_bytes += value.numel() * value.element_size()
    return MemoryReport(
        base, adapter, state_bytes, peak_memory_bytes(device), ",".join(sorted(kinds)) or None
    )
