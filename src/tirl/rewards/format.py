"""Format rewards: the answer in its tag exactly once (`format_tags`), and tool calls that ran (`tool_call_validity`).

Both score the trajectory's structure, not its correctness; combine them with an answer reward in a
weighted sum. Helpers here are shared by the paper rewards (ToolRL, Tool-Star, ET-Agent).
"""

from __future__ import annotations

from collections.abc import Sequence

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.tasks.base import Problem
from tirl.types import ToolStatus, Trajectory


def assistant_text(trajectory: Trajectory) -> str:
    """Everything the policy wrote: the turns' texts joined by newlines (tool outputs excluded).

    A trajectory without turns (a bare answer) gives its `final_answer` (or "")."""
    if not trajectory.turns:
        return trajectory.final_answer or ""
    return "\n".join(t.text for t in trajectory.turns)


def unparsed_attempts(trajectory: Trajectory) -> int:
    """Call attempts the parser could not read: results no `ToolCall` of their turn answers (status
    `invalid_call`, or `budget_exceeded` for an unreadable call past the budget)."""
    return sum(r.call_id not in {c.id for c in t.tool_calls} for t in trajectory.turns for r in t.tool_results)


def tag_count(text: str, tag: str) -> tuple[int, int]:
    """(number of `<tag>`, number of `</tag>`) in `text`."""
    return text.count(f"<{tag}>"), text.count(f"</{tag}>")


def single_tag_block(text: str, tag: str) -> bool:
    """Whether `text` holds exactly one `<tag>` and one `</tag>`, the opening one first."""
    opens, closes = tag_count(text, tag)
    return opens == closes == 1 and text.find(f"<{tag}>") < text.find(f"</{tag}>")


def think_paired(text: str) -> bool:
    """Whether `<think>` and `</think>` are equally many, at least one, and each closes an open one."""
    depth = 0
    pos = 0
    while True:
        o, c = text.find("<think>", pos), text.find("</think>", pos)
        if c < 0:
            return depth == 0 and o < 0 and pos > 0
        if 0 <= o < c:
            depth, pos = depth + 1, o + len("<think>")
            if depth > 1:
                return False
        else:
            depth, pos = depth - 1, c + len("</think>")
            if depth < 0:
                return False


def check_statuses(statuses: Sequence[str], what: str) -> frozenset[ToolStatus]:
    """The `ToolStatus`es named in `statuses`; ValueError listing the valid names for an unknown one."""
    valid = [s.value for s in ToolStatus]
    if isinstance(statuses, str):
        raise ValueError(f"{what} must be a list of tool statuses, got the string {statuses!r}")
    bad = [s for s in statuses if s not in valid]
    if bad:
        raise ValueError(f"{what}: unknown tool status {bad[0]!r}; valid: {', '.join(valid)}")
    return frozenset(ToolStatus(s) for s in statuses)


@REWARDS.register("format_tags")
def format_tags_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, tag: str = "answer",
                       require_think: bool = False, reward: float = 1.0, penalty: float = 0.0) -> RewardResult:
    """Format check: `reward` if the final answer holds one <tag>...</tag> (optionally paired <think>), else `penalty`.

    With `require_think`, every turn's text must hold at least one `<think>...</think>` pair, the tags
    balanced and not nested. A trajectory that did not end by answering gets `penalty`."""
    if not tag or "<" in tag or ">" in tag:
        raise ValueError(f"format_tags: tag must be a bare tag name such as 'answer', got {tag!r}")
    final = trajectory.final_answer
    ok = final is not None and single_tag_block(final, tag)
    think_ok = all(think_paired(t.text) for t in trajectory.turns) if trajectory.turns else \
        (final is not None and think_paired(final))
    if require_think:
        ok = ok and think_ok
    value = reward if ok else penalty
    return RewardResult(total=value, components={"format": value}, correct=None)


@REWARDS.register("tool_call_validity")
def tool_call_validity_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                              ok_statuses: Sequence[str] = ("ok", "output_truncated"), weight: float = 1.0,
                              no_calls: float = 0.0) -> RewardResult:
    """Tool-call success rate: weight * (#calls whose status is in ok_statuses) / (#call attempts); no_calls if none.

    Every attempt counts, unparseable ones (`invalid_call`) and calls past the budget included."""
    good = check_statuses(ok_statuses, "tool_call_validity: ok_statuses")
    results = trajectory.tool_results
    if not results:
        return RewardResult(total=no_calls, components={"tool_validity": no_calls, "tool_calls": 0.0})
    rate = sum(r.status in good for r in results) / len(results)
    return RewardResult(total=weight * rate, components={"tool_validity": weight * rate,
                                                         "tool_calls": float(len(results))})
