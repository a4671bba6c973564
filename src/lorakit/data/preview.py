"""`lorakit data --preview N`: training rows as the model sees them, supervised tokens marked.

Each row is rendered exactly as training renders it (chat template, EOS, truncation) and
split into runs of tokens with and without loss. A row whose supervised tokens hold no
end-of-turn token (EOS, or the template's own marker such as `<|im_end|>`) trains a model
that never learns to stop; the preview says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.base.templates import end_of_turn_ids
from lorakit.data.sft import IGNORE, read_rows, tokenize_rows

MARK_OPEN, MARK_CLOSE = "\u27e6", "\u27e7"
"""Around supervised text when the output is not a terminal (a terminal gets colour)."""


@dataclass
class PreviewRow:
    """One rendered example: (text, supervised) runs in order, and what it teaches."""

    location: str
    segments: list[tuple[str, bool]]
    tokens: int
    supervised: int
    supervises_end_of_turn: bool
    cut: int = 0
    """Characters of the row left out before tokenizing, as training leaves them out."""


def preview_rows(path: str, tokenizer: Any, count: int, seq_len: int = 1024, loss_on: str = "completion",
                 special_tokens_in_content: bool = False) -> list[PreviewRow]:
    """The first `count` rows of a data file, tokenized as training tokenizes them."""
    if count <= 0:
        raise ValueError(f"--preview must be a positive number of rows, got {count}")
    rows = read_rows(path)[:count]
    stops = end_of_turn_ids(tokenizer)
    out = []
    for row in rows:
        examples, _ = tokenize_rows([row], tokenizer, seq_len, loss_on, special_tokens_in_content=special_tokens_in_content)
        example = examples[0]
        segments: list[tuple[str, bool]] = []
        run: list[int] = []
        flag = None
        # Position 0 is never predicted, so it never carries loss.
        marks = [False] + [label != IGNORE for label in example.labels[1:]]
        for token, supervised in zip(example.input_ids, marks, strict=True):
            if flag is not None and supervised != flag:
                segments.append((tokenizer.decode(run), flag))
                run = []
            run.append(token)
            flag = supervised
        if run:
            segments.append((tokenizer.decode(run), bool(flag)))
        taught = {t for t, m in zip(example.input_ids, marks, strict=True) if m}
        out.append(PreviewRow(row.location(), segments, len(example.input_ids), sum(marks), bool(taught & stops),
                              example.cut))
    return out


def render(rows: Sequence[PreviewRow], tokenizer: Any, color: bool) -> list[Any]:
    """Printable lines: rich Text with supervised runs in bold green, or marked with brackets."""
    from rich.text import Text

    lines: list[Any] = []
    if not color:
        lines.append(Text(f"(supervised tokens, the ones with loss, are between {MARK_OPEN} and {MARK_CLOSE})"))
    missing = []
    for i, row in enumerate(rows, start=1):
        cut = (f"; truncated: the row was cut to its start before tokenizing ({row.cut} characters left out), "
               "as training cuts it" if row.cut else "")
        lines.append(Text(f"--- row {i} ({row.location}): {row.tokens} tokens, {row.supervised} supervised{cut}",
                          style="bold" if color else ""))
        text = Text()
        for piece, supervised in row.segments:
            if supervised and color:
                text.append(piece, style="bold green")
            elif supervised:
                text.append(f"{MARK_OPEN}{piece}{MARK_CLOSE}")
            else:
                text.append(piece, style="dim" if color else "")
        lines.append(text)
        if not row.supervises_end_of_turn:
            missing.append(row.location)
    if missing:
        names = ", ".join(tokenizer.convert_ids_to_tokens(sorted(end_of_turn_ids(tokenizer)))) or "(none: the tokenizer has no EOS)"
        lines.append(Text(
            f"warning: {len(missing)} of {len(rows)} rows supervise no end-of-turn token ({names}), e.g. "
            f"{missing[0]}; a model trained on them does not learn to stop",
            style="bold yellow" if color else "",
        ))
    return lines


def run_preview(path: str, tokenizer: Any, count: int, seq_len: int, loss_on: str,
                special_tokens_in_content: bool = False) -> list[PreviewRow]:
    """Print the preview to stdout; returns the rows."""
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    rows = preview_rows(path, tokenizer, count, seq_len, loss_on, special_tokens_in_content)
    for line in render(rows, tokenizer, console.is_terminal):
        console.print(line)
    return rows

