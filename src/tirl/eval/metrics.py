"""Evaluation metrics as pure functions of numbers: pass@k, tool productivity, calibration, and
percentile bootstrap intervals over problems.

Nothing here knows about trajectories (`summary.py` turns trajectories into the numbers these take).
Dimension names in suffixes: P = problems, B = bootstrap resamples, N = samples (trajectories).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem (Chen et al. 2021): the probability that at least one of k samples
    drawn without replacement from n samples, c of them correct, is correct.

    1 - C(n-c, k) / C(n, k), computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms
    the (huge) binomial coefficients. Needs 0 <= c <= n and 1 <= k <= n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0  # every draw of k contains a correct sample
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_ks(n: int) -> list[int]:
    """Every k for which pass@k is defined with n samples per problem: 1..n."""
    return list(range(1, n + 1))


def standard_ks(n: int) -> list[int]:
    """The ks usually reported with n samples: 1, 2, 4, ... up to n, and n itself."""
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    return ks if not ks or ks[-1] == n else [*ks, n]


def ratio(numerator: float, denominator: float) -> float | None:
    """numerator / denominator, or None when the denominator is 0 (the metric is undefined)."""
    return None if denominator == 0 else float(numerator) / float(denominator)


def tool_productivity(correct_total: float, calls_total: float) -> float | None:
    """OTC's tool productivity, TP = (correct answers) / (tool calls), both summed over every sample.

    Undefined (None) when no tool call was made at all: 0 calls with correct answers is not "infinitely
    productive" tool use, and 0/0 says nothing, so neither is turned into a number.
    """
    return ratio(correct_total, calls_total)


def expected_calibration_error(confidence_N: Sequence[float], correct_N: Sequence[bool], bins: int = 10,
                               weight_N: Sequence[float] | None = None) -> float:
    """ECE with `bins` equal-width bins on [0, 1]: sum_b (n_b / N) * |accuracy_b - mean confidence_b|.

    Bin b holds confidences in [b/bins, (b+1)/bins); the last bin also holds 1.0. Empty bins add 0.
    `weight_N` counts each sample that many times (a bootstrap resample drawing its problem twice);
    default 1 each. Needs at least one sample of positive weight and confidences in [0, 1].
    """
    q = np.asarray(confidence_N, dtype=np.float64)
    c = np.asarray(correct_N, dtype=np.float64)
    _check_confidences(q, c)
    w = np.ones_like(q) if weight_N is None else np.asarray(weight_N, dtype=np.float64)
    if len(w) != len(q) or w.sum() <= 0:
        raise ValueError(f"ECE needs one non-negative weight per sample, not all 0 (got {len(w)} for {len(q)})")
    which = np.minimum(np.floor(q * bins).astype(int), bins - 1)
    total, ece = w.sum(), 0.0
    for b in np.unique(which):
        wb = np.where(which == b, w, 0.0)
        if wb.sum() > 0:
            ece += wb.sum() / total * abs((wb * c).sum() / wb.sum() - (wb * q).sum() / wb.sum())
    return float(ece)


def brier_score(confidence_N: Sequence[float], correct_N: Sequence[bool]) -> float:
    """Mean squared error of the stated confidence against correctness: mean (q - c)^2, c in {0, 1}."""
    q = np.asarray(confidence_N, dtype=np.float64)
    c = np.asarray(correct_N, dtype=np.float64)
    _check_confidences(q, c)
    return float(np.mean((q - c) ** 2))


def _check_confidences(q: np.ndarray, c: np.ndarray) -> None:
    if len(q) == 0 or len(q) != len(c):
        raise ValueError(f"calibration needs as many confidences as outcomes, at least one (got {len(q)} "
                         f"and {len(c)})")
    if np.any((q < 0) | (q > 1)):
        raise ValueError(f"confidences must lie in [0, 1] (got {q[(q < 0) | (q > 1)][:3].tolist()})")


# ----------------------------------------------------------------------------- bootstrap over problems


def bootstrap_indices(num_problems: int, resamples: int, seed: int) -> np.ndarray:
    """idx_B_P: `resamples` rows, each `num_problems` problem indices drawn with replacement (seeded).

    One matrix is shared by every metric of a summary, so their intervals come from the same resamples.
    """
    if num_problems < 1 or resamples < 1:
        raise ValueError(f"bootstrap needs at least one problem and one resample (got {num_problems}, {resamples})")
    return np.random.default_rng(seed).integers(0, num_problems, size=(resamples, num_problems))


def percentile_interval(stats_B: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """The percentile bootstrap interval: the (1-level)/2 and (1+level)/2 quantiles of the resampled
    statistic (linear interpolation between order statistics). Resamples where the statistic is
    undefined (NaN) are left out; None when none is left."""
    if not 0 < level < 1:
        raise ValueError(f"the confidence level must lie in (0, 1) (got {level})")
    values = np.asarray(stats_B, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ratio(numerator_P: Sequence[float], denominator_P: Sequence[float], idx_B_P: np.ndarray) -> np.ndarray:
    """stats_B: sum(numerator) / sum(denominator) over the problems of each resample (NaN where the
    denominator sums to 0). A mean over problems is the ratio with denominator 1 per problem."""
    num = np.asarray(numerator_P, dtype=np.float64)[idx_B_P].sum(axis=1)
    den = np.asarray(denominator_P, dtype=np.float64)[idx_B_P].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den == 0, np.nan, num / np.where(den == 0, 1.0, den))


def bootstrap_statistic(statistic: Callable[[np.ndarray], float | None], idx_B_P: np.ndarray) -> np.ndarray:
    """stats_B: `statistic(problem indices)` for each resample (None becomes NaN). For statistics that
    are not ratios of per-problem sums (ECE, Brier)."""
    out = np.empty(len(idx_B_P), dtype=np.float64)
    for b, row in enumerate(idx_B_P):
        value = statistic(row)
        out[b] = math.nan if value is None else value
    return out
