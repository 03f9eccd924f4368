"""Rollout robustness: the stall watchdog, failed rollouts, context overflow, step budgets.

DESIGN.md invariant 3 (a stalled rollout is a report and an abort, never a silent hang) and the
rule that one broken trajectory never takes its step down with it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tirl.backends.scripted import ScriptedBackend
from tirl.envs.tool_env import ToolEnv, ToolLimits
from tirl.errors import RolloutError, StalledError
from tirl.rollout.agent import TurnLimits, cut_text, run_trajectory
from tirl.rollout.checks import check_trajectory
from tirl.rollout.groups import Flat, RolloutContext, RolloutSpec, run_strategy
from tirl.rollout.metrics import trajectory_metrics
from tirl.tasks.base import Problem
from tirl.tools import ToolSet, calculator, tool
from tirl.types import StopReason, TrajectoryMeta

ANSWER = "<answer>2</answer><|im_end|>"


def _call(name: str, args: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {args}}}</tool_call>'


@tool(timeout_s=60)
async def hang(x: int) -> str:
    """Never answers within the test.

    Args:
        x: Anything.
    """
    await asyncio.sleep(60)
    return "late"


@tool
def shout(n: int) -> str:
    """Returns n characters.

    Args:
        n: How many.
    """
    return "HEAD" + "x" * (n - 8) + "TAIL"


def _reward(traj, problem, ctx):
    return 1.0 if traj.final_answer and problem.answer in traj.final_answer else 0.0


def _ctx(fmt, script, tools, make_env=None, **spec):
    problems_env = make_env or (lambda p: ToolEnv(p, "Solve it.", tools, ToolLimits(max_output_chars=100_000)))
    return RolloutContext(problems_env, ScriptedBackend(fmt.tokenizer, script), fmt,
                          RolloutSpec(**{"group_size": 2, **spec}), _reward)


PROBLEMS = [Problem(id=f"p{i}", question="1+1?", answer="2") for i in range(2)]


def test_watchdog_names_the_hung_tool_and_aborts(smol_format):
    ctx = _ctx(smol_format, [_call("hang", '{"x": 1}'), ANSWER], ToolSet([hang]), stall_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(StalledError) as err:
        asyncio.run(run_strategy(Flat(), PROBLEMS, ctx))
    assert time.monotonic() - t0 < 10  # aborted, not waited out
    report = str(err.value)
    assert "4 trajectories are stuck" in report and "rollout.stall_timeout_s" in report
    assert "env step after turn 0" in report and "tool hang (call_0_0) running" in report


class _Flaky(ToolEnv):
    """An env whose own code breaks for one problem (not a tool error: a bug)."""

    async def step(self, assistant):
        if self.problem.id == "p1":
            raise KeyError("env bug")
        return await super().step(assistant)


def test_a_crashed_rollout_is_recorded_and_left_out_of_the_step(smol_format):
    tools = ToolSet([calculator])
    make_env = lambda p: _Flaky(p, "Solve it.", tools)  # noqa: E731
    ctx = _ctx(smol_format, [_call("calculator", '{"expression": "1+1"}'), ANSWER], tools, make_env,
               max_failed_fraction=0.5)
    out = asyncio.run(run_strategy(Flat(), PROBLEMS, ctx))
    assert [g.task_id for g in out.groups] == ["p0"] and len(out.groups[0].trajectories) == 2
    assert out.groups[0].rewards == [1.0, 1.0]
    assert len(out.failed) == 2 and all(t.stop_reason == StopReason.ERROR for t in out.failed)
    assert out.failed[0].meta.error.startswith("KeyError: 'env bug' at test_robustness.py")
    assert out.failed[0].response_ids == ()  # only complete turns are kept
    assert out.metrics["rollout/failed"] == 2 and out.metrics["rollout/failed_rate"] == 0.5
    assert trajectory_metrics(out.trajectories)["reward/mean"] == 1.0


def test_too_many_failed_rollouts_stop_the_run_with_the_errors(smol_format):
    tools = ToolSet([calculator])
    make_env = lambda p: _Flaky(p, "Solve it.", tools)  # noqa: E731
    ctx = _ctx(smol_format, [_call("calculator", '{"expression": "1+1"}'), ANSWER], tools, make_env,
               max_failed_fraction=0.25)
    with pytest.raises(RolloutError, match=r"2 of 4 trajectories failed .*max_failed_fraction=0.25.*\n  2 x KeyError"):
        asyncio.run(run_strategy(Flat(), PROBLEMS, ctx))


@pytest.mark.parametrize("mode", ["head", "tail", "middle"])
def test_an_observation_too_long_for_the_context_is_cut_with_a_marker(smol_format, mode):
    tools = ToolSet([shout])
    backend = ScriptedBackend(smol_format.tokenizer, [_call("shout", '{"n": 4000}'), ANSWER])
    env = ToolEnv(PROBLEMS[0], "Solve it.", tools, ToolLimits(max_output_chars=100_000))
    limits = TurnLimits(max_context=400, observation_truncation=mode, min_generation_room=24)
    traj = asyncio.run(run_trajectory(env, backend, smol_format, backend_sampling(), limits,
                                      TrajectoryMeta("p0", "g"), seed=0))
    check_trajectory(traj, smol_format)
    seen = traj.messages[3].content
    assert "characters cut to fit the context" in seen and traj.turns[0].tool_results[0].content != seen
    assert ("HEAD" in seen) == (mode != "tail") and ("TAIL" in seen) == (mode != "head")
    assert len(traj.prompt_ids) + traj.turns[0].obs_end <= 400 - 24  # room left for the next turn
    assert traj.stop_reason == StopReason.ANSWERED and len(traj.turns) == 2  # no turn was dropped


def test_an_observation_that_cannot_fit_at_all_ends_with_context_overflow(smol_format):
    backend = ScriptedBackend(smol_format.tokenizer, [_call("shout", '{"n": 4000}'), ANSWER])
    env = ToolEnv(PROBLEMS[0], "Solve it.", ToolSet([shout]))
    prompt = len(smol_format.prompt_ids(asyncio.run(env.reset()), env.tool_schemas))
    limits = TurnLimits(max_context=prompt + 40, min_generation_room=16)
    traj = asyncio.run(run_trajectory(env, backend, smol_format, backend_sampling(), limits,
                                      TrajectoryMeta("p0", "g"), seed=0))
    assert traj.stop_reason == StopReason.CONTEXT_OVERFLOW and len(traj.turns) == 1


def test_cut_text_keeps_the_asked_part():
    text = "abcdefghij" * 10
    assert cut_text(text, 200, "middle") == text
    assert cut_text(text, 10, "head").startswith("abcdefghij...[90 characters cut")
    assert cut_text(text, 10, "tail").endswith("cut to fit the context]...abcdefghij")
    mid = cut_text(text, 10, "middle")
    assert mid.startswith("abcde...[90") and mid.endswith("]...fghij")


def test_a_step_deadline_ends_trajectories_between_turns(smol_format):
    ctx = _ctx(smol_format, [_call("calculator", '{"expression": "1+1"}'), ANSWER], ToolSet([calculator]),
               limits=TurnLimits(deadline=time.monotonic() - 1))
    out = asyncio.run(run_strategy(Flat(), PROBLEMS, ctx))
    trajs = out.trajectories
    assert len(trajs) == 4 and all(t.stop_reason == StopReason.TIMEOUT and not t.turns for t in trajs)


def backend_sampling():
    from tirl.backends.base import SamplingParams
    return SamplingParams()
