"""`ToolEnv`: a question, a set of tools, and Hermes-style tool calls. Most tasks need nothing more.

An assistant message without a tool-call block ends the episode (it is the answer). Every block is
either run or answered with an error the model sees: malformed JSON (`invalid_call`), an unknown
tool, bad arguments, an exception, a timeout (DESIGN.md invariant 4). Calls past the trajectory's
tool budget are not run; the episode ends with stop reason `tool_budget`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from tirl.chat.hermes import ParsedCall, parse_tool_calls
from tirl.envs.base import Env, StepResult
from tirl.tasks.base import Problem
from tirl.tools.base import error_result
from tirl.tools.toolset import ToolSet
from tirl.types import Message, StopReason, ToolResult, ToolStatus

Parser = Callable[[str, str], list[ParsedCall]]


@dataclass(frozen=True)
class ToolLimits:
    """Per-trajectory tool budget and per-call limits."""

    max_tool_calls: int = 4
    """Tool calls a trajectory may make in total; one more ends it with `tool_budget`."""
    timeout_s: float = 10.0
    """Default seconds per call (a tool's own `timeout_s` wins)."""
    max_output_chars: int = 1000
    """Longer tool outputs are cut, with a marker, and reported as `output_truncated`."""


class ToolEnv(Env):
    """A single question answered with the help of tools."""

    def __init__(self, problem: Problem, system_prompt: str, tools: ToolSet, limits: ToolLimits = ToolLimits(),
                 parser: Parser = parse_tool_calls, stop_strings: tuple[str, ...] | None = None):
        """`parser` finds the calls in the model's text and `stop_strings` end its turn (None: the chat
        format's tool-call end); `tirl.chat.search_r1` gives both for `<search>` tags."""
        self.stop_strings = stop_strings
        self.problem = problem
        self.system_prompt = system_prompt
        self.tools = tools
        self.limits = limits
        self.parser = parser
        self.calls_made = 0
        self.turn = 0
        self._running: dict[str, tuple[str, float]] = {}

    @property
    def tool_schemas(self) -> list[dict]:
        return self.tools.schemas()

    async def reset(self) -> list[Message]:
        return [Message("system", self.system_prompt), Message("user", self.problem.question)]

    async def step(self, assistant: Message) -> StepResult:
        parsed = self.parser(assistant.content, f"call_{self.turn}") if len(self.tools) else []
        self.turn += 1
        if not parsed:
            return StepResult(done=True, stop_reason=StopReason.ANSWERED, final_answer=assistant.content)
        over_budget = self.calls_made + len(parsed) > self.limits.max_tool_calls
        runnable = parsed[: max(0, self.limits.max_tool_calls - self.calls_made)]
        results = await asyncio.gather(*(self._run(p, k) for k, p in enumerate(runnable)))
        self.calls_made += len(parsed)
        for k, p in enumerate(parsed[len(runnable):], start=len(runnable)):
            results.append(error_result(_call_id(p, k, self.turn - 1), _name(p), ToolStatus.BUDGET_EXCEEDED,
                                        f"tool-call budget of {self.limits.max_tool_calls} calls exhausted"))
        calls = tuple(p.call for p in parsed if p.call is not None)
        if over_budget:
            return StepResult(done=True, stop_reason=StopReason.TOOL_BUDGET, tool_calls=calls,
                              tool_results=tuple(results))
        observations = tuple(Message("tool", r.content, tool_call_id=r.call_id, name=r.name) for r in results)
        return StepResult(observations=observations, tool_calls=calls, tool_results=tuple(results))

    async def close(self) -> None:
        """Release this trajectory's tool sessions (a persistent interpreter, for one)."""
        await self.tools.aclose()

    def activity(self) -> str:
        now = time.monotonic()
        return ", ".join(f"tool {name} ({cid}) running {now - t0:.0f}s" for cid, (name, t0) in self._running.items())

    async def _run(self, parsed: ParsedCall, k: int) -> ToolResult:
        if parsed.call is None:
            return error_result(_call_id(parsed, k, self.turn - 1), "", ToolStatus.INVALID_CALL,
                                parsed.error or "malformed tool call")
        self._running[parsed.call.id] = (parsed.call.name, time.monotonic())
        try:
            return await self.tools.execute(parsed.call, default_timeout_s=self.limits.timeout_s,
                                            max_output_chars=self.limits.max_output_chars)
        finally:
            self._running.pop(parsed.call.id, None)


def _call_id(p: ParsedCall, k: int, turn: int) -> str:
    return p.call.id if p.call is not None else f"call_{turn}_{k}"


def _name(p: ParsedCall) -> str:
    return p.call.name if p.call is not None else ""
