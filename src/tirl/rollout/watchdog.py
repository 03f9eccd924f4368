"""Stall detection for rollouts (DESIGN.md invariant 3): no progress for N seconds is an error
that says which trajectories are stuck and where, instead of a silent hang."""

from __future__ import annotations

import asyncio
import time

from tirl.errors import StalledError


class Progress:
    """Where each running trajectory is; `mark` records progress."""

    def __init__(self) -> None:
        self.states: dict[tuple, tuple[str, float]] = {}
        self.last = time.monotonic()

    def mark(self, key: tuple, state: str) -> None:
        """Trajectory `key` entered `state` (e.g. 'generating turn 2')."""
        now = time.monotonic()
        self.states[key] = (state, now)
        self.last = now

    def done(self, key: tuple) -> None:
        """Trajectory `key` finished."""
        self.states.pop(key, None)
        self.last = time.monotonic()

    def report(self) -> str:
        now = time.monotonic()
        rows = sorted(self.states.items(), key=lambda kv: kv[1][1])[:20]
        return "; ".join(f"{k}: {s} for {now - t:.0f}s" for k, (s, t) in rows) or "(none)"


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
            task.cancel()
            raise StalledError(f"rollout made no progress for {stall_timeout_s:.0f}s; stuck trajectories: "
                               f"{progress.report()}")
