"""SQuAD normalisation, exact match and token F1 (reference section 6), and the `qa_em` / `qa_f1` rewards."""

import asyncio

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.base import bind, score
from tirl.rewards.qa import (exact_match, gold_answers, normalize_answer, qa_em_reward, qa_f1_reward, read_answer,
                             token_f1)
from tirl.tasks.base import Problem

from tests.rewards.builders import alone, trajectory

PROBLEM = Problem(id="nq/0", question="Who wrote Hamlet?", answer="William Shakespeare",
                  info={"answers": ["Shakespeare", "the Bard"]})


@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("An apple, a pear.", "apple pear"),
    ("  THEORY of the\nthings ", "theory of things"),
    ("Anne's", "annes"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_after_normalisation_any_gold():
    assert exact_match("the bard.", ["William Shakespeare", "The Bard"]) == 1.0
    assert exact_match("Bard of Avon", ["William Shakespeare", "The Bard"]) == 0.0


def test_token_f1_hand_computed():
    """pred "william shakespeare playwright" vs gold "william shakespeare": common 2, P=2/3, R=1,
    F1 = 2*(2/3)*1/(2/3+1) = 0.8; against "shakespeare": P=1/3, R=1 -> 0.5; the max is 0.8."""
    assert token_f1("William Shakespeare, playwright", ["William Shakespeare", "Shakespeare"]) == pytest.approx(0.8)


def test_token_f1_counts_repeated_tokens_once_per_gold_occurrence():
    """pred "paris paris" vs gold "paris": common = min(2, 1) = 1, P = 1/2, R = 1 -> F1 = 2/3."""
    assert token_f1("Paris Paris", ["Paris"]) == pytest.approx(2 / 3)


def test_token_f1_no_overlap_and_empty_cases():
    assert token_f1("London", ["Paris"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing
    assert token_f1("", ["Paris"]) == 0.0


@pytest.mark.parametrize("golds", ["Paris", [], [1], None])
def test_bad_gold_lists_raise(golds):
    with pytest.raises(ValueError, match="gold answers"):
        token_f1("Paris", golds)


def test_gold_answers_merge_aliases_and_check_types():
    assert gold_answers(PROBLEM) == ["William Shakespeare", "Shakespeare", "the Bard"]
    with pytest.raises(ValueError, match="nq/1.*answers"):
        gold_answers(Problem(id="nq/1", question="q", answer="x", info={"answers": "x"}))
    with pytest.raises(ValueError, match="nq/2.*no gold"):
        gold_answers(Problem(id="nq/2", question="q", answer=" "))


@pytest.mark.parametrize("text, expected", [
    ("<answer>Paris</answer>", "Paris"),
    ("<answer>The answer is \\boxed{Paris}</answer>", "Paris"),
    ("so \\boxed{Paris}", "Paris"),
    ("Paris", None),
    (None, None),
])
def test_read_answer(text, expected):
    assert read_answer(text) == expected


@pytest.mark.parametrize("final, em, f1", [
    ("<answer>Shakespeare</answer>", 1.0, 1.0),
    ("<answer>William Shakespeare, playwright</answer>", 0.0, 0.8),
    ("<answer>Marlowe</answer>", 0.0, 0.0),
    ("Shakespeare", 0.0, 0.0),  # untagged: not read
])
def test_rewards_components(final, em, f1):
    traj = trajectory(final)
    r_em = qa_em_reward(traj, PROBLEM, alone(traj), format_bonus=0.1)
    r_f1 = qa_f1_reward(traj, PROBLEM, alone(traj))
    tagged = 0.1 if "<answer>" in final else 0.0
    assert r_em.components == {"em": em, "format": tagged}
    assert r_em.total == pytest.approx(em + tagged)
    assert r_f1.components["f1"] == pytest.approx(f1) and r_f1.total == pytest.approx(f1)
    assert r_em.correct is r_f1.correct is (em == 1.0)


def test_unanswered_trajectory_scores_zero():
    traj = trajectory("<answer>Shakespeare</answer>", answered=False)
    result = qa_f1_reward(traj, PROBLEM, alone(traj), format_bonus=0.1)
    assert result.total == 0.0 and result.correct is False


def test_registered_and_bound_with_params():
    assert REWARDS.get("qa_em") is qa_em_reward and REWARDS.get("qa_f1") is qa_f1_reward
    traj = trajectory("<answer>the Bard</answer>")
    fn = bind({"name": "qa_f1", "kwargs": {"format_bonus": 0.2}})
    result = asyncio.run(score(fn, traj, PROBLEM, alone(traj)))
    assert result.total == pytest.approx(1.2)
    with pytest.raises(ValueError, match="no parameter 'bonus'"):
        bind({"name": "qa_em", "kwargs": {"bonus": 1}})
