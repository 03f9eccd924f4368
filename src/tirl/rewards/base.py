"""The reward contract: `fn(trajectory, problem, group, **params) -> float | dict[str, float] | RewardResult`.

A dict is a set of named components whose sum is the reward. A reward function may be `async` (a
judge model, a remote checker): `score` awaits it. Exceptions propagate: a reward bug must stop the
run, not look like a bad policy.

Rewards are looked up by *spec*: a registered name (`"arithmetic"`), a `module:attr` path, the word
`"task"` (the task's own reward), or a mapping `{"name": ..., "kwargs": {...}}`. Parameters go to the
function as keyword arguments; `bind` checks them against its signature before any work starts.
Rewards made of other rewards (OTC's multiplicative form, weighted sums, gates) take sub-specs as
parameters and call them with `call_reward`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from tirl.registry import Registry, RegistryError
from tirl.tasks.base import BUILTIN_TASK_MODULES, Problem
from tirl.types import Trajectory


@dataclass(frozen=True)
class GroupContext:
    """What a group-aware reward may look at besides its own trajectory."""

    trajectories: tuple[Trajectory, ...]
    """All trajectories of the group (the one being scored included)."""
    step: int = 0
    """Global training step (0 in evaluation)."""
    state: dict[str, Any] = field(default_factory=dict)
    """Per-run mutable state a reward may keep across steps (e.g. OTC's per-question minimum); saved
    in checkpoints, so it must stay JSON-serialisable. Key it by the reward's name."""
    task_reward: str = ""
    """Spec of the task's own reward: what the spec `"task"` resolves to."""
    training: bool = False
    """True while scoring training rollouts (rewards that keep state update it only then)."""


@dataclass(frozen=True)
class RewardResult:
    """A scored trajectory."""

    total: float
    """The scalar reward."""
    components: dict[str, float]
    """Named parts, reported as metrics (`reward/<name>`)."""
    correct: bool | None = None
    """Whether the answer is right, where the reward can tell; drives accuracy metrics."""
    turn_rewards: tuple[float, ...] | None = None
    """Turn-level credit: one reward per turn of the trajectory, placed on the last sampled token of
    its turn (None: an outcome reward on the last sampled token). When given, `total` is their sum."""


RewardFn = Callable[..., Any]
"""`fn(trajectory, problem, group, **params)` returning float, dict[str, float] or RewardResult (or an
awaitable of one)."""

REWARDS: Registry[RewardFn] = Registry("reward", entry_point_group="tirl.rewards", modules=BUILTIN_TASK_MODULES)
"""Reward functions by name."""

RewardSpec = Union[str, Mapping[str, Any]]
"""A registered name, a `module:attr` path, "task", or {"name": ..., "kwargs": {...}}."""


def resolve(spec: RewardSpec, task_reward: str = "") -> tuple[str, RewardFn, dict[str, Any]]:
    """`(name, function, params)` of a spec; raises `RegistryError` / `ValueError` naming what is wrong."""
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "kwargs"}
        if "name" not in spec or unknown:
            raise ValueError(f"reward spec {dict(spec)!r} must be a mapping with 'name' and optional 'kwargs'")
        name, params = spec["name"], dict(spec.get("kwargs") or {})
    elif isinstance(spec, str):
        name, params = spec, {}
    else:
        raise ValueError(f"reward spec must be a name or a mapping, got {type(spec).__name__}: {spec!r}")
    if name == "task":
        if not task_reward:
            raise ValueError("reward spec 'task' used where the task's own reward is unknown")
        inner_name, fn, inner = resolve(task_reward)
        return inner_name, fn, {**inner, **params}
    return name, REWARDS.get(name), params


def check_params(name: str, fn: RewardFn, params: Mapping[str, Any], task_reward: str = "") -> None:
    """Raise `ValueError` naming a parameter the reward function does not take or needs and lacks;
    check nested reward specs (parameters annotated `RewardSpec`) the same way, and run the function's
    own `validate(params, task_reward)` hook where it has one (composed rewards, judge settings), so
    that a bad recipe fails before any work starts."""
    sig = inspect.signature(fn)
    named = [(n, p) for n, p in list(sig.parameters.items())[3:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        bad = sorted(set(params) - {n for n, _ in named})
        if bad:
            raise ValueError(f"reward {name!r} has no parameter {bad[0]!r}; its parameters: "
                             f"{', '.join(n for n, _ in named) or '(none)'}")
    missing = [n for n, p in named if p.default is p.empty and n not in params]
    if missing:
        raise ValueError(f"reward {name!r} needs the parameter {missing[0]!r} (task.reward_kwargs.{missing[0]})")
    for n, p in named:
        if n in params and "RewardSpec" in str(p.annotation):
            try:
                bind(params[n], task_reward)
            except (RegistryError, ValueError) as e:
                raise ValueError(f"reward {name!r}, parameter {n!r}: {e}") from None
    validate = getattr(fn, "validate", None)
    if validate is not None:
        validate(params, task_reward)


@dataclass(frozen=True)
class BoundReward:
    """A reward function with its parameters bound, and the task's own reward spec (for "task")."""

    name: str
    fn: RewardFn
    params: dict[str, Any] = field(default_factory=dict)
    task_reward: str = ""

    @property
    def __name__(self) -> str:  # noqa: PLW3201  (error messages name the reward)
        return self.name

    def __call__(self, trajectory: Trajectory, problem: Problem, group: GroupContext) -> Any:
        return self.fn(trajectory, problem, group, **self.params)


def bind(spec: RewardSpec, task_reward: str = "") -> BoundReward:
    """The reward function of a spec with its parameters bound (checked against its signature)."""
    name, fn, params = resolve(spec, task_reward)
    check_params(name, fn, params, task_reward)
    return BoundReward(name, fn, params, task_reward)


async def call_reward(spec: RewardSpec, trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """Score `trajectory` with the reward a spec names (for rewards built from other rewards)."""
    return await score(bind(spec, group.task_reward), trajectory, problem, group)


async def score(fn: RewardFn, trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """Call a reward function (awaiting it if async) and normalise its output; raises on non-finite
    values, on a malformed result and on turn rewards that do not fit the trajectory."""
    out = fn(trajectory, problem, group)
    if inspect.isawaitable(out):
        out = await out
    name = getattr(fn, "__name__", repr(fn))
    if isinstance(out, RewardResult):
        result = out
    elif isinstance(out, dict):
        result = RewardResult(total=float(sum(out.values())), components={k: float(v) for k, v in out.items()})
    elif isinstance(out, (int, float)) and not isinstance(out, bool):
        result = RewardResult(total=float(out), components={})
    else:
        raise TypeError(f"reward function {name!r} returned {type(out).__name__}; "
                        "expected float, dict[str, float] or RewardResult")
    values = [result.total, *result.components.values(), *(result.turn_rewards or ())]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"reward function {name!r} returned a non-finite value for problem {problem.id!r}: "
                         f"total {result.total}, components {result.components}, turns {result.turn_rewards}")
    if result.turn_rewards is not None:
        if len(result.turn_rewards) != len(trajectory.turns):
            raise ValueError(f"reward function {name!r} gave {len(result.turn_rewards)} turn rewards for a "
                             f"trajectory of {len(trajectory.turns)} turns (problem {problem.id!r})")
        if not math.isclose(sum(result.turn_rewards), result.total, rel_tol=1e-6, abs_tol=1e-6):
            raise ValueError(f"reward function {name!r}: turn rewards {result.turn_rewards} do not sum to the "
                             f"total {result.total} (problem {problem.id!r})")
    return result


def spec_error(setting: str, error: Exception) -> str:
    """A config error message for a bad reward spec under `setting`."""
    return f"{setting}: {error}" if isinstance(error, (RegistryError, ValueError)) else f"{setting}: {error!r}"
