"""The trainer's side of the Ray rollout: a pool of rollout workers that samples a step's problem groups.

`RolloutPool` stands where the local backend stands in the RL loop: `update_weights` puts the new
state dict in Ray's object store under the next version number (each worker loads it before its next
group), `metrics_snapshot`/`metrics_since` count what the workers generated, `close` stops them. The
rollout itself goes through `RayFlat`, a strategy that sends each problem's group to a worker and scores
the returned trajectories here, in problem order, exactly as the local `flat` strategy does.

Fault tolerance: a group whose worker dies (its process killed, the node lost) is re-issued to the
next worker (Ray restarts the dead one, up to `cluster.max_restarts`), at most `cluster.max_reissues`
times. Results are kept by problem index and the first result of an index wins; a later one is dropped
and counted (`cluster/duplicates`). A result generated with other weights than the current version is
re-issued too. Seeds depend only on (seed, step, problem index, sample), so a re-issued group is
exactly the group the dead worker would have returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tirl.cluster import connect, require_ray
from tirl.cluster.workers import FromConfig, GroupJob, GroupResult, RolloutWorker, WorkerBuild, Weights, tool_build
from tirl.config import Config
from tirl.errors import ConfigError, RolloutError
from tirl.rollout.agent import is_failed
from tirl.rollout.groups import RolloutContext, Stateless, StrategyOutput
from tirl.rollout.watchdog import Progress
from tirl.tasks.base import Problem

HEARTBEAT_S = 2.0
"""How often the trainer asks the busy workers whether their trajectories progress (stall watchdog)."""
START_TIMEOUT_S = 300.0
"""Longest wait for the workers to be scheduled and built."""


class RolloutPool:
    """Rollout worker actors, the current weights version, and counters (see the module docstring)."""

    def __init__(self, actors: Sequence[Any], *, max_reissues: int = 3, tool_actors: Sequence[Any] = (),
                 owns_ray: bool = False, keep: Sequence[Any] = (), weight_dtypes: dict[str, Any] | None = None):
        """`keep`: objects the workers were built from (held so that Ray can restart them); `weight_dtypes`:
        the dtype of each weight in the workers' generation models: floating-point weights are cast to it
        before they are published (fewer bytes; the same values the workers' backends would cast them to)."""
        self.actors = list(actors)
        self.weight_dtypes = dict(weight_dtypes or {})
        self.keep = list(keep)
        self.tool_actors = list(tool_actors)
        self.max_reissues = max_reissues
        self.owns_ray = owns_ray
        self.weights: Weights | None = None
        self.counts = {"gen/tokens": 0.0, "cluster/groups": 0.0, "cluster/reissued": 0.0, "cluster/duplicates": 0.0,
                       "cluster/stale": 0.0}

    # --- the Generator methods the RL loop uses ---------------------------------------------------

    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Publish `state_dict` as the next weights version (the workers load it before their next group)."""
        import ray

        state = {k: v.detach().to("cpu", dtype=self.weight_dtypes.get(k, v.dtype) if v.is_floating_point() else v.dtype)
                 for k, v in state_dict.items()}
        version = 0 if self.weights is None else self.weights.version + 1
        self.weights = Weights(version, ray.put(state))

    async def generate(self, request):
        raise RuntimeError("the Ray rollout pool samples whole groups (RolloutPool.strategy), not single requests")

    def metrics_snapshot(self) -> dict[str, float]:
        return dict(self.counts)

    def metrics_since(self, snapshot: dict[str, float]) -> dict[str, float]:
        return {k: v - snapshot.get(k, 0.0) for k, v in self.counts.items()}

    def close(self) -> None:
        import ray

        for actor in self.tool_actors:
            try:
                ray.get(actor.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead tool worker has nothing left to release
                pass
        for actor in self.actors + self.tool_actors:
            ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()

    # --- sampling -------------------------------------------------------------------------------

    def strategy(self, cfg: Config) -> RayFlat:
        """The strategy that samples on this pool (only `flat` runs on the cluster)."""
        if cfg.rollout.strategy != "flat":
            raise ConfigError(f"cluster.enabled=true samples with rollout.strategy=flat only, not "
                              f"{cfg.rollout.strategy!r}")
        return RayFlat(self)

    def pids(self) -> list[int]:
        import ray

        return ray.get([a.pid.remote() for a in self.actors])

    async def run_groups(self, jobs: Sequence[GroupJob], deadline: float | None,
                         progress: Progress) -> list[GroupResult]:
        """Every job's result, in job order: each job on worker `index % workers` first, re-issued on a
        worker's death; exactly one result per job."""
        if self.weights is None:
            raise RuntimeError("RolloutPool.update_weights was never called: no weights to generate with")
        results: dict[int, GroupResult] = {}
        tasks = [asyncio.ensure_future(self._run_job(job, k % len(self.actors), deadline, results, progress))
                 for k, job in enumerate(jobs)]
        heartbeat = asyncio.ensure_future(self._heartbeat(progress))
        try:
            await asyncio.gather(*tasks)
        finally:
            heartbeat.cancel()
            for t in tasks:
                t.cancel()
            for k in range(len(self.actors)):
                progress.states.pop(("worker", k), None)
        return [results[job.index] for job in jobs]

    async def _run_job(self, job: GroupJob, worker: int, deadline: float | None, results: dict[int, GroupResult],
                       progress: Progress) -> None:
        from ray.exceptions import RayActorError

        key = ("group", job.group_id)
        errors: list[str] = []
        for attempt in range(self.max_reissues + 1):
            if attempt:
                self.counts["cluster/reissued"] += 1
            progress.mark(key, f"on rollout worker {worker} (attempt {attempt + 1})")
            left = None if deadline is None else deadline - time.monotonic()
            try:
                result = await self.actors[worker].rollout_group.remote(
                    replace(job, deadline_in_s=left), self.weights)
            except RayActorError as e:
                errors.append(f"worker {worker}: {type(e).__name__}")
                worker = (worker + 1) % len(self.actors)
                continue
            if result.version != self.weights.version:
                self.counts["cluster/stale"] += 1
                errors.append(f"worker {worker}: weights version {result.version}, not {self.weights.version}")
                continue
            self._accept(job, result, results)
            progress.done(key)
            return
        raise RolloutError(f"group {job.group_id} (problem {job.problem.id!r}) failed on every try "
                           f"(cluster.max_reissues={self.max_reissues}): {'; '.join(errors)}")

    def _accept(self, job: GroupJob, result: GroupResult, results: dict[int, GroupResult]) -> None:
        """Keep the first result of each problem index; drop (and count) a later duplicate."""
        got = {t.meta.group_id for t in result.trajectories}
        if result.index != job.index or got - {job.group_id}:
            raise RolloutError(f"worker answered job {job.group_id} with group(s) {sorted(got)} of index "
                               f"{result.index}")
        if job.index in results:
            self.counts["cluster/duplicates"] += 1
            return
        results[job.index] = result
        self.counts["cluster/groups"] += 1
        self.counts["gen/tokens"] += sum(t.num_sampled_tokens for t in result.trajectories)

    async def _heartbeat(self, progress: Progress) -> None:
        """Mark progress while a worker's trajectories advance, so the stall watchdog sees remote work."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            for k, actor in enumerate(self.actors):
                try:
                    active, idle_s = await asyncio.wait_for(_awaitable(actor.status.remote()), HEARTBEAT_S)
                except Exception:  # noqa: BLE001 - a dead or restarting worker: its groups report themselves
                    continue
                if active and idle_s < 2 * HEARTBEAT_S:
                    progress.mark(("worker", k), f"{active} groups generating on rollout worker {k}")


class RayFlat(Stateless):
    """`flat` sampling on a `RolloutPool`: the same groups, seeds, ids and scoring as the local strategy."""

    def __init__(self, pool: RolloutPool):
        self.pool = pool

    async def __call__(self, problems: Sequence[Problem], ctx: RolloutContext) -> StrategyOutput:
        jobs = [GroupJob(gi, p, _group_id(ctx, f"{ctx.step}-{gi}"), ctx.step, ctx.seed, ctx.spec)
                for gi, p in enumerate(problems)]
        results = await self.pool.run_groups(jobs, ctx.spec.limits.deadline, ctx.progress)
        out = StrategyOutput(groups=[])
        for gi, (p, result) in enumerate(zip(problems, results)):
            out.failed += [t for t in result.trajectories if is_failed(t)]
            ok = [t for t in result.trajectories if not is_failed(t)]
            if ok:
                out.groups.append(await ctx.score(ok, p, f"{ctx.step}-{gi}"))
        return out


def start_rollout_workers(build: WorkerBuild, count: int, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                          resources: dict[str, float] | None = None, max_restarts: int = 3) -> list[Any]:
    """`count` rollout worker actors running `build()` (or the build an object ref holds), restarted by Ray
    up to `max_restarts` times (Ray must be initialised; keep a `build` ref alive while they run). Calls lost
    with a dead worker are not retried by Ray: the pool re-issues them."""
    import ray

    cls = ray.remote(RolloutWorker)
    return [cls.options(num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}),
                        max_restarts=max_restarts, max_task_retries=0, max_concurrency=1000).remote(build)
            for _ in range(count)]


def wait_ready(actors: Sequence[Any], what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Block until every actor is built; `RolloutError` (with the cluster's resources) if some cannot be
    scheduled in `timeout_s`, or the actor's own error if building failed."""
    import ray

    refs = [a.pid.remote() for a in actors]
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise RolloutError(f"{len(pending)} of {len(refs)} {what} were not running after {timeout_s:.0f}s: the "
                           f"cluster has {ray.cluster_resources()} (see cluster.*num_cpus, *num_gpus, *resources)")
    try:
        ray.get(ready)
    except Exception as e:  # noqa: BLE001 - the actor's constructor failed: say so with its error
        raise RolloutError(f"{what} failed to start: {e}") from None


def pool_from_config(cfg: Config, policy, task=None) -> RolloutPool:
    """Connect to Ray, start the tool and rollout workers of `cfg.cluster`, and publish the policy's
    weights as version 0."""
    from tirl.models import loading

    c = cfg.cluster
    if cfg.rollout.strategy != "flat":
        raise ConfigError(f"cluster.enabled=true samples with rollout.strategy=flat only, not {cfg.rollout.strategy!r}")
    owns_ray = not require_ray().is_initialized()
    connect(c)
    _check_resources(c)
    ray = require_ray()
    tool_actors, keep = [], []
    if c.tool_workers:
        from tirl.cluster.tools import start_tool_workers
        keep.append(ray.put(tool_build(cfg)))
        tool_actors = start_tool_workers(keep[-1], c.tool_workers, num_cpus=c.tool_num_cpus,
                                         resources=c.tool_resources, max_restarts=c.max_restarts)
        wait_ready(tool_actors, "tool workers")
    keep.append(ray.put(FromConfig(cfg, policy.path, tuple(tool_actors), threads=max(1, int(c.rollout_num_cpus)))))
    actors = start_rollout_workers(keep[-1], c.rollout_workers, num_cpus=c.rollout_num_cpus,
                                   num_gpus=c.rollout_num_gpus, resources=c.rollout_resources,
                                   max_restarts=c.max_restarts)
    wait_ready(actors, "rollout workers")
    pool = RolloutPool(actors, max_reissues=c.max_reissues, tool_actors=tool_actors, owns_ray=owns_ray, keep=keep,
                       weight_dtypes=ray.get(actors[0].weight_dtypes.remote()))
    pool.update_weights(loading.merged_state_dict(policy.model))
    return pool


def _check_resources(c) -> None:
    """A worker asking for more of a resource than the whole cluster has can never run: say which key."""
    import ray

    total = ray.cluster_resources()
    asks = [("rollout_num_gpus", "GPU", c.rollout_num_gpus), ("rollout_num_cpus", "CPU", c.rollout_num_cpus),
            ("tool_num_cpus", "CPU", c.tool_num_cpus if c.tool_workers else 0.0)]
    for key, resource, amount in asks:
        if amount > total.get(resource, 0.0):
            raise ConfigError(f"cluster.{key}={amount:g} but the Ray cluster has {total.get(resource, 0.0):g} "
                              f"{resource} in all")


def _group_id(ctx: RolloutContext, base: str) -> str:
    """The group id `ctx.sample` would give (dynamic sampling's batch contexts suffix it)."""
    gid = getattr(ctx, "_gid", None)
    return gid(base) if callable(gid) else base


async def _awaitable(ref):
    return await ref
