"""Training data: files in, token ids and loss masks out, then batches.

Three example shapes, detected per row:

    {"text": "..."}                                   loss on every token
    {"prompt": "...", "completion": "..."}            loss on the completion (and EOS)
    {"messages": [{"role": ..., "content": ...}]}     the tokenizer's chat template;
                                                      loss on assistant turns

Files: .jsonl, .json (a list of rows, or {"data": [...]}), .csv, .parquet, and local
`datasets` directories (saved with `save_to_disk`). A bad row raises `DataError` naming
the file and line (or row); with `skip_bad=True` bad rows are counted and dropped.

Labels use -100 for positions without loss (the convention of PyTorch's cross-entropy
`ignore_index`). Labels are not shifted here: `labels[t]` is the target *at* position t,
so the model's prediction at t-1 is scored against it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

IGNORE = -100
SHAPES = ("text", "prompt_completion", "messages")
FORMATS = ("jsonl", "json", "csv", "parquet", "datasets directory")


class DataError(ValueError):
    """A data file or one of its rows cannot be used; the message names the file and line."""


@dataclass
class Row:
    """One raw example and where it came from (`line` is 1-based: a file line or a row number)."""

    data: Any
    source: str
    line: int
    where: str = "line"

    def location(self) -> str:
        return f"{self.source}:{self.line}" if self.where == "line" else f"{self.source} row {self.line}"


@dataclass
class Example:
    """A tokenized example: `labels[t]` is the target at position t, or -100."""

    input_ids: list[int]
    labels: list[int]

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

    def summary(self, name: str) -> str:
        text = (
            f"{name}: {self.examples} examples, {self.tokens} tokens "
            f"({self.supervised_tokens} with loss), {self.truncated} truncated"
        )
        if self.skipped:
            reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.skip_reasons.items()))
            text += f", {self.skipped} bad rows skipped ({reasons})"
        return text


# reading files --------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """All rows of a data file or `datasets` directory, each with its location."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        rows = _read_datasets_dir(path)
    else:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        elif suffix == ".parquet":
            rows = _read_parquet(path)
        else:
            raise DataError(
                f"{source}: unknown data format {suffix or '(no extension)'!r}; accepted: "
                ".jsonl, .json, .csv, .parquet, or a directory saved with datasets' save_to_disk"
            )
    if not rows:
        raise DataError(f"{source}: the file has no examples")
    return rows


def _utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """`raw` decoded as UTF-8, or a DataError naming the file, the line and the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _utf8(raw, path, number)
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            rows.append(Row(data, str(path), number))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _utf8(path.read_bytes(), path)
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of examples (or {{\"data\": [...]}}), got {type(data).__name__}")
    return [Row(item, str(path), i, where="row") for i, item in enumerate(data, start=1)]


def _read_csv(path: Path) -> list[Row]:
    text = _utf8(path.read_bytes(), path)
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        # Line numbers count the header as line 1, so they match what an editor shows.
        return [Row(dict(r), str(path), reader.line_num) for r in reader]


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    return [Row(r, str(path), i, where="row") for i, r in enumerate(table.to_pylist(), start=1)]


def _read_datasets_dir(path: Path) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataError(f"{path}: not a directory saved with datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split; splits: {', '.join(ds)}")
        ds = ds["train"]
    return [Row(r, str(path), i, where="row") for i, r in enumerate(ds, start=1)]


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
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{row.location()}: messages[{i}] must have a string 'role' and a string 'content', got {m!r:.80}"
                )
        return "messages"
    if "prompt" in data or "completion" in data:
        for key in ("prompt", "completion"):
            if key not in data or data[key] is None:
                raise DataError(f"{row.location()}: '{key}' is missing (a prompt/completion row needs both)")
            if not isinstance(data[key], str):
                raise DataError(f"{row.location()}: '{key}' must be a string, got {type(data[key]).__name__}")
        return "prompt_completion"
    if "text" in data and data["text"] is not None:
        if not isinstance(data["text"], str):
            raise DataError(f"{row.location()}: 'text' must be a string, got {type(data['text']).__name__}")
        return "text"
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise DataError(
        f"{row.location()}: no 'text', 'prompt'+'completion' or 'messages' field (fields: {keys})"
    )


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos(tokenizer: Any) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def tokenize_row(row: Row, tokenizer: Any, loss_on: str = "completion") -> Example:
    """Token ids and labels for one row (before truncation).

    `loss_on="completion"` puts the loss on the completion (prompt/completion rows) or the
    assistant turns (messages rows); `"all"` on every token. Text rows always train on all.
    """
    shape = example_shape(row)
    data = row.data
    if shape == "text":
        ids = _ids(tokenizer, data["text"], True) + _eos(tokenizer)
        return Example(ids, list(ids))
    if shape == "prompt_completion":
        prompt = _ids(tokenizer, data["prompt"], True)
        # Tokenized apart so the prompt/completion boundary is a token boundary.
        completion = _ids(tokenizer, data["completion"], False) + _eos(tokenizer)
        labels = (list(prompt) if loss_on == "all" else [IGNORE] * len(prompt)) + completion
        return Example(prompt + completion, labels)
    return _tokenize_messages(row, tokenizer, loss_on)


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _tokenize_messages(row: Row, tokenizer: Any, loss_on: str) -> Example:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{row.location()}: a 'messages' row needs a tokenizer with a chat template; this one has none")
    messages = [{"role": m["role"], "content": m["content"]} for m in row.data["messages"]]
    full = _render(tokenizer, messages, False)
    # Character spans of the assistant turns: the text an assistant turn adds after the
    # template's generation prompt, up to and including its end-of-turn marker.
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto)):
            raise DataError(
                f"{row.location()}: the chat template does not render conversations prefix by prefix, "
                "so assistant turns cannot be located; use loss_on='all' or prompt/completion rows"
            )
        spans.append((len(before), len(upto)))
    if not spans and loss_on != "all":
        raise DataError(f"{row.location()}: no assistant message, so nothing to learn (roles: {', '.join(m['role'] for m in messages)})")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if loss_on == "all":
        return Example(ids, list(ids))
    labels = []
    for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token if inside else IGNORE)
    return Example(ids, labels)


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    seq_len: int,
    loss_on: str = "completion",
    skip_bad: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize, truncate to `seq_len`, and check that every example has something to learn."""
    if loss_on not in ("completion", "all"):
        raise ValueError(f"loss_on must be 'completion' or 'all', got {loss_on!r}")
    stats = DataStats(rows=len(rows))
    examples = []
    for row in rows:
        try:
            ex = tokenize_row(row, tokenizer, loss_on)
            if len(ex.input_ids) > seq_len:
                ex = Example(ex.input_ids[:seq_len], ex.labels[:seq_len])
                stats.truncated += 1
            # Position 0 is never predicted, so its label carries no loss.
            if not any(x != IGNORE for x in ex.labels[1:]):
                raise DataError(
                    f"{row.location()}: nothing left to learn after truncation to seq_len={seq_len} "
                    f"(the example has {len(tokenize_row(row, tokenizer, loss_on).input_ids)} tokens); "
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
    for key in ("not valid JSON", "nothing left to learn", "is missing", "must be", "no 'text'", "no assistant"):
        if key in text:
            return key
    return "other"


def load_examples(
    path: str | Path,
    tokenizer: Any,
    seq_len: int,
    loss_on: str = "completion",
    skip_bad: bool = False,
) -> tuple[list[Example], DataStats]:
    """Read a file and tokenize it. With `skip_bad`, JSONL lines that are not JSON or not UTF-8 are skipped too."""
    if skip_bad and Path(path).suffix.lower() == ".jsonl":
        rows, bad = _read_jsonl_lenient(Path(path))
    else:
        rows, bad = read_rows(path), {}
    examples, stats = tokenize_rows(rows, tokenizer, seq_len, loss_on, skip_bad)
    for reason, n in bad.items():
        stats.skipped += n
        stats.skip_reasons[reason] = stats.skip_reasons.get(reason, 0) + n
        stats.rows += n
    return examples, stats


def _read_jsonl_lenient(path: Path) -> tuple[list[Row], dict[str, int]]:
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    rows, bad = [], {"not valid JSON": 0, "not valid UTF-8": 0}
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(Row(json.loads(raw.decode("utf-8")), str(path), number))
            except json.JSONDecodeError:
                bad["not valid JSON"] += 1
            except UnicodeDecodeError:
                bad["not valid UTF-8"] += 1
    bad = {reason: n for reason, n in bad.items() if n}
    if not rows:
        reasons = "; ".join(f"{n} lines {reason}" for reason, n in bad.items())
        raise DataError(f"{path}: the file has no examples" + (f" ({reasons})" if bad else ""))
    return rows, bad


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
