"""Reading a numeric final answer out of model text, and the `arithmetic` reward.

Contract of the answer format: the model ends with `<answer>NUMBER</answer>` (or, as a fallback,
`\\boxed{NUMBER}`). `extract_answer` finds the tagged text, `parse_number` reads exactly one number
from it (or refuses), and `answers_match` compares numbers exactly as `Fraction`s, so "178,377",
"178377.0" and "$178377" all match the gold "178377", while "about 5 or 6" matches nothing.
"""

from __future__ import annotations

import re
from fractions import Fraction

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.tasks.base import Problem
from tirl.types import Trajectory

FORMAT_BONUS = 0.1
"""Reward component `format`: paid when the final text tags a parseable number."""

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
_BOXED = "\\boxed{"

_NUMBER_RE = re.compile(
    r"""
    (?P<sign>[+-]?) \s* (?P<currency>\$?) \s* (?P<sign2>[+-]?)
    (?P<num> (?:\d{1,3}(?:,\d{3})+ | \d+) (?:\.\d+)? | \.\d+ )
    (?: \s* / \s* (?P<den>\d+) )?
    \.?                                   # a sentence's closing period
    (?: \s+ [A-Za-z][A-Za-z\s]*? \.? )?   # a units word or two: "178377 apples."
    """,
    re.VERBOSE,
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\{\s*([^{}]*?)\s*\}\{\s*([^{}]*?)\s*\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|mathrm|textrm)\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>`; else of the last balanced `\\boxed{...}`.

    None when the text holds neither. An empty tag gives "" (present, but holds no number).
    """
    end = text.rfind(_ANSWER_CLOSE)
    if end >= 0:
        start = text.rfind(_ANSWER_OPEN, 0, end)
        if start >= 0:
            return text[start + len(_ANSWER_OPEN):end].strip()
    return _last_boxed(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close; None if there is none."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, pos = 1, start + len(_BOXED)
        while pos < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        if depth == 0:
            return text[start + len(_BOXED):pos - 1].strip()
        start = text.rfind(_BOXED, 0, start)
    return None


def _normalise_latex(text: str) -> str:
    """Rewrite the LaTeX a model may put around a number into plain text."""
    text = text.strip()
    for wrapper in (("\\(", "\\)"), ("\\[", "\\]")):
        if text.startswith(wrapper[0]) and text.endswith(wrapper[1]):
            text = text[len(wrapper[0]):-len(wrapper[1])].strip()
    if len(text) > 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()  # inline math "$1234$", not a price
    text = _LATEX_TEXT_RE.sub(r" \1", text)
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    replacements = {"\\$": "$", "{,}": ",", "\\,": ",", "\\!": "", "\\ ": " ", "\u2212": "-", "\\left": "",
                    "\\right": ""}
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text.strip()


def parse_number(text: str) -> Fraction | None:
    """The single number written in `text`, exactly; None when no single number can be read.

    Accepts an optional sign and `$`, an integer with valid thousands separators ("178,377", not
    "17,8377"), a decimal ("2.5", "178377.0"), a fraction ("3/4"), a closing period, trailing unit
    words ("178377 apples"), and LaTeX such as `\\$1{,}234` or `\\frac{3}{4}`. Refuses anything with
    leading words, two numbers, percent signs or exponents.
    """
    match = _NUMBER_RE.fullmatch(_normalise_latex(text))
    if match is None or (match["sign"] and match["sign2"]):
        return None
    sign = -1 if "-" in (match["sign"] + match["sign2"]) else 1
    numerator = Fraction(match["num"].replace(",", ""))
    if match["den"] is None:
        return sign * numerator
    if numerator.denominator != 1 or int(match["den"]) == 0:
        return None  # "1.5/2" and "3/0" are not numbers we read
    return sign * numerator / int(match["den"])


def answers_match(pred: str | None, gold: str) -> bool:
    """Whether the predicted answer text is numerically equal to the gold answer.

    `pred` is the extracted answer (None or unparseable -> False). `gold` is canonical: a gold
    answer that cannot be parsed is a task bug and raises ValueError.
    """
    gold_value = parse_number(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    if pred is None:
        return False
    pred_value = parse_number(pred)
    return pred_value is not None and pred_value == gold_value


@REWARDS.register("arithmetic")
def arithmetic_reward(trajectory: Trajectory, problem: Problem, group: GroupContext) -> RewardResult:
    """Exact numeric answer match (1.0) plus 0.1 for a tagged, parseable <answer>number</answer>.

    Reads `trajectory.final_answer`; a trajectory that did not end by answering (None) scores 0.
    Correctness needs the tag: a bare number in the text is not read.
    """
    text = trajectory.final_answer
    extracted = extract_answer(text) if text is not None else None
    correct = answers_match(extracted, problem.answer)
    well_formed = extracted is not None and parse_number(extracted) is not None
    components = {"correct": 1.0 if correct else 0.0, "format": FORMAT_BONUS if well_formed else 0.0}
    return RewardResult(total=sum(components.values()), components=components, correct=correct)
