"""The values that flow between tirl's layers.

Everything here is a frozen dataclass or a string enum, so a value handed from one layer to the next
cannot be changed behind its back; layers build new values with `dataclasses.replace`. Token
sequences are tuples of ints. Nothing here imports torch.

Dimension glossary used across tirl (in names such as `logprobs_B_T`): B = sequences in a batch,
T = token positions, G = samples in a group, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool, as the model wrote it and the parser read it."""

    id: str
    """Identifier that links the call to its result (`ToolResult.call_id`)."""
    name: str
    """Name of the tool the model asked for (may be unknown: the env reports that as an error)."""
    arguments: dict[str, Any]
    """Arguments parsed from the model's JSON; validated against the tool's schema before the call."""


class ToolStatus(StrEnum):
    """How a tool call ended. Every status except `ok` is an error the model sees as text."""

    OK = "ok"
    """The tool ran and returned its output."""
    INVALID_CALL = "invalid_call"
    """The call could not be parsed (broken JSON, missing name, arguments not an object)."""
    UNKNOWN_TOOL = "unknown_tool"
    """The name is not one of the env's tools."""
    VALIDATION_ERROR = "validation_error"
    """The arguments do not match the tool's schema (missing, extra or wrongly typed)."""
    EXECUTION_ERROR = "execution_error"
    """The tool raised; the content holds a short description of the error."""
    TIMEOUT = "timeout"
    """The tool did not finish within its time limit."""
    OUTPUT_TRUNCATED = "output_truncated"
    """The tool ran, but its output was longer than the limit and was cut (marker included)."""
    BUDGET_EXCEEDED = "budget_exceeded"
    """The call was not run because the trajectory had used up its tool-call budget."""


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call, as the model will see it."""

    call_id: str
    """`ToolCall.id` of the call this answers."""
    name: str
    """Tool name (as called; may be unknown)."""
    content: str
    """The text the model sees: the output, or the error message for every non-ok status."""
    status: ToolStatus = ToolStatus.OK
    """How the call ended."""
    latency_s: float = 0.0
    """Wall-clock seconds the call took, validation included."""

    @property
    def ok(self) -> bool:
        """True when the tool ran (its output may have been truncated)."""
        return self.status in (ToolStatus.OK, ToolStatus.OUTPUT_TRUNCATED)


@dataclass(frozen=True)
class Message:
    """One chat message, OpenAI-compatible."""

    role: Role
    """Who speaks: system, user, assistant or tool."""
    content: str = ""
    """The text. For an assistant message this is the model's raw output, tool-call markup included."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Tool calls parsed from an assistant message's content."""
    tool_call_id: str | None = None
    """For a tool message: the id of the call it answers."""
    name: str | None = None
    """For a tool message: the tool's name."""

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI / Hugging Face chat-template dict."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


class StopReason(StrEnum):
    """Why a trajectory ended."""

    ANSWERED = "answered"
    """The model ended a turn without calling a tool: its last message is the answer."""
    MAX_TURNS = "max_turns"
    """The turn limit was reached while the model was still calling tools."""
    MAX_TOKENS = "max_tokens"
    """The budget of sampled tokens (per turn or in total) ran out mid-generation."""
    CONTEXT_OVERFLOW = "context_overflow"
    """Prompt plus history no longer fit the model's context window."""
    TOOL_BUDGET = "tool_budget"
    """The model asked for more tool calls than the trajectory allows."""
    ERROR = "error"
    """The environment failed (not the model); see the trajectory's metadata for the error."""
    TIMEOUT = "timeout"
    """The trajectory ran longer than its wall-clock limit."""


FinishReason = Literal["eos", "stop", "length"]
"""Why one generation call ended: an end-of-turn token, a stop string (tool-call end), or its token limit."""


@dataclass(frozen=True)
class Turn:
    """One assistant generation and the observations the environment inserted after it.

    Token indices are positions in `Trajectory.response_ids` (0 = first response token), half-open.
    """

    gen_start: int
    """First response position sampled in this turn."""
    gen_end: int
    """One past the last sampled position; `loss_mask` is 1 exactly on [gen_start, gen_end)."""
    obs_end: int
    """One past the last token the environment inserted after this turn (== gen_end if none)."""
    text: str
    """Decoded text of the sampled tokens, end-of-turn token excluded: what the parser read."""
    finish_reason: FinishReason
    """How the generation ended."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls parsed from the text (valid ones; invalid attempts appear only as error results)."""
    tool_results: tuple[ToolResult, ...] = ()
    """Results of every call attempt of this turn, errors included, in order."""
    gen_seconds: float = 0.0
    """Wall-clock time spent waiting for the generation (includes batching delay)."""
    tool_seconds: float = 0.0
    """Wall-clock time spent running this turn's tools."""


@dataclass(frozen=True)
class TrajectoryMeta:
    """Where a trajectory comes from."""

    task_id: str
    """Identifier of the problem (stable across runs)."""
    group_id: str
    """Identifier of the group (the G samples of one prompt) within a step."""
    sample_index: int = 0
    """Index of this sample within its group."""
    step: int = 0
    """Training step (or 0 in evaluation) that produced it."""
    node_ids: tuple[str, ...] = ()
    """For tree rollouts: the ids of the tree nodes this trajectory passes through, root first."""
    error: str | None = None
    """For stop reason `error`: what went wrong."""
    origin: str | None = None
    """Where a trajectory that did not start from the plain prompt comes from (e.g. fission: the failed
    trajectory and turn whose prefix it continues)."""


@dataclass(frozen=True)
class Trajectory:
    """One complete rollout: what the model sampled, what the environment inserted, how it scored.

    Invariants (checked by `tirl.rollout.checks.check_trajectory` at runtime):
    `len(response_ids) == len(loss_mask) == len(logprobs)`; `loss_mask` is 1 exactly on the tokens
    the policy sampled (each turn's [gen_start, gen_end)) and 0 on inserted tokens; `logprobs` is 0.0
    wherever `loss_mask` is 0.
    """

    prompt_ids: tuple[int, ...]
    """Tokens of the rendered prompt (system, tools, user), generation prompt included."""
    response_ids: tuple[int, ...]
    """Every token after the prompt: sampled turns interleaved with inserted observations."""
    loss_mask: tuple[int, ...]
    """1 on tokens sampled by the policy, 0 on tokens the environment inserted."""
    logprobs: tuple[float, ...]
    """Log-probability of each sampled token under the sampling policy (0.0 on inserted tokens)."""
    turns: tuple[Turn, ...]
    """The turns in order."""
    messages: tuple[Message, ...]
    """The conversation as messages: prompt messages, then assistant and tool messages."""
    stop_reason: StopReason
    """Why the trajectory ended."""
    meta: TrajectoryMeta
    """Origin of the trajectory."""
    final_answer: str | None = None
    """Text of the last assistant message when the trajectory ended by answering."""
    reward: float = 0.0
    """Scalar reward (set by the reward function after the rollout)."""
    reward_components: dict[str, float] = field(default_factory=dict)
    """Named parts of the reward (e.g. correct, format), for metrics."""
    correct: bool | None = None
    """Whether the final answer was right, where the task can tell (None otherwise)."""
    turn_rewards: tuple[float, ...] = ()
    """Per-turn rewards (turn-level credit: MatchTIR, IGPO, CM2), one per turn, each placed on the last
    sampled token of its turn; they sum to `reward`. Empty: the reward is an outcome reward, placed on
    the last sampled token of the trajectory."""

    @property
    def num_sampled_tokens(self) -> int:
        """Tokens the policy generated (sum of the loss mask)."""
        return sum(self.loss_mask)

    @property
    def tool_results(self) -> tuple[ToolResult, ...]:
        """Every tool result of every turn, in order."""
        return tuple(r for t in self.turns for r in t.tool_results)

    def with_reward(self, reward: float, components: dict[str, float], correct: bool | None,
                    turn_rewards: tuple[float, ...] = ()) -> Trajectory:
        """A copy carrying its reward."""
        return dataclasses.replace(self, reward=reward, reward_components=dict(components), correct=correct,
                                   turn_rewards=tuple(turn_rewards))


@dataclass(frozen=True)
class TreeEdge:
    """An edge of a rollout tree: `child` continues `parent` after a fork."""

    parent: str
    """Node id of the parent."""
    child: str
    """Node id of the child."""


@dataclass(frozen=True)
class TrajectoryGroup:
    """The trajectories that share one prompt: a flat group of G samples, or the leaves of a tree."""

    group_id: str
    """Identifier of the group within its step."""
    task_id: str
    """The problem every trajectory in the group answers."""
    trajectories: tuple[Trajectory, ...]
    """The samples, in sample-index order."""
    edges: tuple[TreeEdge, ...] = ()
    """Tree structure for tree rollouts (empty for flat groups)."""

    @property
    def rewards(self) -> list[float]:
        """Rewards of the trajectories, in order."""
        return [t.reward for t in self.trajectories]
