"""The text-to-SQL task: generated databases, splits and gold queries, per-problem sql tools, and the
`sql_result_match` reward on known-good and known-bad answers; rollouts through the real env."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest

from tirl.errors import ConfigError
from tirl.rewards.base import REWARDS, GroupContext, bind, score
from tirl.tasks import TASKS
from tirl.tasks.base import Problem
from tirl.tasks.text_to_sql.database import database_path, draw_rows, fetch_all, fingerprint
from tirl.tasks.text_to_sql.families import FAMILIES, LEVELS
from tirl.tasks.text_to_sql.reward import extract_query
from tirl.tasks.text_to_sql.results import has_top_level_order_by, results_match
from tirl.tasks.text_to_sql.schemas import SCHEMAS
from tirl.tasks.text_to_sql.task import MAX_GOLD_ROWS, TextToSQLTask
from tirl.types import Message, StopReason, Trajectory, TrajectoryMeta


@pytest.fixture(scope="module")
def db_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("text_to_sql_dbs")


@pytest.fixture(scope="module")
def task(db_dir) -> TextToSQLTask:
    return TextToSQLTask(db_dir=str(db_dir))


@pytest.fixture(scope="module")
def shop(task) -> Path:
    return task.database_path("shop")


def answered(text: str) -> Trajectory:
    """A one-turn trajectory whose final message is `text`."""
    return Trajectory(prompt_ids=(1,), response_ids=(2,), loss_mask=(1,), logprobs=(0.0,), turns=(),
                      messages=(Message("assistant", text),), stop_reason=StopReason.ANSWERED,
                      meta=TrajectoryMeta(task_id="p", group_id="g"), final_answer=text)


def reward(problem: Problem, text: str | None, **params):
    """The `sql_result_match` result of a final message `text` (None: the episode never answered)."""
    traj = answered(text) if text is not None else Trajectory(
        (1,), (2,), (1,), (0.0,), (), (), StopReason.MAX_TOKENS, TrajectoryMeta("p", "g"))
    fn = bind({"name": "sql_result_match", "kwargs": params})
    return asyncio.run(score(fn, traj, problem, GroupContext((traj,))))


def gold(path: Path, sql: str) -> Problem:
    return Problem(id="hand", question="?", answer=sql, info={"database_path": str(path)})


def dump(path: Path) -> list[str]:
    connection = sqlite3.connect(path)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


# --- databases -------------------------------------------------------------------------------------


def test_databases_are_deterministic_and_written_atomically(tmp_path):
    for name in SCHEMAS:
        a, b = database_path(name, 0, tmp_path / "a"), database_path(name, 0, tmp_path / "b")
        assert a.name == b.name == f"{name}-seed0-{fingerprint()}.sqlite"
        assert dump(a) == dump(b)
        assert a.read_bytes() == b.read_bytes()
        assert dump(database_path(name, 1, tmp_path / "a")) != dump(a)
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.endswith(".sqlite")) == []


def test_existing_database_is_reused_not_rebuilt(tmp_path):
    path = database_path("shop", 0, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert database_path("shop", 0, tmp_path) == path and path.stat().st_mtime_ns == mtime


def test_rows_have_unique_labels_and_childless_parents():
    """Questions name rows by their label, and "customers that placed no orders" must never be empty."""
    for schema in SCHEMAS.values():
        rows = draw_rows(schema, 0)
        for e in schema.entities:
            if e.label:
                column = [c.split()[0] for c in _columns(schema, e.table)].index(e.label)
                labels = [r[column] for r in rows[e.table]]
                assert len(set(labels)) == len(labels), (schema.name, e.table)
        for r in schema.relations:
            fk = [c.split()[0] for c in _columns(schema, r.child)].index(r.fk)
            used = {row[fk] for row in rows[r.child]}
            assert used < {row[0] for row in rows[r.parent]}, (schema.name, r.child, r.fk)


def _columns(schema, table: str) -> list[str]:
    ddl = next(s for s in schema.ddl if s.startswith(f"CREATE TABLE {table} "))
    return [c.strip() for c in ddl[ddl.index("(") + 1:ddl.rindex(")")].split(", ")]


# --- splits and gold queries -----------------------------------------------------------------------


def test_registered_with_its_reward():
    assert TASKS.get("text_to_sql") is TextToSQLTask
    assert "sql_result_match" in REWARDS
    assert TextToSQLTask.default_reward == "sql_result_match" and TextToSQLTask.problem_tools


def test_every_gold_query_runs_and_returns_rows(task):
    problems = task.heldout() + [task.train_problem(i) for i in range(100)] + task.sft_problems(20)
    for p in problems:
        rows = fetch_all(Path(p.info["database_path"]), p.answer)
        assert 1 <= len(rows) <= MAX_GOLD_ROWS, (p.id, p.answer)
        assert all(v is not None for row in rows for v in row), (p.id, p.answer)
        assert p.reference_calls[0].arguments == {"query": p.answer}
        assert reward(p, f"<answer>{p.answer}</answer>").total == 1.0


def test_heldout_prefix_holds_every_level_and_database_once(task):
    cells = [(p.info["level"], p.info["database"]) for p in task.heldout()[:len(LEVELS) * len(SCHEMAS)]]
    assert sorted(cells) == sorted((lv, db) for lv in LEVELS for db in SCHEMAS)


def test_splits_are_disjoint_deterministic_and_seeded(task, db_dir):
    heldout = {(p.info["database"], p.question) for p in task.heldout()}
    assert len(heldout) == len(task.heldout())
    train = [task.train_problem(i) for i in range(300)]
    assert not heldout & {(p.info["database"], p.question) for p in train + task.sft_problems(40)}
    again = TextToSQLTask(db_dir=str(db_dir))
    assert [again.train_problem(i) for i in (299, 0, 7)] == [train[299], train[0], train[7]]
    other = TextToSQLTask(seed=1, db_dir=str(db_dir))
    assert other.heldout() == task.heldout()
    assert [other.train_problem(i).question for i in range(20)] != [p.question for p in train[:20]]
    assert TextToSQLTask(db_seed=1, db_dir=str(db_dir)).heldout()[0].info["database_path"] != \
        task.heldout()[0].info["database_path"]


def test_every_family_is_drawn(task):
    drawn = {p.info["family"] for p in [task.train_problem(i) for i in range(400)]}
    assert drawn == {name for families in FAMILIES.values() for name in families}


def test_sft_set_is_narrow_and_prefix_stable(task):
    sft = task.sft_problems(12)
    assert {p.info["database"] for p in sft} == {"shop"}
    assert [p.info["level"] for p in sft[:5]] == list(LEVELS)
    assert task.sft_problems(5) == sft[:5]
    assert len({p.question for p in sft}) == 12


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"seed": "0"}, "seed"), ({"db_seed": True}, "db_seed"), ({"databases": []}, "databases"),
    ({"databases": ["shop", "zoo"]}, "databases"), ({"databases": "shop"}, "databases"),
    ({"levels": [0, 1]}, "levels"), ({"levels": [2, 2]}, "levels"), ({"heldout_size": 0}, "heldout_size"),
    ({"sft_database": "zoo"}, "sft_database"), ({"sft_levels": [6]}, "sft_levels"), ({"db_dir": 3}, "db_dir"),
])
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TextToSQLTask(**kwargs)


def test_bad_kwargs_through_the_config_are_a_config_error():
    from tirl.config import TaskConfig
    from tirl.trainer.build import build_task

    with pytest.raises(ConfigError, match="task.kwargs for 'text_to_sql'.*levels"):
        build_task(TaskConfig(name="text_to_sql", kwargs={"levels": [9]}))


def test_a_subset_of_databases_and_levels(db_dir):
    small = TextToSQLTask(databases=["flights", "school"], levels=[4, 2], heldout_size=8, db_dir=str(db_dir))
    assert small.databases == ("school", "flights") and small.levels == (2, 4)
    assert {(p.info["level"], p.info["database"]) for p in small.heldout()} == {
        (lv, db) for lv in (2, 4) for db in ("school", "flights")}


# --- the reward ------------------------------------------------------------------------------------

PARIS = "SELECT name FROM customers WHERE city = 'Paris'"


@pytest.mark.parametrize("text", [
    f"<answer>{PARIS}</answer>",
    "<answer>select c.name from customers as c where c.city in ('Paris') order by c.name desc;</answer>",
    f"Let me check.\n<answer>\n```sql\n{PARIS}\n```\n</answer>",
    f"<answer>SELECT 1</answer> on second thought <answer>{PARIS}</answer>",
])
def test_gold_and_equivalent_rewrites_score_one(shop, text):
    r = reward(gold(shop, PARIS), text)
    assert (r.total, r.correct) == (1.0, True)
    assert r.components == {"correct": 1.0, "format": 1.0, "executes": 1.0}


@pytest.mark.parametrize(("sql", "rewrite"), [
    ("SELECT COUNT(*) FROM orders WHERE status = 'cancelled'", "SELECT SUM(status = 'cancelled') FROM orders"),
    ("SELECT AVG(price) FROM products", "SELECT SUM(price) / COUNT(*) FROM products"),
    ("SELECT category, COUNT(*) FROM products GROUP BY category",
     "SELECT COUNT(id), category FROM products GROUP BY 2 ORDER BY 1"),
    ("SELECT name FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)",
     "SELECT c.name FROM customers c LEFT JOIN orders o ON o.customer_id = c.id WHERE o.id IS NULL"),
])
def test_equivalent_queries_match(shop, sql, rewrite):
    assert reward(gold(shop, sql), f"<answer>{rewrite}</answer>").correct


@pytest.mark.parametrize(("text", "why"), [
    ("<answer>SELECT name FROM customers WHERE city = 'Lyon'</answer>", "wrong_result"),
    ("<answer>SELECT name, city FROM customers WHERE city = 'Paris'</answer>", "wrong_result"),
    ("<answer>SELEC name FROM customers</answer>", "sql_error"),
    ("<answer>SELECT nme FROM customers</answer>", "sql_error"),
    ("<answer>SELECT name FROM customers; DROP TABLE customers</answer>", "sql_error"),
    ("<answer>DROP TABLE customers</answer>", "refused"),
    ("<answer>UPDATE customers SET city = 'Paris'</answer>", "refused"),
    ("<answer>ATTACH DATABASE 'x.db' AS x</answer>", "refused"),
    ("The answer is SELECT name FROM customers WHERE city = 'Paris'", "no_answer"),
    ("<answer>  </answer>", "no_answer"),
    (None, "no_answer"),
])
def test_bad_answers_score_zero_and_say_why(shop, text, why):
    before = hashlib.sha256(shop.read_bytes()).hexdigest()
    r = reward(gold(shop, PARIS), text)
    assert (r.total, r.correct, r.components["correct"]) == (0.0, False, 0.0)
    assert r.components[f"error/{why}"] == 1.0
    assert [k for k in r.components if k.startswith("error/")] == [f"error/{why}"]
    assert r.components["executes"] == float(why == "wrong_result")
    assert hashlib.sha256(shop.read_bytes()).hexdigest() == before


def test_a_query_past_the_time_limit_is_a_timeout(shop):
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    r = reward(gold(shop, PARIS), f"<answer>{endless}</answer>", max_query_s=0.2)
    assert r.components["error/timeout"] == 1.0 and r.total == 0.0


def test_duplicates_count(shop):
    distinct = "SELECT DISTINCT city FROM customers"
    assert not reward(gold(shop, distinct), "<answer>SELECT city FROM customers</answer>").correct
    assert reward(gold(shop, distinct), "<answer>SELECT city FROM customers GROUP BY city</answer>").correct


def test_order_matters_only_when_the_gold_sorts(shop):
    top = "SELECT name FROM products ORDER BY price DESC LIMIT 3"
    top_rows = "SELECT name FROM (SELECT name, price FROM products ORDER BY price DESC LIMIT 3)"
    reversed_top = f"<answer>{top_rows} ORDER BY price ASC</answer>"
    assert reward(gold(shop, top), f"<answer>{top}</answer>").correct
    assert not reward(gold(shop, top), reversed_top).correct
    assert reward(gold(shop, top_rows), reversed_top).correct  # the gold sorts only inside a subquery
    unordered = "SELECT name FROM products WHERE price > 100"
    assert reward(gold(shop, unordered), f"<answer>{unordered} ORDER BY price</answer>").correct


def test_columns_may_come_in_another_order_unless_asked(shop):
    sql = "SELECT city, COUNT(*) FROM customers GROUP BY city"
    swapped = "<answer>SELECT COUNT(*), city FROM customers GROUP BY city</answer>"
    assert reward(gold(shop, sql), swapped).correct
    assert not reward(gold(shop, sql), swapped, ignore_column_order=False).correct


def test_float_tolerance(shop):
    sql = "SELECT AVG(price) FROM products"
    rounded = "<answer>SELECT ROUND(AVG(price), 2) FROM products</answer>"
    assert not reward(gold(shop, sql), rounded).correct
    assert reward(gold(shop, sql), rounded, tolerance=0.01).correct


def test_bonuses_for_format_and_execution(shop):
    wrong = "<answer>SELECT name FROM customers</answer>"
    assert reward(gold(shop, PARIS), wrong, format_bonus=0.1, execution_bonus=0.2).total == pytest.approx(0.3)
    assert reward(gold(shop, PARIS), "<answer>oops</answer>", format_bonus=0.1, execution_bonus=0.2).total == \
        pytest.approx(0.1)
    assert reward(gold(shop, PARIS), f"<answer>{PARIS}</answer>", format_bonus=0.1).total == pytest.approx(1.1)


def test_a_problem_without_a_database_is_a_task_bug():
    with pytest.raises(ValueError, match="database_path"):
        reward(Problem(id="x", question="?", answer=PARIS), f"<answer>{PARIS}</answer>")


def test_a_failing_gold_query_raises(shop):
    with pytest.raises(ValueError, match="gold query failed"):
        reward(gold(shop, "SELECT nope FROM customers"), f"<answer>{PARIS}</answer>")


@pytest.mark.parametrize(("sql", "ordered"), [
    ("SELECT a FROM t ORDER BY a", True),
    ("select a from t order\n by a desc limit 3", True),
    ("SELECT a FROM (SELECT a FROM t ORDER BY a LIMIT 3)", False),
    ("SELECT a, ROW_NUMBER() OVER (ORDER BY a) FROM t", False),
    ("SELECT 'order by' FROM t", False),
    ("SELECT a FROM t -- order by a", False),
    ("SELECT \"order by\" FROM t", False),
])
def test_top_level_order_by(sql, ordered):
    assert has_top_level_order_by(sql) is ordered


def test_results_match_rules():
    assert results_match([(5,)], 1, [(5.0,)], 1, ordered=False)
    assert not results_match([("5",)], 1, [(5,)], 1, ordered=False)
    assert not results_match([], 2, [], 1, ordered=False)
    assert results_match([(None, "a"), (1, "b")], 2, [(1, "b"), (None, "a")], 2, ordered=False)
    assert not results_match([(None, "a"), (1, "b")], 2, [(1, "b"), (None, "a")], 2, ordered=True)


@pytest.mark.parametrize(("text", "correct"), [
    (PARIS, True),
    (f"Here is the query:\n```sql\n{PARIS}\n```", True),
    (f"```sql\nSELECT 1\n```\nbetter:\n```sql\n{PARIS};\n```", True),
    (f"with p as ({PARIS}) select * from p", True),
    ("SELECT name FROM customers WHERE city = 'Lyon'", False),
    (f"The answer is {PARIS}", False),
])
def test_untagged_answers_count_only_when_the_tag_is_not_required(shop, text, correct):
    """A bare or fenced query is read with require_tag=false (format stays 0); strict scoring gives 0."""
    assert reward(gold(shop, PARIS), text).components["error/no_answer"] == 1.0
    r = reward(gold(shop, PARIS), text, require_tag=False)
    assert (r.correct, r.components["format"]) == (correct, 0.0)
    assert reward(gold(shop, PARIS), f"<answer>{PARIS}</answer>", require_tag=False).components["format"] == 1.0


def test_require_tag_must_be_a_boolean():
    from tirl.rewards.base import check_params
    from tirl.tasks.text_to_sql.reward import sql_result_match

    with pytest.raises(ValueError, match="require_tag must be true or false"):
        check_params("sql_result_match", sql_result_match, {"require_tag": "no"})


def test_extract_query():
    assert extract_query("<answer> SELECT 1; </answer>") == "SELECT 1;"
    assert extract_query("```sql\nSELECT 1\n```") is None
    assert extract_query(None) is None


# --- episodes: per-problem tools, SFT traces, rollouts ---------------------------------------------


def run_tools(task):
    from tirl.tools import build_toolset

    return build_toolset(["sql"], task.tool_settings())


def test_each_episode_gets_an_sql_tool_on_its_own_database(task):
    from tirl.envs.tool_env import ToolLimits

    tools = run_tools(task)
    by_db = {p.info["database"]: p for p in task.heldout()[:4]}
    for name, problem in by_db.items():
        env = task.make_env(problem, tools.session(), ToolLimits(), True)
        tool = env.tools.get("sql")
        assert tool.path == Path(problem.info["database_path"]).resolve()
        assert all(f"{e.table}(" in tool.description for e in SCHEMAS[name].entities)
        assert SCHEMAS[name].description in tool.description
        messages = asyncio.run(env.reset())
        assert messages[0].content == task.system_prompt(True) and messages[1].content == problem.question
        call = f'<tool_call>\n{json.dumps({"name": "sql", "arguments": {"query": problem.answer}})}\n</tool_call>'
        step = asyncio.run(env.step(Message("assistant", call)))
        rows = fetch_all(Path(problem.info["database_path"]), problem.answer)
        assert step.tool_results[0].ok and str(rows[0][-1]) in step.observations[0].content


def test_episode_tool_keeps_the_runs_sql_settings(task):
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools import build_toolset

    tools = build_toolset(["sql"], {"sql": {**task.tool_settings()["sql"], "max_rows": 3}})
    problem = next(p for p in task.heldout() if p.info["database"] == "flights")
    env = task.make_env(problem, tools.session(), ToolLimits(), True)
    assert env.tools.get("sql").settings.max_rows == 3


def test_no_tool_episodes_list_the_tables_in_the_prompt(task):
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools import ToolSet

    problem = next(p for p in task.heldout() if p.info["database"] == "library")
    env = task.make_env(problem, ToolSet([]), ToolLimits(), False)
    system = asyncio.run(env.reset())[0].content
    assert system.startswith(task.system_prompt(False)) and "loans(id INTEGER PRIMARY KEY" in system
    assert len(env.tools) == 0


def test_misconfigured_tools_are_config_errors(task, tmp_path):
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools import build_toolset

    problem = task.heldout()[0]
    elsewhere = database_path("school", 0, tmp_path)
    with pytest.raises(ConfigError, match="tools.sql.database"):
        task.make_env(problem, build_toolset(["sql"], {"sql": {"database": str(elsewhere)}}).session(),
                      ToolLimits(), True)
    with pytest.raises(ConfigError, match="task.tools"):
        task.make_env(problem, build_toolset(["sql", "calculator"], task.tool_settings()).session(),
                      ToolLimits(), True)


def test_sft_traces_run_the_gold_query_and_show_the_episode_tool(task):
    """SFT traces are built with the run's tools: bound to the SFT database, they must run the gold
    query on the right file and describe the tool exactly as an episode on that database does."""
    from tirl.envs.tool_env import ToolLimits
    from tirl.trainer.sft import reference_conversation

    tools = run_tools(task)
    for problem in task.sft_problems(5):
        conversation = asyncio.run(reference_conversation(task, tools, problem))
        env = task.make_env(problem, tools.session(), ToolLimits(), True)
        episode = asyncio.run(env.tools.execute(problem.reference_calls[0]))
        assert conversation[3].content == episode.content
        assert conversation[-1].content == f"<answer>{problem.answer}</answer>"
        assert env.tools.schemas() == tools.schemas()


def test_scripted_rollout_scores_the_gold_answer(task, smol_format):
    """Through the real agent loop: call sql with the gold query, then answer with it -> reward 1."""
    from tirl.backends.scripted import ScriptedBackend
    from tirl.envs.tool_env import ToolLimits
    from tirl.rollout.agent import TurnLimits
    from tirl.rollout.groups import RolloutSpec, rollout_groups

    tools = run_tools(task)
    problems = task.heldout()[3:6]
    answers = {p.question: p.answer for p in problems}

    def script(request, turn):
        question = next(q for q in answers if any(m.content == q for m in request.messages))
        if turn == 0:
            call = {"name": "sql", "arguments": {"query": answers[question]}}
            return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
        return f"<answer>{answers[question]}</answer><|im_end|>"

    groups = asyncio.run(rollout_groups(
        problems, lambda p: task.make_env(p, tools.session(), ToolLimits(), True),
        ScriptedBackend(smol_format.tokenizer, script), smol_format,
        RolloutSpec(group_size=1, limits=TurnLimits(max_turns=3)), bind(task.default_reward), step=0, seed=0))
    trajs = [g.trajectories[0] for g in groups]
    assert [t.reward for t in trajs] == [1.0, 1.0, 1.0]
    assert all(t.turns[0].tool_results[0].ok for t in trajs)


@pytest.mark.slow
def test_real_rollout_with_the_default_model(tmp_path, db_dir):
    """`tirl eval` on two problems, with and without tools, a few tokens each: every trajectory scored."""
    from tirl.cli import main

    args = ["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "text_to_sql", "eval.size=2",
            "rollout.max_new_tokens_per_turn=24", "rollout.max_new_tokens=48", "rollout.max_turns=2",
            f"task.kwargs={{db_dir: {db_dir}, heldout_size: 2}}", f"run.dir={tmp_path}"]
    assert main(args) == 0
    for name in ("eval", "eval_no_tools"):
        lines = [json.loads(line) for line in (tmp_path / "eval" / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == 2
        assert all("correct" in t["reward_components"] and "format" in t["reward_components"] for t in lines)
