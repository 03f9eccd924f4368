"""ET-Agent behaviour calibration (reference 3.6): the factors, the group z-scores, the reward on a group."""

import math

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.base import GroupContext
from tirl.rewards.etagent import calibration_factor, etagent_reward, tool_call_count, zscores
from tirl.tasks.base import Problem

from tests.rewards.builders import Step, alone, trajectory

QA = Problem(id="qa/0", question="Which city?", answer="Paris")
MATH = Problem(id="math/0", question="3/4?", answer="\\frac{3}{4}")
ANSWER = "<think>so</think><answer>\\boxed{Paris}</answer>"


def _calls(n: int, tokens: int = 1) -> Step:
    return Step("<think>s</think>", calls=[("search", {"query": str(k)}) for k in range(n)], tokens=tokens)


def test_reference_f_tool():
    """Group tc = [1, 2, 3], current tc = 3, sigma = 0.2: 2 / (1 + e^{0.2}) = 0.90033."""
    assert calibration_factor(3, 2.0, 0.2) == pytest.approx(0.90033, abs=1e-5)


def test_factor_is_one_at_the_mean_and_symmetric():
    assert calibration_factor(2, 2.0, 0.5) == 1.0
    assert calibration_factor(1, 2.0, 0.2) + calibration_factor(3, 2.0, 0.2) == pytest.approx(2.0)


def test_zscores_population_std():
    """[1, 2, 3]: mean 2, population std sqrt(2/3) -> z = -/+ 1.22474."""
    assert zscores([1, 2, 3]) == pytest.approx([-1.224745, 0.0, 1.224745])
    assert zscores([4, 4]) == [0.0, 0.0]
    with pytest.raises(ValueError):
        zscores([])


def test_reward_on_a_group():
    """Three correct rollouts with tc = [1, 2, 3] and sampled lengths [2, 3, 4] (one token per turn plus
    the answer turn's): for the third, f_tool = 0.90033, z = 1.22474, f_length = 2/(1+e^{0.5*1.22474})."""
    group = tuple(trajectory(_calls(n), Step(ANSWER, tokens=n)) for n in (1, 2, 3))
    ctx = GroupContext(trajectories=group)
    results = [etagent_reward(t, QA, ctx) for t in group]
    f_len = 2 / (1 + math.exp(0.5 * 1.224745))
    assert results[2].components["f_tool"] == pytest.approx(0.90033, abs=1e-5)
    assert results[2].components["f_length"] == pytest.approx(f_len, rel=1e-5)
    assert results[2].total == pytest.approx(0.90033 * f_len, rel=1e-4)
    assert results[1].total == pytest.approx(1.0)  # the mean rollout
    assert results[0].total > 1.0 and results[0].correct is True
    assert [r.components["tool_calls"] for r in results] == [1.0, 2.0, 3.0]


def test_sigmas_zero_leave_correctness_and_format():
    group = tuple(trajectory(_calls(n), Step(ANSWER, tokens=n)) for n in (1, 3))
    ctx = GroupContext(trajectories=group)
    assert [etagent_reward(t, QA, ctx, sigma_tool=0.0, sigma_len=0.0).total for t in group] == [1.0, 1.0]


def test_partial_f1_and_bad_format():
    """"Paris Lyon" vs "Paris": P = 1/2, R = 1 -> F1 = 2/3. A missing box: raw 0 and format -1."""
    traj = trajectory("<think>so</think><answer>\\boxed{Paris Lyon}</answer>")
    assert etagent_reward(traj, QA, alone(traj)).total == pytest.approx(2 / 3)
    bad = trajectory("<think>so</think><answer>Paris</answer>")
    result = etagent_reward(bad, QA, alone(bad))
    assert result.total == -1.0 and result.components["raw"] == 0.0
    no_think = trajectory("<answer>\\boxed{Paris}</answer>")
    assert etagent_reward(no_think, QA, alone(no_think)).total == pytest.approx(0.0)  # 1 * 1 * 1 - 1


def test_math_base():
    traj = trajectory("<think>so</think><answer>\\boxed{0.75}</answer>")
    assert etagent_reward(traj, MATH, alone(traj), base="math").total == 1.0
    wrong = trajectory("<think>so</think><answer>\\boxed{0.7}</answer>")
    assert etagent_reward(wrong, MATH, alone(wrong), base="math").total == 0.0


def test_errors():
    traj, other = trajectory(ANSWER), trajectory(_calls(1), ANSWER)
    with pytest.raises(ValueError, match="not in group.trajectories"):
        etagent_reward(traj, QA, alone(other))
    with pytest.raises(ValueError, match="unknown base 'em'"):
        etagent_reward(traj, QA, alone(traj), base="em")
    with pytest.raises(ValueError, match="sigmas"):
        etagent_reward(traj, QA, alone(traj), sigma_tool=-1.0)


def test_tool_call_count_ignores_unparsed_attempts():
    assert tool_call_count(trajectory(Step("<think>s</think>", calls=[("search", {})], invalid=2), ANSWER)) == 1


def test_registered():
    assert REWARDS.get("etagent") is etagent_reward
