"""ET-Agent behaviour calibration (arXiv 2601.06860): correctness scaled by tool-use and length factors of the group.

    raw      = token F1 (QA) or math-verify equivalence (math, 0/1)
    tc_i     = tool calls of rollout i;  z_i = z-score of rollout i's length within the group
               (population standard deviation; all z are 0 when every length is equal)
    f_tool   = 2 / (1 + exp(sigma_tool * (tc - mean_group(tc))))
    f_length = 2 / (1 + exp(sigma_len  * (z  - mean_group(z))))
    R        = raw * f_tool * f_length + (-1 if the format is invalid else 0)

Both factors are 1 at the group mean, above 1 (up to 2) for fewer calls or a shorter response, below
1 for more. The released stage scripts set both sigmas to 0 (correctness and format only).

Mapping onto tirl: `tc` counts the parsed tool calls (the paper's paired `<search>`/`<python>` tags);
the length is the number of tokens the policy sampled (`Trajectory.num_sampled_tokens`); the format
check is Tool-Star's (`tirl.rewards.toolstar.format_error`: paired think tags, one `<answer>` with a
`\\boxed{}`, every call parsed). The QA answer is the last `\\boxed{}` inside `<answer>`; the math
answer is the last `\\boxed{}` of the policy's text, read only when an `<answer>` tag is present.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tirl.rewards.answer import extract_answer
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.format import assistant_text
from tirl.rewards.math import math_equal
from tirl.rewards.qa import exact_match, gold_answers, token_f1
from tirl.rewards.toolstar import boxed_answer, format_error
from tirl.tasks.base import Problem
from tirl.types import Trajectory

BASES = ("f1", "math")
"""Answer checks: token F1 against the gold aliases, or math-verify equivalence."""


def calibration_factor(value: float, group_mean: float, sigma: float) -> float:
    """`2 / (1 + exp(sigma * (value - group_mean)))`: 1 at the mean, in (0, 2), decreasing in value for sigma > 0."""
    return 2.0 / (1.0 + math.exp(sigma * (value - group_mean)))


def zscores(values_G: Sequence[float]) -> list[float]:
    """`(x - mean) / std` with the population std (divide by G); all 0 when the std is 0."""
    if not values_G:
        raise ValueError("zscores: no values")
    mean = sum(values_G) / len(values_G)
    std = math.sqrt(sum((x - mean) ** 2 for x in values_G) / len(values_G))
    return [0.0] * len(values_G) if std == 0 else [(x - mean) / std for x in values_G]


def tool_call_count(trajectory: Trajectory) -> int:
    """tc: the parsed tool calls of the trajectory."""
    return sum(len(t.tool_calls) for t in trajectory.turns)


def _index_in_group(trajectory: Trajectory, group: GroupContext) -> int:
    for i, t in enumerate(group.trajectories):
        if t is trajectory:
            return i
    for i, t in enumerate(group.trajectories):
        if t == trajectory:
            return i
    raise ValueError(f"etagent: the scored trajectory (task {trajectory.meta.task_id!r}, sample "
                     f"{trajectory.meta.sample_index}) is not in group.trajectories; ET-Agent compares it with "
                     "its group")


def _raw_score(text: str, problem: Problem, base: str) -> tuple[float, bool]:
    """(raw correctness, exact) of the policy's text; 0 without a closed <answer>...</answer> or a box."""
    start = text.find("<answer>")
    if start < 0 or text.find("</answer>", start) < 0:
        return 0.0, False
    if base == "f1":
        answer = boxed_answer(text)
        if answer is None:
            return 0.0, False
        golds = gold_answers(problem)
        return token_f1(answer, golds), exact_match(answer, golds) == 1.0
    # math: the last \boxed{} anywhere (extract_answer falls back to it once the answer tags are gone)
    answer = extract_answer(text.replace("<answer>", "").replace("</answer>", ""))
    correct = math_equal(answer, problem.answer, problem.id)
    return (1.0 if correct else 0.0), correct


@REWARDS.register("etagent")
def etagent_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, sigma_tool: float = 0.2,
                   sigma_len: float = 0.5, base: str = "f1") -> RewardResult:
    """ET-Agent (2026): raw * 2/(1+e^{sigma_tool(tc-mean tc)}) * 2/(1+e^{sigma_len(z_len-mean z)}) - 1 if bad format.

    Group-aware: tool counts and length z-scores come from `group.trajectories`, which must hold the
    scored trajectory. `base`: "f1" (QA token F1) or "math" (math-verify). `correct` is the exact
    match (f1) or the math-verify verdict (math)."""
    if base not in BASES:
        raise ValueError(f"etagent: unknown base {base!r}; valid: {', '.join(BASES)}")
    if sigma_tool < 0 or sigma_len < 0:
        raise ValueError(f"etagent: sigmas must be >= 0, got sigma_tool={sigma_tool}, sigma_len={sigma_len}")
    index = _index_in_group(trajectory, group)
    calls_G = [tool_call_count(t) for t in group.trajectories]
    z_G = zscores([float(t.num_sampled_tokens) for t in group.trajectories])
    f_tool = calibration_factor(calls_G[index], sum(calls_G) / len(calls_G), sigma_tool)
    f_length = calibration_factor(z_G[index], sum(z_G) / len(z_G), sigma_len)
    text = assistant_text(trajectory)
    raw, correct = _raw_score(text, problem, base)
    fmt = -1.0 if format_error(trajectory) is not None else 0.0
    components = {"raw": raw, "f_tool": f_tool, "f_length": f_length, "format": fmt,
                  "tool_calls": float(calls_G[index])}
    return RewardResult(total=raw * f_tool * f_length + fmt, components=components, correct=correct)
