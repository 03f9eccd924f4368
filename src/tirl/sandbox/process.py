"""One running sandbox: start it, send it cells, read its answers, kill it.

Processes are spawned by one long-lived daemon thread (`_Spawner`): bubblewrap's `--die-with-parent`
fires when the *thread* that spawned it exits, and spawning never forks the trainer with a
`preexec_fn` (the command line itself drops privileges, joins cgroups and isolates). Messages are
read without blocking through the running event loop (`add_reader`), so a sandbox can be used from
any event loop, one after another.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from typing import Any

from tirl.sandbox.isolation import (
    WORKER,
    UID_BASE,
    LaunchSpec,
    SandboxUnavailableError,
    bwrap_command,
    explain_failure,
    host_command,
    launcher_command,
    make_workspace,
    running_as_root,
    sandbox_env,
)

MAX_MESSAGE_BYTES = 1 << 22
"""A worker message longer than this means a broken worker (outputs are capped far below it)."""
KILL_GRACE_S = 3.0
"""Seconds past a call's time limit before the host kills the whole sandbox itself."""


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one execution produced."""

    status: str
    """ok | error (the code raised) | timeout | crashed (the interpreter died: memory, signal, exit)."""
    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    """repr of the last expression's value, when it is not None."""
    error: str | None = None
    """Short traceback or the reason of a timeout/crash."""
    state_lost: bool = False
    """The session's variables are gone (after a timeout or crash)."""
    new_session: bool = False
    """The code ran in a fresh interpreter (first call, stateless mode, or after a loss)."""
    duration_s: float = 0.0


class SandboxCrashed(RuntimeError):
    """The sandbox itself (not just the session) died or broke its protocol."""


class _Spawner:
    """A daemon thread that starts every sandbox process (see the module docstring)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, name="tirl-sandbox-spawner", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)

    async def spawn(self, fn) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, future))
        return await asyncio.wrap_future(future)


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        return _spawner


class SandboxProcess:
    """A started sandbox holding a zygote (see `tirl.sandbox.worker`); one session at a time."""

    def __init__(self, spec: LaunchSpec, slot: int):
        self.spec = spec
        self.slot = slot
        self.proc: subprocess.Popen | None = None
        self.cgroup_paths: list = []
        self.host_workspace: str | None = None
        self.preloaded: list[str] = []
        self._buffer = bytearray()
        self.busy = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout_s: float) -> None:
        """Spawn and wait for the worker's ready message; `SandboxUnavailableError` if it never comes."""
        self.proc = await spawner().spawn(self._popen)
        os.set_blocking(self.proc.stdout.fileno(), False)
        try:
            ready = await self._read_message(time.monotonic() + timeout_s)
        except (SandboxCrashed, TimeoutError) as e:
            stderr = self._stderr_tail()
            self.kill()
            raise SandboxUnavailableError(explain_failure(self.spec.level, stderr or str(e))) from None
        if ready.get("event") != "ready":
            self.kill()
            raise SandboxUnavailableError(f"sandbox worker sent {ready!r} instead of its ready message")
        self.preloaded = ready.get("preloaded", [])
        self.failed_preloads = ready.get("failed", {})

    def _popen(self) -> subprocess.Popen:
        spec, fds = self.spec, []
        if spec.cgroups is not None:
            memory = spec.limits.memory_mb * 2**20 + 256 * 2**20  # the session plus the preloaded zygote
            self.cgroup_paths = spec.cgroups.create(f"sb{self.slot}", memory, spec.limits.processes)
        try:
            if spec.level == "bwrap":
                worker_fd = _memfd("tirl-worker", WORKER.read_bytes())
                seccomp_fd = _memfd("tirl-seccomp", spec.seccomp_bpf) if spec.seccomp_bpf else None
                fds = [worker_fd] + ([seccomp_fd] if seccomp_fd is not None else [])
                inner = bwrap_command(spec, worker_fd, seccomp_fd)
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
            else:
                self.host_workspace = make_workspace(self.slot, spec.level != "none")
                inner = host_command(spec, self.host_workspace)
                env = sandbox_env(self.host_workspace)
            cmd = launcher_command(spec, self.slot, self.cgroup_paths, inner)
            return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=fds, env=env, cwd="/", start_new_session=True, close_fds=True)
        finally:
            for fd in fds:
                os.close(fd)

    async def execute(self, code: str, fresh: bool, timeout_s: float) -> CellResult:
        """Run one cell; raises `SandboxCrashed` when the sandbox itself fails (it is then killed)."""
        request = {"op": "exec", "code": code, "fresh": fresh, "timeout_s": timeout_s}
        message = await self._roundtrip(request, timeout_s + KILL_GRACE_S)
        fields = {f.name for f in dataclasses.fields(CellResult)}
        return CellResult(**{k: v for k, v in message.items() if k in fields})

    async def reset(self) -> None:
        """End the session (kill its processes, wipe its files); the next cell starts fresh."""
        await self._roundtrip({"op": "reset"}, KILL_GRACE_S * 3)

    async def _roundtrip(self, request: dict, limit_s: float) -> dict:
        if not self.alive:
            raise SandboxCrashed(self._death_reason())
        self.busy = True
        try:
            await self._write(json.dumps(request).encode() + b"\n")
            return await self._read_message(time.monotonic() + limit_s)
        except (SandboxCrashed, TimeoutError, OSError) as e:
            reason = self._death_reason() if not self.alive else f"{type(e).__name__}: {e}"
            self.kill()
            raise SandboxCrashed(reason) from None
        except BaseException:  # cancelled mid-call: the answer would arrive out of turn later
            self.kill()
            raise
        finally:
            self.busy = False

    async def _write(self, data: bytes) -> None:
        fd = self.proc.stdin.fileno()
        os.set_blocking(fd, False)
        loop = asyncio.get_running_loop()
        while data:
            try:
                data = data[os.write(fd, data):]
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_writer(fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)

    async def _read_message(self, deadline: float) -> dict:
        fd = self.proc.stdout.fileno()
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buffer:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the sandbox did not answer in time") from None
                ready = loop.create_future()
                loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
                try:
                    await asyncio.wait_for(ready, remaining)
                except TimeoutError:
                    pass
                finally:
                    loop.remove_reader(fd)
                continue
            if not chunk:
                raise SandboxCrashed(self._death_reason())
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE_BYTES:
                raise SandboxCrashed("the sandbox worker sent an oversized message")
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            message = json.loads(line)
        except ValueError:
            raise SandboxCrashed("the sandbox worker sent a malformed message") from None
        if not isinstance(message, dict):
            raise SandboxCrashed("the sandbox worker sent a malformed message")
        return message

    def _death_reason(self) -> str:
        if self.proc is None:
            return "the sandbox was never started"
        code = self.proc.poll()
        if code is None:
            return "the sandbox stopped answering"
        if code < 0:
            return f"the sandbox was killed by signal {signal.Signals(-code).name}"
        return f"the sandbox exited with status {code}"

    def _stderr_tail(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        fd = self.proc.stderr.fileno()
        os.set_blocking(fd, False)
        try:
            return os.read(fd, 1 << 16).decode(errors="replace")
        except (BlockingIOError, OSError):
            return ""

    def kill(self) -> None:
        """Kill the sandbox and everything in it, and release its cgroups and workspace."""
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.spec.level not in ("bwrap", "none") and running_as_root():
            kill_uid(UID_BASE + self.slot)  # without a pid namespace, detached processes outlive the group
        if self.cgroup_paths and self.spec.cgroups is not None:
            self.spec.cgroups.destroy(self.cgroup_paths)
            self.cgroup_paths = []
        if self.host_workspace:
            shutil.rmtree(self.host_workspace, ignore_errors=True)
            self.host_workspace = None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (a dedicated sandbox uid), until none is left."""
    for _ in range(20):
        found = False
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/status") as f:
                    real_uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration, ValueError):
                continue
            if real_uid == uid:
                found = True
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.005)
