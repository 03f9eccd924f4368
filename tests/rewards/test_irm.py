"""TL-Training IRM error-category reward (reference 3.7): the three reference cases and every category."""

import dataclasses

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.irm import CATEGORY_REWARDS, first_call, irm_category, irm_reward, tool_schemas
from tirl.tasks.base import Problem
from tirl.types import ToolCall, ToolResult, ToolStatus

from tests.rewards.builders import Step, alone, trajectory

SCHEMA = {"type": "function", "function": {"name": "search", "description": "find",
                                           "parameters": {"type": "object", "properties": {"q": {}, "k": {}}}}}
CALC = {"name": "calc", "parameters": {"type": "object", "properties": {"x": {}}}}
GOLD = {"name": "search", "parameters": {"q": "a", "k": "5"}}
PROBLEM = Problem(id="irm/0", question="find a", answer="", info={"gold_calls": [GOLD], "tools": [SCHEMA, CALC]})


def _reward(*turns, problem=PROBLEM):
    traj = trajectory(*turns, answered=False)
    return irm_reward(traj, problem, alone(traj))


def _call(name, args, status=ToolStatus.OK):
    return Step("call", calls=[(name, args)], statuses=[status])


def test_reference_missing_only():
    """Gold search(q='a', k='5'), pred search(q='a'): only a gold key is missing -> -0.5."""
    result = _reward(_call("search", {"q": "a"}))
    assert result.total == -0.5 and result.components["irm_red_or_mis"] == 1.0


def test_reference_tool_not_in_list():
    assert _reward(_call("lookup", {"q": "a"}, ToolStatus.UNKNOWN_TOOL)).total == -2.0


def test_reference_exact():
    result = _reward(_call("search", {"q": "a", "k": "5"}))
    assert result.total == 1.0 and result.correct is True


@pytest.mark.parametrize("pred_name, pred_args, expected", [
    (None, {}, "parse_error"),
    ("calc", {"x": 1}, "wrong_tool"),
    ("search", {"q": "a", "zz": 1}, "hal_and_red_or_mis"),          # hal (zz) + missing k
    ("search", {"q": "a", "k": "5", "zz": 1}, "hal"),               # hal only
    ("search", {"q": "a", "k": "6"}, "wrong_values"),
    ("search", {"q": "a", "k": "5"}, "exact"),
])
def test_categories_with_the_gold_schema(pred_name, pred_args, expected):
    keys = {"q", "k"}
    assert irm_category(pred_name, pred_args, "search", GOLD["parameters"], True, keys) == expected


def test_categories_that_need_redundant_keys():
    """Schema {q, k, lang}, gold {q, k}: lang is a valid but non-gold key (redundant)."""
    keys, gold = {"q", "k", "lang"}, {"q": "a", "k": "5"}
    assert irm_category("search", {"q": "a", "lang": "en", "zz": 1}, "search", gold, True, keys) == "hal_red_mis"
    assert irm_category("search", {"q": "a", "k": "5", "lang": "en", "zz": 1}, "search", gold, True,
                        keys) == "hal_and_red_or_mis"
    assert irm_category("search", {"q": "a", "lang": "en"}, "search", gold, True, keys) == "red_mis"
    assert irm_category("search", {"q": "a", "k": "5", "lang": "en"}, "search", gold, True, keys) == "red_or_mis"


def test_unknown_tool_wins_over_wrong_tool_and_unknown_schema_sets_no_hal():
    assert irm_category("lookup", {}, "search", {}, False, None) == "unknown_tool"
    assert irm_category("search", {"q": "a", "k": "5", "zz": 1}, "search", GOLD["parameters"], True,
                        None) == "wrong_values"


def test_category_values_in_rule_order():
    assert list(CATEGORY_REWARDS.values()) == [-2.0, -2.0, -1.5, -1.8, -1.3, -1.0, -0.8, -0.5, -0.25, 1.0]


def test_tool_list_from_info_wins_over_statuses():
    """With info['tools'], a tool outside it is -2 even if the env ran it (the env may know more tools)."""
    assert _reward(_call("sql", {"q": "a"})).total == -2.0
    assert _reward(_call("calc", {"x": 1})).total == -1.5


def test_without_schemas_the_statuses_decide():
    problem = Problem(id="irm/1", question="q", answer="", reference_calls=(ToolCall("r", "search", {"q": "a"}),))
    assert _reward(_call("lookup", {"q": "a"}, ToolStatus.UNKNOWN_TOOL), problem=problem).total == -2.0
    assert _reward(_call("search", {"q": "b"}, ToolStatus.EXECUTION_ERROR), problem=problem).total == -0.25
    assert _reward(_call("search", {"q": "a", "extra": 1}), problem=problem).total == -0.25  # no schema: no hal


def test_parse_failure_and_no_call():
    over_budget = trajectory(Step("call", calls=[("search", GOLD["parameters"])]), answered=False)
    unreadable = ToolResult("call_0_9", "", "budget", ToolStatus.BUDGET_EXCEEDED)
    turn = dataclasses.replace(over_budget.turns[0], tool_calls=(), tool_results=(unreadable,))
    over_budget = dataclasses.replace(over_budget, turns=(turn,))
    assert irm_reward(over_budget, PROBLEM, alone(over_budget)).total == -2.0
    unparsed_first = (Step("call", invalid=1), Step("<think>x</think>", calls=[("search", GOLD["parameters"])]))
    assert _reward(*unparsed_first).total == -2.0
    traj = trajectory("just an answer")
    assert irm_reward(traj, PROBLEM, alone(traj)).total == -2.0


def test_only_the_first_call_is_scored():
    turn = Step("calls", calls=[("search", {"q": "a", "k": "5"}), ("calc", {"x": 1})])
    assert _reward(turn).total == 1.0
    call, status = first_call(trajectory(turn, "done"))
    assert call.name == "search" and status is ToolStatus.OK


def test_bad_problem_data_raises():
    with pytest.raises(ValueError, match="irm/2.*no gold call"):
        _reward(_call("search", {}), problem=Problem(id="irm/2", question="q", answer=""))
    with pytest.raises(ValueError, match="irm/3.*not a tool schema"):
        tool_schemas(Problem(id="irm/3", question="q", answer="", info={"tools": [{"parameters": {}}]}))
    with pytest.raises(ValueError, match="irm/4.*list of JSON tool schemas"):
        tool_schemas(Problem(id="irm/4", question="q", answer="", info={"tools": SCHEMA}))


def test_schema_formats():
    assert tool_schemas(PROBLEM) == {"search": {"q", "k"}, "calc": {"x"}}
    assert tool_schemas(Problem(id="x", question="q", answer="")) is None


def test_registered():
    assert REWARDS.get("irm") is irm_reward
