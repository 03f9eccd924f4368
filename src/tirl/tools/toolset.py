"""`ToolSet`: the tools of one environment, executed safely under one `ExecutionPolicy` per tool.

`ToolSet.execute` never raises for anything the model did (invariant 4): an unknown name, bad
arguments, an exception inside the tool, a timeout and an over-long output each become a
`ToolResult` whose content is the error text the model sees. Only `asyncio.CancelledError` (the
caller cancelling) propagates.

Execution control lives here and nowhere else: per-tool time limit, concurrency limit (a semaphore
shared by every trajectory's view of the set), and retries with exponential backoff for
`TransientToolError` only. A timeout is never retried (model code that loops would loop again), and
tools must not retry internally, so retries never nest.

Sessions: `ToolSet.session()` is the view one trajectory uses. Tools whose `session()` returns a new
object (a persistent interpreter) get a per-trajectory instance there; `aclose()` on the view releases
those. `shutdown()` on the shared set releases the tools' shared resources at the end of a run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tirl.tools.base import Tool, ToolArgumentError, TransientToolError, check_tool, describe_exception, error_result
from tirl.types import ToolCall, ToolResult, ToolStatus


FAULT_MESSAGE = "the {name} service is temporarily unavailable (503); the call did not run, try it again"
"""What an injected fault tells the model (after `Error: `); see `ToolSet.session`."""


@dataclasses.dataclass(frozen=True)
class ExecutionPolicy:
    """How calls of one tool are run. Configured per tool under `tools.<name>` in a recipe."""

    timeout_s: float | None = None
    """Seconds a call may take (None: the tool's own `timeout_s`, else the caller's default)."""
    max_concurrency: int | None = None
    """Calls of this tool running at once across all trajectories (None: unlimited)."""
    retries: int = 0
    """Extra attempts after a `TransientToolError` (never after a timeout)."""
    retry_backoff_s: float = 0.5
    """Wait before the first retry; doubled for each further one."""

    def __post_init__(self) -> None:
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.retries < 0 or self.retry_backoff_s < 0:
            raise ValueError("retries and retry_backoff_s must be >= 0")


class ToolSet:
    """The tools available in one environment, by name; executes calls without ever raising."""

    def __init__(self, tools: Iterable[Tool], policies: Mapping[str, ExecutionPolicy] | None = None):
        """Raises `ValueError` on duplicate names, on tools that fail `check_tool`, and on a policy
        for a tool that is not in the set."""
        self._tools: dict[str, Tool] = {}
        for t in tools:
            check_tool(t)
            if t.name in self._tools:
                raise ValueError(f"duplicate tool name {t.name!r} in tool set")
            self._tools[t.name] = t
        unknown = sorted(set(policies or {}) - set(self._tools))
        if unknown:
            raise ValueError(f"execution policy for unknown tools {unknown}; tools: {', '.join(self._tools)}")
        self._policies = {name: (policies or {}).get(name, ExecutionPolicy()) for name in self._tools}
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary())
        """Per event loop (a run uses one loop per stage), per limited tool."""
        self._shared: dict[str, Tool] = dict(self._tools)
        """The tools as built (a session view holds per-trajectory instances in `_tools`)."""
        self._fault_rate, self._faults = 0.0, random.Random(0)

    @property
    def names(self) -> list[str]:
        """Tool names, in the order given."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI function-tool dicts of every tool, in order."""
        return [t.schema() for t in self._tools.values()]

    def policy(self, name: str) -> ExecutionPolicy:
        return self._policies[name]

    def describe(self) -> dict[str, dict[str, Any]]:
        """{tool name: its `describe()` properties plus its execution policy}: recorded in run dirs."""
        return {name: {**t.describe(), "policy": dataclasses.asdict(self._policies[name])}
                for name, t in self._shared.items()}

    def get(self, name: str) -> Tool:
        """The tool called `name`; `KeyError` listing the valid names otherwise."""
        if name not in self._tools:
            raise KeyError(f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}")
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    # --- sessions and lifetime ---------------------------------------------------------------------

    def session(self, fault_rate: float = 0.0, fault_seed: int = 0) -> ToolSet:
        """The view one trajectory uses: per-trajectory instances where a tool has sessions.

        Policies and concurrency limits are shared with this set. Call `aclose()` when done.
        `fault_rate` > 0 injects failures: each valid call, in the order the calls are made, fails with
        that probability (a `random.Random(fault_seed)` draw) with `FAULT_MESSAGE` as an execution error,
        without running the tool.
        """
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be in [0, 1], got {fault_rate}")
        view = object.__new__(ToolSet)
        view._policies, view._semaphores, view._shared = self._policies, self._semaphores, self._shared
        view._tools = {name: t.session() for name, t in self._shared.items()}
        view._fault_rate, view._faults = fault_rate, random.Random(fault_seed)
        return view

    async def aclose(self) -> None:
        """Close the per-trajectory instances of a session view (no-op for shared tools)."""
        for name, t in self._tools.items():
            if t is not self._shared[name]:
                await t.aclose()

    async def shutdown(self) -> None:
        """Release every tool's shared resources (sandbox pools, server connections)."""
        for t in self._shared.values():
            await t.aclose()

    # --- execution ---------------------------------------------------------------------------------

    async def execute(
        self, call: ToolCall, *, default_timeout_s: float = 10.0, max_output_chars: int = 2000
    ) -> ToolResult:
        """Validate and run one call; every failure becomes an error `ToolResult` (see `ToolStatus`).

        The time limit is the policy's `timeout_s`, else the tool's `timeout_s`, else
        `default_timeout_s`; it covers each attempt (waiting for a concurrency slot is not counted).
        Output longer than `max_output_chars` keeps its head plus a `\\n...[truncated M characters]`
        marker. `latency_s` covers validation and execution. Raises only `asyncio.CancelledError`.
        """
        start = time.perf_counter()
        result = await self._execute(call, default_timeout_s)
        result = _truncate(result, max_output_chars)
        return dataclasses.replace(result, latency_s=time.perf_counter() - start)

    async def _execute(self, call: ToolCall, default_timeout_s: float) -> ToolResult:
        t = self._tools.get(call.name)
        if t is None:
            available = ", ".join(self._tools) or "none"
            message = f"unknown tool {call.name!r}. Available tools: {available}."
            return error_result(call.id, call.name, ToolStatus.UNKNOWN_TOOL, message)
        try:
            arguments = t.validate(call.arguments)
        except ToolArgumentError as e:
            message = f"invalid arguments for {t.name}: {e}"
            return error_result(call.id, t.name, ToolStatus.VALIDATION_ERROR, message)
        except Exception as e:  # a faulty custom `validate`: still not the caller's crash
            return error_result(call.id, t.name, ToolStatus.EXECUTION_ERROR, describe_exception(e))
        if self._fault_rate and self._faults.random() < self._fault_rate:
            return injected_fault(call)
        policy = self._policies[t.name]
        timeout_s = policy.timeout_s or t.timeout_s or default_timeout_s
        semaphore = self._semaphore(t.name)
        if semaphore is None:
            return await self._attempts(t, call, arguments, timeout_s, policy)
        async with semaphore:
            return await self._attempts(t, call, arguments, timeout_s, policy)

    def _semaphore(self, name: str) -> asyncio.Semaphore | None:
        limit = self._policies[name].max_concurrency
        if limit is None:
            return None
        per_loop = self._semaphores.setdefault(asyncio.get_running_loop(), {})
        return per_loop.setdefault(name, asyncio.Semaphore(limit))

    async def _attempts(self, t: Tool, call: ToolCall, arguments: dict[str, Any], timeout_s: float,
                        policy: ExecutionPolicy) -> ToolResult:
        for attempt in range(policy.retries + 1):
            try:
                outcome = await asyncio.wait_for(_run_capturing(t, arguments), timeout_s)
            except TimeoutError:
                message = f"tool {t.name!r} timed out after {timeout_s:g} s"
                return error_result(call.id, t.name, ToolStatus.TIMEOUT, message)
            if isinstance(outcome, _Raised) and isinstance(outcome.error, TransientToolError) \
                    and attempt < policy.retries:
                await asyncio.sleep(policy.retry_backoff_s * 2**attempt)
                continue
            break
        if isinstance(outcome, _Raised):
            return error_result(call.id, t.name, ToolStatus.EXECUTION_ERROR, describe_exception(outcome.error))
        if isinstance(outcome, ToolResult):
            return dataclasses.replace(outcome, call_id=call.id, name=t.name)
        return ToolResult(call_id=call.id, name=t.name, content=_to_text(outcome))


def injected_fault(call: ToolCall) -> ToolResult:
    """What a call that an injected fault stopped returns (execution error, `FAULT_MESSAGE`)."""
    return error_result(call.id, call.name, ToolStatus.EXECUTION_ERROR, FAULT_MESSAGE.format(name=call.name))


@dataclasses.dataclass(frozen=True)
class _Raised:
    """An exception raised by a tool, carried out of `wait_for` so it cannot pass for a timeout."""

    error: BaseException


async def _run_capturing(t: Tool, arguments: dict[str, Any]) -> Any:
    try:
        return await t.run(**arguments)
    except asyncio.CancelledError as e:
        if asyncio.current_task().cancelling():  # cancelled from outside (timeout or caller): propagate
            raise
        return _Raised(e)  # the tool's own code was cancelled: that is the tool failing
    except (Exception, SystemExit) as e:
        return _Raised(e)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


def _truncate(result: ToolResult, max_chars: int) -> ToolResult:
    extra = len(result.content) - max_chars
    if extra <= 0:
        return result
    content = f"{result.content[:max_chars]}\n...[truncated {extra} characters]"
    status = ToolStatus.OUTPUT_TRUNCATED if result.status is ToolStatus.OK else result.status
    return dataclasses.replace(result, content=content, status=status)
