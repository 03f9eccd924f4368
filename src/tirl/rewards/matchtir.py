"""MatchTIR turn rewards (reference 4.6): predicted tool calls matched to gold calls, one reward per turn.

Call similarity (MatchTIR's `tool_similarity`), for a predicted call p and a gold call g:

    sim(p, g) = [1[name=] + 1[name=] * (match(keys_g, keys_p) + #{k in g : p[k] == g[k]})]
                / (1 + 1[name=] * (1 + |g.params|))

names compared case-insensitively; `match` is 1 for equal key lists, else the multiset Jaccard
`|L1 ∩ L2| / (|L1| + |L2| - |L1 ∩ L2|)` (0 when either is empty). An exact call scores 1, a wrong
name 0.

Every parsed call of the trajectory's non-answer turns is matched against all the gold calls
(one-to-one, as MatchTIR's code does over the whole trajectory) with the similarity matrix S (P x G):

- `km` mode: MatchTIR's "Hungarian" is a greedy assignment: pairs in decreasing S order (ties in row,
  then column order), a pair taken when both ends are free and S > 0. `hungarian=True` uses a true
  maximum-weight assignment (`scipy.optimize.linear_sum_assignment`) instead, keeping its pairs with
  S > 0. A matched call is rewarded S_ij, an unmatched one `unmatched_penalty` (0, as MatchTIR's KM
  reward).
- `ot` mode: the entropic optimal transport plan T between uniform marginals (1/P, 1/G) for the cost
  -S (Sinkhorn, regularisation `reg` = 0.1, as POT's `ot.sinkhorn`: at most 1000 iterations, stop at
  marginal error 1e-9); call i is rewarded `sum_j T_ij S_ij` (at most 1/P: the plan spreads mass 1/P
  per call). With no gold call every call gets `unmatched_penalty`.

Turn rewards: a turn whose text holds `<answer>...</answer>` gets the answer F1 against
`problem.answer`; another turn with calls gets the mean of its calls' rewards; any other turn 0.
Answer F1 follows MatchTIR: lowercase, every ASCII punctuation mark replaced by a space, whitespace
collapsed, then F1 of the *sets* of tokens. Gold calls come from `problem.info["gold_calls"]` (a list
of `{"name", "parameters"}` for the whole trajectory), else `problem.reference_calls`.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tirl.rewards.base import REWARDS, GroupContext, RewardResult
from tirl.rewards.toolrl import gold_calls
from tirl.tasks.base import Problem
from tirl.types import Trajectory

MODES = ("km", "ot")
"""Matching modes: `km` (one-to-one assignment) and `ot` (Sinkhorn transport plan)."""

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PUNCT_TABLE = str.maketrans({ch: " " for ch in string.punctuation})

Call = Mapping[str, Any]
"""A tool call as `{"name": str, "parameters": {...}}`."""


def match_score(list1: Sequence[Any], list2: Sequence[Any]) -> float:
    """1 for equal lists, else the multiset Jaccard `|L1 ∩ L2| / (|L1| + |L2| - |L1 ∩ L2|)`; 0 if one is empty."""
    if list(list1) == list(list2):
        return 1.0
    if not list1 or not list2:
        return 0.0
    common = sum((Counter(list1) & Counter(list2)).values())
    return common / (len(list1) + len(list2) - common)


def call_similarity(pred: Call, gold: Call) -> float:
    """`sim(p, g)` of the module docstring, in [0, 1]."""
    if str(pred["name"]).lower() != str(gold["name"]).lower():
        return 0.0
    pred_params, gold_params = pred.get("parameters", {}), gold.get("parameters", {})
    keys = match_score(list(gold_params), list(pred_params))
    values = sum(1.0 for k, v in gold_params.items() if k in pred_params and pred_params[k] == v)
    return (1.0 + keys + values) / (2.0 + len(gold_params))


def similarity_matrix(preds: Sequence[Call], golds: Sequence[Call]) -> np.ndarray:
    """`S[i, j] = sim(preds[i], golds[j])`, float64 `(P, G)`."""
    return np.array([[call_similarity(p, g) for g in golds] for p in preds], dtype=np.float64).reshape(
        len(preds), len(golds))


def greedy_assignment(scores: np.ndarray) -> list[int | None]:
    """MatchTIR's assignment: pairs by decreasing score (stable), taken when both ends are free and score > 0."""
    P, G = scores.shape
    pairs = sorted(((float(scores[i, j]), i, j) for i in range(P) for j in range(G)), key=lambda x: -x[0])
    assignment: list[int | None] = [None] * P
    taken: set[int] = set()
    for score, i, j in pairs:
        if assignment[i] is None and j not in taken and score > 0:
            assignment[i] = j
            taken.add(j)
    return assignment


def hungarian_assignment(scores: np.ndarray) -> list[int | None]:
    """Maximum-weight one-to-one assignment (scipy's `linear_sum_assignment`), pairs with score > 0 only."""
    try:
        from scipy.optimize import linear_sum_assignment  # lazy: scipy is only needed here
    except ImportError:
        raise ImportError("matchtir with hungarian=true needs scipy: pip install 'tirl[algos]' (or scipy)") from None

    assignment: list[int | None] = [None] * scores.shape[0]
    if scores.size:
        rows, cols = linear_sum_assignment(scores, maximize=True)
        for i, j in zip(rows, cols):
            if scores[i, j] > 0:
                assignment[int(i)] = int(j)
    return assignment


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def sinkhorn_plan(scores: np.ndarray, reg: float = 0.1, max_iter: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """Entropic OT plan `T = argmin <T, -S> - reg H(T)` with uniform marginals 1/P and 1/G, `(P, G)`.

    Sinkhorn iterations in the log domain (stable for small `reg`), stopped when the column marginals
    are within `tol` (L2), or after `max_iter` iterations, as POT's `ot.sinkhorn`.
    """
    if reg <= 0:
        raise ValueError(f"sinkhorn_plan: reg must be > 0, got {reg}")
    P, G = scores.shape
    log_k = scores / reg
    log_mu, log_nu = np.full(P, -np.log(P)), np.full(G, -np.log(G))
    log_u, log_v = np.zeros(P), np.zeros(G)
    for _ in range(max_iter):
        log_v = log_nu - _logsumexp(log_k + log_u[:, None], axis=0)
        log_u = log_mu - _logsumexp(log_k + log_v[None, :], axis=1)
        plan = np.exp(log_u[:, None] + log_k + log_v[None, :])
        if np.linalg.norm(plan.sum(axis=0) - np.exp(log_nu)) < tol:
            break
    return np.exp(log_u[:, None] + log_k + log_v[None, :])


def call_rewards(preds: Sequence[Call], golds: Sequence[Call], *, mode: str = "km", hungarian: bool = False,
                 unmatched_penalty: float = 0.0, reg: float = 0.1) -> list[float]:
    """One reward per predicted call (module docstring: `km` or `ot` mode)."""
    if mode not in MODES:
        raise ValueError(f"matchtir: unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not preds:
        return []
    if not golds:
        return [float(unmatched_penalty)] * len(preds)
    scores = similarity_matrix(preds, golds)
    if mode == "ot":
        return (sinkhorn_plan(scores, reg) * scores).sum(axis=1).tolist()
    assignment = (hungarian_assignment if hungarian else greedy_assignment)(scores)
    return [float(unmatched_penalty) if j is None else float(scores[i, j]) for i, j in enumerate(assignment)]


def _normalise(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def _answer_tokens(text: str) -> set[str]:
    return set(_normalise(text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """MatchTIR's answer F1: F1 of the token *sets* after lowercasing and punctuation -> space; 0 if none shared."""
    pred, ref = _answer_tokens(prediction), _answer_tokens(gold)
    common = len(pred & ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def turn_rewards(trajectory: Trajectory, golds: Sequence[Call], gold_answer: str, **matching: Any) -> list[float]:
    """One reward per turn of `trajectory` (module docstring); `matching` goes to `call_rewards`."""
    answers = [_ANSWER_RE.search(turn.text) for turn in trajectory.turns]
    preds: list[Call] = []
    owners: list[int] = []  # the turn of each predicted call
    for k, (turn, found) in enumerate(zip(trajectory.turns, answers)):
        if found is None:
            preds += [{"name": c.name, "parameters": dict(c.arguments)} for c in turn.tool_calls]
            owners += [k] * len(turn.tool_calls)
    per_call = call_rewards(preds, golds, **matching)
    rewards = [0.0] * len(trajectory.turns)
    for k, found in enumerate(answers):
        if found is not None:
            rewards[k] = answer_f1(found.group(1).strip(), gold_answer)
        else:
            mine = [r for r, owner in zip(per_call, owners) if owner == k]
            rewards[k] = sum(mine) / len(mine) if mine else 0.0
    return rewards


@REWARDS.register("matchtir")
def matchtir_reward(trajectory: Trajectory, problem: Problem, group: GroupContext, *, mode: str = "km",
                    hungarian: bool = False, unmatched_penalty: float = 0.0, reg: float = 0.1) -> RewardResult:
    """MatchTIR turn rewards: calls matched to gold calls (KM greedy / Hungarian, or Sinkhorn OT), answer F1.

    Turn rewards per the module docstring; `total` is their sum, components `calls` (the tool turns'
    rewards) and `answer` (the answer turns'); `correct` when the last `<answer>` equals the gold answer
    after normalisation. Gold calls: `problem.info["gold_calls"]`, else `problem.reference_calls`;
    with neither, no call is expected and every call made gets `unmatched_penalty`.
    """
    golds = gold_calls(problem)
    rewards = turn_rewards(trajectory, golds, problem.answer, mode=mode, hungarian=hungarian,
                           unmatched_penalty=unmatched_penalty, reg=reg)
    answers = [_ANSWER_RE.search(turn.text) for turn in trajectory.turns]
    answer_part = sum(r for r, found in zip(rewards, answers) if found is not None)
    last = next((found for found in reversed(answers) if found is not None), None)
    correct = last is not None and _normalise(last.group(1)) == _normalise(problem.answer)
    return RewardResult(total=sum(rewards), components={"calls": sum(rewards) - answer_part, "answer": answer_part},
                        correct=correct, turn_rewards=tuple(rewards))
