"""The reward contract: `fn(trajectory, problem, group) -> float | dict[str, float] | RewardResult`.

A dict is a set of named components whose sum is the reward. Exceptions propagate: a reward bug
must stop the run, not look like a bad policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

from tirl.registry import Registry
from tirl.tasks.base import Problem
from tirl.types import Trajectory


@dataclass(frozen=True)
class GroupContext:
    """What a group-aware reward may look at besides its own trajectory."""

    trajectories: tuple[Trajectory, ...]
    """All trajectories of the group (the one being scored included)."""
    step: int = 0
    """Global training step (0 in evaluation)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-run mutable state a reward may keep across steps (e.g. OTC's per-question minimum)."""


@dataclass(frozen=True)
class RewardResult:
    """A scored trajectory."""

    total: float
    """The scalar reward."""
    components: dict[str, float]
    """Named parts, reported as metrics (`reward/<name>`)."""
    correct: bool | None = None
    """Whether the answer is right, where the reward can tell; drives accuracy metrics."""


RewardFn = Callable[[Trajectory, Problem, GroupContext], Union[float, dict[str, float], RewardResult]]

REWARDS: Registry[RewardFn] = Registry("reward")
"""Reward functions by name."""


def score(fn: RewardFn, trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """Call a reward function and normalise its output; raises on non-finite values."""
    out = fn(trajectory, problem, group)
    if isinstance(out, RewardResult):
        result = out
    elif isinstance(out, dict):
        result = RewardResult(total=float(sum(out.values())), components={k: float(v) for k, v in out.items()})
    elif isinstance(out, (int, float)):
        result = RewardResult(total=float(out), components={})
    else:
        raise TypeError(f"reward function {getattr(fn, '__name__', fn)!r} returned {type(out).__name__}; "
                        "expected float, dict[str, float] or RewardResult")
    if not math.isfinite(result.total):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned a non-finite reward "
                         f"{result.total} for problem {problem.id!r}")
    return result
