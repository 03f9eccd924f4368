"""Comparing two query results the way execution accuracy does.

Two results match when they have the same number of columns and the same rows, where

- rows form a multiset (duplicates count: a missing DISTINCT is wrong), and a list, in order, only
  when the gold query sorts its result (`has_top_level_order_by`);
- numbers compare within a tolerance (`math.isclose`, relative and absolute), and an integer equals
  the same float (COUNT's 5 and 5.0); text, NULL and blobs compare exactly; a number never equals
  text ('5' is not 5);
- columns may come in another order (`SELECT city, COUNT(*)` vs `SELECT COUNT(*), city`) when
  `ignore_column_order`, up to `MAX_PERMUTED_COLUMNS` columns; column names never matter.

Unordered rows are compared after sorting both sides by a key that rounds numbers to
`SORT_DECIMALS` decimals, so a value computed two ways (AVG vs SUM/COUNT) sorts to the same place.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from itertools import permutations
from typing import Any

MAX_PERMUTED_COLUMNS = 5
"""Column orders are tried up to this many columns (5! = 120 orders); wider results keep their order."""
SORT_DECIMALS = 6

Row = tuple[Any, ...]

_QUOTED_OR_COMMENT = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|--[^\n]*|/\*.*?(?:\*/|$)",
                                re.DOTALL)
_PAREN_OR_ORDER_BY = re.compile(r"\(|\)|\border\s+by\b", re.IGNORECASE)


def has_top_level_order_by(sql: str) -> bool:
    """Whether the statement itself sorts its result: an ORDER BY outside every parenthesis (so not one
    inside a subquery or a window), ignoring string literals, quoted names and comments."""
    depth = 0
    for match in _PAREN_OR_ORDER_BY.finditer(_QUOTED_OR_COMMENT.sub(" ", sql)):
        token = match.group(0)
        if token == "(":
            depth += 1
        elif token == ")":
            depth = max(0, depth - 1)
        elif depth == 0:
            return True
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sort_key(row: Row) -> tuple:
    """A total order over rows of mixed SQLite values: NULL < numbers < text < blobs."""
    key = []
    for value in row:
        if value is None:
            key.append((0, 0.0, ""))
        elif _is_number(value):
            key.append((1, round(float(value), SORT_DECIMALS), ""))
        elif isinstance(value, str):
            key.append((2, 0.0, value))
        else:
            key.append((3, 0.0, repr(value)))
    return tuple(key)


def values_equal(a: Any, b: Any, tolerance: float) -> bool:
    """Equal as SQL values: numbers within `tolerance` (relative and absolute), the rest exactly."""
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=tolerance, abs_tol=tolerance)
    if _is_number(a) or _is_number(b):
        return False
    return type(a) is type(b) and a == b


def _rows_equal(pred: Sequence[Row], gold: Sequence[Row], ordered: bool, tolerance: float) -> bool:
    if len(pred) != len(gold):
        return False
    if not ordered:
        pred, gold = sorted(pred, key=_sort_key), sorted(gold, key=_sort_key)
    return all(len(p) == len(g) and all(values_equal(x, y, tolerance) for x, y in zip(p, g))
               for p, g in zip(pred, gold))


def results_match(pred_rows: Sequence[Row], pred_width: int, gold_rows: Sequence[Row], gold_width: int,
                  ordered: bool, tolerance: float = 1e-6, ignore_column_order: bool = True) -> bool:
    """Whether a predicted result equals the gold one (module docstring). Widths are column counts, so
    two empty results of different shapes do not match."""
    if pred_width != gold_width:
        return False
    if _rows_equal(pred_rows, gold_rows, ordered, tolerance):
        return True
    if not ignore_column_order or pred_width > MAX_PERMUTED_COLUMNS or len(pred_rows) != len(gold_rows):
        return False
    identity = tuple(range(pred_width))
    for order in permutations(range(pred_width)):
        if order != identity and _rows_equal([tuple(r[i] for i in order) for r in pred_rows], gold_rows, ordered,
                                             tolerance):
            return True
    return False
