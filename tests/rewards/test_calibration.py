"""Verbalised confidence and the calibration rewards rlcr_brier and mscr (reference 3.4)."""

import pytest

from tirl.rewards.calibration import brier_reward, mscr_reward, read_confidence

from tests.rewards.builders import FIXED, run, trajectory


def answer(value: str, confidence: str | None) -> str:
    text = f"<answer>{value}</answer>"
    return text + (f"\n<confidence>{confidence}</confidence>" if confidence is not None else "")


# --- read_confidence --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("<confidence>0.8</confidence>", 0.8),
    ("<confidence> 80% </confidence>", 0.8),
    ("<confidence>100%</confidence>", 1.0),
    ("<confidence>.25</confidence>", 0.25),
    ("<confidence>0</confidence>", 0.0),
    ("<confidence>1.0</confidence>", 1.0),
    ("<confidence>0.2</confidence> then <confidence>0.9</confidence>", 0.9),
    ("The answer is 5.\nConfidence: 0.7", 0.7),
    ("**Confidence:** 65%", 0.65),
])
def test_reads_confidence(text, expected):
    assert read_confidence(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", [
    None, "", "<answer>5</answer>", "<confidence>high</confidence>", "<confidence>80</confidence>",
    "<confidence>1.5</confidence>", "<confidence>-0.1</confidence>", "<confidence>120%</confidence>",
    "<confidence>0.5 or 0.6</confidence>", "I have low confidence: maybe 0.3 or so",
    "<confidence>0.8", "<confidence></confidence>",
])
def test_unparseable_confidence_is_none(text):
    assert read_confidence(text) is None


def test_tag_takes_precedence_over_a_line():
    assert read_confidence("Confidence: 0.1\n<confidence>0.9</confidence>") == 0.9


# --- the formulas -----------------------------------------------------------------------------

@pytest.mark.parametrize(("correct", "q", "expected"), [
    (True, 1.0, 1.5), (True, 0.0, 1.0), (False, 0.0, -0.1), (False, 1.0, -0.6),
])
def test_mscr_reference_values(correct, q, expected):
    """Reference 3.4, lambda 0.5, delta 0.1: correct q=1 -> 1.5, q=0 -> 1.0; wrong q=0 -> -0.1, q=1 -> -0.6."""
    assert mscr_reward(correct, q) == pytest.approx(expected)


def test_mscr_separates_every_correct_from_every_wrong():
    qs = [i / 20 for i in range(21)]
    assert min(mscr_reward(True, q) for q in qs) > max(mscr_reward(False, q) for q in qs)


def test_mscr_expected_reward_peaks_at_the_true_probability():
    """E[R] = p(1 + lam(1-(1-q)^2)) + (1-p)(-delta - lam q^2) is maximised at q = p."""
    p = 0.3
    qs = [i / 100 for i in range(101)]
    best = max(qs, key=lambda q: p * mscr_reward(True, q) + (1 - p) * mscr_reward(False, q))
    assert best == pytest.approx(p)


@pytest.mark.parametrize(("correct", "q", "expected"), [
    (True, 0.8, 1 - 0.04), (True, 0.0, 0.0), (False, 0.8, -0.64), (False, 0.0, 0.0), (True, 1.0, 1.0),
])
def test_brier_values(correct, q, expected):
    """R = c - (q - c)^2: right at 0.8 -> 1 - 0.04; wrong at 0.8 -> -0.64."""
    assert brier_reward(correct, q) == pytest.approx(expected)


# --- the rewards ------------------------------------------------------------------------------

def test_rlcr_brier_reward_on_a_trajectory():
    r = run("rlcr_brier", trajectory(answer("42", "0.8")))
    assert r.total == pytest.approx(0.96)
    assert r.correct is True
    assert r.components == pytest.approx({"correct": 1.0, "calibration": -0.04, "confidence_missing": 0.0,
                                          "confidence": 0.8, "base.correct": 1.0, "base.format": 0.1})
    wrong = run("rlcr_brier", trajectory(answer("41", "30%")))
    assert wrong.total == pytest.approx(-0.09)
    assert wrong.correct is False


@pytest.mark.parametrize(("value", "confidence", "expected"), [
    ("42", "1", 1.5), ("42", "0", 1.0), ("41", "0", -0.1), ("41", "100%", -0.6),
])
def test_mscr_reward_on_trajectories(value, confidence, expected):
    assert run("mscr", trajectory(answer(value, confidence))).total == pytest.approx(expected)


def test_mscr_parameters():
    """lam = 1, delta = 0.5, wrong at q = 0.5: -0.5 - 0.25 = -0.75."""
    spec = {"name": "mscr", "kwargs": {"lam": 1.0, "delta": 0.5}}
    assert run(spec, trajectory(answer("41", "0.5"))).total == pytest.approx(-0.75)
    with pytest.raises(ValueError, match="lam and delta"):
        run({"name": "mscr", "kwargs": {"delta": -0.1}}, trajectory(answer("41", "0.5")))


@pytest.mark.parametrize(("reward", "value", "expected"), [
    ("rlcr_brier", "42", 0.0 - 0.1),   # right, scored as q = 0: 1 - 1 = 0, minus 0.1
    ("rlcr_brier", "41", -1.0 - 0.1),  # wrong, scored as q = 1: 0 - 1 = -1, minus 0.1
    ("mscr", "42", 1.0 - 0.1),         # right, q = 0: 1.0, minus 0.1
    ("mscr", "41", -0.6 - 0.1),        # wrong, q = 1: -0.6, minus 0.1
])
def test_missing_confidence_scores_as_the_worst_confidence_minus_the_penalty(reward, value, expected):
    r = run(reward, trajectory(answer(value, None)))
    assert r.total == pytest.approx(expected)
    assert r.components["confidence_missing"] == 1.0
    assert "confidence" not in r.components


def test_missing_confidence_never_pays_more_than_a_stated_one():
    for reward in ("rlcr_brier", "mscr"):
        for value in ("42", "41"):
            silent = run(reward, trajectory(answer(value, None))).total
            stated = [run(reward, trajectory(answer(value, str(q / 10)))).total for q in range(11)]
            assert silent < min(stated)


def test_missing_penalty_parameter_and_unparseable_confidence():
    spec = {"name": "rlcr_brier", "kwargs": {"missing_penalty": 0.5}}
    r = run(spec, trajectory(answer("41", "very sure")))
    assert r.total == pytest.approx(-1.5)
    assert r.components["confidence_missing"] == 1.0


def test_no_final_answer_is_wrong_and_missing():
    r = run("mscr", trajectory("still thinking", answered=False))
    assert r.correct is False
    assert r.total == pytest.approx(-0.7)


def test_custom_tag_and_base():
    text = "<answer>x</answer><conf>0.5</conf>"
    spec = {"name": "rlcr_brier", "kwargs": {"tag": "conf", "base": {"name": FIXED, "kwargs": {"correct": True}}}}
    assert run(spec, trajectory(text)).total == pytest.approx(0.75)


def test_a_base_that_does_not_know_correctness_is_an_error():
    spec = {"name": "mscr", "kwargs": {"base": {"name": FIXED, "kwargs": {"total": 1.0}}}}
    with pytest.raises(ValueError, match="does not say whether"):
        run(spec, trajectory(answer("42", "0.5")))
