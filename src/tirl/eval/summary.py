"""An evaluation's summary from its trajectories: every metric with a bootstrap interval over problems,
and the terminal table that shows them.

Problems are the resampling unit: the k samples of a problem are drawn together, so an interval reflects
how much the number would move on another draw of problems of the same kind. Most metrics are a ratio of
sums over problems (accuracy = correct samples / samples, tool productivity = correct samples / tool
calls), which keeps them equal to the pooled per-sample rates and lets the bootstrap run vectorised.

Keys of the summary (flat, each value a float or None where undefined, each interval in `ci[key]`):

- `accuracy`: correct samples / samples (a sample the task cannot judge counts as not correct).
- `pass@k` for k = 1..n (n samples per problem): the unbiased estimator, averaged over problems.
- `mean@n`: mean over problems of the share of their n samples that are correct.
- `tool_calls/mean`: tool calls per problem (per sample; with n samples, their mean); `tool_calls/rate`:
  share of samples that call a tool at least once.
- `tool_productivity`: OTC's correct samples / tool calls; None when no call was made.
- `tool_calls/valid_rate`: share of calls that were well formed (parsed, known tool, arguments valid:
  any status but invalid_call, unknown_tool, validation_error); `tool_calls/success_rate`: share that
  ran (ok or output_truncated); `tool_calls/error_rate` = 1 - success rate; `tool_status_rate/<status>`:
  share of calls per status. All None without calls.
- `turns/mean`, `tokens/sampled_mean` (tokens the model generated), `tokens/response_mean` (with tool
  output), `tokens/prompt_mean`: per sample.
- Where the reward asks for a confidence (a calibration reward, whose components hold
  `confidence_missing`): `calibration/ece` (equal-width bins), `calibration/brier`, both over the samples
  that stated one, and `calibration/coverage`, the share that did.

The summary also keeps `trajectory_metrics`' keys (stop reasons, per-tool counts and latencies, reward
components; no intervals), with the keys above taking precedence.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tirl.eval import metrics as M
from tirl.rollout.metrics import trajectory_metrics
from tirl.types import ToolStatus, Trajectory

MALFORMED = (ToolStatus.INVALID_CALL, ToolStatus.UNKNOWN_TOOL, ToolStatus.VALIDATION_ERROR)
"""Statuses of calls that were not well formed (tool-call validity counts every other status)."""


@dataclass(frozen=True)
class ProblemOutcome:
    """The samples of one problem, added up (sums, so that metrics are ratios of sums over problems)."""

    task_id: str
    samples: int
    """Trajectories of the problem."""
    correct: int
    """Samples whose answer was right (correct is True)."""
    judged: int
    """Samples whose correctness the task could tell (correct is not None)."""
    tool_calls: int
    """Tool-call attempts, errors included."""
    samples_with_calls: int
    well_formed_calls: int
    ran_calls: int
    """Calls whose tool ran (ok or output_truncated)."""
    status_counts: Mapping[str, int]
    turns: int
    sampled_tokens: int
    response_tokens: int
    prompt_tokens: int
    asked_confidence: int = 0
    """Samples scored by a reward that reads a stated confidence."""
    confidences: tuple[tuple[float, bool], ...] = field(default_factory=tuple)
    """(confidence, correct) of each sample that stated a confidence."""


def problem_outcomes(trajs: Sequence[Trajectory]) -> list[ProblemOutcome]:
    """One outcome per problem (`meta.task_id`), in order of first appearance."""
    by_problem: dict[str, list[Trajectory]] = {}
    for t in trajs:
        by_problem.setdefault(t.meta.task_id, []).append(t)
    return [_outcome(task_id, ts) for task_id, ts in by_problem.items()]


def _outcome(task_id: str, trajs: list[Trajectory]) -> ProblemOutcome:
    results = [r for t in trajs for r in t.tool_results]
    statuses = Counter(r.status.value for r in results)
    asked, stated = 0, []
    for t in trajs:
        confidence = _component(t.reward_components, "confidence_missing")
        if confidence is None:
            continue
        asked += 1
        q = _component(t.reward_components, "confidence")
        if q is not None:
            stated.append((float(q), bool(t.correct)))
    return ProblemOutcome(
        task_id=task_id, samples=len(trajs), correct=sum(t.correct is True for t in trajs),
        judged=sum(t.correct is not None for t in trajs), tool_calls=len(results),
        samples_with_calls=sum(bool(t.tool_results) for t in trajs),
        well_formed_calls=sum(r.status not in MALFORMED for r in results), ran_calls=sum(r.ok for r in results),
        status_counts=dict(statuses), turns=sum(len(t.turns) for t in trajs),
        sampled_tokens=sum(t.num_sampled_tokens for t in trajs),
        response_tokens=sum(len(t.response_ids) for t in trajs), prompt_tokens=sum(len(t.prompt_ids) for t in trajs),
        asked_confidence=asked, confidences=tuple(stated))


def _component(components: Mapping[str, float], name: str) -> float | None:
    """A reward component by name, also when a combinator prefixed it (`rlcr_brier.confidence`)."""
    if name in components:
        return components[name]
    return next((v for k, v in components.items() if k.endswith("." + name)), None)


# ----------------------------------------------------------------------------- metrics with intervals

Ratio = tuple[np.ndarray, np.ndarray]
"""(numerator_P, denominator_P): the metric is sum(numerator) / sum(denominator)."""


def ratio_metrics(outcomes: Sequence[ProblemOutcome]) -> dict[str, Ratio]:
    """Every metric that is a ratio of per-problem sums, by summary key (see the module docstring)."""
    def col(get: Callable[[ProblemOutcome], float]) -> np.ndarray:
        return np.array([get(o) for o in outcomes], dtype=np.float64)

    samples, calls, correct, ones = col(lambda o: o.samples), col(lambda o: o.tool_calls), col(
        lambda o: o.correct), np.ones(len(outcomes))
    out: dict[str, Ratio] = {}
    if any(o.judged for o in outcomes):
        n = min(o.samples for o in outcomes)
        out["accuracy"] = (correct, samples)
        for k in M.pass_at_k_ks(n):
            out[f"pass@{k}"] = (col(lambda o: M.pass_at_k(o.samples, o.correct, k)), ones)
        out[f"mean@{n}"] = (correct / samples, ones)
        out["tool_productivity"] = (correct, calls)
    out["tool_calls/mean"] = (calls, samples)
    out["tool_calls/rate"] = (col(lambda o: o.samples_with_calls), samples)
    out["tool_calls/valid_rate"] = (col(lambda o: o.well_formed_calls), calls)
    out["tool_calls/success_rate"] = (col(lambda o: o.ran_calls), calls)
    out["tool_calls/error_rate"] = (calls - col(lambda o: o.ran_calls), calls)
    for status in ToolStatus:
        out[f"tool_status_rate/{status.value}"] = (col(lambda o: o.status_counts.get(status.value, 0)), calls)
    out["turns/mean"] = (col(lambda o: o.turns), samples)
    out["tokens/sampled_mean"] = (col(lambda o: o.sampled_tokens), samples)
    out["tokens/response_mean"] = (col(lambda o: o.response_tokens), samples)
    out["tokens/prompt_mean"] = (col(lambda o: o.prompt_tokens), samples)
    if any(o.asked_confidence for o in outcomes):
        stated = col(lambda o: len(o.confidences))
        out["calibration/coverage"] = (stated, col(lambda o: o.asked_confidence))
        out["calibration/brier"] = (col(lambda o: sum((q - c) ** 2 for q, c in o.confidences)), stated)
    return out


def ece_statistic(outcomes: Sequence[ProblemOutcome], bins: int) -> Callable[[np.ndarray], float | None]:
    """ECE of the samples of the problems at the given indices (repeats count repeatedly); None when
    none of them stated a confidence."""
    q = np.array([q for o in outcomes for q, _ in o.confidences], dtype=np.float64)
    c = np.array([c for o in outcomes for _, c in o.confidences], dtype=np.float64)
    owner = np.array([i for i, o in enumerate(outcomes) for _ in o.confidences], dtype=np.int64)

    def ece(problem_idx: np.ndarray) -> float | None:
        weight = np.bincount(problem_idx, minlength=len(outcomes))[owner] if len(owner) else owner
        if len(owner) == 0 or weight.sum() == 0:
            return None
        return M.expected_calibration_error(q, c, bins, weight)

    return ece


def summarize(trajs: Sequence[Trajectory], *, resamples: int = 1000, level: float = 0.95, seed: int = 0,
              bins: int = 10) -> dict[str, Any]:
    """Every metric of the module docstring, with `ci[key] = [low, high]` (percentile bootstrap over
    problems, `resamples` seeded draws; None where the metric is undefined in every draw). No
    intervals when `resamples` is 0."""
    outcomes = problem_outcomes(trajs)
    if not outcomes:
        return {}
    summary: dict[str, Any] = {"problems": len(outcomes), "samples": len(trajs),
                               "samples_per_problem": min(o.samples for o in outcomes), **trajectory_metrics(trajs)}
    ratios = ratio_metrics(outcomes)
    for key, (num, den) in ratios.items():
        summary[key] = M.ratio(num.sum(), den.sum())
    ece = ece_statistic(outcomes, bins) if "calibration/brier" in ratios else None
    if ece is not None:
        summary["calibration/ece"] = ece(np.arange(len(outcomes)))
    summary["ci"] = {}
    if resamples:
        idx_B_P = M.bootstrap_indices(len(outcomes), resamples, seed)
        for key, (num, den) in ratios.items():
            summary["ci"][key] = _interval(M.bootstrap_ratio(num, den, idx_B_P), level)
        if ece is not None:
            summary["ci"]["calibration/ece"] = _interval(M.bootstrap_statistic(ece, idx_B_P), level)
    summary["bootstrap"] = {"method": "percentile", "unit": "problem", "resamples": resamples, "level": level,
                            "seed": seed}
    return summary


def _interval(stats_B: np.ndarray, level: float) -> list[float] | None:
    interval = M.percentile_interval(stats_B, level)
    return None if interval is None else list(interval)


# ----------------------------------------------------------------------------- terminal table

_ROWS = (("tool_calls/mean", "tool calls per problem"),
         ("tool_calls/rate", "share of samples calling a tool"), ("tool_productivity", "tool productivity (OTC)"),
         ("tool_calls/valid_rate", "well-formed calls"), ("tool_calls/error_rate", "tool-call errors"),
         ("turns/mean", "turns"), ("tokens/sampled_mean", "sampled tokens"),
         ("calibration/ece", "calibration ECE"), ("calibration/brier", "Brier score"),
         ("calibration/coverage", "confidence stated"))


def table_rows(summary: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, interval) rows for display: pass@k at 1, 2, 4, ..., n and the main metrics present."""
    n = int(summary.get("samples_per_problem", 1))
    keys = [("accuracy", "accuracy")]
    if n > 1:
        keys += [(f"pass@{k}", f"pass@{k}") for k in M.standard_ks(n)]
        keys += [(f"mean@{n}", f"mean@{n}")]
    keys += list(_ROWS)
    rows = []
    for key, label in keys:
        if key not in summary:
            continue
        ci = summary.get("ci", {}).get(key)
        rows.append((label, _fmt(summary[key]), "" if ci is None else f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"))
    return rows


def summary_table(name: str, summary: Mapping[str, Any]):
    """A rich table: metric, value, interval (its level in the header)."""
    from rich.table import Table

    level = summary.get("bootstrap", {}).get("level", 0.95)
    table = Table(title=f"{name}: {summary.get('problems', 0)} problems x {summary.get('samples_per_problem', 1)} "
                        f"sample(s)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column(f"{level:.0%} CI", justify="right")
    for row in table_rows(summary):
        table.add_row(*row)
    return table


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
