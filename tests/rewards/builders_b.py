"""Trajectory builders and stand-in rewards for the composition, calibration, shaping and judge tests.

Token bookkeeping is fake but consistent: each step samples `tokens` tokens (loss mask 1), then the env
inserts one token per tool result (mask 0), so `num_sampled_tokens` is the sum of the steps' `tokens`.
Stand-in rewards are used through `module:attr` specs, e.g. `{"name": FIXED, "kwargs": {"total": 2.0}}`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tirl.rewards.base import GroupContext, RewardResult, RewardSpec, bind, score
from tirl.tasks.base import Problem
from tirl.types import Message, StopReason, ToolCall, ToolResult, ToolStatus, Trajectory, TrajectoryMeta, Turn

FIXED = "tests.rewards.builders_b:fixed"
FAILING = "tests.rewards.builders_b:failing"
COUNTING = "tests.rewards.builders_b:counting"


@dataclass(frozen=True)
class Step:
    """One assistant turn: its text, its calls (name, arguments), how each ended, and its tool outputs."""

    text: str
    calls: Sequence[tuple[str, Mapping[str, Any]]] = ()
    statuses: Sequence[ToolStatus] | None = None
    outputs: Sequence[str] | None = None
    tokens: int = 2


def problem(answer: str = "42", question: str = "What is 6 * 7?", info: Mapping[str, Any] | None = None,
            pid: str = "p0") -> Problem:
    return Problem(id=pid, question=question, answer=answer, info=dict(info or {}))


def trajectory(*steps: Step | str, answered: bool | None = None, sample_index: int = 0) -> Trajectory:
    """A trajectory of `steps` (a bare string is a step without calls); answered (default: the last step
    made no call) sets the stop reason and `final_answer` (the last step's text)."""
    specs = [Step(s) if isinstance(s, str) else s for s in steps]
    turns, messages, pos = [], [Message("user", "What is 6 * 7?")], 0
    for i, s in enumerate(specs):
        statuses = list(s.statuses) if s.statuses is not None else [ToolStatus.OK] * len(s.calls)
        outputs = list(s.outputs) if s.outputs is not None else ["output"] * len(s.calls)
        calls = tuple(ToolCall(f"c{i}_{k}", n, dict(a)) for k, (n, a) in enumerate(s.calls))
        results = tuple(ToolResult(c.id, c.name, o, st) for c, o, st in zip(calls, outputs, statuses, strict=True))
        gen_end = pos + s.tokens
        turns.append(Turn(pos, gen_end, gen_end + len(results), s.text, "stop" if results else "eos", calls, results))
        messages.append(Message("assistant", s.text, calls))
        messages += [Message("tool", r.content, tool_call_id=r.call_id, name=r.name) for r in results]
        pos = gen_end + len(results)
    if answered is None:
        answered = bool(turns) and not turns[-1].tool_results
    mask = [0] * pos
    for t in turns:
        mask[t.gen_start:t.gen_end] = [1] * (t.gen_end - t.gen_start)
    return Trajectory(prompt_ids=(1,), response_ids=tuple(range(pos)), loss_mask=tuple(mask),
                      logprobs=tuple(-0.1 if m else 0.0 for m in mask), turns=tuple(turns), messages=tuple(messages),
                      stop_reason=StopReason.ANSWERED if answered else StopReason.MAX_TURNS,
                      meta=TrajectoryMeta(task_id="p0", group_id="g0", sample_index=sample_index),
                      final_answer=turns[-1].text if answered and turns else None)


def long_trajectory(sampled: int) -> Trajectory:
    """One answering turn of `sampled` sampled tokens."""
    return trajectory(Step("<answer>42</answer>", tokens=sampled))


def run(spec: RewardSpec, traj: Trajectory, prob: Problem | None = None, step: int = 0,
        task_reward: str = "arithmetic", state: dict | None = None) -> RewardResult:
    """Score `traj` with `spec` as the rollout does (bound, awaited, checked)."""
    group = GroupContext(trajectories=(traj,), step=step, state=state if state is not None else {},
                         task_reward=task_reward, training=True)
    return asyncio.run(score(bind(spec, task_reward), traj, prob or problem(), group))


def fixed(trajectory: Trajectory, problem: Problem, group: GroupContext, *, total: float = 1.0,
          correct: bool | None = None, components: Mapping[str, float] | None = None,
          turn_rewards: Sequence[float] | None = None) -> RewardResult:
    """Whatever it is told to return."""
    return RewardResult(total, dict(components or {}), correct,
                        tuple(turn_rewards) if turn_rewards is not None else None)


def failing(trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """Always raises (a reward bug)."""
    raise RuntimeError("reward bug in failing")


def counting(trajectory: Trajectory, problem: Problem, group: GroupContext, *, total: float = 1.0) -> float:
    """Returns `total` and counts its calls in `group.state["calls"]`."""
    group.state["calls"] = group.state.get("calls", 0) + 1
    return total


@dataclass
class ScriptedJudge:
    """A judge that answers from a list (in order) and records what it was asked."""

    answers: list[str]
    asked: list[tuple[tuple[Message, ...], tuple[str, ...]]] = field(default_factory=list)

    async def ask(self, messages: Sequence[Message], key: tuple[str, ...] = ()) -> str:
        self.asked.append((tuple(messages), tuple(key)))
        if not self.answers:
            raise AssertionError("the scripted judge was asked more often than scripted")
        return self.answers.pop(0)
