"""`lorakit export --format ollama`: a merged GGUF and a `Modelfile` whose TEMPLATE and stop
parameters come from the chat template saved with the adapter.

Ollama's templates are Go templates, the adapter's is Jinja. Rather than translate Jinja, the
Jinja template is rendered on marker conversations, and the text around each marker gives the
pieces of a turn-by-turn template (`TurnPieces`):

    [default system block | system_prefix + SYSTEM + system_suffix]
    for each message: user_prefix + USER + user_suffix   (user_suffix opens the assistant turn)
                      ASSISTANT + assistant_suffix

A template that cannot be written this way (one whose text after a user turn depends on what
came before, say) is refused with the reason rather than approximated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.export.gguf_lora import claim_export

MARK = {"system": "\u2991SYSTEM\u2992", "u1": "\u2991USER1\u2992", "a1": "\u2991ASSISTANT1\u2992",
        "u2": "\u2991USER2\u2992"}


@dataclass
class TurnPieces:
    default_system: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_suffix: str


def _split(text: str, marks: list[str]) -> list[str]:
    """The text between consecutive markers: [before m0, m0..m1, ..., after the last]."""
    out = []
    for mark in marks:
        before, sep, text = text.partition(mark)
        if not sep:
            raise ValueError(f"the chat template does not render message {mark!r} verbatim")
        out.append(before)
    return [*out, text]


def _common_suffix(*texts: str) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - 1 - n] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


def turn_pieces(template: str, tokenizer: Any) -> TurnPieces:
    """The pieces of `template`, found by rendering it (see the module docstring)."""

    def render(messages: list[dict[str, str]]) -> str:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        # llama.cpp and Ollama add BOS themselves when the model asks for it.
        return text[len(bos):] if bos and getattr(tokenizer, "add_bos_token", False) and text.startswith(bos) else text

    conversation = [{"role": "user", "content": MARK["u1"]}, {"role": "assistant", "content": MARK["a1"]},
                    {"role": "user", "content": MARK["u2"]}]
    head, after_user, between, after_last = _split(render(conversation), [MARK["u1"], MARK["a1"], MARK["u2"]])
    if after_user != after_last:
        raise ValueError("the chat template closes a user turn differently depending on its position; "
                         "it cannot be written as an Ollama TEMPLATE")
    sys_head, sys_mid, sys_after = _split(render([{"role": "system", "content": MARK["system"]},
                                                  {"role": "user", "content": MARK["u1"]}]), [MARK["system"], MARK["u1"]])
    if sys_after != after_user:
        raise ValueError("the chat template closes a user turn differently after a system message; "
                         "it cannot be written as an Ollama TEMPLATE")
    user_prefix = _common_suffix(head, between, sys_mid)
    return TurnPieces(
        default_system=head[: len(head) - len(user_prefix)],
        system_prefix=sys_head,
        system_suffix=sys_mid[: len(sys_mid) - len(user_prefix)],
        user_prefix=user_prefix,
        user_suffix=after_user,
        assistant_suffix=between[: len(between) - len(user_prefix)],
    )


def go_template(p: TurnPieces) -> str:
    """Ollama's TEMPLATE text for the pieces. Plain `{{` actions only: Go's `{{-` would trim the
    newlines the pieces end with."""
    for piece in vars(p).values():
        if '"""' in piece or "{{" in piece:
            raise ValueError(f"the chat template's text {piece!r} cannot be quoted in a Modelfile")
    return (
        f"{{{{ if .System }}}}{p.system_prefix}{{{{ .System }}}}{p.system_suffix}"
        f"{{{{ else }}}}{p.default_system}{{{{ end }}}}"
        f"{{{{ range .Messages }}}}"
        f'{{{{ if eq .Role "user" }}}}{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}'
        f'{{{{ else if eq .Role "assistant" }}}}{{{{ .Content }}}}{p.assistant_suffix}'
        f"{{{{ end }}}}{{{{ end }}}}"
    )


def modelfile(template: str, tokenizer: Any, gguf_name: str) -> str:
    from lorakit.base.templates import end_of_turn_strings

    pieces = turn_pieces(template, tokenizer)
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(pieces)}"""']
    lines += [f'PARAMETER stop "{s}"' for s in end_of_turn_strings(template, tokenizer)]
    return "\n".join(lines) + "\n"


def write_ollama(adapter_dir: str | os.PathLike, output: str | os.PathLike, model: str | None = None,
                 dtype: str = "q8_0", overwrite: bool = False) -> Path:
    """Write OUTPUT/model.gguf (merged) and OUTPUT/Modelfile; returns OUTPUT. Both are written into
    a temporary directory first and renamed into place together; an existing directory is used
    only when an earlier ollama export wrote it, or with `overwrite` (then only those two files
    are replaced)."""
    from transformers import AutoTokenizer

    from lorakit.adapters.files import read_adapter
    from lorakit.base.models import DEFAULT_HUB_ID, resolve_model
    from lorakit.base.templates import use_adapter_template
    from lorakit.export.gguf_model import MODEL_DTYPES, gguf_model_writer

    if dtype not in MODEL_DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not accepted for ollama; accepted: {', '.join(MODEL_DTYPES)}")
    raw = read_adapter(adapter_dir).raw_config
    target = claim_export(output, "ollama", adapter_dir, raw, model, overwrite)
    base = model or raw.get("base_model_name_or_path")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None if base == DEFAULT_HUB_ID else base))
    use_adapter_template(tokenizer, adapter_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{adapter_dir}: neither the adapter nor the base model has a chat template; "
                         "an Ollama Modelfile needs one")
    text = modelfile(tokenizer.chat_template, tokenizer, "model.gguf")  # refuses before the slow part
    write = gguf_model_writer(adapter_dir, model, dtype, None, "ollama")
    with target.staged() as staging:
        write(str(staging / "model.gguf"))
        (staging / "Modelfile").write_text(text)
    return target.path
