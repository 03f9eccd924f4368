"""Reward functions, registered in `REWARDS` by name; importing this package registers the built-ins."""

from tirl.rewards import answer, otc
from tirl.rewards import etagent, format, irm, math, qa, toolrl, toolstar  # noqa: F401  (registers them)
from tirl.rewards import calibration, compose, judge, shaping  # noqa: F401  (registers them)
from tirl.rewards import matchtir  # noqa: F401  (registers it)
from tirl.rewards.answer import answers_match, extract_answer, parse_number
from tirl.rewards.base import REWARDS, GroupContext, RewardFn, RewardResult, score

__all__ = [
    "REWARDS",
    "GroupContext",
    "RewardFn",
    "RewardResult",
    "answer",
    "otc",
    "answers_match",
    "extract_answer",
    "parse_number",
    "score",
]
