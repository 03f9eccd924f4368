"""Math answers checked with math-verify (symbolic equivalence), and the `math_verify` reward.

The model's answer is read with `tirl.rewards.qa.read_answer` (the last `<answer>...</answer>`, else
the last `\\boxed{}`, with a box inside the tag unwrapped) and handed to math-verify as
`\\boxed{<answer>}`, so `0.75`, `3/4` and `\\frac{6}{8}` all match a gold `\\frac{3}{4}`.

Failure policy: model output is data, so a prediction math-verify cannot parse, or whose parsing or
comparison times out or raises, scores as wrong. A gold answer it cannot parse is a task bug: that
raises ValueError naming the problem. math-verify's timeouts use SIGALRM, which exists only on the
main thread; off it (a reward run in a worker thread) the checks run without a time limit.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.qa import read_answer
from tirl.tasks.base import Problem
from tirl.types import Trajectory

TIMEOUT_S = 5
"""Seconds math-verify may spend parsing or comparing one answer (main thread only)."""


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _as_latex(answer: str) -> str:
    """The text math-verify parses: the answer in a `\\boxed{}` unless it already holds math markup."""
    return answer if ("\\boxed" in answer or "$" in answer) else f"\\boxed{{{answer}}}"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple[Any, ...]:
    from math_verify import parse

    return tuple(parse(_as_latex(gold), parsing_timeout=_timeout()))


def parse_gold(gold: str, problem_id: str = "?") -> list[Any]:
    """math-verify's parse of a gold answer (cached per gold string); ValueError naming the problem if it fails."""
    from math_verify.errors import TimeoutException

    try:
        parsed = _parse_gold(gold) if gold.strip() else ()
    except (Exception, TimeoutException) as e:  # a gold answer is canonical: any failure is a task bug
        raise ValueError(f"problem {problem_id!r}: math-verify cannot parse the gold answer {gold!r}: {e!r}") from e
    if all(isinstance(x, str) for x in parsed):  # nothing, or only math-verify's raw-string fallback
        raise ValueError(f"problem {problem_id!r}: math-verify cannot parse the gold answer {gold!r}")
    return list(parsed)


def math_equal(prediction: str | None, gold: str, problem_id: str = "?") -> bool:
    """Whether the predicted answer text is mathematically equal to the gold answer (math-verify).

    None, unparseable predictions, timeouts and math-verify errors on the prediction give False; an
    unparseable gold raises ValueError."""
    gold_parsed = parse_gold(gold, problem_id)
    if prediction is None or not prediction.strip():
        return False
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        pred_parsed = parse(_as_latex(prediction), parsing_timeout=_timeout())
        return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=_timeout()))
    except (Exception, TimeoutException):  # model output: a timeout (a BaseException) or a crash is a wrong answer
        return False


@REWARDS.register("math_verify")
def math_verify_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                       format_bonus: float = 0.0) -> RewardResult:
    """Math answer checked by math-verify: 1.0 if the <answer>/\\boxed{} is equivalent to the gold, plus format_bonus.

    `format_bonus` is paid when the final text holds a non-empty tagged or boxed answer. A trajectory
    that did not end by answering scores 0; an unparseable gold answer raises."""
    answer = read_answer(trajectory.final_answer)
    correct = math_equal(answer, problem.answer, problem.id)
    fmt = format_bonus if answer else 0.0
    components = {"correct": 1.0 if correct else 0.0, "format": fmt}
    return RewardResult(total=sum(components.values()), components=components, correct=correct)
