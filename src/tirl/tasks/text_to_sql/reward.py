"""`sql_result_match`: execution accuracy of the final query, run read-only with a time limit.

Contract: the model's final message holds its query as `<answer>SELECT ...</answer>` (the last such
tag counts; a ```sql fence inside it is removed); the problem holds the gold query in `answer` and
the database file in `info["database_path"]`. Both queries run on a fresh read-only connection of
the `sql` tool (`mode=ro`, the authorizer that refuses every write, a time limit inside SQLite), and
their results are compared by `tirl.tasks.text_to_sql.results` (a multiset of rows, a list when the
gold sorts, numbers within a tolerance).

The total is 1.0 iff the results match, plus optional bonuses for a well-formed answer and for a
query that runs (`format_bonus`, `execution_bonus`; 0 by default). Components, reported as metrics:
`correct`, `format` (an answer tag holding a query) and `executes` (it ran and returned rows) as 0/1,
and for a failed answer exactly one `error/<why>` = 1: `no_answer`, `too_long`, `refused` (a write,
ATTACH, a pragma, ...), `sql_error` (syntax, unknown table or column, two statements), `timeout`,
`no_result` (a statement without a result), `too_many_rows`, `wrong_result`. Model output never
raises; a gold query that fails does (a bug of the task).

`require_tag=false` (for evaluating a model never taught the tag) also reads an untagged answer:
its last ```-fenced block, else the whole message when it begins with SELECT or WITH; `format`
stays 1 only for a tagged answer.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.tasks.base import Problem
from tirl.tasks.text_to_sql.results import has_top_level_order_by, results_match
from tirl.tools.base import run_in_daemon_thread
from tirl.tools.sql import QueryTimeout, SQLSettings, run_query
from tirl.types import Trajectory

REWARD_NAME = "sql_result_match"
MAX_RESULT_ROWS = 10_000
"""Rows read from a result; a longer predicted result is `too_many_rows` (the gold must be shorter)."""
MAX_QUERY_CHARS = 10_000
"""A longer answer is `too_long` and is not run."""

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"^```[A-Za-z]*\s*(.*?)\s*```$", re.DOTALL)
_FENCED_RE = re.compile(r"```[A-Za-z]*\s*(.*?)\s*```", re.DOTALL)
_BARE_RE = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)


def extract_query(text: str | None) -> str | None:
    """The query in the last `<answer>...</answer>` of `text`, stripped and unfenced; None without a tag."""
    if text is None:
        return None
    found = _ANSWER_RE.findall(text)
    if not found:
        return None
    query = found[-1].strip()
    fenced = _FENCE_RE.match(query)
    return fenced.group(1).strip() if fenced else query


def untagged_query(text: str | None) -> str | None:
    """The last ```-fenced block of `text`, else `text` itself when it begins with SELECT or WITH."""
    if not text:
        return None
    blocks = [b.strip() for b in _FENCED_RE.findall(text) if b.strip()]
    if blocks:
        return blocks[-1]
    return text.strip() if _BARE_RE.match(text) else None


@dataclass(frozen=True)
class Execution:
    """What running one query gave: its rows, or why there are none."""

    rows: tuple[tuple[Any, ...], ...] = ()
    width: int = 0
    """Number of columns."""
    error: str | None = None
    """None when it ran; else the `error/<why>` name (module docstring)."""
    message: str = ""
    """SQLite's or the authorizer's words, for debugging."""


def execute(path: Path, query: str, max_query_s: float) -> Execution:
    """Run `query` read-only on `path` (blocking); every failure is an `Execution` with an error."""
    if not query:
        return Execution(error="no_answer", message="empty answer")
    if len(query) > MAX_QUERY_CHARS:
        return Execution(error="too_long", message=f"{len(query)} characters")
    settings = SQLSettings(database=str(path), max_rows=MAX_RESULT_ROWS, max_query_s=max_query_s)
    try:
        result = run_query(path, query, settings)
    except PermissionError as e:
        return Execution(error="refused", message=str(e))
    except QueryTimeout as e:
        return Execution(error="timeout", message=str(e))
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError, MemoryError) as e:
        return Execution(error="sql_error", message=f"{type(e).__name__}: {e}")
    if not result.columns:
        return Execution(error="no_result", message="the statement returned no result")
    if result.more_rows:
        return Execution(error="too_many_rows", message=f"more than {MAX_RESULT_ROWS} rows")
    return Execution(rows=result.rows, width=len(result.columns))


@lru_cache(maxsize=4096)
def gold_execution(path: str, sql: str, max_query_s: float) -> Execution:
    """The gold query's result (cached); raises ValueError when the gold query itself fails."""
    result = execute(Path(path), sql, max_query_s)
    if result.error is not None:
        raise ValueError(f"gold query failed ({result.error}: {result.message}) on {path}: {sql}")
    return result


def database_of(problem: Problem) -> Path:
    """`problem.info["database_path"]`; ValueError when missing or not a file (a task bug)."""
    path = problem.info.get("database_path")
    if not path or not Path(path).is_file():
        raise ValueError(f"problem {problem.id!r} has no database file in info['database_path'] (got {path!r})")
    return Path(path)


@REWARDS.register(REWARD_NAME)
async def sql_result_match(trajectory: Trajectory, problem: Problem, group: GroupContext, format_bonus: float = 0.0,
                           execution_bonus: float = 0.0, tolerance: float = 1e-6, max_query_s: float = 5.0,
                           ignore_column_order: bool = True, require_tag: bool = True) -> RewardResult:
    """Execution accuracy: 1 iff the <answer> query gives the gold query's rows (in order if the gold sorts); read-only.

    `tolerance` is the relative and absolute tolerance on numbers; `max_query_s` limits each query;
    `ignore_column_order` accepts the gold's columns in another order; `require_tag=false` also reads
    an untagged query (module docstring).
    """
    path = database_of(problem)
    gold = gold_execution(str(path), problem.answer, max_query_s)
    query = tagged = extract_query(trajectory.final_answer)
    if query is None and not require_tag:
        query = untagged_query(trajectory.final_answer)
    if query is None:
        pred = Execution(error="no_answer", message="no <answer> tag")
    else:
        pred = await run_in_daemon_thread(execute, path, query, max_query_s)
    correct = pred.error is None and results_match(pred.rows, pred.width, gold.rows, gold.width,
                                                   has_top_level_order_by(problem.answer), tolerance,
                                                   ignore_column_order)
    well_formed = bool(tagged)
    components = {"correct": float(correct), "format": float(well_formed), "executes": float(pred.error is None)}
    why = pred.error or (None if correct else "wrong_result")
    if why is not None:
        components[f"error/{why}"] = 1.0
    total = float(correct) + format_bonus * well_formed + execution_bonus * (pred.error is None)
    return RewardResult(total=total, components=components, correct=correct)


def _validate(params: dict[str, Any], task_reward: str) -> None:
    """Reject a non-boolean `require_tag` before any work starts (called by `check_params`)."""
    if not isinstance(params.get("require_tag", True), bool):
        raise ValueError(f"reward {REWARD_NAME!r}: require_tag must be true or false, got {params['require_tag']!r}")


sql_result_match.validate = _validate  # type: ignore[attr-defined]
