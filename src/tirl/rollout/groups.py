"""Rollout strategies: how the trajectories of one step are sampled (reference section 4).

A strategy is registered in `STRATEGIES` under its config name (`rollout.strategy`) and built once
per run with its settings (`rollout.<name>.*` as keyword arguments). Calling it with a step's
problems and a `RolloutContext` returns a `StrategyOutput`: the groups to train on, the failed
trajectories (recorded and counted, never trained on), and metrics. A strategy that keeps state
across steps (fission's buffer) saves it in `state_dict()` so a resumed run continues identically.

`flat` is G independent samples per problem. Seeds are derived from (seed, step, group, sample,
turn), so a sample depends only on its own coordinates: a resumed run regenerates exactly what an
uninterrupted run would have.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tirl.backends.base import Generator, SamplingParams, derive_seed
from tirl.chat.format import ChatFormat
from tirl.envs.base import Env
from tirl.errors import RolloutError
from tirl.registry import Registry
from tirl.rewards.base import GroupContext, RewardFn, score
from tirl.rollout.agent import Prefix, TurnLimits, is_failed, run_trajectory
from tirl.rollout.watchdog import Progress, guard
from tirl.tasks.base import Problem
from tirl.types import Trajectory, TrajectoryGroup, TrajectoryMeta, TreeEdge


@dataclass(frozen=True)
class RolloutSpec:
    """How to sample a batch of groups."""

    group_size: int = 8
    """G: samples per problem (for tree strategies: leaves per tree)."""
    sampling: SamplingParams = SamplingParams()
    """Temperature and top-p."""
    limits: TurnLimits = TurnLimits()
    """Turn and token budgets per trajectory."""
    stall_timeout_s: float | None = 600.0
    """Abort (with a report of what is stuck) after this long without progress."""
    check: bool = True
    """Run the token-in/token-out checks on every trajectory."""
    max_failed_fraction: float = 0.1
    """More failed trajectories than this share of a step stops the run (with the errors shown)."""


@dataclass
class RewardState:
    """State a group-aware reward keeps across steps (saved in checkpoints)."""

    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutContext:
    """Everything a strategy needs to sample and score trajectories in one step."""

    make_env: Callable[[Problem], Env]
    backend: Generator
    fmt: ChatFormat
    spec: RolloutSpec
    reward_fn: RewardFn
    step: int = 0
    seed: int = 0
    reward_state: RewardState = field(default_factory=RewardState)
    progress: Progress = field(default_factory=Progress)
    training: bool = True
    """False in evaluation: stateful rewards (OTC's per-question minimum) then leave their state alone."""

    async def sample(self, problem: Problem, group_id: str, sample_index: int, key: tuple,
                     prefix: Prefix | None = None, origin: str | None = None) -> Trajectory:
        """One trajectory of `problem` (from `prefix` when given); seeded by its `key` alone."""
        meta = TrajectoryMeta(task_id=problem.id, group_id=group_id, sample_index=sample_index, step=self.step,
                              origin=origin)
        return await run_trajectory(self.make_env(problem), self.backend, self.fmt, self.spec.sampling,
                                    self.spec.limits, meta, seed=self.seed_for(key), key=key,
                                    check=self.spec.check, progress=self.progress, prefix=prefix)

    def seed_for(self, key: tuple) -> int:
        return derive_seed(self.seed, self.step, *key)

    async def score(self, trajs: Sequence[Trajectory], problem: Problem, group_id: str,
                    edges: tuple[TreeEdge, ...] = ()) -> TrajectoryGroup:
        """Score the trajectories of one group (failed ones must have been taken out)."""
        return await score_group(trajs, problem, self.reward_fn, step=self.step, state=self.reward_state.data,
                                 group_id=group_id, edges=edges, training=self.training)


@dataclass
class StrategyOutput:
    """What one step of a strategy produced."""

    groups: list[TrajectoryGroup]
    """Scored groups to train on (no failed trajectory in them)."""
    failed: list[Trajectory] = field(default_factory=list)
    """Trajectories whose env or backend raised: recorded, counted, excluded from the update."""
    dropped: list[TrajectoryGroup] = field(default_factory=list)
    """Scored groups not trained on (e.g. filtered by dynamic sampling); kept for the logs."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Strategy-specific metrics (`rollout/*`)."""

    @property
    def trajectories(self) -> list[Trajectory]:
        return [t for g in self.groups for t in g.trajectories]


class Strategy(Protocol):
    """A rollout strategy, built once per run: `STRATEGIES.get(name)(**settings)`."""

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


STRATEGIES: Registry[Callable[..., Strategy]] = Registry("rollout strategy")
"""Rollout strategies by name (`rollout.strategy`)."""


class Stateless:
    """Base for strategies that keep nothing across steps."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@STRATEGIES.register("flat")
class Flat(Stateless):
    """G independent samples per problem (the default)."""

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        G = ctx.spec.group_size
        coros = [ctx.sample(p, f"{ctx.step}-{gi}", si, key=(gi, si))
                 for gi, p in enumerate(problems) for si in range(G)]
        flat = await asyncio.gather(*coros)
        out = StrategyOutput(groups=[])
        for gi, p in enumerate(problems):
            trajs = flat[gi * G:(gi + 1) * G]
            out.failed += [t for t in trajs if is_failed(t)]
            ok = [t for t in trajs if not is_failed(t)]
            if ok:
                out.groups.append(await ctx.score(ok, p, f"{ctx.step}-{gi}"))
        return out


async def run_strategy(strategy: Strategy, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
    """One step of `strategy` under the stall watchdog, then the failure check."""
    out = await guard(strategy(problems, ctx), ctx.progress, ctx.spec.stall_timeout_s)
    check_failures(out, ctx.spec.max_failed_fraction)
    return out


def check_failures(out: StrategyOutput, max_fraction: float) -> None:
    """Count failed trajectories into `out.metrics`; raise `RolloutError` past `max_fraction`."""
    total = len(out.failed) + sum(len(g.trajectories) for g in out.groups + out.dropped)
    out.metrics["rollout/failed"] = float(len(out.failed))
    out.metrics["rollout/failed_rate"] = len(out.failed) / total if total else 0.0
    if total and len(out.failed) / total > max_fraction:
        errors: dict[str, int] = {}
        for t in out.failed:
            errors[t.meta.error or "unknown"] = errors.get(t.meta.error or "unknown", 0) + 1
        shown = "\n".join(f"  {n} x {e}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])[:10])
        raise RolloutError(f"{len(out.failed)} of {total} trajectories failed (more than "
                           f"rollout.max_failed_fraction={max_fraction}):\n{shown}")


async def rollout_groups(problems: Sequence[Problem], make_env: Callable[[Problem], Env], backend: Generator,
                         fmt: ChatFormat, spec: RolloutSpec, reward_fn: RewardFn, *, step: int, seed: int,
                         reward_state: RewardState | None = None) -> list[TrajectoryGroup]:
    """`flat` sampling of `spec.group_size` trajectories per problem, scored; failures beyond the
    allowed share raise, the others are left out of the groups."""
    ctx = RolloutContext(make_env, backend, fmt, spec, reward_fn, step, seed, reward_state or RewardState())
    return (await run_strategy(Flat(), problems, ctx)).groups


async def score_group(trajs: Sequence[Trajectory], problem: Problem, reward_fn: RewardFn, *, step: int,
                      state: dict[str, Any], group_id: str, edges: tuple[TreeEdge, ...] = (),
                      training: bool = True) -> TrajectoryGroup:
    """Attach rewards to the trajectories of one group (in order: a stateful reward sees them in turn)."""
    ctx = GroupContext(trajectories=tuple(trajs), step=step, state=state,
                       task_reward=getattr(reward_fn, "task_reward", ""), training=training)
    scored = []
    for t in trajs:
        r = await score(reward_fn, t, problem, ctx)
        scored.append(t.with_reward(r.total, r.components, r.correct, r.turn_rewards or ()))
    return TrajectoryGroup(group_id=group_id, task_id=problem.id, trajectories=tuple(scored), edges=edges)
