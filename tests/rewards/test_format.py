"""Format rewards: `format_tags` (answer tag exactly once, optional think pairing) and `tool_call_validity`."""

import dataclasses

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.format import (assistant_text, format_tags_reward, single_tag_block, think_paired,
                                 tool_call_validity_reward, unparsed_attempts)
from tirl.tasks.base import Problem
from tirl.types import ToolResult, ToolStatus

from tests.rewards.builders import Step, alone, trajectory

PROBLEM = Problem(id="p", question="q", answer="5")


def _tags(*turns, **params):
    traj = trajectory(*turns)
    return format_tags_reward(traj, PROBLEM, alone(traj), **params)


def _validity(*turns, **params):
    traj = trajectory(*turns)
    return tool_call_validity_reward(traj, PROBLEM, alone(traj), **params)


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think>", True),
    ("<think>a</think> x <think>b</think>", True),
    ("no think", False),
    ("<think>a", False),
    ("</think><think>", False),
    ("<think><think>a</think></think>", False),
    ("<think>a</think></think>", False),
])
def test_think_paired(text, ok):
    assert think_paired(text) is ok


@pytest.mark.parametrize("text, ok", [
    ("<answer>5</answer>", True),
    ("x <answer>5</answer> y", True),
    ("<answer>5</answer><answer>6</answer>", False),
    ("</answer>5<answer>", False),
    ("<answer>5", False),
    ("5", False),
])
def test_single_tag_block(text, ok):
    assert single_tag_block(text, "answer") is ok


def test_format_tags_answer_exactly_once():
    assert _tags("<answer>5</answer>").total == 1.0
    assert _tags("<answer>5</answer> or <answer>6</answer>").total == 0.0
    assert _tags("5").total == 0.0


def test_format_tags_custom_tag_reward_and_penalty():
    assert _tags("<response>hi</response>", tag="response", reward=0.5, penalty=-1.0).total == 0.5
    assert _tags("<answer>hi</answer>", tag="response", reward=0.5, penalty=-1.0).total == -1.0


def test_format_tags_require_think_checks_every_turn():
    call = Step("<think>look up</think>", calls=[("search", {"query": "x"})])
    assert _tags(call, "<think>ok</think><answer>5</answer>", require_think=True).total == 1.0
    no_think_first = Step("look up", calls=[("search", {"query": "x"})])
    assert _tags(no_think_first, "<think>ok</think><answer>5</answer>", require_think=True).total == 0.0
    assert _tags(no_think_first, "<think>ok</think><answer>5</answer>").total == 1.0  # not required


def test_format_tags_unanswered_gets_penalty():
    traj = trajectory("<answer>5</answer>", answered=False)
    assert format_tags_reward(traj, PROBLEM, alone(traj), penalty=-0.5).total == -0.5


def test_format_tags_rejects_a_bad_tag():
    with pytest.raises(ValueError, match="bare tag name"):
        _tags("<answer>5</answer>", tag="<answer>")


def test_tool_call_validity_fraction():
    """Calls: ok, execution_error, output_truncated, plus one unparseable attempt: 2 of 4 ok by default."""
    turn = Step("calls", calls=[("a", {}), ("b", {}), ("c", {})],
             statuses=[ToolStatus.OK, ToolStatus.EXECUTION_ERROR, ToolStatus.OUTPUT_TRUNCATED], invalid=1)
    result = _validity(turn, "<answer>5</answer>")
    assert result.total == pytest.approx(0.5)
    assert result.components == {"tool_validity": 0.5, "tool_calls": 4.0}
    assert _validity(turn, "done", ok_statuses=["ok"], weight=2.0).total == pytest.approx(0.5)


def test_tool_call_validity_without_calls_and_bad_statuses():
    assert _validity("<answer>5</answer>").total == 0.0
    assert _validity("<answer>5</answer>", no_calls=1.0).total == 1.0
    with pytest.raises(ValueError, match="unknown tool status 'fine'.*validation_error"):
        _validity("x", ok_statuses=["ok", "fine"])
    with pytest.raises(ValueError, match="list of tool statuses"):
        _validity("x", ok_statuses="ok")


def test_unparsed_attempts_count_results_without_a_call():
    """Two invalid attempts, plus a budget-exceeded result for an unreadable call (no ToolCall has its id)."""
    traj = trajectory(Step("x", calls=[("a", {})], statuses=[ToolStatus.VALIDATION_ERROR], invalid=2), "done")
    assert unparsed_attempts(traj) == 2
    over_budget = ToolResult("call_9_0", "", "budget", ToolStatus.BUDGET_EXCEEDED)
    turn = dataclasses.replace(traj.turns[0], tool_results=traj.turns[0].tool_results + (over_budget,))
    assert unparsed_attempts(dataclasses.replace(traj, turns=(turn, traj.turns[1]))) == 3


def test_assistant_text_joins_turns():
    assert assistant_text(trajectory("a", "b")) == "a\nb"


def test_registered():
    assert REWARDS.get("format_tags") is format_tags_reward
    assert REWARDS.get("tool_call_validity") is tool_call_validity_reward
