"""Calibration rewards: accuracy plus a term for the verbalised confidence q in [0, 1].

The model states its confidence in its final message, `<confidence>0.8</confidence>` (also
`<confidence>80%</confidence>`); without the tag, a line `Confidence: 0.8` is read. A plain number
must lie in [0, 1] and a percentage in [0, 100]; anything else (no confidence, "high", "80" without
%, two numbers) is unparseable. Correctness c = 1[correct] comes from a `base` reward (default: the
task's own), which must know it.

Rewards (reference 3.4, Confidence Dichotomy / CAR):

- `rlcr_brier` (RLCR): R = c - (q - c)^2.
- `mscr` (margin-separated calibration reward): R = 1 + lambda (1 - (1 - q)^2) if correct, else
  -delta - lambda q^2, so every correct answer scores above every wrong one.

A missing or unparseable confidence is scored as the worst confidence for the outcome, q = 1 - c
(confident when wrong, unconfident when right), minus `missing_penalty`, and counted in the component
`confidence_missing`: staying silent never pays more than stating any confidence. Components:
`correct` (c), `calibration` (R minus the accuracy part), `confidence_missing` (1/0), `confidence`
(q, only when one was read), and the base reward's as `base.<k>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from tirl.rewards.base import REWARDS, GroupContext, RewardResult, RewardSpec, call_reward
from tirl.rewards.compose import known_correct, prefixed
from tirl.tasks.base import Problem
from tirl.types import Trajectory

_NUMBER = r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(%?)"
_LINE_RE = re.compile(r"(?im)^[\W_]*confidence[\s*_]*[:=][\s*_]*" + _NUMBER + r"[\s*_.]*$")


def read_confidence(text: str | None, tag: str = "confidence") -> float | None:
    """The confidence q in [0, 1] stated in `text`: the last `<tag>q</tag>`, else the last line
    `Confidence: q`; a percentage is divided by 100. None when absent or unparseable."""
    if not text:
        return None
    tags = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    if tags:
        match = re.fullmatch(r"\s*" + _NUMBER + r"\s*", tags[-1])
    else:
        lines = _LINE_RE.findall(text)
        match = None if not lines else re.fullmatch(_NUMBER, "".join(lines[-1]))
    if match is None:
        return None
    value, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        return value / 100 if 0 <= value <= 100 else None
    return value if 0 <= value <= 1 else None


def brier_reward(correct: bool, q: float) -> float:
    """RLCR: c - (q - c)^2 with c = 1[correct]."""
    c = 1.0 if correct else 0.0
    return c - (q - c) ** 2


def mscr_reward(correct: bool, q: float, lam: float = 0.5, delta: float = 0.1) -> float:
    """MSCR: 1 + lam (1 - (1 - q)^2) if correct, else -delta - lam q^2.

    Correct answers score in [1, 1 + lam], wrong ones in [-delta - lam, -delta]; the expected reward
    under P(correct) = p is maximised at q = p.
    """
    if correct:
        return 1.0 + lam * (1.0 - (1.0 - q) ** 2)
    return -delta - lam * q ** 2


async def _calibrated(trajectory: Trajectory, problem: Problem, group: GroupContext, base: RewardSpec,
                      rule: Callable[[bool, float], float], accuracy: Callable[[bool], float], tag: str,
                      missing_penalty: float, who: str) -> RewardResult:
    """Score with `rule(correct, q)`; `accuracy(correct)` is the part reported as `correct`."""
    base_result = await call_reward(base, trajectory, problem, group)
    correct = known_correct(base_result, base, who)
    q = read_confidence(trajectory.final_answer, tag)
    missing = q is None
    total = rule(correct, 0.0 if correct else 1.0) - missing_penalty if missing else rule(correct, q)
    components = {"correct": accuracy(correct), "calibration": total - accuracy(correct),
                  "confidence_missing": float(missing)}
    if not missing:
        components["confidence"] = q
    components.update(prefixed(base_result.components, "base"))
    return RewardResult(total, components, correct)


@REWARDS.register("rlcr_brier")
async def rlcr_brier(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
                     tag: str = "confidence", missing_penalty: float = 0.1) -> RewardResult:
    """RLCR calibration reward: R = c - (q - c)^2, c = correct (from `base`), q = stated <confidence>.

    A missing confidence scores as q = 1 - c, minus `missing_penalty` (component `confidence_missing`).
    """
    return await _calibrated(trajectory, problem, group, base, brier_reward, lambda c: float(c), tag,
                             missing_penalty, "rlcr_brier")


@REWARDS.register("mscr")
async def mscr(trajectory: Trajectory, problem: Problem, group: GroupContext, *, base: RewardSpec = "task",
               lam: float = 0.5, delta: float = 0.1, tag: str = "confidence",
               missing_penalty: float = 0.1) -> RewardResult:
    """CAR margin-separated calibration: R = 1 + lam(1-(1-q)^2) if correct, else -delta - lam q^2.

    `lam` = lambda (0.5), `delta` the margin (0.1). A missing confidence scores as q = 1 - c, minus
    `missing_penalty` (component `confidence_missing`).
    """
    if lam < 0 or delta < 0:
        raise ValueError(f"mscr: lam and delta must be >= 0 (got lam={lam}, delta={delta})")
    return await _calibrated(trajectory, problem, group, base, lambda c, q: mscr_reward(c, q, lam, delta),
                             lambda c: 1.0 if c else -delta, tag, missing_penalty, "mscr")
