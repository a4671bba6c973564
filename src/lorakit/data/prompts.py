"""Prompt rows for reinforcement learning: what the model answers, and what its answers are scored with.

A row is one of

    {"prompt": "...", ...}                      the prompt as plain text
    {"messages": [..., {"role": "user", ...}], ...}
                                                a conversation ending with a user turn, rendered
                                                by the chat template with the generation prompt

Every other column travels with the prompt to the reward functions (TRL's convention). The
reference answer the built-in rewards compare with is the `reference` column, else the row's
`completion` (prompt/completion rows), else a trailing assistant turn of `messages` (which the
prompt then stops before): SFT data with answers is GRPO data as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.base.templates import TemplateError, encode_chat, encode_text, render_chat
from lorakit.data.files import DataError, Row, read_rows
from lorakit.data.sft import check_field_length

PROMPT_KEYS = ("prompt", "messages")
"""The columns that make the prompt; every other column is passed to the reward functions."""


@dataclass
class PromptRow:
    """A prompt as the model sees it, as the reward functions see it, and the row's other columns."""

    ids: list[int]
    prompt: Any
    """The prompt as TRL's reward functions receive it: the text, or the list of messages."""
    conversational: bool
    reference: str | None
    columns: dict[str, Any] = field(default_factory=dict)


def _messages(row: Row) -> list[dict[str, str]]:
    messages = row.data["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{row.location()}: 'messages' must be a non-empty list of {{'role', 'content'}}, got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.location()}: messages[{i}] must have a string 'role' and a string 'content', got {m!r:.80}")
        check_field_length(row, f"messages[{i}].content", m["content"])
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_row(row: Row, tokenizer: Any, special_tokens_in_content: bool = False) -> PromptRow:
    """One row as a prompt; a DataError names the row and says what a prompt row holds."""
    data = row.data
    if not isinstance(data, dict) or not any(data.get(k) is not None for k in PROMPT_KEYS):
        raise DataError(f"{row.location()}: a prompt row needs 'prompt' (text) or 'messages' (ending with a "
                        f"user turn), got {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    columns = {k: v for k, v in data.items() if k not in PROMPT_KEYS}
    reference = data.get("reference", data.get("completion"))
    if data.get("messages") is not None:
        messages = _messages(row)
        if messages[-1]["role"] == "assistant":  # SFT data: the answer is the reference
            reference = messages[-1]["content"] if reference is None else reference
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{row.location()}: 'messages' must end with a user turn (or a user turn and its "
                            f"answer), got roles {', '.join(m['role'] for m in row.data['messages'])}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise DataError(f"{row.location()}: a 'messages' row needs a tokenizer with a chat template; this one has none")
        try:
            chat = render_chat(tokenizer, messages, add_generation_prompt=True)
            ids = encode_chat(tokenizer, chat, special_tokens_in_content=special_tokens_in_content).ids
        except TemplateError as err:
            raise DataError(f"{row.location()}: {err}") from None
        prompt, conversational = messages, True
    else:
        if not isinstance(data["prompt"], str):
            raise DataError(f"{row.location()}: 'prompt' must be a string, got {type(data['prompt']).__name__}")
        check_field_length(row, "prompt", data["prompt"])
        ids = encode_text(tokenizer, data["prompt"], add_special_tokens=True,
                          special_tokens_in_content=special_tokens_in_content).ids
        prompt, conversational = data["prompt"], False
    if not ids:
        raise DataError(f"{row.location()}: the prompt is empty (no tokens to answer)")
    if reference is not None and not isinstance(reference, str):
        reference = str(reference)
    return PromptRow(list(ids), prompt, conversational, reference, columns)


def load_prompt_rows(path: str | Path, tokenizer: Any, max_prompt_tokens: int, skip_bad: bool = False,
                     special_tokens_in_content: bool = False) -> tuple[list[PromptRow], int, int]:
    """The prompt rows of a file, and how many were skipped (bad, with `skip_bad`) and cut.

    A prompt longer than `max_prompt_tokens` keeps its last tokens (where the question and the
    generation prompt are).
    """
    rows, skipped, cut = [], 0, 0
    for row in read_rows(path):
        try:
            prompt = prompt_row(row, tokenizer, special_tokens_in_content)
        except DataError:
            if not skip_bad:
                raise
            skipped += 1
            continue
        if len(prompt.ids) > max_prompt_tokens:
            prompt.ids = prompt.ids[-max_prompt_tokens:]
            cut += 1
        rows.append(prompt)
    if not rows:
        raise DataError(f"{path}: no prompt rows" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return rows, skipped, cut
