"""Small builders of trajectories for reward tests: turns from text, calls and statuses.

Token bookkeeping is fake but consistent (each turn samples `tokens` tokens, then the env inserts one
observation token per tool result), so `Trajectory.num_sampled_tokens` is the sum of the turns' `tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tirl.rewards.base import GroupContext
from tirl.types import StopReason, ToolCall, ToolResult, ToolStatus, Trajectory, TrajectoryMeta, Turn


@dataclass(frozen=True)
class T:
    """One assistant turn: its text, the calls it made (name, arguments) and how each call ended."""

    text: str
    calls: Sequence[tuple[str, Mapping[str, Any]]] = ()
    statuses: Sequence[ToolStatus] | None = None
    """One status per call (default: all ok)."""
    invalid: int = 0
    """Call attempts that could not be parsed (an `invalid_call` result without a `ToolCall`)."""
    tokens: int = 1
    """Sampled tokens of the turn."""


def build_turn(spec: T, index: int, start: int) -> tuple[Turn, int]:
    """The `Turn` of a spec whose first sampled token is at `start`; returns it and its `obs_end`."""
    statuses = list(spec.statuses) if spec.statuses is not None else [ToolStatus.OK] * len(spec.calls)
    assert len(statuses) == len(spec.calls), "one status per call"
    calls = tuple(ToolCall(f"call_{index}_{k}", name, dict(args)) for k, (name, args) in enumerate(spec.calls))
    results = tuple(ToolResult(c.id, c.name, "output", s) for c, s in zip(calls, statuses))
    results += tuple(ToolResult(f"bad_{index}_{k}", "", "could not parse", ToolStatus.INVALID_CALL)
                     for k in range(spec.invalid))
    gen_end = start + spec.tokens
    obs_end = gen_end + len(results)
    finish = "stop" if results else "eos"
    return Turn(start, gen_end, obs_end, spec.text, finish, calls, results), obs_end


def trajectory(*specs: T | str, answered: bool | None = None, task_id: str = "p") -> Trajectory:
    """A trajectory of the given turns (a bare string is a turn without calls).

    `answered` (default: the last turn made no call attempt) sets the stop reason and `final_answer`
    (the last turn's text)."""
    specs = tuple(T(s) if isinstance(s, str) else s for s in specs)
    turns, pos = [], 0
    for i, spec in enumerate(specs):
        turn, pos = build_turn(spec, i, pos)
        turns.append(turn)
    if answered is None:
        answered = bool(turns) and not turns[-1].tool_results
    mask = [0] * pos
    for t in turns:
        mask[t.gen_start:t.gen_end] = [1] * (t.gen_end - t.gen_start)
    return Trajectory(prompt_ids=(1,), response_ids=tuple(range(pos)), loss_mask=tuple(mask),
                      logprobs=tuple(-0.1 if m else 0.0 for m in mask), turns=tuple(turns), messages=(),
                      stop_reason=StopReason.ANSWERED if answered else StopReason.MAX_TURNS,
                      meta=TrajectoryMeta(task_id=task_id, group_id="g0"),
                      final_answer=turns[-1].text if answered and turns else None)


def alone(traj: Trajectory, step: int = 0) -> GroupContext:
    """A group holding only `traj`."""
    return GroupContext(trajectories=(traj,), step=step)
