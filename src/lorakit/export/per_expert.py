"""`lorakit convert --to per-expert`: an adapter on fused experts, written for experts stored one
by one, as the model's checkpoints on the Hub store them.

transformers 5 fuses a mixture of experts into 3-D parameters, and lorakit (like PEFT's
`target_parameters`) gives each expert e its own factors inside them. The checkpoints of Qwen3-MoE,
Qwen2-MoE, OLMoE, DeepSeek-V3 and Mixtral on the Hub, and the servers that load those checkpoints
expert by expert, name each expert's projections as linear layers of their own:

    model.layers.L.mlp.experts.{e}.gate_proj / up_proj / down_proj              (most families)
    model.layers.L.block_sparse_moe.experts.{e}.w1 / w3 / w2                    (Mixtral)

This writes every expert's factors under those names, exactly: a fused gate/up parameter
W = [gate; up] with update B[e] @ A[e] becomes gate's (A[e], B[e][:I]) and up's (A[e], B[e][I:]),
one rank-r pair each with the same scaling; down keeps (A[e], B[e]). Every other tensor of the
adapter is copied as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LAYOUTS = {
    "qwen3_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "qwen2_moe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "deepseek_v3": ("mlp.experts", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe.experts", "w1", "w3", "w2"),
}
"""model_type -> (the experts' module path in the layer, gate, up and down projection names)."""


def convert_to_per_expert(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                          overwrite: bool = False) -> tuple[Path, int]:
    """Write the adapter at `adapter_dir` in the per-expert layout to `output`; returns (the
    output directory, the number of experts' modules written). The output follows
    `lorakit.adapters.outputs`, as every convert does."""
    from lorakit.adapters.experts import LoraExperts, file_prefixes
    from lorakit.adapters.files import PREFIX, load_adapter, read_adapter, write_adapter
    from lorakit.adapters.inject import lora_layers
    from lorakit.adapters.outputs import claim, input_paths
    from lorakit.base.models import DEFAULT_HUB_ID, DEFAULT_MODEL_NAME, cache_dir, load_model
    from lorakit.export.convert import copy_side_files

    files = read_adapter(adapter_dir)
    config = files.config
    if not config.target_parameters:
        raise ValueError(f"{adapter_dir} adapts no fused expert parameters (target_parameters is empty); "
                         "--to per-expert splits expert adapters, and this one is already per module")
    base = model or config.base_model_name_or_path
    source = None if base in (None, DEFAULT_HUB_ID) else base
    inputs = input_paths(("the adapter's directory", adapter_dir),
                         ("the base model's directory", source or cache_dir() / DEFAULT_MODEL_NAME))
    net, _ = load_model(source, dtype=torch.float32, device="cpu")
    kind = getattr(net.config, "model_type", None)
    if kind not in LAYOUTS:
        raise ValueError(f"--to per-expert knows the per-expert names of {', '.join(sorted(LAYOUTS))}; this base "
                         f"is {kind!r}, whose experts have no per-expert layout lorakit knows")
    fused_path, gate, up, down = LAYOUTS[kind]
    target = claim(output, "convert", overwrite=overwrite, inputs=inputs)
    name = load_adapter(net, files)
    tensors = dict(files.tensors)
    written = 0
    with torch.no_grad():
        for path, layer in lora_layers(net):
            if not isinstance(layer, LoraExperts) or name not in layer.targets:
                continue
            experts_module = layer.experts_module
            if not getattr(experts_module, "is_concatenated", True):
                raise ValueError(f"{path}: its gate and up projections are interleaved in one parameter (gpt-oss's "
                                 "layout), which has no per-expert form on the Hub; serve the fused adapter instead")
            if not path.endswith(".mlp.experts"):
                raise ValueError(f"{path}: expected the experts at <layer>.mlp.experts, as transformers builds {kind}")
            out_prefix = f"{PREFIX}{path[: -len('mlp.experts')]}{fused_path}"
            for param, prefix in file_prefixes(path, layer.targets[name], layer.expert_params).items():
                tensors.pop(f"{PREFIX}{prefix}.lora_A.weight")
                tensors.pop(f"{PREFIX}{prefix}.lora_B.weight")
                r, experts = layer.r[name], layer.num_experts
                in_f, out_f = layer.in_out(param)
                a_all = layer.lora_A[name][param].detach().float().view(experts, r, in_f)
                b_all = layer.lora_B[name][param].detach().float().view(out_f, r, experts)
                for e in range(experts):
                    a, b = a_all[e].contiguous(), b_all[:, :, e].contiguous()  # (r, in), (out, r)
                    if param == "gate_up_proj" and getattr(experts_module, "has_gate", True):
                        half = out_f // 2
                        parts = {gate: b[:half], up: b[half:]}
                    else:
                        parts = {down if param == "down_proj" else up: b}
                    for projection, b_part in parts.items():
                        key = f"{out_prefix}.{e}.{projection}"
                        tensors[f"{key}.lora_A.weight"] = a.clone()
                        tensors[f"{key}.lora_B.weight"] = b_part.clone()
                        written += 1
    raw = dict(files.raw_config)
    modules = raw.get("target_modules")
    extra = [gate, up, down]
    if isinstance(modules, list):
        raw["target_modules"] = sorted(set(modules) | set(extra))
    elif isinstance(modules, str):
        raw["target_modules"] = f"(?:{modules})|(?:.*\\.experts\\.\\d+\\.(?:{'|'.join(extra)}))"
    else:
        raw["target_modules"] = extra
    raw["target_parameters"] = None
    with target.staged() as staging:
        write_adapter(staging, tensors, raw)
        copy_side_files(adapter_dir, staging)
    return target.path, written

