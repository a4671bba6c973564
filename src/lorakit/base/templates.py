"""The tokenizer and chat template an adapter was trained with, saved beside it.

`lorakit train` writes the tokenizer files (`tokenizer_config.json`, `tokenizer.json`,
`chat_template.jinja`) into the adapter directory, so the template travels with the adapter:
`generate`, `serve`, `eval`, `merge` and `export` use it, and warn when the base model they
are given renders conversations differently.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"

END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
"""Special tokens that chat templates of common model families put at the end of a turn."""


def save_tokenizer(tokenizer: Any, directory: str | os.PathLike) -> list[Path]:
    """Write the tokenizer's files into `directory`, each renamed into place whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=directory))
    try:
        tokenizer.save_pretrained(staging)
        written = []
        for item in sorted(staging.iterdir()):
            os.replace(item, directory / item.name)
            written.append(directory / item.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def saved_chat_template(directory: str | os.PathLike) -> str | None:
    """The chat template saved in an adapter (or model) directory, or None when there is none."""
    directory = Path(directory)
    path = directory / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    config = directory / TOKENIZER_CONFIG
    if config.is_file():
        import json

        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        return template if isinstance(template, str) else None
    return None


def template_warning(tokenizer: Any, adapter_dir: str | os.PathLike) -> str | None:
    """A warning when the adapter's saved chat template differs from the base tokenizer's
    (None when they agree or the adapter saved none): the adapter learned its template's
    turn markers, and another one at serving time makes a model ramble or never stop."""
    template = saved_chat_template(adapter_dir)
    if template is None:
        return None
    base = getattr(tokenizer, "chat_template", None)
    where = Path(adapter_dir) / TEMPLATE_FILE
    if base is None:
        return f"the base model has no chat template; using the one saved with the adapter ({where})"
    if base.strip() != template.strip():
        return (
            f"the base model's chat template differs from the one the adapter was trained with; "
            f"using the adapter's ({where})"
        )
    return None


def use_adapter_template(tokenizer: Any, adapter_dir: str | os.PathLike) -> str | None:
    """Give `tokenizer` the chat template saved with the adapter, when there is one; returns
    `template_warning`'s warning."""
    warning = template_warning(tokenizer, adapter_dir)
    template = saved_chat_template(adapter_dir)
    if template is not None:
        tokenizer.chat_template = template
    return warning


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that end a turn: EOS, and known end-of-turn specials the chat template uses."""
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN_MARKERS:
        if marker in template and marker in vocab:
            ids.add(int(vocab[marker]))
    return ids


def end_of_turn_strings(template: str, tokenizer: Any | None = None) -> list[str]:
    """The end-of-turn markers a template uses (and EOS), as text, for stop parameters."""
    found = [m for m in END_OF_TURN_MARKERS if m in template]
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if isinstance(eos, str) and eos and eos not in found:
        found.append(eos)
    return found
