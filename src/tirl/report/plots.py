"""PNG plots of a run: training curves from metrics.jsonl and a before/after bar chart of the evals.

matplotlib is imported lazily and used through `matplotlib.figure.Figure` (the Agg renderer, no
pyplot state, no display). A plot whose metrics the run did not log is left out, never drawn empty.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

MATPLOTLIB_HINT = "plots need matplotlib: pip install 'tirl[report]'"


@dataclass(frozen=True)
class PlotSpec:
    """One training-curve plot: the metrics (fnmatch patterns) of one stage drawn against the step."""

    name: str
    """File stem of the PNG."""
    title: str
    stage: str
    """Metrics stage: `rl` or `sft`."""
    patterns: tuple[str, ...]
    """Metric names or fnmatch patterns (`reward/*`); series appear in this order, then by name."""
    ylabel: str
    nonzero_only: bool = False
    """Leave out series that are zero at every step (status and stop-reason families)."""


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("reward", "Reward and its components", "rl", ("reward/mean", "reward/*"), "mean over samples"),
    PlotSpec("accuracy", "Accuracy of the training samples", "rl", ("accuracy", "accuracy/*"), "share correct"),
    PlotSpec("tool_calls", "Tool calls", "rl", ("tool_calls/mean", "tool_calls/rate", "turns/mean"),
             "per trajectory / share"),
    PlotSpec("tool_errors", "Tool errors", "rl", ("tool_calls/invalid_rate", "rollout/failed_rate"),
             "share of calls / of samples"),
    PlotSpec("tool_status", "Tool results by status", "rl", ("tool_status/*",), "calls per step", nonzero_only=True),
    PlotSpec("per_tool", "Calls per tool", "rl", ("tool/*/calls",), "calls per step"),
    PlotSpec("stop_reasons", "Why trajectories ended", "rl", ("stop/*",), "share of samples", nonzero_only=True),
    PlotSpec("length", "Response length", "rl", ("tokens/sampled_mean", "tokens/response_mean"), "tokens"),
    PlotSpec("entropy", "Policy entropy", "rl", ("train/entropy",), "nats per token"),
    PlotSpec("kl", "KL divergence", "rl", ("train/kl", "train/ppo_kl"), "nats per token"),
    PlotSpec("clip_fraction", "Clip fraction", "rl", ("train/pg_clipfrac", "train/pg_clipfrac_lower",
                                                      "critic/vf_clipfrac"), "share of tokens"),
    PlotSpec("loss", "Training loss", "rl", ("train/loss",), "loss"),
    PlotSpec("grad_norm", "Gradient norm (before clipping)", "rl", ("train/grad_norm",), "norm"),
    PlotSpec("throughput", "Generation throughput", "rl", ("speed/tokens_per_s", "speed/prefill_tokens_per_s"),
             "tokens per second"),
    PlotSpec("step_time", "Time per step", "rl", ("time/step_s", "time/rollout_s", "time/update_s"), "seconds"),
    PlotSpec("sft_loss", "SFT loss", "sft", ("train/loss", "train/nll"), "loss"),
)

EVAL_BARS: tuple[tuple[str, str], ...] = (
    ("accuracy", "accuracy"), ("reward/mean", "reward"), ("tool_calls/rate", "tool-call rate"),
    ("tool_calls/invalid_rate", "invalid calls"), ("stop/answered", "answered"))
"""(summary key, label) of the eval bar chart; error bars from the summary's `ci[key]` where present."""


@dataclass(frozen=True)
class Plot:
    """A rendered plot."""

    name: str
    title: str
    png: bytes


Series = tuple[str, list[int], list[float]]
"""(metric name, steps, values): finite values only."""


def select_series(records: Sequence[dict[str, Any]], spec: PlotSpec) -> list[Series]:
    """The series of `spec` present in `records` (one stage's records, by step); empty if none."""
    keys = sorted({k for r in records for k in r if k not in ("stage", "step")})
    chosen: list[str] = []
    for pattern in spec.patterns:
        chosen += [k for k in keys if fnmatchcase(k, pattern) and k not in chosen]
    out = []
    for key in chosen:
        points = [(r["step"], float(r[key])) for r in records if _is_number(r.get(key))]
        if not points or (spec.nonzero_only and all(v == 0 for _, v in points)):
            continue
        out.append((key, [s for s, _ in points], [v for _, v in points]))
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _figure_class():
    """matplotlib's Figure, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def render_training_plots(records_by_stage: dict[str, list[dict[str, Any]]]) -> list[Plot]:
    """A PNG per `PLOTS` entry whose metrics are present. Raises ImportError (naming the pip command)
    without matplotlib."""
    figure = _require_matplotlib()
    plots = []
    for spec in PLOTS:
        series = select_series(records_by_stage.get(spec.stage, []), spec)
        if series:
            plots.append(Plot(spec.name, spec.title, _line_png(figure, spec, series)))
    return plots


def _line_png(figure, spec: PlotSpec, series: list[Series]) -> bytes:
    fig = figure(figsize=(5.6, 3.0), dpi=100)
    fig.subplots_adjust(left=0.15, right=0.97, top=0.9, bottom=0.15)  # fixed: a layout engine draws twice
    ax = fig.add_subplot()
    for key, steps, values in series:
        ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3, linewidth=1.4, label=key)
    ax.set_title(spec.title, fontsize=10)
    ax.set_xlabel(f"{spec.stage.upper()} step", fontsize=8)
    ax.set_ylabel(spec.ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if len(series) > 1 or series[0][0] != spec.patterns[0]:
        ax.legend(fontsize=7, frameon=False)
    return _png(fig)


def render_eval_plot(summaries: dict[str, dict[str, Any]]) -> Plot | None:
    """Grouped bars: one group per `EVAL_BARS` metric that some stage has, one bar per stage (in the
    given order). None when there is no eval stage or none has those metrics."""
    metrics = [(k, label) for k, label in EVAL_BARS if any(_is_number(s.get(k)) for s in summaries.values())]
    if not summaries or not metrics:
        return None
    figure = _require_matplotlib()
    fig = figure(figsize=(8.2, 3.6), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.8, top=0.9, bottom=0.1)
    ax = fig.add_subplot()
    width = 0.8 / len(summaries)
    for i, (name, summary) in enumerate(summaries.items()):
        xs = [m + (i - (len(summaries) - 1) / 2) * width for m in range(len(metrics))]
        values = [float(summary[k]) if _is_number(summary.get(k)) else math.nan for k, _ in metrics]
        bars = ax.bar(xs, values, width * 0.95, label=name, yerr=_error_bars(summary, [k for k, _ in metrics]),
                      error_kw={"elinewidth": 0.8, "capsize": 2, "ecolor": "#333"})
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=2, rotation=90)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.15)  # room for the value labels
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics], fontsize=8)
    ax.set_title("Held-out evaluation by stage", fontsize=10)
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return Plot("eval", "Held-out evaluation by stage", _png(fig))


def _error_bars(summary: dict[str, Any], keys: list[str]) -> list[list[float]] | None:
    """[[below], [above]] distances from each value to its interval `ci[key]` (0 where there is none);
    None when the summary has no intervals."""
    ci = summary.get("ci")
    if not isinstance(ci, dict):
        return None
    below, above = [], []
    for k in keys:
        interval, v = ci.get(k), summary.get(k)
        ok = (isinstance(interval, (list, tuple)) and len(interval) == 2 and _is_number(v)
              and all(_is_number(x) for x in interval))
        below.append(max(0.0, v - interval[0]) if ok else 0.0)
        above.append(max(0.0, interval[1] - v) if ok else 0.0)
    return [below, above]


def _require_matplotlib():
    figure = _figure_class()
    if figure is None:
        raise ImportError(MATPLOTLIB_HINT)
    return figure


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
