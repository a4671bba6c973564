"""Preference data: pairs of a preferred ("chosen") and a rejected answer to one prompt.

Two row shapes, in every file format `lorakit train` reads (`data.read_rows`):

    {"prompt": "...", "chosen": "...", "rejected": "..."}        plain text; EOS after each answer
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    {"chosen": [messages], "rejected": [messages]}               chat; the turns the two share
                                                                 are the prompt

Chat rows go through the tokenizer's chat template; the answer is what the chosen (or
rejected) turns add after the prompt rendered with the generation prompt. The loss and the
log-probabilities cover the answer only. Bad rows raise `DataError` naming the file and line,
as `data.py` does for supervised rows: a row without both answers, identical answers, an
answer with nothing left after truncation to `seq_len`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.base.templates import TemplateError, encode_chat, render_chat
from lorakit.data.sft import (
    IGNORE,
    MAX_MESSAGES,
    DataError,
    DataStats,
    Example,
    Row,
    TokenRow,
    check_field_length,
    collate,
    read_rows,
    tokenize_row,
)


@dataclass
class Pair:
    """One tokenized preference pair (each side the whole sequence: prompt + answer)."""

    chosen: Example
    rejected: Example

    @property
    def width(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _messages(row: Row, key: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.location()}: '{key}' must be a non-empty string or list of messages, got {value!r:.80}")
    if len(value) > MAX_MESSAGES:
        raise DataError(f"{row.location()}: '{key}' has {len(value)} messages; a row may hold at most "
                        f"{MAX_MESSAGES} (MAX_MESSAGES); split the conversation into several rows")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{row.location()}: {key}[{i}] must have a string 'role' and a string 'content', got {m!r:.80}")
        check_field_length(row, f"{key}[{i}].content", m["content"])
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_shape(row: Row) -> str:
    """'text' or 'chat'; a DataError says what is wrong otherwise."""
    data = row.data
    if not isinstance(data, dict):
        raise DataError(f"{row.location()}: expected an object with 'chosen' and 'rejected', got {type(data).__name__}")
    for key in ("chosen", "rejected"):
        if data.get(key) is None:
            keys = ", ".join(sorted(map(str, data))) or "none"
            raise DataError(f"{row.location()}: '{key}' is missing (a preference row needs 'chosen' and 'rejected'; "
                            f"fields: {keys})")
    chosen, rejected, prompt = data["chosen"], data["rejected"], data.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f"{row.location()}: 'prompt' must be a string when 'chosen' and 'rejected' are strings, "
                            f"got {type(prompt).__name__}")
        if chosen == rejected:
            raise DataError(f"{row.location()}: 'chosen' and 'rejected' are identical, so there is no preference to learn")
        return "text"
    if isinstance(chosen, list) and isinstance(rejected, list):
        return "chat"
    raise DataError(f"{row.location()}: 'chosen' and 'rejected' must both be strings or both lists of messages, "
                    f"got {type(chosen).__name__} and {type(rejected).__name__}")


def _chat_sides(row: Row) -> tuple[list[dict], list[dict], list[dict]]:
    """The prompt turns, and the chosen and rejected turns that follow them."""
    data = row.data
    chosen, rejected = _messages(row, "chosen", data["chosen"]), _messages(row, "rejected", data["rejected"])
    if data.get("prompt") is not None:
        prompt = _messages(row, "prompt", data["prompt"])
    else:  # implicit prompt: the turns both conversations share
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if chosen == rejected or not chosen or not rejected:
        raise DataError(f"{row.location()}: 'chosen' and 'rejected' are identical after the shared prompt turns, "
                        "so there is no preference to learn")
    for key, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[0]["role"] != "assistant":
            raise DataError(f"{row.location()}: the '{key}' answer must start with an assistant turn after the prompt, "
                            f"got role {turns[0]['role']!r}")
    return prompt, chosen, rejected


def _chat_example(row: Row, tokenizer: Any, prompt: list[dict], answer: list[dict], special: bool) -> Example:
    before = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) if prompt else ""
    chat = render_chat(tokenizer, prompt + answer, add_generation_prompt=False)
    if not chat.text.startswith(before):
        raise DataError(f"{row.location()}: the chat template does not render the prompt as a prefix of the "
                        "conversation, so the answer cannot be located; use prompt/chosen/rejected strings")
    try:
        encoded = encode_chat(tokenizer, chat, special_tokens_in_content=special, offsets=True)
    except TemplateError as err:
        raise DataError(f"{row.location()}: {err}") from None
    ids = encoded.ids
    labels = [t if start >= len(before) else IGNORE for t, (start, _) in zip(ids, encoded.offsets or [], strict=True)]
    return Example(ids, labels, special_text=encoded.special_text)


def tokenize_pair(row: Row, tokenizer: Any, seq_len: int | None = None, special_tokens_in_content: bool = False) -> Pair:
    """Token ids and answer labels of both sides of a row (before truncation; with `seq_len`, a
    text row too long for it is cut before tokenizing, as `tokenize_row` cuts it)."""
    if pair_shape(row) == "text":
        for key in ("prompt", "chosen", "rejected"):
            check_field_length(row, key, row.data[key])
        # The prompt/completion tokenization of data.py: the prompt apart, then the answer and EOS.
        sides = [tokenize_row(Row({"prompt": row.data["prompt"], "completion": row.data[k]}, row.source, row.line,
                                  row.where), tokenizer, seq_len=seq_len,
                              special_tokens_in_content=special_tokens_in_content) for k in ("chosen", "rejected")]
        return Pair(*sides)
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.location()}: chat preference rows need a tokenizer with a chat template; this one has none")
    prompt, chosen, rejected = _chat_sides(row)
    return Pair(_chat_example(row, tokenizer, prompt, chosen, special_tokens_in_content),
                _chat_example(row, tokenizer, prompt, rejected, special_tokens_in_content))


def _truncate(ex: Example, seq_len: int) -> Example:
    return Example(ex.input_ids[:seq_len], ex.labels[:seq_len])


def tokenize_pairs(rows: Sequence[Row], tokenizer: Any, seq_len: int,
                   skip_bad: bool = False, special_tokens_in_content: bool = False) -> tuple[list[Pair], DataStats]:
    """Tokenize, truncate each side to `seq_len` (keeping the start), check both answers keep tokens."""
    stats = DataStats(rows=len(rows), special_tokens_in_content=special_tokens_in_content)
    pairs = []
    for row in rows:
        try:
            pair = tokenize_pair(row, tokenizer, seq_len, special_tokens_in_content)
            if pair.chosen.special_text or pair.rejected.special_text:
                stats.special_text += 1
                stats.first_special_text = stats.first_special_text or row.location()
            long = max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))
            if long > seq_len:
                pair = Pair(_truncate(pair.chosen, seq_len), _truncate(pair.rejected, seq_len))
                stats.truncated += 1
            for side, ex in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                if not any(x != IGNORE for x in ex.labels[1:]):
                    raise DataError(f"{row.location()}: nothing left of the {side} answer after truncation to "
                                    f"seq_len={seq_len} (the longer side has {long} tokens); raise --seq-len or "
                                    "shorten the prompt")
            if pair.chosen.input_ids == pair.rejected.input_ids:
                raise DataError(f"{row.location()}: 'chosen' and 'rejected' are identical after truncation to "
                                f"seq_len={seq_len}; raise --seq-len")
        except DataError as err:
            if not skip_bad:
                raise
            stats.skipped += 1
            reason = _reason(str(err))
            stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + 1
            continue
        pairs.append(pair)
        for ex in (pair.chosen, pair.rejected):
            stats.tokens += len(ex.input_ids)
            stats.supervised_tokens += ex.supervised
    stats.examples = len(pairs)
    if not pairs:
        raise DataError(f"{rows[0].source}: no usable preference pairs ({stats.skipped} bad rows skipped)")
    return pairs, stats


def _reason(message: str) -> str:
    text = message.split(": ", 1)[-1]
    for key in ("nothing left", "identical", "is missing", "must be", "must start", "not valid JSON", "may hold at most"):
        if key in text:
            return key
    return "other"


def load_pairs(path: str | Path, tokenizer: Any, seq_len: int, skip_bad: bool = False,
               special_tokens_in_content: bool = False) -> tuple[list[Pair], DataStats]:
    """Read a preference file (any format `lorakit train` reads) and tokenize it."""
    if skip_bad and Path(path).suffix.lower() == ".jsonl" and Path(path).exists():
        rows, bad = [], 0
        with Path(path).open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append(Row(json.loads(line), str(path), number))
                    except json.JSONDecodeError:
                        bad += 1
        if not rows:
            raise DataError(f"{path}: the file has no examples ({bad} lines are not JSON)")
    else:
        rows, bad = read_rows(path), 0
    pairs, stats = tokenize_pairs(rows, tokenizer, seq_len, skip_bad, special_tokens_in_content)
    if bad:
        stats.skipped += bad
        stats.rows += bad
        stats.skip_reasons["not valid JSON"] = stats.skip_reasons.get("not valid JSON", 0) + bad
    return pairs, stats


def is_preference_file(path: str | Path) -> bool:
    """Whether the first row of a data file has 'chosen' and 'rejected' (for a clear error on a mix-up)."""
    try:
        first = read_rows(path)[0].data
    except DataError:
        return False
    return isinstance(first, dict) and "chosen" in first and "rejected" in first


# batches ------------------------------------------------------------------------------------


def _row(ex: Example, labels: list[int] | None = None) -> TokenRow:
    return TokenRow(ex.input_ids, labels if labels is not None else ex.labels, list(range(len(ex.input_ids))))


def collate_pairs(pairs: Sequence[Pair], pad_id: int, sft_on_all: bool = False) -> dict[str, torch.Tensor]:
    """One batch of 2B rows: the B chosen sequences, then the B rejected ones (one forward pass).

    `labels` mark the answers. With `sft_on_all`, `sft_labels` (B rows) mark every token of the
    chosen sequences, for ORPO's language-modelling term with `--loss-on all`.
    """
    batch = collate([_row(p.chosen) for p in pairs] + [_row(p.rejected) for p in pairs], pad_id)
    if sft_on_all:
        width = batch["input_ids"].shape[1]
        sft = collate([_row(p.chosen, list(p.chosen.input_ids)) for p in pairs], pad_id)["labels"]
        batch["sft_labels"] = torch.nn.functional.pad(sft, (0, width - sft.shape[1]), value=IGNORE)
    return batch


def split_pairs(pairs: Sequence[Pair], max_tokens: int | None) -> list[list[Pair]]:
    """Pieces of a micro-batch of at most `max_tokens` padded tokens (both sides counted; one pair at least)."""
    if max_tokens is None:
        return [list(pairs)]
    rows = max(1, max_tokens // (2 * max(p.width for p in pairs)))
    return [list(pairs[i : i + rows]) for i in range(0, len(pairs), rows)]
