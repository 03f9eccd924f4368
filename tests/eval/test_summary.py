"""The summary of hand-built trajectories: every metric and interval against values computed by hand."""

from __future__ import annotations

import pytest

from tests.rewards.builders import Step, trajectory
from tirl.eval.summary import problem_outcomes, summarize, table_rows
from tirl.types import ToolStatus

CALC = ("calculator", {"expression": "6*7"})


def _scored(traj, correct, **components):
    return traj.with_reward(float(bool(correct)), components, correct)


def two_problems_two_samples():
    """p0: (one ok call, right), (no call, wrong). p1: (validation_error + ok call, right),
    (an unparseable attempt + an execution_error call, no answer: wrong)."""
    return [
        _scored(trajectory(Step("c", [CALC]), "<answer>42</answer>", task_id="p0"), True),
        _scored(trajectory("<answer>41</answer>", task_id="p0", sample_index=1), False),
        _scored(trajectory(Step("c", [CALC, CALC], statuses=[ToolStatus.VALIDATION_ERROR, ToolStatus.OK]),
                           "<answer>42</answer>", task_id="p1"), True),
        _scored(trajectory(Step("c", [CALC], statuses=[ToolStatus.EXECUTION_ERROR], invalid=1),
                           task_id="p1", sample_index=1), False),
    ]


def test_every_metric_by_hand():
    """4 samples, 2 right: accuracy 2/4 = .5; pass@1 = mean(1/2, 1/2) = .5; pass@2 (n=2, c=1, k=2) = 1 per
    problem; mean@2 = .5. Calls: p0 1, p1 2 + 2 = 5 in all: 5/4 = 1.25 per sample; 3 of 4 samples call.
    Tool productivity = 2 correct / 5 calls = .4. Malformed: validation_error + invalid_call = 2, so
    well-formed 3/5 = .6; ran (ok): 2/5 = .4, errors .6; per status ok .4, the three errors .2 each.
    Turns 2+1+2+1 = 6 -> 1.5; one sampled token per turn -> 1.5."""
    s = summarize(two_problems_two_samples(), resamples=200)
    expected = {"accuracy": 0.5, "pass@1": 0.5, "pass@2": 1.0, "mean@2": 0.5, "tool_calls/mean": 1.25,
                "tool_calls/rate": 0.75, "tool_productivity": 0.4, "tool_calls/valid_rate": 0.6,
                "tool_calls/success_rate": 0.4, "tool_calls/error_rate": 0.6, "tool_status_rate/ok": 0.4,
                "tool_status_rate/validation_error": 0.2, "tool_status_rate/invalid_call": 0.2,
                "tool_status_rate/execution_error": 0.2, "tool_status_rate/timeout": 0.0, "turns/mean": 1.5,
                "tokens/sampled_mean": 1.5}
    assert {k: s[k] for k in expected} == pytest.approx(expected)
    assert (s["problems"], s["samples"], s["samples_per_problem"]) == (2, 4, 2)
    assert "calibration/ece" not in s  # the reward asked for no confidence


def test_intervals_resample_problems():
    """Both problems have accuracy 1/2, so every resample does: [.5, .5]. Calls per sample: a resample of
    {p0, p0} gives 2/4 = .5, {p1, p1} 8/4 = 2, a mixed one 1.25; each pure draw has probability 1/4 > 2.5%,
    so the 95% interval is exactly [.5, 2]."""
    s = summarize(two_problems_two_samples(), resamples=1000, seed=1)
    assert s["ci"]["accuracy"] == pytest.approx([0.5, 0.5])
    assert s["ci"]["tool_calls/mean"] == pytest.approx([0.5, 2.0])
    assert s["bootstrap"] == {"method": "percentile", "unit": "problem", "resamples": 1000, "level": 0.95, "seed": 1}
    again = summarize(two_problems_two_samples(), resamples=1000, seed=1)
    assert again["ci"] == s["ci"]
    assert summarize(two_problems_two_samples(), resamples=0)["ci"] == {}


def test_no_tool_calls_leaves_call_rates_undefined():
    """No call at all: tool productivity and the per-call rates are None (0/0), calls per problem 0."""
    trajs = [_scored(trajectory("<answer>42</answer>", task_id=f"p{i}"), i == 0) for i in range(3)]
    s = summarize(trajs, resamples=100)
    assert s["tool_calls/mean"] == 0.0 and s["accuracy"] == pytest.approx(1 / 3)
    for key in ("tool_productivity", "tool_calls/valid_rate", "tool_calls/error_rate"):
        assert s[key] is None and s["ci"][key] is None
    rows = {label: value for label, value, _ in table_rows(s)}
    assert rows["tool productivity (OTC)"] == "n/a"


def test_calibration_from_the_rewards_confidence():
    """Five problems scored by a calibration reward: stated q=[.9,.9,.1,.1] with c=[1,0,0,0] and one missing.
    ECE .25 and Brier .21 over the four stated (see test_metrics), coverage 4/5 = .8. A combinator's
    prefixed components (`rlcr_brier.confidence`) are read the same way."""
    stated = [(0.9, True), (0.9, False), (0.1, False), (0.1, False)]
    trajs = [_scored(trajectory("a", task_id=f"p{i}"), c, **{"rlcr_brier.confidence_missing": 0.0,
                                                               "rlcr_brier.confidence": q})
             for i, (q, c) in enumerate(stated)]
    trajs.append(_scored(trajectory("a", task_id="p4"), False, confidence_missing=1.0))
    s = summarize(trajs, resamples=300)
    assert s["calibration/ece"] == pytest.approx(0.25)
    assert s["calibration/brier"] == pytest.approx(0.21)
    assert s["calibration/coverage"] == pytest.approx(0.8)
    lo, hi = s["ci"]["calibration/ece"]
    assert 0 <= lo <= hi <= 1
    assert [o.confidences for o in problem_outcomes(trajs)][:2] == [((0.9, True),), ((0.9, False),)]


def test_table_shows_pass_at_standard_ks_with_intervals():
    s = summarize(two_problems_two_samples(), resamples=100)
    rows = table_rows(s)
    labels = [r[0] for r in rows]
    assert labels[:4] == ["accuracy", "pass@1", "pass@2", "mean@2"]
    assert dict((r[0], r[2]) for r in rows)["accuracy"] == "[0.500, 0.500]"
