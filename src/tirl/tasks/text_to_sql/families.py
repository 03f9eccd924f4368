"""Question families of the text-to-SQL task, by difficulty level, each a question with its gold query.

A family is a function `(schema, facts, rng) -> Draft | None` written against the schema's
`Entity`/`Relation` facts, so every family works on every database that has what it needs (None when
the database has nothing to ask about, e.g. no labelled child table for `join_list`). Values in the
questions come from the database itself (`Facts`), so filters always match some rows.

Levels (one SQL idea more per level):

1. single-table filters: `SELECT name FROM customers WHERE city = 'Paris'`, `... WHERE price > 120`;
2. aggregates: `COUNT(*)`, `AVG/MIN/MAX/SUM(...)`, with or without a filter;
3. `GROUP BY` and `ORDER BY ... LIMIT` on one table (top-k, arg-max, sorted lists);
4. two-table `JOIN`s: filter on the parent, distinct parents of matching children, counts and
   aggregates per parent category;
5. nested queries and `HAVING`: above-average rows, parents without children (`NOT IN`), parents
   with more than n children, the parent with the most children, and three-table joins.

A draft also carries what makes it unambiguous: `same_as`, other readings of the question that must
give the same result (a group count that would differ with a LEFT JOIN is redrawn), and
`distinct_keys`, the sort keys of an ordered answer that must hold no tie (else two correct queries
could order or cut the rows differently).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tirl.tasks.text_to_sql.database import Facts
from tirl.tasks.text_to_sql.schemas import Column, Entity, Relation, Schema


@dataclass(frozen=True)
class Draft:
    """A question and its gold query, before the gold result is checked."""

    question: str
    sql: str
    same_as: tuple[str, ...] = ()
    """Other readings of the question; each must return the gold result, else the draft is redrawn."""
    distinct_keys: str | None = None
    """SQL of the sort keys of the gold rows (and of the first row cut by LIMIT); a repeat means a tie."""


Family = Callable[[Schema, Facts, random.Random], "Draft | None"]

AGGREGATES = (("average", "AVG"), ("highest", "MAX"), ("lowest", "MIN"), ("total", "SUM"))
"""(question word, SQL function); "total" only for summable columns."""
COMPARISONS = (("greater than", ">"), ("less than", "<"))


def lit(value: Any) -> str:
    """`value` as an SQL literal ('text' with quotes doubled, or a number)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _pick(rng: random.Random, options: list) -> Any:
    """A random member of `options`, or None when there is none."""
    return rng.choice(options) if options else None


def _aggregate(rng: random.Random, column: Column) -> tuple[str, str]:
    return rng.choice([a for a in AGGREGATES if column.summable or a[1] != "SUM"])


def _threshold(facts: Facts, table: str, column: str, rng: random.Random) -> int:
    """An integer inside the column's range (between its 20th and 80th percentiles)."""
    values = facts.numbers(table, column)
    return int(values[rng.randint(len(values) // 5, (4 * len(values)) // 5)])


def _order(rng: random.Random) -> tuple[str, str]:
    """("highest", "DESC") or ("lowest", "ASC")."""
    return rng.choice((("highest", "DESC"), ("lowest", "ASC")))


def _links(schema: Schema) -> list[tuple[Relation, Entity, Entity]]:
    """(relation, child entity, parent entity) for every relation."""
    return [(r, schema.entity(r.child), schema.entity(r.parent)) for r in schema.relations]


def _join(r: Relation) -> str:
    return f"{r.child} JOIN {r.parent} ON {r.child}.{r.fk} = {r.parent}.id"


def _condition(facts: Facts, e: Entity, rng: random.Random) -> tuple[str, str] | None:
    """("whose status is cancelled", "orders.status = 'cancelled'"), or a numeric comparison."""
    options = [("category", c) for c in e.categories] + [("number", c) for c in e.numbers]
    kind, column = _pick(rng, options) or (None, None)
    if column is None:
        return None
    if kind == "category":
        value = rng.choice(facts.values(e.table, column.name))
        return f"whose {column.phrase} is {value}", f"{e.table}.{column.name} = {lit(value)}"
    word, op = rng.choice(COMPARISONS)
    x = _threshold(facts, e.table, column.name, rng)
    return f"whose {column.phrase} is {word} {x}", f"{e.table}.{column.name} {op} {x}"


# --- level 1: single-table filters -------------------------------------------------------------------


def list_where_category(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities if e.label for c in e.categories])
    if pick is None:
        return None
    e, c = pick
    v = rng.choice(f.values(e.table, c.name))
    return Draft(f"List the {e.labels} of the {e.plural} whose {c.phrase} is {v}.",
                 f"SELECT {e.label} FROM {e.table} WHERE {c.name} = {lit(v)}")


def list_where_number(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities if e.label for c in e.numbers])
    if pick is None:
        return None
    e, c = pick
    word, op = rng.choice(COMPARISONS)
    x = _threshold(f, e.table, c.name, rng)
    return Draft(f"List the {e.labels} of the {e.plural} whose {c.phrase} is {word} {x}.",
                 f"SELECT {e.label} FROM {e.table} WHERE {c.name} {op} {x}")


def count_all(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    e = rng.choice(s.entities)
    return Draft(f"How many {e.plural} are there?", f"SELECT COUNT(*) FROM {e.table}")


# --- level 2: aggregates -----------------------------------------------------------------------------


def count_where(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities for c in e.categories])
    if pick is None:
        return None
    e, c = pick
    v = rng.choice(f.values(e.table, c.name))
    return Draft(f"How many {e.plural} are there whose {c.phrase} is {v}?",
                 f"SELECT COUNT(*) FROM {e.table} WHERE {c.name} = {lit(v)}")


def count_where_number(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities for c in e.numbers])
    if pick is None:
        return None
    e, c = pick
    word, op = rng.choice(COMPARISONS)
    x = _threshold(f, e.table, c.name, rng)
    return Draft(f"How many {e.plural} have {article(c.phrase)} {c.phrase} {word} {x}?",
                 f"SELECT COUNT(*) FROM {e.table} WHERE {c.name} {op} {x}")


def aggregate(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities for c in e.numbers])
    if pick is None:
        return None
    e, c = pick
    word, fn = _aggregate(rng, c)
    return Draft(f"What is the {word} {c.phrase} of all {e.plural}?", f"SELECT {fn}({c.name}) FROM {e.table}")


def aggregate_where(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c, n) for e in s.entities for c in e.categories for n in e.numbers])
    if pick is None:
        return None
    e, c, n = pick
    v = rng.choice(f.values(e.table, c.name))
    word, fn = _aggregate(rng, n)
    return Draft(f"What is the {word} {n.phrase} of the {e.plural} whose {c.phrase} is {v}?",
                 f"SELECT {fn}({n.name}) FROM {e.table} WHERE {c.name} = {lit(v)}")


# --- level 3: GROUP BY, ORDER BY ... LIMIT ------------------------------------------------------------


def group_count(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities for c in e.categories])
    if pick is None:
        return None
    e, c = pick
    return Draft(f"For each {c.phrase}, how many {e.plural} are there? Give the {c.phrase} and the count.",
                 f"SELECT {c.name}, COUNT(*) FROM {e.table} GROUP BY {c.name}")


def group_aggregate(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c, n) for e in s.entities for c in e.categories for n in e.numbers])
    if pick is None:
        return None
    e, c, n = pick
    word, fn = _aggregate(rng, n)
    return Draft(f"For each {c.phrase}, what is the {word} {n.phrase} of the {e.plural}? "
                 f"Give the {c.phrase} and the {word} {n.phrase}.",
                 f"SELECT {c.name}, {fn}({n.name}) FROM {e.table} GROUP BY {c.name}")


def top_k(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, n) for e in s.entities if e.label for n in e.numbers])
    if pick is None:
        return None
    e, n = pick
    k = rng.randint(2, 5)
    word, order = _order(rng)
    return Draft(f"List the {e.labels} of the {k} {e.plural} with the {word} {n.phrase}, {word} first.",
                 f"SELECT {e.label} FROM {e.table} ORDER BY {n.name} {order} LIMIT {k}",
                 distinct_keys=f"SELECT {n.name} FROM {e.table} ORDER BY {n.name} {order} LIMIT {k + 1}")


def arg_max(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, n) for e in s.entities if e.label for n in e.numbers])
    if pick is None:
        return None
    e, n = pick
    word, order = _order(rng)
    return Draft(f"Which {e.singular} has the {word} {n.phrase}? Give its {e.label_phrase}.",
                 f"SELECT {e.label} FROM {e.table} ORDER BY {n.name} {order} LIMIT 1",
                 distinct_keys=f"SELECT {n.name} FROM {e.table} ORDER BY {n.name} {order} LIMIT 2")


def sorted_where(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c, n) for e in s.entities if e.label for c in e.categories for n in e.numbers])
    if pick is None:
        return None
    e, c, n = pick
    v = rng.choice(f.values(e.table, c.name))
    word, order = _order(rng)
    where = f"WHERE {c.name} = {lit(v)}"
    return Draft(f"List the {e.labels} of the {e.plural} whose {c.phrase} is {v}, {word} {n.phrase} first.",
                 f"SELECT {e.label} FROM {e.table} {where} ORDER BY {n.name} {order}",
                 distinct_keys=f"SELECT {n.name} FROM {e.table} {where}")


# --- level 4: JOINs ----------------------------------------------------------------------------------


def join_list(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p, c) for r, ch, p in _links(s) if ch.label for c in p.categories])
    if pick is None:
        return None
    r, ch, p, c = pick
    v = rng.choice(f.values(p.table, c.name))
    return Draft(f"List the {ch.labels} of the {ch.plural} {r.verb} {p.plural} whose {c.phrase} is {v}.",
                 f"SELECT {ch.table}.{ch.label} FROM {_join(r)} WHERE {p.table}.{c.name} = {lit(v)}")


def join_parents(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p) for r, ch, p in _links(s) if p.label and (ch.categories or ch.numbers)])
    if pick is None:
        return None
    r, ch, p = pick
    phrase, where = _condition(f, ch, rng)
    has = r.has.format(x=f"at least one {ch.singular} {phrase}")
    return Draft(f"Give the {p.labels} of the {p.plural} {has} (each {p.label_phrase} once).",
                 f"SELECT DISTINCT {p.table}.{p.label} FROM {_join(r)} WHERE {where}")


def join_count(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p, c) for r, ch, p in _links(s) for c in p.categories])
    if pick is None:
        return None
    r, ch, p, c = pick
    v = rng.choice(f.values(p.table, c.name))
    return Draft(f"Count the {ch.plural} {r.verb} {p.plural} whose {c.phrase} is {v}.",
                 f"SELECT COUNT(*) FROM {_join(r)} WHERE {p.table}.{c.name} = {lit(v)}")


def join_group_count(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p, c) for r, ch, p in _links(s) for c in p.categories])
    if pick is None:
        return None
    r, ch, p, c = pick
    key = f"{p.table}.{c.name}"
    left = f"{r.parent} LEFT JOIN {r.child} ON {r.child}.{r.fk} = {r.parent}.id"
    return Draft(f"For each {p.singular} {c.phrase}, count the {ch.plural} {r.verb} {p.plural} with that "
                 f"{c.phrase}. Give the {c.phrase} and the count.",
                 f"SELECT {key}, COUNT(*) FROM {_join(r)} GROUP BY {key}",
                 same_as=(f"SELECT {key}, COUNT({r.child}.id) FROM {left} GROUP BY {key}",))


def join_aggregate(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p, n, c) for r, ch, p in _links(s) for n in ch.numbers for c in p.categories])
    if pick is None:
        return None
    r, ch, p, n, c = pick
    v = rng.choice(f.values(p.table, c.name))
    word, fn = _aggregate(rng, n)
    return Draft(f"What is the {word} {n.phrase} of the {ch.plural} {r.verb} {p.plural} whose {c.phrase} is {v}?",
                 f"SELECT {fn}({ch.table}.{n.name}) FROM {_join(r)} WHERE {p.table}.{c.name} = {lit(v)}")


# --- level 5: nested queries, HAVING, three tables ----------------------------------------------------


def above_average(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, n) for e in s.entities if e.label for n in e.numbers])
    if pick is None:
        return None
    e, n = pick
    average = f"(SELECT AVG({n.name}) FROM {e.table})"
    tail = f"{n.phrase} is above the average {n.phrase} of all {e.plural}"
    c = _pick(rng, list(e.categories))
    if c is None:
        return Draft(f"List the {e.labels} of the {e.plural} whose {tail}.",
                     f"SELECT {e.label} FROM {e.table} WHERE {n.name} > {average}")
    v = rng.choice(f.values(e.table, c.name))
    return Draft(f"List the {e.labels} of the {e.plural} whose {c.phrase} is {v} and whose {tail}.",
                 f"SELECT {e.label} FROM {e.table} WHERE {c.name} = {lit(v)} AND {n.name} > {average}")


def without_children(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p) for r, ch, p in _links(s) if p.label])
    if pick is None:
        return None
    r, ch, p = pick
    return Draft(f"List the {p.labels} of the {p.plural} {r.has.format(x='no ' + ch.plural)}.",
                 f"SELECT {p.label} FROM {p.table} WHERE id NOT IN (SELECT {r.fk} FROM {r.child})")


def many_children(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p) for r, ch, p in _links(s) if p.label])
    if pick is None:
        return None
    r, ch, p = pick
    counts = f.column(f"SELECT COUNT(*) FROM {r.child} GROUP BY {r.fk} ORDER BY 1")
    n = counts[rng.randint(len(counts) // 2, len(counts) - 1)] - 1
    if n < 1:
        return None
    has = r.has.format(x=f"more than {n} {ch.plural}")
    return Draft(f"List the {p.labels} of the {p.plural} {has}.",
                 f"SELECT {p.table}.{p.label} FROM {_join(r)} GROUP BY {p.table}.id HAVING COUNT(*) > {n}")


def having_category(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(e, c) for e in s.entities for c in e.categories])
    if pick is None:
        return None
    e, c = pick
    counts = f.column(f"SELECT COUNT(*) FROM {e.table} GROUP BY {c.name} ORDER BY 1")
    n = counts[rng.randint(len(counts) // 2, len(counts) - 1)] - 1
    if n < 1:
        return None
    return Draft(f"Which {c.plural} have more than {n} {e.plural}?",
                 f"SELECT {c.name} FROM {e.table} GROUP BY {c.name} HAVING COUNT(*) > {n}")


def top_parent(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    pick = _pick(rng, [(r, ch, p) for r, ch, p in _links(s) if p.label])
    if pick is None:
        return None
    r, ch, p = pick
    has = r.has_one.format(x=f"the most {ch.plural}")
    return Draft(f"Give the {p.label_phrase} of the {p.singular} {has}.",
                 f"SELECT {p.table}.{p.label} FROM {_join(r)} GROUP BY {p.table}.id ORDER BY COUNT(*) DESC LIMIT 1",
                 distinct_keys=f"SELECT COUNT(*) FROM {r.child} GROUP BY {r.fk} ORDER BY COUNT(*) DESC LIMIT 2")


def two_hop(s: Schema, f: Facts, rng: random.Random) -> Draft | None:
    """Parents B with a child that links to a parent A matching a filter (three tables)."""
    links = _links(s)
    pick = _pick(rng, [(rb, ra, a, c) for rb, ch, b in links for ra, ch2, a in links
                       if ch2 is ch and b.label and a.table != b.table for c in a.categories])
    if pick is None:
        return None
    rb, ra, a, c = pick
    b, ch = s.entity(rb.parent), s.entity(rb.child)
    v = rng.choice(f.values(a.table, c.name))
    has = rb.has.format(x=f"at least one {ch.singular} {ra.verb} {article(a.singular)} {a.singular} whose "
                          f"{c.phrase} is {v}")
    joins = (f"{b.table} JOIN {ch.table} ON {ch.table}.{rb.fk} = {b.table}.id "
             f"JOIN {a.table} ON {ch.table}.{ra.fk} = {a.table}.id")
    return Draft(f"Give the {b.labels} of the {b.plural} {has} (each {b.label_phrase} once).",
                 f"SELECT DISTINCT {b.table}.{b.label} FROM {joins} WHERE {a.table}.{c.name} = {lit(v)}")


FAMILIES: dict[int, dict[str, Family]] = {
    1: {"list_where_category": list_where_category, "list_where_number": list_where_number, "count_all": count_all},
    2: {"count_where": count_where, "count_where_number": count_where_number, "aggregate": aggregate,
        "aggregate_where": aggregate_where},
    3: {"group_count": group_count, "group_aggregate": group_aggregate, "top_k": top_k, "arg_max": arg_max,
        "sorted_where": sorted_where},
    4: {"join_list": join_list, "join_parents": join_parents, "join_count": join_count,
        "join_group_count": join_group_count, "join_aggregate": join_aggregate},
    5: {"above_average": above_average, "without_children": without_children, "many_children": many_children,
        "having_category": having_category, "top_parent": top_parent, "two_hop": two_hop},
}
"""Families by level, by name."""
LEVELS = tuple(sorted(FAMILIES))


def draw(level: int, family: str, schema: Schema, facts: Facts, rng: random.Random) -> Draft | None:
    """A draft of `family` (of `level`), or None when the family does not apply to the database."""
    return FAMILIES[level][family](schema, facts, rng)
