"""The text-to-SQL task: questions about generated SQLite databases, answered with one SQL query.

Each problem names its database (`info["database"]`, file in `info["database_path"]`); `make_env`
gives each episode an `sql` tool bound to that file, whose description lists the tables. The model
may run queries to explore, then answers with `<answer>SELECT ...</answer>`; `sql_result_match`
runs that query and the gold one and compares their results.

Splits (the layout of the arithmetic task):

- `heldout`: fixed by `db_seed`, `databases` and `levels` (not by `seed`); problem i has level
  `levels[i % L]` on database `databases[(i // L + i % L) % D]`, so every prefix of L*D problems holds
  each (level, database) pair once;
- `train_problem(i)`: the same cycle, drawn from `seed`; a question that is in the held-out split
  (same database, same text) is redrawn;
- `sft_problems`: a narrow set on one database (`sft_database`) that the run's own `sql` tool is
  bound to (`tool_settings`), so cold-start traces run the gold query on the right file and show
  the model exactly the tool description an episode on that database shows.

Every gold query is checked when its problem is drawn: it returns 1 to `MAX_GOLD_ROWS` rows, no
NULL, the same result under its other readings (`Draft.same_as`), and no tie in its sort keys;
a draft that fails is redrawn.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tirl.errors import ConfigError
from tirl.tasks.base import TASKS, Problem, Task
from tirl.tasks.text_to_sql.database import Facts, database_path, fetch_all
from tirl.tasks.text_to_sql.families import FAMILIES, LEVELS, Draft, draw
from tirl.tasks.text_to_sql.results import results_match
from tirl.tasks.text_to_sql.reward import REWARD_NAME
from tirl.tasks.text_to_sql.schemas import SCHEMAS
from tirl.tools.sql import SQLSettings, SQLTool, describe_schema
from tirl.types import ToolCall

if TYPE_CHECKING:
    from tirl.envs.base import Env
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools.toolset import ToolSet

DATABASES = tuple(SCHEMAS)
"""Allowed in `databases` (and the default): shop, school, library, flights."""
MAX_GOLD_ROWS = 25
"""A gold result has at most this many rows (the `sql` tool shows 50 by default)."""
MAX_SCHEMA_CHARS = 4000
"""The schema in the no-tool prompt is cut to this length (as the tool's description is by default)."""
_MAX_ATTEMPTS = 2000
"""Draws tried for one problem before giving up (a bug: every cell has many questions)."""
ATTEMPTS_PER_FAMILY = 25
"""Draws of one family before the next family of the level is tried."""

PROMPT_WITH_TOOLS = ("Answer the question with one SQLite query. Use the sql tool to look at the data and to test "
                     "your query, then give the final query as <answer>SELECT ...</answer>.")
PROMPT_WITHOUT_TOOLS = ("Answer the question with one SQLite query over the tables below, as "
                        "<answer>SELECT ...</answer>.")


def _rng(*key: object) -> random.Random:
    """A private RNG seeded from a key, the same on every machine and Python run."""
    digest = hashlib.sha256("/".join(str(k) for k in key).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def gold_is_sound(path: Path, draft: Draft) -> bool:
    """Whether the draft's gold query gives a usable, unambiguous answer (module docstring)."""
    rows = fetch_all(path, draft.sql)
    if not 1 <= len(rows) <= MAX_GOLD_ROWS or any(v is None for row in rows for v in row):
        return False
    width = len(rows[0])
    for other in draft.same_as:
        alt = fetch_all(path, other)
        if not results_match(alt, len(alt[0]) if alt else width, rows, width, ordered=False):
            return False
    if draft.distinct_keys is not None:
        keys = [row[0] for row in fetch_all(path, draft.distinct_keys)]
        if len(set(keys)) != len(keys):
            return False
    return True


@TASKS.register("text_to_sql")
class TextToSQLTask(Task):
    """Text-to-SQL on 4 generated SQLite databases, 5 levels (filters to nested queries); tool: sql, per problem."""

    name = "text_to_sql"
    default_tools = ("sql",)
    default_reward = REWARD_NAME
    problem_tools = True

    def __init__(self, seed: int = 0, db_seed: int = 0, databases: Sequence[str] = DATABASES,
                 levels: Sequence[int] = LEVELS, heldout_size: int = 100, sft_database: str = "shop",
                 sft_levels: Sequence[int] | None = None, db_dir: str | None = None):
        """Validate the configuration; raises ValueError naming the bad keyword argument.

        `seed` fixes the train stream; `db_seed` the databases' rows (and so every split's questions
        and gold results); `databases` and `levels` (1-5) are what the train stream and the held-out
        split cycle through; `heldout_size` is the held-out split's size; `sft_database` and
        `sft_levels` (default: `levels`) make the narrow SFT set; `db_dir` is where the database files
        are written (default: `<tirl cache>/text_to_sql`).
        """
        self.seed = _check_int("seed", seed)
        self.db_seed = _check_int("db_seed", db_seed)
        self.databases = _check_choices("databases", databases, DATABASES)
        self.levels = _check_choices("levels", levels, LEVELS)
        self.heldout_size = _check_int("heldout_size", heldout_size, lo=1)
        if sft_database not in DATABASES:
            raise ValueError(f"sft_database must be one of {list(DATABASES)}, got {sft_database!r}")
        self.sft_database = sft_database
        self.sft_levels = self.levels if sft_levels is None else _check_choices("sft_levels", sft_levels, LEVELS)
        if db_dir is not None and (not isinstance(db_dir, str) or not db_dir):
            raise ValueError(f"db_dir must be a folder path (a non-empty string) or null, got {db_dir!r}")
        self.db_dir = Path(db_dir).expanduser() if db_dir else None
        self._facts: dict[str, Facts] = {}
        self._tools: dict[tuple[str, str], SQLTool] = {}
        self._heldout: list[Problem] | None = None
        self._heldout_keys: frozenset[str] = frozenset()

    # --- databases and prompts ------------------------------------------------------------------------

    def database_path(self, database: str) -> Path:
        """The file of `database` for this task's `db_seed` (built on first use)."""
        return self.facts(database).path

    def facts(self, database: str) -> Facts:
        if database not in self._facts:
            self._facts[database] = Facts(database_path(database, self.db_seed, self.db_dir))
        return self._facts[database]

    def schema_text(self, database: str) -> str:
        """The tables of `database`, one line each, as the `sql` tool's description lists them."""
        return describe_schema(self.database_path(database), MAX_SCHEMA_CHARS)[0]

    def system_prompt(self, with_tools: bool) -> str:
        """The answer goes in `<answer>SELECT ...</answer>`; without tools, `make_env` appends the tables."""
        return PROMPT_WITH_TOOLS if with_tools else PROMPT_WITHOUT_TOOLS

    def tool_settings(self) -> dict[str, dict[str, object]]:
        """The run's `sql` tool is bound to `sft_database` (what SFT traces run on); episodes get their own."""
        return {"sql": {"database": str(self.database_path(self.sft_database)),
                        "database_description": SCHEMAS[self.sft_database].description}}

    def make_env(self, problem: Problem, tools: ToolSet, limits: ToolLimits, with_tools: bool) -> Env:
        """A `ToolEnv` whose `sql` tool is bound to the problem's database, with the run's `tools.sql`
        settings (max_rows, max_query_s, ...) and execution policy. Without tools (the no-tool baseline,
        or `task.tools: []`), the tables are listed in the system prompt instead."""
        from tirl.envs.tool_env import ToolEnv
        from tirl.tools.toolset import ToolSet

        database = problem.info["database"]
        others = [name for name in tools.names if name != "sql"]
        if others:
            raise ConfigError(f"task text_to_sql gives each problem its own sql tool; task.tools must be [sql] "
                              f"(or [] for no tools), got {tools.names}")
        if not with_tools or "sql" not in tools:
            prompt = f"{self.system_prompt(False)}\nTables:\n{self.schema_text(database)}"
            return ToolEnv(problem, prompt, tools, limits)
        run_tool = tools.get("sql")
        expected = self.database_path(self.sft_database).resolve()
        if not isinstance(run_tool, SQLTool) or run_tool.path != expected:
            raise ConfigError("tools.sql.database is chosen by task text_to_sql (each problem is bound to its own "
                              "database); remove tools.sql.database from the recipe")
        tool = self._tool(database, run_tool.settings)
        return ToolEnv(problem, self.system_prompt(True), ToolSet([tool], {"sql": tools.policy("sql")}), limits)

    def _tool(self, database: str, base: SQLSettings) -> SQLTool:
        """The `sql` tool on `database` with the run's other settings (cached: the tool is stateless)."""
        key = (database, base.model_dump_json(exclude={"database", "database_description"}))
        if key not in self._tools:
            settings = base.model_copy(update={"database": str(self.database_path(database)),
                                               "database_description": SCHEMAS[database].description})
            self._tools[key] = SQLTool(settings)
        return self._tools[key]

    # --- splits ---------------------------------------------------------------------------------------

    def cell(self, index: int) -> tuple[int, str]:
        """(level, database) of problem `index` in the train stream and the held-out split."""
        n_levels, n_databases = len(self.levels), len(self.databases)
        return self.levels[index % n_levels], self.databases[(index // n_levels + index % n_levels) % n_databases]

    def train_problem(self, index: int) -> Problem:
        """The index-th train problem: a function of (seed, db_seed, index); never a held-out question."""
        index = _check_int("index", index, lo=0)
        self._ensure_heldout()
        level, database = self.cell(index)
        return self._draw(f"text_to_sql/train/{index}", ("train", self.seed, index), level, database,
                          self._heldout_keys)

    def heldout(self) -> list[Problem]:
        """The fixed held-out split (independent of `seed`), distinct questions; a copy."""
        self._ensure_heldout()
        assert self._heldout is not None
        return list(self._heldout)

    def sft_problems(self, count: int) -> list[Problem]:
        """`count` distinct problems on `sft_database`, levels `sft_levels` in turn; never held-out
        questions; `sft_problems(n)[:k] == sft_problems(k)`. Each has one reference call: the gold query."""
        count = _check_int("count", count, lo=0)
        self._ensure_heldout()
        taken = set(self._heldout_keys)
        problems = []
        for i in range(count):
            level = self.sft_levels[i % len(self.sft_levels)]
            problem = self._draw(f"text_to_sql/sft/{i}", ("sft", i), level, self.sft_database, taken)
            taken.add(_key(problem))
            problems.append(problem)
        return problems

    def _ensure_heldout(self) -> None:
        if self._heldout is not None:
            return
        taken: set[str] = set()
        problems = []
        for i in range(self.heldout_size):
            level, database = self.cell(i)
            problem = self._draw(f"text_to_sql/heldout/{i}", ("heldout", i), level, database, taken)
            taken.add(_key(problem))
            problems.append(problem)
        self._heldout, self._heldout_keys = problems, frozenset(taken)

    def _draw(self, problem_id: str, key: tuple, level: int, database: str,
              taken: set[str] | frozenset[str]) -> Problem:
        """The first sound draft whose question is not taken, over attempts 0, 1, ... of RNGs keyed on `key`.

        The level's families are tried in an order drawn from `key`, `ATTEMPTS_PER_FAMILY` draws each,
        so every family that applies is equally likely, however often its drafts are redrawn."""
        facts, schema = self.facts(database), SCHEMAS[database]
        families = sorted(FAMILIES[level])
        _rng("text_to_sql", self.db_seed, *key, "families").shuffle(families)
        for attempt in range(_MAX_ATTEMPTS):
            family = families[(attempt // ATTEMPTS_PER_FAMILY) % len(families)]
            draft = draw(level, family, schema, facts, _rng("text_to_sql", self.db_seed, *key, attempt))
            if draft is None or f"{database}:{draft.question}" in taken or not gold_is_sound(facts.path, draft):
                continue
            return Problem(id=problem_id, question=draft.question, answer=draft.sql,
                           reference_calls=(ToolCall(id="call_0", name="sql", arguments={"query": draft.sql}),),
                           info={"database": database, "database_path": str(facts.path), "level": level,
                                 "family": family})
        raise RuntimeError(f"{problem_id}: no new sound question on {database} at level {level} "
                           f"in {_MAX_ATTEMPTS} attempts")


def _key(problem: Problem) -> str:
    return f"{problem.info['database']}:{problem.question}"


def _check_int(kwarg: str, value: object, lo: int | None = None) -> int:
    """`value` as an int >= lo; ValueError naming `kwarg` otherwise (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{kwarg} must be an int, got {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{kwarg} must be >= {lo}, got {value}")
    return value


def _check_choices(kwarg: str, values: object, allowed: tuple) -> tuple:
    """A non-empty list of distinct members of `allowed`, in `allowed`'s order; ValueError naming `kwarg`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{kwarg} must be a non-empty list drawn from {list(allowed)}, got {values!r}")
    bad = [v for v in values if isinstance(v, bool) or v not in allowed]
    if bad:
        raise ValueError(f"{kwarg} has invalid entries {bad!r}; allowed: {list(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{kwarg} has duplicates: {list(values)!r}")
    return tuple(v for v in allowed if v in values)
