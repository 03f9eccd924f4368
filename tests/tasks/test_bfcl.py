"""The function_calling task (BFCL v4): data, splits, the AST checker, the multi-turn back-ends, rewards, envs."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from tests.rewards.builders import Step, run, trajectory
from tirl.backends.base import SamplingParams
from tirl.backends.scripted import ScriptedBackend
from tirl.chat.hermes import render_tool_call
from tirl.cli import main
from tirl.envs.tool_env import ToolLimits
from tirl.errors import ConfigError, DataError
from tirl.rewards.base import REWARDS
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.tasks import TASKS
from tirl.tasks.bfcl import DEFAULT_CATEGORIES, FunctionCallingTask
from tirl.tasks.bfcl.checker import check
from tirl.tasks.bfcl.data import (
    AST_CATEGORIES,
    IRRELEVANCE_CATEGORIES,
    MULTI_TURN_CATEGORIES,
    RELEVANCE_CATEGORIES,
    default_data_dir,
    gold_calls,
    to_json_schema,
)
from tirl.tasks.bfcl.envs import END_OF_TURN, MORE_FUNCTIONS
from tirl.tasks.bfcl.multi_turn import execute, execute_async
from tirl.tools.toolset import ToolSet
from tirl.types import StopReason, ToolCall, ToolStatus, TrajectoryMeta

SINGLE = AST_CATEGORIES + IRRELEVANCE_CATEGORIES + RELEVANCE_CATEGORIES
UNSOLVABLE = {"bfcl/live_simple_106-63-0", "bfcl/live_simple_112-68-0", "bfcl/live_multiple_507-149-4",
              "bfcl/live_multiple_862-181-3", "bfcl/live_multiple_964-207-0"}
"""Rows whose possible answer no output can satisfy under BFCL's rules (a required parameter with no accepted
value, or a gold parameter the function does not declare)."""


@pytest.fixture(scope="module")
def single() -> FunctionCallingTask:
    return FunctionCallingTask(categories=list(SINGLE), heldout_size=20)


@pytest.fixture(scope="module")
def multi() -> FunctionCallingTask:
    return FunctionCallingTask(categories=list(MULTI_TURN_CATEGORIES), heldout_size=8)


def find(task: FunctionCallingTask, pid: str):
    category = pid.removeprefix("bfcl/").rsplit("_", 1)[0]
    return next(p for p in task.problems(category) if p.id == pid)


def calls_step(calls, text_before: str = "") -> Step:
    """An assistant turn writing `calls` (ToolCalls or (name, args)) as tool-call blocks."""
    pairs = [(c.name, c.arguments) if isinstance(c, ToolCall) else c for c in calls]
    text = text_before + "".join(render_tool_call(ToolCall("x", n, a)) for n, a in pairs)
    return Step(text, calls=pairs)


def score(problem, *steps, spec="bfcl_ast"):
    return run(spec, trajectory(*steps, task_id=problem.id), problem, task_reward="bfcl")


# ----------------------------------------------------------------------------------------------- registration
def test_registered_with_its_rewards_and_defaults():
    cls = TASKS.get("function_calling")
    assert cls is FunctionCallingTask and cls.problem_tools and cls.default_reward == "bfcl"
    docs = REWARDS.describe()
    for name in ("bfcl", "bfcl_ast", "bfcl_multi_turn"):
        assert REWARDS.get(name) and docs[name]
    assert "simple_python" in DEFAULT_CATEGORIES and not set(DEFAULT_CATEGORIES) & set(MULTI_TURN_CATEGORIES)


# ----------------------------------------------------------------------------------------------- data and splits
def test_default_task_splits_disjoint_stratified_and_deterministic():
    task = FunctionCallingTask()
    held = task.heldout()
    ids = [p.id for p in held]
    assert len(ids) == 100 == len(set(ids))
    counts = {c: sum(p.info["category"] == c for p in held) for c in task.categories}
    assert set(counts) == set(DEFAULT_CATEGORIES) and counts.pop("live_parallel") == 8  # half of its 16
    assert set(counts.values()) <= {10, 11}
    train = [task.train_problem(i) for i in range(600)]
    assert not {p.id for p in train} & set(ids)
    k = len(task.categories)
    assert all({p.info["category"] for p in train[i:i + k]} == set(task.categories) for i in range(0, 600, k))
    again = FunctionCallingTask()
    assert [p.id for p in again.heldout()] == ids and [again.train_problem(i).id for i in range(50)] == \
        [p.id for p in train[:50]]
    reseeded = FunctionCallingTask(seed=1)
    assert [p.id for p in reseeded.heldout()] == ids
    assert [reseeded.train_problem(i).id for i in range(50)] != [p.id for p in train[:50]]
    assert [p.id for p in FunctionCallingTask(split_seed=1).heldout()] != ids


def test_a_small_category_is_held_out_at_most_by_half_and_cycles_in_training():
    task = FunctionCallingTask(categories=["live_parallel", "simple"], heldout_size=30)
    held = [p for p in task.heldout() if p.info["category"] == "live_parallel"]
    assert len(held) == 8  # 16 problems: half held out, the rest of the split from simple_python
    train = [task.train_problem(i) for i in range(0, 40, 2)]  # every other index: live_parallel
    assert {p.info["category"] for p in train} == {"live_parallel"}
    assert len({p.id for p in train[:8]}) == 8 and {p.id for p in train[8:16]} == {p.id for p in train[:8]}


def test_max_prompt_chars_keeps_the_short_problems_before_splitting():
    from tirl.tasks.bfcl.task import prompt_chars

    task = FunctionCallingTask(categories=["live_multiple", "simple"], heldout_size=40, max_prompt_chars=3000)
    kept = task.problems("live_multiple")
    assert 0 < len(kept) < len(FunctionCallingTask(categories=["live_multiple"], heldout_size=1).problems(
        "live_multiple"))
    seen = task.heldout() + [task.train_problem(i) for i in range(200)]
    assert all(prompt_chars(p) <= 3000 for p in seen) and max(prompt_chars(p) for p in kept) > 2000


@pytest.mark.parametrize("kwargs, name", [
    ({"categories": ["nope"]}, "unknown category"), ({"categories": ["simple_java"]}, "not supported"),
    ({"categories": "simple"}, "categories"), ({"categories": ["simple", "simple_python"]}, "duplicates"),
    ({"heldout_size": 0}, "heldout_size"), ({"categories": ["live_parallel"], "heldout_size": 9}, "heldout_size"),
    ({"seed": "0"}, "seed"), ({"think": "yes"}, "think"), ({"data_dir": "/nonexistent/bfcl"}, "data_dir"),
    ({"max_prompt_chars": 0}, "max_prompt_chars"), ({"max_prompt_chars": 50}, "max_prompt_chars=50 leaves no")])
def test_bad_kwargs_raise_naming_the_kwarg(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FunctionCallingTask(**kwargs)


def test_problem_info_and_schema_conversion(single):
    p = find(single, "bfcl/simple_python_0")
    assert p.question.startswith("Find the area of a triangle") and p.answer == ""
    assert p.info["kind"] == "ast" and p.info["level"] == "simple_python"
    params = p.info["tools"][0]["function"]["parameters"]
    assert params["type"] == "object" and params["properties"]["base"]["type"] == "integer"
    gold = {"base": 10, "height": 5, "unit": "units"}
    assert p.reference_calls == (ToolCall("call_0", "calculate_triangle_area", gold),)
    converted = to_json_schema({"type": "dict", "properties": {
        "x": {"type": "float", "optional": True}, "t": {"type": "tuple", "items": {"type": "integer"}},
        "a": {"type": "any", "description": "anything"},
        "d": {"type": "dict", "properties": {"k": {"type": "boolean"}}}}})
    assert converted == {"type": "object", "properties": {
        "x": {"type": "number"}, "t": {"type": "array", "items": {"type": "integer"}}, "a": {"description": "anything"},
        "d": {"type": "object", "properties": {"k": {"type": "boolean"}}}}}
    with pytest.raises(ValueError, match="unknown type 'complex'"):
        to_json_schema({"type": "dict", "properties": {"z": {"type": "complex"}}})


def test_gold_calls_take_the_first_accepted_value():
    doc = {"name": "f", "parameters": {"type": "dict", "required": ["r"], "properties": {
        "r": {"type": "integer"}, "o": {"type": "string"}, "n": {"type": "dict"}}}}
    gt = [{"f": {"r": ["", 3, 4], "o": ["", "x"], "n": [{"k": ["a", "b"], "m": ["", 1]}], "undeclared": ["v", ""]}}]
    assert gold_calls(gt, [doc]) == (ToolCall("call_0", "f", {"r": 3, "n": {"k": "a"}}),)


def write_single(tmp_path: Path, question_lines: list[str], answer_lines: list[str]) -> Path:
    (tmp_path / "possible_answer").mkdir(parents=True, exist_ok=True)
    (tmp_path / "BFCL_v4_simple_python.json").write_text("\n".join(question_lines) + "\n")
    (tmp_path / "possible_answer" / "BFCL_v4_simple_python.json").write_text("\n".join(answer_lines) + "\n")
    return tmp_path


def real_lines(name: str, count: int) -> list[str]:
    return (default_data_dir() / name).read_text().splitlines()[:count]


def test_malformed_rows_are_data_errors_naming_file_and_line(tmp_path):
    q = real_lines("BFCL_v4_simple_python.json", 2)
    a = real_lines("possible_answer/BFCL_v4_simple_python.json", 2)
    ok = write_single(tmp_path / "ok", q, a)
    assert len(FunctionCallingTask(categories=["simple"], heldout_size=1, data_dir=str(ok)).problems("simple")) == 2
    cases = {
        "broken": ([q[0], "{not json"], a, r"BFCL_v4_simple_python\.json, line 2: not valid JSON"),
        "no_function": ([q[0], json.dumps({**json.loads(q[1]), "function": "none"})], a,
                        r"BFCL_v4_simple_python\.json, line 2: 'function' must be"),
        "bad_type": ([q[0].replace('"type": "integer"', '"type": "int64"', 1), q[1]], a, r"line 1: .*unknown type"),
        "unknown_gold": (q, [a[0], a[1].replace("math.factorial", "nope")],
                         r"possible_answer/BFCL_v4_simple_python\.json, line 2: ground truth calls 'nope'"),
        "id_mismatch": (q, [a[1], a[0]], r"possible_answer/BFCL_v4_simple_python\.json, line 1: id"),
        "short_answers": (q, a[:1], r"1 rows for the 2 problems"),
    }
    for name, (qs, ans, message) in cases.items():
        data = write_single(tmp_path / name, qs, ans)
        with pytest.raises(DataError, match=message):
            FunctionCallingTask(categories=["simple"], heldout_size=1, data_dir=str(data))


def test_malformed_multi_turn_gold_is_a_data_error(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(default_data_dir() / "multi_turn_func_doc", data / "multi_turn_func_doc")
    (data / "possible_answer").mkdir()
    (data / "BFCL_v4_multi_turn_base.json").write_text("\n".join(real_lines("BFCL_v4_multi_turn_base.json", 2)))
    answers = real_lines("possible_answer/BFCL_v4_multi_turn_base.json", 2)
    answers[1] = answers[1].replace("ls(a=True)", "ls(a=x)")
    (data / "possible_answer" / "BFCL_v4_multi_turn_base.json").write_text("\n".join(answers))
    with pytest.raises(DataError, match=r"possible_answer/BFCL_v4_multi_turn_base\.json, line 2: .*'ls\(a=x\)'"):
        FunctionCallingTask(categories=["multi_turn_base"], heldout_size=1, data_dir=str(data))


# ----------------------------------------------------------------------------------------------- AST checker
DOC = {"name": "book", "parameters": {"type": "dict", "required": ["city", "nights"], "properties": {
    "city": {"type": "string"}, "nights": {"type": "integer"}, "budget": {"type": "float"},
    "tags": {"type": "array", "items": {"type": "string"}}, "extras": {"type": "dict", "properties": {}},
    "late": {"type": "boolean"}}}}
ANSWER = [{"book": {"city": ["New York", "NYC"], "nights": [2], "budget": ["", 300.0], "tags": [["quiet", "view"]],
                    "extras": ["", {"breakfast": [True], "parking": ["", False]}], "late": [False]}}]
GOOD = {"city": "new-york", "nights": 2, "budget": 300, "tags": ["Quiet", "view"], "extras": {"breakfast": True},
        "late": False}


@pytest.mark.parametrize("change, valid, error_type", [
    ({}, True, ""),
    ({"budget": None}, True, ""),  # None = leave the optional parameter out
    ({"city": "Boston"}, False, "value_error:string"),
    ({"nights": "2"}, False, "type_error:simple"),
    ({"nights": 2.0}, False, "type_error:simple"),
    ({"late": 0}, False, "type_error:simple"),
    ({"tags": ["view", "quiet"]}, False, "value_error:list/tuple"),
    ({"extras": {"breakfast": True, "spa": True}}, False, "value_error:dict_key"),
    ({"extras": {"parking": False}}, False, "value_error:dict_key"),
    ({"late": None}, False, "simple_function_checker:missing_optional"),
    ({"nights": None}, False, "simple_function_checker:missing_required"),
    ({"pets": 1}, False, "simple_function_checker:unexpected_param"),
])
def test_ast_checker_rules(change, valid, error_type):
    args = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    verdict = check([DOC], [("book", args)], ANSWER, "simple_python")
    assert (verdict.valid, verdict.error_type) == (valid, error_type)
    assert not check([DOC], [("hotel", args)], ANSWER, "simple_python").valid
    assert not check([DOC], [("book", args)] * 2, ANSWER, "multiple").valid


def test_every_possible_answer_passes_its_own_checker_in_any_order(single):
    failed = set()
    for category in AST_CATEGORIES:
        for p in single.problems(category):
            calls = [(c.name, c.arguments) for c in p.reference_calls]
            for order in (calls, calls[::-1], calls[1:] + calls[:1]):
                if not check(p.info["functions"], order, p.info["possible_answer"], category).valid:
                    failed.add(p.id)
    assert failed == UNSOLVABLE


# ----------------------------------------------------------------------------------------------- single-turn rewards
@pytest.mark.parametrize("pid", ["bfcl/simple_python_3", "bfcl/multiple_7", "bfcl/live_simple_5-3-1",
                                 "bfcl/live_multiple_10-4-2"])
def test_single_call_families_good_and_bad(single, pid):
    p = find(single, pid)
    good = score(p, calls_step(p.reference_calls))
    assert good.total == 1.0 and good.correct and good.components == {"correct": 1, "format": 1, "count": 1, "names": 1}
    call = p.reference_calls[0]
    first = next(iter(call.arguments))
    wrong = "definitely wrong" if not isinstance(call.arguments[first], str) else 123456
    wrong_value = {**call.arguments, first: wrong}
    assert score(p, calls_step([(call.name, wrong_value)])).total == 0.0
    assert score(p, calls_step([("not_a_function", call.arguments)])).components["names"] == 0.0
    assert score(p, calls_step([call, call])).components["count"] == 0.0
    assert score(p, Step("I would call a function here.")).total == 0.0
    broken = score(p, Step("<tool_call>{broken</tool_call>", invalid=1))
    assert broken.total == 0.0 and broken.components["format"] == 0.0


@pytest.mark.parametrize("pid", ["bfcl/parallel_0", "bfcl/parallel_multiple_0", "bfcl/live_parallel_0-0-0",
                                 "bfcl/live_parallel_multiple_0-0-0"])
def test_parallel_families_are_order_free(single, pid):
    p = find(single, pid)
    calls = list(p.reference_calls)
    assert len(calls) >= 2
    for order in (calls, calls[::-1]):
        assert score(p, calls_step(order)).correct
    assert not score(p, calls_step(calls[:-1])).correct
    assert not score(p, calls_step(calls[:-1] + calls[:1])).correct  # one call twice, another missing


def test_irrelevance_wants_no_call_at_all(single):
    for pid in ("bfcl/irrelevance_0", "bfcl/live_irrelevance_0-0-0"):
        p = find(single, pid)
        assert score(p, Step("None of these functions can do that.")).total == 1.0
        name = p.info["functions"][0]["name"]
        assert score(p, calls_step([(name, {})])).total == 0.0
        assert score(p, Step("<tool_call>oops</tool_call>", invalid=1)).total == 0.0


def test_relevance_wants_some_well_formed_call(single):
    p = find(single, "bfcl/live_relevance_0-0-0")
    assert score(p, calls_step([(p.info["functions"][0]["name"], {"prompt": "x"})])).total == 1.0
    assert score(p, Step("no call")).total == 0.0


def test_task_reward_dispatches_and_single_turn_reward_refuses_multi_turn(single, multi):
    p = find(single, "bfcl/simple_python_3")
    assert score(p, calls_step(p.reference_calls), spec="task").total == 1.0
    with pytest.raises(ValueError, match="multi-turn"):
        score(find(multi, "bfcl/multi_turn_base_0"), Step("x"))


def test_toolrl_reward_uses_the_first_accepted_values_as_gold(single):
    p = find(single, "bfcl/parallel_0")
    gold = run("toolrl", trajectory(calls_step(p.reference_calls, "<think>two plays</think>")), p)
    assert gold.components == {"format": 1.0, "correct": 3.0} and gold.correct
    call = p.reference_calls[1]
    off = ToolCall(call.id, call.name, {**call.arguments, "duration": 99})
    partial = run("toolrl", trajectory(calls_step([p.reference_calls[0], off], "<think>x</think>")), p)
    assert -3.0 < partial.components["correct"] < 3.0 and not partial.correct
    irrelevant = find(single, "bfcl/irrelevance_0")
    assert run("toolrl", trajectory(Step("<think>no fit</think>No function fits.")), irrelevant).total == 1.0


# ----------------------------------------------------------------------------------------------- single-turn env
def episode(task, problem, script, fmt, with_tools=True, limits=None, env_limits=None):
    env = task.make_env(problem, ToolSet([]), env_limits or ToolLimits(max_tool_calls=200), with_tools)
    backend = ScriptedBackend(fmt.tokenizer, lambda request, t: script[t] if t < len(script) else "ok" + fmt.eos_text)
    turn_limits = limits or TurnLimits(max_turns=60, max_new_tokens_per_turn=2048, max_new_tokens=60000,
                                       max_context=200000)
    traj = asyncio.run(run_trajectory(env, backend, fmt, SamplingParams(), turn_limits,
                                      TrajectoryMeta(problem.id, "g0"), seed=0))
    assert traj.stop_reason != StopReason.ERROR, traj.meta.error
    return traj, backend


def test_single_turn_env_reads_every_call_of_one_message(single, smol_format):
    p = find(single, "bfcl/parallel_multiple_0")
    text = "".join(render_tool_call(c) for c in p.reference_calls) + smol_format.eos_text
    traj, backend = episode(single, p, [text], smol_format)
    assert len(traj.turns) == 1 and traj.stop_reason == StopReason.ANSWERED
    assert [c.name for c in traj.turns[0].tool_calls] == [c.name for c in p.reference_calls]
    assert all(r.status == ToolStatus.OK for r in traj.tool_results)
    assert backend.requests[0].tools == tuple(p.info["tools"]) and END_OF_TURN in backend.requests[0].stop_strings
    assert run("task", traj, p, task_reward="bfcl").total == 1.0


def test_single_turn_env_fenced_json_unknown_names_and_no_tools(single, smol_format):
    p = find(single, "bfcl/simple_python_3")
    call = p.reference_calls[0]
    fenced = "```json\n" + json.dumps({"name": call.name, "arguments": call.arguments}) + "\n```" + smol_format.eos_text
    traj, _ = episode(single, p, [fenced], smol_format)
    assert run("bfcl_ast", traj, p, task_reward="bfcl").correct
    unknown = render_tool_call(ToolCall("x", "made_up", {})) + smol_format.eos_text
    traj, _ = episode(single, p, [unknown], smol_format)
    assert [r.status for r in traj.tool_results] == [ToolStatus.UNKNOWN_TOOL]
    gold = render_tool_call(call) + smol_format.eos_text
    traj, backend = episode(single, p, [gold], smol_format, with_tools=False)
    assert not traj.tool_results and backend.requests[0].tools == ()
    with pytest.raises(ConfigError, match="task.tools"):
        from tirl.tools.calculator import calculator
        single.make_env(p, ToolSet([calculator]), ToolLimits(), True)


# ----------------------------------------------------------------------------------------------- multi-turn
def gold_script(problem, eos: str, drop_first: bool = False) -> list[str]:
    """Per user turn: one message with the turn's gold calls (if any), then a message without a call."""
    texts, calls = [], iter(problem.reference_calls)
    for t, turn in enumerate(problem.info["ground_truth"]):
        mine = [next(calls) for _ in turn]
        if drop_first and t == 0:
            mine = mine[1:]
        if mine:
            texts.append("".join(render_tool_call(c) for c in mine) + eos)
        texts.append(f"Done with turn {t}." + eos)
    return texts


@pytest.mark.parametrize("pid", ["bfcl/multi_turn_base_0", "bfcl/multi_turn_miss_func_0",
                                 "bfcl/multi_turn_miss_param_0", "bfcl/multi_turn_long_context_3"])
def test_multi_turn_gold_sequence_scores_one(multi, smol_format, pid):
    p = find(multi, pid)
    traj, _ = episode(multi, p, gold_script(p, smol_format.eos_text), smol_format)
    assert traj.stop_reason == StopReason.ANSWERED
    users = [m.content for m in traj.messages if m.role == "user"]
    assert len(users) == len(p.info["turns"])
    result = run("bfcl", traj, p, task_reward="bfcl")
    assert result.total == 1.0 and result.correct and result.components["turns_passed"] == 1.0
    # the follow-up user turns sit in the token stream exactly where the chat template puts them
    rendered = smol_format.render(list(traj.messages), p.info["tools"])
    streamed = smol_format.decode(traj.prompt_ids + traj.response_ids)
    assert rendered.startswith(streamed) and rendered[len(streamed):] == "\n"
    for content in users[1:]:
        assert f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n" in streamed
    if "miss_func" in pid:
        assert any(MORE_FUNCTIONS in u and '"name": "sort"' in u for u in users)


def test_multi_turn_wrong_or_unfinished_sequences_score_zero(multi, smol_format):
    p = find(multi, "bfcl/multi_turn_base_0")
    traj, _ = episode(multi, p, gold_script(p, smol_format.eos_text, drop_first=True), smol_format)
    wrong = run("bfcl", traj, p, task_reward="bfcl")
    assert wrong.total == 0.0 and not wrong.correct and wrong.components["turns_passed"] == 0.0
    assert run({"name": "bfcl", "kwargs": {"partial": True}}, traj, p, task_reward="bfcl").total == 0.0
    script = gold_script(p, smol_format.eos_text)
    cut, _ = episode(multi, p, script, smol_format, limits=TurnLimits(
        max_turns=len(script) - 2, max_new_tokens_per_turn=2048, max_new_tokens=60000, max_context=200000))
    assert cut.stop_reason == StopReason.MAX_TURNS
    unfinished = run({"name": "bfcl_multi_turn", "kwargs": {"partial": True}}, cut, p, task_reward="bfcl")
    assert not unfinished.correct and unfinished.components["finished"] == 0.0
    assert 0.0 < unfinished.total < 1.0  # the turns it did finish still count with partial=true
    swapped = gold_script(p, smol_format.eos_text)
    swapped[0], swapped[2] = swapped[2], swapped[0]  # turn 1's calls before turn 0's
    traj, _ = episode(multi, p, swapped, smol_format)
    assert not run("bfcl_multi_turn", traj, p, task_reward="bfcl").correct


def test_multi_turn_errors_are_data_and_the_budget_ends_the_episode(multi, smol_format):
    p = find(multi, "bfcl/multi_turn_base_0")
    eos = smol_format.eos_text
    script = [render_tool_call(ToolCall("x", "no_such_function", {})) + render_tool_call(
        ToolCall("x", "cd", {"folder": "document", "bogus": 1})) + "<tool_call>{bad json</tool_call>" + eos,
        render_tool_call(ToolCall("x", "cd", {"folder": "document"})) + eos, "ok" + eos]
    traj, _ = episode(multi, p, script, smol_format)
    first, second = traj.turns[0].tool_results, traj.turns[1].tool_results
    assert [r.status for r in first] == [ToolStatus.UNKNOWN_TOOL, ToolStatus.EXECUTION_ERROR, ToolStatus.INVALID_CALL]
    assert first[1].content.startswith("Error during execution:") and "bogus" in first[1].content
    assert second[0].status == ToolStatus.OK and "document" in second[0].content
    traj, _ = episode(multi, p, script, smol_format, env_limits=ToolLimits(max_tool_calls=2))
    assert traj.stop_reason == StopReason.TOOL_BUDGET


def test_back_end_calls_have_a_time_limit():
    slow = {"nap": lambda: time.sleep(2) or "awake"}
    t0 = time.monotonic()
    assert execute(slow, "nap", timeout_s=0.05).status == ToolStatus.TIMEOUT
    assert asyncio.run(execute_async(slow, "nap", {}, timeout_s=0.05)).status == ToolStatus.TIMEOUT
    assert time.monotonic() - t0 < 1.0
    assert execute({"f": lambda x: {"y": x}}, "f", (), {"x": 1}).text == '{"y": 1}'


# ----------------------------------------------------------------------------------------------- demonstrations
def test_demonstrations_are_correct_train_trajectories_sft_can_read(tmp_path, smol_format):
    from tirl.config import SFTConfig
    from tirl.tasks.bfcl.demos import write_demonstrations
    from tirl.trainer.sft_data import rollout_examples

    out = tmp_path / "demos.jsonl"
    assert write_demonstrations(out, "embedded:SmolLM2-135M-Instruct", count=20) == 20
    examples, report = rollout_examples(SFTConfig(source="rollouts", rollouts=[str(out)]), smol_format)
    assert report.read == 20 and len(examples) >= 18  # dedupe may drop a repeated live_parallel problem
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    held = {p.id for p in FunctionCallingTask().heldout()}
    assert all(x["correct"] and x["meta"]["task_id"] not in held for x in lines)
    texts = [x["turns"][0]["text"] for x in lines]
    assert any("<tool_call>" in t for t in texts) and any("None of the given functions" in t for t in texts)


# ----------------------------------------------------------------------------------------------- real model
def test_short_eval_with_the_default_model(tmp_path):
    """A real rollout: the default model, two held-out problems, a few tokens, greedy."""
    run_dir = tmp_path / "run"
    assert main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "function_calling",
                 f"run.dir={run_dir}", "eval.size=2", "eval.no_tools=false", "rollout.max_new_tokens=24",
                 "rollout.max_new_tokens_per_turn=24", "task.kwargs.heldout_size=2"]) == 0
    lines = [json.loads(x) for x in next(run_dir.rglob("*.jsonl")).read_text().splitlines() if x.strip()]
    assert len(lines) == 2 and all(x["meta"]["task_id"].startswith("bfcl/") for x in lines)
    assert all({"correct", "format", "count", "names"} <= set(x["reward_components"]) for x in lines)
