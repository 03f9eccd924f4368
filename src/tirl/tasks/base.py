"""What a task is: problems with gold answers, reference solutions for SFT, and prompts.

A task knows nothing about chat markup or tokens: it speaks in `Message`s and `ToolCall`s. The chat
format turns those into tokens; the env runs the tools; the reward function scores the outcome.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tirl.registry import Registry
from tirl.types import ToolCall

if TYPE_CHECKING:
    from tirl.envs.base import Env
    from tirl.envs.tool_env import ToolLimits
    from tirl.tools.toolset import ToolSet


@dataclass(frozen=True)
class Problem:
    """One problem of a task."""

    id: str
    """Stable identifier (same problem -> same id across runs and machines)."""
    question: str
    """The user message."""
    answer: str
    """The gold answer, as a canonical string (for arithmetic: an integer such as '178377')."""
    reference_calls: tuple[ToolCall, ...] = ()
    """A correct sequence of tool calls (one per turn), used to build SFT traces; may be empty."""
    info: Mapping[str, Any] = field(default_factory=dict)
    """Task-specific facts (level, template, expression, ...), kept in trajectories' metadata.
    `info["failed_calls"]` (indices into `reference_calls`): calls the SFT trace shows failing with an
    injected fault (`rollout.tool_fault_rate`'s message) instead of running, so the trace shows a recovery."""


class Task(ABC):
    """A family of problems. Subclasses are registered in `TASKS` by name."""

    name: str = ""
    """Registry name."""
    default_tools: tuple[str, ...] = ()
    """Names of the tools the task is meant to be solved with."""
    default_reward: str = ""
    """Name of the reward function (in `tirl.rewards.REWARDS`) that scores this task."""
    problem_tools: bool = False
    """True when each problem brings its own tools (shown by `make_env`), not the run's `task.tools`."""

    @abstractmethod
    def system_prompt(self, with_tools: bool) -> str:
        """Instructions for the model; `with_tools=False` is the no-tool baseline's variant."""

    @abstractmethod
    def train_problem(self, index: int) -> Problem:
        """The index-th training problem of a deterministic stream (fixed by the task's seed)."""

    @abstractmethod
    def heldout(self) -> list[Problem]:
        """The fixed held-out evaluation split; disjoint from every training and SFT problem."""

    def sft_problems(self, count: int) -> list[Problem]:
        """Problems with `reference_calls` for the SFT cold start (narrow on purpose); default none."""
        raise NotImplementedError(f"task {self.name!r} has no SFT traces")

    def tool_settings(self) -> dict[str, dict[str, Any]]:
        """Default `tools.<name>` settings the task's tools need (its search corpus, say); a recipe's
        `tools.<name>` keys override them key by key."""
        return {}

    def make_env(self, problem: Problem, tools: ToolSet, limits: ToolLimits, with_tools: bool) -> Env:
        """One episode of `problem`. `tools` is a fresh session of the run's tools (empty when `with_tools`
        is false, the no-tool baseline). Default: a `ToolEnv` with `system_prompt(with_tools)`."""
        from tirl.envs.tool_env import ToolEnv

        return ToolEnv(problem, self.system_prompt(with_tools), tools, limits)

    def final_answer_text(self, problem: Problem) -> str:
        """How a correct final assistant message looks (used for SFT traces)."""
        return f"<answer>{problem.answer}</answer>"


BUILTIN_TASK_MODULES: tuple[str, ...] = (
    "tirl.tasks.math_python",
    "tirl.tasks.search_qa",
    "tirl.tasks.code",
    "tirl.tasks.dataset",
    "tirl.tasks.text_to_sql",
    "tirl.tasks.bfcl",
)
"""Task-suite modules imported on the first lookup in `TASKS` (or `REWARDS`: they register their rewards too).
Not imported with `tirl.tasks`, because they import `tirl.rewards`, which imports this module."""

TASKS: Registry[type[Task]] = Registry("task", entry_point_group="tirl.tasks", modules=BUILTIN_TASK_MODULES)
"""Task classes by name; `task.name` in a recipe picks one, `task.kwargs` go to its constructor. Installed
packages add theirs through the `tirl.tasks` entry-point group."""
