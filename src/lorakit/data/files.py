"""Data files in, rows out: the formats `lorakit train` reads, each row with its location.

Files: .jsonl, .json (a list of rows, or {"data": [...]}), .csv, .parquet, and local `datasets`
directories (saved with `save_to_disk`). A file that cannot be read raises `DataError` naming the
file and line (or row): bad UTF-8, bad JSON, a CSV row with more fields than its header (an
unquoted comma), a CSV field longer than `MAX_FIELD_CHARS`.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "json", "csv", "parquet", "datasets directory")

MAX_FIELD_CHARS = 8 * 2**20
"""Longest text field accepted (text, prompt, completion, a message's content), in characters."""


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


# reading files ----------------------------------------------------------------------------


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
    rows = []
    # The csv module's field limit is global; lift it to the per-field limit for this read only.
    previous = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            try:
                for number, r in enumerate(reader, start=1):
                    # Line numbers count the header as line 1, so they match what an editor shows.
                    if None in r:
                        width = len(reader.fieldnames or ()) + len(r[None])
                        raise DataError(
                            f"{path}:{reader.line_num}: row {number} has {width} fields but the header has "
                            f"{len(reader.fieldnames or ())} ({', '.join(reader.fieldnames or ())}); a value that holds "
                            'a comma must be quoted, as in "Hello, world"'
                        )
                    rows.append(Row(dict(r), str(path), reader.line_num))
            except csv.Error as err:
                if "field larger than field limit" in str(err):
                    raise DataError(f"{path}:{reader.line_num + 1}: a field is longer than {MAX_FIELD_CHARS} characters, "
                                    "the most a text field may hold (MAX_FIELD_CHARS); shorten or split it") from None
                raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None
    finally:
        csv.field_size_limit(previous)
    return rows


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


def read_jsonl_lenient(path: Path) -> tuple[list[Row], dict[str, int]]:
    """A JSONL file's rows, skipping lines that are not JSON or not UTF-8; also their count by reason."""
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
