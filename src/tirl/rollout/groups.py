"""Flat group rollouts: G independent samples per problem, run concurrently, then scored.

Seeds are derived from (seed, step, group index, sample index, turn), so a sample depends only on
its own coordinates: a resumed run regenerates exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tirl.backends.base import Generator, SamplingParams, derive_seed
from tirl.chat.format import ChatFormat
from tirl.envs.base import Env
from tirl.rewards.base import GroupContext, RewardFn, score
from tirl.rollout.agent import TurnLimits, run_trajectory
from tirl.rollout.watchdog import Progress, guard
from tirl.tasks.base import Problem
from tirl.types import Trajectory, TrajectoryGroup, TrajectoryMeta


@dataclass(frozen=True)
class RolloutSpec:
    """How to sample a batch of groups."""

    group_size: int = 8
    """G: samples per problem."""
    sampling: SamplingParams = SamplingParams()
    """Temperature and top-p."""
    limits: TurnLimits = TurnLimits()
    """Turn and token budgets per trajectory."""
    stall_timeout_s: float | None = 600.0
    """Abort (with a report of what is stuck) after this long without progress."""
    check: bool = True
    """Run the token-in/token-out checks on every trajectory."""


@dataclass
class RewardState:
    """State a group-aware reward keeps across steps (saved in checkpoints)."""

    data: dict[str, Any] = field(default_factory=dict)


async def rollout_groups(problems: Sequence[Problem], make_env: Callable[[Problem], Env], backend: Generator,
                         fmt: ChatFormat, spec: RolloutSpec, reward_fn: RewardFn, *, step: int, seed: int,
                         reward_state: RewardState | None = None) -> list[TrajectoryGroup]:
    """Sample `spec.group_size` trajectories for each problem and score them with `reward_fn`."""
    progress = Progress()

    async def one(gi: int, si: int) -> Trajectory:
        p = problems[gi]
        meta = TrajectoryMeta(task_id=p.id, group_id=f"{step}-{gi}", sample_index=si, step=step)
        return await run_trajectory(make_env(p), backend, fmt, spec.sampling, spec.limits, meta,
                                    seed=derive_seed(seed, step, gi, si), key=(gi, si), check=spec.check,
                                    progress=progress)

    coros = [one(gi, si) for gi in range(len(problems)) for si in range(spec.group_size)]
    flat = await guard(asyncio.gather(*coros), progress, spec.stall_timeout_s)
    state = reward_state or RewardState()
    groups = []
    for gi, p in enumerate(problems):
        trajs = flat[gi * spec.group_size:(gi + 1) * spec.group_size]
        groups.append(score_group(trajs, p, reward_fn, step=step, state=state.data, group_id=f"{step}-{gi}"))
    return groups


def score_group(trajs: Sequence[Trajectory], problem: Problem, reward_fn: RewardFn, *, step: int,
                state: dict[str, Any], group_id: str) -> TrajectoryGroup:
    """Attach rewards to the trajectories of one group."""
    ctx = GroupContext(trajectories=tuple(trajs), step=step, state=state)
    scored = []
    for t in trajs:
        r = score(reward_fn, t, problem, ctx)
        scored.append(t.with_reward(r.total, r.components, r.correct))
    return TrajectoryGroup(group_id=group_id, task_id=problem.id, trajectories=tuple(scored))
