"""ToolRL reward (reference 3.1): match, R_correct on the reference values, variants, format mapping."""

import pytest

from tirl.rewards import REWARDS
from tirl.rewards.toolrl import (VARIANTS, gold_calls, match_score, toolrl_correctness, toolrl_reward,
                                 variant_scales)
from tirl.tasks.base import Problem
from tirl.types import ToolCall, ToolStatus

from tests.rewards.builders import Step, alone, trajectory

SEARCH_K5 = {"name": "search", "parameters": {"q": "a", "k": 5}}
SEARCH_K3 = {"name": "search", "parameters": {"q": "a", "k": 3}}
CALC = {"name": "calc", "parameters": {"x": 1}}
PROBLEM = Problem(id="toolrl/0", question="find a", answer="", info={"gold_calls": [SEARCH_K5]})


# --- match and R_correct ------------------------------------------------------------------------

def test_match_score_frequency_aware_jaccard():
    """[a,a,b] vs [a,b,c]: multiset intersection {a,b} = 2, 3 + 3 - 2 = 4 -> 0.5."""
    assert match_score(["a", "a", "b"], ["a", "b", "c"]) == 0.5
    assert match_score(["a"], ["a"]) == 1.0 and match_score([], []) == 1.0
    assert match_score([], ["a"]) == 0.0
    assert match_score(["a", "b"], ["a"], strict=True) == 0.0


def test_reference_wrong_value():
    """gt search(q=a,k=5), pd search(q=a,k=3): S = 1 (names) + 1 (keys) + 1 (q) = 3, Smax = 1 + 1 + 2 = 4,
    R = 6 * 3/4 - 3 = 1.5."""
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K3]) == pytest.approx(1.5)


def test_reference_extra_call():
    """gt [search(q=a,k=5)], pd [search(q=a,k=5), calc(x=1)]: names match 1/2, params 1 + 2 -> S = 3.5,
    Smax = 4, R = 6 * 3.5/4 - 3 = 2.25."""
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K5, CALC]) == pytest.approx(2.25)


def test_reference_wrong_name():
    assert toolrl_correctness([SEARCH_K5], [{"name": "lookup", "parameters": {"q": "a", "k": 5}}]) == -3.0


def test_exact_and_empty_predictions():
    assert toolrl_correctness([SEARCH_K5, CALC], [SEARCH_K5, CALC]) == 3.0
    assert toolrl_correctness([SEARCH_K5], []) == -3.0


def test_greedy_matching_uses_each_prediction_once():
    """gt [search k=5, search k=3], pd [search k=5]: names 1/2; the first gt takes pd (1 + 2), the second
    finds nothing -> S = 3.5, Smax = 1 + 3 + 3 = 7, R = 6 * 3.5/7 - 3 = 0."""
    assert toolrl_correctness([SEARCH_K5, SEARCH_K3], [SEARCH_K5]) == pytest.approx(0.0)


def test_modes():
    """coarse: not exact -> min = -3.
    refined (strict match), pd [search k=5, calc]: names differ -> 0; keys equal -> 1, q and k equal -> 2:
    S = 3, Smax = 4, R = 6 * 3/4 - 3 = 1.5 (fine would give 2.25).
    intermediate, Smax = 1 + 1 per gold call, exact call or nothing: pd [search k=3] -> S = 1 (names),
    R = 6 * 1/2 - 3 = 0; pd [search k=5, calc] -> S = 1/2 + 1, R = 6 * 1.5/2 - 3 = 1.5."""
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K3], mode="coarse") == -3.0
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K5, CALC], mode="refined") == pytest.approx(1.5)
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K3], mode="intermediate") == pytest.approx(0.0)
    assert toolrl_correctness([SEARCH_K5], [SEARCH_K5, CALC], mode="intermediate") == pytest.approx(1.5)
    with pytest.raises(ValueError, match="unknown mode 'x'"):
        toolrl_correctness([SEARCH_K5], [SEARCH_K3], mode="x")


def test_malformed_call_raises():
    with pytest.raises(ValueError, match="'name'"):
        toolrl_correctness([{"parameters": {}}], [SEARCH_K5])


# --- scales by variant and step -----------------------------------------------------------------

@pytest.mark.parametrize("variant, step, expected", [
    ("default", 0, (3, -3, 1, 0)),
    ("correct_max1", 0, (1, -1, 1, 0)),
    ("max1step30max3", 29, (1, -1, 1, 0)),
    ("max1step30max3", 30, (3, -3, 0.5, 0)),
    ("schedule", 0, (2, -2, 2, -2)),
    ("schedule", 75, (2.5, -2.5, 1.5, -1)),
    ("schedule", 150, (3, -3, 1, -1)),
    ("schedule", 300, (3, -3, 1, -1)),
])
def test_variant_scales(variant, step, expected):
    s = variant_scales(variant, step)
    assert (s.max_c, s.min_c, s.max_f, s.min_f) == pytest.approx(expected)


# --- the reward on trajectories -----------------------------------------------------------------

GOOD_CALL = Step("<think>search it</think>", calls=[("search", {"q": "a", "k": 5})])


def _reward(*turns, problem=PROBLEM, step=0, answered=None, **params):
    traj = trajectory(*turns, answered=answered)
    return toolrl_reward(traj, problem, alone(traj, step), **params)


def test_exact_call_with_good_format_scores_four():
    result = _reward(GOOD_CALL, "<think>done</think>")
    assert result.components == {"format": 1.0, "correct": 3.0}
    assert result.total == 4.0 and result.correct is True


def test_reference_values_through_trajectories():
    wrong_value = Step("<think>s</think>", calls=[("search", {"q": "a", "k": 3})])
    extra = Step("<think>s</think>", calls=[("search", {"q": "a", "k": 5}), ("calc", {"x": 1})])
    wrong_name = Step("<think>s</think>", calls=[("lookup", {"q": "a", "k": 5})], statuses=[ToolStatus.UNKNOWN_TOOL])
    assert _reward(wrong_value, "<think>d</think>").components["correct"] == pytest.approx(1.5)
    assert _reward(extra, "<think>d</think>").components["correct"] == pytest.approx(2.25)
    assert _reward(wrong_name, "<think>d</think>").components["correct"] == -3.0


def test_unparseable_call_or_no_call_gives_min():
    invalid = Step("<think>s</think>", calls=[("search", {"q": "a", "k": 5})], invalid=1)
    result = _reward(invalid, "<think>d</think>")
    assert result.components["correct"] == -3.0 and result.correct is False
    assert _reward("<think>no tools</think>").components == {"format": 0.0, "correct": -3.0}


def test_format_rules():
    assert _reward(Step("search", calls=[("search", {"q": "a", "k": 5})]), "<think>d</think>").components["format"] == 0
    assert _reward(Step("<think>a</think><think>b</think>", calls=[("search", {"q": "a", "k": 5})]),
                   "<think>d</think>").components["format"] == 0
    # no response expected (blank gold answer): a tagged answer breaks the format
    assert _reward(GOOD_CALL, "<think>d</think><answer>x</answer>").components["format"] == 0
    assert _reward(GOOD_CALL, answered=False).components["format"] == 1


def test_format_with_expected_response():
    """Gold with a response: the final turn must be <think>...</think> then exactly one answer block."""
    problem = Problem(id="toolrl/1", question="q", answer="x", info={"gold_calls": [SEARCH_K5]})
    assert _reward(GOOD_CALL, "<think>d</think>\n<answer>x</answer>", problem=problem).components["format"] == 1
    assert _reward(GOOD_CALL, "<think>d</think>x", problem=problem).components["format"] == 0
    assert _reward(GOOD_CALL, "<think>d</think><answer>x</answer> more", problem=problem).components["format"] == 0
    assert _reward(GOOD_CALL, "<think>d</think><response>x</response>", problem=problem,
                   answer_tag="response").components["format"] == 1


def test_text_only_gold():
    """No gold calls: R_correct = 0, and a call breaks the format; correct is None."""
    problem = Problem(id="toolrl/2", question="hi", answer="hello")
    result = _reward("<think>greet</think><answer>hello</answer>", problem=problem)
    assert result.components == {"format": 1.0, "correct": 0.0} and result.correct is None
    assert _reward(GOOD_CALL, "<think>d</think><answer>hello</answer>", problem=problem).components["format"] == 0


def test_gold_from_reference_calls_and_bad_gold():
    problem = Problem(id="toolrl/3", question="q", answer="",
                      reference_calls=(ToolCall("r", "search", {"q": "a", "k": 5}),))
    assert gold_calls(problem) == [SEARCH_K5]
    assert _reward(GOOD_CALL, "<think>d</think>", problem=problem).total == 4.0
    with pytest.raises(ValueError, match="toolrl/4.*gold_calls"):
        gold_calls(Problem(id="toolrl/4", question="q", answer="", info={"gold_calls": {"name": "x"}}))
    with pytest.raises(ValueError, match="toolrl/5.*'name'"):
        gold_calls(Problem(id="toolrl/5", question="q", answer="", info={"gold_calls": [{"parameters": {}}]}))


def test_variants_on_a_trajectory():
    wrong_value = Step("<think>s</think>", calls=[("search", {"q": "a", "k": 3})])
    assert _reward(wrong_value, "<think>d</think>", variant="coarse").components["correct"] == -3.0
    assert _reward(wrong_value, "<think>d</think>", variant="correct_max1").components["correct"] == pytest.approx(0.5)
    early = _reward(wrong_value, "<think>d</think>", variant="max1step30max3", step=10).components
    late = _reward(wrong_value, "<think>d</think>", variant="max1step30max3", step=30).components
    assert early == {"format": 1.0, "correct": pytest.approx(0.5)}
    assert late == {"format": 0.5, "correct": pytest.approx(1.5)}
    # schedule at step 0: correct in [-2, 2] -> 4 * 3/4 - 2 = 1; a bad format scores min_f = -2
    bad_format = Step("s", calls=[("search", {"q": "a", "k": 3})])
    sched = _reward(bad_format, "<think>d</think>", variant="schedule").components
    assert sched == {"format": -2.0, "correct": pytest.approx(1.0)}


def test_with_length_variant():
    """30 think words in total: round(30/512, 2) = 0.06; step 105 scheduled: L = 640 -> round(0.046875, 2) = 0.05."""
    thinking = Step("<think>" + "w " * 20 + "</think>", calls=[("search", {"q": "a", "k": 5})])
    final = "<think>" + "w " * 10 + "</think>"
    assert _reward(thinking, final, variant="with_length").components["length"] == pytest.approx(0.06)
    assert _reward(thinking, final, variant="with_length", length_schedule=True,
                   step=105).components["length"] == pytest.approx(0.05)
    no_think = Step("search", calls=[("search", {"q": "a", "k": 5})])
    assert _reward(no_think, "done", variant="with_length").components["length"] == 0.0
    long_think = Step("<think>" + "w " * 600 + "</think>", calls=[("search", {"q": "a", "k": 5})])
    assert _reward(long_think, "<think>d</think>", variant="with_length").components["length"] == 1.0


def test_unknown_variant_and_stray_length_schedule_raise():
    with pytest.raises(ValueError, match="unknown variant 'fine'.*coarse.*schedule"):
        _reward(GOOD_CALL, variant="fine")
    with pytest.raises(ValueError, match="length_schedule"):
        _reward(GOOD_CALL, length_schedule=True)


def test_registered_with_all_variants():
    assert REWARDS.get("toolrl") is toolrl_reward
    assert set(VARIANTS) == {"default", "coarse", "refined", "intermediate", "correct_max1", "max1step30max3",
                             "schedule", "with_length"}
