"""Trajectory builders and stand-in rewards for the reward tests.

A trajectory is built from `Step`s (one per assistant turn: text, calls, how each call ended, tool
outputs, unparsed call attempts, sampled tokens). Token bookkeeping is fake but consistent: each step
samples `tokens` tokens (loss mask 1), then the env inserts one token per tool result (mask 0), so
`Trajectory.num_sampled_tokens` is the sum of the steps' `tokens`. Messages are the user's question, then
per step the assistant message and one tool message per result, as the tool env writes them.
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

FIXED = "tests.rewards.builders:fixed"
FAILING = "tests.rewards.builders:failing"
COUNTING = "tests.rewards.builders:counting"
QUESTION = "What is 6 * 7?"


@dataclass(frozen=True)
class Step:
    """One assistant turn: its text, its calls (name, arguments), how each ended, and its tool outputs."""

    text: str
    calls: Sequence[tuple[str, Mapping[str, Any]]] = ()
    statuses: Sequence[ToolStatus] | None = None
    """One status per call (default: all ok)."""
    outputs: Sequence[str] | None = None
    """One tool output per call (default: "output")."""
    invalid: int = 0
    """Call attempts that could not be parsed (an `invalid_call` result without a `ToolCall`)."""
    tokens: int = 1
    """Sampled tokens of the turn."""


def per_call(values: Sequence[Any] | None, default: Any, n_calls: int, what: str) -> list[Any]:
    """`values` as a list of one entry per call (`default` for each when None)."""
    if values is None:
        return [default] * n_calls
    if len(values) != n_calls:
        raise ValueError(f"Step: {len(values)} {what} for {n_calls} calls; give one per call")
    return list(values)


def build_turn(step: Step, index: int, start: int) -> Turn:
    """The `Turn` of step number `index` whose first sampled token is at `start`.

    Call ids are `call_{index}_{k}` (as the tool env names them), unparsed attempts `bad_{index}_{k}`."""
    statuses = per_call(step.statuses, ToolStatus.OK, len(step.calls), "statuses")
    outputs = per_call(step.outputs, "output", len(step.calls), "outputs")
    calls = tuple(ToolCall(f"call_{index}_{k}", name, dict(args)) for k, (name, args) in enumerate(step.calls))
    results = tuple(ToolResult(c.id, c.name, o, s) for c, o, s in zip(calls, outputs, statuses))
    results += tuple(ToolResult(f"bad_{index}_{k}", "", "could not parse", ToolStatus.INVALID_CALL)
                     for k in range(step.invalid))
    gen_end = start + step.tokens
    return Turn(start, gen_end, gen_end + len(results), step.text, "stop" if results else "eos", calls, results)


def turn_messages(turn: Turn) -> list[Message]:
    """The assistant message of `turn`, then one tool message per result."""
    return [Message("assistant", turn.text, turn.tool_calls),
            *(Message("tool", r.content, tool_call_id=r.call_id, name=r.name) for r in turn.tool_results)]


def trajectory(*steps: Step | str, answered: bool | None = None, task_id: str = "p0", sample_index: int = 0,
               question: str = QUESTION) -> Trajectory:
    """A trajectory of `steps` (a bare string is a step without calls).

    `answered` (default: the last step made no call attempt) sets the stop reason and `final_answer`
    (the last step's text)."""
    turns, messages, pos = [], [Message("user", question)], 0
    for i, s in enumerate(steps):
        turn = build_turn(Step(s) if isinstance(s, str) else s, i, pos)
        turns.append(turn)
        messages += turn_messages(turn)
        pos = turn.obs_end
    if answered is None:
        answered = bool(turns) and not turns[-1].tool_results
    mask = [0] * pos
    for t in turns:
        mask[t.gen_start:t.gen_end] = [1] * (t.gen_end - t.gen_start)
    return Trajectory(prompt_ids=(1,), response_ids=tuple(range(pos)), loss_mask=tuple(mask),
                      logprobs=tuple(-0.1 if m else 0.0 for m in mask), turns=tuple(turns), messages=tuple(messages),
                      stop_reason=StopReason.ANSWERED if answered else StopReason.MAX_TURNS,
                      meta=TrajectoryMeta(task_id=task_id, group_id="g0", sample_index=sample_index),
                      final_answer=turns[-1].text if answered and turns else None)


def long_trajectory(sampled: int) -> Trajectory:
    """One answering turn of `sampled` sampled tokens."""
    return trajectory(Step("<answer>42</answer>", tokens=sampled))


def alone(traj: Trajectory, step: int = 0) -> GroupContext:
    """A group holding only `traj`."""
    return GroupContext(trajectories=(traj,), step=step)


def problem(answer: str = "42", question: str = QUESTION, info: Mapping[str, Any] | None = None,
            pid: str = "p0") -> Problem:
    """A problem (by default the arithmetic one the builders' trajectories answer)."""
    return Problem(id=pid, question=question, answer=answer, info=dict(info or {}))


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
