"""Tool workers: Ray actors that hold the real tools; `ray_toolset` gives a `ToolSet` that forwards to them.

A `ToolWorker` builds the run's `ToolSet` in its own process (a CPU-only actor: sandboxes, corpora and
interpreters live there, away from the GPU generation). The caller's side is an ordinary `ToolSet` of
`RayTool`s with the same names, schemas and execution policies, so `ToolEnv` and the rollout are
unchanged: timeouts, retries, truncation and the never-raise contract stay in the caller's `ToolSet`.

Routing is by session: `ToolSet.session()` (one per trajectory) picks a worker round-robin and every
call of that trajectory goes to it, so a stateful session (a persistent interpreter) keeps its state.
Arguments are validated by the worker's tool, so results, validation errors included, are exactly what
a local call gives. An exception raised by the tool is re-raised in the caller (the model sees the same
error text); a worker that died raises `TransientToolError` (retried when the tool's policy allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tirl.tools.base import Tool, ToolArgumentError, TransientToolError, _require_object, error_result
from tirl.tools.toolset import ExecutionPolicy, ToolSet
from tirl.types import ToolStatus


@dataclass(frozen=True)
class ToolSpec:
    """What the caller needs to know of one remote tool."""

    name: str
    description: str
    parameters: dict[str, Any]
    timeout_s: float | None
    policy: ExecutionPolicy
    properties: dict[str, Any]
    """The tool's `describe()` (recorded in run directories)."""


@dataclass(frozen=True)
class _Raised:
    """An exception the tool raised, carried back to be re-raised in the caller."""

    error: BaseException


class ToolWorker:
    """Actor body: the tools built by `build()`, and the sessions of the trajectories routed here."""

    def __init__(self, build: Callable[[], ToolSet]):
        self.tools = build()
        self.sessions: dict[str, dict[str, Tool]] = {}

    def specs(self) -> list[ToolSpec]:
        return [ToolSpec(t.name, t.description, t.parameters, t.timeout_s, self.tools.policy(t.name), t.describe())
                for t in self.tools]

    def pid(self) -> int:
        return os.getpid()

    async def call(self, name: str, session_id: str, arguments: dict[str, Any]) -> Any:
        """Validate and run one call on session `session_id`'s instance of tool `name`: its output, a
        `ToolResult` (a validation error included), or `_Raised`."""
        tool = self._instance(session_id, name)
        try:
            validated = tool.validate(arguments)
        except ToolArgumentError as e:
            return error_result("", name, ToolStatus.VALIDATION_ERROR, f"invalid arguments for {name}: {e}")
        try:
            return await tool.run(**validated)
        except (Exception, SystemExit) as e:
            return _Raised(_picklable(e))

    async def close_session(self, session_id: str) -> None:
        for name, inst in self.sessions.pop(session_id, {}).items():
            if inst is not self.tools.get(name):
                await inst.aclose()

    async def shutdown(self) -> None:
        for session_id in list(self.sessions):
            await self.close_session(session_id)
        await self.tools.shutdown()

    def _instance(self, session_id: str, name: str) -> Tool:
        per_tool = self.sessions.setdefault(session_id, {})
        if name not in per_tool:
            per_tool[name] = self.tools.get(name).session()
        return per_tool[name]


class _Router:
    """Hands out (tool worker, session id) pairs round-robin; inside `one_session()` always the same pair,
    so every tool of one trajectory's view runs on one worker."""

    def __init__(self, actors: Sequence[Any]):
        self.actors = list(actors)
        self._next = itertools.count()
        self._fixed: tuple[Any, str] | None = None

    def pick(self) -> tuple[Any, str]:
        if self._fixed is not None:
            return self._fixed
        return self.actors[next(self._next) % len(self.actors)], uuid.uuid4().hex

    @contextlib.contextmanager
    def one_session(self) -> Iterator[None]:
        self._fixed = self.pick()
        try:
            yield
        finally:
            self._fixed = None


class RayTool(Tool):
    """A tool run by a `ToolWorker`. The shared instance only describes it; `session()` binds one worker."""

    def __init__(self, spec: ToolSpec, router: _Router, actor: Any = None, session_id: str | None = None):
        self.name, self.description, self.parameters = spec.name, spec.description, spec.parameters
        self.timeout_s = spec.timeout_s
        self.spec, self.router, self.actor, self.session_id = spec, router, actor, session_id

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Only the object check here; the worker's tool validates the fields."""
        _require_object(arguments)
        return dict(arguments)

    def session(self) -> RayTool:
        return RayTool(self.spec, self.router, *self.router.pick())

    def describe(self) -> dict[str, Any]:
        return dict(self.spec.properties)

    async def run(self, **arguments: Any) -> Any:
        from ray.exceptions import RayActorError

        actor, session_id = self.actor, self.session_id
        if actor is None:  # called outside a session: a one-call session on any worker
            actor, session_id = self.router.pick()
        ref = actor.call.remote(self.name, session_id, arguments)
        try:
            outcome = await ref
        except asyncio.CancelledError:
            _cancel(ref)
            raise
        except RayActorError as e:
            raise TransientToolError(f"tool worker running {self.name!r} died: {type(e).__name__}") from None
        finally:
            if self.actor is None:
                actor.close_session.remote(session_id)
        if isinstance(outcome, _Raised):
            raise outcome.error
        return outcome

    async def aclose(self) -> None:
        if self.actor is not None:
            from ray.exceptions import RayActorError

            try:
                await self.actor.close_session.remote(self.session_id)
            except RayActorError:
                pass  # the worker died: its sessions went with it


class RayToolSet(ToolSet):
    """A `ToolSet` whose tools run on tool workers; `shutdown()` also releases the workers' tools."""

    def __init__(self, specs: Sequence[ToolSpec], actors: Sequence[Any]):
        self.router = _Router(actors)
        super().__init__([RayTool(s, self.router) for s in specs], {s.name: s.policy for s in specs})
        self.actors = list(actors)

    def session(self, fault_rate: float = 0.0, fault_seed: int = 0) -> ToolSet:
        """One trajectory's view: all its tools on one worker (picked round-robin), in one session there;
        injected faults (`ToolSet.session`) are decided here, before a call reaches the worker."""
        with self.router.one_session():
            return super().session(fault_rate, fault_seed)

    async def shutdown(self) -> None:
        from ray.exceptions import RayActorError

        for actor in self.actors:
            try:
                await actor.shutdown.remote()
            except RayActorError:
                pass


def start_tool_workers(build: Callable[[], ToolSet], count: int, *, num_cpus: float = 1.0,
                       resources: dict[str, float] | None = None, max_restarts: int = 3) -> list[Any]:
    """`count` CPU-only tool worker actors, each running `build()` (Ray must be initialised)."""
    import ray

    cls = ray.remote(ToolWorker)
    return [cls.options(num_cpus=num_cpus, num_gpus=0, resources=dict(resources or {}), max_restarts=max_restarts,
                        max_concurrency=1000).remote(build) for _ in range(count)]


def ray_toolset(actors: Sequence[Any]) -> RayToolSet:
    """The tools of `actors` (all built alike) as a `ToolSet` for envs; waits until the first is ready."""
    import ray

    specs = ray.get(actors[0].specs.remote())
    return RayToolSet(specs, actors)


def _cancel(ref: Any) -> None:
    import ray

    try:
        ray.cancel(ref)
    except Exception:  # noqa: BLE001 - a call that already finished cannot be cancelled
        pass


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception that does not travel becomes its text
        return RuntimeError(f"{type(error).__name__}: {error}")
