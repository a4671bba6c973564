"""`lorakit export --format gguf`: base model + adapter merged into one GGUF file (F16, BF16
or Q8_0), with the tokenizer and the adapter's chat template, for llama.cpp and Ollama.

Written with the `gguf` library (never by building llama.cpp), with the names and metadata of
llama.cpp's `convert_hf_to_gguf.py` for the llama architecture: norms stay F32; 2-D weights
take the chosen type (Q8_0 needs rows that are a multiple of 32 long; others fall back to F16,
as llama.cpp's converter does); Q and K rows are permuted into llama.cpp's rotary order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.export.gguf_lora import (
    OUTPUT_KEY,
    base_config,
    claim_export,
    permute_rows,
    row_permutation,
    tensor_namer,
)

MODEL_DTYPES = ("f16", "bf16", "q8_0")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"GGUF export writes default rotary embeddings; this base uses rope_type={rope_type!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _tensor(name: str, weight: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    data = weight.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), None


def _vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF types and the BPE merges, from a fast tokenizer's tokenizer.json."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_gguf_model(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                     dtype: str = "q8_0", tokenizer_pre: str | None = None, overwrite: bool = False) -> Path:
    """Merge the adapter into its base and write one GGUF file; returns its path. An existing file
    is replaced only when an earlier gguf export wrote it, or with `overwrite`."""
    from lorakit.adapters.files import read_adapter

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not accepted for gguf; accepted: {', '.join(MODEL_DTYPES)}")
    target = claim_export(output, "gguf", adapter_dir, read_adapter(adapter_dir).raw_config, model, overwrite)
    write = gguf_model_writer(adapter_dir, model, dtype, tokenizer_pre, "gguf")
    with target.staged() as tmp:
        write(str(tmp))
    return target.path


def gguf_model_writer(adapter_dir: str | os.PathLike, model: str | None, dtype: str, tokenizer_pre: str | None,
                      fmt: str) -> Callable[[str], None]:
    """Merge the adapter into its base (the slow part); returns the function that writes the GGUF
    file to a path, recording `fmt` as the export that wrote it."""
    import gguf

    from lorakit.adapters.files import load_adapter, read_adapter
    from lorakit.adapters.inject import merge_and_unload
    from lorakit.base.models import DEFAULT_HUB_ID, default_gguf_path, load_model
    from lorakit.base.templates import use_adapter_template

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not accepted for gguf; accepted: {', '.join(MODEL_DTYPES)}")
    files = read_adapter(adapter_dir)
    config = base_config(files.raw_config, model)
    base_name = model or files.raw_config.get("base_model_name_or_path")
    if tokenizer_pre is None:
        # The bundled base came from a GGUF file: keep its pre-tokenizer name; others get llama.cpp's default.
        tokenizer_pre = "default"
        if base_name == DEFAULT_HUB_ID:
            reader = gguf.GGUFReader(default_gguf_path())
            field = reader.get_field(gguf.Keys.Tokenizer.PRE)
            tokenizer_pre = field.contents() if field is not None else "default"
    merged, tokenizer = load_model(None if base_name == DEFAULT_HUB_ID else base_name, dtype=torch.float32, device="cpu")
    load_adapter(merged, files)
    use_adapter_template(tokenizer, adapter_dir)
    merged = merge_and_unload(merged)
    state = merged.state_dict()
    name_of = tensor_namer(config)
    theta = _rope_theta(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens, types, merges = _vocab(tokenizer, config.vocab_size)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_string(OUTPUT_KEY, fmt)
        writer.add_name(Path(adapter_dir).resolve().name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        writer.add_rope_freq_base(theta)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                              ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
            if token_id is not None:
                getattr(writer, f"add_{key}_token_id")(int(token_id))
        writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
        if tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)
        for key, weight in state.items():
            if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
                continue  # llama.cpp uses token_embd for the output when output.weight is absent
            path, _, param = key.rpartition(".")
            if param != "weight":
                raise ValueError(f"{key}: GGUF export of the llama architecture expects no bias tensors")
            heads = row_permutation(path, config)
            if heads is not None:
                weight = permute_rows(weight, heads)
            data, raw_dtype = _tensor(key, weight, dtype)
            writer.add_tensor(f"{name_of(path)}.weight", data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write
