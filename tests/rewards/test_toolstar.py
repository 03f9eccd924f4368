"""Tool-Star hierarchical reward (reference 3.3): the four reference cases, the format rules, the math variants."""

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.toolstar import format_error, toolstar_hierarchy, toolstar_math, toolstar_reward
from tirl.tasks.base import Problem
from tirl.types import ToolStatus

from tests.rewards.builders import Step, alone, trajectory

QA = Problem(id="hotpot/0", question="Which city hosts the Eiffel Tower?", answer="Paris France")
MATH = Problem(id="math/0", question="3/4?", answer="\\frac{3}{4}")
SEARCH = Step("<think>look it up</think>", calls=[("search", {"query": "eiffel tower"})])
PYTHON = Step("<think>compute</think>", calls=[("python", {"code": "print(1)"})])


def _reward(*turns, problem=QA, answered=None, **params):
    traj = trajectory(*turns, answered=answered)
    return toolstar_reward(traj, problem, alone(traj), **params)


def test_reference_f1_one_both_tools():
    """Valid format, F1 = 1, both search and python called -> 1 + 0.1 = 1.1."""
    result = _reward(SEARCH, PYTHON, "<think>so</think><answer>\\boxed{Paris France}</answer>")
    assert result.total == pytest.approx(1.1) and result.correct is True


def test_reference_f1_half_search_only():
    """Pred "Paris Lyon" vs gold "Paris France": common 1, P = R = 1/2 -> F1 = 0.5; search only -> no bonus."""
    result = _reward(SEARCH, "<think>so</think><answer>\\boxed{Paris Lyon}</answer>")
    assert result.total == pytest.approx(0.5)
    assert result.components["multi_tool"] == 0.0 and result.correct is False


def test_reference_f1_zero():
    assert _reward(SEARCH, PYTHON, "<think>so</think><answer>\\boxed{London}</answer>").total == 0.0


def test_reference_no_boxed_is_minus_one():
    result = _reward(SEARCH, "<think>so</think><answer>Paris France</answer>")
    assert result.total == -1.0 and result.components["format_valid"] == 0.0


@pytest.mark.parametrize("turns, reason", [
    (("<answer>\\boxed{x}</answer>",), "not found"),
    (("<think>a<think>b</think><answer>\\boxed{x}</answer>",), "not paired"),
    (("<think>a</think>\\boxed{x}",), "exactly one <answer>"),
    (("<think>a</think><answer>\\boxed{x}</answer><answer>y</answer>",), "exactly one <answer>"),
    (("<think>a</think></answer>\\boxed{x}<answer>",), "before"),
    ((Step("<think>a</think>", invalid=1), "<think>b</think><answer>\\boxed{x}</answer>"), "could not be parsed"),
    (("<think>a</think><answer>\\boxed{x</answer>",), "boxed"),
])
def test_format_errors(turns, reason):
    assert reason in format_error(trajectory(*turns))


def test_format_valid_across_turns_and_tool_errors_are_not_format_errors():
    failing = Step("<think>a</think>", calls=[("search", {"query": ""})], statuses=[ToolStatus.EXECUTION_ERROR])
    assert format_error(trajectory(failing, "<think>b</think><answer>\\boxed{x}</answer>")) is None


def test_multi_tools_parameter():
    calc = Step("<think>c</think>", calls=[("calculator", {"expression": "1+1"})])
    final = "<think>so</think><answer>\\boxed{Paris France}</answer>"
    assert _reward(SEARCH, calc, final, multi_tools=["search", "calculator"]).total == pytest.approx(1.1)
    assert _reward(SEARCH, calc, final).total == pytest.approx(1.0)


def test_hierarchy_and_math_functions():
    assert toolstar_hierarchy(False, 1.0, True) == -1.0
    assert toolstar_hierarchy(True, 0.0, True) == 0.0
    assert toolstar_hierarchy(True, 0.4, True) == pytest.approx(0.5)
    assert toolstar_math(True, True, True) == 1.0
    assert toolstar_math(True, True, False) == 0.1
    assert toolstar_math(False, True, True) == 0.0
    assert toolstar_math(True, False, True) == 0.0


def test_math_variant():
    good = "<think>so</think><answer>\\boxed{0.75}</answer>"
    assert _reward(good, problem=MATH, variant="math").total == 1.0
    assert _reward("<think>so</think><answer>\\boxed{0.7}</answer>", problem=MATH, variant="math").total == 0.1
    assert _reward("<think>so</think><answer>0.75</answer>", problem=MATH, variant="math").total == 0.0
    assert _reward(good, problem=MATH, variant="math", answered=False).total == 0.0  # over length


def test_math_calling_variant():
    final = "<think>so</think><answer>\\boxed{3/4}</answer>"
    assert _reward(SEARCH, PYTHON, final, problem=MATH, variant="math_calling").total == pytest.approx(1.1)
    assert _reward("<think>so</think><answer>\\boxed{1}</answer>", problem=MATH, variant="math_calling").total == 0.0
    assert _reward("<think>so</think><answer>1</answer>", problem=MATH, variant="math_calling").total == -1.0


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="unknown variant 'em'.*qa, math, math_calling"):
        _reward("x", variant="em")
    with pytest.raises(ValueError, match="multi_tools"):
        _reward("x", multi_tools="search")


def test_registered():
    assert REWARDS.get("toolstar") is toolstar_reward
