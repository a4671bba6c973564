"""Loading a model shard by shard under FSDP2, so the largest model is not the one that fits a process.

Under `--strategy fsdp` the model is built on the meta device (no memory), the adapter is
attached there, FSDP2 shards it, and only then does each process allocate and read its own
rows of every weight, tensor by tensor, from the checkpoint's safetensors files. Host and
device memory per process then scale with 1 / world size, apart from one tensor's rows at a
time.

The adapter starts exactly where a single process's would: its initial values are drawn in
the same order, from the same seed, on the same device type (`initial_adapter`), and each
process keeps its rows. A resumed run reads them from the checkpoint (`checkpoint_adapter`).

A 4-bit base (`--quantize nf4`) is loaded the same way: each process quantizes its own rows
of every linear weight and keeps only their codes (`sharded_quant` says how the split keeps
4-bit blocks whole and the result bit-identical to one process).

What this path does not cover falls back to loading the whole model on every process, and
`unsupported` says why: an int8 base, adapters other than plain LoRA on linear layers, a
4-bit layer without an adapter, or a checkpoint whose tensor names differ from the model's
parameter names (transformers renames some older layouts while loading).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.files import PREFIX as PEFT_PREFIX
from lorakit.adapters.files import AdapterFiles
from lorakit.adapters.layers import LoraLinear
from lorakit.adapters.state import get_state
from lorakit.base.models import resolve_model
from lorakit.base.quant import (
    SafetensorsRows,
    check_available,
    large_blocks_returned,
    meta_buffers,
    rebuild_buffers,
)
from lorakit.train import sharded_quant
from lorakit.train.distributed import DistEnv


def choose(name_or_path: str | None, env: DistEnv, config: LoraConfig, quantize: str | None) -> tuple[str | None, str]:
    """(the model directory to read shard by shard, or None; why) for a run in `env`."""
    if not (env.enabled and env.strategy == "fsdp"):
        return None, "not sharded"
    source = resolve_model(name_or_path)
    reason = unsupported(source, config, quantize)
    if reason is not None:
        return None, f"loading the whole model in every process: {reason}"
    if quantize is not None:
        return source, (f"built on the meta device; each process reads only its own rows of every weight "
                        f"and quantizes them ({quantize}) itself")
    return source, "built on the meta device; each process reads only its own rows of every weight"


def unsupported(source: str, config: LoraConfig, quantize: str | None) -> str | None:
    """Why the shard-by-shard load cannot serve this run (None: it can)."""
    if quantize is not None and (reason := sharded_quant.refused(quantize)):
        return reason
    if config.use_dora or config.modules_to_save or config.init != "default":
        return "only plain LoRA adapters (no DoRA, modules_to_save or special init) are built shard by shard"
    if not sorted(Path(source).glob("*.safetensors")):
        return f"{source} has no .safetensors files"
    if quantize is not None:
        return sharded_quant.unsupported_layers(_meta_model(source, torch.float32), config)
    return None


def _meta_model(source: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_meta(source: str, dtype: torch.dtype, quantize: str | None = None) -> tuple[nn.Module, Any]:
    """The model on the meta device (no weights read) and its tokenizer.

    With `quantize` ("nf4") its linear layers are 4-bit layers waiting for their packed codes
    (`sharded_quant.pack`), computing in `dtype`, as `load_quantized` would build them.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _meta_model(source, dtype)
    model.requires_grad_(False)
    missing = [n for n, _ in model.named_parameters() if n not in checkpoint_names(source)]
    if missing:
        raise ValueError(
            f"{source}: the checkpoint's tensor names differ from the model's (no {missing[0]!r}); "
            "use --strategy ddp, or save the model again with save_pretrained"
        )
    if quantize is not None:
        sharded_quant.pack(model, dtype)
    model.eval()
    return model, tokenizer


def checkpoint_names(source: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (headers only)."""
    found: dict[str, Path] = {}
    for file in sorted(Path(source).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                found[key] = file
    return found


class _ShapeOnly(nn.Module):
    """A stand-in base layer: the shape, dtype and device of a linear layer, no weight values."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(0, dtype=dtype, device=device), requires_grad=False)
        self.bias = None


def initial_adapter(model: nn.Module, config: LoraConfig, seed: int, device: torch.device,
                    dtype: torch.dtype, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's initial values, whole, keyed by parameter name, as one process would draw them.

    A single process seeds and then adds the adapter layer by layer; `LoraLinear.add` draws
    from the CPU's generator whatever the device (`layers.init_on_cpu`). The same calls on
    shape-only layers, in the same order, give the same values without any base weight.
    """
    torch.manual_seed(seed)
    values: dict[str, torch.Tensor] = {}
    for path in get_state(model).targets[name]:
        layer = model.get_submodule(path)
        stub = LoraLinear(_ShapeOnly(layer.in_features, layer.out_features, dtype, device))
        stub.add(name, r=config.rank_for(path), alpha=config.alpha_for(path), dropout=config.dropout,
                 use_rslora=config.use_rslora, use_dora=False)
        values[f"{path}.lora_A.{name}.weight"] = stub.lora_A[name].weight.detach()
        values[f"{path}.lora_B.{name}.weight"] = stub.lora_B[name].weight.detach()
    return values


def checkpoint_adapter(files: AdapterFiles, name: str = "default") -> dict[str, torch.Tensor]:
    """A saved LoRA adapter's tensors keyed by this model's parameter names."""
    values = {}
    for key, tensor in files.tensors.items():
        path, _, leaf = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight"):
            raise ValueError(f"{files.directory}: tensor {key!r} is not a plain LoRA A or B matrix")
        values[f"{path}.lora_{leaf[0]}.{name}.weight"] = tensor
    return values


def _rows(param: torch.Tensor, env: DistEnv) -> tuple[int, int]:
    """This process's rows [start, stop) of a parameter sharded on dim 0 (torch.chunk's split)."""
    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    if tuple(param.placements) != (Shard(0),):
        raise ValueError(f"expected a parameter sharded on dim 0, got placements {param.placements}")
    total = param.shape[0]
    per_rank = math.ceil(total / env.world_size)
    start = min(total, env.rank * per_rank)
    stop = min(total, start + per_rank)
    local = param.to_local()
    if local.shape[0] != stop - start:
        raise ValueError(f"this process holds {local.shape[0]} rows of a {total}-row parameter, expected {stop - start}")
    return start, stop


@torch.no_grad()
def materialize(model: nn.Module, source: str, env: DistEnv, device: torch.device,
                adapter: dict[str, torch.Tensor]) -> int:
    """Allocate this process's shards of `model` (sharded on meta) and fill them.

    Base weights are read from the checkpoint a tensor at a time, each as this process's
    rows only; a packed 4-bit weight is quantized from them here (`sharded_quant.fill`).
    Adapter weights come from `adapter` (whole tensors, this process keeps its rows). Buffers
    computed at construction (rotary frequencies) are rebuilt. Returns the number of values
    this process holds (of a 4-bit weight: its packed bytes).
    """
    names = checkpoint_names(source)
    packed = sharded_quant.packed_layers(model)
    if packed:
        check_available("nf4", device)
    buffers = meta_buffers(model)  # computed at construction, in no checkpoint: built again below
    model.to_empty(device=device)
    held = 0
    # Plain reads of this process's rows: a memory-mapped checkpoint would count every page it
    # touched as this process's memory while the file is open.
    readers: dict[Path, SafetensorsRows] = {}
    with large_blocks_returned():  # each tensor's rows go back to the OS once copied or quantized
        try:
            for name, param in model.named_parameters():
                start, stop = _rows(param, env)
                local = param.to_local() if isinstance(param, DTensor) else param
                if name in adapter:
                    rows = adapter[name][start:stop] if local.dim() else adapter[name]
                elif name in names:
                    file = names[name]
                    if file not in readers:
                        readers[file] = SafetensorsRows(file)
                    if name in packed:  # read and quantized a chunk of its rows at a time
                        read = functools.partial(readers[file].rows, name)
                        held += sharded_quant.fill(packed[name], local, read, (start, stop), env)
                        continue
                    rows = readers[file].rows(name, start, stop)
                else:
                    raise ValueError(f"{source}: the checkpoint has no tensor {name!r}")
                local.copy_(rows.to(device=device, dtype=local.dtype))
                held += local.numel()
        finally:
            for reader in readers.values():
                reader.close()
    rebuild_buffers(buffers, getattr(model, "config", None), device, "pass --quantize or use --strategy ddp")
    return held
