"""Running model-written code: isolation levels, warm sandboxes, per-trajectory sessions.

    pool = start_pool(SandboxConfig(isolation="bwrap"))   # probes: fails closed with the cause and fix
    session = pool.session()
    result = await session.run("x = 2\\nx * 21", timeout_s=5)   # CellResult(status="ok", value="42")
    await session.close(); pool.close()

Modules: `isolation` (levels, command lines, requirement checks), `cgroups`, `seccomp`, `process`
(one sandbox), `pool` (many, and sessions), `worker` (what runs inside).
"""

from tirl.sandbox.isolation import LEVELS, Limits, SandboxUnavailableError
from tirl.sandbox.pool import SandboxPool, Session
from tirl.sandbox.process import CellResult, SandboxCrashed
from tirl.sandbox.start import SandboxConfig, start_pool

__all__ = ["LEVELS", "CellResult", "Limits", "SandboxConfig", "SandboxCrashed", "SandboxPool",
           "SandboxUnavailableError", "Session", "start_pool"]
