"""Warm sandboxes shared by many trajectories: `SandboxPool` and per-trajectory `Session`s.

A sandbox, once started (bubblewrap + Python + preloaded modules: tens to hundreds of ms), serves
many sessions one after another: each session is a process forked from the sandbox's zygote, and
ending it kills every process it made and wipes /tmp and the workspace, so the next session starts
as clean as a new sandbox (only SysV IPC objects of the sandbox's private IPC namespace could
outlive a session). Sandboxes are started on demand, as many as sessions are open at once (a
trajectory opens one at its first call), unless `max_sandboxes` caps them to bound memory; past the
cap, a new session takes the sandbox of the least recently used idle session, whose state is then
lost (it is told so at its next call, and the first eviction is announced). `stateless` calls borrow a sandbox for one fresh execution.
"""

from __future__ import annotations

import asyncio
import sys
import time

from tirl.sandbox.isolation import LaunchSpec
from tirl.sandbox.process import CellResult, SandboxCrashed, SandboxProcess

ACQUIRE_POLL_S = 0.01


class SandboxPool:
    """Started sandboxes of one `LaunchSpec`, reused across sessions and event loops."""

    def __init__(self, spec: LaunchSpec, max_sandboxes: int | None = None, start_timeout_s: float = 60.0):
        self.spec = spec
        self.max_sandboxes = max_sandboxes
        self.start_timeout_s = start_timeout_s
        self.idle: list[SandboxProcess] = []
        self.holders: dict[SandboxProcess, Session | None] = {}
        """Every live sandbox -> the session holding it (None while a stateless call or a start uses it)."""
        self.closed = False
        self.started = 0
        """Sandboxes started so far (a metric of how warm the pool stays)."""
        self.evictions = 0
        """Sessions whose sandbox was taken for another session (their state was lost)."""

    def _free_slot(self) -> int:
        used = {sb.slot for sb in self.holders}
        return next(k for k in range(len(used) + 1) if k not in used)

    async def acquire(self, holder: Session | None, wait_s: float = 120.0) -> SandboxProcess:
        """An idle sandbox, a new one, or one taken from the least recently used idle session."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.closed:
                raise SandboxCrashed("the sandbox pool is shut down")
            while self.idle:
                sb = self.idle.pop()
                if sb.alive:
                    self.holders[sb] = holder
                    return sb
                self._forget(sb)
            if self.max_sandboxes is None or len(self.holders) < self.max_sandboxes:
                return await self._start(holder)
            victim = self._eviction_candidate()
            if victim is not None:
                if not self.evictions:
                    print(f"tirl sandbox: more than max_sandboxes={self.max_sandboxes} sessions are open; idle "
                          "sessions lose their interpreter state (raise tools.python.max_sandboxes to avoid it)",
                          file=sys.stderr)
                self.evictions += 1
                sb = victim.sandbox
                victim.evict()
                await self._reset_or_kill(sb)
                if sb.alive:
                    self.holders[sb] = holder
                    return sb
                continue
            if time.monotonic() > deadline:
                raise SandboxCrashed(f"all {self.max_sandboxes} sandboxes stayed busy for {wait_s:g} s")
            await asyncio.sleep(ACQUIRE_POLL_S)

    async def _start(self, holder: Session | None) -> SandboxProcess:
        sb = SandboxProcess(self.spec, self._free_slot())
        self.holders[sb] = holder
        try:
            await sb.start(self.start_timeout_s)
        except BaseException:
            self._forget(sb)
            sb.kill()
            raise
        self.started += 1
        return sb

    def _eviction_candidate(self) -> Session | None:
        sessions = [s for s in self.holders.values() if s is not None and s.sandbox is not None and not s.sandbox.busy]
        return min(sessions, key=lambda s: s.last_used, default=None)

    async def release(self, sb: SandboxProcess, needs_reset: bool) -> None:
        """Give a sandbox back (reset first when a session used it); a broken one is killed."""
        if needs_reset:
            await self._reset_or_kill(sb)
        if sb.alive and not self.closed:
            self.holders[sb] = None
            self.idle.append(sb)
        else:
            self._forget(sb)
            sb.kill()

    async def _reset_or_kill(self, sb: SandboxProcess) -> None:
        try:
            await sb.reset()
        except SandboxCrashed:
            sb.kill()

    def _forget(self, sb: SandboxProcess) -> None:
        self.holders.pop(sb, None)

    async def run(self, code: str, timeout_s: float) -> CellResult:
        """Run `code` in a fresh interpreter (stateless mode); the sandbox is wiped afterwards."""
        sb = await self.acquire(None)
        try:
            result = await sb.execute(code, fresh=True, timeout_s=timeout_s)
        except SandboxCrashed as e:
            self._forget(sb)
            return CellResult(status="crashed", error=f"the sandbox died: {e}", new_session=True)
        await self.release(sb, needs_reset=False)
        return result

    def session(self) -> Session:
        return Session(self)

    def close(self) -> None:
        """Kill every sandbox (sessions still open see their state lost)."""
        self.closed = True
        for sb in list(self.holders):
            sb.kill()
        self.holders.clear()
        self.idle.clear()


class Session:
    """One trajectory's persistent interpreter: variables survive between calls until it is closed."""

    def __init__(self, pool: SandboxPool):
        self.pool = pool
        self.sandbox: SandboxProcess | None = None
        self.last_used = time.monotonic()
        self.calls = 0

    def evict(self) -> None:
        """Called by the pool when it takes this session's sandbox for another session."""
        self.sandbox = None

    async def run(self, code: str, timeout_s: float) -> CellResult:
        """Run a cell. `state_lost` says this call lost the state (timeout, crash); `new_session` on a
        call after the first says earlier state was already gone (lost, or the sandbox was taken)."""
        if self.sandbox is None:
            self.sandbox = await self.pool.acquire(self)
        self.last_used = time.monotonic()
        self.calls += 1
        try:
            result = await self.sandbox.execute(code, fresh=False, timeout_s=timeout_s)
        except SandboxCrashed as e:
            self.pool._forget(self.sandbox)
            self.sandbox = None
            return CellResult(status="crashed", error=f"the sandbox died: {e}", state_lost=True)
        return result

    async def close(self) -> None:
        if self.sandbox is not None:
            sb, self.sandbox = self.sandbox, None
            await self.pool.release(sb, needs_reset=True)
