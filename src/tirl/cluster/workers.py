"""Rollout workers: Ray actors that own a generation backend and sample whole problem groups.

A `RolloutWorker` is built from a `WorkerBuild` (a picklable callable run in the actor's process:
`FromConfig` builds the backend, task, tools and envs from the run's config). Each call samples one
problem's group with the same seeds and group ids as the local `flat` strategy, under the weights
version the trainer names: a worker whose weights are older loads that version first (it is never
generating with stale weights unknowingly), and reports the version it used. Scoring happens in the
trainer. A restarted worker (Ray re-runs `__init__`) starts with no weights version and loads the named
one on its first call.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from tirl.backends.base import Generator
from tirl.chat.format import ChatFormat
from tirl.config import Config
from tirl.envs.base import Env
from tirl.rollout.groups import RolloutContext, RolloutSpec
from tirl.rollout.watchdog import Progress
from tirl.tasks.base import Problem
from tirl.types import Trajectory


@dataclass
class WorkerParts:
    """What a rollout worker samples with."""

    make_env: Callable[[Problem], Env]
    backend: Generator
    fmt: ChatFormat


WorkerBuild = Callable[[], WorkerParts]
"""Run once in each worker process (again after a restart)."""


@dataclass(frozen=True)
class Weights:
    """A weights version as the workers get it: the number and the object holding the state dict.

    Passed inside this wrapper so Ray does not fetch the tensors for calls that already have them."""

    version: int
    ref: Any


@dataclass(frozen=True)
class GroupJob:
    """One problem's group to sample."""

    index: int
    """The problem's position in the step (the `gi` of its seeds and group id)."""
    problem: Problem
    group_id: str
    step: int
    seed: int
    spec: RolloutSpec
    """Sampling settings; `spec.limits.deadline` is replaced by `deadline_in_s` (clocks differ by machine)."""
    deadline_in_s: float | None = None
    """Seconds left until the step's deadline when the job was issued (None: no deadline)."""


@dataclass(frozen=True)
class GroupResult:
    """The G trajectories of one job, in sample order, and where they were made."""

    index: int
    trajectories: tuple[Trajectory, ...]
    version: int
    """The weights version they were generated with."""
    pid: int


class RolloutWorker:
    """Actor body (see the module docstring); async, so the groups it holds run concurrently and the
    backend batches their requests."""

    def __init__(self, build: WorkerBuild):
        self.parts = build()
        self.version = -1
        self.progress = Progress()
        self.active = 0
        self._loading = asyncio.Lock()

    def pid(self) -> int:
        return os.getpid()

    def weight_dtypes(self) -> dict[str, Any]:
        """{weight name: dtype} of the backend's generation model (empty for a backend without one)."""
        model = getattr(self.parts.backend, "model", None)
        if model is None or not hasattr(model, "state_dict"):
            return {}
        return {k: v.dtype for k, v in model.state_dict().items()}

    def status(self) -> tuple[int, float]:
        """(groups in flight, seconds since a trajectory here last made progress)."""
        return self.active, time.monotonic() - self.progress.last

    async def rollout_group(self, job: GroupJob, weights: Weights) -> GroupResult:
        """Sample `job` under `weights` (loaded first if this worker has another version). A result whose
        weights changed while it was generating reports version -1 (the trainer then re-issues it)."""
        self.active += 1
        try:
            await self._load(weights)
            ctx = RolloutContext(self.parts.make_env, self.parts.backend, self.parts.fmt, _local_spec(job),
                                 reward_fn=None, step=job.step, seed=job.seed, progress=self.progress)
            G = job.spec.group_size
            trajs = await asyncio.gather(*(ctx.sample(job.problem, job.group_id, si, key=(job.index, si))
                                           for si in range(G)))
            version = weights.version if self.version == weights.version else -1
            return GroupResult(job.index, tuple(trajs), version, os.getpid())
        finally:
            self.active -= 1

    async def _load(self, weights: Weights) -> None:
        async with self._loading:
            if self.version == weights.version:
                return
            state = await weights.ref
            self.parts.backend.update_weights(state)
            self.version = weights.version

    def close(self) -> None:
        self.parts.backend.close()


def _local_spec(job: GroupJob) -> RolloutSpec:
    deadline = None if job.deadline_in_s is None else time.monotonic() + job.deadline_in_s
    return replace(job.spec, limits=replace(job.spec.limits, deadline=deadline))


@dataclass(frozen=True)
class FromConfig:
    """Builds a worker's parts from the run's config: the policy at `model_path` (generation copy only),
    the configured backend, the task, and its tools (on `tool_actors` when given)."""

    cfg: Config
    model_path: str
    tool_actors: tuple[Any, ...] = ()
    threads: int | None = None

    def __call__(self) -> WorkerParts:
        from tirl.trainer.build import (EnvFactory, build_task, build_tools, load_policy, make_backend,
                                        pick_device, setup_threads)

        setup_threads(self.threads)
        task = build_task(self.cfg.task)
        if self.tool_actors:
            from tirl.cluster.tools import ray_toolset
            tools = ray_toolset(self.tool_actors)
        else:
            tools = build_tools(self.cfg, task)
        policy = load_policy(self.cfg.model, pick_device(self.cfg.run.device), self.model_path, trainable=False)
        backend = make_backend(policy, self.cfg)
        return WorkerParts(EnvFactory(task, tools, self.cfg, policy.fmt), backend, policy.fmt)


def tool_build(cfg: Config) -> Callable[[], Any]:
    """The tool workers' builder: the run's tools from its config."""
    return _ToolsFromConfig(cfg)


@dataclass(frozen=True)
class _ToolsFromConfig:
    cfg: Config

    def __call__(self):
        from tirl.trainer.build import build_task, build_tools

        return build_tools(self.cfg, build_task(self.cfg.task))
