"""The task's SQLite files: built once per (schema, seed), written atomically, then only read.

A file is named `<schema>-seed<seed>-<fingerprint>.sqlite`, where the fingerprint hashes the source
of `schemas` (DDL and row generation) and this module, so a change to how rows are drawn gives new
files instead of silently reusing stale ones. A file is built in a temporary file in the same folder
and renamed into place: an interrupted build, or two processes building at once, never leave a
half-written database behind. Reads go through the `sql` tool's read-only connection.
"""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from tirl.tasks.text_to_sql import schemas
from tirl.tasks.text_to_sql.schemas import SCHEMAS, Schema
from tirl.tools.sql import connect_read_only

MAX_VALUE_BYTES = 2**20
"""Longest value a task-side read may build (the task's own queries are tiny)."""


def default_dir() -> Path:
    """`<tirl cache>/text_to_sql`."""
    from tirl.models.embedded import cache_dir

    return cache_dir() / "text_to_sql"


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """12 hex digits of a hash of the code that decides a file's contents."""
    digest = hashlib.sha256()
    for module in (schemas.__file__, __file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:12]


def database_path(schema: str, seed: int, folder: Path | None = None) -> Path:
    """The file of `schema` drawn with `seed`, built now if it is not there yet."""
    if schema not in SCHEMAS:
        raise ValueError(f"unknown database {schema!r}; valid: {', '.join(SCHEMAS)}")
    folder = folder or default_dir()
    path = folder / f"{schema}-seed{seed}-{fingerprint()}.sqlite"
    if not path.is_file():
        build(SCHEMAS[schema], seed, path)
    return path


def draw_rows(schema: Schema, seed: int) -> dict[str, list[tuple]]:
    """Every table's rows, a function of (schema, seed) alone."""
    digest = hashlib.sha256(f"text_to_sql/rows/{schema.name}/{seed}".encode()).digest()
    return schema.fill(random.Random(int.from_bytes(digest[:16], "big")))


def build(schema: Schema, seed: int, path: Path) -> None:
    """Write the database to `path` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = draw_rows(schema, seed)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        connection = sqlite3.connect(tmp)
        try:
            for statement in schema.ddl:
                connection.execute(statement)
            for table, table_rows in rows.items():
                marks = ", ".join("?" * len(table_rows[0]))
                connection.executemany(f"INSERT INTO {table} VALUES ({marks})", table_rows)
            connection.commit()
        finally:
            connection.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the finished database is for every reader
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_all(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """All rows of a read-only query on `path` (the task's own queries; no time limit)."""
    connection, _ = connect_read_only(path, MAX_VALUE_BYTES)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


class Facts:
    """What question templates look up in one database: distinct values, sorted numbers (cached)."""

    def __init__(self, path: Path):
        self.path = path
        self._cache: dict[str, list[Any]] = {}

    def column(self, sql: str) -> list[Any]:
        """The first column of `sql`'s rows (cached by the SQL text)."""
        if sql not in self._cache:
            self._cache[sql] = [row[0] for row in fetch_all(self.path, sql)]
        return self._cache[sql]

    def values(self, table: str, column: str) -> list[Any]:
        """Distinct non-null values of `table.column`, sorted."""
        return self.column(f"SELECT DISTINCT {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {column}")

    def numbers(self, table: str, column: str) -> list[Any]:
        """Every value of `table.column`, sorted (with repeats)."""
        return self.column(f"SELECT {column} FROM {table} WHERE {column} IS NOT NULL ORDER BY {column}")
