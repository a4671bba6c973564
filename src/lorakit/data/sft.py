"""Training data: files in, token ids and loss masks out, then batches.

Three example shapes, detected per row:

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion (and EOS)
    {"messages": [{"role": ..., "content": ...}]}     the tokenizer's chat template;
                                                      loss on assistant turns

Files (read by `data.files`): .jsonl, .json (a list of rows, or {"data": [...]}), .csv,
.parquet, and local `datasets` directories (saved with `save_to_disk`). A bad row raises
`DataError` naming the file and line (or row); with `skip_bad=True` bad rows are counted and dropped.

Hostile rows stay cheap: a text field holds at most `MAX_FIELD_CHARS` characters and a row at
most `MAX_MESSAGES` messages; a row is cut to a few characters per token of `seq_len` before it
is tokenized (so a huge row costs what `seq_len` allows); a chat row's loss mask takes one
rendering, not one per turn; special-token text in a row (`<|im_start|>`) is tokenized as plain
text unless `special_tokens_in_content` allows it as control tokens.

Labels use -100 for positions without loss (the convention of PyTorch's cross-entropy
`ignore_index`). Labels are not shifted here: `labels[t]` is the target *at* position t,
so the model's prediction at t-1 is scored against it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.base.templates import (
    TemplateError,
    assistant_spans,
    encode_chat,
    encode_text,
    prefix_spans,
    render_chat,
)
from lorakit.data.files import MAX_FIELD_CHARS, DataError, Row, read_jsonl_lenient, read_rows

IGNORE = -100
SHAPES = ("text", "prompt_completion", "messages")
MAX_MESSAGES = 4096
"""Most messages in one 'messages' row."""
CHARS_PER_TOKEN = 16
"""A row is cut to this many characters per token of seq_len before it is tokenized, and the cut
grows (up to MAX_CHARS_PER_TOKEN) while it leaves fewer tokens than seq_len needs."""
MAX_CHARS_PER_TOKEN = 256
CUT_SLACK = 16
"""Tokens past seq_len a cut row must still have, so the cut cannot change the tokens kept."""
PREFIX_RENDER_MESSAGES = 64
"""Most messages in a row whose template hides the shape of an assistant turn; such rows are
masked by rendering each prefix, which takes time quadratic in the number of messages."""


@dataclass
class Example:
    """A tokenized example: `labels[t]` is the target at position t, or -100."""

    input_ids: list[int]
    labels: list[int]
    cut: int = 0
    """Characters of the row left out before tokenizing (0: the whole row was tokenized)."""
    special_text: bool = False
    """Whether the row held special-token text (`<|im_start|>`)."""

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class DataStats:
    """What happened on the way from rows to examples, for the log."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    supervised_tokens: int = 0
    cut: int = 0
    first_cut: str = ""
    special_text: int = 0
    first_special_text: str = ""
    special_tokens_in_content: bool = False

    def summary(self, name: str) -> str:
        text = (
            f"{name}: {self.examples} examples, {self.tokens} tokens "
            f"({self.supervised_tokens} with loss), {self.truncated} truncated"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons.items()))
            text += f", {self.skipped} bad rows skipped ({reasons})"
        if self.cut:
            rows = "1 row was" if self.cut == 1 else f"{self.cut} rows were"
            text += f"; {rows} cut short before tokenizing, too long for seq_len (first: {self.first_cut})"
        if self.special_text:
            rows = "1 row holds" if self.special_text == 1 else f"{self.special_text} rows hold"
            meant = ("read as control tokens (--special-tokens-in-content)" if self.special_tokens_in_content else
                     "tokenized as plain text; pass --special-tokens-in-content if it is meant as control tokens")
            text += f"; {rows} special-token text such as <|im_start|> (first: {self.first_special_text}), {meant}"
        return text


# shapes and tokenization ------------------------------------------------------------------


def example_shape(row: Row) -> str:
    """Which of the three shapes a row has; a DataError says what is wrong otherwise."""
    data = row.data
    if not isinstance(data, dict):
        raise DataError(f"{row.location()}: expected an object with 'text', 'prompt'+'completion' or 'messages', got {type(data).__name__}")
    if "messages" in data and data["messages"] is not None:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{row.location()}: 'messages' must be a non-empty list of {{'role', 'content'}}, got {messages!r:.80}")
        if len(messages) > MAX_MESSAGES:
            raise DataError(f"{row.location()}: 'messages' has {len(messages)} messages; a row may hold at most "
                            f"{MAX_MESSAGES} (MAX_MESSAGES); split the conversation into several rows")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{row.location()}: messages[{i}] must have a string 'role' and a string 'content', got {m!r:.80}"
                )
            check_field_length(row, f"messages[{i}].content", m["content"])
        return "messages"
    if "prompt" in data or "completion" in data:
        for key in ("prompt", "completion"):
            if key not in data or data[key] is None:
                raise DataError(f"{row.location()}: '{key}' is missing (a prompt/completion row needs both)")
            if not isinstance(data[key], str):
                raise DataError(f"{row.location()}: '{key}' must be a string, got {type(data[key]).__name__}")
            check_field_length(row, key, data[key])
        return "prompt_completion"
    if "text" in data and data["text"] is not None:
        if not isinstance(data["text"], str):
            raise DataError(f"{row.location()}: 'text' must be a string, got {type(data['text']).__name__}")
        check_field_length(row, "text", data["text"])
        return "text"
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise DataError(
        f"{row.location()}: no 'text', 'prompt'+'completion' or 'messages' field (fields: {keys})"
    )


def check_field_length(row: Row, name: str, text: str) -> None:
    """A DataError when a text field is longer than MAX_FIELD_CHARS."""
    if len(text) > MAX_FIELD_CHARS:
        raise DataError(f"{row.location()}: '{name}' has {len(text)} characters; a text field may hold at most "
                        f"{MAX_FIELD_CHARS} (MAX_FIELD_CHARS); shorten or split it")


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _cut(text: str, budget: int | None) -> tuple[str, int]:
    """The start of `text` within `budget` characters (None: all of it), and how many were left out."""
    if budget is None or len(text) <= budget:
        return text, 0
    return text[: max(budget, 0)], len(text) - max(budget, 0)


def tokenize_row(row: Row, tokenizer: Any, loss_on: str = "completion", seq_len: int | None = None,
                 special_tokens_in_content: bool = False) -> Example:
    """Token ids and labels for one row (before truncation to `seq_len`).

    `loss_on="completion"` puts the loss on the completion (prompt/completion rows) or the
    assistant turns (messages rows); `"all"` on every token. Text rows always train on all.
    With `seq_len`, a row too long for it is cut to its start before tokenizing, keeping at
    least `seq_len` + `CUT_SLACK` tokens where `MAX_CHARS_PER_TOKEN` characters a token allow;
    `Example.cut` counts the characters left out.
    """
    shape = example_shape(row)
    if seq_len is None:
        return _tokenize_shape(row, shape, tokenizer, loss_on, None, special_tokens_in_content)
    budget, most = CHARS_PER_TOKEN * (seq_len + CUT_SLACK), MAX_CHARS_PER_TOKEN * (seq_len + CUT_SLACK)
    while True:
        ex = _tokenize_shape(row, shape, tokenizer, loss_on, budget, special_tokens_in_content)
        if not ex.cut or len(ex.input_ids) >= seq_len + CUT_SLACK or budget >= most:
            return ex
        budget = min(budget * 4, most)


def _tokenize_shape(row: Row, shape: str, tokenizer: Any, loss_on: str, budget: int | None,
                    special: bool) -> Example:
    data = row.data
    if shape == "text":
        text, cut = _cut(data["text"], budget)
        enc = encode_text(tokenizer, text, add_special_tokens=True, special_tokens_in_content=special)
        # A cut text does not end where it was cut: no EOS.
        ids = enc.ids + ([] if cut else _eos(tokenizer))
        return Example(ids, list(ids), cut, enc.special_text)
    if shape == "prompt_completion":
        prompt_text, cut = _cut(data["prompt"], budget)
        completion_text, cut_completion = _cut(data["completion"], None if budget is None else budget - len(prompt_text))
        prompt = encode_text(tokenizer, prompt_text, add_special_tokens=True, special_tokens_in_content=special)
        # Tokenized apart so the prompt/completion boundary is a token boundary.
        completion = encode_text(tokenizer, completion_text, add_special_tokens=False, special_tokens_in_content=special)
        completion_ids = completion.ids + ([] if cut or cut_completion else _eos(tokenizer))
        labels = (list(prompt.ids) if loss_on == "all" else [IGNORE] * len(prompt.ids)) + completion_ids
        return Example(prompt.ids + completion_ids, labels, cut + cut_completion,
                       prompt.special_text or completion.special_text)
    return _tokenize_messages(row, tokenizer, loss_on, budget, special)


def _tokenize_messages(row: Row, tokenizer: Any, loss_on: str, budget: int | None, special: bool) -> Example:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.location()}: a 'messages' row needs a tokenizer with a chat template; this one has none")
    messages = [{"role": m["role"], "content": m["content"]} for m in row.data["messages"]]
    if loss_on != "all" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.location()}: no assistant message, so nothing to learn (roles: {', '.join(m['role'] for m in messages)})")
    # Within the budget: whole messages, then the start of the one that crosses it.
    cut, kept, left = 0, [], budget
    for i, message in enumerate(messages):
        content, cut = _cut(message["content"], left)
        kept.append({"role": message["role"], "content": content})
        if left is not None:
            left -= len(content)
        if cut:
            cut += sum(len(m["content"]) for m in messages[i + 1 :])
            break
    chat = render_chat(tokenizer, kept, add_generation_prompt=False)
    try:
        encoded = encode_chat(tokenizer, chat, special_tokens_in_content=special, offsets=True)
    except TemplateError as err:
        raise DataError(f"{row.location()}: {err}") from None
    ids, offsets = encoded.ids, encoded.offsets or []
    if loss_on == "all":
        return Example(ids, list(ids), cut, encoded.special_text)
    # Character spans of the assistant turns: the text an assistant turn adds after the
    # template's generation prompt, up to and including its end-of-turn marker.
    spans = assistant_spans(tokenizer, kept, chat)
    if spans is None and len(kept) <= PREFIX_RENDER_MESSAGES:
        spans = prefix_spans(tokenizer, kept, chat)
    if spans is None:
        raise DataError(
            f"{row.location()}: the chat template does not render conversations prefix by prefix, "
            "so assistant turns cannot be located; use loss_on='all' or prompt/completion rows"
            + (f" (or rows of at most {PREFIX_RENDER_MESSAGES} messages, PREFIX_RENDER_MESSAGES)"
               if len(kept) > PREFIX_RENDER_MESSAGES else "")
        )
    starts = [a for a, _ in spans]
    labels = []
    for token, (start, _end) in zip(ids, offsets, strict=True):
        j = bisect.bisect_right(starts, start) - 1
        labels.append(token if j >= 0 and start < spans[j][1] else IGNORE)
    return Example(ids, labels, cut, encoded.special_text)


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    seq_len: int,
    loss_on: str = "completion",
    skip_bad: bool = False,
    special_tokens_in_content: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize, truncate to `seq_len`, and check that every example has something to learn.

    `special_tokens_in_content`: special-token text in the rows (`<|im_start|>`) becomes control
    tokens, for data that really holds them; otherwise it is tokenized as plain text.
    """
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
    stats = DataStats(rows=len(rows), special_tokens_in_content=special_tokens_in_content)
    examples = []
    for row in rows:
        try:
            ex = tokenize_row(row, tokenizer, loss_on, seq_len, special_tokens_in_content)
            full = len(ex.input_ids)
            if ex.cut:
                stats.cut += 1
                stats.first_cut = stats.first_cut or f"{row.location()}: {ex.cut} characters left out"
            if ex.special_text:
                stats.special_text += 1
                stats.first_special_text = stats.first_special_text or row.location()
            if len(ex.input_ids) > seq_len or ex.cut:
                ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len], ex.cut, ex.special_text)
                stats.truncated += 1
            # Position 0 is never predicted, so its label carries no loss.
            if not any(x != IGNORE for x in ex.labels[1:]):
                raise DataError(
                    f"{row.location()}: nothing left to learn after truncation to seq_len={seq_len} "
                    f"(the example has {'more than ' if ex.cut else ''}{full} tokens); "
                    "raise --seq-len or shorten the prompt"
                )
        except DataError as err:
            if not skip_bad:
                raise
            stats.skipped += 1
            reason = _reason(str(err))
            stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + 1
            continue
        examples.append(ex)
        stats.tokens += len(ex.input_ids)
        stats.supervised_tokens += ex.supervised
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{rows[0].source}: no usable examples ({stats.skipped} bad rows skipped)")
    return examples, stats


def _reason(message: str) -> str:
    text = message.split(": ", 1)[-1]
    for key in ("not valid JSON", "nothing left to learn", "is missing", "must be", "no 'text'", "no assistant",
                "may hold at most", "special-token text"):
        if key in text:
            return key
    return "other"


def load_examples(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    loss_on: str = "completion",
    skip_bad: bool = False,
    special_tokens_in_content: bool = False,
) -> tuple[list[Example], DataStats]:
    """Read a file and tokenize it. With `skip_bad`, JSONL lines that are not JSON or not UTF-8 are skipped too."""
    if skip_bad and Path(path).suffix.lower() == ".jsonl":
        rows, bad = read_jsonl_lenient(Path(path))
    else:
        rows, bad = read_rows(path), {}
    examples, stats = tokenize_rows(rows, tokenizer, seq_len, loss_on, skip_bad, special_tokens_in_content)
    for reason, n in bad.items():
        stats.skipped += n
        stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + n
        stats.rows += n
    return examples, stats


# sequences and batches ----------------------------------------------------------------------


@dataclass
class TokenRow:
    """One training row: one example, or several packed end to end.

    `position_ids` restart at 0 for each packed example; the training loss attends within each
    example only (variable-length attention on the GPU fast path, `packing.packed_mask` elsewhere).
    """

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def pack(examples: Sequence[Example], seq_len: int) -> list[TokenRow]:
    """Greedy first-fit packing in the given order; each example stays whole."""
    out: list[TokenRow] = []
    current = TokenRow([], [], [])
    for ex in examples:
        if current.input_ids and len(current.input_ids) + len(ex.input_ids) > seq_len:
            out.append(current)
            current = TokenRow([], [], [])
        current.input_ids += ex.input_ids
        current.labels += [IGNORE] + ex.labels[1:]  # the first token of an example is not predicted
        current.position_ids += list(range(len(ex.input_ids)))
    if current.input_ids:
        out.append(current)
    return out


def as_sequences(examples: Sequence[Example], seq_len: int, packing: bool) -> list[TokenRow]:
    if packing:
        return pack(examples, seq_len)
    return [TokenRow(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


def collate(seqs: Sequence[TokenRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row.

    No attention mask is needed: with a causal model and right padding, real tokens never
    attend to the padding after them, and padded positions carry no loss. Padding positions
    continue the row's last segment, so a batch without packing has plain 0..T-1 positions
    and keeps the fast causal attention path (no explicit mask is built).
    """
    width = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        positions[i, :n] = torch.tensor(s.position_ids)
        start = s.position_ids[-1] + 1
        positions[i, n:] = torch.arange(start, start + width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def split_rows(seqs: Sequence[TokenRow], max_tokens: int | None) -> list[list[TokenRow]]:
    """Split a micro-batch into pieces of at most `max_tokens` padded tokens (at least one row each).

    Summing the pieces' gradients gives the micro-batch's gradient, while activation memory
    is that of one piece; each piece is padded only to its own longest row.
    """
    if max_tokens is None:
        return [list(seqs)]
    width = max(len(s.input_ids) for s in seqs)
    rows = max(1, max_tokens // width)
    return [list(seqs[i : i + rows]) for i in range(0, len(seqs), rows)]


def epoch_order(num_sequences: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_sequences, generator=g).tolist()


def batches_per_epoch(num_sequences: int, batch_size: int) -> int:
    return math.ceil(num_sequences / batch_size)


def micro_batch(seqs: Sequence[TokenRow], batch_size: int, seed: int, index: int) -> list[TokenRow]:
    """Micro-batch number `index` of the endless stream of shuffled epochs.

    A pure function of (seed, index), so a resumed (or sharded) run can start anywhere.
    """
    per_epoch = batches_per_epoch(len(seqs), batch_size)
    epoch, position = divmod(index, per_epoch)
    order = epoch_order(len(seqs), seed, epoch)
    chosen = order[position * batch_size : (position + 1) * batch_size]
    return [seqs[i] for i in chosen]


def eval_batches(seqs: Sequence[TokenRow], batch_size: int) -> Iterator[list[TokenRow]]:
    """Fixed-order batches of similar lengths (less padding), for evaluation."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield [seqs[i] for i in order[start : start + batch_size]]
