"""Function-calling episodes: single-turn (the calls ARE the answer) and multi-turn (BFCL's back-ends).

Both show the model the problem's own functions (`Env.tool_schemas`: `Problem.info["tools"]`) and read
its calls with the chat format's Hermes parser (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`).
A turn ends at the model's end-of-turn token, not at the first `</tool_call>`, so that one message can
hold several calls (parallel categories): `stop_strings` is the ChatML end-of-turn marker, which the
end-of-turn token reaches first for ChatML models (and which never appears otherwise).

- `SingleTurnEnv`: one assistant message ends the episode. Its calls are not executed: each gets a
  result saying it was recorded (`ok`), `unknown_tool` for a name the problem does not offer, or
  `invalid_call` for an unreadable block, so that metrics and call-based rewards (ToolRL) see them.
- `MultiTurnEnv`: BFCL's multi-turn loop. The back-ends are loaded from the scenario; every call of a
  message runs on them, in order, and its result goes back as a tool message (errors are data). A
  message without a call ends the user turn: the next user turn comes as a `user` observation, or,
  after the last one, the episode ends (`answered`). A user turn with no message (miss_func) reveals
  the functions held back until then, listed in the user message as BFCL's prompting mode does. The
  run's tool budget (`rollout.max_tool_calls`) and BFCL's 20 calling steps per user turn bound it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tirl.chat.hermes import ParsedCall, parse_tool_calls
from tirl.envs.base import Env, StepResult
from tirl.envs.tool_env import ToolLimits
from tirl.tasks.base import Problem
from tirl.tasks.bfcl.multi_turn import MAX_STEPS_PER_TURN, execute_async, load_backends, method_table
from tirl.tools.base import error_result
from tirl.tools.toolset import ToolSet
from tirl.types import Message, StopReason, ToolResult, ToolStatus

Parser = Callable[[str, str], list[ParsedCall]]

END_OF_TURN = "<|im_end|>"
"""The turn's stop string (see the module docstring)."""
RECORDED = "Recorded. Single-turn calls are scored, not executed."
"""What a single-turn call's result says."""
MORE_FUNCTIONS = "I have updated some more functions you can choose from. What about now?"
"""BFCL's user message when held-back functions are revealed (miss_func)."""


def prompt_messages(problem: Problem, system_prompt: str) -> list[Message]:
    """The system prompt (merged with the problem's own system message, if any) and the first turn's messages."""
    turn = list(problem.info["messages"])
    if turn and turn[0]["role"] == "system":
        system_prompt = f"{system_prompt}\n\n{turn[0]['content']}" if system_prompt else turn[0]["content"]
        turn = turn[1:]
    return [Message("system", system_prompt), *(Message(m["role"], m["content"]) for m in turn)]


def revealed_functions_message(tools: Sequence[Mapping[str, Any]]) -> str:
    """The user message that reveals held-back functions: one JSON line per function, then BFCL's question."""
    lines = [json.dumps(t.get("function", t), ensure_ascii=False) for t in tools]
    return "\n".join([*lines, MORE_FUNCTIONS])


class SingleTurnEnv(Env):
    """A single-turn BFCL problem: the first assistant message's calls are the answer (recorded, not run)."""

    stop_strings = (END_OF_TURN,)

    def __init__(self, problem: Problem, system_prompt: str, with_tools: bool, tools: ToolSet,
                 parser: Parser = parse_tool_calls):
        """`with_tools=False` (the no-tool baseline) shows no functions and reads no calls."""
        self.problem, self.system_prompt, self.with_tools = problem, system_prompt, with_tools
        self.tools, self.parser = tools, parser

    @property
    def tool_schemas(self) -> list[dict]:
        return list(self.problem.info["tools"]) if self.with_tools else []

    async def reset(self) -> list[Message]:
        return prompt_messages(self.problem, self.system_prompt)

    async def step(self, assistant: Message) -> StepResult:
        parsed = self.parser(assistant.content, "call_0") if self.with_tools else []
        offered = {t["function"]["name"] for t in self.problem.info["tools"]}
        results = tuple(_recorded(p, k, offered) for k, p in enumerate(parsed))
        calls = tuple(p.call for p in parsed if p.call is not None)
        return StepResult(done=True, stop_reason=StopReason.ANSWERED, tool_calls=calls, tool_results=results,
                          final_answer=assistant.content)

    async def close(self) -> None:
        await self.tools.aclose()


def _recorded(p: ParsedCall, k: int, offered: set[str]) -> ToolResult:
    if p.call is None:
        return error_result(f"call_0_{k}", "", ToolStatus.INVALID_CALL, p.error or "malformed tool call")
    if p.call.name not in offered:
        return error_result(p.call.id, p.call.name, ToolStatus.UNKNOWN_TOOL,
                            f"{p.call.name!r} is not one of the functions offered: {', '.join(sorted(offered))}")
    return ToolResult(p.call.id, p.call.name, RECORDED)


class MultiTurnEnv(Env):
    """A multi-turn BFCL scenario on BFCL's back-ends (see the module docstring)."""

    stop_strings = (END_OF_TURN,)

    def __init__(self, problem: Problem, system_prompt: str, with_tools: bool, tools: ToolSet,
                 limits: ToolLimits = ToolLimits(), parser: Parser = parse_tool_calls):
        """`with_tools=False` (the no-tool baseline) shows no functions and runs no calls: every reply
        ends its user turn."""
        self.problem, self.system_prompt, self.with_tools = problem, system_prompt, with_tools
        self.tools, self.limits, self.parser = tools, limits, parser
        self._table: dict[str, Callable[..., Any]] = {}
        self.user_turn = self.steps_in_turn = self.calls_made = self.generations = 0

    @property
    def tool_schemas(self) -> list[dict]:
        return list(self.problem.info["tools"]) if self.with_tools else []

    async def reset(self) -> list[Message]:
        """Fresh back-ends loaded from the scenario, and the first user turn."""
        info = self.problem.info
        instances = load_backends(info["involved_classes"], info["initial_config"], info["long_context"])
        self._table = method_table(instances)
        self.user_turn = self.steps_in_turn = self.calls_made = self.generations = 0
        return prompt_messages(self.problem, self.system_prompt)

    async def step(self, assistant: Message) -> StepResult:
        parsed = self.parser(assistant.content, f"call_{self.generations}") if self.with_tools else []
        self.generations += 1
        if not parsed:
            return self._end_user_turn(assistant.content)
        self.steps_in_turn += 1
        room = max(0, self.limits.max_tool_calls - self.calls_made)
        results = [await self._run(p, k) for k, p in enumerate(parsed[:room])]
        results += [error_result(_call_id(p, k, self.generations - 1), p.call.name if p.call else "",
                                 ToolStatus.BUDGET_EXCEEDED,
                                 f"tool-call budget of {self.limits.max_tool_calls} calls exhausted")
                    for k, p in enumerate(parsed[room:], start=room)]
        self.calls_made += len(parsed)
        calls = tuple(p.call for p in parsed if p.call is not None)
        if len(parsed) > room:
            return StepResult(done=True, stop_reason=StopReason.TOOL_BUDGET, tool_calls=calls,
                              tool_results=tuple(results))
        if self.steps_in_turn > MAX_STEPS_PER_TURN:
            return StepResult(done=True, stop_reason=StopReason.MAX_TURNS, tool_calls=calls,
                              tool_results=tuple(results))
        observations = tuple(Message("tool", r.content, tool_call_id=r.call_id, name=r.name) for r in results)
        return StepResult(observations=observations, tool_calls=calls, tool_results=tuple(results))

    def _end_user_turn(self, text: str) -> StepResult:
        turns = self.problem.info["turns"]
        self.user_turn += 1
        self.steps_in_turn = 0
        if self.user_turn >= len(turns):
            return StepResult(done=True, stop_reason=StopReason.ANSWERED, final_answer=text)
        return StepResult(observations=tuple(self.user_messages(self.user_turn)))

    def user_messages(self, turn: int) -> list[Message]:
        """The messages of user turn `turn` (for a miss_func turn: the held-back functions, revealed)."""
        messages = self.problem.info["turns"][turn]
        if messages:
            return [Message(m["role"], m["content"]) for m in messages]
        revealed = self.problem.info["missed_function"].get(str(turn), [])
        return [Message("user", revealed_functions_message(revealed))]

    async def _run(self, p: ParsedCall, k: int) -> ToolResult:
        if p.call is None:
            return error_result(_call_id(p, k, self.generations - 1), "", ToolStatus.INVALID_CALL,
                                p.error or "malformed tool call")
        outcome = await execute_async(self._table, p.call.name, p.call.arguments, self.limits.timeout_s)
        result = ToolResult(p.call.id, p.call.name, outcome.text, outcome.status)
        return _truncate(result, self.limits.max_output_chars)

    async def close(self) -> None:
        self._table = {}
        await self.tools.aclose()


def _call_id(p: ParsedCall, k: int, generation: int) -> str:
    return p.call.id if p.call is not None else f"call_{generation}_{k}"


def _truncate(result: ToolResult, max_chars: int) -> ToolResult:
    """A result longer than `max_chars` cut with a marker (`output_truncated`; the scoring re-runs the
    calls and compares the full results)."""
    extra = len(result.content) - max_chars
    if extra <= 0:
        return result
    status = ToolStatus.OUTPUT_TRUNCATED if result.status is ToolStatus.OK else result.status
    return ToolResult(result.call_id, result.name, f"{result.content[:max_chars]}\n...[truncated {extra} characters]",
                      status, result.latency_s)
