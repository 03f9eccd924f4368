"""Evaluation metrics against values computed by hand (the arithmetic is in each docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tirl.eval import metrics as M


def test_pass_at_k_hand_values():
    """n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5.
    n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9.
    n=8, c=3, k=1: c/n = 0.375.  n=3, c=1, k=3: every draw holds the correct one: 1.
    n=10, c=0: 0 for every k.  n=10, c=10: 1."""
    assert M.pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert M.pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert M.pass_at_k(8, 3, 1) == pytest.approx(0.375)
    assert M.pass_at_k(3, 1, 3) == 1.0
    assert M.pass_at_k(10, 0, 5) == 0.0
    assert M.pass_at_k(10, 10, 1) == 1.0


def test_pass_at_k_is_stable_where_binomials_overflow():
    """n=2000, c=2, k=1000: C(n-c,k)/C(n,k) = (n-k)(n-k-1)/(n(n-1)) = 1000*999/(2000*1999) = 0.2498749375,
    so pass@k = 0.7501250625. C(2000, 1000) ~ 2e600 overflows a float; the product form does not."""
    assert M.pass_at_k(2000, 2, 1000) == pytest.approx(1 - 1000 * 999 / (2000 * 1999), rel=1e-12)
    assert M.pass_at_k(2000, 2, 1000) == pytest.approx(0.7501250625, rel=1e-9)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        M.pass_at_k(n, c, k)


def test_ks():
    """Every k up to n; the reported ones are the powers of two up to n, and n."""
    assert M.pass_at_k_ks(3) == [1, 2, 3]
    assert M.standard_ks(1) == [1]
    assert M.standard_ks(4) == [1, 2, 4]
    assert M.standard_ks(6) == [1, 2, 4, 6]
    assert M.standard_ks(8) == [1, 2, 4, 8]


def test_tool_productivity_is_otc_correct_per_call_and_undefined_without_calls():
    """correct [1,1,0,1], calls [1,2,0,3]: 3 correct / 6 calls = 0.5. No calls at all: undefined (None)."""
    assert M.tool_productivity(sum([1, 1, 0, 1]), sum([1, 2, 0, 3])) == 0.5
    assert M.tool_productivity(3, 0) is None
    assert M.tool_productivity(0, 4) == 0.0


def test_ece_and_brier_hand_values():
    """q=[.9,.9,.1,.1], c=[1,0,0,0], 10 bins: bin 9 holds two samples, accuracy .5, confidence .9 -> .5*.4;
    bin 1 holds two, accuracy 0, confidence .1 -> .5*.1; ECE = .2 + .05 = .25.
    Brier = (.1^2 + .9^2 + .1^2 + .1^2)/4 = .84/4 = .21."""
    q, c = [0.9, 0.9, 0.1, 0.1], [True, False, False, False]
    assert M.expected_calibration_error(q, c) == pytest.approx(0.25)
    assert M.brier_score(q, c) == pytest.approx(0.21)


def test_ece_bin_edges():
    """2 bins, q=[.2,.5,.6,1.0], c=[0,1,0,1]: 0.5 opens the upper bin and 1.0 stays in it.
    Lower bin {.2}: accuracy 0, confidence .2 -> 1/4 * .2 = .05. Upper bin {.5,.6,1.0}: accuracy 2/3,
    confidence 2.1/3 = .7 -> 3/4 * |2/3 - .7| = .025. ECE = .075."""
    assert M.expected_calibration_error([0.2, 0.5, 0.6, 1.0], [0, 1, 0, 1], bins=2) == pytest.approx(0.075)


def test_ece_weights_count_samples_repeatedly():
    """Weights [2,1,1,0] give the ECE of the data with sample 0 twice and sample 3 left out:
    q=[.9,.9,.9,.1], c=[1,1,0,0]: bin 9: accuracy 2/3, confidence .9 -> 3/4*(.9-2/3) = .175;
    bin 1: accuracy 0, confidence .1 -> 1/4*.1 = .025; ECE = .2."""
    q, c = [0.9, 0.9, 0.1, 0.1], [1, 0, 0, 1]
    weighted = M.expected_calibration_error(q, c, weight_N=[2, 1, 1, 0])
    assert weighted == pytest.approx(0.2)
    assert weighted == pytest.approx(M.expected_calibration_error([0.9, 0.9, 0.9, 0.1], [1, 1, 0, 0]))


@pytest.mark.parametrize("q, c", [([], []), ([0.5], [1, 0]), ([1.2], [1]), ([-0.1], [0])])
def test_calibration_refuses_bad_input(q, c):
    with pytest.raises(ValueError):
        M.expected_calibration_error(q, c)
    with pytest.raises(ValueError):
        M.brier_score(q, c)


def test_percentile_interval():
    """[1,2,3,4,5] at level .5: the .25 and .75 quantiles, 2 and 4 (linear interpolation: positions 1 and 3).
    At .9 over 1..11: quantiles .05 and .95 at positions .5 and 9.5 -> 1.5 and 10.5. NaNs are left out."""
    assert M.percentile_interval([1, 2, 3, 4, 5], 0.5) == (2.0, 4.0)
    assert M.percentile_interval(list(range(1, 12)), 0.9) == pytest.approx((1.5, 10.5))
    assert M.percentile_interval([math.nan, 1, 2, 3, 4, 5], 0.5) == (2.0, 4.0)
    assert M.percentile_interval([math.nan, math.nan]) is None
    with pytest.raises(ValueError):
        M.percentile_interval([1.0], 1.0)


def test_bootstrap_ratio_per_resample():
    """num=[1,0,2], den=[1,1,2]; resample [0,0,1] -> (1+1+0)/(1+1+1) = 2/3; [2,2,2] -> 6/6 = 1;
    [1,1,1] -> 0/3 = 0. With den[0]=0, resample [0,0,0] divides by 0: NaN."""
    idx = np.array([[0, 0, 1], [2, 2, 2], [1, 1, 1]])
    assert M.bootstrap_ratio([1, 0, 2], [1, 1, 2], idx) == pytest.approx([2 / 3, 1.0, 0.0])
    out = M.bootstrap_ratio([1, 0, 2], [0, 1, 2], np.array([[0, 0, 0], [0, 1, 2]]))
    assert math.isnan(out[0]) and out[1] == pytest.approx(3 / 3)


def test_bootstrap_indices_are_seeded():
    a, b = M.bootstrap_indices(7, 50, seed=3), M.bootstrap_indices(7, 50, seed=3)
    assert a.shape == (50, 7) and a.min() >= 0 and a.max() <= 6 and (a == b).all()
    assert not (a == M.bootstrap_indices(7, 50, seed=4)).all()


def test_bootstrap_statistic_maps_none_to_nan():
    """A statistic that is undefined on a resample (None) becomes NaN, which the interval leaves out."""
    idx = np.array([[0, 0], [1, 1], [0, 1]])
    stats = M.bootstrap_statistic(lambda row: None if (row == 0).all() else float(row.sum()), idx)
    assert math.isnan(stats[0]) and list(stats[1:]) == [2.0, 1.0]
