"""Answer extraction, number parsing and the `arithmetic` reward."""

import asyncio
from fractions import Fraction

import pytest

from tirl.rewards import REWARDS, GroupContext, RewardResult, score
from tirl.rewards.answer import answers_match, arithmetic_reward, extract_answer, parse_number
from tirl.tasks.base import Problem
from tirl.types import StopReason, Trajectory, TrajectoryMeta

PROBLEM = Problem(id="arithmetic/test/0", question="What is 4821 * 37?", answer="178377")


def _trajectory(final_answer: str | None, stop: StopReason = StopReason.ANSWERED) -> Trajectory:
    return Trajectory(prompt_ids=(1, 2), response_ids=(3,), loss_mask=(1,), logprobs=(-0.5,), turns=(),
                      messages=(), stop_reason=stop, meta=TrajectoryMeta(task_id=PROBLEM.id, group_id="g0"),
                      final_answer=final_answer)


def _reward(final_answer: str | None, stop: StopReason = StopReason.ANSWERED) -> RewardResult:
    traj = _trajectory(final_answer, stop)
    return arithmetic_reward(traj, PROBLEM, GroupContext(trajectories=(traj,)))


# --- extract_answer ---------------------------------------------------------------------------

def test_last_answer_tag_wins_and_is_stripped():
    assert extract_answer("<answer>1</answer> then <answer>  22 \n</answer> done") == "22"


def test_answer_tag_beats_a_later_boxed():
    assert extract_answer("<answer>5</answer> or \\boxed{6}") == "5"


def test_unclosed_last_tag_falls_back_to_the_last_complete_one():
    assert extract_answer("<answer>7</answer> hmm <answer>8") == "7"


def test_boxed_with_nested_braces():
    assert extract_answer("so \\boxed{1} and finally \\boxed{\\frac{3}{4}}.") == "\\frac{3}{4}"


def test_unbalanced_last_boxed_falls_back_to_an_earlier_balanced_one():
    assert extract_answer("\\boxed{12} and \\boxed{13") == "12"


@pytest.mark.parametrize("text", ["", "178377", "the answer is 5", "<answer>5", "answer>5</answer>", "\\boxed{5"])
def test_no_answer_gives_none(text):
    assert extract_answer(text) is None


def test_empty_tag_is_present_but_empty():
    assert extract_answer("<answer>  </answer>") == ""


# --- parse_number -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("178377", Fraction(178377)),
    ("-5", Fraction(-5)),
    ("+3", Fraction(3)),
    ("178,377", Fraction(178377)),
    ("1,234,567", Fraction(1234567)),
    ("178377.0", Fraction(178377)),
    ("2.5", Fraction(5, 2)),
    ("1,234.50", Fraction(246900, 200)),
    ("3/4", Fraction(3, 4)),
    ("-3/4", Fraction(-3, 4)),
    ("$1,234", Fraction(1234)),
    ("-$5", Fraction(-5)),
    ("178377.", Fraction(178377)),
    ("178377 apples", Fraction(178377)),
    ("178377 apples.", Fraction(178377)),
    ("  42\n", Fraction(42)),
    ("\\$1{,}234", Fraction(1234)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("1\\,234", Fraction(1234)),
    ("178377 \\text{ dollars}", Fraction(178377)),
    ("$1234$", Fraction(1234)),
])
def test_parse_number_accepts(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", [
    "", "abc", "about 5 or 6", "5 6", "5 or 6", "17,8377", "1,23", "12,3456", ",123", "1.2.3", "5%", "1e5",
    "3/0", "1.5/2", "-+5", "$", "x = 5", "the answer is 7", "7 and 8",
])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


# --- answers_match ----------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["178377", "178,377", "178377.0", "$178,377", "178377 bottles", "+178377"])
def test_answers_match_numeric_equality(pred):
    assert answers_match(pred, "178377")


@pytest.mark.parametrize("pred", [None, "", "178376", "-178377", "178377.5", "1783770", "about 178377"])
def test_answers_match_rejects(pred):
    assert not answers_match(pred, "178377")


def test_unparseable_gold_is_a_bug_and_raises():
    with pytest.raises(ValueError, match="gold"):
        answers_match("5", "five")


# --- the reward -------------------------------------------------------------------------------

def test_reward_is_registered_with_a_description():
    assert REWARDS.get("arithmetic") is arithmetic_reward
    assert "answer" in REWARDS.describe()["arithmetic"]


@pytest.mark.parametrize("final, correct, fmt", [
    ("I called the tool. <answer>178377</answer>", 1.0, 0.1),
    ("<answer>178,377</answer>", 1.0, 0.1),
    ("\\boxed{178377}", 1.0, 0.1),
    ("<answer>178378</answer>", 0.0, 0.1),
    ("<answer>178377</answer> wait, <answer>5</answer>", 0.0, 0.1),
    ("<answer>about 178377 or so</answer>", 0.0, 0.0),
    ("<answer></answer>", 0.0, 0.0),
    ("The answer is 178377.", 0.0, 0.0),
])
def test_reward_components(final, correct, fmt):
    result = _reward(final)
    assert result.components == {"correct": correct, "format": fmt}
    assert result.total == pytest.approx(correct + fmt)
    assert result.correct is (correct == 1.0)


def test_no_final_answer_scores_zero():
    result = _reward(None, StopReason.MAX_TURNS)
    assert result.total == 0.0
    assert result.components == {"correct": 0.0, "format": 0.0}
    assert result.correct is False


def test_score_passes_the_result_through():
    traj = _trajectory("<answer>178377</answer>")
    result = asyncio.run(score(REWARDS.get("arithmetic"), traj, PROBLEM, GroupContext(trajectories=(traj,))))
    assert result.total == pytest.approx(1.1) and result.correct is True
