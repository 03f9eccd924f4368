"""DAPO dynamic sampling (reference 2.5): train only on groups whose outcome varies.

A group in which every sample got the same reward (or, with `metric="correct"`, the same
correctness) has zero GRPO advantage everywhere and teaches nothing. `dynamic_sample` runs the
strategy on batches of `prompts` new problems until at least `prompts` groups vary, then trains on
the first `prompts` of them (in sampling order); constant groups and the surplus of varying ones go
to `StrategyOutput.dropped` (saved with the step's trajectories, never trained on). After
`max_batches` batches without enough it raises a `RolloutError` that says how many qualified.

Every group the strategy returns counts, extra groups included (fission's recovery groups compete
for the same `prompts` places), so a step always trains on exactly `prompts` groups.

Reproducibility: batch 0 samples exactly what the step would sample without dynamic sampling; batch
b > 0 runs with its own seed (derived from the run seed and b) and group ids suffixed `.b<b>`, so no
batch resamples another's trajectories, and the same (seed, step, data cursor) gives the same step.
Every batch advances the data cursor by `prompts`. Failed trajectories are accumulated over the
batches and the failure cap applies to the step's total. A strategy's own metrics are averaged over
the step's batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from tirl.backends.base import derive_seed
from tirl.errors import ConfigError, RolloutError
from tirl.rollout.agent import Prefix
from tirl.rollout.groups import RolloutContext, Strategy, StrategyOutput, check_failures
from tirl.rollout.watchdog import guard
from tirl.tasks.base import Problem
from tirl.types import Trajectory, TrajectoryGroup, TreeEdge

Metric = Literal["reward", "correct"]


async def dynamic_sample(strategy: Strategy, take: Callable[[int], list[Problem]], prompts: int,
                         ctx: RolloutContext, *, metric: Metric, max_batches: int) -> StrategyOutput:
    """Batches of `prompts` problems from `take` until `prompts` groups vary in `metric`; see the module
    docstring. Raises `RolloutError` after `max_batches` batches without enough."""
    if metric not in ("reward", "correct"):
        raise ConfigError(f"rollout.dynamic_sampling.metric: {metric!r} is not one of reward, correct")
    total = StrategyOutput(groups=[])
    kept: list[TrajectoryGroup] = []
    filtered = 0
    batch_metrics: list[dict[str, float]] = []
    batches = 0
    while len(kept) < prompts and batches < max_batches:
        out = await guard(strategy(take(prompts), batch_context(ctx, batches)), ctx.progress,
                          ctx.spec.stall_timeout_s)
        batches += 1
        total.failed += out.failed
        total.dropped += out.dropped
        batch_metrics.append(out.metrics)
        for g in out.groups:
            if varies(g, metric):
                kept.append(g)
            else:
                filtered += 1
                total.dropped.append(g)
    total.groups, surplus = kept[:prompts], kept[prompts:]
    total.dropped += surplus
    total.metrics.update(_mean(batch_metrics))
    total.metrics.update({"dynamic/batches": float(batches), "dynamic/kept": float(len(total.groups)),
                          "dynamic/filtered": float(filtered), "dynamic/surplus": float(len(surplus))})
    check_failures(total, ctx.spec.max_failed_fraction)
    if len(kept) < prompts:
        sampled = len(kept) + filtered
        raise RolloutError(
            f"dynamic sampling: only {len(kept)} of the {prompts} groups needed have a {metric} that varies "
            f"within the group after rollout.dynamic_sampling.max_batches={max_batches} batches ({sampled} groups "
            f"sampled, {filtered} with the same {metric} for every sample). Raise max_batches or "
            f"rollout.group_size, use a reward with more levels than right/wrong, start from a model that "
            f"solves some but not all problems, or set rollout.dynamic_sampling.enabled=false")
    return total


def varies(group: TrajectoryGroup, metric: Metric) -> bool:
    """True when `metric` is not the same for every trajectory of `group`."""
    if metric == "reward":
        values = [t.reward for t in group.trajectories]
    else:
        values = [t.correct for t in group.trajectories]
        if any(v is None for v in values):
            raise ConfigError(f"rollout.dynamic_sampling.metric=correct, but the reward of task "
                              f"{group.task_id!r} does not say whether an answer is correct; use metric=reward")
    return len(set(values)) > 1


def batch_context(ctx: RolloutContext, batch: int) -> RolloutContext:
    """The context of batch `batch` of a step: `ctx` itself for batch 0, else one with its own seed and
    group ids (progress and reward state stay shared)."""
    if batch == 0:
        return ctx
    fields = {f.name: getattr(ctx, f.name) for f in dataclasses.fields(ctx)}
    fields["seed"] = derive_seed(ctx.seed, "dynamic-sampling batch", batch)
    return _BatchContext(**fields, batch=batch)


@dataclass
class _BatchContext(RolloutContext):
    """A `RolloutContext` whose group ids carry the batch number (`3-0` -> `3-0.b1`)."""

    batch: int = 0

    def _gid(self, group_id: str) -> str:
        return f"{group_id}.b{self.batch}"

    async def sample(self, problem: Problem, group_id: str, sample_index: int, key: tuple,
                     prefix: Prefix | None = None, origin: str | None = None) -> Trajectory:
        return await super().sample(problem, self._gid(group_id), sample_index, key, prefix, origin)

    async def score(self, trajs: Sequence[Trajectory], problem: Problem, group_id: str,
                    edges: tuple[TreeEdge, ...] = ()) -> TrajectoryGroup:
        return await super().score(trajs, problem, self._gid(group_id), edges)


def _mean(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = {k for m in metrics for k in m}
    return {k: sum(m[k] for m in metrics if k in m) / sum(1 for m in metrics if k in m) for k in sorted(keys)}
