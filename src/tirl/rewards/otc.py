"""OTC-PO: optimal tool calls (reference 3.2, "Acting Less is Reasoning More", arXiv 2504.14870).

The reward is multiplicative, `R = alpha * r_tool(m) * r_phi`, so a wrong answer earns nothing however
few tools it used (the paper found an additive penalty unstable: the model learns to stop calling
tools and answer wrong). `m` is the number of tool calls the trajectory made (every attempt, invalid
ones included: they cost a round trip too). `r_phi` is the base reward: `"correct"` reads its
correctness (1/0), `"total"` its scalar reward (correctness plus, e.g., a format bonus).

- OTC-PPO: `r_tool = cos(m pi / (2m + c))`, decaying with every call; c is the smoothing constant
  (the tool-call limit in the paper's settings).
- OTC-GRPO: `n` = the fewest calls among the group's correct rollouts, kept per question across the
  whole run (replaced only by a smaller one: "more stable"), and
  `f(m, n) = 0 if m = n = 0; m if n = 0; 2nm / (m + n) otherwise`,
  `r_tool = 1 if f = n = 0; cos(m pi / (2m + c)) if n = 0; sin(f(m, n) pi / (2n)) otherwise`,
  which peaks at m = n and decays for over- and under-calling. When no rollout of the question was
  ever correct, n is unknown and r_phi is 0 anyway (r_tool = 1 is used).
"""

from __future__ import annotations

import math
from typing import Literal

from tirl.rewards.base import REWARDS, GroupContext, RewardResult, RewardSpec, call_reward
from tirl.tasks.base import Problem
from tirl.types import Trajectory

_STATE_KEY = "otc_grpo_min_calls"


def tool_calls(trajectory: Trajectory) -> int:
    """m: the tool calls a trajectory made (every attempt, failed ones included)."""
    return len(trajectory.tool_results)


def otc_ppo_tool_reward(m: int, c: float) -> float:
    """`cos(m pi / (2m + c))`: 1 at m = 0, decreasing in m towards cos(pi/2) = 0."""
    _check_calls(m, c)
    return math.cos(m * math.pi / (2 * m + c))


def otc_f(m: int, n: int) -> float:
    """OTC-GRPO's map of m into [0, 2n): 0 if m = n = 0; m if n = 0; 2nm / (m + n) otherwise."""
    if m == 0 and n == 0:
        return 0.0
    if n == 0:
        return float(m)
    return 2.0 * n * m / (m + n)


def otc_grpo_tool_reward(m: int, n: int | None, c: float) -> float:
    """OTC-GRPO's r_tool for m calls when the fewest calls of a correct rollout is n (None: unknown -> 1)."""
    _check_calls(m, c)
    if n is None:
        return 1.0
    if n < 0:
        raise ValueError(f"OTC: the minimal number of tool calls n must be >= 0, got {n}")
    f = otc_f(m, n)
    if f == 0 and n == 0:
        return 1.0
    if n == 0:
        return math.cos(m * math.pi / (2 * m + c))
    return math.sin(f * math.pi / (2 * n))


def _check_calls(m: int, c: float) -> None:
    if m < 0:
        raise ValueError(f"OTC: the number of tool calls m must be >= 0, got {m}")
    if c <= 0:
        raise ValueError(f"OTC: the smoothing constant c must be > 0, got {c}")


async def _base(spec: RewardSpec, r_phi: str, trajectory: Trajectory, problem: Problem,
                group: GroupContext) -> tuple[float, RewardResult]:
    if r_phi not in ("correct", "total"):
        raise ValueError(f"OTC: r_phi must be 'correct' or 'total', got {r_phi!r}")
    result = await call_reward(spec, trajectory, problem, group)
    if r_phi == "total":
        return result.total, result
    if result.correct is None:
        raise ValueError(f"OTC: r_phi='correct' but the base reward {spec!r} does not say whether an answer "
                         "is correct; use r_phi='total' or another base")
    return float(result.correct), result


def _result(alpha: float, r_tool: float, r_phi: float, m: int, base: RewardResult, **extra: float) -> RewardResult:
    components = {"r_tool": r_tool, "r_phi": r_phi, "tool_calls": float(m), **extra}
    return RewardResult(total=alpha * r_tool * r_phi, components=components, correct=base.correct)


@REWARDS.register("otc_ppo")
async def otc_ppo(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                  c: float = 3.0, alpha: float = 1.0, r_phi: Literal["correct", "total"] = "total") -> RewardResult:
    """OTC-PPO (Wang et al. 2025): alpha * cos(m pi / (2m + c)) * base reward; fewer tool calls pay more."""
    value, result = await _base(base, r_phi, trajectory, problem, group)
    m = tool_calls(trajectory)
    return _result(alpha, otc_ppo_tool_reward(m, c), value, m, result)


@REWARDS.register("otc_grpo")
async def otc_grpo(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                   c: float = 3.0, alpha: float = 1.0, r_phi: Literal["correct", "total"] = "total") -> RewardResult:
    """OTC-GRPO (Wang et al. 2025): alpha * sin(f(m,n) pi / 2n) * base reward, n = fewest calls of a correct rollout."""
    value, result = await _base(base, r_phi, trajectory, problem, group)
    n = await _min_correct_calls(base, problem, group)
    m = tool_calls(trajectory)
    extra = {"otc_n": float(n)} if n is not None else {}
    return _result(alpha, otc_grpo_tool_reward(m, n, c), value, m, result, **extra)


async def _min_correct_calls(base: RewardSpec, problem: Problem, group: GroupContext) -> int | None:
    """n for this question: min over the group's correct rollouts, merged with the run's record.

    The record (`group.state`, saved in checkpoints) is updated in training only; in evaluation the
    record, where there is one, is combined with the evaluated group's own minimum."""
    local = None
    for t in group.trajectories:  # G base calls per trajectory: cheap for answer checks
        correct = (await call_reward(base, t, problem, group)).correct
        if correct is None:
            raise ValueError(f"OTC-GRPO: the base reward {base!r} does not say whether an answer is correct, "
                             "so the fewest calls of a correct rollout is unknown")
        if correct:
            local = tool_calls(t) if local is None else min(local, tool_calls(t))
    record = group.state.setdefault(_STATE_KEY, {}) if group.training else dict(group.state.get(_STATE_KEY, {}))
    known = record.get(problem.id)
    best = min(x for x in (local, known) if x is not None) if local is not None or known is not None else None
    if best is not None and group.training:
        record[problem.id] = best
    return best
