"""MatchTIR turn rewards (reference 4.6): call similarity, greedy vs Hungarian assignment, Sinkhorn OT,
answer F1 and the registered `matchtir` reward; hand values derived in the docstrings."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from tests.rewards.builders import Step, alone, trajectory
from tirl.rewards import REWARDS, score
from tirl.rewards.base import bind
from tirl.rewards.matchtir import (answer_f1, call_rewards, call_similarity, greedy_assignment, hungarian_assignment,
                                   match_score, sinkhorn_plan)
from tirl.tasks.base import Problem
from tirl.types import ToolCall


def call(name: str, **params) -> dict:
    return {"name": name, "parameters": params}


# Two gold calls and two predictions where the greedy and the optimal assignment differ:
# S[p1, g1] = (1 + 2/3 + 2) / 5 = 0.73333   keys [a,b,c] vs [a,b]: Jaccard 2/3; a, b equal
# S[p1, g2] = (1 + 1/2 + 1) / 3 = 0.83333   keys [a] vs [a,b]: 1/2; a equal
# S[p2, g1] = (1 + 1 + 1) / 5 = 0.6         same keys; only a equal
# S[p2, g2] = (1 + 1/3 + 1) / 3 = 0.77778   keys [a] vs [a,b,c]: 1/3; a equal
G1, G2 = call("f", a=1, b=2, c=3), call("f", a=1)
P1, P2 = call("f", a=1, b=2), call("f", a=1, b=9, c=9)


def test_match_score():
    assert match_score(["q", "k"], ["q", "k"]) == 1.0
    assert match_score(["q", "k"], ["k", "q"]) == 1.0  # a multiset Jaccard of 2 / 2
    assert match_score(["q", "k"], ["q"]) == 0.5
    assert match_score(["a", "a", "b"], ["a", "c"]) == 0.25  # common 1 / (3 + 2 - 1)
    assert match_score([], ["q"]) == 0.0 and match_score([], []) == 1.0


def test_call_similarity_hand_values():
    """Gold search(q='a', k=5): exact -> 4/4 = 1; missing k -> (1 + 0.5 + 1) / 4 = 0.625; name in other case,
    q wrong -> (1 + 1 + 1) / 4 = 0.75; other tool -> 0. Gold without parameters: same -> 1, an extra
    key -> (1 + 0 + 0) / 2 = 0.5."""
    gold = call("search", q="a", k=5)
    assert call_similarity(call("search", q="a", k=5), gold) == 1.0
    assert call_similarity(call("search", q="a"), gold) == 0.625
    assert call_similarity(call("Search", q="b", k=5), gold) == 0.75
    assert call_similarity(call("lookup", q="a", k=5), gold) == 0.0
    assert call_similarity(call("now"), call("now")) == 1.0
    assert call_similarity(call("now", tz="UTC"), call("now")) == 0.5
    assert math.isclose(call_similarity(P1, G1), 0.73333, abs_tol=1e-5)
    assert math.isclose(call_similarity(P1, G2), 0.83333, abs_tol=1e-5)
    assert math.isclose(call_similarity(P2, G1), 0.6, abs_tol=1e-9)
    assert math.isclose(call_similarity(P2, G2), 0.77778, abs_tol=1e-5)


def test_greedy_and_hungarian_assignments():
    """S = [[0.9, 0.8], [0.8, 0.1]]: greedy takes 0.9 first, then 0.1 (total 1.0); the optimum pairs
    crosswise (0.8 + 0.8 = 1.6). A zero score is never matched."""
    scores = np.array([[0.9, 0.8], [0.8, 0.1]])
    assert greedy_assignment(scores) == [0, 1]
    assert hungarian_assignment(scores) == [1, 0]
    zero = np.array([[0.0, 0.0], [0.5, 0.0]])
    assert greedy_assignment(zero) == [None, 0] == hungarian_assignment(zero)
    ties = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert greedy_assignment(ties) == [0, 1]  # ties in row, then column order


def test_km_call_rewards_greedy_hungarian_and_unmatched():
    """Greedy: p1 -> g2 (0.83333), then p2 -> g1 (0.6). Hungarian: p1 -> g1 (0.73333), p2 -> g2 (0.77778),
    total 1.51111 > 1.43333. A third prediction of another tool matches nothing: unmatched_penalty."""
    assert np.allclose(call_rewards([P1, P2], [G1, G2]), [0.83333, 0.6], atol=1e-5)
    assert np.allclose(call_rewards([P1, P2], [G1, G2], hungarian=True), [0.73333, 0.77778], atol=1e-5)
    extra = call_rewards([P1, P2, call("g", a=1)], [G1, G2], unmatched_penalty=-0.5)
    assert np.allclose(extra, [0.83333, 0.6, -0.5], atol=1e-5)
    assert call_rewards([P1], [], unmatched_penalty=-0.5) == [-0.5] and call_rewards([], [G1]) == []
    with pytest.raises(ValueError, match="km, ot"):
        call_rewards([P1], [G1], mode="hungarian")


def test_ot_call_rewards_hand_values():
    """S = I (2x2), reg 0.1: the plan is [[a, b], [b, a]] with a + b = 1/2 and a/b = e^10, so
    a = 0.5 e^10 / (e^10 + 1) = 0.4999773 and each call gets a * 1 + b * 0 = 0.4999773.
    One prediction, golds with S = [1, 0]: marginals force T = [[0.5, 0.5]] -> reward 0.5."""
    exact = [call("f", x=1), call("g", y=2)]
    rewards = call_rewards(exact, exact, mode="ot")
    assert np.allclose(rewards, [0.5 * math.exp(10) / (math.exp(10) + 1)] * 2, atol=1e-9)
    assert np.allclose(call_rewards([call("f", x=1)], exact, mode="ot"), [0.5], atol=1e-9)
    assert np.allclose(call_rewards([call("f", x=1)], exact[:1], mode="ot"), [1.0], atol=1e-9)


def pot_sinkhorn(scores: np.ndarray, reg: float, iterations: int = 1000) -> np.ndarray:
    """POT's plain `sinkhorn_knopp` (u, v scalings of K = exp(S / reg)), written out as a reference."""
    P, G = scores.shape
    a, b = np.ones(P) / P, np.ones(G) / G
    K = np.exp(scores / reg)
    u, v = np.ones(P) / P, np.ones(G) / G
    for _ in range(iterations):
        v = b / (K.T @ u)
        u = a / (K @ v)
    return u[:, None] * K * v[None, :]


@pytest.mark.parametrize("shape", [(3, 2), (2, 4), (4, 4)])
def test_sinkhorn_plan_matches_plain_sinkhorn(shape):
    scores = np.random.default_rng(sum(shape)).uniform(0, 1, size=shape)
    plan = sinkhorn_plan(scores, 0.1)
    assert np.allclose(plan, pot_sinkhorn(scores, 0.1), atol=1e-9)
    assert np.allclose(plan.sum(axis=1), 1 / shape[0]) and np.allclose(plan.sum(axis=0), 1 / shape[1])
    assert np.isfinite(sinkhorn_plan(scores, 0.001)).all()  # the log domain survives a tiny reg
    with pytest.raises(ValueError, match="reg"):
        sinkhorn_plan(scores, 0.0)


def test_answer_f1_follows_matchtir():
    """Token sets after lowercasing and punctuation -> space: {the, eiffel, tower, paris} vs {eiffel,
    tower}: P = 1/2, R = 1, F1 = 2/3. Sets: 'paris paris' vs 'Paris' -> 1. 'U.S.' -> {u, s}."""
    assert math.isclose(answer_f1("The Eiffel Tower, Paris", "Eiffel tower"), 2 / 3)
    assert answer_f1("paris paris", "Paris") == 1.0
    assert answer_f1("U.S.", "u s") == 1.0
    assert answer_f1("", "x") == 0.0 and answer_f1("rome", "paris") == 0.0


# ----------------------------------------------------------------------------- the registered reward


def problem(gold_calls=None, answer: str = "Eiffel Tower", reference_calls=()) -> Problem:
    info = {} if gold_calls is None else {"gold_calls": gold_calls}
    return Problem(id="q1", question="?", answer=answer, info=info, reference_calls=reference_calls)


def three_turns():
    """Turn 0 calls p1 and p2, turn 1 calls a tool with no gold match, turn 2 answers."""
    return trajectory(Step("calling", calls=[("f", P1["parameters"]), ("f", P2["parameters"])]),
                      Step("again", calls=[("lookup", {"x": 1})]),
                      "<think>done</think><answer>Eiffel Tower</answer>")


def test_matchtir_reward_turn_rewards():
    """KM greedy: turn 0 = mean(0.83333, 0.6) = 0.71667, turn 1 = 0 (unmatched), turn 2 = F1 1.0;
    total 1.71667. Hungarian: turn 0 = mean(0.73333, 0.77778) = 0.75556."""
    traj = three_turns()
    result = REWARDS.get("matchtir")(traj, problem([G1, G2]), alone(traj))
    assert np.allclose(result.turn_rewards, [0.71667, 0.0, 1.0], atol=1e-5)
    assert math.isclose(result.total, sum(result.turn_rewards))
    assert math.isclose(result.components["answer"], 1.0) and math.isclose(result.components["calls"], 0.71667,
                                                                            abs_tol=1e-5)
    assert result.correct is True
    hungarian = REWARDS.get("matchtir")(traj, problem([G1, G2]), alone(traj), hungarian=True)
    assert np.allclose(hungarian.turn_rewards, [0.75556, 0.0, 1.0], atol=1e-5)


def test_matchtir_reward_through_a_spec_and_score():
    traj = three_turns()
    bound = bind({"name": "matchtir", "kwargs": {"mode": "ot"}})
    result = asyncio.run(score(bound, traj, problem([G1, G2]), alone(traj)))
    assert len(result.turn_rewards) == 3 and result.turn_rewards[2] == 1.0
    assert 0.0 < result.turn_rewards[0] <= 1 / 3  # each call's OT reward is at most 1/P = 1/3
    with pytest.raises(ValueError, match="matchtir"):
        bind({"name": "matchtir", "kwargs": {"assignment": "hungarian"}})


def test_answer_turn_calls_are_not_scored_and_wrong_answers_are_not_correct():
    traj = trajectory(Step("<answer>Paris</answer>", calls=[("f", {"a": 1})]), answered=True)
    result = REWARDS.get("matchtir")(traj, problem([G2], answer="Eiffel Tower, Paris"), alone(traj))
    assert np.allclose(result.turn_rewards, [2 * (1.0 * 1 / 3) / (1.0 + 1 / 3)])  # P = 1, R = 1/3
    assert result.correct is False
    no_answer = trajectory(Step("x", calls=[("f", {"a": 1})]), answered=False)
    result = REWARDS.get("matchtir")(no_answer, problem([G2]), alone(no_answer))
    assert result.turn_rewards == (1.0,) and result.correct is False


def test_gold_calls_from_reference_calls_and_bad_gold():
    traj = trajectory(Step("x", calls=[("f", {"a": 1})]), "<answer>Eiffel Tower</answer>")
    from_reference = problem(reference_calls=(ToolCall("r0", "f", {"a": 1}),))
    assert REWARDS.get("matchtir")(traj, from_reference, alone(traj)).turn_rewards == (1.0, 1.0)
    none_expected = REWARDS.get("matchtir")(traj, problem(), alone(traj), unmatched_penalty=-0.25)
    assert none_expected.turn_rewards == (-0.25, 1.0)
    with pytest.raises(ValueError, match="gold_calls"):
        REWARDS.get("matchtir")(traj, problem(gold_calls="f(a=1)"), alone(traj))
