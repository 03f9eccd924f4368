"""Open-domain QA answer checks (SQuAD normalisation, exact match, token F1) and the `qa_em` / `qa_f1` rewards.

Normalisation (SQuAD v1.1 evaluation script): lowercase, drop ASCII punctuation, drop the articles
"a", "an", "the", collapse whitespace. `exact_match` is 1 when the normalised prediction equals a
normalised gold answer; `token_f1` is `2PR / (P + R)` over the multiset of normalised tokens (P =
common / predicted tokens, R = common / gold tokens), the maximum over the gold answers.

Gold answers are `problem.answer` plus the aliases in `problem.info["answers"]` (a list of strings),
when present. The model's answer is read with `read_answer`: the content of the last
`<answer>...</answer>` (else of the last `\\boxed{}`), with a `\\boxed{}` inside the tag unwrapped.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from tirl.rewards.answer import extract_answer
from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.tasks.base import Problem
from tirl.types import Trajectory

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return 1.0 if any(pred == normalize_answer(g) for g in _check_golds(golds)) else 0.0


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """max over gold answers of the token F1 `2PR / (P + R)` of the normalised texts.

    When either side has no tokens after normalisation, F1 is 1.0 if both are empty, else 0.0
    (the SQuAD v2 convention)."""
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1(pred_tokens, normalize_answer(g).split()) for g in _check_golds(golds))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return 1.0 if pred_tokens == gold_tokens else 0.0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _check_golds(golds: Sequence[str]) -> Sequence[str]:
    if isinstance(golds, str) or not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"gold answers must be a non-empty list of strings, got {golds!r}")
    return golds


def gold_answers(problem: Problem) -> list[str]:
    """`problem.answer` plus the aliases in `problem.info["answers"]` (duplicates and blanks dropped).

    Raises ValueError naming the problem when `info["answers"]` is not a list of strings or when no
    non-blank gold answer is left."""
    aliases = problem.info.get("answers", [])
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)) or \
            not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"problem {problem.id!r}: info['answers'] must be a list of strings, got {aliases!r}")
    golds = list(dict.fromkeys(a for a in (problem.answer, *aliases) if a.strip()))
    if not golds:
        raise ValueError(f"problem {problem.id!r} has no gold answer (answer and info['answers'] are empty)")
    return golds


def read_answer(text: str | None) -> str | None:
    """The model's answer: `extract_answer`'s text with a `\\boxed{...}` inside it unwrapped.

    `"<answer>\\boxed{Paris}</answer>"` -> `"Paris"`; `"<answer>Paris</answer>"` -> `"Paris"`;
    None when `text` is None or holds neither tag nor box."""
    if text is None:
        return None
    extracted = extract_answer(text)
    if extracted is None:
        return None
    boxed = extract_answer(extracted)  # no closing answer tag inside: finds the last balanced \boxed{}
    return boxed if boxed is not None else extracted


def _qa_result(trajectory: Trajectory, problem: Problem, metric: str, format_bonus: float) -> RewardResult:
    golds = gold_answers(problem)
    answer = read_answer(trajectory.final_answer)
    em = exact_match(answer, golds) if answer is not None else 0.0
    score = em if metric == "em" else (token_f1(answer, golds) if answer is not None else 0.0)
    fmt = format_bonus if answer else 0.0
    return RewardResult(total=score + fmt, components={metric: score, "format": fmt}, correct=em == 1.0)


@REWARDS.register("qa_em")
def qa_em_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                 format_bonus: float = 0.0) -> RewardResult:
    """QA exact match after SQuAD normalisation (1/0, max over gold aliases) of the <answer>, plus format_bonus.

    `format_bonus` is paid when the final text holds a non-empty tagged (or boxed) answer. A trajectory
    that did not end by answering scores 0. `correct` is the exact match."""
    return _qa_result(trajectory, problem, "em", format_bonus)


@REWARDS.register("qa_f1")
def qa_f1_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *,
                 format_bonus: float = 0.0) -> RewardResult:
    """QA token F1 = 2PR/(P+R) after SQuAD normalisation (max over gold aliases) of the <answer>, plus format_bonus.

    `format_bonus` is paid when the final text holds a non-empty tagged (or boxed) answer. A trajectory
    that did not end by answering scores 0. `correct` is the exact match (F1 is partial credit)."""
    return _qa_result(trajectory, problem, "f1", format_bonus)
