"""Summary statistics of trajectories, shared by training steps and evaluation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tirl.types import StopReason, ToolResult, ToolStatus, Trajectory


def trajectory_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Reward, accuracy, tool use, error rates by status, stop reasons, lengths (all means/rates)."""
    n = len(trajs)
    if n == 0:
        return {}
    m: dict[str, float] = {"reward/mean": _mean(t.reward for t in trajs)}
    for name in sorted({k for t in trajs for k in t.reward_components}):
        m[f"reward/{name}"] = _mean(t.reward_components.get(name, 0.0) for t in trajs)
    judged = [t for t in trajs if t.correct is not None]
    if judged:
        m["accuracy"] = _mean(1.0 if t.correct else 0.0 for t in judged)
    results = [r for t in trajs for r in t.tool_results]
    m["tool_calls/mean"] = len(results) / n
    m["tool_calls/rate"] = _mean(1.0 if t.tool_results else 0.0 for t in trajs)
    counts = Counter(r.status for r in results)
    m["tool_calls/invalid_rate"] = (sum(c for s, c in counts.items() if s != ToolStatus.OK) / len(results)
                                    if results else 0.0)
    for status in ToolStatus:
        m[f"tool_status/{status.value}"] = float(counts.get(status, 0))
    m.update(per_tool_metrics(results))
    stops = Counter(t.stop_reason for t in trajs)
    for reason in StopReason:
        m[f"stop/{reason.value}"] = stops.get(reason, 0) / n
    m["tokens/sampled_mean"] = _mean(t.num_sampled_tokens for t in trajs)
    m["tokens/response_mean"] = _mean(len(t.response_ids) for t in trajs)
    m["turns/mean"] = _mean(len(t.turns) for t in trajs)
    return m


UNRESOLVED = "_unresolved"
"""Metric name for calls that named no runnable tool (unparseable or unknown names): keys stay bounded."""
OTHER_TOOLS = "_other"
"""Metric name for the tools past the `MAX_TOOL_KEYS` most called (tasks with thousands of functions)."""
MAX_TOOL_KEYS = 16


def per_tool_metrics(results: Sequence[ToolResult]) -> dict[str, float]:
    """Per tool: `tool/<name>/calls` and `tool/<name>/status/<status>` counts, and the clock readings
    `time/tool/<name>/latency_mean_s` and `latency_max_s` (under time/, like every clock reading)."""
    unresolved = (ToolStatus.INVALID_CALL, ToolStatus.UNKNOWN_TOOL)
    # A call past the budget is not resolved; its name counts only if some call of that name ran.
    ran = {r.name for r in results if r.status not in (*unresolved, ToolStatus.BUDGET_EXCEEDED)}
    by_tool: dict[str, list[ToolResult]] = {}
    for r in results:
        known = r.name and r.status not in unresolved and (r.status != ToolStatus.BUDGET_EXCEEDED or r.name in ran)
        by_tool.setdefault(r.name if known else UNRESOLVED, []).append(r)
    named = sorted((k for k in by_tool if k != UNRESOLVED), key=lambda k: (-len(by_tool[k]), k))
    for name in named[MAX_TOOL_KEYS:]:
        by_tool.setdefault(OTHER_TOOLS, []).extend(by_tool.pop(name))
    m: dict[str, float] = {}
    for name, rs in sorted(by_tool.items()):
        m[f"tool/{name}/calls"] = float(len(rs))
        m[f"time/tool/{name}/latency_mean_s"] = _mean(r.latency_s for r in rs)
        m[f"time/tool/{name}/latency_max_s"] = max(r.latency_s for r in rs)
        for status, count in sorted(Counter(r.status.value for r in rs).items()):
            m[f"tool/{name}/status/{status}"] = float(count)
    return m


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0
