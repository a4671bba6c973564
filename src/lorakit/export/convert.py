"""`lorakit convert ADAPTER --to plain-lora`: an adapter every target accepts.

Plain LoRA here means one rank and one alpha for every module, no DoRA, no modules_to_save.

- Per-module ranks and alphas are folded exactly: B is rescaled to the common scaling and A and B
  are padded with zero rows / columns up to the common rank (a module whose rank is above it
  goes through the SVD below instead).
- DoRA layers and linear modules_to_save become LoRA through a truncated SVD of their weight
  change, W' - W: the best rank-R approximation in the Frobenius norm (Eckart-Young).

Every module's relative error ||dW' - dW||_F / ||dW||_F is reported, and the greedy tokens of the
converted adapter are compared with the original's on a few prompts. Above `max_error` the
conversion is refused and nothing is written.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Dear customer, thank you for",
                   "call w/ Dana Reyes (Acme): wants 40 seats, follow up Fri")


@dataclass
class Conversion:
    output: Path
    rank: int
    alpha: float
    errors: dict[str, float]
    """Module path -> relative Frobenius error of its weight change (0 where the fold is exact)."""
    agreement: float
    """Fraction of greedy tokens the converted adapter shares with the original on the prompts."""


def _weight_change(model: nn.Module, path: str, name: str) -> torch.Tensor:
    """W' - W of a LoRA layer, (out, in) in fp32, whatever it is (LoRA, DoRA)."""
    from lorakit.adapters.layers import LoraLinear

    layer = model.get_submodule(path)
    assert isinstance(layer, LoraLinear)
    delta = layer.delta_oi(name)
    if not layer.use_dora[name]:
        return delta
    weight = layer.base_weight_oi().float()
    norm = torch.linalg.norm(weight + delta, dim=1, keepdim=True)
    magnitude = layer.lora_magnitude_vector[name].float().view(-1, 1)
    return magnitude * (weight + delta) / norm - weight


NEGLIGIBLE = 1e-5
"""A weight change smaller than this share of the weight (Frobenius norms) counts as none: the
relative error of its approximation is taken against this floor instead. Such a change is far
below what a 16-bit base can hold (its rounding is about 4e-3 of a weight); a fresh DoRA
adapter's change, for one, is float32 rounding noise, which no low-rank factor reproduces."""


def _factor(delta: torch.Tensor, rank: int, scaling: float, weight: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A (rank, in), B (out, rank)) with scaling * B A the best rank-`rank` approximation of delta,
    and its relative error (against `NEGLIGIBLE` of `weight`'s norm where the change is smaller)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = (u[:, :k] * root) / scaling
    approx = (b @ a) * scaling
    floor = NEGLIGIBLE * float(torch.linalg.norm(weight.double())) if weight is not None else 0.0
    error = float(torch.linalg.norm(approx - delta.double()) / max(float(torch.linalg.norm(delta.double())), floor, 1e-30))
    return a.float(), b.float(), error


def convert_to_plain(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                     rank: int | None = None, max_error: float = 0.05,
                     prompts: tuple[str, ...] = DEFAULT_PROMPTS, new_tokens: int = 16,
                     overwrite: bool = False) -> Conversion:
    """Convert, measure, and write the plain adapter (only when every error is within `max_error`).

    The output follows `lorakit.adapters.outputs`: an existing directory is replaced only when an
    earlier convert wrote it or `overwrite` is given, and then only the files convert writes."""
    from lorakit.adapters.embedding import LoraEmbedding
    from lorakit.adapters.files import (
        PREFIX,
        adapter_config_dict,
        load_adapter,
        read_adapter,
        write_adapter,
    )
    from lorakit.adapters.outputs import claim, input_paths
    from lorakit.adapters.saved import ModulesToSave
    from lorakit.adapters.state import get_state
    from lorakit.base.models import DEFAULT_HUB_ID, DEFAULT_MODEL_NAME, cache_dir, load_model

    if rank is not None and rank <= 0:
        raise ValueError(f"--rank must be a positive integer, got {rank}")
    if not max_error >= 0:
        raise ValueError(f"--max-error must be >= 0, got {max_error}")
    files = read_adapter(adapter_dir)
    config = files.config
    if config.target_parameters:
        raise ValueError(
            f"{adapter_dir} adapts fused expert parameters ({', '.join(config.target_parameters)}); --to plain-lora "
            "rewrites LoRA on linear layers. `lorakit convert --to per-expert` writes the experts one by one, as "
            "the model's checkpoints name them; or serve it with lorakit serve, load it with PEFT, or merge it"
        )
    base = model or config.base_model_name_or_path
    source = None if base in (None, DEFAULT_HUB_ID) else base
    inputs = input_paths(("the adapter's directory", adapter_dir),
                         ("the base model's directory", source or cache_dir() / DEFAULT_MODEL_NAME))
    target = claim(output, "convert", overwrite=overwrite, inputs=inputs)
    net, tokenizer = load_model(source, dtype=torch.float32, device="cpu")
    name = load_adapter(net, files)
    paths = get_state(net).targets[name]
    ranks = {p: config.rank_for(p) for p in paths}
    target_rank = rank or max(ranks.values())
    alpha = float(config.alpha) * target_rank / config.r
    scaling = alpha / (target_rank**0.5 if config.use_rslora else target_rank)

    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    with torch.no_grad():
        for path in paths:
            layer = net.get_submodule(path)
            key = PREFIX + path
            if isinstance(layer, LoraEmbedding):
                a_old, b_old = layer.lora_embedding_A[name].float(), layer.lora_embedding_B[name].float()
                if ranks[path] > target_rank:
                    raise ValueError(f"{path}: an embedding LoRA of rank {ranks[path]} does not fold into rank {target_rank}")
                factor = layer.scaling[name] / scaling
                a = torch.zeros(target_rank, a_old.shape[1])
                b = torch.zeros(b_old.shape[0], target_rank)
                a[: ranks[path]], b[:, : ranks[path]] = a_old, b_old * factor
                tensors[key + ".lora_embedding_A"], tensors[key + ".lora_embedding_B"] = a, b
                errors[path] = 0.0
                continue
            if not layer.use_dora[name] and ranks[path] <= target_rank:
                # Exact: rescale B to the common scaling, pad with zeros up to the common rank.
                a_old, b_old = layer.lora_A[name].weight.float(), layer.lora_B[name].weight.float()
                a = torch.zeros(target_rank, a_old.shape[1])
                b = torch.zeros(b_old.shape[0], target_rank)
                a[: ranks[path]] = a_old
                b[:, : ranks[path]] = b_old * (layer.scaling[name] / scaling)
                errors[path] = 0.0
            else:
                a, b, errors[path] = _factor(_weight_change(net, path, name), target_rank, scaling,
                                             layer.base_weight_oi().float())
            tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = a, b
        extra_targets = []
        for path, module in net.named_modules():
            if not isinstance(module, ModulesToSave) or name not in module.modules_to_save:
                continue
            trained, original = module.modules_to_save[name], module.original
            if not isinstance(original, nn.Linear) or getattr(original, "bias", None) is not None and not torch.equal(
                    trained.bias, original.bias):
                raise ValueError(f"modules_to_save {path!r} is a {type(original).__name__}; only linear layers "
                                 "without a trained bias convert to LoRA")
            delta = trained.weight.float() - original.weight.float()
            a, b, errors[path] = _factor(delta, target_rank, scaling, original.weight.float())
            tensors[PREFIX + path + ".lora_A.weight"], tensors[PREFIX + path + ".lora_B.weight"] = a, b
            extra_targets.append(path.rsplit(".", 1)[-1])

    raw = adapter_config_dict(net, name)
    raw.update(r=target_rank, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}, use_dora=False,
               modules_to_save=None, init_lora_weights=True)
    if extra_targets and isinstance(raw["target_modules"], list):
        raw["target_modules"] = sorted(set(raw["target_modules"]) | set(extra_targets))
    elif extra_targets:
        raw["target_modules"] = f"(?:{raw['target_modules']})|(?:.*\\.(?:{'|'.join(extra_targets)}))"

    worst = max(errors, key=errors.get) if errors else None
    if worst is not None and errors[worst] > max_error:
        raise ValueError(f"converting to rank {target_rank} loses too much: {worst} has relative error "
                         f"{errors[worst]:.4f} > --max-error {max_error:g}; raise --rank or --max-error")
    with target.staged() as staging:
        write_adapter(staging, tensors, raw)
        copy_side_files(adapter_dir, staging)
        fresh, _ = load_model(source, dtype=torch.float32, device="cpu")
        load_adapter(fresh, staging)
        agreement = _agreement(net, fresh, tokenizer, prompts, new_tokens)
    return Conversion(target.path, target_rank, alpha, errors, agreement)


def _agreement(original: nn.Module, converted: nn.Module, tokenizer: Any, prompts: tuple[str, ...],
               new_tokens: int) -> float:
    """Fraction of greedy tokens (position by position) the converted adapter shares with the original."""
    same = total = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        outs = []
        for model in (original, converted):
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            outs.append(out[0, ids.shape[1]:])
        same += int((outs[0] == outs[1]).sum())
        total += outs[0].numel()
    return same / max(total, 1)


def copy_side_files(adapter_dir: str | os.PathLike, staging: Path) -> None:
    """The tokenizer and chat template saved beside an adapter travel with its conversion."""
    for item in Path(adapter_dir).iterdir():
        if item.is_file() and item.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy2(item, staging / item.name)


def convert_command(adapter: str | os.PathLike) -> str:
    """How to get a plain LoRA adapter out of a DoRA one (the words a refusal points to)."""
    name = str(adapter).rstrip("/")
    return (f"convert it to plain LoRA: lorakit convert {name} --to plain-lora --output {name}-plain "
            "(DoRA goes through an SVD; convert refuses when a module's relative error is above "
            "--max-error, 0.05 by default: raise --rank or --max-error then)")
