"""A rollout that makes no progress is an error that says what is stuck (DESIGN.md invariant 3)."""

from __future__ import annotations

import asyncio

import pytest

from tirl.errors import StalledError
from tirl.rollout.watchdog import Progress, guard


def test_stall_raises_with_report():
    progress = Progress()

    async def stuck():
        progress.mark(("g0", 1), "running tools of turn 0")
        await asyncio.sleep(30)

    with pytest.raises(StalledError, match=r"\('g0', 1\): running tools of turn 0"):
        asyncio.run(guard(stuck(), progress, stall_timeout_s=0.3, poll_s=0.05))


def test_progress_keeps_it_alive():
    progress = Progress()

    async def busy():
        for i in range(8):
            progress.mark((i,), "generating")
            await asyncio.sleep(0.05)
        return "done"

    assert asyncio.run(guard(busy(), progress, stall_timeout_s=0.2, poll_s=0.02)) == "done"
