"""Shaping rewards: a base reward (default: the task's own, spec `base`) adjusted for length or tool use.

- `dapo_overlong` (DAPO, reference 2.5): base + soft overlong punishment of the sampled length.
- `spear_tool` (SPEAR, reference 4.3): base + an intrinsic tool-call reward on a cosine schedule.
- `deepeyes` (DeepEyes v1, reference 3.8): 0.8 acc + 0.2 fmt + 1.2 1[tool used and acc].
- `mash` (MASH, reference 3.8): acc - lambda * #searches.

`dapo_overlong` and `spear_tool` add a term to the base reward: the base's components keep their
names (a name clash is an error), its `correct` passes through, and with base turn rewards the added
term goes on the last turn. `deepeyes` and `mash` replace the base's formula and use only its
correctness; the base's components are then reported as `base.<k>`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tirl.rewards.base import REWARDS, GroupContext, RewardResult, RewardSpec, call_reward
from tirl.rewards.compose import known_correct, merge_components, prefixed
from tirl.tasks.base import Problem
from tirl.types import ToolStatus, Trajectory

RAN = frozenset({ToolStatus.OK, ToolStatus.OUTPUT_TRUNCATED, ToolStatus.EXECUTION_ERROR, ToolStatus.TIMEOUT})
"""Statuses of tool calls that were actually run (the tool was invoked)."""


# ----------------------------------------------------------------------------- pure pieces


def overlong_penalty(length: int, max_length: int, cache_length: int, penalty_factor: float = 1.0) -> float:
    """DAPO soft overlong punishment R_len(|y|).

    0 if |y| <= L_max - L_cache; ((L_max - L_cache) - |y|) / L_cache * penalty_factor inside the buffer;
    -penalty_factor beyond L_max (the paper's -1 at factor 1; continuous at |y| = L_max).
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong penalty needs 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    if length > max_length:
        return -float(penalty_factor)
    return min(-(length - (max_length - cache_length)) / cache_length * penalty_factor, 0.0)


def toolcall_schedule(step: int, max_steps: int) -> float:
    """SPEAR's kappa(s) = (cos(pi s / T) + 1) / 2 for s <= T, else 0 (T = `max_steps`)."""
    if max_steps <= 0:
        raise ValueError(f"max_toolcall_steps must be > 0, got {max_steps}")
    return (math.cos(math.pi * step / max_steps) + 1) / 2 if step <= max_steps else 0.0


def spear_bonus(score: float, tool_turns: int, kappa: float, per_turn: float = 0.1, cap: float = 1.0,
                variant: str = "default") -> float:
    """SPEAR intrinsic tool-call reward added to `score`.

    r_tc = min(per_turn * tool_turns, cap). default: kappa * r_tc. qwen3: kappa * r_tc when
    score <= 0, and kappa * 1[r_tc > 0] when score > 0.
    """
    r_tc = min(per_turn * tool_turns, cap)
    if variant == "default":
        return kappa * r_tc
    if variant == "qwen3":
        return kappa * (float(r_tc > 0) if score > 0 else r_tc)
    raise ValueError(f"spear_tool: variant must be 'default' or 'qwen3', got {variant!r}")


def tool_turns(trajectory: Trajectory, tools: Sequence[str] | None = None) -> int:
    """Assistant turns that made at least one (parsed) tool call, to a tool in `tools` when given."""
    return sum(1 for t in trajectory.turns if any(tools is None or c.name in tools for c in t.tool_calls))


def tools_run(trajectory: Trajectory, tools: Sequence[str] | None = None) -> int:
    """Tool calls that were run (status in `RAN`: ok, truncated, execution error, timeout), to a tool
    in `tools` when given. Unparseable, unknown, invalid and over-budget attempts do not count."""
    return sum(1 for r in trajectory.tool_results if r.status in RAN and (tools is None or r.name in tools))


def deepeyes_format_error(text: str | None, tag: str = "answer") -> tuple[bool, str]:
    """(format error, answer text) of a final message, as DeepEyes checks it.

    An error: no final message; unbalanced <think> tags; unbalanced <tag> tags after the last </think>;
    no or an empty answer in the last <tag>...</tag>.
    """
    if text is None:
        return True, ""
    error = text.count("<think>") != text.count("</think>")
    after = text.split("</think>")[-1]
    error |= after.count(f"<{tag}>") != after.count(f"</{tag}>")
    end = after.rfind(f"</{tag}>")
    start = after.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    answer = after[start + len(tag) + 2:end].strip() if start >= 0 else ""
    return error or not answer, answer


def _check_tools(tools: Sequence[str] | None, who: str) -> None:
    if tools is not None and (isinstance(tools, str) or not all(isinstance(t, str) for t in tools)):
        raise ValueError(f"{who}: tools must be a list of tool names, got {tools!r}")


def _plus(base: RewardResult, added: float, extra: dict[str, float], trajectory: Trajectory,
          who: str) -> RewardResult:
    """`base` with `added` on top (on its last turn when it has turn rewards) and components `extra`."""
    components = dict(base.components)
    merge_components(components, extra, who)
    turn_rewards = base.turn_rewards or None  # none for a trajectory without turns
    if turn_rewards is not None:
        turn_rewards = (*turn_rewards[:-1], turn_rewards[-1] + added)
    return RewardResult(base.total + added, components, base.correct, turn_rewards)


# ----------------------------------------------------------------------------- rewards


@REWARDS.register("dapo_overlong")
async def dapo_overlong(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                        max_length: int, cache_length: int, penalty_factor: float = 1.0) -> RewardResult:
    """DAPO overlong shaping: R = base + min(-(|y| - (L_max - L_cache)) / L_cache * factor, 0).

    |y| = tokens the policy sampled (sum of the loss mask; tool observations are not counted).
    `max_length` (L_max, e.g. rollout.max_new_tokens) and `cache_length` (L_cache, the soft-punishment
    buffer) must be given (a recipe without them is refused before any work starts). Component `overlong`.
    """
    penalty = overlong_penalty(trajectory.num_sampled_tokens, max_length, cache_length, penalty_factor)
    base_result = await call_reward(base, trajectory, problem, group)
    return _plus(base_result, penalty, {"overlong": penalty}, trajectory, "dapo_overlong")


@REWARDS.register("spear_tool")
async def spear_tool(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                     max_toolcall_steps: int = 200, per_turn: float = 0.1, cap: float = 1.0,
                     variant: str = "default", tools: Sequence[str] | None = None) -> RewardResult:
    """SPEAR intrinsic tool reward: R = base + kappa(step) * min(0.1 * #tool-call turns, 1).

    kappa(s) = (cos(pi s / T) + 1) / 2 up to T = `max_toolcall_steps`, then 0; s = the training step
    (`group.step`; 0 in evaluation, so evaluation scores carry the full bonus). variant=qwen3: a
    positive base score gets kappa * 1[any tool turn] instead. Component `toolcall`.
    """
    _check_tools(tools, "spear_tool")
    base_result = await call_reward(base, trajectory, problem, group)
    kappa = toolcall_schedule(group.step, max_toolcall_steps)
    bonus = spear_bonus(base_result.total, tool_turns(trajectory, tools), kappa, per_turn, cap, variant)
    return _plus(base_result, bonus, {"toolcall": bonus}, trajectory, "spear_tool")


@REWARDS.register("deepeyes")
async def deepeyes(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                   tools: Sequence[str] | None = None, max_answer_chars: int = 1000, answer_tag: str = "answer",
                   weights: Sequence[float] = (0.8, 0.2, 1.2)) -> RewardResult:
    """DeepEyes v1: R = 0.8 acc + 0.2 fmt + 1.2 1[tool used and acc], fmt = -1 on a format error, else 0.

    acc = correctness from `base`, set to 0 (and a format error) for answers of `max_answer_chars` or
    more; tool used = a tool call ran (in `tools` when given). Components `acc`, `format`, `tool`
    (weighted, summing to R) and `base.<k>`.
    """
    _check_tools(tools, "deepeyes")
    if len(weights) != 3:
        raise ValueError(f"deepeyes: weights must be (acc, format, tool), got {weights!r}")
    base_result = await call_reward(base, trajectory, problem, group)
    acc = known_correct(base_result, base, "deepeyes")
    format_error, answer = deepeyes_format_error(trajectory.final_answer, answer_tag)
    if len(answer) >= max_answer_chars:
        acc, format_error = False, True
    used = tools_run(trajectory, tools) > 0
    w_acc, w_fmt, w_tool = (float(w) for w in weights)
    components = {"acc": w_acc * acc, "format": -w_fmt if format_error else 0.0, "tool": w_tool * (used and acc)}
    components.update(prefixed(base_result.components, "base"))
    total = components["acc"] + components["format"] + components["tool"]
    return RewardResult(total, components, acc)


@REWARDS.register("mash")
async def mash(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
               search_cost: float = 0.1, tools: Sequence[str] | None = None) -> RewardResult:
    """MASH pay-per-search: R = acc - lambda * #searches (lambda = `search_cost`, acc from `base`).

    #searches = tool calls that ran, to the tools named in `tools` (default: every tool). Components
    `acc`, `search_cost` (-lambda * n), `searches` (n) and `base.<k>`.
    """
    _check_tools(tools, "mash")
    base_result = await call_reward(base, trajectory, problem, group)
    acc = known_correct(base_result, base, "mash")
    searches = tools_run(trajectory, tools)
    cost = -float(search_cost) * searches
    components = {"acc": float(acc), "search_cost": cost, "searches": float(searches),
                  **prefixed(base_result.components, "base")}
    return RewardResult(float(acc) + cost, components, acc)
