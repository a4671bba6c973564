"""`lorakit export --format gguf-lora`: a LoRA adapter as llama.cpp loads it (`--lora FILE`).

Written with the `gguf` library, the names and metadata llama.cpp's own
`convert_lora_to_gguf.py` writes:

    general.architecture = "llama"   general.type = "adapter"
    adapter.type = "lora"            adapter.lora.alpha = alpha (float32)
    blk.N.attn_q.weight.lora_a  (r, in)     blk.N.attn_q.weight.lora_b  (out, r)
    token_embd.weight.lora_a    (vocab, r)  token_embd.weight.lora_b    (dim, r)

(numpy shapes; GGUF stores dimensions the other way round). llama.cpp scales each tensor pair
by alpha / r, with r read from that pair's shape, so per-module ranks carry over as they are;
per-module alphas and rsLoRA's alpha / sqrt(r) are folded into B, so every module keeps the
scale it was trained with. Q and K projections are permuted the way llama.cpp's converter
permutes the base weights (its rotary embedding pairs dimensions differently from transformers).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapters.outputs import Output, claim, input_paths

SUPPORTED_ARCHS = ("llama", "mistral")
"""transformers model types whose tensors map onto llama.cpp's "llama" architecture."""
LORA_DTYPES = ("f32", "f16")


def base_config(adapter_config: dict, model: str | None) -> Any:
    """The transformers config of the adapter's base model (`model` overrides the recorded one)."""
    from transformers import AutoConfig

    from lorakit.base.models import DEFAULT_HUB_ID, resolve_model

    name = model or adapter_config.get("base_model_name_or_path")
    if not name:
        raise ValueError("the adapter does not record its base model; pass --model")
    source = resolve_model(None if name == DEFAULT_HUB_ID else name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise OSError(f"cannot read the base model's config from {name!r} ({str(err).splitlines()[0]}); pass --model") from None
    if config.model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF export supports the llama architecture ({', '.join(SUPPORTED_ARCHS)}); "
                         f"the base model {name!r} is {config.model_type!r}")
    return config


def tensor_namer(config: Any) -> Callable[[str], str]:
    """transformers module path -> llama.cpp tensor name (without `.weight`)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)

    def name(path: str) -> str:
        found = names.get_name(path + ".weight", try_suffixes=(".weight",))
        if found is None:
            raise ValueError(f"module {path!r} has no llama.cpp tensor name (llama architecture)")
        return found[: -len(".weight")]

    return name


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order: within each head, the two rotary halves are interleaved."""
    out = weight.shape[0]
    return weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def row_permutation(path: str, config: Any) -> int | None:
    """The head count to permute a module's output rows by (Q and K), or None."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        return config.num_attention_heads
    if leaf == "k_proj":
        return config.num_key_value_heads or config.num_attention_heads
    return None


OUTPUT_KEY = "lorakit.export"
"""GGUF metadata key holding the --format of the export that wrote the file, so that a later
export recognises its own output (and replaces it without --overwrite)."""


def written_by(path: Path) -> str | None:
    """The --format of the lorakit export that wrote the GGUF file `path`, or None."""
    import gguf

    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                return None
        field = gguf.GGUFReader(path).get_field(OUTPUT_KEY)
        return str(field.contents()) if field is not None else None
    except Exception:  # anything unreadable is not an output of ours
        return None


def base_source(adapter_config: dict, model: str | None) -> str:
    """The base model a from_pretrained call reads (a local directory where there is one)."""
    from lorakit.base.models import DEFAULT_HUB_ID, resolve_model

    name = model or adapter_config.get("base_model_name_or_path")
    return resolve_model(None if name in (None, DEFAULT_HUB_ID) else name)


def claim_export(output: str | os.PathLike, fmt: str, adapter_dir: str | os.PathLike, adapter_config: dict,
                 model: str | None, overwrite: bool) -> Output:
    """Check an export's output (`lorakit.adapters.outputs`): a file for gguf-lora and gguf, a
    directory for ollama; never the adapter, the base model or a file of theirs."""
    inputs = input_paths(("the adapter's directory", adapter_dir),
                         ("the base model's directory", base_source(adapter_config, model)))
    return claim(output, f"export --format {fmt}", overwrite=overwrite, inputs=inputs, directory=fmt == "ollama",
                 ours=lambda path: written_by(path) == fmt)


def lora_tensors(adapter_dir: str | os.PathLike, config: Any) -> tuple[dict[str, np.ndarray], float]:
    """The adapter's tensors under llama.cpp's names, and the file's alpha."""
    from lorakit.adapters.files import PREFIX, read_adapter
    from lorakit.export.convert import convert_command

    files = read_adapter(adapter_dir)
    lora = files.config
    if lora.use_dora or lora.modules_to_save:
        feature = "DoRA" if lora.use_dora else f"modules_to_save ({', '.join(lora.modules_to_save or [])})"
        hint = f"; {convert_command(adapter_dir)}" if lora.use_dora else ""
        raise ValueError(f"{adapter_dir}: llama.cpp loads plain LoRA only; this adapter uses {feature} "
                         f"(lorakit check {adapter_dir} --target llama.cpp){hint}")
    name_of = tensor_namer(config)
    alpha = float(lora.alpha)
    if alpha == 0:
        raise ValueError(f"{adapter_dir}: lora_alpha is 0; llama.cpp reads alpha 0 as 'no scaling'")
    out: dict[str, np.ndarray] = {}
    for key, a in files.tensors.items():
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            if not key.endswith(a_suffix):
                continue
            path = key[len(PREFIX): -len(a_suffix)]
            b = files.tensors[key[: -len(a_suffix)] + b_suffix].float()
            a = a.float()
            r = a.shape[0]
            # llama.cpp applies alpha / r; the module was trained at scaling_for(path).
            b = b * (lora.scaling_for(path) / (alpha / r))
            heads = row_permutation(path, config)
            if heads is not None:
                b = permute_rows(b, heads)
            name = name_of(path)
            if name == "token_embd":
                a = a.T  # llama.cpp gathers rows of A by token id
                if getattr(config, "tie_word_embeddings", False):
                    raise ValueError(f"{adapter_dir}: embedding LoRA on a base with tied input/output embeddings "
                                     "would adapt the output layer too in llama.cpp; not exported")
            if name == "output" and getattr(config, "tie_word_embeddings", False):
                raise ValueError(f"{adapter_dir}: lm_head is tied to the token embeddings in this base; llama.cpp "
                                 "has no separate output tensor to adapt")
            out[f"{name}.weight.lora_a"] = a.contiguous().numpy()
            out[f"{name}.weight.lora_b"] = b.contiguous().numpy()
    if not out:
        raise ValueError(f"{adapter_dir}: no LoRA tensors to export")
    return out, alpha


def write_gguf_lora(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                    dtype: str = "f32", overwrite: bool = False) -> Path:
    """Write the adapter as a llama.cpp LoRA GGUF; returns the file's path. An existing file is
    replaced only when an earlier gguf-lora export wrote it, or with `overwrite`."""
    import gguf

    from lorakit.adapters.files import read_adapter

    if dtype not in LORA_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not accepted for gguf-lora; accepted: {', '.join(LORA_DTYPES)}")
    raw = read_adapter(adapter_dir).raw_config
    target = claim_export(output, "gguf-lora", adapter_dir, raw, model, overwrite)
    config = base_config(raw, model)
    tensors, alpha = lora_tensors(adapter_dir, config)
    numpy_dtype = np.float32 if dtype == "f32" else np.float16

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_string(OUTPUT_KEY, "gguf-lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name in sorted(tensors):
            writer.add_tensor(name, tensors[name].astype(numpy_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with target.staged() as tmp:
        write(str(tmp))
    return target.path
