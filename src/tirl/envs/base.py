"""The environment contract: `reset() -> prompt messages`, `step(assistant message) -> StepResult`.

An env is single-use: one env per trajectory, discarded when the trajectory ends. The rollout loop
(`tirl.rollout.agent`) owns tokens and budgets; the env owns the conversation's meaning: what counts as
a tool call, what the tools answer, when the episode is over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from tirl.types import Message, StopReason, ToolCall, ToolResult


@dataclass(frozen=True)
class StepResult:
    """What the env answers to one assistant message."""

    observations: tuple[Message, ...] = ()
    """Messages to append before the next assistant turn (tool results); empty when done."""
    done: bool = False
    """True when the episode is over."""
    stop_reason: StopReason | None = None
    """Why the episode ended (set when done)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The valid calls found in the message."""
    tool_results: tuple[ToolResult, ...] = ()
    """One result per call attempt, errors included, in order."""
    final_answer: str | None = None
    """The answer text when the episode ended by answering."""


class Env(ABC):
    """One episode of a task."""

    @property
    @abstractmethod
    def tool_schemas(self) -> list[dict]:
        """OpenAI-style schemas of the tools the model is shown (empty: no tools)."""

    stop_strings: tuple[str, ...] | None = None
    """Strings that end a generation turn (None: the chat format's tool-call end, e.g. `</tool_call>`)."""

    @abstractmethod
    async def reset(self) -> list[Message]:
        """The prompt messages (system, user)."""

    @abstractmethod
    async def step(self, assistant: Message) -> StepResult:
        """React to one assistant message (its content is the model's raw output)."""

    def activity(self) -> str:
        """What the env is busy with right now (e.g. 'python call_1_0 running 12s'), for stall reports."""
        return ""

    async def close(self) -> None:
        """Release resources (tool sessions, sandboxes). Called once when the trajectory ends."""
