"""Tool-Star hierarchical reward (Dong et al. 2025, arXiv 2505.16410): format gate, accuracy, multi-tool bonus.

    QA / math_calling:  R = -1 if the format is invalid
                        R = acc + 0.1 if acc > 0 and every tool of `multi_tools` was called
                        R = acc if acc > 0, else 0
    math (the released math reward):  R = 0 if the format is invalid or the trajectory ran over
                        length; 1.0 if correct; 0.1 if formatted but wrong

`acc` is token F1 (QA, max over gold aliases) or math-verify equivalence (1/0) of the content of
the last `\\boxed{}` inside the single `<answer>...</answer>`.

Format validity, mapped from the paper's single text onto tirl's turns: the policy's text (all turns
joined) has as many `<think>` as `</think>` and at least one; exactly one `<answer>` and one
`</answer>`, the opening first; a closed `\\boxed{...}` inside the answer. The paper's "every
`<search>`/`<python>` is followed by its `<result>`" is, in tirl, "every call attempt was parsed": the
env answers each parsed call, and an attempt it could not parse (`format.unparsed_attempts`) is the
paper's incomplete tag. "Both `</search>` and `</python>` in the response" becomes "every tool named
in `multi_tools` was called at least once" (default: `search` and `python`). "Over length" is a
trajectory that did not end by answering (turn, token or context limit).
"""

from __future__ import annotations

from collections.abc import Sequence

from tirl.rewards.answer import extract_answer
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.format import assistant_text, tag_count, unparsed_attempts
from tirl.rewards.math import math_equal
from tirl.rewards.qa import exact_match, gold_answers, token_f1
from tirl.tasks.base import Problem
from tirl.types import Trajectory

VARIANTS = ("qa", "math", "math_calling")
"""`qa`: token F1 in the hierarchy; `math`: the released math reward (1 / 0.1 / 0); `math_calling`:
math-verify correctness in the QA hierarchy."""

MULTI_TOOL_BONUS = 0.1
"""r_M: paid on top of a positive accuracy when the trajectory used every tool of `multi_tools`."""


def format_error(trajectory: Trajectory) -> str | None:
    """Why the trajectory breaks Tool-Star's format (see the module docstring), or None when it is valid."""
    text = assistant_text(trajectory)
    opens, closes = tag_count(text, "think")
    if opens != closes:
        return "<think> </think> not paired"
    if opens == 0:
        return "<think> or </think> not found"
    if tag_count(text, "answer") != (1, 1):
        return "not exactly one <answer> and one </answer>"
    start, end = text.find("<answer>"), text.find("</answer>")
    if start > end:
        return "</answer> before <answer>"
    if unparsed_attempts(trajectory):
        return "a tool call could not be parsed"
    if boxed_answer(text) is None:
        return "answer is missing \\boxed{}"
    return None


def boxed_answer(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` inside the first `<answer>...</answer>` of `text`; None if absent."""
    start, end = text.find("<answer>"), text.find("</answer>")
    if start < 0 or end < start:
        return None
    return extract_answer(text[start + len("<answer>"):end])


def used_tools(trajectory: Trajectory) -> set[str]:
    """Names of the tools the trajectory called (parsed calls)."""
    return {c.name for t in trajectory.turns for c in t.tool_calls}


def toolstar_hierarchy(format_valid: bool, acc: float, multi_tool: bool) -> float:
    """Tool-Star's QA hierarchy: -1 bad format; acc + 0.1 if acc > 0 and multi-tool; acc if acc > 0; else 0."""
    if not format_valid:
        return -1.0
    if acc > 0:
        return acc + MULTI_TOOL_BONUS if multi_tool else acc
    return 0.0


def toolstar_math(format_valid: bool, answered: bool, correct: bool) -> float:
    """Tool-Star's released math reward: 0 if the format is invalid or over length; 1.0 if correct; else 0.1."""
    if not format_valid or not answered:
        return 0.0
    return 1.0 if correct else 0.1


@REWARDS.register("toolstar")
def toolstar_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, variant: str = "qa",
                    multi_tools: Sequence[str] = ("search", "python")) -> RewardResult:
    """Tool-Star (Dong et al. 2025): -1 bad format; else F1 (QA) or math-verify accuracy, +0.1 if all multi_tools used.

    Variants: `qa` (token F1), `math` (the released math reward: 1 correct, 0.1 formatted but wrong, 0
    bad format or over length), `math_calling` (math accuracy in the QA hierarchy). `correct` is an
    exact match (QA) or math-verify equivalence (math) of the boxed answer."""
    if variant not in VARIANTS:
        raise ValueError(f"toolstar: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    if isinstance(multi_tools, str) or not multi_tools:
        raise ValueError(f"toolstar: multi_tools must be a non-empty list of tool names, got {multi_tools!r}")
    error = format_error(trajectory)
    answer = boxed_answer(assistant_text(trajectory)) if error is None else None
    if variant == "qa":
        golds = gold_answers(problem)
        acc = token_f1(answer, golds) if answer is not None else 0.0
        correct = answer is not None and exact_match(answer, golds) == 1.0
    else:
        correct = math_equal(answer, problem.answer, problem.id)
        acc = 1.0 if correct else 0.0
    multi = set(multi_tools) <= used_tools(trajectory)
    if variant == "math":
        total = toolstar_math(error is None, trajectory.final_answer is not None, correct)
    else:
        total = toolstar_hierarchy(error is None, acc, multi)
    components = {"accuracy": acc, "format_valid": 1.0 if error is None else 0.0, "multi_tool": float(multi)}
    return RewardResult(total=total, components=components, correct=correct)
