"""OTC-PPO and OTC-GRPO rewards (reference 3.2) on hand-computed values."""

import asyncio
import math

import pytest

from tirl.rewards.base import GroupContext, bind, score
from tirl.rewards.otc import otc_f, otc_grpo_tool_reward, otc_ppo_tool_reward, tool_calls
from tirl.tasks.base import Problem
from tirl.types import StopReason, ToolResult, ToolStatus, Trajectory, TrajectoryMeta, Turn

PROBLEM = Problem(id="q1", question="What is 2 + 3?", answer="5")


def _traj(answer: str, calls: int, failed: int = 0) -> Trajectory:
    results = tuple(ToolResult(f"c{i}", "calculator", "5") for i in range(calls))
    results += tuple(ToolResult(f"e{i}", "calculator", "bad", ToolStatus.VALIDATION_ERROR) for i in range(failed))
    turns = (Turn(0, 1, 1, "call", "stop", tool_results=results), Turn(1, 2, 2, "answer", "eos"))
    return Trajectory(prompt_ids=(1,), response_ids=(2, 3), loss_mask=(1, 1), logprobs=(-0.1, -0.1), turns=turns,
                      messages=(), stop_reason=StopReason.ANSWERED, meta=TrajectoryMeta("q1", "g"),
                      final_answer=f"<answer>{answer}</answer>")


@pytest.mark.parametrize(("m", "n", "expected"), [
    (1, 1, 1.0), (2, 1, 0.86603), (3, 1, 0.70711), (2, 0, math.cos(2 * math.pi / 7)), (0, 0, 1.0), (1, 2, 0.86603),
])
def test_otc_grpo_tool_reward_reference_values(m, n, expected):
    """Reference 3.2, c=3: (1,1)->1, (2,1)->sin(2pi/3)=0.86603, (3,1)->sin(3pi/4)=0.70711,
    (2,0)->cos(2pi/7)=0.62349, (0,0)->1, (1,2)->f=4/3, sin(pi/3)=0.86603."""
    assert otc_grpo_tool_reward(m, n, c=3) == pytest.approx(expected, abs=1e-5)


def test_otc_grpo_peaks_at_n_and_decays_both_ways():
    values = [otc_grpo_tool_reward(m, 2, c=3) for m in range(6)]
    assert max(values) == values[2] == 1.0
    assert values[0] < values[1] < values[2] > values[3] > values[4] > values[5]


def test_otc_f_maps_into_zero_two_n():
    assert otc_f(0, 0) == 0 and otc_f(3, 0) == 3 and otc_f(2, 1) == pytest.approx(4 / 3)
    assert all(0 <= otc_f(m, 3) < 6 for m in range(50))


def test_otc_ppo_tool_reward():
    """cos(m pi/(2m+c)), c=3: m=0 -> 1, m=1 -> cos(pi/5) = 0.80902, m=2 -> cos(2pi/7) = 0.62349."""
    assert otc_ppo_tool_reward(0, 3) == 1.0
    assert otc_ppo_tool_reward(1, 3) == pytest.approx(0.80902, abs=1e-5)
    assert otc_ppo_tool_reward(2, 3) == pytest.approx(0.62349, abs=1e-5)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="m must be >= 0"):
        otc_ppo_tool_reward(-1, 3)
    with pytest.raises(ValueError, match="c must be > 0"):
        otc_grpo_tool_reward(1, 1, c=0)


def test_failed_calls_count():
    assert tool_calls(_traj("5", 1, failed=2)) == 3


def _score_group(spec, trajs, state, training=True):
    reward = bind(spec, "arithmetic")
    ctx = GroupContext(trajectories=tuple(trajs), step=0, state=state, task_reward="arithmetic", training=training)
    return [asyncio.run(score(reward, t, PROBLEM, ctx)) for t in trajs]


def test_otc_grpo_reward_in_a_group_is_multiplicative():
    """Group: correct with 1 call, correct with 2 calls, wrong with 0 calls. n = 1; base 'total' of
    `arithmetic` is 1.1 when correct (0.1 format bonus), 0.1 for a tagged wrong number.
    -> 1.1 * 1, 1.1 * sin((4/3) pi / 2) = 1.1 * 0.86603, 0.1 * f(0,1)=0 -> sin(0) = 0."""
    state: dict = {}
    out = _score_group({"name": "otc_grpo", "kwargs": {"c": 3}}, [_traj("5", 1), _traj("5", 2), _traj("7", 0)], state)
    assert [r.total for r in out] == pytest.approx([1.1, 1.1 * 0.866025, 0.0], abs=1e-5)
    assert [r.correct for r in out] == [True, True, False]
    assert out[1].components["r_tool"] == pytest.approx(0.866025, abs=1e-5)
    assert state["otc_grpo_min_calls"] == {"q1": 1}


def test_otc_grpo_keeps_the_per_question_minimum_across_steps():
    """Step 1 sees a correct 1-call answer; in step 2 every correct rollout needs 2 calls, but n stays 1
    (the paper's global n), so 2 calls pay sin(2pi/3) instead of 1. Evaluation reads the record
    without changing it."""
    state: dict = {}
    _score_group("otc_grpo", [_traj("5", 1), _traj("5", 3)], state)
    out = _score_group({"name": "otc_grpo", "kwargs": {"r_phi": "correct"}}, [_traj("5", 2), _traj("5", 2)], state)
    assert [r.total for r in out] == pytest.approx([0.866025, 0.866025], abs=1e-5)
    assert state["otc_grpo_min_calls"] == {"q1": 1}
    _score_group("otc_grpo", [_traj("5", 0)], state, training=False)
    assert state["otc_grpo_min_calls"] == {"q1": 1}


def test_otc_grpo_unknown_minimum_pays_nothing_for_wrong_answers():
    out = _score_group({"name": "otc_grpo", "kwargs": {"r_phi": "correct"}}, [_traj("7", 1), _traj("8", 0)], {})
    assert [r.total for r in out] == [0.0, 0.0]
    assert "otc_n" not in out[0].components


def test_otc_ppo_reward_and_bad_parameters():
    out = _score_group({"name": "otc_ppo", "kwargs": {"r_phi": "correct"}}, [_traj("5", 1), _traj("5", 0)], {})
    assert [r.total for r in out] == pytest.approx([0.80902, 1.0], abs=1e-5)
    with pytest.raises(ValueError, match="r_phi must be"):
        _score_group({"name": "otc_ppo", "kwargs": {"r_phi": "sum"}}, [_traj("5", 1)], {})
    with pytest.raises(ValueError, match="has no parameter 'gamma'"):
        bind({"name": "otc_ppo", "kwargs": {"gamma": 1}}, "arithmetic")
