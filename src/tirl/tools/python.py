"""The `python` tool: model-written code in a sandboxed interpreter (see `tirl.sandbox`).

    task: {tools: [python]}
    tools:
      python: {mode: persistent, isolation: bwrap, timeout_s: 10, preload: [math, numpy, sympy]}

`mode` is a property of the environment and is recorded with the run: `persistent` keeps one
interpreter per trajectory (variables and imports survive between calls, like a notebook; after a
timeout or crash it restarts and the model is told its state was lost), `stateless` runs every call
in a fresh interpreter. The tool description tells the model which one it has.

What the model sees: stdout, then stderr, then the value of the last expression (like a notebook
cell), each cut past a limit with a marker; an error as a short traceback (status
`execution_error`); a time-out as status `timeout`. `timeout_s` is the code's wall-clock limit; the
call as a whole may take `START_ALLOWANCE_S` longer, for starting a sandbox when none is warm.
"""

from __future__ import annotations

from typing import Any, Literal

import pydantic

from tirl.sandbox import CellResult, Limits, SandboxConfig, SandboxPool, Session, start_pool
from tirl.tools.base import Tool
from tirl.tools.providers import ToolSettings, register_provider
from tirl.tools.toolset import ExecutionPolicy
from tirl.types import ToolResult, ToolStatus

DEFAULT_TIMEOUT_S = 10.0
START_ALLOWANCE_S = 30.0
"""Extra seconds a call may take beyond `timeout_s` (a cold sandbox start with preloads)."""
STATE_LOST = "[The interpreter was restarted: all variables and imports from earlier calls are lost.]"
RESTARTED = "[Note: this ran in a new interpreter; variables and imports from earlier calls are gone.]"

_DESCRIPTIONS = {
    "persistent": ("Run Python code in a sandboxed interpreter and return what it prints and the value of its last "
                   "expression. Variables and imports persist between calls, like a notebook. No network access."),
    "stateless": ("Run Python code in a fresh sandboxed interpreter and return what it prints and the value of its "
                  "last expression. Nothing persists between calls. No network access."),
}


class PythonSettings(ToolSettings):
    """Settings of the `python` tool (`tools.python.<key>`)."""

    isolation: Literal["bwrap", "landlock", "rlimits", "none"] = pydantic.Field(
        "bwrap", description="bwrap (default, full isolation); weaker levels only when set here, and loudly.")
    mode: Literal["persistent", "stateless"] = pydantic.Field(
        "persistent", description="persistent: one interpreter per trajectory; stateless: a fresh one per call.")
    preload: list[str] = pydantic.Field(["math", "numpy", "sympy"], description="Modules imported once per sandbox.")
    memory_mb: int = pydantic.Field(1024, ge=16, description="Memory a session may allocate.")
    cpu_s: int = pydantic.Field(60, ge=1, description="CPU seconds per session.")
    file_mb: int = pydantic.Field(64, ge=1, description="Largest file; size of /tmp and of the workspace.")
    processes: int = pydantic.Field(64, ge=4, description="Processes and threads per sandbox.")
    max_output_bytes: int = pydantic.Field(65536, ge=256, description="Bytes kept of stdout and of stderr per call.")
    max_code_chars: int = pydantic.Field(20000, ge=10, description="Longest code accepted.")
    max_sandboxes: int | None = pydantic.Field(None, ge=1, description=(
        "Cap on sandboxes alive at once, to bound memory (default: one per trajectory calling python at once); "
        "past it, idle trajectories lose their interpreter state."))
    seccomp: bool = pydantic.Field(True, description="Add the seccomp filter when pyseccomp is installed.")

    def policy(self) -> ExecutionPolicy:
        timeout = (self.timeout_s or DEFAULT_TIMEOUT_S) + START_ALLOWANCE_S
        return ExecutionPolicy(timeout, self.max_concurrency, self.retries, self.retry_backoff_s)

    def sandbox_config(self) -> SandboxConfig:
        limits = Limits(memory_mb=self.memory_mb, cpu_s=self.cpu_s, file_mb=self.file_mb, processes=self.processes,
                        max_output_bytes=self.max_output_bytes)
        return SandboxConfig(isolation=self.isolation, limits=limits, preload=tuple(self.preload),
                             max_sandboxes=self.max_sandboxes, seccomp=self.seccomp)


class PythonTool(Tool):
    """The shared instance runs each call fresh; `session()` gives a trajectory its interpreter."""

    name = "python"

    def __init__(self, settings: PythonSettings, pool: SandboxPool | None = None, session: Session | None = None):
        self.settings = settings
        self.description = _DESCRIPTIONS[settings.mode]
        self.parameters = {"type": "object", "properties": {"code": {
            "type": "string", "description": "Python source; print() what you need or end with an expression."}},
            "required": ["code"], "additionalProperties": False}
        self.timeout_s = settings.policy().timeout_s
        self.code_timeout_s = settings.timeout_s or DEFAULT_TIMEOUT_S
        self._pool = pool
        self._session = session

    @property
    def pool(self) -> SandboxPool:
        if self._pool is None:
            self._pool = start_pool(self.settings.sandbox_config())
        return self._pool

    def session(self) -> PythonTool:
        if self.settings.mode == "stateless":
            return self
        return PythonTool(self.settings, self.pool, self.pool.session())

    async def run(self, code: str) -> ToolResult:
        if len(code) > self.settings.max_code_chars:
            raise ValueError(f"code is {len(code)} characters long; the limit is {self.settings.max_code_chars}")
        if self._session is not None:
            calls_before = self._session.calls
            result = await self._session.run(code, self.code_timeout_s)
            restarted = result.new_session and calls_before > 0
        else:
            result = await self.pool.run(code, self.code_timeout_s)
            restarted = False
        return render(result, restarted, self.settings.mode == "persistent")

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
        elif self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()

    def describe(self) -> dict[str, Any]:
        return {"isolation": self.settings.isolation, "mode": self.settings.mode, "preload": self.settings.preload,
                "memory_mb": self.settings.memory_mb, "timeout_s": self.code_timeout_s,
                "seccomp": bool(self._pool and self._pool.spec.seccomp_bpf),
                "cgroups": bool(self._pool and self._pool.spec.cgroups)}


def render(result: CellResult, restarted: bool, persistent: bool) -> ToolResult:
    """The text the model sees for one execution, and its status."""
    parts = [RESTARTED] if restarted else []
    if result.stdout:
        parts.append(result.stdout.rstrip("\n"))
    if result.stderr:
        parts.append(f"[stderr]\n{result.stderr.rstrip()}")
    if result.value is not None:
        parts.append(result.value)
    status = ToolStatus.OK
    if result.status != "ok":
        parts.append(f"Error: {result.error}")
        status = ToolStatus.TIMEOUT if result.status == "timeout" else ToolStatus.EXECUTION_ERROR
    if result.state_lost and persistent:
        parts.append(STATE_LOST)
    return ToolResult(call_id="", name="python", content="\n".join(parts) if parts else "(no output)", status=status)


@register_provider("python", PythonSettings)
def build_python(settings: PythonSettings) -> PythonTool:
    """Run Python in a sandbox (bubblewrap by default); persistent or stateless interpreter."""
    tool = PythonTool(settings)
    _ = tool.pool  # start and probe now: a missing sandbox fails the run before any work
    return tool
