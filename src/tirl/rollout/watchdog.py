"""Stall detection for rollouts (DESIGN.md invariant 3): no progress for N seconds is an error
that says which trajectories are stuck and where, instead of a silent hang."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tirl.errors import StalledError


class Progress:
    """Where each running trajectory is; `mark` records progress."""

    def __init__(self) -> None:
        self.states: dict[tuple, tuple[str, float, Callable[[], str] | None]] = {}
        self.last = time.monotonic()

    def mark(self, key: tuple, state: str, detail: Callable[[], str] | None = None) -> None:
        """Trajectory `key` entered `state` (e.g. 'generating turn 2'); `detail()` is asked for what exactly
        it is doing when a report is written (e.g. which tool calls are running)."""
        now = time.monotonic()
        self.states[key] = (state, now, detail)
        self.last = now

    def done(self, key: tuple) -> None:
        """Trajectory `key` finished."""
        self.states.pop(key, None)
        self.last = time.monotonic()

    def report(self, limit: int = 20) -> str:
        """One line per running trajectory, longest-waiting first: its key, state, for how long, detail."""
        now = time.monotonic()
        rows = sorted(self.states.items(), key=lambda kv: kv[1][1])
        lines = [f"  {k}: {s} for {now - t:.0f}s{_detail(d)}" for k, (s, t, d) in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more")
        return "\n".join(lines) or "  (none)"


async def guard(coro, progress: Progress, stall_timeout_s: float | None, poll_s: float = 1.0):
    """Await `coro`; raise StalledError if `progress` sees no mark for `stall_timeout_s` seconds."""
    task = asyncio.ensure_future(coro)
    if not stall_timeout_s:
        return await task
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if time.monotonic() - progress.last > stall_timeout_s:
            report = progress.report()
            task.cancel()
            raise StalledError(f"rollout made no progress for {stall_timeout_s:.0f}s (rollout.stall_timeout_s); "
                               f"{len(progress.states)} trajectories are stuck:\n{report}")


def _detail(detail: Callable[[], str] | None) -> str:
    if detail is None:
        return ""
    try:
        text = detail()
    except Exception as e:  # noqa: BLE001 - a report must never fail
        text = f"(no detail: {type(e).__name__})"
    return f" ({text})" if text else ""
