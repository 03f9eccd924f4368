"""Reading a search corpus: JSONL (by byte offset, on demand) or parquet (in memory), every row checked.

A row needs a non-empty string text, a string title unless the corpus has none, and optionally a
string or integer id (default: its 1-based row number). A malformed row is a `DataError` naming the
file and the line (JSONL) or row (parquet).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tirl.errors import DataError

CORPUS_SUFFIXES = (".jsonl", ".ndjson", ".parquet")


@dataclass(frozen=True)
class Passage:
    """One row of the corpus."""

    id: str
    """The row's id field, else its row number (1-based)."""
    title: str
    """Its title ('' when the corpus has no titles)."""
    text: str
    """Its text."""

    def indexed_text(self) -> str:
        """What the retrievers see: title and text."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True)
class Fields:
    """Which fields of a row hold what."""

    text: str
    """Field of the text (required in every row)."""
    title: str | None
    """Field of the title (required in every row when set)."""
    id: str
    """Field of the id (optional in rows)."""


def passage_from_row(row: Any, fields: Fields, where: str, default_id: str) -> Passage:
    """The passage in a decoded row; `DataError` naming `where` (file and line) if the row is malformed."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get(fields.text)
    if not isinstance(text, str) or not text.strip():
        problem = "missing" if text is None else "empty" if isinstance(text, str) else f"a {type(text).__name__}"
        raise DataError(f"{where}: text field {fields.text!r} is {problem} (it must be a non-empty string)")
    title = ""
    if fields.title is not None:
        title = row.get(fields.title)
        if not isinstance(title, str):
            problem = "missing" if title is None else f"a {type(title).__name__}"
            raise DataError(f"{where}: title field {fields.title!r} is {problem} (it must be a string; set "
                            "title_field: null for a corpus without titles)")
    raw_id = row.get(fields.id)
    if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (str, int))):
        raise DataError(f"{where}: id field {fields.id!r} must be a string or an integer")
    return Passage(id=default_id if raw_id is None else str(raw_id), title=title, text=text)


def scan_jsonl(path: Path, fields: Fields) -> Iterator[tuple[int, Passage]]:
    """(byte offset of the line, passage) for every non-blank line; `DataError` naming file and line.

    A row without an id gets its row number (1-based, blank lines not counted).
    """
    offset, rows = 0, 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if line.strip():
                rows += 1
                yield start, _parse_jsonl_line(line, fields, f"{path}, line {line_no}", str(rows))


def _parse_jsonl_line(line: bytes, fields: Fields, where: str, default_id: str) -> Passage:
    try:
        row = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise DataError(f"{where}: not valid JSON ({e})") from None
    return passage_from_row(row, fields, where, default_id)


class JsonlPassages:
    """The passages of a JSONL corpus, read from the file by byte offset when asked for."""

    def __init__(self, path: Path, fields: Fields, offsets: np.ndarray):
        self.path, self.fields, self.offsets = path, fields, offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def get(self, index: int) -> Passage:
        """Passage number `index` (0-based)."""
        offset = int(self.offsets[index])
        with open(self.path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        return _parse_jsonl_line(line, self.fields, f"{self.path}, byte {offset}", str(index + 1))

    def iter_passages(self) -> Iterator[Passage]:
        """Every passage, in order (one pass over the file)."""
        return (p for _, p in scan_jsonl(self.path, self.fields))


class MemoryPassages:
    """The passages of a corpus held in memory (parquet)."""

    def __init__(self, passages: list[Passage]):
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    def get(self, index: int) -> Passage:
        """Passage number `index` (0-based)."""
        return self.passages[index]

    def iter_passages(self) -> Iterator[Passage]:
        """Every passage, in order."""
        return iter(self.passages)


def read_parquet(path: Path, fields: Fields) -> list[Passage]:
    """Every row of a parquet corpus as a passage (pyarrow, else pandas); `DataError` naming file and row."""
    try:
        table = _read_parquet_columns(path, fields)
    except (DataError, ImportError):
        raise
    except Exception as e:  # pyarrow's and pandas' errors for a file that is not parquet
        raise DataError(f"{path}: cannot be read as parquet ({type(e).__name__}: {e})") from e
    size = len(table[fields.text])
    return [passage_from_row({name: values[i] for name, values in table.items()}, fields,
                             f"{path}, row {i + 1}", str(i + 1)) for i in range(size)]


def _read_parquet_columns(path: Path, fields: Fields) -> dict[str, list[Any]]:
    """{column: values} of the text, title and (if present) id columns, nulls as None."""
    required = [fields.text] + ([fields.title] if fields.title is not None else [])
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    if pq is not None:
        names = list(pq.read_schema(path).names)
    else:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError(f"reading the parquet corpus {path} needs pyarrow or pandas (pip install pyarrow); "
                              "or give the corpus as JSONL") from None
        frame = pd.read_parquet(path)
        names = list(frame.columns)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(map(str, names))})")
    columns = required + ([fields.id] if fields.id in names else [])
    if pq is not None:
        return pq.read_table(path, columns=columns).to_pydict()
    return {c: [None if _is_missing(v) else v for v in frame[c].tolist()] for c in columns}


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN
