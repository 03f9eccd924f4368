"""The `math_verify` reward: math-verify equivalence of the tagged/boxed answer, failure policy, format bonus."""

import threading

import math_verify
import pytest
from math_verify.errors import TimeoutException

from tirl.rewards import REWARDS
from tirl.rewards.math import math_equal, math_verify_reward, parse_gold
from tirl.tasks.base import Problem

from tests.rewards.builders import alone, trajectory

PROBLEM = Problem(id="math/0", question="What is 3/4 as a fraction?", answer="\\frac{3}{4}")


def _reward(final, problem=PROBLEM, answered=None, **params):
    traj = trajectory(final, answered=answered)
    return math_verify_reward(traj, problem, alone(traj), **params)


@pytest.mark.parametrize("final", [
    "<answer>\\frac{3}{4}</answer>",
    "<answer>0.75</answer>",
    "<answer>3/4</answer>",
    "<answer>The result is \\boxed{\\frac{6}{8}}</answer>",
    "so the answer is \\boxed{\\dfrac{3}{4}}",
])
def test_equivalent_answers_are_correct(final):
    result = _reward(final)
    assert result.correct is True
    assert result.components == {"correct": 1.0, "format": 0.0}


@pytest.mark.parametrize("final", ["<answer>0.7</answer>", "<answer>4/3</answer>", "<answer>x+1</answer>",
                                   "<answer></answer>", "the answer is 3/4", "<answer>\\frac{3}{</answer>"])
def test_wrong_or_unreadable_answers_score_zero(final):
    result = _reward(final)
    assert result.correct is False and result.components["correct"] == 0.0


def test_format_bonus_for_a_tagged_answer_even_when_wrong():
    assert _reward("<answer>0.7</answer>", format_bonus=0.1).total == pytest.approx(0.1)
    assert _reward("<answer>0.75</answer>", format_bonus=0.1).total == pytest.approx(1.1)
    assert _reward("0.75", format_bonus=0.1).total == 0.0


def test_unanswered_trajectory_scores_zero():
    assert _reward("<answer>0.75</answer>", answered=False, format_bonus=0.1).total == 0.0


def test_symbolic_and_integer_gold():
    assert math_equal("2\\sqrt{2}", "\\sqrt{8}")
    assert math_equal("178,377", "178377")
    assert not math_equal("178,376", "178377")


def test_unparseable_gold_raises_naming_the_problem():
    with pytest.raises(ValueError, match="math/9.*gold answer"):
        _reward("<answer>1</answer>", Problem(id="math/9", question="q", answer=""))
    with pytest.raises(ValueError, match="math/8"):
        parse_gold("\\frac{", "math/8")


def test_verify_timeout_or_crash_on_model_output_is_wrong(monkeypatch):
    def timing_out(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "verify", timing_out)
    assert _reward("<answer>0.75</answer>").correct is False
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: 1 / 0)
    assert _reward("<answer>0.75</answer>").correct is False


def test_works_off_the_main_thread():
    """math-verify's SIGALRM timeouts exist only on the main thread: a worker thread checks without one."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", _reward("<answer>0.75</answer>")))
    thread.start()
    thread.join()
    assert out["r"].correct is True


def test_registered():
    assert REWARDS.get("math_verify") is math_verify_reward
    assert "math-verify" in REWARDS.describe()["math_verify"]
