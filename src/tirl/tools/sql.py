"""The `sql` tool: one read-only SQL query on a SQLite database file, answered with a small table.

    task: {tools: [sql]}
    tools:
      sql: {database: data/shop.db, max_rows: 50, max_query_s: 5}

Read-only twice over. The file is opened with `mode=ro` (SQLite itself refuses to write it), and an
authorizer admits only what a SELECT needs (reading tables and columns, calling functions, recursive
CTEs) plus the schema-reading pragmas in `READ_PRAGMAS`. Everything else is refused while the
statement is compiled, before it runs, with an error naming what was refused: INSERT, UPDATE, DELETE,
CREATE, DROP, ALTER, transactions and savepoints, ATTACH and DETACH (and so `VACUUM INTO`), every
other pragma (`writable_schema`, ...), and `load_extension()`. A statement SQLite does not submit to
the authorizer (a bare REINDEX with no index to rebuild) does nothing, and could not write anyway.

Limits that are part of the tool's meaning: a query runs for at most `max_query_s` seconds (a
progress handler aborts it inside SQLite, so even a recursive CTE that never ends stops; the model
sees a `timeout` result), at most `max_rows` rows are shown (then a note '... N more rows'), each cell
is cut to `max_cell_chars`, and no string or blob may be longer than `max_value_bytes`. The call as
a whole is under `ToolSet`'s time limit like any tool's (this tool's default: `max_query_s` plus
`CALL_MARGIN_S`).

Each call runs in a thread of its own with a connection of its own (sqlite3 connections must not be
shared across threads), so the event loop never waits on SQLite. The tool description lists the
tables and views with their columns (cut to `max_schema_chars`) so the model knows what to query.

What the model sees: a markdown table (NULL for null, `<blob: N bytes>` for a blob, newlines as
`\\n`); for an SQL error, the error text (status `execution_error`).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from tirl.tools.base import Tool, run_in_daemon_thread
from tirl.tools.providers import ToolSettings, register_provider
from tirl.types import ToolResult, ToolStatus

SQLITE_HEADER = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite database file."""
READ_PRAGMAS = frozenset({"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"})
"""Pragmas a query may use: they only describe the schema."""
REFUSED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer"})
"""SQL functions a query may not call (loading native code; a tokenizer pointer)."""
PROGRESS_STEPS = 1000
"""SQLite virtual-machine steps between two checks of the time limit."""
MAX_COUNTED_ROWS = 100_000
"""Rows past `max_rows` are counted for the '... N more rows' note up to this many."""
CALL_MARGIN_S = 5.0
"""The tool's own call time limit is `max_query_s` plus this (connecting, formatting)."""

_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})
_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{name}"): name.replace("_", " ") for name in (
    "CREATE_INDEX", "CREATE_TABLE", "CREATE_TEMP_INDEX", "CREATE_TEMP_TABLE", "CREATE_TEMP_TRIGGER",
    "CREATE_TEMP_VIEW", "CREATE_TRIGGER", "CREATE_VIEW", "DELETE", "DROP_INDEX", "DROP_TABLE", "DROP_TEMP_INDEX",
    "DROP_TEMP_TABLE", "DROP_TEMP_TRIGGER", "DROP_TEMP_VIEW", "DROP_TRIGGER", "DROP_VIEW", "INSERT", "PRAGMA",
    "TRANSACTION", "UPDATE", "ATTACH", "DETACH", "ALTER_TABLE", "REINDEX", "ANALYZE", "CREATE_VTABLE",
    "DROP_VTABLE", "FUNCTION", "SAVEPOINT")}


class SQLSettings(ToolSettings):
    """Settings of the `sql` tool (`tools.sql.<key>`)."""

    database: str = pydantic.Field(..., description="SQLite database file (opened read-only).")
    database_description: str | None = pydantic.Field(
        None, description="What the database holds, for the tool description (e.g. 'the orders of a shop').")
    max_rows: int = pydantic.Field(50, ge=1, le=10_000, description="Rows shown; the rest are counted in a note.")
    max_cell_chars: int = pydantic.Field(200, ge=8, description="Each cell's text is cut to this length.")
    max_query_s: float = pydantic.Field(5.0, gt=0, le=600, description="A query running longer is stopped.")
    max_query_chars: int = pydantic.Field(10_000, ge=10, description="Longer queries are refused.")
    max_value_bytes: int = pydantic.Field(16 * 2**20, ge=1024, description="Longest string or blob a query may "
                                          "read or build (guards memory).")
    max_schema_chars: int = pydantic.Field(4000, ge=100, description="The schema in the tool description is cut "
                                           "to this length.")

    @pydantic.field_validator("database")
    @classmethod
    def _database_is_sqlite(cls, value: str) -> str:
        path = Path(value).expanduser()
        if not path.exists():
            raise ValueError(f"database file not found: {value}")
        if not path.is_file():
            raise ValueError(f"not a file: {value}")
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise ValueError(f"not a SQLite database (no SQLite header): {value}")
        return value


class _ReadOnlyAuthorizer:
    """`Connection.set_authorizer` callback admitting reads only; remembers the first refusal."""

    def __init__(self) -> None:
        self.refused: str | None = None
        """What was refused first, in words (None while nothing was)."""

    def __call__(self, action: int, arg1: str | None, arg2: str | None, database: str | None,
                 trigger: str | None) -> int:
        if action in _ALLOWED_ACTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() not in REFUSED_FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in READ_PRAGMAS:
            return sqlite3.SQLITE_OK
        if self.refused is None:
            self.refused = _describe_action(action, arg1, arg2)
        return sqlite3.SQLITE_DENY


def _describe_action(action: int, arg1: str | None, arg2: str | None) -> str:
    name = _ACTION_NAMES.get(action, f"operation {action}")
    if action == sqlite3.SQLITE_PRAGMA:
        return f"PRAGMA {arg1}" + (f" = {arg2}" if arg2 is not None else "")
    if action == sqlite3.SQLITE_FUNCTION:
        return f"the function {arg2}()"
    if action in (sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE) and arg1:
        if arg1.lower() in _SCHEMA_TABLES:  # CREATE, DROP and ALTER are first authorised as writes to these
            return "writing the schema (CREATE, DROP, ALTER, ...)"
        return f"{name} on {arg1}"
    return name


def connect_read_only(path: Path, max_value_bytes: int) -> tuple[sqlite3.Connection, _ReadOnlyAuthorizer]:
    """A new connection to `path` opened with `mode=ro`, guarded by the read-only authorizer.

    For use in the calling thread only. ATTACH is also disabled by a limit of 0 attached databases;
    text that is not valid UTF-8 is decoded with replacement characters instead of failing the query.
    """
    connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    connection.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
    connection.text_factory = lambda data: data.decode("utf-8", "replace")
    authorizer = _ReadOnlyAuthorizer()
    connection.set_authorizer(authorizer)
    return connection, authorizer


class QueryTimeout(Exception):
    """The query ran past its time limit and SQLite stopped it."""


@dataclass(frozen=True)
class QueryResult:
    """The rows of one query, as far as they were read."""

    columns: tuple[str, ...]
    """Column names."""
    rows: tuple[tuple[Any, ...], ...]
    """The first `max_rows` rows."""
    more_rows: int
    """Rows past those (counted up to `MAX_COUNTED_ROWS`)."""
    more_is_lower_bound: bool
    """True when counting stopped early (count cap or time limit): there may be more."""


def run_query(path: Path, query: str, settings: SQLSettings) -> QueryResult:
    """Run one query on a fresh read-only connection (blocking; call it from a worker thread).

    Raises `PermissionError` for a refused statement, `QueryTimeout` past `max_query_s`, and
    `sqlite3.Error` for anything else SQLite rejects.
    """
    connection, authorizer = connect_read_only(path, settings.max_value_bytes)
    deadline = time.monotonic() + settings.max_query_s
    timed_out = False

    def past_deadline() -> int:
        nonlocal timed_out
        timed_out = timed_out or time.monotonic() > deadline
        return 1 if timed_out else 0

    connection.set_progress_handler(past_deadline, PROGRESS_STEPS)
    try:
        try:
            cursor = connection.execute(query)
            columns = tuple(d[0] for d in cursor.description or ())
            rows = tuple(cursor.fetchmany(settings.max_rows)) if columns else ()
        except sqlite3.DatabaseError as e:
            if authorizer.refused is not None:
                raise PermissionError(f"refused: {authorizer.refused}. The database is read-only: only SELECT "
                                      "queries and schema pragmas such as PRAGMA table_info(<table>) can run") from None
            if timed_out:
                raise QueryTimeout(f"the query ran longer than {settings.max_query_s:g} s and was stopped") from None
            raise
        more, lower_bound = _count_rest(cursor, timed_out=lambda: timed_out) if columns else (0, False)
        return QueryResult(columns, rows, more, lower_bound)
    finally:
        connection.close()


def _count_rest(cursor: sqlite3.Cursor, timed_out: Any) -> tuple[int, bool]:
    """(rows left in `cursor`, whether counting stopped before the end)."""
    more = 0
    try:
        while more < MAX_COUNTED_ROWS:
            chunk = cursor.fetchmany(min(1000, MAX_COUNTED_ROWS - more))
            if not chunk:
                return more, False
            more += len(chunk)
        return more, cursor.fetchone() is not None
    except sqlite3.DatabaseError:
        if timed_out():
            return more, True
        raise


# ---------------------------------------------------------------------------------------------------
# What the model sees


def format_cell(value: Any, max_chars: int) -> str:
    """One value as table-cell text: NULL, `<blob: N bytes>`, or its text cut to `max_chars` (then `|` and
    newlines escaped, so the table stays one row per line)."""
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return f"<blob: {len(value)} bytes>"
    text = repr(value) if isinstance(value, float) else str(value)
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n").replace("|", "\\|")


def format_table(result: QueryResult, max_cell_chars: int) -> str:
    """The result as a markdown table, with a note for rows not shown or for no rows at all."""
    if not result.columns:
        return "(the statement returned no result)"
    lines = ["| " + " | ".join(format_cell(c, max_cell_chars) for c in result.columns) + " |",
             "|" + "---|" * len(result.columns)]
    lines += ["| " + " | ".join(format_cell(v, max_cell_chars) for v in row) + " |" for row in result.rows]
    if not result.rows:
        lines.append("(no rows)")
    if result.more_rows:
        at_least = "at least " if result.more_is_lower_bound else ""
        lines.append(f"... {at_least}{result.more_rows} more rows (add a LIMIT, a WHERE or an aggregate)")
    return "\n".join(lines)


def describe_schema(path: Path, max_chars: int) -> tuple[str, list[str]]:
    """(one line per table or view: `name(column TYPE, ...)` with primary and foreign keys, cut to
    `max_chars`; the table and view names)."""
    connection, _ = connect_read_only(path, 2**20)
    try:
        objects = connection.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name").fetchall()
        lines = [_describe_table(connection, name, kind) for name, kind in objects]
    finally:
        connection.close()
    names = [name for name, _ in objects]
    text, shown = "", 0
    for line in lines:
        if len(text) + len(line) + 1 > max_chars:
            break
        text, shown = text + line + "\n", shown + 1
    if shown < len(lines):
        text += f"... and {len(lines) - shown} more (SELECT name, sql FROM sqlite_master lists them all)\n"
    return text.rstrip("\n"), names


def _describe_table(connection: sqlite3.Connection, name: str, kind: str) -> str:
    quoted = '"' + name.replace('"', '""') + '"'
    references = {row[3]: f"{row[2]}.{row[4] or '?'}"
                  for row in connection.execute(f"PRAGMA foreign_key_list({quoted})").fetchall()}
    columns = []
    for _, column, declared, _, _, primary_key in connection.execute(f"PRAGMA table_info({quoted})").fetchall():
        text = f"{column} {declared}".strip()
        if primary_key:
            text += " PRIMARY KEY"
        if column in references:
            text += f" -> {references[column]}"
        columns.append(text)
    return f"{name}({', '.join(columns)})" + (" [view]" if kind == "view" else "")


class SQLTool(Tool):
    """The `sql` tool over one database file (shared by every trajectory; it has no state)."""

    name = "sql"

    def __init__(self, settings: SQLSettings):
        """Reads the schema now (a database SQLite cannot open fails here, before any work)."""
        self.settings = settings
        self.path = Path(settings.database).expanduser().resolve()
        schema, self.tables = describe_schema(self.path, settings.max_schema_chars)
        what = settings.database_description or "a SQLite database"
        self.description = (f"Run one read-only SQL query (SQLite dialect) on {what} and get the result as a table "
                            f"(at most {settings.max_rows} rows shown). Only SELECT (and WITH ... SELECT) queries "
                            f"can run.\nTables:\n{schema or '(none)'}")
        self.parameters = {"type": "object", "properties": {"query": {
            "type": "string", "description": "One SQL SELECT statement."}},
            "required": ["query"], "additionalProperties": False}
        self.timeout_s = settings.max_query_s + CALL_MARGIN_S

    async def run(self, query: str) -> str | ToolResult:
        """The result table (run in a worker thread); a `timeout` result past `max_query_s`."""
        if not query.strip():
            raise ValueError("the query is empty: write one SQL SELECT statement")
        if len(query) > self.settings.max_query_chars:
            raise ValueError(f"the query is {len(query)} characters long; the limit is {self.settings.max_query_chars}")
        try:
            result = await run_in_daemon_thread(run_query, self.path, query, self.settings)
        except QueryTimeout as e:
            return ToolResult(call_id="", name=self.name, content=f"Error: {e}", status=ToolStatus.TIMEOUT)
        return format_table(result, self.settings.max_cell_chars)

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"database": str(self.path), "size_bytes": self.path.stat().st_size, "tables": self.tables,
                "read_only": True, "max_rows": s.max_rows, "max_query_s": s.max_query_s,
                "max_cell_chars": s.max_cell_chars}


@register_provider("sql", SQLSettings)
def build_sql(settings: SQLSettings) -> SQLTool:
    """Read-only SQL queries on a SQLite database file; results as a table, with a time limit."""
    return SQLTool(settings)
