"""Tests for tirl.tools.sql, one property each: reads work, every kind of write is refused before it
runs, runaway queries stop, rows are capped, the file never changes, calls do not block the loop."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time

import pytest

from tirl.tools import build_toolset, check_toolset
from tirl.tools.sql import SQLSettings, SQLTool
from tirl.types import ToolCall, ToolStatus

RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "

REFUSED_WRITES = [
    "INSERT INTO customers VALUES (999, 'Eve', 'Nice')",
    "REPLACE INTO customers VALUES (1, 'Eve', 'Nice')",
    "UPDATE orders SET total = 0",
    "DELETE FROM orders",
    "CREATE TABLE stolen(x)",
    "CREATE TEMP TABLE scratch(x)",
    "CREATE INDEX orders_total ON orders(total)",
    "CREATE VIEW v AS SELECT 1",
    "DROP TABLE orders",
    "DROP VIEW big_orders",
    "ALTER TABLE orders ADD COLUMN y",
    "ALTER TABLE orders RENAME TO o",
    "BEGIN",
    "SAVEPOINT s",
    "ANALYZE",
    "REINDEX",
]


@pytest.fixture
def database(tmp_path) -> str:
    path = tmp_path / "shop.db"
    connection = sqlite3.connect(path)
    connection.executescript("""
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT);
        CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), total REAL,
                            note TEXT, receipt BLOB);
        CREATE INDEX orders_customer ON orders(customer_id);
        CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 400;
    """)
    connection.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                           [(1, "Ann", "Paris"), (2, "Bob", "Lyon"), (3, "Cyd", None)])
    connection.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
                           [(i, i % 3 + 1, i * 1.5, None, None) for i in range(1, 301)])
    connection.execute("UPDATE orders SET note = 'fragile|glass\nhandle with care', receipt = x'00ff10' WHERE id = 1")
    connection.commit()
    connection.close()
    return str(path)


def make_toolset(database: str, **settings):
    return build_toolset(["sql"], {"sql": {"database": database, **settings}})


def query(toolset, sql: str):
    return asyncio.run(toolset.execute(ToolCall("call_0", "sql", {"query": sql}), max_output_chars=20_000))


def fingerprint(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns


def test_select_returns_a_markdown_table(database):
    result = query(make_toolset(database), "SELECT id, name, city FROM customers ORDER BY id")
    assert result.status is ToolStatus.OK
    assert result.content == ("| id | name | city |\n|---|---|---|\n"
                              "| 1 | Ann | Paris |\n| 2 | Bob | Lyon |\n| 3 | Cyd | NULL |")


def test_cells_are_escaped_blobs_summarised_and_long_text_cut(database):
    toolset = make_toolset(database, max_cell_chars=12)
    result = query(toolset, "SELECT note, receipt, total FROM orders WHERE id = 1")
    assert result.content.splitlines()[2] == r"| fragile\|g... | <blob: 3 bytes> | 1.5 |"


def test_joins_aggregates_views_and_recursive_ctes_are_reads(database):
    toolset = make_toolset(database)
    joined = query(toolset, "SELECT c.name, count(*) AS n FROM orders o JOIN customers c ON c.id = o.customer_id "
                            "GROUP BY c.name ORDER BY c.name")
    assert joined.content.endswith("| Ann | 100 |\n| Bob | 100 |\n| Cyd | 100 |")
    assert query(toolset, "SELECT count(*) FROM big_orders").content.endswith("| 34 |")
    assert query(toolset, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) "
                          "SELECT sum(x) AS s FROM c").content.endswith("| 15 |")


@pytest.mark.parametrize("sql", REFUSED_WRITES)
def test_writes_schema_changes_and_transactions_are_refused(database, sql):
    result = query(make_toolset(database), sql)
    assert result.status is ToolStatus.EXECUTION_ERROR
    assert result.content.startswith("Error: PermissionError: refused: ") and "read-only" in result.content


@pytest.mark.parametrize("sql", ["ATTACH DATABASE '{target}' AS other", "VACUUM INTO '{target}'",
                                 "DETACH DATABASE main"])
def test_attach_detach_and_vacuum_into_are_refused(database, tmp_path, sql):
    target = tmp_path / "copy.db"
    result = query(make_toolset(database), sql.format(target=target))
    assert result.status is ToolStatus.EXECUTION_ERROR and "refused: " in result.content
    assert not target.exists()


@pytest.mark.parametrize("sql", ["PRAGMA writable_schema = 1", "PRAGMA writable_schema = ON", "PRAGMA user_version = 7",
                                 "PRAGMA journal_mode = DELETE", "PRAGMA schema_version = 99", "PRAGMA database_list"])
def test_pragmas_other_than_schema_reads_are_refused(database, sql):
    result = query(make_toolset(database), sql)
    assert result.status is ToolStatus.EXECUTION_ERROR and "refused: PRAGMA " in result.content


def test_schema_reading_pragmas_are_allowed(database):
    result = query(make_toolset(database), "PRAGMA table_info(customers)")
    assert result.status is ToolStatus.OK and "| 1 | name | TEXT | 1 | NULL | 0 |" in result.content


def test_load_extension_is_refused(database):
    result = query(make_toolset(database), "SELECT load_extension('/nonexistent/evil')")
    assert "refused: the function load_extension()" in result.content


def test_file_is_byte_identical_after_every_refused_write(database, tmp_path):
    before = fingerprint(database)
    toolset = make_toolset(database)
    for sql in REFUSED_WRITES + ["PRAGMA writable_schema = 1", "PRAGMA user_version = 7", "VACUUM",
                                 f"VACUUM INTO '{tmp_path / 'x.db'}'", "SELECT load_extension('x')"]:
        assert query(toolset, sql).status is ToolStatus.EXECUTION_ERROR, sql
    assert fingerprint(database) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shop.db"]  # no journal, no copies


def test_runaway_recursive_cte_is_stopped_by_the_time_limit(database):
    toolset = make_toolset(database, max_query_s=0.3)
    start = time.perf_counter()
    result = query(toolset, RUNAWAY + "SELECT count(*) FROM c")
    assert result.status is ToolStatus.TIMEOUT and "longer than 0.3 s" in result.content
    assert time.perf_counter() - start < 2.0


def test_rows_are_capped_with_a_note(database):
    result = query(make_toolset(database, max_rows=3), "SELECT id FROM orders ORDER BY id")
    assert result.content.splitlines() == ["| id |", "|---|", "| 1 |", "| 2 |", "| 3 |",
                                           "... 297 more rows (add a LIMIT, a WHERE or an aggregate)"]


def test_endless_result_shows_rows_and_a_lower_bound(database):
    result = query(make_toolset(database, max_rows=2, max_query_s=2), RUNAWAY + "SELECT x FROM c")
    assert result.status is ToolStatus.OK
    assert result.content.splitlines()[2:4] == ["| 1 |", "| 2 |"] and "... at least 100000 more rows" in result.content


def test_empty_result_is_a_header_and_a_note(database):
    result = query(make_toolset(database), "SELECT name FROM customers WHERE id > 99")
    assert result.content == "| name |\n|---|\n(no rows)"


@pytest.mark.parametrize("sql, message", [
    ("SELECT * FROM nowhere", "OperationalError: no such table: nowhere"),
    ("SELEC 1", 'OperationalError: near "SELEC": syntax error'),
    ("SELECT 1; SELECT 2", "ProgrammingError: You can only execute one statement at a time."),
    ("SELECT randomblob(10000000)", "string or blob too big"),
    ("  ", "the query is empty"),
])
def test_sql_errors_are_text_the_model_sees(database, sql, message):
    result = query(make_toolset(database, max_value_bytes=1_000_000), sql)
    assert result.status is ToolStatus.EXECUTION_ERROR and message in result.content


def test_description_lists_tables_columns_and_keys(database):
    tool = make_toolset(database, database_description="a small shop").get("sql")
    assert "on a small shop" in tool.description
    assert "customers(id INTEGER PRIMARY KEY, name TEXT, city TEXT)" in tool.description
    assert "orders(id INTEGER PRIMARY KEY, customer_id INTEGER -> customers.id, total REAL" in tool.description
    assert "big_orders(" in tool.description and "[view]" in tool.description
    assert tool.describe()["tables"] == ["big_orders", "customers", "orders"]


def test_schema_in_the_description_is_capped(tmp_path):
    path = tmp_path / "wide.db"
    connection = sqlite3.connect(path)
    for i in range(60):
        connection.execute(f"CREATE TABLE table_{i:02d}(" + ", ".join(f"column_{j} TEXT" for j in range(8)) + ")")
    connection.close()
    tool = SQLTool(SQLSettings(database=str(path), max_schema_chars=500))
    schema = tool.description.split("Tables:\n", 1)[1]
    assert len(schema) < 600 and schema.endswith("more (SELECT name, sql FROM sqlite_master lists them all)")


def test_calls_run_in_worker_threads_without_blocking_the_event_loop(database):
    toolset = make_toolset(database, max_query_s=1.0)

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        runaway = ToolCall("slow", "sql", {"query": RUNAWAY + "SELECT count(*) FROM c"})
        slow = asyncio.create_task(toolset.execute(runaway))
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        count = {"query": "SELECT count(*) FROM orders"}
        fast = await asyncio.gather(*(toolset.execute(ToolCall(f"f{i}", "sql", count)) for i in range(8)))
        fast_s = time.perf_counter() - start
        slow_result = await slow
        tick_task.cancel()
        return fast, fast_s, slow_result, ticks

    fast, fast_s, slow_result, ticks = asyncio.run(scenario())
    assert all(r.content.endswith("| 300 |") for r in fast) and fast_s < 0.5
    assert slow_result.status is ToolStatus.TIMEOUT
    assert ticks >= 20  # the loop kept running while SQLite worked for a second


@pytest.mark.parametrize("make_path, message", [
    (lambda tmp: tmp / "missing.db", "tools.sql.database: Value error, database file not found"),
    (lambda tmp: tmp, "tools.sql.database: Value error, not a file"),
    (lambda tmp: (tmp / "notes.db").write_text("not a database") and tmp / "notes.db",
     "tools.sql.database: Value error, not a SQLite database"),
])
def test_bad_database_setting_is_an_error_naming_the_key(tmp_path, make_path, message):
    settings = {"sql": {"database": str(make_path(tmp_path))}}
    for check in (check_toolset, build_toolset):
        with pytest.raises(ValueError, match=message):
            check(["sql"], settings)


def test_other_bad_settings_name_their_key(database):
    with pytest.raises(ValueError, match="tools.sql.max_rows: Input should be greater than or equal to 1"):
        check_toolset(["sql"], {"sql": {"database": database, "max_rows": 0}})
    with pytest.raises(ValueError, match="tools.sql.rows: unknown key"):
        check_toolset(["sql"], {"sql": {"database": database, "rows": 5}})
